//! Heartbeats into `worker_beats` (and into `workers` when a beat changes the worker itself):
//! received beats are checked one by one (numbers in range,
//! subject naming the worker), buffered (newest per worker) and written at each flush in
//! transactions of at most [`WRITE_CHUNK`] beats (the first alone, then [`WRITERS`] at once)
//! with the worker events they cause. A chunk that fails for any reason but PostgreSQL being
//! away is written again beat by beat, so one beat that cannot be applied is refused alone. A
//! worker whose agent comes back as a new incarnation gets the attempts of the previous one
//! handed back at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_domain::{AttemptId, JobId, JobState, WorkerEvent, WorkerEventKind, WorkerId};
use hodei_messaging::{AgentCommand, Heartbeat, Outgoing, subjects};
use hodei_runtime::Backends;
use hodei_storage::workers::{self, HeartbeatApplied, HeartbeatEffect};
use hodei_storage::{StorageError, jobs};

use futures::StreamExt;
use hodei_messaging::trace;

use crate::confirm::SeenAttempts;
use crate::liveness::{self, StatusChange};
use crate::observation::Observation;
use crate::{QUEUE_GROUP, SERVICE, SOURCE};

/// Most heartbeats buffered before a flush is forced.
const MAX_BATCH: usize = 2000;

/// Most beats written in one transaction. A transaction holds the row locks of its beat rows,
/// and of the workers its beats change, until it commits: placements and recorded reports
/// wait for the latter, the liveness sweep for the former. A whole fleet's beats in one
/// transaction (1,000 workers, 20-30 ms) held them up that long, while a chunk holds 128.
const WRITE_CHUNK: usize = 128;

/// Chunks of one flush written at once, each on its own connection: one after the other, each
/// chunk's commit would wait for the previous one and a busy fleet's flushes would fall behind.
const WRITERS: usize = 4;

/// Receives heartbeats until `shutdown` (or the subscription ends) and writes them every
/// `flush_every`, or sooner once [`MAX_BATCH`] are buffered; then writes what is left.
pub(crate) async fn run(
    backends: &Backends,
    heartbeats: &mut async_nats::Subscriber,
    flush_every: Duration,
    observation: &Observation,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let mut buffer = Buffer::new();
    let mut tick = tokio::time::interval(flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            message = heartbeats.next() => {
                let Some(message) = message else { break };
                let span = trace::process_heartbeat_span(SERVICE, &message.subject, QUEUE_GROUP, message.headers.as_ref());
                span.in_scope(|| buffer.receive(backends, &message.subject, &message.payload));
                if buffer.len() >= MAX_BATCH {
                    buffer.flush(backends, observation).await;
                }
            }
            _ = tick.tick() => buffer.flush(backends, observation).await,
        }
    }
    buffer.flush(backends, observation).await;
}

/// How long before a kill order for a stale attempt is sent again if the agent still runs it.
const STALE_RESEND: Duration = Duration::from_secs(5);

/// Beats waiting for the next flush, with what the registry remembers between flushes.
struct Buffer {
    /// The newest beat of each worker, with when it was received: what `last_heartbeat_at`
    /// records, so a worker's silence is measured from its beat, not from the flush.
    beats: HashMap<WorkerId, (Heartbeat, DateTime<Utc>)>,
    /// Kill orders sent for stale attempts, and when, so each is not sent with every beat.
    orders: HashMap<AttemptId, tokio::time::Instant>,
    seen: SeenAttempts,
}

