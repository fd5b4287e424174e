//! Headless Chromium for the web console's tests, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`): JSON messages ending in a NUL byte, commands on the browser's
//! fd 3 and answers and events on its fd 4. `sh` moves our pipes there, so no unsafe code
//! is needed to hand a child extra descriptors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, broadcast, oneshot};

use crate::StartError;

/// Longest a DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long dropping a [`Browser`] waits for Chromium to exit before removing its profile.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// The event the reader broadcasts once the browser's pipe has closed.
const CLOSED_EVENT: &str = "Hodei.browserClosed";

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// The browser's binary: `HODEI_CHROMIUM`, else `chromium`, `chromium-browser` or
/// `google-chrome` on the PATH.
fn binary() -> Result<PathBuf, StartError> {
    if let Some(path) = std::env::var_os("HODEI_CHROMIUM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| which::which(name).ok())
        .ok_or_else(|| {
            StartError(
                "chromium is not installed: run scripts/test.sh (it installs it) or set HODEI_CHROMIUM"
                    .into(),
            )
        })
}

struct Connection {
    stdin: Mutex<ChildStdin>,
    pending: Pending,
    events: broadcast::Sender<Value>,
    next_id: AtomicU64,
    /// Set by the reader when the browser's pipe closes.
    closed: Arc<AtomicBool>,
    log: PathBuf,
}

impl Connection {
    async fn send(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, StartError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id, tx);
        }
        // The reader marks the connection closed before it drops the waiters: a command
        // registered after that sees the mark.
        if self.closed.load(Ordering::SeqCst) {
            if let Ok(mut pending) = self.pending.lock() {
                pending.remove(&id);
            }
            return Err(self.failed(method, "the browser went away"));
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        {
            let mut stdin = self.stdin.lock().await;
            stdin
                .write_all(&bytes)
                .await
                .map_err(|e| self.failed(method, &e.to_string()))?;
            stdin
                .flush()
                .await
                .map_err(|e| self.failed(method, &e.to_string()))?;
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(error))) => Err(StartError(format!("{method}: {error}"))),
            Ok(Err(_)) => Err(self.failed(method, "the browser went away")),
            Err(_) => Err(self.failed(method, "no answer within 30 s")),
        }
    }

    /// An error naming the command, with the end of the browser's own log.
    fn failed(&self, method: &str, why: &str) -> StartError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        StartError(format!(
            "{method}: {why}; chromium's log ends:\n{}",
            tail.join("\n")
        ))
    }
}

/// A headless Chromium, killed when dropped.
pub struct Browser {
    connection: Arc<Connection>,
    child: Child,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// Kills Chromium and waits (briefly) for it to exit, so that its profile folder can be
    /// removed: removed while Chromium still writes to it, the folder would stay behind.
    fn drop(&mut self) {
        if self.child.start_kill().is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + EXIT_WAIT;
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its helper processes may still finish writing for a moment.
        for _ in 0..20 {
            match std::fs::remove_dir_all(self.profile.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => break,
            }
        }
    }
}

impl Browser {
    /// Starts a headless Chromium with a fresh profile.
    pub async fn launch() -> Result<Browser, StartError> {
        let binary = binary()?;
        let profile = tempfile::tempdir().map_err(|e| StartError(format!("profile: {e}")))?;
        let log = profile.path().join("chromium.log");
        let stderr = std::fs::File::create(&log).map_err(|e| StartError(format!("log: {e}")))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(&binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                // Test systems serve TLS with a CA made for the test, which no browser trusts.
                "--ignore-certificate-errors",
                "--window-size=1280,900",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StartError(format!("failed to start {}: {e}", binary.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(StartError("chromium's pipes were not set up".into()));
        };
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (events, _) = broadcast::channel(1024);
        let connection = Arc::new(Connection {
            stdin: Mutex::new(stdin),
            pending: Arc::clone(&pending),
            events: events.clone(),
            next_id: AtomicU64::new(1),
            closed: Arc::clone(&closed),
            log,
        });
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                match reader.read_until(0, &mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buffer.last() == Some(&0) {
                    buffer.pop();
                }
                let Ok(message) = serde_json::from_slice::<Value>(&buffer) else {
                    continue;
                };
                if let Some(id) = message.get("id").and_then(Value::as_u64) {
                    let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(waiter) = waiter {
                        let answer = match message.get("error") {
                            Some(error) => Err(error.to_string()),
                            None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
                        };
                        let _ = waiter.send(answer);
                    }
                } else {
                    let _ = events.send(message);
                }
            }
            // The browser is gone: every waiting command fails now, not at its timeout,
            // and so does every wait for an event.
            closed.store(true, Ordering::SeqCst);
            if let Ok(mut pending) = pending.lock() {
                pending.clear();
            }
            let _ = events.send(json!({ "method": CLOSED_EVENT }));
        });
        Ok(Browser {
            connection,
            child,
            profile,
        })
    }

