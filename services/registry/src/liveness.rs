//! Lost-worker detection, careful about blame.
//!
//! - **Detection is fast.** A worker silent for `missed_beats` heartbeat intervals becomes
//!   `unreachable`: it gets no new work, but the attempts it holds stay its own.
//! - **Blame is careful.** Its attempts are handed back (ended `Lost`, requeued without
//!   spending the job's retries) only once its lease plus kill grace have passed since its
//!   last beat: by then its agent, if it is alive but cut off, has stopped them itself. Silence
//!   counts only while the registry could observe (see [`crate::observation`]). When more than
//!   `partition_share` of the live fleet is unreachable at once, that is a partition on the
//!   observer's side: nobody is declared lost.
//! - **Confirmed losses are handed back at once**: a new agent incarnation (see
//!   [`crate::heartbeats`]) or a goodbye.
//! - An attempt whose agent report still waits in the reports stream is never handed back:
//!   the report decides it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_domain::{
    AttemptOutcome, HeldAttempt, IncarnationId, JobEventKind, Worker, WorkerEvent, WorkerEventKind,
    WorkerId, WorkerStatus,
};
use hodei_messaging::{Outgoing, trace};
use hodei_runtime::Backends;
use hodei_storage::{StorageError, driver, jobs, workers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::observation::Observation;
use crate::{SERVICE, SOURCE};

/// When silence makes a worker unreachable and when a partition is suspected.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub interval: Duration,
    pub missed_beats: u32,
    /// Share of the live fleet that may be unreachable at once before the registry suspects
    /// its own partition and declares nobody lost.
    pub partition_share: f64,
    /// Smallest live fleet the partition rule applies to.
    pub partition_min_workers: u32,
}

impl Policy {
    fn silence(&self) -> Duration {
        self.interval * self.missed_beats.max(1)
    }

    /// How late heartbeat writes may be before the registry counts itself as not observing.
    pub fn lag_limit(&self) -> Duration {
        self.interval * 2
    }
}

/// How often the sweep looks for silent workers: a fifth of the heartbeat interval, so a
/// worker is marked within a fifth of an interval of its silence passing the limit.
fn sweep_period(interval: Duration) -> Duration {
    (interval / 5).max(Duration::from_millis(10))
}

/// Checks for silent workers every fifth of an interval until `shutdown`.
pub(crate) async fn run(
    backends: Backends,
    policy: Policy,
    observation: Observation,
    shutdown: CancellationToken,
) {
    let period = sweep_period(policy.interval);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = tokio::time::Instant::now();
    let mut partitioned = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        observation.check(&backends.nats, policy.lag_limit());
        // The sweep itself stalled (an overloaded host): what it did not watch does not count.
        if last_tick.elapsed() > period * 4 {
            observation.check(&backends.nats, Duration::ZERO);
        }
        last_tick = tokio::time::Instant::now();
        if let Err(e) = sweep(&backends, &policy, &observation, &mut partitioned).await {
            tracing::warn!(error = %e, "failed to sweep for silent workers");
        }
    }
}

