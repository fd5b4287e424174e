//! The `hodei-agent` binary: parses its configuration, starts logging, builds the agent and
//! runs it until SIGINT or SIGTERM. The first signal drains: no new work, running attempts
//! finish (up to the drain timeout). A second one stops at once: running attempts are
//! cancelled (SIGTERM, kill grace, SIGKILL) and reported cancelled before the agent exits.
//! Buffered traces are flushed last.

use anyhow::Context;
use clap::Parser;
use hodei_agent::{Agent, AgentConfig};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

fn main() -> anyhow::Result<()> {
    let config = AgentConfig::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(config.blocking_threads())
        .build()
        .context("failed to start the runtime")?
        .block_on(run(config))
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let telemetry = hodei_telemetry::init("agent").context("failed to initialise telemetry")?;
    // Listening from the start: a signal while connecting is kept and acted on once running.
    let signals = StopSignals::listen().context("failed to listen for sigint and sigterm")?;
    let agent = Agent::build(config)
        .await
        .context("failed to start the agent")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals.drive(shutdown.clone(), agent.force_stop_token()));
    let result = agent
        .run_until_stopped(shutdown)
        .await
        .context("failed to run the agent");
    telemetry.shutdown().await;
    result
}

/// SIGINT and SIGTERM, listened to for the whole run so a second one is never missed.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn listen() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// Cancels `drain` on the first signal and `force` on the second.
    async fn drive(mut self, drain: CancellationToken, force: CancellationToken) {
        self.next().await;
        info!("shutdown signal received, draining (send another to cancel running jobs)");
        drain.cancel();
        self.next().await;
        warn!("second shutdown signal received, cancelling running jobs");
        force.cancel();
    }
}
