//! Admission control: the gateway refuses new jobs with RESOURCE_EXHAUSTED while the queue is
//! at its configured depth, instead of letting the backlog (and every service's memory) grow
//! without bound. The depth is read from PostgreSQL every 250 ms by one task, not per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::errors::ApiError;
use hodei_runtime::Backends;
use hodei_storage::jobs;
use tokio_util::sync::CancellationToken;

/// How often the queue depth is refreshed.
const REFRESH: Duration = Duration::from_millis(250);

/// The admission gate shared by every call.
#[derive(Clone)]
pub struct Admission {
    queued: Arc<AtomicU64>,
    limit: u64,
}

impl Admission {
    /// Starts refreshing the queue depth until `shutdown`.
    pub fn start(backends: Backends, limit: u64, shutdown: CancellationToken) -> Self {
        let queued = Arc::new(AtomicU64::new(0));
        let depth = queued.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match backends.db(|| jobs::queued_count(&backends.pool)).await {
                    Ok(n) => depth.store(u64::try_from(n).unwrap_or(0), Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "failed to read the queue depth"),
                }
            }
        });
        Self { queued, limit }
    }

    /// Ok while the queue has room; RESOURCE_EXHAUSTED when it is full.
    pub fn check(&self) -> Result<(), ApiError> {
        self.check_room(1)
    }

    /// Ok while the queue has room for `jobs` more; RESOURCE_EXHAUSTED otherwise.
    pub fn check_room(&self, jobs: u64) -> Result<(), ApiError> {
        if jobs > self.limit {
            return Err(ApiError::Exhausted(format!(
                "{jobs} jobs are more than the queue holds (limit {}); submit them in smaller calls",
                self.limit
            )));
        }
        let queued = self.queued.load(Ordering::Relaxed);
        if queued.saturating_add(jobs) > self.limit {
            let more = if jobs > 1 {
                format!(", {jobs} more would pass it")
            } else {
                String::new()
            };
            return Err(ApiError::Exhausted(format!(
                "queue is full: {queued} jobs queued (limit {}){more}, retry later",
                self.limit
            )));
        }
        Ok(())
    }
}
