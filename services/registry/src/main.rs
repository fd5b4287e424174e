//! `hodei-registry`: parses configuration and runs the registry until SIGINT/SIGTERM,
//! then flushes its traces.

use anyhow::Context;
use clap::Parser;
use hodei_registry::{Registry, RegistryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = RegistryConfig::parse();
    let telemetry = hodei_telemetry::init("registry").context("failed to initialise telemetry")?;
    let registry = Registry::build(config)
        .await
        .context("failed to start the registry")?;
    let shutdown = hodei_telemetry::shutdown_on_signal();
    let result = registry
        .run_until_stopped(shutdown)
        .await
        .context("registry failed");
    tracing::info!("registry stopped");
    telemetry.shutdown().await;
    result
}
