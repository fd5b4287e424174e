//! A job's output: [`read_lines`] turns a pipe into lines (lossy UTF-8, at most 64 KiB each),
//! and [`LogShipper`] numbers them, keeps the last few for the report and publishes them in
//! [`LogBatch`]es on the job's log subject.
//!
//! Memory stays bounded: readers hand lines over a bounded channel, a batch is at most
//! [`MAX_BATCH_LINES`] lines or [`MAX_BATCH_BYTES`] of text, and at most [`MAX_IN_FLIGHT`]
//! batches await their acknowledgement. When publishing falls behind, the readers wait, the
//! pipes fill up and the job blocks on its writes.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hodei_domain::AttemptId;
use hodei_messaging::{LogBatch, LogEntry, LogStreamKind, subjects};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::publish;

/// Longest line shipped as one entry: longer lines are split into several.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;
/// Lines waiting between the readers and the shipper.
pub(crate) const LINE_CHANNEL_CAPACITY: usize = 64;
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
pub(crate) const TAIL_LINES: usize = 20;
/// Longest line kept in the tail; the report must fit in one NATS message.
pub(crate) const MAX_TAIL_LINE_BYTES: usize = 4 * 1024;

/// One line read from a job's stdout or stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub stream: LogStreamKind,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// Reads `reader` until end of file (or a read error, logged), sending each line to `lines`.
/// Line ends (`\n`, `\r\n`) are dropped, invalid UTF-8 is replaced, and a line longer than
/// [`MAX_LINE_BYTES`] is cut into pieces at character boundaries. Stops early if the receiver
/// is gone.
pub(crate) async fn read_lines<R>(reader: R, stream: LogStreamKind, lines: mpsc::Sender<Line>)
where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, reader);
    let mut line: Vec<u8> = Vec::new();
    // Set after a long line was cut exactly before its newline, so that newline does not
    // produce an empty line of its own.
    let mut just_cut = false;
    loop {
        let available = match reader.fill_buf().await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(stream = ?stream, error = %e, "failed to read job output");
                break;
            }
        };
        if available.is_empty() {
            if !line.is_empty() && !send(&lines, stream, &line).await {
                return;
            }
            break;
        }
        let room = MAX_LINE_BYTES - line.len();
        let window = &available[..available.len().min(room)];
        match window.iter().position(|b| *b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&window[..end]);
                reader.consume(end + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let skip = just_cut && line.is_empty();
                just_cut = false;
                if !skip && !send(&lines, stream, &line).await {
                    return;
                }
                line.clear();
            }
            None => {
                let taken = window.len();
                line.extend_from_slice(window);
                reader.consume(taken);
                if line.len() >= MAX_LINE_BYTES {
                    let rest = line.split_off(char_cut(&line));
                    if !send(&lines, stream, &line).await {
                        return;
                    }
                    line = rest;
                    just_cut = line.is_empty();
                } else {
                    just_cut = false;
                }
            }
        }
    }
}

async fn send(lines: &mpsc::Sender<Line>, stream: LogStreamKind, bytes: &[u8]) -> bool {
    let line = Line {
        stream,
        text: String::from_utf8_lossy(bytes).into_owned(),
        at: Utc::now(),
    };
    lines.send(line).await.is_ok()
}

/// Where to cut a full line buffer so a UTF-8 character is not split: before a character
/// whose last bytes are missing, else at the end.
fn char_cut(buf: &[u8]) -> usize {
    for back in 1..=buf.len().min(3) {
        let start = buf.len() - back;
        let byte = buf[start];
        if byte & 0xC0 != 0x80 {
            let width = match byte {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if width > back { start } else { buf.len() };
        }
    }
    buf.len()
}

/// Publishes one attempt's output in numbered batches.
pub(crate) struct LogShipper {
    js: jetstream::Context,
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
    pub fn new(js: jetstream::Context, attempt: AttemptId, give_up: CancellationToken) -> Self {
        Self {
            js,
            subject: subjects::log(&attempt.job_id),
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
        let cut = line.text.floor_char_boundary(MAX_TAIL_LINE_BYTES);
        self.tail.push_back(line.text[..cut].to_owned());
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
            warn!(subject = %self.subject, error = %e, "log batch not acknowledged, retrying");
            self.republish(&batch.msg_id, batch.payload).await;
        }
    }

    async fn republish(&self, msg_id: &str, payload: Bytes) {
        // Failure is already logged; the lines are lost only when the agent gives up.
        let _ = publish::until_acked(&self.js, &self.subject, msg_id, payload, &self.give_up).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(1024);
        read_lines(input, LogStreamKind::Stdout, tx).await;
        let mut out = Vec::new();
        while let Some(line) = rx.recv().await {
            out.push(line.text);
        }
        out
    }

    #[tokio::test]
    async fn lines_are_split_on_newlines() {
        assert_eq!(
            lines_of(b"a\nb\r\n\nlast").await,
            vec!["a", "b", "", "last"]
        );
        assert!(lines_of(b"").await.is_empty());
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced() {
        assert_eq!(
            lines_of(b"ok \xff\xfe\n").await,
            vec!["ok \u{fffd}\u{fffd}"]
        );
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let mut input = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        input.push(b'\n');
        input.extend_from_slice(b"next\n");
        let lines = lines_of(&input).await;
        let lengths: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lengths, vec![MAX_LINE_BYTES, MAX_LINE_BYTES, 10, 4]);
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_stays_one_line() {
        let mut input = vec![b'y'; MAX_LINE_BYTES];
        input.extend_from_slice(b"\nz\n");
        let lines = lines_of(&input).await;
        let lengths: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lengths, vec![MAX_LINE_BYTES, 1]);
    }

    #[tokio::test]
    async fn cuts_keep_characters_whole() {
        // 'é' is two bytes: with an odd number of ASCII bytes first, one straddles the limit.
        let mut input = b"a".to_vec();
        input.extend("é".repeat(MAX_LINE_BYTES).as_bytes());
        input.push(b'\n');
        let lines = lines_of(&input).await;
        assert!(lines.iter().all(|l| !l.contains('\u{fffd}')));
        assert_eq!(lines.concat(), format!("a{}", "é".repeat(MAX_LINE_BYTES)));
        assert_eq!(lines[0].len(), MAX_LINE_BYTES - 1);
    }

    #[test]
    fn char_cut_finds_the_start_of_an_incomplete_character() {
        assert_eq!(char_cut(b"abc"), 3);
        assert_eq!(char_cut("aé".as_bytes()), 3);
        assert_eq!(char_cut(&"aé".as_bytes()[..2]), 1);
        assert_eq!(char_cut(&"a€".as_bytes()[..3]), 1);
        assert_eq!(char_cut(&"a😀".as_bytes()[..4]), 1);
        assert_eq!(char_cut("a😀".as_bytes()), 5);
    }
}
