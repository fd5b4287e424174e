//! Lost-worker detection: a worker silent for `missed_beats` heartbeat intervals is declared
//! lost, and each attempt it held ends as `Lost` (an infrastructure failure that does not
//! spend the job's retry budget), which puts its job back in the queue.

use std::time::Duration;

use chrono::Utc;
use hodei_domain::{AttemptOutcome, JobEventKind};
use hodei_messaging::{Outgoing, trace};
use hodei_storage::{Backends, StorageError, jobs, workers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{SERVICE, SOURCE};

/// Checks for silent workers every half interval until `shutdown`.
pub async fn run(
    backends: Backends,
    interval: Duration,
    missed_beats: u32,
    shutdown: CancellationToken,
) {
    let silence = interval * missed_beats.max(1);
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(silence) = chrono::Duration::from_std(silence) else {
            return;
        };
        match backends
            .db(|| workers::silent(&backends.pool, Utc::now() - silence))
            .await
        {
            Ok(silent) => {
                for worker in silent {
                    let id = worker.id().clone();
                    match backends.db(|| declare_lost(&backends, worker)).await {
                        Ok(requeued) => {
                            backends.metrics.workers_lost.inc();
                            tracing::warn!(worker_id = %id, attempts = requeued, "worker lost, attempts handed back");
                            backends.relay_wake.notify_one();
                        }
                        Err(e) if e.is_conflict() => {
                            tracing::debug!(worker_id = %id, "worker changed while declaring it lost, next sweep decides")
                        }
                        Err(e) => {
                            tracing::warn!(worker_id = %id, error = %e, "failed to declare worker lost")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to look for silent workers"),
        }
    }
}

/// In one transaction: marks the worker lost (if nobody changed it meanwhile), ends its
/// attempts as lost and requeues their jobs, each in its job's trace. Returns how many
/// attempts were handed back.
async fn declare_lost(
    backends: &Backends,
    mut worker: hodei_domain::Worker,
) -> Result<usize, StorageError> {
    let now = Utc::now();
    let version = worker.version();
    let (event, released) = worker.mark_lost(now).map_err(|e| StorageError::Conflict {
        what: e.to_string(),
    })?;
    let mut tx = backends.pool.begin().await?;
    workers::save_reservation(&mut tx, &worker, version).await?;
    let messages = [Outgoing::worker_event(&event, SOURCE)?];
    let mut requeued = 0;
    let ids: Vec<_> = released.iter().map(|h| h.attempt.job_id).collect();
    let traces = jobs::trace_contexts(&mut *tx, &ids).await?;
    let mut ended = Vec::new();
    for held in released {
        let Some(mut job) = jobs::get(&mut *tx, held.attempt.job_id).await? else {
            continue;
        };
        let job_version = job.version();
        let reason = format!("worker {} stopped sending heartbeats", worker.id());
        let Ok(event) = job.finish(
            held.attempt.attempt,
            AttemptOutcome::Lost { reason },
            now,
            0.0,
        ) else {
            // The job moved on (finished or reassigned): nothing to hand back.
            continue;
        };
        if matches!(event.kind, JobEventKind::Requeued { .. }) {
            requeued += 1;
        }
        if job.state().is_terminal() {
            ended.push(job.state().as_str());
        }
        // The job's own trace goes on: handing the attempt back is part of it.
        let step = tracing::info_span!("hand back lost attempt", hodei.service = SERVICE, job_id = %job.id(), worker_id = %worker.id());
        trace::set_parent(&step, traces.get(&job.id()).unwrap_or(&Default::default()));
        // The worker was saved above with its attempts released: nothing to free here.
        jobs::commit_transition(&mut tx, &job, job_version, &event, None, Vec::new(), SOURCE)
            .instrument(step)
            .await?;
    }
    hodei_storage::outbox::append(&mut tx, &messages).await?;
    tx.commit().await?;
    for state in ended {
        backends.metrics.job_finished(state);
    }
    Ok(requeued)
}
