//! Line framing, with no transport: a pipe becomes lines (lossy UTF-8, cut at
//! [`MAX_LINE_BYTES`], partial lines sent after [`PARTIAL_LINE_DELAY`], secrets masked). See the
//! parent module for the rules.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_messaging::LogStreamKind;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::mask::Masker;

/// Longest line shipped as one entry: longer lines are split into several.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;

/// Bytes read from a pipe at a time.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Longest output waits for its newline before it is sent as a partial line.
pub(crate) const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(200);

/// Lines waiting between the readers and the shipper.
pub(crate) const LINE_CHANNEL_CAPACITY: usize = 64;

/// One line read from a job's stdout or stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub stream: LogStreamKind,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// Reads `reader` until end of file (or a read error, logged), sending each line, with the
/// secrets `masker` knows masked, to `lines`. Line ends (`\n`, `\r\n`) are dropped, invalid
/// UTF-8 is replaced, a line longer than [`MAX_LINE_BYTES`] is cut into pieces at character
/// boundaries, and output left without a newline for [`PARTIAL_LINE_DELAY`] is sent as a
/// partial line (see the module doc). Stops early if the receiver is gone.
pub(crate) async fn read_lines<R>(
    reader: R,
    stream: LogStreamKind,
    masker: Arc<Masker>,
    lines: mpsc::Sender<Line>,
) where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut buffer = LineBuffer::new(&masker);
    loop {
        let read = match buffer.partial_deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline, reader.fill_buf())
                .await
                .ok(),
            None => Some(reader.fill_buf().await),
        };
        let piece = match read {
            // `fill_buf` is cancel safe: a timed out read loses nothing.
            None => buffer.partial(),
            Some(Ok([])) => {
                if let Some(last) = buffer.finish()
                    && !send(&lines, stream, &last).await
                {
                    return;
                }
                break;
            }
            Some(Ok(available)) => {
                let (taken, piece) = buffer.take(available, Instant::now());
                reader.consume(taken);
                piece
            }
            Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Some(Err(e)) => {
                warn!(stream = ?stream, error = %e, "failed to read job output");
                if let Some(last) = buffer.finish() {
                    send(&lines, stream, &last).await;
                }
                break;
            }
        };
        if let Some(piece) = piece
            && !send(&lines, stream, &piece).await
        {
            return;
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

/// The line being read: bytes since the last line end, not sent yet. Every piece it gives out
/// is masked.
struct LineBuffer<'m> {
    line: Vec<u8>,
    /// Part of the current line was already sent (cut as too long, or as a partial line):
    /// the line end that closes it must not add an empty line of its own.
    continued: bool,
    /// When the oldest byte of `line` that may be sent as a partial line arrived; `None` when
    /// `line` is empty or holds only bytes waiting for more output (see [`Masker::safe_cut`]).
    since: Option<Instant>,
    masker: &'m Masker,
}

impl<'m> LineBuffer<'m> {
    fn new(masker: &'m Masker) -> Self {
        Self {
            line: Vec::new(),
            continued: false,
            since: None,
            masker,
        }
    }

