//! A job's output: [`read_lines`] turns a pipe into lines (lossy UTF-8, at most 64 KiB each,
//! secrets masked by a [`Masker`]), and [`LogShipper`] numbers them, keeps the last few for the
//! report and publishes them in [`LogBatch`]es on the job's log subject.
//!
//! Partial lines: output is sent line by line, but bytes never wait more than
//! [`PARTIAL_LINE_DELAY`] for their newline. When the oldest byte of an unfinished line has
//! waited that long, what has arrived of the line is sent as a line of its own, and the rest
//! of it, when it comes, starts a new line (a newline right after a partial line adds no empty
//! line). So `printf 'working...'; sleep 5; echo done` shows `working...` at once and `done`
//! later as a second line. The same goes for a line cut at [`MAX_LINE_BYTES`]. Only bytes that
//! could be the start of a secret (or of a `\r\n`, or of a UTF-8 character) are held back
//! from a partial line, until more output or the end of the stream shows what they are.
//!
//! Memory stays bounded whatever the job prints: each reader holds at most a 64 KiB read
//! buffer and one 64 KiB line, readers hand lines over a channel of [`LINE_CHANNEL_CAPACITY`]
//! lines (at most 4 MiB), a batch is at most [`MAX_BATCH_LINES`] lines or [`MAX_BATCH_BYTES`]
//! of text, and at most [`MAX_IN_FLIGHT`] batches (each under 1 MiB of JSON) await their
//! acknowledgement. That is at most about 13 MiB per attempt, and a few hundred KiB for
//! output in short lines. When publishing falls behind, the readers wait, the pipes fill up
//! and the job blocks on its writes: no line is dropped.

mod framing;
mod shipping;

pub(crate) use framing::{LINE_CHANNEL_CAPACITY, read_lines};
pub(crate) use shipping::LogShipper;
