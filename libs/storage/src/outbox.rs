//! The transactional outbox: messages are inserted in the transaction that commits the state
//! change they announce, and a relay publishes them to JetStream with `Nats-Msg-Id` set to
//! their id (so a message published twice after a crash is stored once), then deletes them.
//! Several relays may run at once: each claims rows with `FOR UPDATE SKIP LOCKED`.
//!
//! Each row keeps the trace context of the span that queued it; the relay publishes it inside
//! a `send <subject>` span that is a child of that context, and puts the send span's context
//! in the message's `traceparent`/`tracestate` headers.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::future::try_join_all;
use hodei_messaging::{Outgoing, TraceHeaders, trace};
use hodei_resilience::{RetryPolicy, random_unit};
use hodei_telemetry::Metrics;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{StorageError, encode};

/// Appends messages to the outbox inside the caller's transaction.
pub async fn append(conn: &mut PgConnection, messages: &[Outgoing]) -> Result<(), StorageError> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let headers = messages
        .iter()
        .map(|m| encode("outbox headers", &m.headers))
        .collect::<Result<Vec<_>, _>>()?;
    sqlx::query(
        "INSERT INTO outbox (id, subject, payload, headers)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::jsonb[])",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&payloads)
    .bind(&headers)
    .execute(conn)
    .await?;
    Ok(())
}

/// Number of messages waiting to be relayed.
pub async fn pending(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

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

/// Publishes up to `limit` committed messages and deletes them once JetStream acknowledged
/// every one. Returns how many were relayed. On any failure nothing is deleted, so the batch
/// is published again later (and de-duplicated by the server). `service` names the relaying
/// service on its spans.
pub async fn relay_batch(
    pool: &PgPool,
    js: &jetstream::Context,
    limit: i64,
    service: &str,
) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT position, id, subject, payload, headers FROM outbox
         ORDER BY position LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut positions = Vec::with_capacity(rows.len());
    let mut acks = Vec::with_capacity(rows.len());
    for row in &rows {
        let position: i64 = row.try_get("position")?;
        let id: Uuid = row.try_get("id")?;
        let subject: String = row.try_get("subject")?;
        let payload: Vec<u8> = row.try_get("payload")?;
        // A row whose headers do not decode is still published, without its trace context.
        let stored: TraceHeaders = row
            .try_get::<sqlx::types::Json<TraceHeaders>, _>("headers")
            .map(|json| json.0)
            .unwrap_or_default();
        let id = id.to_string();
        let span = trace::send_span(service, &subject, &id);
        trace::set_parent(&span, &stored);
        let mut headers = trace::nats_headers(&span, &id);
        if headers
            .get(hodei_messaging::subjects::HEADER_TRACEPARENT)
            .is_none()
        {
            // This process does not trace: pass the stored context on unchanged.
            trace::to_nats(&stored, &mut headers);
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .headers(headers);
        let ack = js
            .send_publish(subject.clone(), publish)
            .instrument(span)
            .await
            .map_err(|e| RelayError::Publish {
                subject: subject.clone(),
                reason: e.to_string(),
            })?;
        positions.push(position);
        acks.push(async move {
            ack.await.map_err(|e| RelayError::Publish {
                subject,
                reason: e.to_string(),
            })
        });
    }
    try_join_all(acks).await?;
    sqlx::query("DELETE FROM outbox WHERE position = ANY($1)")
        .bind(&positions)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(positions.len())
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
        match &relayed {
            Ok(Ok(n)) => {
                metrics.outbox_published.inc_by(*n as u64);
            }
            Ok(Err(RelayError::Publish { .. })) => metrics.nats_error("publish"),
            Ok(Err(RelayError::Storage(_))) => {
                metrics.postgres_errors.inc();
            }
            Err(_) => {}
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