impl Buffer {
    pub fn new() -> Self {
        Self {
            beats: HashMap::new(),
            orders: HashMap::new(),
            seen: SeenAttempts::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.beats.len()
    }

    /// Checks one received beat and keeps it (the newest per worker): refused alone, with a
    /// metric, when malformed, out of range or sent on another worker's subject.
    pub fn receive(&mut self, backends: &Backends, subject: &str, payload: &[u8]) {
        backends.metrics.heartbeats_received.inc();
        let hb = match hodei_messaging::decode::<Heartbeat>(subject, payload) {
            Ok(hb) => hb,
            Err(e) => {
                backends.metrics.heartbeat_refused("payload");
                tracing::warn!(subject, error = %e, "malformed heartbeat refused");
                return;
            }
        };
        if subjects::token_after(subject, 3) != Some(hb.worker_id.as_str()) {
            backends.metrics.heartbeat_refused("worker_id");
            tracing::warn!(subject, worker_id = %hb.worker_id, "heartbeat subject does not match its worker id, refused");
            return;
        }
        if let Err(e) = hb.validate() {
            backends.metrics.heartbeat_refused(e.field);
            tracing::warn!(subject, worker_id = %hb.worker_id, error = %e, "heartbeat refused");
            return;
        }
        self.beats.insert(hb.worker_id.clone(), (hb, Utc::now()));
    }

    /// Writes the buffered beats; see the module doc.
    pub async fn flush(&mut self, backends: &Backends, observation: &Observation) {
        // Every beat received before this instant is in this flush (or an earlier one).
        let through = Utc::now();
        if self.beats.is_empty() {
            observation.flushed(through);
            return;
        }
        let beats: Vec<(Heartbeat, DateTime<Utc>)> = self.beats.drain().map(|(_, b)| b).collect();
        let sent_before = tokio::time::Instant::now() - STALE_RESEND;
        self.orders.retain(|_, sent| *sent > sent_before);
        let mut restarted = Vec::new();
        let mut unavailable = false;
        let orders = &self.orders;
        let away = AtomicBool::new(false);
        // The first chunk is written alone: it finds out whether PostgreSQL is there (after an
        // outage it is the circuit breaker's one trial call), so an outage counts once per
        // flush against the breaker, as a flush written whole did. The rest hold different
        // workers (one beat per worker), so they never wait for each other's locks; none
        // starts once one found PostgreSQL away.
        let mut chunks = beats.chunks(WRITE_CHUNK);
        let mut results = Vec::with_capacity(beats.len().div_ceil(WRITE_CHUNK));
        if let Some(first) = chunks.next() {
            results.push(write_chunk(backends, first, orders, &away).await);
        }
        let writes: Vec<_> = chunks
            .map(|chunk| write_chunk(backends, chunk, orders, &away))
            .collect();
        results.extend(
            futures::stream::iter(writes)
                .buffer_unordered(WRITERS)
                .collect::<Vec<_>>()
                .await,
        );
        for (chunk, result) in results {
            let Some(result) = result else {
                // Not tried: PostgreSQL was found away by another chunk.
                unavailable = true;
                continue;
            };
            match result {
                Ok(written) => self.written(backends, written, &mut restarted),
                Err(e) if e.is_unavailable() => {
                    // The beats are lost: nobody's silence may count until writes succeed
                    // again.
                    unavailable = true;
                    tracing::warn!(count = chunk.len(), error = %e, "failed to write heartbeats");
                }
                Err(e) => {
                    tracing::warn!(count = chunk.len(), error = %e, "failed to write a batch of heartbeats, writing them one by one");
                    for beat in chunk {
                        match write(backends, std::slice::from_ref(beat), &self.orders).await {
                            Ok(written) => self.written(backends, written, &mut restarted),
                            Err(e) if e.is_unavailable() => {
                                // The rest would find it away too.
                                unavailable = true;
                                break;
                            }
                            Err(e) => {
                                backends.metrics.heartbeat_refused("storage");
                                tracing::warn!(worker_id = %beat.0.worker_id, error = %e, "heartbeat could not be written, refused");
                            }
                        }
                    }
                }
            }
        }
        if unavailable {
            observation.flush_failed();
        } else {
            observation.flushed(through);
        }
        for (worker_id, incarnation) in restarted {
            hand_back_previous_incarnation(backends, &worker_id, incarnation).await;
        }
        self.seen.record(backends, &beats).await;
    }

    fn written(
        &mut self,
        backends: &Backends,
        written: Written,
        restarted: &mut Vec<(WorkerId, hodei_domain::IncarnationId)>,
    ) {
        tracing::debug!(messages = written.messages, "heartbeats flushed");
        let sent = tokio::time::Instant::now();
        self.orders
            .extend(written.ordered.into_iter().map(|a| (a, sent)));
        restarted.extend(written.restarted);
        if written.messages > 0 {
            backends.relay_wake.notify_one();
        }
    }
}

/// What one written batch did.
struct Written {
    messages: usize,
    /// Stale attempts ordered killed.
    ordered: Vec<AttemptId>,
    /// Workers whose agent came back as a new incarnation, with that incarnation.
    restarted: Vec<(WorkerId, hodei_domain::IncarnationId)>,
}

/// The attempts agents say they run that are no longer theirs (the job ended, moved to another
/// attempt or another worker): the attempt number is the fencing token.
async fn stale_attempts(
    conn: &mut sqlx::PgConnection,
    beats: &[(Heartbeat, DateTime<Utc>)],
) -> Result<Vec<(WorkerId, AttemptId)>, StorageError> {
    let ids: Vec<JobId> = beats
        .iter()
        .flat_map(|(hb, _)| hb.running.iter().map(|a| a.job_id))
        .collect();
    let current = jobs::current_attempts(conn, &ids).await?;
    let mut stale = Vec::new();
    for (hb, _) in beats {
        for attempt in &hb.running {
            let owned = current
                .get(&attempt.job_id)
                .is_some_and(|(state, number, worker)| {
                    matches!(state, JobState::Assigned | JobState::Running)
                        && *number == attempt.attempt
                        && worker.as_deref() == Some(hb.worker_id.as_str())
                });
            if !owned {
                stale.push((hb.worker_id.clone(), *attempt));
            }
        }
    }
    Ok(stale)
}

/// [`write`], returning the chunk with what became of it: `None` when it was not tried,
/// because another chunk of the flush found PostgreSQL away (`away`).
async fn write_chunk<'a>(
    backends: &Backends,
    chunk: &'a [(Heartbeat, DateTime<Utc>)],
    orders: &HashMap<AttemptId, tokio::time::Instant>,
    away: &AtomicBool,
) -> (
    &'a [(Heartbeat, DateTime<Utc>)],
    Option<Result<Written, StorageError>>,
) {
    if away.load(Ordering::Relaxed) {
        return (chunk, None);
    }
    let result = write(backends, chunk, orders).await;
    if result.as_ref().is_err_and(StorageError::is_unavailable) {
        away.store(true, Ordering::Relaxed);
    }
    (chunk, Some(result))
}

