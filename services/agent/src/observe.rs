//! What the agent tells its `/readyz` and `/metrics`: ready while connected to NATS; before
//! each scrape, the attempts it runs and the slots it has free. Also the outcome labels its
//! finished attempts are counted under.

use hodei_domain::AttemptOutcome;
use hodei_telemetry::http::BoxFuture;
use hodei_telemetry::{Check, Metrics, Probes};

use crate::running::Running;

/// This service's name on its spans and metrics.
pub(crate) const SERVICE: &str = "agent";

pub(crate) struct AgentProbes {
    pub nats: async_nats::Client,
    pub running: Running,
    pub max_concurrent_jobs: u32,
    pub metrics: Metrics,
}

impl Probes for AgentProbes {
    fn readiness(&self) -> BoxFuture<'_, Vec<Check>> {
        let nats = match self.nats.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(format!("not connected ({state})")),
        };
        Box::pin(async move { vec![Check::new("nats", nats)] })
    }

    fn refresh(&self) -> BoxFuture<'_, ()> {
        let running = i64::try_from(self.running.len()).unwrap_or(i64::MAX);
        self.metrics.agent_running_attempts.set(running);
        self.metrics
            .agent_free_slots
            .set((i64::from(self.max_concurrent_jobs) - running).max(0));
        Box::pin(async {})
    }
}

/// The label an attempt's outcome is counted under.
pub(crate) fn outcome_label(outcome: &AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Exited { code: 0 } => "succeeded",
        AttemptOutcome::Exited { .. } => "failed",
        AttemptOutcome::Signalled { .. } => "signalled",
        AttemptOutcome::TimedOut => "timed_out",
        AttemptOutcome::Cancelled => "cancelled",
        AttemptOutcome::SpawnFailed { .. } => "spawn_failed",
        AttemptOutcome::ArtifactsFailed { .. } => "artifacts_failed",
        AttemptOutcome::Lost { .. } => "lost",
        AttemptOutcome::Preempted { .. } => "preempted",
    }
}
