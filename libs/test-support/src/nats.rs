//! A private nats-server with JetStream for one test: free port on 127.0.0.1,
//! store in a temporary folder, killed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::TestSupportError;
use crate::wait::{POLL_INTERVAL, free_port};

/// Longest wait for nats-server to take a new configuration.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

/// Environment variable naming the nats-server binary to use.
const NATS_SERVER_ENV: &str = "HODEI_NATS_SERVER";
/// Oldest supported nats-server (major, minor).
const MIN_VERSION: (u32, u32) = (2, 10);
/// How long a server may take to accept connections with JetStream ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one readiness probe (connect + account info) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many ports `start` tries when the server exits early (port taken).
const START_ATTEMPTS: usize = 3;
/// How much of the server log goes into error messages.
const LOG_TAIL_BYTES: usize = 2000;

/// A private nats-server (JetStream on, store in a temp dir, free port on
/// 127.0.0.1), killed on drop.
///
/// The binary comes from the environment variable `HODEI_NATS_SERVER`, else
/// `nats-server` on `PATH`; it must be version 2.10 or newer.
#[derive(Debug)]
pub struct TestNats {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Holds `store/` (the JetStream store) and `nats-server.log`.
    dir: TempDir,
    /// Authorization (and TLS) settings, if the server is secured.
    security: Option<NatsSecurity>,
}

/// What secures a test server: a configuration fragment (an `authorization` block, maybe a
/// `tls` block) and the credential the readiness probe connects with.
#[derive(Debug, Clone)]
pub struct NatsSecurity {
    /// nats-server configuration appended to the test server's own.
    pub config: String,
    /// A user nkey seed the fragment admits, with access to JetStream.
    pub probe_seed: String,
    /// The CA of the server certificate named in `config`, when it has a `tls` block.
    pub ca: Option<PathBuf>,
}

impl TestNats {
    /// Starts a server and waits (up to 10 s) until it accepts connections and
    /// JetStream answers.
    pub async fn start() -> Result<TestNats, TestSupportError> {
        Self::start_inner(None).await
    }

    /// Starts a server that admits only the credentials `security` names.
    pub async fn start_secured(security: NatsSecurity) -> Result<TestNats, TestSupportError> {
        Self::start_inner(Some(security)).await
    }

