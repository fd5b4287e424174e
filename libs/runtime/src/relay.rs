//! The outbox relay: publishes the messages committed to the outbox to JetStream with
//! `Nats-Msg-Id` set to their id (so a message published twice after a crash is stored once),
//! then deletes them.
//!
//! It has two paths. The direct one: the process that committed messages hands them over
//! ([`Handoff::hand_over`]) and they are published from memory at once, their acks awaited
//! and their rows deleted in bulk behind them, without reading them back. The claiming one
//! reads what is left: rows another process committed and did not publish (it crashed, or
//! NATS was away), rows whose direct publication failed, and the rows of the writes that
//! only wake the relay. It claims them with `FOR UPDATE SKIP LOCKED`, so several relays may
//! run at once, and leaves alone the rows its own process is publishing now; when it looks
//! on its periodic poll rather than after a wake-up, it takes only rows older than
//! [`HANDOFF_GRACE`], which other processes are done publishing themselves.
//!
//! A message that must not be delivered twice (an agent's assignment) is published only
//! while the stream's duplicate window still covers its first copy: a claimed row of that
//! kind older than [`streams::AT_MOST_ONCE_WITHIN`] is deleted unpublished, and a handed-over
//! one that waited in memory longer than [`HANDOFF_GRACE`] goes back to the claiming path.
//!
//! Each message is published inside a `send <subject>` span that is a child of the trace
//! context stored with its row, and carries the send span's context in its
//! `traceparent`/`tracestate` headers.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::join_all;
use hodei_messaging::{Outgoing, TraceHeaders, streams, trace};
use hodei_resilience::{RetryPolicy, random_unit};
use hodei_storage::{StorageError, outbox};
use hodei_telemetry::Metrics;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How old a row must be before the periodic poll claims it: rows younger than this are
/// being published by the process that committed them.
pub const HANDOFF_GRACE: Duration = Duration::from_secs(1);
/// Most messages one batch of either path publishes.
const BATCH: usize = 512;
/// Committed messages that may wait for the direct path (a few MiB); past this, a commit only
/// wakes the claiming path, so a stalled NATS connection never holds more than this in memory.
const HANDOFF_QUEUE: usize = 8192;
/// Published messages whose acks may wait to be settled; past this, the direct path waits.
const SETTLE_QUEUE: usize = 4096;

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
    /// Messages that must not be delivered twice, found older than the time they may be
    /// published in (a relay's delete after their publication was lost, or NATS was away):
    /// deleted unpublished, as JetStream may no longer drop a second copy.
    pub expired: usize,
    /// The failure that stopped the batch before its end (NATS away, an ack timed out): the
    /// rows from there on stay in the outbox and are published again later.
    pub stopped: Option<RelayError>,
}

/// A claimed row on its way: published, its ack still to come.
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

/// Publishes one message with `Nats-Msg-Id` = `id`, inside a `send <subject>` span that is a
/// child of the trace context `stored` with it; returns the future of its ack.
async fn send(
    js: &jetstream::Context,
    service: &str,
    id: Uuid,
    subject: String,
    payload: Vec<u8>,
    stored: &TraceHeaders,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    let id = id.to_string();
    let span = trace::send_span(service, &subject, &id);
    trace::set_parent(&span, stored);
    let mut headers = trace::nats_headers(&span, &id);
    if headers
        .get(hodei_messaging::subjects::HEADER_TRACEPARENT)
        .is_none()
    {
        // This process does not trace: pass the stored context on unchanged.
        trace::to_nats(stored, &mut headers);
    }
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .headers(headers);
    js.send_publish(subject, publish).instrument(span).await
}

/// Publishes up to `limit` committed messages in order and deletes those JetStream
/// acknowledged; see [`relay_claimed`].
pub async fn relay_batch(
    pool: &PgPool,
    js: &jetstream::Context,
    limit: i64,
    service: &str,
) -> Result<Relayed, RelayError> {
    let which = outbox::Claim {
        limit,
        older_than: None,
        direct_older_than: HANDOFF_GRACE,
        except: &[],
        at_most_once_within: streams::AT_MOST_ONCE_WITHIN,
    };
    relay_claimed(pool, js, which, service).await
}