async fn sweep(
    backends: &Backends,
    policy: &Policy,
    observation: &Observation,
    partitioned: &mut bool,
) -> Result<(), StorageError> {
    let now = Utc::now();
    // Silence counts from the observation's start, or from the end of a suspected partition.
    let mut since = observation.since();
    let silence = chrono::Duration::from_std(policy.silence()).unwrap_or(chrono::Duration::MAX);
    // Detection: no new work for a worker silent for `missed_beats` intervals, observed. Silence
    // is measured up to the last written beats, so a beat still being written never counts
    // as missing.
    let heard = observation.heard_through();
    if heard - since > silence {
        detect(backends, heard - silence).await?;
    }

    let candidates = backends
        .db(|| workers::holding_unreachable_or_gone(&backends.pool))
        .await?;
    if candidates.is_empty() {
        *partitioned = false;
        return Ok(());
    }
    let unreachable = candidates
        .iter()
        .filter(|w| w.status() == WorkerStatus::Unreachable)
        .count();
    let live = backends.db(|| workers::live_count(&backends.pool)).await?;
    let suspect_partition = unreachable > 0
        && live >= i64::from(policy.partition_min_workers)
        && (unreachable as f64) > policy.partition_share * (live as f64);
    if suspect_partition {
        if !*partitioned {
            backends.metrics.liveness_partitions.inc();
            tracing::warn!(
                unreachable,
                live,
                share = policy.partition_share,
                "most of the fleet went silent at once: treating it as the observer's partition, declaring nobody lost"
            );
        }
        *partitioned = true;
    } else if *partitioned {
        tracing::info!(
            unreachable,
            live,
            "fleet heard again, liveness back to normal"
        );
        *partitioned = false;
        observation.partition_ended();
        since = observation.since();
    }

    for worker in candidates {
        let id = worker.id().clone();
        let (change, reason) = match worker.status() {
            WorkerStatus::Unreachable if suspect_partition => continue,
            WorkerStatus::Unreachable if !worker.silent_past_lease(now, since) => {
                // Within the lease only the jobs that asked for it (idempotent work) go back.
                let attempts = worker.attempts_to_requeue_when_unreachable();
                if attempts.is_empty() {
                    continue;
                }
                let reason = format!(
                    "worker {id} unreachable and the job asked to be requeued at once \
                     (requeue_when_unreachable)"
                );
                match hand_back(backends, worker, attempts, &reason, StatusChange::None).await {
                    Ok(done) if done.handed_back > 0 => {
                        tracing::warn!(worker_id = %id, handed_back = done.handed_back, deferred = done.deferred, reason, "attempts handed back")
                    }
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {}
                    Err(e) => {
                        tracing::warn!(worker_id = %id, error = %e, "failed to hand back attempts")
                    }
                }
                continue;
            }
            WorkerStatus::Unreachable => {
                let lease = worker.lease();
                (
                    StatusChange::Lost,
                    format!(
                        "worker {id} silent past its lease and kill grace ({} ms + {} ms)",
                        lease.lease_ms, lease.kill_grace_ms
                    ),
                )
            }
            WorkerStatus::Offline => (
                StatusChange::None,
                format!("worker {id} said goodbye before the attempt ended"),
            ),
            WorkerStatus::Lost => (
                StatusChange::None,
                format!("worker {id} was lost before the attempt ended"),
            ),
            WorkerStatus::Ready | WorkerStatus::Draining => (
                StatusChange::None,
                format!("the agent of worker {id} restarted while the attempt ran"),
            ),
        };
        let attempts = match (worker.status(), worker.incarnation()) {
            (WorkerStatus::Ready | WorkerStatus::Draining, Some(current)) => {
                worker.attempts_of_other_incarnations(current)
            }
            (WorkerStatus::Ready | WorkerStatus::Draining, None) => continue,
            _ => worker.held().to_vec(),
        };
        match hand_back(backends, worker, attempts, &reason, change).await {
            Ok(done) => {
                if change == StatusChange::Lost {
                    backends.metrics.workers_lost.inc();
                }
                if done.handed_back > 0 || change == StatusChange::Lost {
                    tracing::warn!(worker_id = %id, handed_back = done.handed_back, deferred = done.deferred, reason, "attempts handed back");
                }
            }
            Err(e) if e.is_conflict() => {
                tracing::debug!(worker_id = %id, "worker changed while handing back its attempts, next sweep decides")
            }
            Err(e) => tracing::warn!(worker_id = %id, error = %e, "failed to hand back attempts"),
        }
    }
    Ok(())
}

/// Marks unreachable the ready or draining workers silent since before `silent_before`.
async fn detect(backends: &Backends, silent_before: DateTime<Utc>) -> Result<(), StorageError> {
    let silent = backends
        .db(|| workers::silent(&backends.pool, silent_before))
        .await?;
    if silent.is_empty() {
        return Ok(());
    }
    let ids: Vec<WorkerId> = silent.iter().map(|w| w.id().clone()).collect();
    match backends
        .db(|| mark_unreachable(backends, &ids, silent_before))
        .await
    {
        Ok(marked) if !marked.is_empty() => {
            for id in &marked {
                tracing::warn!(worker_id = %id, "worker silent, no new work for it");
            }
            backends
                .metrics
                .workers_unreachable
                .inc_by(marked.len() as u64);
            backends.relay_wake.notify_one();
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(workers = ids.len(), error = %e, "failed to mark silent workers unreachable")
        }
    }
    Ok(())
}

/// Marks unreachable, with their events and in one transaction, those of `ids` that are
/// still ready or draining and silent since before `silent_before` once locked (a beat may
/// have come meanwhile). Returns the workers marked.
async fn mark_unreachable(
    backends: &Backends,
    ids: &[WorkerId],
    silent_before: DateTime<Utc>,
) -> Result<Vec<WorkerId>, StorageError> {
    let mut tx = backends.pool.begin().await?;
    let ids: Vec<&WorkerId> = ids.iter().collect();
    // Their beats first: a beat being written finishes before the times are read below.
    workers::lock_beats(&mut tx, &ids).await?;
    let locked = workers::lock_many(&mut tx, &ids).await?;
    let now = Utc::now();
    let mut marked = Vec::new();
    let mut messages = Vec::new();
    for mut worker in locked.into_values() {
        if worker.last_heartbeat_at() >= silent_before {
            continue;
        }
        let version = worker.version();
        // A worker that changed status meanwhile (lost, offline) is left alone.
        let Ok(event) = worker.mark_unreachable(now) else {
            continue;
        };
        messages.push(Outgoing::worker_event(&event, SOURCE)?);
        marked.push((worker, version));
    }
    let changes: Vec<(&Worker, u64)> = marked.iter().map(|(w, v)| (w, *v)).collect();
    workers::save_reservations(&mut tx, &changes).await?;
    hodei_storage::outbox::append(&mut tx, &messages).await?;
    tx.commit().await?;
    Ok(marked.into_iter().map(|(w, _)| w.id().clone()).collect())
}

