//! Hodei's services as separate operating-system processes, started from the binaries the
//! workspace builds, so that a test can kill one with SIGKILL and start it again as an
//! operator would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hodei_test_support::{TestDatabase, TestNats, free_port, http_get, wait_for};
use tokio::process::{Child, Command};

use crate::StartError;

/// How much of a service's log goes into messages.
const LOG_TAIL_BYTES: usize = 4000;

/// A free port on the loopback interface, for a service's listener.
pub fn loopback_port() -> Result<SocketAddr, StartError> {
    free_port()
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| StartError(format!("no free port: {e}")))
}

/// Environment pairs as a service process takes them.
pub fn vars(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A service's environment: `nats` and `database` as its backends, logging at `log`, and
/// `extra` on top.
pub fn backend_vars(
    nats: &TestNats,
    database: &TestDatabase,
    log: &str,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env = vars(&[
        ("HODEI_NATS_URL", nats.url()),
        ("HODEI_DATABASE_URL", database.url()),
        ("HODEI_LOG", log.to_owned()),
    ]);
    env.extend(vars(extra));
    env
}

/// Where the workspace's binaries are: next to the running executable (a bench binary in
/// `target/release/`), or next to its `deps/` folder (a test executable).
///
/// `cargo test` and `cargo nextest` build another package's binaries only as test harnesses,
/// so the suite's command (`scripts/test.sh`) runs `cargo build --workspace --bins` first.
pub fn binary(name: &str) -> Result<PathBuf, StartError> {
    let exe = std::env::current_exe()
        .map_err(|e| StartError(format!("cannot find the running executable: {e}")))?;
    let dir = exe
        .parent()
        .ok_or_else(|| StartError(format!("{} has no folder", exe.display())))?;
    let candidates = [Some(dir), dir.parent()];
    if let Some(path) = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    Err(StartError(format!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` (with \
         `--release` for benches) first (`scripts/test.sh` does)",
        exe.display()
    )))
}

/// One service process: its binary, its environment, a log file that survives restarts and
/// the address of its `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    metrics_addr: SocketAddr,
    child: Option<Child>,
}

impl ServiceProcess {
    /// Starts `binary` (a workspace binary's name) as `name`, with `env` on top of the test's
    /// own environment and `HODEI_METRICS_ADDR` set to `metrics_addr`; its output is
    /// appended to `<logs>/<name>.log`.
    pub fn start(
        name: &str,
        binary_name: &str,
        env: Vec<(String, String)>,
        metrics_addr: SocketAddr,
        logs: &Path,
    ) -> Result<ServiceProcess, StartError> {
        let mut process = ServiceProcess {
            name: name.to_owned(),
            binary: binary(binary_name)?,
            env,
            log: logs.join(format!("{name}.log")),
            metrics_addr,
            child: None,
        };
        process.spawn()?;
        Ok(process)
    }

    /// The service's name in this test.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn spawn(&mut self) -> Result<(), StartError> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
        };
        let fail = |e: std::io::Error| StartError(format!("failed to start {}: {e}", self.name));
        let (stdout, stderr) = (open().map_err(fail)?, open().map_err(fail)?);
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HODEI_METRICS_ADDR", self.metrics_addr.to_string())
            // The error a service exits with ends its log, not under anyhow's backtrace of it
            // (panics keep theirs, with `RUST_BACKTRACE`).
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(fail)?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL (no goodbye, no drain) and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(e) = child.kill().await
        {
            eprintln!("could not kill {}: {e}", self.name);
        }
    }

    /// Stops the process as an operator or an orchestrator does: SIGTERM, then SIGKILL if it
    /// still runs after `grace`. Returns how it exited.
    pub async fn stop(&mut self, grace: Duration) -> Result<std::process::ExitStatus, StartError> {
        let Some(mut child) = self.child.take() else {
            return Err(StartError(format!("{} is not running", self.name)));
        };
        self.signal(&child, nix::sys::signal::Signal::SIGTERM)?;
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(exited) => exited.map_err(|e| StartError(format!("waiting for {}: {e}", self.name))),
            Err(_) => {
                let _ = child.kill().await;
                Err(StartError(format!(
                    "{} did not stop within {grace:?} of SIGTERM; killed. Its log ends with:\n{}",
                    self.name,
                    self.log_tail()
                )))
            }
        }
    }

    /// Freezes the process where it stands (SIGSTOP), as a long pause of its host or of its
    /// runtime does: its connections stay open, nothing it holds is released, and it reads
    /// nothing until [`ServiceProcess::resume`].
    pub fn pause(&self) -> Result<(), StartError> {
        let child = self.running()?;
        self.signal(child, nix::sys::signal::Signal::SIGSTOP)
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) -> Result<(), StartError> {
        let child = self.running()?;
        self.signal(child, nix::sys::signal::Signal::SIGCONT)
    }

    fn running(&self) -> Result<&Child, StartError> {
        self.child
            .as_ref()
            .ok_or_else(|| StartError(format!("{} is not running", self.name)))
    }

    fn signal(&self, child: &Child, signal: nix::sys::signal::Signal) -> Result<(), StartError> {
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(nix::unistd::Pid::from_raw)
            .ok_or_else(|| StartError(format!("{} has already exited", self.name)))?;
        nix::sys::signal::kill(pid, signal)
            .map_err(|e| StartError(format!("could not signal {}: {e}", self.name)))
    }

    /// Starts the process again with the same settings (killing it first if it runs).
    pub async fn restart(&mut self) -> Result<(), StartError> {
        self.kill().await;
        self.spawn()
    }

    /// Waits until `/readyz` answers `status` (200 ready, 503 not), or fails with the log's
    /// tail. Fails at once if the process has exited.
    pub async fn wait_readiness(
        &mut self,
        status: u16,
        deadline: Duration,
    ) -> Result<(), StartError> {
        let addr = self.metrics_addr;
        let what = format!("{} /readyz to answer {status}", self.name);
        let ready = wait_for(&what, deadline, || async move {
            let response = http_get(addr, "/readyz").await.ok()?;
            (response.status == status).then_some(())
        });
        // A process that exits (a port taken, a backend refused) ends the wait at once; its
        // status is read below.
        let waited = match self.child.as_mut() {
            Some(child) => tokio::select! {
                waited = ready => waited,
                exited = child.wait() => exited
                    .map(|_| ())
                    .map_err(|e| hodei_test_support::TestSupportError::Io {
                        context: format!("waiting for {} to exit", self.name),
                        source: e,
                    }),
            },
            None => ready.await,
        };
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(exit))) => Some(exit.to_string()),
            _ => None,
        };
        match (waited, exited) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(exit)) => Err(StartError(format!(
                "{} exited ({exit}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            ))),
            (Err(e), Some(exit)) => Err(StartError(format!(
                "{e}, and {} exited ({exit}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            ))),
            (Err(e), None) => Err(StartError(format!(
                "{e}; the log of {} ends with:\n{}",
                self.name,
                self.log_tail()
            ))),
        }
    }

    /// The last few kilobytes of the service's log.
    pub fn log_tail(&self) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
                String::from_utf8_lossy(bytes.get(start..).unwrap_or_default()).into_owned()
            }
            Err(e) => format!("<could not read {}: {e}>", self.log.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_service_that_exits_while_starting_is_reported_at_once_with_its_error() {
        let nats = TestNats::start().await.unwrap();
        let database = TestDatabase::create().await.unwrap();
        let taken = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        let logs = tempfile::tempdir().unwrap();
        let env = backend_vars(
            &nats,
            &database,
            "info",
            &[("HODEI_GRPC_ADDR", taken.local_addr().unwrap().to_string())],
        );
        let mut gateway = ServiceProcess::start(
            "api-gateway",
            "hodei-api-gateway",
            env,
            loopback_port().unwrap(),
            logs.path(),
        )
        .unwrap();
        // Were the wait to outlast the process, it would end only at this deadline, as a timeout.
        let error = gateway
            .wait_readiness(200, Duration::from_secs(300))
            .await
            .unwrap_err()
            .0;
        database.cleanup().await.unwrap();
        assert!(
            error.starts_with("api-gateway exited"),
            "the exit ends the wait, not the deadline: {error}"
        );
        assert!(
            error.contains("Address already in use"),
            "the log's tail holds the error: {error}"
        );
        assert!(
            !error.contains("backtrace"),
            "no backtrace buries the error: {error}"
        );
    }
}