/// Claims the committed messages `which` names, publishes them in order and deletes those
/// JetStream acknowledged. A message the transport refuses for good is moved to
/// `outbox_dead` with its reason and the batch goes on: one poison row never holds up the
/// rows behind it. A row that must not be delivered twice, claimed past the time it may be
/// published in ([`outbox::Pending::expired`]), is deleted unpublished. Any other failure
/// stops the batch there; what was not acknowledged stays and is published again later (and
/// de-duplicated by the server). `service` names the relaying service on its spans.
pub async fn relay_claimed(
    pool: &PgPool,
    js: &jetstream::Context,
    which: outbox::Claim<'_>,
    service: &str,
) -> Result<Relayed, RelayError> {
    let mut tx = pool.begin().await?;
    let rows = outbox::claim(&mut tx, which).await?;
    let mut relayed = Relayed::default();
    if rows.is_empty() {
        return Ok(relayed);
    }
    let mut sent = Vec::with_capacity(rows.len());
    let mut dead: Vec<(i64, String)> = Vec::new();
    let mut expired = Vec::new();
    for row in rows {
        if row.expired {
            tracing::warn!(id = %row.id, subject = %row.subject, "outbox message that must not be delivered twice is too old to publish, deleted unpublished");
            expired.push(row.position);
            continue;
        }
        match send(
            js,
            service,
            row.id,
            row.subject.clone(),
            row.payload,
            &row.trace,
        )
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
    relayed.published = published.len();
    relayed.expired = expired.len();
    // Both deleted in one statement.
    published.extend(expired);
    outbox::delete(&mut tx, &published).await?;
    tx.commit().await?;
    Ok(relayed)
}

/// Ids of the messages the direct path is publishing now, which this process's claims leave
/// alone.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<HashSet<Uuid>>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.lock().extend(ids);
    }

    fn remove(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut held = self.lock();
        for id in ids {
            held.remove(&id);
        }
    }

    fn snapshot(&self) -> Vec<Uuid> {
        self.lock().iter().copied().collect()
    }
}

/// Where a process hands the messages it has just committed to its relay, to be published
/// at once from memory. Cloned freely.
#[derive(Clone)]
pub struct Handoff {
    queue: mpsc::UnboundedSender<(Instant, Vec<Outgoing>)>,
    /// Messages in `queue`, bounded by [`HANDOFF_QUEUE`].
    queued: Arc<AtomicUsize>,
    in_flight: InFlight,
    wake: Arc<Notify>,
}

/// The relay's end of a [`Handoff`], taken by [`run_relay`].
pub struct HandedOver {
    queue: mpsc::UnboundedReceiver<(Instant, Vec<Outgoing>)>,
    queued: Arc<AtomicUsize>,
    in_flight: InFlight,
    wake: Arc<Notify>,
}

/// A handoff and the relay's end of it; `wake` is what the writes that do not hand their
/// messages over notify.
pub fn handoff(wake: Arc<Notify>) -> (Handoff, HandedOver) {
    let (queue, received) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let in_flight = InFlight::default();
    (
        Handoff {
            queue,
            queued: queued.clone(),
            in_flight: in_flight.clone(),
            wake: wake.clone(),
        },
        HandedOver {
            queue: received,
            queued,
            in_flight,
            wake,
        },
    )
}

impl Handoff {
    /// Hands over `messages`, committed to the outbox by this process, to be published now.
    /// Call it only after the commit. When the relay is behind (or not running), their rows
    /// are left to the claiming path, which is woken.
    pub fn hand_over(&self, messages: Vec<Outgoing>) {
        let n = messages.len();
        if n == 0 {
            return;
        }
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > HANDOFF_QUEUE {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.wake.notify_one();
            return;
        }
        self.in_flight.add(messages.iter().map(|m| m.id));
        if let Err(closed) = self.queue.send((Instant::now(), messages)) {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.in_flight.remove(closed.0.1.iter().map(|m| m.id));
            self.wake.notify_one();
        }
    }
}

