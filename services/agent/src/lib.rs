//! The Hodei agent: runs on each worker host, takes the commands addressed to it from its
//! durable JetStream consumer, runs each assigned attempt as a local process in its own
//! workspace and process group, ships the output as log batches, reports `Started` and
//! `Finished`, and sends heartbeats with the host's usage and the attempts it holds.
//!
//! ```no_run
//! use clap::Parser;
//! use hodei_agent::{Agent, AgentConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() -> Result<(), hodei_agent::AgentError> {
//! let agent = Agent::build(AgentConfig::parse()).await?;
//! agent.run_until_stopped(CancellationToken::new()).await?;
//! # Ok(())
//! # }
//! ```

mod agent;
mod artifacts;
mod attempt;
mod config;
mod error;
mod group;
mod heartbeat;
mod mask;
mod observe;
mod output;
mod publish;
mod running;

pub use agent::Agent;
pub use attempt::LOST_REASON;
pub use config::AgentConfig;
pub use error::AgentError;
