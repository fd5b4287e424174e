//! Agents' reports: `started` moves the job to running, `finished` ends the attempt (success,
//! retry, failure, timeout or cancel) and frees the worker's slot. Reports about any attempt
//! but the job's current one are stale and rejected (the attempt number is the fencing
//! token); redelivered reports find the transition already made and are acknowledged.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use hodei_domain::{AttemptId, DomainError, Job, JobEvent, JobId};
use hodei_messaging::settle::{self, dead_letter};
use hodei_messaging::{AgentReport, ReportKind, streams, subjects, trace};
use hodei_storage::driver::Transition;
use hodei_storage::{StorageError, driver, jobs, workers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Context, SERVICE, SOURCE, SchedulerError, jitter};

/// First delay before a report that could not be recorded is delivered again.
const REPORT_RETRY: Duration = Duration::from_millis(250);
/// Longest delay between two deliveries of a report that could not be recorded.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Most reports recorded in one transaction.
const REPORT_BATCH: usize = 256;

/// Shortest and longest wait between two tries of a batch held while PostgreSQL is away.
const HOLD_RETRY_MIN: Duration = Duration::from_millis(100);
const HOLD_RETRY_MAX: Duration = Duration::from_secs(1);

/// Consumes reports until `shutdown`: each batch that is ready (up to [`REPORT_BATCH`]) is
/// recorded in one transaction (group commit); a batch that cannot be recorded as a whole is
/// recorded report by report, so one bad report fails alone.
pub(crate) async fn run(
    ctx: Context,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let messages = consumer
        .messages()
        .await
        .map_err(|e| SchedulerError::Consume {
            what: "reports",
            reason: e.to_string(),
        })?;
    let mut batches = messages.ready_chunks(REPORT_BATCH);
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            batch = batches.next() => batch,
        };
        let Some(batch) = batch else {
            return Ok(());
        };
        let mut checked = Vec::with_capacity(batch.len());
        for message in batch {
            match message {
                Ok(message) => {
                    if let Some(report) = check(&ctx, message).await {
                        checked.push(report);
                    }
                }
                Err(e) => {
                    ctx.backends.metrics.nats_error("consume");
                    tracing::warn!(error = %e, "failed to receive a report");
                }
            }
        }
        if !handle_batch(&ctx, checked, &shutdown).await {
            return Ok(());
        }
    }
}

/// What became of a report.
enum Outcome {
    Recorded,
    Ignored(String),
    /// The sender does not hold the attempt it reports on.
    Forged(String),
}

/// A report that decoded and whose subject names its sender, with the span it is processed in.
struct Checked {
    report: AgentReport,
    message: Message,
    span: tracing::Span,
}

/// Decodes a report and checks that its subject names its sender; dead-letters it if not.
async fn check(ctx: &Context, message: Message) -> Option<Checked> {
    let span = trace::process_span(
        SERVICE,
        &message.subject,
        streams::REPORTER,
        message.headers.as_ref(),
    );
    let mut report =
        match hodei_messaging::decode::<AgentReport>(&message.subject, &message.payload) {
            Ok(r) => r,
            Err(e) => {
                ctx.backends.metrics.report_refused("malformed");
                dead_letter(&ctx.backends.js, &message, "report", &e.to_string())
                    .instrument(span)
                    .await;
                return None;
            }
        };
    // The subject names the sender (a NATS credential can be bound to it): the payload must
    // agree with it.
    let named = subjects::report_sender(&message.subject);
    if named
        != Some((
            report.worker_id.as_str(),
            report.job_id.to_string().as_str(),
        ))
    {
        ctx.backends.metrics.report_refused("sender");
        let reason = format!(
            "report for job {} from worker {} arrived on subject {}, which names another sender or job",
            report.job_id, report.worker_id, message.subject
        );
        dead_letter(&ctx.backends.js, &message, "report", &reason)
            .instrument(span)
            .await;
        return None;
    }
    report.make_storable();
    Some(Checked {
        report,
        message,
        span,
    })
}

