//! The live view of a pipeline run, for `pipeline run` and `pipeline watch`: one line per step
//! with its state, how long it ran, its worker, its exit code and why it was skipped,
//! cancelled or failed.
//!
//! On a terminal the block of lines is redrawn in place: the cursor goes back up over the
//! block (ANSI cursor-up) and each line is erased and rewritten. Every line is cut to the
//! terminal's width, since a wrapped line would take two rows and the cursor would not go back
//! far enough. Elsewhere (a pipe, a file) nothing is redrawn: a plain line is printed each
//! time a step or the run changes state, and notes go to stderr.

use std::collections::HashMap;
use std::io::{self, Write};

use chrono::{DateTime, Utc};
use hodei_proto::v1 as pb;

use crate::human::{
    duration_text, run_state_cell, step_duration, step_exit_code, step_reason, step_state_cell,
    step_worker,
};
use crate::progress::line_width;
use crate::style::Style;
use crate::table::{Cell, Table};
use crate::wire;

/// How the view is written.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Redrawn in place, lines cut to `width` characters.
    Terminal { width: usize, style: Style },
    /// A line per change of state.
    Plain,
}

/// The view of one run, on stdout but for tests.
#[derive(Debug)]
pub struct LiveView<W: Write = io::Stdout> {
    out: W,
    mode: Mode,
    /// The run as last shown, to redraw as time passes.
    last: Option<pb::PipelineRun>,
    /// Terminal: notes shown under the steps.
    notes: Vec<String>,
    /// Terminal: lines of the block on screen.
    drawn: usize,
    /// Plain: the state last printed of each step, and of the run.
    printed: HashMap<String, i32>,
    printed_run: Option<i32>,
}

impl LiveView {
    /// The view on stdout: redrawn in place when `terminal`, plain lines otherwise.
    pub fn stdout(terminal: bool) -> Self {
        let mode = if terminal {
            Mode::Terminal {
                width: line_width(),
                style: Style::stdout(),
            }
        } else {
            Mode::Plain
        };
        LiveView::new(io::stdout(), mode)
    }
}

impl<W: Write> LiveView<W> {
    fn new(out: W, mode: Mode) -> Self {
        LiveView {
            out,
            mode,
            last: None,
            notes: Vec::new(),
            drawn: 0,
            printed: HashMap::new(),
            printed_run: None,
        }
    }

    /// Whether the view is redrawn in place (and so wants a refresh as time passes).
    pub fn redraws(&self) -> bool {
        matches!(self.mode, Mode::Terminal { .. })
    }

    /// Shows `run` as it is `now`.
    pub fn show(&mut self, run: &pb::PipelineRun, now: DateTime<Utc>) -> io::Result<()> {
        self.last = Some(run.clone());
        match self.mode {
            Mode::Terminal { .. } => self.redraw(now),
            Mode::Plain => self.print_changes(run, now),
        }
    }

    /// Redraws the run last shown with the durations as they are `now`; nothing to do for
    /// plain lines.
    pub fn refresh(&mut self, now: DateTime<Utc>) -> io::Result<()> {
        match self.mode {
            Mode::Terminal { .. } if self.last.is_some() => self.redraw(now),
            _ => Ok(()),
        }
    }

    /// A line that is not about a step, such as "cancelling run ...": under the steps on a
    /// terminal, on stderr otherwise.
    pub fn note(&mut self, text: &str, now: DateTime<Utc>) -> io::Result<()> {
        match self.mode {
            Mode::Terminal { .. } => {
                self.notes.push(text.to_owned());
                self.redraw(now)
            }
            Mode::Plain => {
                let mut err = io::stderr().lock();
                writeln!(err, "{text}")?;
                err.flush()
            }
        }
    }

