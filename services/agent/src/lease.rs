//! The agent's lease on its work. Each heartbeat that reaches the NATS server (published, then
//! confirmed by an echo that came back through the server, see [`crate::heartbeat`]) renews
//! it from the moment it was sent. An agent cut off
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

/// When the agent last reached NATS, and for how long that lets it run attempts; and the
/// fence its lapses close.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    last_contact: Arc<Mutex<Instant>>,
    length: Duration,
    fence: Fence,
}

impl Lease {
    /// A lease of `length`, held from now (the agent has just connected), whose lapses close
    /// `fence`.
    pub fn new(length: Duration, fence: Fence) -> Self {
        Self {
            last_contact: Arc::new(Mutex::new(Instant::now())),
            length,
            fence,
        }
    }

    /// The server confirmed a heartbeat sent at `sent`: the lease runs from then. A lease that
    /// had run out closes the fence first, whether or not [`watch`] saw it.
    pub fn renew(&self, sent: Instant) {
        let mut last = self
            .last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.elapsed() > self.length {
            self.fence.lapse();
        }
        if sent > *last {
            *last = sent;
        }
    }

    /// The fence the lease's lapses close.
    pub fn fence(&self) -> &Fence {
        &self.fence
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

/// Which assignments the agent may run, after its lease lapsed. While the agent was cut off,
/// the registry may have handed its attempts back (it does so after lease plus kill grace of
/// silence, so only once the lease has lapsed), and assignments stored before then may be
/// delivered once the path heals, in any order with the first renewed beat. So from a lapse
/// on, every assignment is refused until a beat is confirmed again and the agent has read the
/// last sequence its command stream stored by then; afterwards, those stored up to that
/// sequence are refused too. A refused attempt is reported lost, and requeued without
/// spending a retry; one never handed back is requeued a little early, which runs it once.
///
/// The floor belongs to one command stream, known by its creation time: a stream made again
/// (NATS lost its store, an operator deleted it) numbers its messages from 1 again, and every
/// one of them was stored after the floor was read, so the floor does not hold for what was
/// stored from its creation on (an assignment of the old stream still on its way keeps it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Fence {
    state: Arc<Mutex<FenceState>>,
}

#[derive(Debug, Default)]
struct FenceState {
    lapsed: bool,
    /// Assignments stored at or before this sequence of the command stream are refused.
    floor: u64,
    /// When the command stream the floor was read from was created (Unix nanoseconds).
    stream_created: Option<i128>,
    /// When a command stream made again since was created: what it stored from then on is
    /// not under the floor.
    remade_at: Option<i128>,
}

/// Where and when the command stream stored an assignment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored {
    pub sequence: u64,
    /// The server's time (Unix nanoseconds).
    pub at: i128,
}

/// The reason a fenced assignment is reported lost with.
pub const FENCED_REASON: &str =
    "assigned before the agent's lease lapsed: it may have been handed to another worker";

impl Fence {
    fn state(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease lapsed: assignments are refused until [`Fence::reopen`].
    pub fn lapse(&self) {
        self.state().lapsed = true;
    }

    /// Whether the lease lapsed and the fence was not yet set since.
    pub fn lapsed(&self) -> bool {
        self.state().lapsed
    }

    /// A beat was confirmed after a lapse, and the command stream (created at
    /// `stream_created`, Unix nanoseconds) last stored sequence `last_stored` after it:
    /// assignments stored up to it stay refused, later ones run.
    pub fn reopen(&self, last_stored: u64, stream_created: i128) {
        let mut state = self.state();
        state.floor = if state.stream_created == Some(stream_created) {
            state.floor.max(last_stored)
        } else {
            last_stored
        };
        state.stream_created = Some(stream_created);
        state.remade_at = None;
        state.lapsed = false;
    }

    /// Whether an assignment `stored` so in the command stream is refused.
    pub fn refuses(&self, stored: Stored) -> bool {
        let state = self.state();
        state.lapsed || state.under_floor(stored)
    }

    /// Whether the assignment `stored` so is refused only by the floor (the lease is not
    /// lapsed): the stream may have been made again since, which [`Fence::stream_is`] tells.
    pub fn refuses_by_floor_alone(&self, stored: Stored) -> bool {
        let state = self.state();
        !state.lapsed && state.under_floor(stored)
    }

    /// The command stream now in place was created at `created` (Unix nanoseconds): if it is
    /// not the one the floor was read from, what it stored from then on is no longer under the
    /// floor. Returns whether that is news.
    pub fn stream_is(&self, created: i128) -> bool {
        let mut state = self.state();
        let known = state.stream_created.is_none_or(|known| known == created);
        if known || state.remade_at == Some(created) {
            return false;
        }
        state.remade_at = Some(created);
        true
    }
}

impl FenceState {
    fn under_floor(&self, stored: Stored) -> bool {
        stored.sequence <= self.floor && self.remade_at.is_none_or(|remade| stored.at < remade)
    }
}

/// Stops every running attempt as lost whenever the lease expires, until `stop`; a lapse
/// closes the lease's fence.
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
            lease.fence.lapse();
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
        let lease = Lease::new(Duration::from_secs(3), Fence::default());
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

    /// Stored at `sequence`, `at` seconds.
    fn stored(sequence: u64, at: i128) -> Stored {
        Stored { sequence, at }
    }

    #[test]
    fn after_a_lapse_only_assignments_stored_after_the_renewal_run() {
        let fence = Fence::default();
        assert!(!fence.refuses(stored(1, 1)), "no lapse yet");
        fence.lapse();
        assert!(
            fence.refuses(stored(1_000_000, 1)),
            "everything while lapsed"
        );
        fence.reopen(40, 7);
        assert!(fence.refuses(stored(40, 50)));
        assert!(!fence.refuses(stored(41, 50)));
        fence.reopen(10, 7);
        assert!(
            fence.refuses(stored(40, 50)),
            "the floor never goes back on one stream"
        );
    }

    #[test]
    fn a_stream_made_again_lifts_the_floor_for_what_it_stored() {
        let fence = Fence::default();
        assert!(!fence.stream_is(9), "no floor yet");
        fence.lapse();
        fence.reopen(40, 7);
        assert!(fence.refuses_by_floor_alone(stored(3, 20)));
        assert!(!fence.stream_is(7), "the same stream keeps its floor");
        assert!(fence.refuses(stored(3, 20)));
        // Made again at 30: what it stored runs; what the old one stored before still on its
        // way is refused.
        assert!(fence.stream_is(30));
        assert!(!fence.stream_is(30), "told once");
        assert!(!fence.refuses(stored(3, 31)));
        assert!(fence.refuses(stored(3, 20)));
        // Made again before a renewal after a lapse: its own last sequence is the floor.
        fence.lapse();
        assert!(
            !fence.refuses_by_floor_alone(stored(3, 40)),
            "a lapse refuses by itself"
        );
        fence.reopen(5, 45);
        assert!(fence.refuses(stored(5, 50)));
        assert!(!fence.refuses(stored(6, 50)));
    }
}