/// Records a batch in one transaction, or, if that fails, report by report. False when
/// `shutdown` came while the batch was held (its reports are delivered again elsewhere).
async fn handle_batch(ctx: &Context, batch: Vec<Checked>, shutdown: &CancellationToken) -> bool {
    if batch.is_empty() {
        return true;
    }
    let Some(recorded) = record_when_available(ctx, &batch, shutdown).await else {
        return false;
    };
    match recorded {
        Ok(outcomes) => {
            for (checked, outcome) in batch.iter().zip(outcomes) {
                settle(ctx, checked, Ok(outcome))
                    .instrument(checked.span.clone())
                    .await;
            }
        }
        Err(e) => {
            if batch.len() > 1 {
                tracing::debug!(error = %e, count = batch.len(), "report batch not recorded together, recording one by one");
            }
            for checked in &batch {
                let result = ctx
                    .backends
                    .db_until_no_conflict(|| record(ctx, &checked.report))
                    .instrument(checked.span.clone())
                    .await;
                settle(ctx, checked, result)
                    .instrument(checked.span.clone())
                    .await;
            }
        }
    }
    true
}

/// Records the batch in one transaction. While PostgreSQL is away (this process's breaker
/// has opened: one call that failed or timed out alone is no outage) the batch is held rather
/// than handed back: its messages are kept in progress (so JetStream delivers them to no one
/// else) until PostgreSQL answers a ping, then the batch is tried again as any batch is. So
/// its reports are recorded within a second of PostgreSQL's return, a long outage does not
/// redeliver every waiting report over and over, and the batch is never the breaker's probe
/// (one slow for its own reasons, a row locked, would keep the breaker open for everyone).
/// `None` when `shutdown` came meanwhile: the batch is handed back for another replica.
async fn record_when_available(
    ctx: &Context,
    batch: &[Checked],
    shutdown: &CancellationToken,
) -> Option<Result<Vec<Outcome>, StorageError>> {
    loop {
        let recorded = ctx
            .backends
            .db_until_no_conflict(|| record_batch(ctx, batch))
            .await;
        match &recorded {
            Err(e) if e.is_unavailable() && ctx.backends.postgres_away() => {}
            _ => return Some(recorded),
        }
        tracing::warn!(
            count = batch.len(),
            "postgres unavailable, holding a batch of reports until it answers"
        );
        if !hold_until_postgres_answers(ctx, batch, shutdown).await {
            for checked in batch {
                if let Err(e) = checked.message.ack_with(AckKind::Nak(None)).await {
                    ctx.backends.metrics.nats_error("ack");
                    tracing::warn!(job_id = %checked.report.job_id, error = %e, "failed to hand back a held report");
                }
            }
            return None;
        }
    }
}

/// Keeps `batch` in progress until a ping through the breaker succeeds (true) or `shutdown`
/// (false). Progress goes out before each ping, so the messages outlive every wait.
async fn hold_until_postgres_answers(
    ctx: &Context,
    batch: &[Checked],
    shutdown: &CancellationToken,
) -> bool {
    let keep_every = Duration::from_millis(ctx.config.ack_wait_ms) / 3;
    let mut kept_at: Option<tokio::time::Instant> = None;
    let mut wait = HOLD_RETRY_MIN;
    loop {
        if kept_at.is_none_or(|at| at.elapsed() >= keep_every) {
            for checked in batch {
                if let Err(e) = checked.message.ack_with(AckKind::Progress).await {
                    ctx.backends.metrics.nats_error("ack");
                    tracing::debug!(error = %e, "failed to keep a held report in progress");
                }
            }
            kept_at = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(wait.clamp(HOLD_RETRY_MIN, HOLD_RETRY_MAX)) => {}
        }
        match ctx
            .backends
            .db(|| hodei_storage::ping(&ctx.backends.pool))
            .await
        {
            Ok(()) => return true,
            Err(StorageError::Unavailable { retry_in, .. }) => wait = retry_in,
            Err(_) => wait = HOLD_RETRY_MIN,
        }
    }
}