    async fn start_inner(security: Option<NatsSecurity>) -> Result<TestNats, TestSupportError> {
        let binary = find_binary()?;
        check_version(&binary).await?;
        let dir = tempfile::Builder::new()
            .prefix("hodei-test-nats-")
            .tempdir()
            .map_err(TestSupportError::io("creating a temporary folder for nats"))?;
        let mut nats = TestNats {
            binary,
            port: 0,
            child: None,
            dir,
            security,
        };
        let mut attempt = 1;
        loop {
            nats.port = free_port()?;
            match nats.launch().await {
                Ok(()) => break,
                // Most likely someone took the port between free_port and bind.
                Err(err @ TestSupportError::NatsExited { .. }) if attempt < START_ATTEMPTS => {
                    tracing::debug!(error = %err, "nats-server did not start, trying another port");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
        tracing::debug!(port = nats.port, "test nats-server ready");
        Ok(nats)
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL and waits for it to exit; the JetStream
    /// store is kept for [`TestNats::restart`]. Does nothing if it is stopped.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(err) = child.kill().await
        {
            tracing::warn!(error = %err, port = self.port, "could not kill the test nats-server");
        }
    }

    /// Replaces the security fragment of the configuration and has the running server reload
    /// it (`--signal reload`). The reload is applied asynchronously: wait on its effect.
    pub async fn reload(&mut self, config: String) -> Result<(), TestSupportError> {
        let Some(security) = self.security.as_mut() else {
            return Err(TestSupportError::NatsMisuse(
                "reload needs a server started with start_secured".to_owned(),
            ));
        };
        security.config = config;
        self.write_config()?;
        let reloads_before = self.reloads();
        let pid =
            self.child
                .as_ref()
                .and_then(Child::id)
                .ok_or_else(|| TestSupportError::Timeout {
                    what: "a running nats-server to reload".to_owned(),
                })?;
        let status = Command::new(&self.binary)
            .arg("--signal")
            .arg(format!("reload={pid}"))
            .stdin(Stdio::null())
            .status()
            .await
            .map_err(TestSupportError::io("signalling nats-server to reload"))?;
        if !status.success() {
            return Err(TestSupportError::NatsExited {
                port: self.port,
                status: format!("reload signal failed: {status}"),
                log: self.log_tail(),
            });
        }
        // The signal only asks: wait until the server says it took the new configuration, so
        // that a credential enrolled (or revoked) by this reload is known when this returns.
        crate::wait_for(
            "nats-server to reload its configuration",
            RELOAD_DEADLINE,
            || async { (self.reloads() > reloads_before).then_some(()) },
        )
        .await
    }

    /// How many times the server has logged that it reloaded its configuration.
    fn reloads(&self) -> usize {
        std::fs::read_to_string(self.log_path())
            .map(|log| log.matches("Reloaded server configuration").count())
            .unwrap_or(0)
    }

    /// Writes `nats-server.conf`: JetStream's storage limit is set, not derived from the
    /// disk's free space (75 % of it by default), as a busy CI disk would otherwise refuse
    /// streams that reserve their size up front (the 10 GiB artifact bucket), and tests store
    /// little; then the security fragment, if any.
    fn write_config(&self) -> Result<PathBuf, TestSupportError> {
        let path = self.dir.path().join("nats-server.conf");
        // Everything is in the file, nothing in flags: a reload re-reads the file alone and
        // refuses to run with settings that flags had given.
        let mut config = format!(
            "host: \"127.0.0.1\"\nport: {port}\nserver_name: \"hodei-test-{port}\"\n\
             jetstream {{ store_dir: {store}, max_file_store: 1TB }}\n",
            port = self.port,
            // A JSON string is a nats-server configuration string.
            store = serde_json::Value::from(self.store_dir().to_string_lossy()),
        );
        if let Some(security) = &self.security {
            config.push_str(&security.config);
        }
        std::fs::write(&path, config)
            .map_err(TestSupportError::io(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// Starts the server again on the same port with the same store (stopping
    /// it first if it runs) and waits until it is ready.
    pub async fn restart(&mut self) -> Result<(), TestSupportError> {
        self.stop().await;
        self.launch().await
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Spawns the server on `self.port` and waits until it is ready; on
    /// failure the process is killed.
    async fn launch(&mut self) -> Result<(), TestSupportError> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(TestSupportError::io(format!(
                "opening {}",
                log_path.display()
            )))?;
        let log_err = log
            .try_clone()
            .map_err(TestSupportError::io("duplicating the nats log handle"))?;
        let config = self.write_config()?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(TestSupportError::io(format!(
                "starting {}",
                self.binary.display()
            )))?;
        self.child = Some(child);
        let ready = self.wait_ready().await;
        if ready.is_err() {
            self.stop().await;
        }
        ready
    }

    /// Polls until a client can connect and JetStream answers an account
    /// info request, the process exits, or the deadline passes.
    async fn wait_ready(&mut self) -> Result<(), TestSupportError> {
        let url = self.url();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                let exited = child
                    .try_wait()
                    .map_err(TestSupportError::io("checking the nats-server process"))?;
                if let Some(status) = exited {
                    self.child = None;
                    return Err(TestSupportError::NatsExited {
                        port: self.port,
                        status: status.to_string(),
                        log: self.log_tail(),
                    });
                }
            }
            if jetstream_ready(&url, self.security.as_ref()).await {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TestSupportError::Timeout {
                    what: format!(
                        "nats-server at {url} to accept connections with jetstream ready \
                         (log: {})",
                        self.log_tail()
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// The last bytes of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => {
                let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
                String::from_utf8_lossy(bytes.get(start..).unwrap_or_default())
                    .trim()
                    .to_owned()
            }
            Err(err) => format!("<could not read the log: {err}>"),
        }
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        // What the server refused, for the test's output (shown when it fails).
        if let Ok(log) = std::fs::read_to_string(self.log_path()) {
            for line in log.lines().filter(|l| l.contains("Violation")).take(20) {
                eprintln!("nats-server {}: {line}", self.port);
            }
        }
        if let Some(child) = self.child.as_mut() {
            // SIGKILL, then reap it so it is gone before the store folder is
            // removed. Killing takes milliseconds; give up after a second.
            if child.start_kill().is_ok() {
                let until = std::time::Instant::now() + Duration::from_secs(1);
                while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

/// One readiness probe: connect, ask JetStream for the account info.
async fn jetstream_ready(url: &str, security: Option<&NatsSecurity>) -> bool {
    let probe = async {
        let mut options = async_nats::ConnectOptions::new().connection_timeout(PROBE_TIMEOUT);
        if let Some(security) = security {
            options = options.nkey(security.probe_seed.clone());
            if let Some(ca) = &security.ca {
                options = options.require_tls(true).add_root_certificates(ca.clone());
            }
        }
        let client = options.connect(url).await.ok()?;
        let jetstream = async_nats::jetstream::new(client);
        jetstream.query_account().await.ok()
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(_))
    )
}

/// The binary named by `HODEI_NATS_SERVER`, else `nats-server` on `PATH`.
fn find_binary() -> Result<PathBuf, TestSupportError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(TestSupportError::NatsNotFound {
            detail: format!("{NATS_SERVER_ENV}={} is not a file", path.display()),
        });
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| TestSupportError::NatsNotFound {
            detail: format!("{NATS_SERVER_ENV} is not set and there is no nats-server on PATH"),
        })
}

/// Runs `binary --version` and fails unless it reports 2.10 or newer.
async fn check_version(binary: &Path) -> Result<(), TestSupportError> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|err| TestSupportError::NatsVersion {
            path: binary.to_owned(),
            output: err.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let Some(version) = parse_version(&text) else {
        return Err(TestSupportError::NatsVersion {
            path: binary.to_owned(),
            output: text.trim().to_owned(),
        });
    };
    if (version.0, version.1) < MIN_VERSION {
        return Err(TestSupportError::NatsTooOld {
            path: binary.to_owned(),
            found: format!("{}.{}.{}", version.0, version.1, version.2),
        });
    }
    Ok(())
}

/// Parses the first `vX.Y.Z` (or `X.Y.Z`) in `nats-server --version` output,
/// e.g. `nats-server: v2.15.1`.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(|c: char| c.is_whitespace() || c == ':')
        .map(|word| word.strip_prefix('v').unwrap_or(word))
        .find_map(|word| {
            let mut parts = word.split(['.', '-', '+']);
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch = parts.next()?.parse().ok()?;
            Some((major, minor, patch))
        })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::wait_for;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[test]
    fn parses_nats_server_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("version 2.10.3"), Some((2, 10, 3)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(parse_version(""), None);
    }

    /// A fake binary printing `version_line` for `--version`.
    fn fake_server(dir: &Path, version_line: &str) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("nats-server");
        std::fs::write(&path, format!("#!/bin/sh\necho '{version_line}'\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    #[tokio::test]
    async fn rejects_servers_older_than_2_10_naming_the_version() -> TestResult {
        let dir = tempfile::tempdir()?;
        let old = fake_server(dir.path(), "nats-server: v2.9.10")?;
        let err = check_version(&old).await.expect_err("2.9 must be rejected");
        assert!(
            matches!(&err, TestSupportError::NatsTooOld { found, .. } if found == "2.9.10"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("2.9.10"), "{message}");
        assert!(message.contains("scripts/test.sh"), "{message}");
        Ok(())
    }

    #[tokio::test]
    async fn accepts_servers_from_2_10() -> TestResult {
        let dir = tempfile::tempdir()?;
        let new = fake_server(dir.path(), "nats-server: v2.10.0")?;
        check_version(&new).await?;
        Ok(())
    }

    #[tokio::test]
    async fn publishes_and_subscribes() -> TestResult {
        let nats = TestNats::start().await?;
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
        let client = async_nats::connect(nats.url()).await?;
        let mut sub = client.subscribe("hodei.test.ping").await?;
        client.flush().await?;
        client.publish("hodei.test.ping", "hello".into()).await?;
        let msg = tokio::time::timeout(DEADLINE, sub.next())
            .await?
            .expect("subscription ended");
        assert_eq!(msg.payload.as_ref(), b"hello");
        Ok(())
    }

    #[tokio::test]
    async fn jetstream_key_value_works() -> TestResult {
        let nats = TestNats::start().await?;
        let client = async_nats::connect(nats.url()).await?;
        let js = async_nats::jetstream::new(client);
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "hodei_test".to_owned(),
                ..Default::default()
            })
            .await?;
        kv.put("answer", "42".into()).await?;
        let value = kv.get("answer").await?.expect("key missing");
        assert_eq!(value.as_ref(), b"42");
        Ok(())
    }

    #[tokio::test]
    async fn clients_reconnect_after_stop_and_restart() -> TestResult {
        let mut nats = TestNats::start().await?;
        let port = nats.port();
        let client = async_nats::connect(nats.url()).await?;
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "HODEI_TEST".to_owned(),
            subjects: vec!["hodei.stream.>".to_owned()],
            ..Default::default()
        })
        .await?;
        let mut sub = client.subscribe("hodei.test.after").await?;
        client.flush().await?;

        nats.stop().await;
        wait_for("the client to notice the server is gone", DEADLINE, || {
            let state = client.connection_state();
            async move { (state != async_nats::connection::State::Connected).then_some(()) }
        })
        .await?;

        nats.restart().await?;
        assert_eq!(nats.port(), port, "restart must keep the port");
        wait_for("the client to reconnect", DEADLINE, || {
            let state = client.connection_state();
            async move { (state == async_nats::connection::State::Connected).then_some(()) }
        })
        .await?;

        // The subscription made before the restart is renewed on reconnect.
        client.publish("hodei.test.after", "again".into()).await?;
        client.flush().await?;
        let msg = tokio::time::timeout(DEADLINE, sub.next())
            .await?
            .expect("subscription ended");
        assert_eq!(msg.payload.as_ref(), b"again");

        // The JetStream store survived: the stream is still there.
        let stream = js.get_stream("HODEI_TEST").await?;
        assert_eq!(stream.cached_info().config.name, "HODEI_TEST");
        Ok(())
    }

    #[tokio::test]
    async fn restart_of_a_running_server_works() -> TestResult {
        let mut nats = TestNats::start().await?;
        nats.restart().await?;
        let client = async_nats::connect(nats.url()).await?;
        async_nats::jetstream::new(client).query_account().await?;
        Ok(())
    }
}