/// A handed-over message on its way: published, its ack still to come.
struct InTransit {
    id: Uuid,
    ack: jetstream::context::PublishAckFuture,
}

/// The direct path's publishing half: publishes handed-over messages in the order they were
/// handed over, as soon as they are, and passes their acks on to [`settle`]. A message that
/// cannot be published goes back to the claiming path, with the rest of its batch.
async fn publish_handed(
    js: jetstream::Context,
    handed: HandedOver,
    settling: mpsc::Sender<InTransit>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let HandedOver {
        queue: mut handed,
        queued,
        in_flight,
        wake,
    } = handed;
    let service = metrics.service().to_owned();
    loop {
        let (at, first) = tokio::select! {
            () = shutdown.cancelled() => return,
            received = handed.recv() => match received {
                Some(batch) => batch,
                None => return,
            },
        };
        let mut batch: Vec<(Instant, Outgoing)> = first.into_iter().map(|m| (at, m)).collect();
        while batch.len() < BATCH {
            match handed.try_recv() {
                Ok((at, more)) => batch.extend(more.into_iter().map(|m| (at, m))),
                Err(_) => break,
            }
        }
        queued.fetch_sub(batch.len(), Ordering::Relaxed);
        let mut messages = batch.into_iter();
        let mut returned = Vec::new();
        for (at, message) in messages.by_ref() {
            let id = message.id;
            if message.at_most_once && at.elapsed() > HANDOFF_GRACE {
                // Any relay may have claimed and published its row by now; the claiming
                // path publishes it once, or deletes it when too old.
                returned.push(id);
                continue;
            }
            match send(
                &js,
                &service,
                id,
                message.subject,
                message.payload,
                &message.headers,
            )
            .await
            {
                Ok(ack) => {
                    if settling.send(InTransit { id, ack }).await.is_err() {
                        returned.push(id);
                        break;
                    }
                }
                Err(e) => {
                    metrics.nats_error("publish");
                    tracing::warn!(error = %e, "handed-over outbox message not published, left to the claiming relay");
                    returned.push(id);
                    break;
                }
            }
        }
        returned.extend(messages.map(|(_, m)| m.id));
        if !returned.is_empty() {
            in_flight.remove(returned);
            wake.notify_one();
        }
    }
}

/// The direct path's settling half: awaits the acks of what [`publish_handed`] sent, in
/// batches of whatever has arrived, and deletes the acknowledged rows with one statement per
/// batch. A message whose ack fails, or whose row cannot be deleted, goes back to the
/// claiming path (which publishes it again; the server keeps one copy).
async fn settle(
    pool: PgPool,
    mut settling: mpsc::Receiver<InTransit>,
    in_flight: InFlight,
    wake: Arc<Notify>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            received = settling.recv() => match received {
                Some(first) => first,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match settling.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let ids: Vec<Uuid> = batch.iter().map(|t| t.id).collect();
        let acks = join_all(batch.into_iter().map(|t| t.ack.into_future())).await;
        let mut acked = Vec::with_capacity(ids.len());
        let mut failed = false;
        for (&id, ack) in ids.iter().zip(acks) {
            match ack {
                Ok(_) => acked.push(id),
                Err(e) => {
                    if !failed {
                        metrics.nats_error("publish");
                        tracing::warn!(error = %e, "handed-over outbox message not acknowledged, left to the claiming relay");
                    }
                    failed = true;
                }
            }
        }
        match outbox::delete_ids(&pool, &acked).await {
            Ok(_) => {
                metrics.outbox_published.inc_by(acked.len() as u64);
            }
            Err(e) => {
                metrics.postgres_errors.inc();
                tracing::warn!(error = %e, count = acked.len(), "published outbox messages not deleted, left to the claiming relay");
                failed = true;
            }
        }
        // Settled either way: deleted, or back to the claiming path for whatever is left.
        in_flight.remove(ids);
        if failed {
            wake.notify_one();
        }
    }
}

