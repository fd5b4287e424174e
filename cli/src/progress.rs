//! The one-line status `hodei run` shows on a terminal while its job waits to start:
//! rewritten in place with `\r`, and wiped before anything else is printed on stderr.
//!
//! It is wiped with spaces rather than an erase-line code, so it works on any terminal; it is
//! cut to the terminal's width (`COLUMNS`, else 80) so a long reason never wraps, which `\r`
//! could not undo.

use std::io::{self, Write};
use std::time::Duration;

use hodei_proto::v1 as pb;

use crate::wire;

/// Width assumed when `COLUMNS` does not tell.
const DEFAULT_COLUMNS: usize = 80;

/// The status line, on stderr but for tests; does nothing when disabled (stderr no terminal,
/// JSON output).
#[derive(Debug)]
pub struct StatusLine<W: Write = io::Stderr> {
    out: W,
    enabled: bool,
    /// Characters of the line on screen, 0 when none is.
    shown: usize,
    width: usize,
}

impl StatusLine {
    /// The status line on stderr.
    pub fn stderr(enabled: bool) -> Self {
        StatusLine::new(io::stderr(), enabled, line_width())
    }
}

/// How many characters a line may hold without wrapping: the terminal's width (`COLUMNS`,
/// else 80) less the last column, which some terminals wrap on writing.
pub fn line_width() -> usize {
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c > 1)
        .unwrap_or(DEFAULT_COLUMNS);
    columns - 1
}

impl<W: Write> StatusLine<W> {
    fn new(out: W, enabled: bool, width: usize) -> Self {
        StatusLine {
            out,
            enabled,
            shown: 0,
            width,
        }
    }

    /// Replaces the status with `text`, cut to fit the line.
    pub fn show(&mut self, text: &str) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let text: String = text.chars().take(self.width).collect();
        let mut out = self.wipe_text();
        out.push_str(&text);
        self.shown = text.chars().count();
        self.write(&out)
    }

    /// Wipes the status, if one is shown.
    pub fn clear(&mut self) -> io::Result<()> {
        if self.shown == 0 {
            return Ok(());
        }
        let out = self.wipe_text();
        self.shown = 0;
        self.write(&out)
    }

    fn write(&mut self, text: &str) -> io::Result<()> {
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    /// Back to the start of the line, blanks over the old status, back again.
    fn wipe_text(&self) -> String {
        if self.shown == 0 {
            return String::new();
        }
        format!("\r{}\r", " ".repeat(self.shown))
    }
}

impl<W: Write> Drop for StatusLine<W> {
    /// An error leaving `hodei run` is printed after this; it must start on a clean line.
    fn drop(&mut self) {
        // Nothing more can be done about stderr failing while the command ends.
        let _ = self.clear();
    }
}

/// The status of a job that has printed nothing yet, `elapsed` after it was submitted:
/// `waiting 12s: queued — no worker has gpu=true`.
pub fn waiting_text(job: &pb::Job, elapsed: Duration) -> String {
    let mut text = format!(
        "waiting {}s: {}",
        elapsed.as_secs(),
        wire::state_name(job.state)
    );
    let worker = job
        .attempts
        .last()
        .map(|a| a.worker_id.as_str())
        .filter(|w| !w.is_empty());
    match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Assigned) => {
            if let Some(worker) = worker {
                text.push_str(&format!(" to {worker}"));
            }
        }
        Ok(pb::JobState::Running) => {
            if let Some(worker) = worker {
                text.push_str(&format!(" on {worker}"));
            }
            text.push_str(", no output yet");
        }
        _ => {}
    }
    if !job.reason.is_empty() {
        text.push_str(" — ");
        text.push_str(&job.reason);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::sample_job;

    fn job(state: pb::JobState, reason: &str) -> pb::Job {
        pb::Job {
            state: state.into(),
            reason: reason.into(),
            ..sample_job()
        }
    }

    #[test]
    fn waiting_says_state_worker_and_reason() {
        let mut queued = job(pb::JobState::Queued, "no worker has gpu=true");
        queued.attempts.clear();
        assert_eq!(
            waiting_text(&queued, Duration::from_millis(12_400)),
            "waiting 12s: queued — no worker has gpu=true"
        );
        assert_eq!(
            waiting_text(&job(pb::JobState::Assigned, ""), Duration::ZERO),
            "waiting 0s: assigned to w-1"
        );
        assert_eq!(
            waiting_text(&job(pb::JobState::Running, ""), Duration::from_secs(3)),
            "waiting 3s: running on w-1, no output yet"
        );
    }

    fn written(line: &StatusLine<Vec<u8>>) -> String {
        String::from_utf8(line.out.clone()).unwrap()
    }

    #[test]
    fn the_line_is_cut_rewritten_and_wiped_in_place() {
        let mut line = StatusLine::new(Vec::new(), true, 8);
        line.clear().unwrap();
        assert_eq!(written(&line), "");
        line.show("waiting 1s: queued").unwrap();
        line.show("wait 2s").unwrap();
        line.clear().unwrap();
        line.clear().unwrap();
        assert_eq!(written(&line), "waiting \r        \rwait 2s\r       \r");
    }

    #[test]
    fn a_disabled_line_writes_nothing() {
        let mut line = StatusLine::new(Vec::new(), false, 80);
        line.show("waiting 1s: queued").unwrap();
        line.clear().unwrap();
        assert_eq!(written(&line), "");
    }
}
