//! `hodei-scheduler`: parses configuration and runs the scheduler until SIGINT/SIGTERM,
//! then flushes its traces.

use anyhow::Context;
use clap::Parser;
use hodei_scheduler::{Scheduler, SchedulerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = SchedulerConfig::parse();
    let telemetry = hodei_telemetry::init("scheduler").context("failed to initialise telemetry")?;
    let scheduler = Scheduler::build(config)
        .await
        .context("failed to start the scheduler")?;
    let shutdown = hodei_telemetry::shutdown_on_signal();
    let result = scheduler
        .run_until_stopped(shutdown)
        .await
        .context("scheduler failed");
    tracing::info!("scheduler stopped");
    telemetry.shutdown().await;
    result
}