/// Runs the relay until `shutdown`: the direct path for what `handed` receives, and the
/// claiming path whenever its wake-up is notified and at least every `poll` (then for rows
/// older than [`HANDOFF_GRACE`] only). Failures (NATS or PostgreSQL down) back off
/// exponentially with jitter, up to 5 s, and never lose a row (but an assignment past the
/// time it may be published in, deleted unpublished on purpose: see the module). Published
/// messages and failures are counted in `metrics`.
pub async fn run_relay(
    pool: PgPool,
    js: jetstream::Context,
    handed: HandedOver,
    poll: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let in_flight = handed.in_flight.clone();
    let wake = handed.wake.clone();
    let (settling, to_settle) = mpsc::channel(SETTLE_QUEUE);
    let publishing = tokio::spawn(publish_handed(
        js.clone(),
        handed,
        settling,
        metrics.clone(),
        shutdown.clone(),
    ));
    let settling = tokio::spawn(settle(
        pool.clone(),
        to_settle,
        in_flight.clone(),
        wake.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    claim_loop(pool, js, in_flight, wake, poll, metrics, shutdown).await;
    let _ = publishing.await;
    let _ = settling.await;
}

/// The claiming path of [`run_relay`].
async fn claim_loop(
    pool: PgPool,
    js: jetstream::Context,
    in_flight: InFlight,
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
    // The first look takes every row: what an earlier run of this process left.
    let mut older_than = None;
    loop {
        let except = in_flight.snapshot();
        let which = outbox::Claim {
            limit: BATCH as i64,
            older_than,
            direct_older_than: HANDOFF_GRACE,
            except: &except,
            at_most_once_within: streams::AT_MOST_ONCE_WITHIN,
        };
        let relayed = tokio::time::timeout(
            backoff.attempt_timeout,
            relay_claimed(&pool, &js, which, &service),
        )
        .await;
        // A batch stopped midway counts as a failure, after what it did is counted.
        let relayed = relayed.map(|result| {
            result.and_then(|done| {
                metrics.outbox_published.inc_by(done.published as u64);
                if done.expired > 0 {
                    metrics.outbox_expired.inc_by(done.expired as u64);
                }
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
                    None => Ok(done.published + done.dead_lettered + done.expired),
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
                older_than = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = wake.notified() => None,
                    () = tokio::time::sleep(poll) => Some(HANDOFF_GRACE),
                };
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
                older_than = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn message() -> Outgoing {
        Outgoing {
            id: Uuid::now_v7(),
            subject: "hodei.v1.evt.test".to_owned(),
            payload: b"{}".to_vec(),
            headers: TraceHeaders::new(),
            at_most_once: false,
        }
    }

    #[tokio::test]
    async fn a_full_handoff_leaves_the_messages_to_the_claiming_path_and_wakes_it() {
        let wake = Arc::new(Notify::new());
        let (handoff, mut handed) = handoff(wake.clone());
        let first: Vec<Outgoing> = (0..HANDOFF_QUEUE - 1).map(|_| message()).collect();
        handoff.hand_over(first);
        assert_eq!(handed.in_flight.lock().len(), HANDOFF_QUEUE - 1);

        // Two more would pass the bound: refused whole, not in flight, and the claiming
        // path woken for them.
        let over = vec![message(), message()];
        let over_ids: Vec<Uuid> = over.iter().map(|m| m.id).collect();
        handoff.hand_over(over);
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("the claiming path is woken");
        let held = handed.in_flight.snapshot();
        assert!(over_ids.iter().all(|id| !held.contains(id)));
        assert_eq!(handed.queued.load(Ordering::Relaxed), HANDOFF_QUEUE - 1);
        assert_eq!(handed.queue.try_recv().unwrap().1.len(), HANDOFF_QUEUE - 1);
        assert!(
            handed.queue.try_recv().is_err(),
            "only the first batch queued"
        );

        // One that fits is queued.
        handoff.hand_over(vec![message()]);
        assert_eq!(handed.queue.try_recv().unwrap().1.len(), 1);
    }
}