/// Acknowledges, retries later or dead-letters a report after recording it.
async fn settle(ctx: &Context, checked: &Checked, result: Result<Outcome, StorageError>) {
    let (report, message) = (&checked.report, &checked.message);
    let ack = match result {
        Ok(Outcome::Recorded) => AckKind::Ack,
        Ok(Outcome::Forged(why)) => {
            ctx.backends.metrics.report_refused("sender");
            return dead_letter(&ctx.backends.js, message, "report", &why).await;
        }
        Ok(Outcome::Ignored(why)) => {
            tracing::info!(job_id = %report.job_id, attempt = %report.attempt, worker_id = %report.worker_id, why, "report ignored");
            AckKind::Ack
        }
        // PostgreSQL away: the report waits for it however long the outage lasts, backing
        // off; anything else is retried a few times, then dead-lettered.
        Err(e) if !e.is_unavailable() && settle::deliveries(message) >= streams::MAX_DELIVER => {
            ctx.backends.metrics.report_refused("unrecordable");
            let reason = format!("failed to record report: {e}");
            return dead_letter(&ctx.backends.js, message, "report", &reason).await;
        }
        Err(e) => {
            let delay =
                settle::backoff(settle::deliveries(message), REPORT_RETRY, REPORT_RETRY_MAX);
            tracing::warn!(job_id = %report.job_id, error = %e, retry_in = ?delay, "failed to record report, will retry");
            AckKind::Nak(Some(delay))
        }
    };
    if let Err(e) = message.ack_with(ack).await {
        ctx.backends.metrics.nats_error("ack");
        tracing::warn!(job_id = %report.job_id, error = %e, "failed to settle report");
    }
}

/// What a report does to the job it is about.
enum Applied {
    /// The job moved: this event was applied to it.
    Event(JobEvent),
    /// Nothing changed; `release` when the report ends an attempt whose slot may still be held.
    Ignored { why: String, release: bool },
    /// The sender does not hold the attempt.
    Forged(String),
}

/// Applies `report` to `job` in memory. A report counts only from the worker that holds the
/// attempt; a report about an earlier attempt, or one that comes too late (started after
/// finished, a repeat), changes nothing.
fn apply(job: &mut Job, report: &AgentReport, now: DateTime<Utc>) -> Applied {
    let holder = job
        .attempts()
        .iter()
        .find(|a| a.attempt == report.attempt)
        .map(|a| &a.worker_id);
    if holder != Some(&report.worker_id) {
        return Applied::Forged(format!(
            "worker {} reported on attempt {} of job {}, which {}",
            report.worker_id,
            report.attempt,
            report.job_id,
            match holder {
                Some(holder) => format!("worker {holder} holds"),
                None => "was never assigned".to_owned(),
            }
        ));
    }
    let transition = match &report.kind {
        ReportKind::Started { .. } => job.start(report.attempt, now),
        ReportKind::Finished { outcome, tail } => {
            job.finish_with_output(report.attempt, outcome.clone(), tail.clone(), now, jitter())
        }
    };
    match transition {
        Ok(event) => Applied::Event(event),
        Err(DomainError::StaleAttempt { got, current }) => Applied::Ignored {
            why: format!("stale attempt {got}, current is {current}"),
            release: false,
        },
        Err(e) => Applied::Ignored {
            why: e.to_string(),
            release: matches!(report.kind, ReportKind::Finished { .. }),
        },
    }
}

