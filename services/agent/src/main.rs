//! The `hodei-agent` binary: parses its configuration, starts logging, builds the agent and
//! runs it until SIGINT or SIGTERM, draining the attempts it runs before it exits.

use anyhow::Context;
use clap::Parser;
use hodei_agent::{Agent, AgentConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = AgentConfig::parse();
    hodei_telemetry::init("agent").context("failed to initialise telemetry")?;
    let shutdown = hodei_telemetry::shutdown_on_signal();
    let agent = Agent::build(config)
        .await
        .context("failed to start the agent")?;
    agent
        .run_until_stopped(shutdown)
        .await
        .context("failed to run the agent")?;
    Ok(())
}
