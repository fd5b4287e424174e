//! The reconciler: PostgreSQL is the truth and NATS the transport, so a job whose next step
//! is overdue is found here and re-driven. A queued job whose placement request was lost is
//! asked for again; an assignment never started is handed back; a running job far past its
//! own timeout (its worker silent) is ended as timed out and its worker told to kill it. A
//! lost message delays a job; it never loses it. A worker's silence counts only while the
//! reconciler could have heard it ([`Watching`]), and never over a report still waiting to be
//! recorded.

use std::time::Duration;

use chrono::Utc;
use hodei_domain::{AttemptId, AttemptOutcome, JobState};
use hodei_messaging::{AgentCommand, Outgoing, PlaceJob, streams, subjects, trace};
use hodei_runtime::{NatsBreak, NatsContinuity};
use hodei_storage::{driver, jobs};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Context, SERVICE, SOURCE};

/// Every `overdue / 3`, re-requests placement of jobs queued for longer than `overdue` that
/// have no request waiting in the work queue.
pub(crate) async fn run(ctx: Context, overdue: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval((overdue / 3).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watching = Watching::start(&ctx.backends.nats);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        watching.look_at_nats(&ctx.backends.nats);
        if let Err(e) = sweep(&ctx, overdue).await {
            watching.restart("postgres");
            tracing::warn!(error = %e, "reconciler sweep failed");
        }
        if let Err(e) = sweep_workers(&ctx, &watching).await {
            watching.restart("postgres");
            tracing::warn!(error = %e, "reconciler sweep of jobs on workers failed");
        }
        if let Err(e) = sweep_dead_letters(&ctx).await {
            tracing::warn!(error = %e, "reconciler sweep of dead letters failed");
        }
    }
}

async fn sweep(
    ctx: &Context,
    overdue: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cutoff = Utc::now() - chrono::Duration::from_std(overdue)?;
    let pool = &ctx.backends.pool;
    let stuck = ctx
        .backends
        .db(|| jobs::overdue_queued(pool, cutoff, 500))
        .await?;
    if stuck.is_empty() {
        return Ok(());
    }
    let stream = ctx.backends.js.get_stream(streams::WORK).await?;
    let ids: Vec<_> = stuck.iter().map(|j| j.id()).collect();
    let traces = ctx.backends.db(|| jobs::trace_contexts(pool, &ids)).await?;
    for job in stuck {
        let subject = subjects::place_job(&job.id());
        if stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .is_ok()
        {
            continue;
        }
        let item = PlaceJob {
            job_id: job.id(),
            attempt: job.current_attempt(),
            priority: job.spec().priority,
            not_before: job.not_before(),
        };
        // The job's own trace goes on: this step is part of it.
        let step =
            tracing::info_span!("re-drive queued job", hodei.service = SERVICE, job_id = %job.id());
        trace::set_parent(&step, traces.get(&job.id()).unwrap_or(&Default::default()));
        async {
            let message = Outgoing::place_job(&item)?;
            let id = message.id.to_string();
            let send = trace::send_span(SERVICE, &message.subject, &id);
            let headers = trace::nats_headers(&send, &id);
            ctx.backends
                .js
                .publish_with_headers(message.subject, headers, message.payload.into())
                .instrument(send)
                .await?
                .await?;
            tracing::info!(job_id = %job.id(), "overdue job re-driven");
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }
        .instrument(step)
        .await?;
    }
    Ok(())
}