/// Records a batch of reports in one transaction: the jobs are read together, each job's
/// reports are applied in the order they arrived (a `started` and a `finished` that arrive
/// together make one save), and every job, freed slot and message is written with
/// set-based statements. Returns each report's outcome, in order; `Conflict` if a job or a
/// worker moved meanwhile (the caller tries the batch again).
async fn record_batch(ctx: &Context, batch: &[Checked]) -> Result<Vec<Outcome>, StorageError> {
    let pool = &ctx.backends.pool;
    let mut laps = crate::Laps::start();
    let now = Utc::now();
    let mut ids: Vec<JobId> = batch.iter().map(|c| c.report.job_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut jobs = jobs::get_many(pool, &ids).await?;
    let jobs_ms = laps.lap();
    // The jobs that moved, in the order their first report arrived: version read, events.
    let mut moved: Vec<(JobId, u64, Vec<JobEvent>, tracing::Span)> = Vec::new();
    let mut releases = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut counted = Vec::new();
    for checked in batch {
        let report = &checked.report;
        let Some(job) = jobs.get_mut(&report.job_id) else {
            outcomes.push(Outcome::Ignored("unknown job".to_owned()));
            continue;
        };
        let version = job.version();
        let outcome = match apply(job, report, now) {
            Applied::Event(event) => {
                match moved.iter_mut().find(|m| m.0 == report.job_id) {
                    Some(m) => m.2.push(event),
                    None => moved.push((report.job_id, version, vec![event], checked.span.clone())),
                }
                if matches!(report.kind, ReportKind::Finished { .. }) {
                    releases.push((
                        report.worker_id.clone(),
                        AttemptId::new(report.job_id, report.attempt),
                    ));
                }
                counted.push((report, job.created_at(), crate::observe::ended(job)));
                Outcome::Recorded
            }
            Applied::Ignored { why, release } => {
                if release {
                    releases.push((
                        report.worker_id.clone(),
                        AttemptId::new(report.job_id, report.attempt),
                    ));
                }
                Outcome::Ignored(why)
            }
            Applied::Forged(why) => Outcome::Forged(why),
        };
        outcomes.push(outcome);
    }
    // Each transition carries its job as it is after all its reports.
    let changed: Vec<Transition> = moved
        .into_iter()
        .filter_map(|(id, expected_version, events, span)| {
            jobs.remove(&id).map(|job| Transition {
                job,
                expected_version,
                events,
                extra: Vec::new(),
                span,
            })
        })
        .collect();
    if !changed.is_empty() || !releases.is_empty() {
        let apply_ms = laps.lap();
        let mut tx = pool.begin().await?;
        let begin_ms = laps.lap();
        let committed = driver::commit_transitions(&mut tx, &changed, &releases, SOURCE).await?;
        let save_ms = laps.lap();
        tx.commit().await?;
        // Where a batch's time goes (BENCHMARKS.md, "Where a placement round's and a report
        // batch's time goes").
        tracing::debug!(
            reports = batch.len(),
            jobs = changed.len(),
            jobs_ms,
            apply_ms,
            begin_ms,
            save_ms,
            commit_ms = laps.lap(),
            "report batch recorded"
        );
        let freed = ctx.committed(committed);
        if !freed.is_empty() {
            ctx.freed(freed);
        }
    }
    for (report, created_at, ended) in counted {
        crate::observe::recorded(ctx, created_at, report, ended, now);
    }
    for t in &changed {
        let _entered = t.span.enter();
        tracing::info!(job_id = %t.job.id(), events = t.events.len(), state = %t.job.state(), "reports recorded");
    }
    Ok(outcomes)
}

/// Records one report in its own transaction: the path of a report whose batch could not be
/// recorded as a whole.
async fn record(ctx: &Context, report: &AgentReport) -> Result<Outcome, StorageError> {
    let pool = &ctx.backends.pool;
    let now = Utc::now();
    let Some(mut job) = jobs::get(pool, report.job_id).await? else {
        return Ok(Outcome::Ignored("unknown job".to_owned()));
    };
    let version = job.version();
    let event = match apply(&mut job, report, now) {
        Applied::Event(event) => event,
        Applied::Forged(why) => return Ok(Outcome::Forged(why)),
        Applied::Ignored { why, release } => {
            if release {
                release_slot(ctx, report).await?;
            }
            return Ok(Outcome::Ignored(why));
        }
    };
    let release = matches!(report.kind, ReportKind::Finished { .. }).then(|| {
        (
            &report.worker_id,
            AttemptId::new(report.job_id, report.attempt),
        )
    });
    let mut tx = pool.begin().await?;
    driver::commit_transition(&mut tx, &job, version, &event, release, Vec::new(), SOURCE).await?;
    tx.commit().await?;
    ctx.backends.relay_wake.notify_one();
    if release.is_some() {
        ctx.capacity.notify_one();
    }
    crate::observe::recorded(
        ctx,
        job.created_at(),
        report,
        crate::observe::ended(&job),
        now,
    );
    tracing::info!(job_id = %job.id(), attempt = %report.attempt, event = event.kind.name(), state = %job.state(), "report recorded");
    Ok(Outcome::Recorded)
}

/// Frees the slot of a finished attempt whose report changed nothing on the job.
async fn release_slot(ctx: &Context, report: &AgentReport) -> Result<(), StorageError> {
    let mut conn = ctx.backends.pool.acquire().await?;
    if let Some(mut worker) = workers::get(&mut *conn, &report.worker_id).await? {
        let version = worker.version();
        if worker
            .release(&AttemptId::new(report.job_id, report.attempt))
            .is_ok()
        {
            workers::save_reservation(&mut conn, &worker, version).await?;
            ctx.capacity.notify_one();
        }
    }
    Ok(())
}
