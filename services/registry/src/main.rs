//! `hodei-registry`: parses configuration and runs the registry until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;
use hodei_registry::{Registry, RegistryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = RegistryConfig::parse();
    hodei_telemetry::init("registry").context("failed to initialise logging")?;
    let registry = Registry::build(config)
        .await
        .context("failed to start the registry")?;
    let shutdown = hodei_telemetry::shutdown_on_signal();
    registry
        .run_until_stopped(shutdown)
        .await
        .context("registry failed")?;
    tracing::info!("registry stopped");
    Ok(())
}
