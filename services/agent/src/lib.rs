//! The Hodei agent: runs on each worker host, takes the commands addressed to it from its
//! durable JetStream consumer, runs each assigned attempt as a local process in its own
//! workspace and process group, ships the output as log batches, reports `Started` and
//! `Finished`, and sends heartbeats with the host's usage and the attempts it holds. Its jobs
//! die with it, it stops them itself when cut off from NATS longer than its lease, and each
//! start is a new incarnation that sweeps and reports what the previous one left.
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
mod cgroup;
mod config;
mod error;
mod group;
mod heartbeat;
mod identity;
mod launch;
mod lease;
mod mask;
mod observe;
mod output;
mod publish;
mod records;
mod running;
mod work_lock;

pub use agent::Agent;
pub use attempt::{LEASE_REASON, LOST_REASON};
pub use cgroup::CgroupMode;
pub use config::AgentConfig;
pub use error::AgentError;
pub use lease::FENCED_REASON;
pub use records::RESTARTED_REASON;
pub use work_lock::WorkLockError;