    fn redraw(&mut self, now: DateTime<Utc>) -> io::Result<()> {
        let Mode::Terminal { width, style } = self.mode else {
            return Ok(());
        };
        let Some(run) = &self.last else {
            return Ok(());
        };
        let lines = block(run, now, style, &self.notes);
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for line in &lines {
            text.push_str("\r\x1b[2K");
            text.push_str(&fit(line, width));
            text.push('\n');
        }
        if lines.len() < self.drawn {
            // Erase what is left of a longer block below.
            text.push_str("\x1b[J");
        }
        self.drawn = lines.len();
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    fn print_changes(&mut self, run: &pb::PipelineRun, now: DateTime<Utc>) -> io::Result<()> {
        let mut text = String::new();
        let run_changed = self.printed_run != Some(run.state);
        let ended = wire::run_is_terminal(run.state);
        // The run's line comes first, but once it has ended, after its steps' last changes.
        if run_changed && !ended {
            text.push_str(&run_line(run, now));
            text.push('\n');
        }
        for step in &run.steps {
            if self.printed.get(&step.name) != Some(&step.state) {
                self.printed.insert(step.name.clone(), step.state);
                text.push_str(&step_line(step, now));
                text.push('\n');
            }
        }
        if run_changed && ended {
            text.push_str(&run_line(run, now));
            text.push('\n');
        }
        self.printed_run = Some(run.state);
        if text.is_empty() {
            return Ok(());
        }
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }
}

/// The block drawn on a terminal: the run, one aligned row per step, then the notes.
fn block(run: &pb::PipelineRun, now: DateTime<Utc>, style: Style, notes: &[String]) -> Vec<String> {
    let name = run.spec.as_ref().map_or("", |s| s.name.as_str());
    let mut header = Table::new();
    header.row([
        Cell::from(format!("run {}", run.id)),
        Cell::from(name),
        run_state_cell(run, style),
        Cell::from(duration_text(run_elapsed(run, now))),
    ]);
    let mut steps = Table::new();
    for step in &run.steps {
        let or_blank = |text: Option<String>| text.map_or_else(Cell::blank, Cell::from);
        steps.row([
            Cell::from(format!("  {}", step.name)),
            step_state_cell(step, style),
            or_blank(step_duration(step, now).map(duration_text)),
            or_blank(step_worker(step).map(str::to_owned)),
            or_blank(step_exit_code(step).map(|c| format!("exit {c}"))),
            or_blank(step_reason(step).map(str::to_owned)),
        ]);
    }
    header
        .render()
        .lines()
        .chain(steps.render().lines())
        .map(str::to_owned)
        .chain(notes.iter().cloned())
        .collect()
}

/// How long the run has taken: until it ended, or until `now`.
fn run_elapsed(run: &pb::PipelineRun, now: DateTime<Utc>) -> std::time::Duration {
    let Some(created) = wire::time(run.created_at.as_ref()) else {
        return std::time::Duration::ZERO;
    };
    let until = if wire::run_is_terminal(run.state) {
        wire::time(run.updated_at.as_ref()).unwrap_or(now)
    } else {
        now
    };
    (until - created).to_std().unwrap_or_default()
}

/// A plain line about the run: `run 0190… (ci): failed after 12s`.
fn run_line(run: &pb::PipelineRun, now: DateTime<Utc>) -> String {
    let name = run.spec.as_ref().map_or("", |s| s.name.as_str());
    let mut line = format!(
        "run {} ({name}): {}",
        run.id,
        wire::run_state_name(run.state)
    );
    if wire::run_is_terminal(run.state) {
        line.push_str(&format!(" after {}", duration_text(run_elapsed(run, now))));
    }
    line
}

/// A plain line about a step: `test: failed in 1.5s on w-1 (exit code 3): exited with code 3`.
fn step_line(step: &pb::StepRun, now: DateTime<Utc>) -> String {
    let mut line = format!("{}: {}", step.name, wire::step_state_name(step.state));
    // While it runs the duration only says when this line was printed.
    if wire::step_is_terminal(step.state)
        && let Some(d) = step_duration(step, now)
    {
        line.push_str(&format!(" in {}", duration_text(d)));
    }
    if let Some(worker) = step_worker(step) {
        line.push_str(&format!(" on {worker}"));
    }
    if let Some(code) = step_exit_code(step) {
        line.push_str(&format!(" (exit code {code})"));
    }
    if let Some(reason) = step_reason(step) {
        line.push_str(&format!(": {reason}"));
    }
    line
}

/// `line` cut to `width` visible characters; colour codes are kept but not counted, and a
/// cut line ends with a reset so no colour runs on.
fn fit(line: &str, width: usize) -> String {
    let mut out = String::new();
    let mut visible = 0;
    let mut coloured = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // A CSI sequence: ESC [ parameters, then one final character from @ to ~.
            coloured = true;
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c != '[' && ('@'..='~').contains(&c) {
                    break;
                }
            }
            continue;
        }
        if visible == width {
            if coloured {
                out.push_str("\x1b[0m");
            }
            return out;
        }
        out.push(c);
        visible += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::sample_run;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    fn written(view: &LiveView<Vec<u8>>) -> String {
        String::from_utf8(view.out.clone()).unwrap()
    }

    fn plain() -> LiveView<Vec<u8>> {
        LiveView::new(Vec::new(), Mode::Plain)
    }

    fn terminal(width: usize) -> LiveView<Vec<u8>> {
        LiveView::new(
            Vec::new(),
            Mode::Terminal {
                width,
                style: Style::PLAIN,
            },
        )
    }

    #[test]
    fn plain_lines_only_for_changes() {
        let mut view = plain();
        let mut run = sample_run();
        view.show(&run, at(1_700_000_010)).unwrap();
        view.show(&run, at(1_700_000_020)).unwrap();
        assert_eq!(
            written(&view),
            "\
run run-1 (ci): running
build: succeeded in 2.0s on w-1 (exit code 0)
test: failed in 1.5s on w-1 (exit code 3): exited with code 3
deploy: running on w-2
cleanup: waiting
"
        );
        view.out.clear();
        run.steps[2].state = pb::StepState::Cancelled.into();
        run.steps[2].finished_at = crate::fixtures::ts(1_700_000_006);
        run.steps[2].reason = "the run was cancelled".into();
        run.steps[3].state = pb::StepState::Skipped.into();
        run.steps[3].reason = "a step it needs failed".into();
        run.state = pb::PipelineState::Failed.into();
        run.updated_at = crate::fixtures::ts(1_700_000_012);
        view.show(&run, at(1_700_000_030)).unwrap();
        assert_eq!(
            written(&view),
            "\
deploy: cancelled in 2.0s on w-2: the run was cancelled
cleanup: skipped: a step it needs failed
run run-1 (ci): failed after 12s
"
        );
    }

    #[test]
    fn the_terminal_block_is_redrawn_in_place() {
        let mut view = terminal(200);
        let run = sample_run();
        view.show(&run, at(1_700_000_010)).unwrap();
        let first = written(&view);
        assert_eq!(
            first,
            "\
\r\x1b[2Krun run-1  ci  running  10s
\r\x1b[2K  build    succeeded  2.0s  w-1  exit 0
\r\x1b[2K  test     failed     1.5s  w-1  exit 3  exited with code 3
\r\x1b[2K  deploy   running    6.0s  w-2
\r\x1b[2K  cleanup  waiting
"
        );
        view.out.clear();
        view.refresh(at(1_700_000_011)).unwrap();
        let second = written(&view);
        assert!(
            second.starts_with("\x1b[5A\r\x1b[2Krun run-1  ci  running  11s\n"),
            "{second:?}"
        );
        assert!(
            second.contains("  deploy   running    7.0s  w-2\n"),
            "{second:?}"
        );

        view.out.clear();
        view.note("cancelling run run-1", at(1_700_000_011))
            .unwrap();
        let third = written(&view);
        assert!(third.starts_with("\x1b[5A"), "{third:?}");
        assert!(
            third.ends_with("\r\x1b[2Kcancelling run run-1\n"),
            "{third:?}"
        );
        assert_eq!(view.drawn, 6);
    }

    #[test]
    fn plain_views_do_not_redraw() {
        let mut view = plain();
        view.refresh(at(1)).unwrap();
        assert!(!view.redraws());
        assert_eq!(written(&view), "");
        assert!(terminal(80).redraws());
    }

    #[test]
    fn lines_are_cut_to_the_width_without_counting_colours() {
        assert_eq!(fit("abcdef", 4), "abcd");
        assert_eq!(fit("abc", 4), "abc");
        assert_eq!(fit("ab\x1b[31mcdef\x1b[0m", 4), "ab\x1b[31mcd\x1b[0m");
        assert_eq!(fit("ab\x1b[31mcd\x1b[0m", 4), "ab\x1b[31mcd\x1b[0m");
        let run = sample_run();
        let lines = block(&run, at(1_700_000_010), Style::COLOR, &[]);
        assert!(lines[2].contains("\x1b[31mfailed\x1b[0m"), "{lines:?}");
    }
}
