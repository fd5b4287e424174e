//! The registry's part in a job's trace: the first heartbeat that shows a worker running an
//! attempt is recorded as a span `attempt reported by worker` in the job's own trace (whose
//! context was stored at submission), so the trace shows when the fleet's view confirmed the
//! attempt. Later beats about the same attempt add nothing.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_domain::AttemptId;
use hodei_messaging::{Heartbeat, trace};
use hodei_runtime::Backends;
use hodei_storage::jobs;
use tokio::time::Instant;

use crate::SERVICE;

/// How long an attempt stays known after its last beat: past that, a beat about it (a worker
/// back after a long silence) is recorded again.
const FORGET_AFTER: Duration = Duration::from_secs(300);

/// Attempts already recorded, with when a beat last showed them.
#[derive(Debug, Default)]
pub(crate) struct SeenAttempts(HashMap<AttemptId, Instant>);

impl SeenAttempts {
    /// Records the attempts `beats` show for the first time, each in its job's trace.
    pub(crate) async fn record(
        &mut self,
        backends: &Backends,
        beats: &[(Heartbeat, DateTime<Utc>)],
    ) {
        let now = Instant::now();
        self.0
            .retain(|_, last| now.duration_since(*last) < FORGET_AFTER);
        let mut new = Vec::new();
        for (hb, _) in beats {
            for attempt in &hb.running {
                if self.0.insert(*attempt, now).is_none() {
                    new.push((hb.worker_id.clone(), *attempt));
                }
            }
        }
        if new.is_empty() {
            return;
        }
        let ids: Vec<_> = new.iter().map(|(_, a)| a.job_id).collect();
        let traces = match backends
            .db(|| jobs::trace_contexts(&backends.pool, &ids))
            .await
        {
            Ok(traces) => traces,
            Err(e) => {
                tracing::debug!(error = %e, "failed to read trace contexts of reported attempts");
                return;
            }
        };
        for (worker_id, attempt) in new {
            let Some(stored) = traces.get(&attempt.job_id) else {
                continue;
            };
            let span = tracing::info_span!(
                "attempt reported by worker",
                hodei.service = SERVICE,
                job_id = %attempt.job_id,
                attempt = %attempt.attempt,
                worker_id = %worker_id,
            );
            trace::set_parent(&span, stored);
            span.in_scope(|| tracing::debug!("attempt running on worker"));
        }
    }
}