/// Handles what the relay could not publish at all: an assignment that can never reach its
/// worker fails its job, with the reason (sending it again cannot succeed, so no retry is
/// spent); a lost event needs nothing (the state of record has it). Each dead letter is
/// marked handled in the same transaction.
async fn sweep_dead_letters(ctx: &Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let pool = &ctx.backends.pool;
    let dead = ctx
        .backends
        .db(|| hodei_storage::outbox::dead_unhandled(pool, 100))
        .await?;
    for letter in dead {
        let ended = ctx.backends.db(|| end_undeliverable(pool, &letter)).await?;
        match ended {
            Some((job_id, worker, reason)) => {
                ctx.backends.metrics.job_finished(JobState::Failed.as_str());
                ctx.backends.relay_wake.notify_one();
                tracing::warn!(job_id = %job_id, worker_id = %worker, reason, "job failed: its assignment could not be delivered");
            }
            None => {
                tracing::warn!(subject = %letter.subject, reason = %letter.reason, "dead letter needs nothing more: the state of record has it");
            }
        }
    }
    Ok(())
}

/// In one transaction: fails the job whose assignment `letter` carried (if it still waits
/// for that assignment) and marks the letter handled. Returns the job failed, its worker and
/// the reason.
async fn end_undeliverable(
    pool: &sqlx::PgPool,
    letter: &hodei_storage::outbox::DeadLetter,
) -> Result<
    Option<(hodei_domain::JobId, hodei_domain::WorkerId, String)>,
    hodei_storage::StorageError,
> {
    let command = hodei_messaging::decode::<AgentCommand>(&letter.subject, &letter.payload);
    let mut tx = pool.begin().await?;
    let mut ended = None;
    if let Ok(AgentCommand::Assign {
        job_id, attempt, ..
    }) = command
        && let Some(mut job) = jobs::get(&mut *tx, job_id).await?
    {
        let version = job.version();
        let worker = job.current_attempt_record().map(|a| a.worker_id.clone());
        let reason = format!(
            "its assignment could not be delivered to its worker: {}",
            letter.reason
        );
        if let (Ok(event), Some(worker)) =
            (job.fail_undeliverable(attempt, &reason, Utc::now()), worker)
        {
            let release = Some((&worker, AttemptId::new(job_id, attempt)));
            driver::commit_transition(&mut tx, &job, version, &event, release, Vec::new(), SOURCE)
                .await?;
            ended = Some((job_id, worker, reason));
        }
    }
    hodei_storage::outbox::mark_dead_handled(&mut tx, letter.id).await?;
    tx.commit().await?;
    Ok(ended)
}

/// How long after NATS comes back (or this scheduler starts) the workers may still be on
/// their way back: a NATS client waits up to 4 s between two reconnection attempts, and an
/// agent publishes the reports it kept only once it is connected.
const RECONNECT_ALLOWANCE: Duration = Duration::from_secs(5);

/// Since when the reconciler could have seen every report: its own start or NATS' last
/// (re)connection, each with the time the workers may take to reconnect, or the last sweep
/// that could not reach PostgreSQL. A worker's silence counts only while the reconciler
/// watched: an outage of the observer (this scheduler down, NATS or PostgreSQL away while the
/// agents' reports waited) is never evidence against a worker.
struct Watching {
    /// Silence counts from this instant (which may be ahead).
    from: tokio::time::Instant,
    nats: NatsContinuity,
}

impl Watching {
    fn start(nats: &async_nats::Client) -> Self {
        Self {
            from: tokio::time::Instant::now() + RECONNECT_ALLOWANCE,
            nats: NatsContinuity::start(nats),
        }
    }

    /// Restarts the clock when NATS is not connected now or reconnected since the last look.
    fn look_at_nats(&mut self, nats: &async_nats::Client) {
        let cause = match self.nats.look(nats) {
            Some(NatsBreak::Reconnected) => "nats reconnected",
            Some(NatsBreak::Disconnected) => "nats disconnected",
            None => return,
        };
        self.restart_after(cause, RECONNECT_ALLOWANCE);
    }

    fn restart(&mut self, cause: &'static str) {
        self.restart_after(cause, Duration::ZERO);
    }

    /// Silence counts again `after` from now (never earlier than it already would).
    fn restart_after(&mut self, cause: &'static str, after: Duration) {
        self.from = self.from.max(tokio::time::Instant::now() + after);
        tracing::debug!(
            cause,
            after_ms = after.as_millis(),
            "reconciler's watch restarted: silence counts from then"
        );
    }

