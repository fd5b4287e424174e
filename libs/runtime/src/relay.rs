//! The outbox relay: publishes the messages committed to the outbox to JetStream with
//! `Nats-Msg-Id` set to their id (so a message published twice after a crash is stored once),
//! then deletes them. Several relays may run at once: each claims rows with
//! `FOR UPDATE SKIP LOCKED`.
//!
//! Each message is published inside a `send <subject>` span that is a child of the trace
//! context stored with its row, and carries the send span's context in its
//! `traceparent`/`tracestate` headers.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::future::join_all;
use hodei_messaging::trace;
use hodei_resilience::{RetryPolicy, random_unit};
use hodei_storage::{StorageError, outbox};
use hodei_telemetry::Metrics;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a relay batch failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("failed to publish {subject}: {reason}")]
    Publish { subject: String, reason: String },
}

impl From<sqlx::Error> for RelayError {
    fn from(e: sqlx::Error) -> Self {
        RelayError::Storage(StorageError::Database(e))
    }
}

/// What one relay batch did.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Messages JetStream acknowledged, deleted from the outbox.
    pub published: usize,
    /// Messages the transport refused for good, moved to `outbox_dead` with their reason.
    pub dead_lettered: usize,
    /// The failure that stopped the batch before its end (NATS away, an ack timed out): the
    /// rows from there on stay in the outbox and are published again later.
    pub stopped: Option<RelayError>,
}

/// A row on its way: published, its ack still to come.
struct Sent {
    position: i64,
    subject: String,
    ack: jetstream::context::PublishAckFuture,
}

/// Whether JetStream refused a message for good: it is larger than the server's
/// `max_payload` or than its stream allows. Publishing it again cannot succeed.
fn refused_for_good(e: &jetstream::context::PublishError) -> bool {
    use jetstream::context::PublishErrorKind;
    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|js| js.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// Publishes up to `limit` committed messages in order and deletes those JetStream
/// acknowledged. A message the transport refuses for good is moved to `outbox_dead` with its
/// reason and the batch goes on: one poison row never holds up the rows behind it. Any other
/// failure stops the batch there; what was not acknowledged stays and is published again later
/// (and de-duplicated by the server). `service` names the relaying service on its spans.
pub async fn relay_batch(
    pool: &PgPool,
    js: &jetstream::Context,
    limit: i64,
    service: &str,
) -> Result<Relayed, RelayError> {
    let mut tx = pool.begin().await?;
    let rows = outbox::claim(&mut tx, limit).await?;
    let mut relayed = Relayed::default();
    if rows.is_empty() {
        return Ok(relayed);
    }
    let mut sent = Vec::with_capacity(rows.len());
    let mut dead: Vec<(i64, String)> = Vec::new();
    for row in rows {
        let id = row.id.to_string();
        let span = trace::send_span(service, &row.subject, &id);
        trace::set_parent(&span, &row.trace);
        let mut headers = trace::nats_headers(&span, &id);
        if headers
            .get(hodei_messaging::subjects::HEADER_TRACEPARENT)
            .is_none()
        {
            // This process does not trace: pass the stored context on unchanged.
            trace::to_nats(&row.trace, &mut headers);
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(row.payload.into())
            .headers(headers);
        match js
            .send_publish(row.subject.clone(), publish)
            .instrument(span)
            .await
        {
            Ok(ack) => sent.push(Sent {
                position: row.position,
                subject: row.subject,
                ack,
            }),
            Err(e) if refused_for_good(&e) => dead.push((row.position, e.to_string())),
            Err(e) => {
                relayed.stopped = Some(RelayError::Publish {
                    subject: row.subject,
                    reason: e.to_string(),
                });
                break;
            }
        }
    }
    let subjects_and_positions: Vec<(i64, String)> = sent
        .iter()
        .map(|s| (s.position, s.subject.clone()))
        .collect();
    let acks = join_all(sent.into_iter().map(|s| s.ack.into_future())).await;
    let mut published = Vec::with_capacity(acks.len());
    for ((position, subject), ack) in subjects_and_positions.into_iter().zip(acks) {
        match ack {
            Ok(_) => published.push(position),
            Err(e) if refused_for_good(&e) => dead.push((position, e.to_string())),
            Err(e) => {
                if relayed.stopped.is_none() {
                    relayed.stopped = Some(RelayError::Publish {
                        subject,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    let moved = outbox::move_to_dead(&mut tx, dead).await?;
    relayed.dead_lettered = usize::try_from(moved).unwrap_or(usize::MAX);
    outbox::delete(&mut tx, &published).await?;
    tx.commit().await?;
    relayed.published = published.len();
    Ok(relayed)
}

/// Runs the relay until `shutdown`: relays whenever `wake` is notified (after a local commit)
/// and at least every `poll` (for rows committed by other processes). Failures (NATS or
/// PostgreSQL down) back off exponentially with jitter, up to 5 s, and never lose a row.
/// Published messages and failures are counted in `metrics`.
pub async fn run_relay(
    pool: PgPool,
    js: jetstream::Context,
    wake: Arc<Notify>,
    poll: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let service = metrics.service().to_owned();
    let backoff = RetryPolicy {
        max_attempts: u32::MAX,
        initial: Duration::from_millis(100),
        max_delay: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(30),
    };
    let mut failures = 0u32;
    loop {
        let relayed = tokio::time::timeout(
            backoff.attempt_timeout,
            relay_batch(&pool, &js, 512, &service),
        )
        .await;
        // A batch stopped midway counts as a failure, after what it did is counted.
        let relayed = relayed.map(|result| {
            result.and_then(|done| {
                metrics.outbox_published.inc_by(done.published as u64);
                if done.dead_lettered > 0 {
                    metrics
                        .outbox_dead_lettered
                        .inc_by(done.dead_lettered as u64);
                    tracing::warn!(
                        count = done.dead_lettered,
                        "outbox messages refused for good by nats, moved to outbox_dead"
                    );
                }
                match done.stopped {
                    Some(e) => Err(e),
                    None => Ok(done.published + done.dead_lettered),
                }
            })
        });
        match &relayed {
            Ok(Err(RelayError::Publish { .. })) => metrics.nats_error("publish"),
            Ok(Err(RelayError::Storage(_))) => {
                metrics.postgres_errors.inc();
            }
            _ => {}
        }
        match relayed {
            Ok(Ok(n)) if n > 0 => {
                failures = 0;
                tracing::debug!(count = n, "outbox relayed");
                continue;
            }
            Ok(Ok(_)) => {
                failures = 0;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            result => {
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures, random_unit());
                match result {
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, failures, retry_in_ms = delay.as_millis() as u64, "outbox relay failed")
                    }
                    _ => tracing::warn!(
                        failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "outbox relay timed out"
                    ),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
