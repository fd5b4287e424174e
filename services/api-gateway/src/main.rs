//! `hodei-api-gateway`: parses configuration and serves the gRPC API until SIGINT/SIGTERM,
//! then flushes its traces.

use anyhow::Context;
use clap::Parser;
use hodei_api_gateway::{Gateway, GatewayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = GatewayConfig::parse();
    let telemetry =
        hodei_telemetry::init("api-gateway").context("failed to initialise telemetry")?;
    let gateway = Gateway::build(config)
        .await
        .context("failed to start the api gateway")?;
    let shutdown = hodei_telemetry::shutdown_on_signal();
    let result = gateway
        .run_until_stopped(shutdown)
        .await
        .context("api gateway failed");
    tracing::info!("api gateway stopped");
    telemetry.shutdown().await;
    result
}
