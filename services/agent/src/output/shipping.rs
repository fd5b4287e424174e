//! Log shipping over NATS: lines are numbered, the last few kept for the report, and published
//! in [`LogBatch`]es on the job's log subject, with at most [`MAX_IN_FLIGHT`] batches awaiting
//! their acknowledgement.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use hodei_domain::text;
use hodei_domain::{AttemptId, WorkerId};
use hodei_messaging::{AgentReport, LogBatch, LogEntry, subjects};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::framing::Line;
use crate::publish;

/// Most lines in one batch.
pub(crate) const MAX_BATCH_LINES: usize = 500;

/// Most bytes of text in one batch. JSON escaping can grow text up to six times (control
/// characters become `\u00XX`), so this keeps a batch under NATS' default 1 MiB payload limit.
pub(crate) const MAX_BATCH_BYTES: usize = 128 * 1024;

/// How long a line may wait in a batch before the batch is sent.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Batches published and not yet acknowledged.
pub(crate) const MAX_IN_FLIGHT: usize = 8;

/// Lines of output kept for the `Finished` report.
pub(crate) const TAIL_LINES: usize = AgentReport::TAIL_LINES;

/// Publishes one attempt's output in numbered batches.
pub(crate) struct LogShipper {
    js: jetstream::Context,
    metrics: hodei_telemetry::Metrics,
    attempt: AttemptId,
    subject: String,
    /// Unique per run of the attempt, so de-duplication ids never collide with a re-run.
    run_id: Uuid,
    batches: u64,
    next_seq: u64,
    pending: Vec<LogEntry>,
    pending_bytes: usize,
    in_flight: VecDeque<InFlight>,
    tail: VecDeque<String>,
    /// Cancelled when publishing should stop retrying.
    give_up: CancellationToken,
}

/// A published batch awaiting its acknowledgement, kept to publish it again if needed.
struct InFlight {
    ack: PublishAckFuture,
    msg_id: String,
    payload: Bytes,
}

impl LogShipper {
    /// A shipper for `attempt`'s output; retries stop once `give_up` is cancelled.
    pub fn new(
        js: jetstream::Context,
        metrics: hodei_telemetry::Metrics,
        worker_id: &WorkerId,
        attempt: AttemptId,
        give_up: CancellationToken,
    ) -> Self {
        Self {
            js,
            metrics,
            subject: subjects::log(worker_id, &attempt.job_id),
            attempt,
            run_id: Uuid::now_v7(),
            batches: 0,
            next_seq: 1,
            pending: Vec::new(),
            pending_bytes: 0,
            in_flight: VecDeque::new(),
            tail: VecDeque::with_capacity(TAIL_LINES),
            give_up,
        }
    }

    /// Ships lines until `lines` is closed and `exited` says the process is gone, then sends
    /// the last batch with `eof` set and waits for every acknowledgement. Returns the tail.
    pub async fn ship(
        mut self,
        mut lines: mpsc::Receiver<Line>,
        exited: oneshot::Receiver<()>,
    ) -> Vec<String> {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                line = lines.recv() => match line {
                    Some(line) => self.push(line).await,
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
            }
        }
        // The pipes are closed; the process may still run (it may have closed them itself).
        tokio::pin!(exited);
        loop {
            tokio::select! {
                _ = &mut exited => break,
                _ = tick.tick() => self.on_tick().await,
            }
        }
        self.flush(true).await;
        self.settle_all().await;
        self.tail.into()
    }

    /// Sends just the closing batch (no lines, `eof` set): for an attempt whose process never
    /// started, so log readers still see its output end.
    pub async fn eof_only(mut self) {
        self.flush(true).await;
        self.settle_all().await;
    }

    /// Sends what is pending; when nothing is, settles the batches in flight instead, so a
    /// batch that was lost is published again without waiting for more output.
    async fn on_tick(&mut self) {
        if self.pending.is_empty() {
            self.settle_all().await;
        } else {
            self.flush(false).await;
        }
    }

    async fn settle_all(&mut self) {
        while let Some(batch) = self.in_flight.pop_front() {
            self.settle(batch).await;
        }
    }

    async fn push(&mut self, line: Line) {
        if self.pending_bytes + line.text.len() > MAX_BATCH_BYTES {
            self.flush(false).await;
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail
            .push_back(text::storable(&line.text, AgentReport::MAX_TAIL_LINE_BYTES));
        self.pending_bytes += line.text.len();
        self.pending.push(LogEntry {
            seq: self.next_seq,
            stream: line.stream,
            text: line.text,
            at: line.at,
        });
        self.next_seq += 1;
        if self.pending.len() >= MAX_BATCH_LINES {
            self.flush(false).await;
        }
    }

    /// Publishes the pending lines (nothing if there are none, unless `eof`).
    async fn flush(&mut self, eof: bool) {
        if self.pending.is_empty() && !eof {
            return;
        }
        let batch = LogBatch {
            job_id: self.attempt.job_id,
            attempt: self.attempt.attempt,
            lines: std::mem::take(&mut self.pending),
            eof,
        };
        self.pending_bytes = 0;
        self.batches += 1;
        let payload = match serde_json::to_vec(&batch) {
            Ok(json) => Bytes::from(json),
            Err(e) => {
                warn!(job_id = %self.attempt.job_id, attempt = %self.attempt.attempt, error = %e, "failed to encode a log batch, dropping it");
                return;
            }
        };
        let msg_id = format!("{}-{}", self.run_id, self.batches);
        if self.in_flight.len() >= MAX_IN_FLIGHT
            && let Some(oldest) = self.in_flight.pop_front()
        {
            self.settle(oldest).await;
        }
        match publish::send(&self.js, &self.subject, &msg_id, payload.clone()).await {
            Ok(ack) => self.in_flight.push_back(InFlight {
                ack,
                msg_id,
                payload,
            }),
            Err(e) => {
                warn!(subject = %self.subject, error = %e, "failed to publish a log batch, retrying");
                self.republish(&msg_id, payload).await;
            }
        }
    }

    /// Waits for a batch's acknowledgement, publishing it again until acknowledged.
    async fn settle(&mut self, batch: InFlight) {
        let acked = tokio::select! {
            ack = batch.ack.into_future() => ack,
            _ = self.give_up.cancelled() => return,
        };
        if let Err(e) = acked {
            self.metrics.nats_error("publish");
            warn!(subject = %self.subject, error = %e, "log batch not acknowledged, retrying");
            self.republish(&batch.msg_id, batch.payload).await;
        }
    }

    async fn republish(&self, msg_id: &str, payload: Bytes) {
        // Failure is already logged; the lines are lost only when the agent gives up.
        let _ = publish::until_acked(
            &self.js,
            &self.metrics,
            &self.subject,
            msg_id,
            payload,
            &self.give_up,
        )
        .await;
    }
}
