//! Agents' reports: `started` moves the job to running, `finished` ends the attempt (success,
//! retry, failure, timeout or cancel) and frees the worker's slot. Reports about any attempt
//! but the job's current one are stale and rejected (the attempt number is the fencing
//! token); redelivered reports find the transition already made and are acknowledged.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use chrono::Utc;
use futures::StreamExt;
use hodei_domain::{AttemptId, DomainError};
use hodei_messaging::settle::{self, dead_letter};
use hodei_messaging::{AgentReport, ReportKind, streams, subjects, trace};
use hodei_storage::{StorageError, driver, jobs, workers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Context, SERVICE, SOURCE, SchedulerError, jitter};

/// First delay before a report that could not be recorded is delivered again.
const REPORT_RETRY: Duration = Duration::from_millis(250);
/// Longest delay between two deliveries of a report that could not be recorded.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Consumes reports until `shutdown`.
pub(crate) async fn run(
    ctx: Context,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| SchedulerError::Consume {
            what: "reports",
            reason: e.to_string(),
        })?;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = messages.next() => message,
        };
        let Some(message) = message else {
            return Ok(());
        };
        match message {
            Ok(message) => {
                let span = trace::process_span(
                    SERVICE,
                    &message.subject,
                    streams::REPORTER,
                    message.headers.as_ref(),
                );
                handle(&ctx, &message).instrument(span).await
            }
            Err(e) => {
                ctx.backends.metrics.nats_error("consume");
                tracing::warn!(error = %e, "failed to receive a report")
            }
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

async fn handle(ctx: &Context, message: &Message) {
    let report = match hodei_messaging::decode::<AgentReport>(&message.subject, &message.payload) {
        Ok(r) => r,
        Err(e) => {
            ctx.backends.metrics.report_refused("malformed");
            return dead_letter(&ctx.backends.js, message, "report", &e.to_string()).await;
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
        return dead_letter(&ctx.backends.js, message, "report", &reason).await;
    }
    let result = ctx
        .backends
        .db_until_no_conflict(|| record(ctx, &report))
        .await;
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

async fn record(ctx: &Context, report: &AgentReport) -> Result<Outcome, StorageError> {
    let pool = &ctx.backends.pool;
    let now = Utc::now();
    let Some(mut job) = jobs::get(pool, report.job_id).await? else {
        return Ok(Outcome::Ignored("unknown job".to_owned()));
    };
    // A report counts only from the worker that holds the attempt.
    let holder = job
        .attempts()
        .iter()
        .find(|a| a.attempt == report.attempt)
        .map(|a| &a.worker_id);
    if holder != Some(&report.worker_id) {
        return Ok(Outcome::Forged(format!(
            "worker {} reported on attempt {} of job {}, which {}",
            report.worker_id,
            report.attempt,
            report.job_id,
            match holder {
                Some(holder) => format!("worker {holder} holds"),
                None => "was never assigned".to_owned(),
            }
        )));
    }
    let version = job.version();
    let transition = match &report.kind {
        ReportKind::Started { .. } => job.start(report.attempt, now),
        ReportKind::Finished { outcome, tail } => {
            job.finish_with_output(report.attempt, outcome.clone(), tail.clone(), now, jitter())
        }
    };
    let event = match transition {
        Ok(e) => e,
        Err(DomainError::StaleAttempt { got, current }) => {
            return Ok(Outcome::Ignored(format!(
                "stale attempt {got}, current is {current}"
            )));
        }
        Err(e) => {
            // Late or repeated report (e.g. started after finished): the job moved on.
            if matches!(report.kind, ReportKind::Finished { .. }) {
                release_slot(ctx, report).await?;
            }
            return Ok(Outcome::Ignored(e.to_string()));
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
    crate::observe::recorded(ctx, &job, report, now);
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
        }
    }
    Ok(())
}