    /// A new tab, attached.
    pub async fn new_page(&self) -> Result<Page, StartError> {
        let target = self
            .connection
            .send(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].clone();
        let attached = self
            .connection
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| StartError("Target.attachToTarget: no session id".into()))?
            .to_owned();
        let page = Page {
            connection: Arc::clone(&self.connection),
            session,
        };
        page.send("Page.enable", json!({})).await?;
        page.send("Runtime.enable", json!({})).await?;
        Ok(page)
    }
}

/// One tab.
pub struct Page {
    connection: Arc<Connection>,
    session: String,
}

impl Page {
    async fn send(&self, method: &str, params: Value) -> Result<Value, StartError> {
        self.connection
            .send(Some(&self.session), method, params)
            .await
    }

    /// Loads `url` and waits for its load event.
    pub async fn goto(&self, url: &str) -> Result<(), StartError> {
        let mut events = self.connection.events.subscribe();
        let navigated = self.send("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = navigated.get("errorText").and_then(Value::as_str) {
            return Err(StartError(format!("navigating to {url}: {error}")));
        }
        // A navigation within the document (a new #fragment) loads nothing.
        if navigated.get("loaderId").is_none() {
            return Ok(());
        }
        let loaded = async {
            loop {
                match events.recv().await {
                    Ok(event)
                        if event["method"] == "Page.loadEventFired"
                            && event["sessionId"] == self.session.as_str() =>
                    {
                        return Ok(());
                    }
                    Ok(event) if event["method"] == CLOSED_EVENT => {
                        return Err(self
                            .connection
                            .failed(&format!("loading {url}"), "the browser went away"));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(StartError("the browser went away".into()));
                    }
                }
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, loaded)
            .await
            .map_err(|_| StartError(format!("{url} did not load within 30 s")))?
    }

    /// Evaluates `js` (awaiting a promise) and returns its value; an exception is the error.
    pub async fn eval(&self, js: &str) -> Result<Value, StartError> {
        let answer = self
            .send(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = answer.get("exceptionDetails") {
            let text = exception["exception"]["description"]
                .as_str()
                .or_else(|| exception["text"].as_str())
                .unwrap_or("exception");
            return Err(StartError(format!("{js}: {text}")));
        }
        Ok(answer["result"]
            .get("value")
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// Evaluates `js` every 100 ms until its value is truthy, and returns it; an exception
    /// (an element not there yet) counts as not yet.
    pub async fn wait_for(
        &self,
        js: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<Value, StartError> {
        let last = std::sync::Mutex::new(Value::Null);
        let found = hodei_test_support::wait_for(what, timeout, || async {
            let value = match self.eval(js).await {
                Ok(value) if truthy(&value) => return Some(value),
                Ok(value) => value,
                Err(e) => Value::String(e.0),
            };
            if let Ok(mut slot) = last.lock() {
                *slot = value;
            }
            None
        })
        .await;
        match found {
            Ok(value) => Ok(value),
            Err(_) => {
                let location = self.eval("location.href").await.unwrap_or(Value::Null);
                let last = last.lock().map(|v| v.clone()).unwrap_or(Value::Null);
                Err(StartError(format!(
                    "timed out after {timeout:?} waiting for {what} (at {location}); last value {last}"
                )))
            }
        }
    }

    /// Clicks the first element that matches `selector`.
    pub async fn click(&self, selector: &str) -> Result<(), StartError> {
        let selector = serde_json::to_string(selector).unwrap_or_default();
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector}); if (!e) return false; \
                 if (typeof e.click === 'function') e.click(); \
                 else e.dispatchEvent(new MouseEvent('click', {{bubbles: true, cancelable: true, view: window}})); \
                 return true }})()"
            ))
            .await?;
        if found == Value::Bool(true) {
            Ok(())
        } else {
            Err(StartError(format!("no element matches {selector}")))
        }
    }

    /// Emulates a screen of `width`×`height` CSS pixels (a phone's with `mobile`).
    pub async fn set_viewport(
        &self,
        width: u32,
        height: u32,
        mobile: bool,
    ) -> Result<(), StartError> {
        self.send(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await
        .map(|_| ())
    }

    /// Saves the whole page (not just the screen) as a PNG.
    pub async fn screenshot(&self, path: &Path) -> Result<(), StartError> {
        let metrics = self.send("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let (width, height) = (
            size["width"].as_f64().unwrap_or(1280.0).ceil(),
            size["height"].as_f64().unwrap_or(900.0).ceil(),
        );
        let shot = self
            .send(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": width, "height": height, "scale": 1 },
                }),
            )
            .await?;
        let data = shot["data"]
            .as_str()
            .ok_or_else(|| StartError("Page.captureScreenshot: no data".into()))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| StartError(format!("screenshot: {e}")))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StartError(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(path, png).map_err(|e| StartError(format!("{}: {e}", path.display())))
    }
}

/// JavaScript's truthiness of a returned value.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