/// Writes `beats` in one transaction with the worker events they cause, and orders agents to
/// kill attempts that are no longer theirs; a worker that comes back with such attempts stays
/// lost (takes no work) until it has killed them.
async fn write(
    backends: &Backends,
    beats: &[(Heartbeat, DateTime<Utc>)],
    orders: &HashMap<AttemptId, tokio::time::Instant>,
) -> Result<Written, StorageError> {
    backends
        .db(|| async {
            let now = Utc::now();
            let mut tx = backends.pool.begin().await?;
            let stale = stale_attempts(&mut tx, beats).await?;
            let hold_back: HashSet<WorkerId> = stale.iter().map(|(w, _)| w.clone()).collect();
            let applied = workers::apply_heartbeats(&mut tx, beats, &hold_back).await?;
            let mut messages = Vec::new();
            let mut ordered = Vec::new();
            for (worker_id, attempt) in stale {
                if orders.contains_key(&attempt) {
                    continue;
                }
                tracing::warn!(worker_id = %worker_id, job_id = %attempt.job_id, attempt = %attempt.attempt, "stale attempt on worker, ordering it killed");
                let command = AgentCommand::Cancel {
                    job_id: attempt.job_id,
                    attempt: attempt.attempt,
                    reason: "stale attempt: the job is no longer this worker's".to_owned(),
                };
                messages.push(Outgoing::agent_command(&worker_id, &command)?);
                ordered.push(attempt);
            }
            let mut restarted = Vec::new();
            let by_worker: HashMap<&WorkerId, &Heartbeat> =
                beats.iter().map(|(hb, _)| (&hb.worker_id, hb)).collect();
            for HeartbeatApplied {
                worker_id,
                effect,
                replaced_incarnation,
            } in applied
            {
                let beat = by_worker.get(&worker_id).copied();
                if let (Some(previous), Some(hb)) = (replaced_incarnation, beat) {
                    tracing::info!(worker_id = %worker_id, incarnation = %hb.incarnation, previous = ?previous.map(|p| p.to_string()), "worker restarted as a new agent incarnation");
                    restarted.push((worker_id.clone(), hb.incarnation));
                }
                let kind = match effect {
                    HeartbeatEffect::Refreshed => continue,
                    HeartbeatEffect::Registered => {
                        let Some(hb) = beat else {
                            continue;
                        };
                        tracing::info!(worker_id = %worker_id, labels = ?hb.labels, "worker registered");
                        WorkerEventKind::Registered {
                            labels: hb.labels.clone(),
                            capacity: hb.capacity,
                            max_concurrent_jobs: hb.max_concurrent_jobs,
                        }
                    }
                    HeartbeatEffect::Returned => {
                        tracing::info!(worker_id = %worker_id, "worker returned");
                        WorkerEventKind::Returned
                    }
                    HeartbeatEffect::Draining => {
                        tracing::info!(worker_id = %worker_id, "worker draining");
                        WorkerEventKind::Draining
                    }
                    HeartbeatEffect::Offline => {
                        tracing::info!(worker_id = %worker_id, "worker said goodbye, offline");
                        WorkerEventKind::Offline
                    }
                };
                let event = WorkerEvent::new(worker_id, now, kind);
                messages.push(Outgoing::worker_event(&event, SOURCE)?);
            }
            hodei_storage::outbox::append(&mut tx, &messages).await?;
            tx.commit().await?;
            Ok(Written {
                messages: messages.len(),
                ordered,
                restarted,
            })
        })
        .await
}

/// A worker's agent came back as `incarnation`: the attempts it held from the previous one
/// are gone with that process, so they are handed back at once (but those whose report is
/// still on its way). A failure leaves them to the liveness sweep.
async fn hand_back_previous_incarnation(
    backends: &Backends,
    worker_id: &WorkerId,
    incarnation: hodei_domain::IncarnationId,
) {
    let worker = match backends
        .db(|| workers::get(&backends.pool, worker_id))
        .await
    {
        Ok(Some(worker)) => worker,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(worker_id = %worker_id, error = %e, "failed to read restarted worker");
            return;
        }
    };
    let previous = worker.attempts_of_other_incarnations(incarnation);
    if previous.is_empty() {
        return;
    }
    let reason = format!("the agent of worker {worker_id} restarted while the attempt ran");
    match liveness::hand_back(
        backends,
        worker,
        previous,
        &reason,
        StatusChange::Restarted(incarnation),
    )
    .await
    {
        Ok(done) => {
            tracing::warn!(worker_id = %worker_id, handed_back = done.handed_back, deferred = done.deferred, "attempts of the previous incarnation handed back")
        }
        Err(e) => {
            tracing::warn!(worker_id = %worker_id, error = %e, "failed to hand back the previous incarnation's attempts, the sweep retries")
        }
    }
}