    /// How long the reconciler has watched without a break.
    fn watched_for(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.from)
    }
}

/// Ends attempts whose next step is overdue: never started (handed back as lost, without
/// spending the job's retries) or running far past the job's timeout (timed out). The worker
/// is told to kill the attempt in case it still runs it. An attempt is judged only once the
/// reconciler has watched for the whole of the window it is judged by (`watching`), and never
/// while a report about it waits in the reports stream to be recorded.
async fn sweep_workers(
    ctx: &Context,
    watching: &Watching,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let start_within = Duration::from_millis(ctx.config.start_timeout_ms);
    let fetching_within = Duration::from_millis(ctx.config.start_timeout_artifacts_ms);
    let grace = Duration::from_millis(ctx.config.timeout_grace_ms);
    let watched = watching.watched_for();
    if watched < start_within.min(fetching_within).min(grace) {
        return Ok(());
    }
    let pool = &ctx.backends.pool;
    let overdue = ctx
        .backends
        .db(|| jobs::overdue_on_workers(pool, start_within, fetching_within, grace, 500))
        .await?;
    let ids: Vec<_> = overdue.iter().map(|j| j.id()).collect();
    let traces = ctx.backends.db(|| jobs::trace_contexts(pool, &ids)).await?;
    for mut job in overdue {
        let Some(record) = job.current_attempt_record().cloned() else {
            continue;
        };
        let fetches = job
            .spec()
            .artifacts
            .as_ref()
            .is_some_and(|plan| !plan.consume.is_empty());
        let window = match job.state() {
            JobState::Assigned if fetches => fetching_within,
            JobState::Assigned => start_within,
            _ => grace,
        };
        if watched < window
            || ctx
                .backends
                .report_pending(&record.worker_id, &job.id())
                .await
        {
            continue;
        }
        // The job's own trace goes on: ending the attempt is part of it.
        let step =
            tracing::info_span!("end overdue attempt", hodei.service = SERVICE, job_id = %job.id());
        trace::set_parent(&step, traces.get(&job.id()).unwrap_or(&Default::default()));
        let version = job.version();
        let (outcome, why) = if job.state() == JobState::Assigned {
            let reason = format!("not started on {} within {window:?}", record.worker_id);
            (
                AttemptOutcome::Lost {
                    reason: reason.clone(),
                },
                reason,
            )
        } else {
            (
                AttemptOutcome::TimedOut,
                "timed out with no report from its worker".to_owned(),
            )
        };
        let Ok(event) = job.finish(record.attempt, outcome, Utc::now(), crate::jitter()) else {
            continue;
        };
        let kill = step.in_scope(|| {
            Outgoing::agent_command(
                &record.worker_id,
                &AgentCommand::Cancel {
                    job_id: job.id(),
                    attempt: record.attempt,
                    reason: why.clone(),
                },
            )
        })?;
        let attempt = AttemptId::new(job.id(), record.attempt);
        let committed = ctx
            .backends
            .db(|| async {
                let mut tx = pool.begin().await?;
                driver::commit_transition(
                    &mut tx,
                    &job,
                    version,
                    &event,
                    Some((&record.worker_id, attempt)),
                    vec![kill],
                    SOURCE,
                )
                .instrument(step.clone())
                .await?;
                tx.commit().await?;
                Ok(())
            })
            .await;
        match committed {
            Ok(()) => {
                ctx.backends.relay_wake.notify_one();
                if job.state().is_terminal() {
                    ctx.backends.metrics.job_finished(job.state().as_str());
                }
                tracing::warn!(parent: &step, job_id = %job.id(), attempt = %record.attempt, worker_id = %record.worker_id, why, "overdue attempt ended");
            }
            // A report arrived meanwhile: it decided.
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