    /// When the bytes waiting are due as a partial line.
    fn partial_deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + PARTIAL_LINE_DELAY)
    }

    /// Takes bytes from `available` up to the first line end, or until the line is full.
    /// Returns how many bytes were taken and the line (or piece of a line) now complete.
    fn take(&mut self, available: &[u8], now: Instant) -> (usize, Option<Vec<u8>>) {
        let room = MAX_LINE_BYTES - self.line.len();
        let window = &available[..available.len().min(room)];
        if let Some(end) = window.iter().position(|b| *b == b'\n') {
            self.line.extend_from_slice(&window[..end]);
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            let skip = self.continued && line.is_empty();
            self.continued = false;
            self.since = None;
            return (
                end + 1,
                (!skip).then(|| self.masker.mask(&line).into_owned()),
            );
        }
        self.line.extend_from_slice(window);
        if !window.is_empty() && self.since.is_none() {
            self.since = Some(now);
        }
        if self.line.len() < MAX_LINE_BYTES {
            return (window.len(), None);
        }
        // Full: send what can be sent, unless a secret spans the whole buffer.
        let cut = match self.cut(self.masker.safe_cut(&self.line)) {
            0 => char_cut(&self.line),
            cut => cut,
        };
        (window.len(), self.split(cut))
    }

    /// The partial line due: what is waiting, less what could be the start of a secret, a
    /// trailing `\r` (maybe the start of `\r\n`) or an incomplete character. The bytes kept
    /// wait for more output or the end of the stream.
    fn partial(&mut self) -> Option<Vec<u8>> {
        self.since = None;
        let mut cut = self.masker.safe_cut(&self.line);
        if cut > 0 && self.line[cut - 1] == b'\r' {
            cut -= 1;
        }
        match self.cut(cut) {
            0 => None,
            cut => self.split(cut),
        }
    }

    /// What is left at the end of the stream.
    fn finish(&mut self) -> Option<Vec<u8>> {
        self.since = None;
        let line = std::mem::take(&mut self.line);
        (!line.is_empty()).then(|| self.masker.mask(&line).into_owned())
    }

    /// `cut` moved back so it does not split a UTF-8 character.
    fn cut(&self, cut: usize) -> usize {
        char_cut(&self.line[..cut])
    }

    /// Sends `line[..cut]` as a piece and keeps the rest.
    fn split(&mut self, cut: usize) -> Option<Vec<u8>> {
        let rest = self.line.split_off(cut);
        let piece = std::mem::replace(&mut self.line, rest);
        self.continued = true;
        if self.line.is_empty() {
            self.since = None;
        }
        Some(self.masker.mask(&piece).into_owned())
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;

    async fn masked_lines_of(input: &[u8], secrets: &[&str]) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(1024);
        let masker = Arc::new(Masker::new(secrets.iter().copied()));
        read_lines(input, LogStreamKind::Stdout, masker, tx).await;
        let mut out = Vec::new();
        while let Some(line) = rx.recv().await {
            out.push(line.text);
        }
        out
    }

    async fn lines_of(input: &[u8]) -> Vec<String> {
        masked_lines_of(input, &[]).await
    }

    /// A pipe whose far end is read by `read_lines`, and the lines it sends.
    fn pipe(secrets: &[&str], capacity: usize) -> (DuplexStream, mpsc::Receiver<Line>) {
        let (writer, reader) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = mpsc::channel(capacity);
        let masker = Arc::new(Masker::new(secrets.iter().copied()));
        tokio::spawn(async move { read_lines(reader, LogStreamKind::Stdout, masker, tx).await });
        (writer, rx)
    }

    async fn next_text(rx: &mut mpsc::Receiver<Line>) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a line within 10 s")
            .map(|line| line.text)
    }

    #[tokio::test]
    async fn secrets_are_masked_in_lines_and_across_cuts() {
        assert_eq!(
            masked_lines_of(b"token is hunter2\nno secret\n", &["hunter2"]).await,
            vec!["token is ********", "no secret"]
        );
        // The secret would straddle the cut of an over-long line: the cut moves before it.
        let mut input = vec![b'x'; MAX_LINE_BYTES - 3];
        input.extend_from_slice(b"hunter2 end\n");
        let lines = masked_lines_of(&input, &["hunter2"]).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES - 3);
        assert_eq!(lines[1], "******** end");
    }

    #[tokio::test]
    async fn output_without_a_newline_is_sent_as_a_partial_line() {
        let (mut writer, mut rx) = pipe(&[], 16);
        let written = Instant::now();
        writer.write_all(b"working...").await.unwrap();
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("working..."));
        assert!(written.elapsed() >= PARTIAL_LINE_DELAY);
        // The newline that ends a partial line adds no empty line; what follows is a new line.
        writer.write_all(b"\ndone\nmore").await.unwrap();
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("done"));
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("more"));
        writer.write_all(b" and more\r").await.unwrap();
        assert_eq!(next_text(&mut rx).await.as_deref(), Some(" and more"));
        writer.write_all(b"\nlast\n").await.unwrap();
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("last"));
        drop(writer);
        assert_eq!(next_text(&mut rx).await, None);
    }

    #[tokio::test]
    async fn a_partial_line_never_splits_a_secret() {
        let (mut writer, mut rx) = pipe(&["hunter2"], 16);
        writer.write_all(b"token is hun").await.unwrap();
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("token is "));
        writer.write_all(b"ter2, ok\n").await.unwrap();
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("********, ok"));
        // Held bytes that turn out not to be a secret are sent at the end of the stream.
        writer.write_all(b"hunt").await.unwrap();
        drop(writer);
        assert_eq!(next_text(&mut rx).await.as_deref(), Some("hunt"));
        assert_eq!(next_text(&mut rx).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_output_is_read_whole_in_bounded_memory() {
        const LINE: usize = 1024;
        const TOTAL: u64 = 100 * 1024 * 1024;
        const CHANNEL: usize = 64;
        let (mut writer, mut rx) = pipe(&[], CHANNEL);
        let written = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&written);
        let producer = tokio::spawn(async move {
            let mut line = vec![b'.'; LINE];
            line[LINE - 1] = b'\n';
            for n in 0..TOTAL / LINE as u64 {
                let number = format!("{n:>12}");
                line[..12].copy_from_slice(number.as_bytes());
                writer.write_all(&line).await.unwrap();
                counter.fetch_add(LINE as u64, Ordering::SeqCst);
            }
        });
        // Whatever is written and not yet received sits in the pipe (64 KiB), the read buffer
        // (64 KiB), the line being read and the channel: the reader never runs further ahead.
        let bound = (64 * 1024 + 64 * 1024 + MAX_LINE_BYTES + (CHANNEL + 1) * LINE) as u64;
        let mut received = 0u64;
        let mut expected = 0u64;
        while let Some(line) = rx.recv().await {
            let number: u64 = line.text[..12].trim().parse().unwrap();
            assert_eq!(number, expected, "lines lost or out of order");
            assert_eq!(line.text.len(), LINE - 1);
            expected += 1;
            received += LINE as u64;
            let ahead = written.load(Ordering::SeqCst).saturating_sub(received);
            assert!(ahead <= bound, "{ahead} bytes buffered, more than {bound}");
            if expected.is_multiple_of(64) {
                // A slow consumer: the producer must wait for it, not fill memory.
                tokio::task::yield_now().await;
            }
        }
        producer.await.unwrap();
        assert_eq!(received, TOTAL);
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
