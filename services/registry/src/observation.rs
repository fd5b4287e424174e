//! Whether the registry could observe its fleet, and since when. Silence counts against a
//! worker only while the registry could have heard it: after the registry's own start, after
//! NATS reconnects, after PostgreSQL comes back from failing heartbeat writes, and after its own
//! processing lagged, the clock restarts, and so does every other registry's, since they share
//! the beats. An outage of the observer is never evidence against a worker.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use hodei_messaging::subjects;
use hodei_runtime::{NatsBreak, NatsContinuity};
use hodei_telemetry::Metrics;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The registry's view of its own ability to observe; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    state: Arc<Mutex<State>>,
    metrics: Metrics,
    /// Woken at each restart of the clock for a cause of this registry's own, to say it to
    /// the other registries (see [`share`]).
    restarted: Arc<Notify>,
}

#[derive(Debug)]
struct State {
    /// Silence before this instant is not counted.
    since: DateTime<Utc>,
    /// Whether NATS stayed connected since the last check.
    nats: NatsContinuity,
    /// The last heartbeat write failed: the beats it carried were dropped.
    writes_failing: bool,
    /// When buffered heartbeats were last written (or there were none to write).
    last_flush: Instant,
    /// Every beat received before this instant is written: silence is measured up to here,
    /// never over beats still on their way to the database.
    heard_through: DateTime<Utc>,
}

impl Observation {
    /// Starts observing now (the registry's own start counts as a restart of the clock).
    pub fn start(nats: &async_nats::Client, metrics: Metrics) -> Self {
        metrics.liveness_reset("start");
        let now = Utc::now();
        Self {
            state: Arc::new(Mutex::new(State {
                since: now,
                nats: NatsContinuity::start(nats),
                writes_failing: false,
                last_flush: Instant::now(),
                heard_through: now,
            })),
            metrics,
            restarted: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Silence before this counts for nothing.
    pub fn since(&self) -> DateTime<Utc> {
        self.lock().since
    }

    /// Every beat received before this is in `workers`.
    pub fn heard_through(&self) -> DateTime<Utc> {
        self.lock().heard_through
    }

    /// The registry could not observe: silence counts from now, here and (told through
    /// [`share`]) in every other registry.
    fn reset(&self, state: &mut State, cause: &'static str) {
        self.restart_clock(state, cause);
        self.restarted.notify_one();
    }

    fn restart_clock(&self, state: &mut State, cause: &'static str) {
        let now = Utc::now();
        if now > state.since {
            state.since = now;
        }
        self.metrics.liveness_reset(cause);
        tracing::debug!(
            cause,
            "liveness clock restarted: this or another registry could not observe"
        );
    }

    /// Another registry could not observe its share of the beats: silence counts from now
    /// here too.
    fn peer_restarted(&self) {
        let mut state = self.lock();
        self.restart_clock(&mut state, "peer");
    }

    /// A batch of heartbeats was written (or there was none), holding every beat received
    /// before `through`: the registry hears its fleet. The first success after failures
    /// restarts the clock, since the failed beats were lost.
    pub fn flushed(&self, through: DateTime<Utc>) {
        let mut state = self.lock();
        state.last_flush = Instant::now();
        if through > state.heard_through {
            state.heard_through = through;
        }
        if state.writes_failing {
            state.writes_failing = false;
            self.reset(&mut state, "postgres");
            tracing::info!("heartbeat writes recovered, silence counted from now");
        }
    }

    /// Writing a batch of heartbeats failed: those beats are lost, so nobody's silence counts.
    pub fn flush_failed(&self) {
        let mut state = self.lock();
        state.last_flush = Instant::now();
        state.writes_failing = true;
        self.reset(&mut state, "postgres");
    }

    /// Most of the fleet had gone silent at once, which was taken for the registry's own
    /// partition (a NATS route it cannot see from its connection), and is heard again: the
    /// silence of those still silent counts from now, so a worker whose beats come back a
    /// moment after the others' is not blamed for the partition's length.
    pub fn partition_ended(&self) {
        let mut state = self.lock();
        self.reset(&mut state, "partition");
    }

    /// Checks the NATS connection and the registry's own pace; restarts the clock while NATS is
    /// disconnected, after it reconnected, and while heartbeat writes lag more than `lag_limit`.
    pub fn check(&self, nats: &async_nats::Client, lag_limit: Duration) {
        let mut state = self.lock();
        if let Some(broke) = state.nats.look(nats) {
            if broke == NatsBreak::Reconnected {
                tracing::info!("nats reconnected, silence counted from now");
            }
            self.reset(&mut state, "nats");
        }
        if state.last_flush.elapsed() > lag_limit {
            self.reset(&mut state, "lag");
        }
        if state.writes_failing {
            self.reset(&mut state, "postgres");
        }
    }
}

/// Shares the clock's restarts among registries, which share the beats (a queue group): this
/// registry's own restarts are published on [`subjects::registry_observation`] (the first one,
/// its start, at once), and another's restart restarts this one's clock. A registry that lost
/// NATS gets no beats either, so what it cannot say it did not miss.
pub(crate) async fn share(
    nats: async_nats::Client,
    mut peers: async_nats::Subscriber,
    observation: Observation,
    shutdown: CancellationToken,
) {
    let me = Uuid::new_v4().to_string();
    let subject = subjects::registry_observation();
    observation.restarted.notify_one();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = observation.restarted.notified() => {
                if let Err(e) = nats.publish(subject.clone(), me.clone().into()).await {
                    tracing::debug!(error = %e, "could not tell the other registries of a restart");
                }
            }
            message = peers.next() => match message {
                Some(message) if message.payload.as_ref() != me.as_bytes() => {
                    observation.peer_restarted();
                }
                Some(_) => {}
                None => return,
            },
        }
    }
}
