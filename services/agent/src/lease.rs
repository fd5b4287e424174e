//! The agent's lease on its work. Each heartbeat that reaches the NATS server (published, then
//! confirmed by a flush round trip) renews it from the moment it was sent. An agent cut off
//! from NATS for longer than its lease stops its attempts itself (SIGTERM, kill grace,
//! SIGKILL) and reports them lost once it reconnects. The registry hands a silent worker's
//! attempts back only after lease plus kill grace since its last heartbeat, so by then none of
//! them still runs: two attempts of one job never run at the same time, even across a
//! partition.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hodei_domain::WorkerId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::running::Running;

/// When the agent last reached NATS, and for how long that lets it run attempts.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    last_contact: Arc<Mutex<Instant>>,
    length: Duration,
}

impl Lease {
    /// A lease of `length`, held from now (the agent has just connected).
    pub fn new(length: Duration) -> Self {
        Self {
            last_contact: Arc::new(Mutex::new(Instant::now())),
            length,
        }
    }

    /// The server confirmed a heartbeat sent at `sent`: the lease runs from then.
    pub fn renew(&self, sent: Instant) {
        let mut last = self
            .last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if sent > *last {
            *last = sent;
        }
    }

    /// How long since the last confirmed contact.
    pub fn silence(&self) -> Duration {
        self.last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// Whether the agent has gone without NATS for longer than its lease.
    pub fn expired(&self) -> bool {
        self.silence() > self.length
    }
}

/// Stops every running attempt as lost whenever the lease expires, until `stop`.
pub(crate) async fn watch(
    lease: Lease,
    running: Running,
    worker_id: WorkerId,
    metrics: hodei_telemetry::Metrics,
    stop: CancellationToken,
) {
    let period = (lease.length / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expired = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if lease.expired() {
            let stopped = running.lose_all();
            if !expired {
                expired = true;
                metrics.agent_lease_expired.inc();
                warn!(worker_id = %worker_id, silence_ms = %lease.silence().as_millis(), lease_ms = %lease.length.as_millis(), stopped, "no contact with nats for longer than the lease, stopping every attempt");
            }
        } else if expired {
            expired = false;
            info!(worker_id = %worker_id, "contact with nats back, lease renewed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_lease_runs_from_the_last_confirmed_beat() {
        let lease = Lease::new(Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!lease.expired());
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(lease.expired());
        lease.renew(sent);
        assert!(!lease.expired());
        lease.renew(sent - Duration::from_secs(10));
        assert!(
            !lease.expired(),
            "an older contact never shortens the lease"
        );
    }
}