/// What handing back does to the worker's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusChange {
    None,
    /// Silent past its lease: the worker is lost.
    Lost,
    /// A new incarnation of its agent beat: the previous one is gone.
    Restarted(IncarnationId),
}

/// What a hand-back did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HandedBack {
    pub handed_back: usize,
    /// Attempts left with the worker because their report still waits to be recorded.
    pub deferred: usize,
}

/// In one transaction: releases `attempts` from `worker` (but those whose report is still
/// pending), applies `change` to its status, ends each released attempt as `Lost` (its job is
/// requeued without spending its retries) in its job's trace, and records the events.
pub(crate) async fn hand_back(
    backends: &Backends,
    mut worker: Worker,
    attempts: Vec<HeldAttempt>,
    reason: &str,
    change: StatusChange,
) -> Result<HandedBack, StorageError> {
    let mut release = Vec::new();
    let mut done = HandedBack::default();
    for held in attempts {
        if backends
            .report_pending(worker.id(), &held.attempt.job_id)
            .await
        {
            done.deferred += 1;
        } else {
            release.push(held);
        }
    }
    if release.is_empty() && change == StatusChange::None {
        return Ok(done);
    }
    let now = Utc::now();
    let version = worker.version();
    let last_beat = worker.last_heartbeat_at();
    let conflict = |e: hodei_domain::DomainError| StorageError::Conflict {
        what: e.to_string(),
    };
    let mut events: Vec<WorkerEvent> = Vec::new();
    match change {
        StatusChange::None => {}
        StatusChange::Lost => events.push(worker.mark_lost(now).map_err(conflict)?),
        StatusChange::Restarted(incarnation) => events.push(WorkerEvent::new(
            worker.id().clone(),
            now,
            WorkerEventKind::Restarted {
                incarnation,
                handed_back: release.len(),
            },
        )),
    }
    for held in &release {
        worker.release(&held.attempt).map_err(conflict)?;
    }
    backends
        .db(|| async {
            let mut tx = backends.pool.begin().await?;
            if change == StatusChange::Lost {
                // A beat written since the worker was read (one that changed nothing else
                // moves no version) renewed its agent's lease: its attempts may still run, so
                // it is not declared lost. The next sweep decides again.
                let heard = workers::lock_last_beat(&mut tx, worker.id()).await?;
                if heard != Some(last_beat) {
                    return Err(StorageError::Conflict {
                        what: format!("worker {} beat while being declared lost", worker.id()),
                    });
                }
            }
            workers::save_reservation(&mut tx, &worker, version).await?;
            let ids: Vec<_> = release.iter().map(|h| h.attempt.job_id).collect();
            let traces = jobs::trace_contexts(&mut *tx, &ids).await?;
            let mut ended = Vec::new();
            let mut handed_back = 0;
            for held in &release {
                let Some(mut job) = jobs::get(&mut *tx, held.attempt.job_id).await? else {
                    continue;
                };
                let job_version = job.version();
                let Ok(event) = job.finish(
                    held.attempt.attempt,
                    AttemptOutcome::Lost {
                        reason: reason.to_owned(),
                    },
                    now,
                    0.0,
                ) else {
                    // The job moved on (its report was recorded, or it was reassigned).
                    continue;
                };
                if matches!(event.kind, JobEventKind::Requeued { .. }) {
                    handed_back += 1;
                }
                if job.state().is_terminal() {
                    ended.push(job.state().as_str());
                }
                let step = tracing::info_span!("hand back lost attempt", hodei.service = SERVICE, job_id = %job.id(), worker_id = %worker.id());
                trace::set_parent(&step, traces.get(&job.id()).unwrap_or(&Default::default()));
                // The worker is saved above with its attempts released: nothing to free here.
                driver::commit_transition(&mut tx, &job, job_version, &event, None, Vec::new(), SOURCE)
                    .instrument(step)
                    .await?;
            }
            let messages = events
                .iter()
                .map(|e| Outgoing::worker_event(e, SOURCE))
                .collect::<Result<Vec<_>, _>>()?;
            hodei_storage::outbox::append(&mut tx, &messages).await?;
            tx.commit().await?;
            for state in ended {
                backends.metrics.job_finished(state);
            }
            done.handed_back = handed_back;
            Ok(())
        })
        .await?;
    backends.relay_wake.notify_one();
    Ok(done)
}
