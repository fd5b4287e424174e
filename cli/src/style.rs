//! Colours for people at a terminal, written as ANSI SGR codes by hand.
//!
//! A [`Style`] is decided once per output stream: colours only when that stream is a terminal
//! and `NO_COLOR` is unset or empty (<https://no-color.org>) and `TERM` is not `dumb`. Pipes,
//! files and `--output json` always get plain text.

use std::io::IsTerminal;

use hodei_proto::v1 as pb;

use crate::wire;

/// A colour or an attribute of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paint {
    Green,
    Red,
    Yellow,
    Blue,
    Dim,
}

impl Paint {
    fn sgr(self) -> &'static str {
        match self {
            Paint::Green => "\x1b[32m",
            Paint::Red => "\x1b[31m",
            Paint::Yellow => "\x1b[33m",
            Paint::Blue => "\x1b[34m",
            Paint::Dim => "\x1b[2m",
        }
    }

    /// `text` in this paint, then back to normal.
    pub fn apply(self, text: &str) -> String {
        format!("{}{text}{RESET}", self.sgr())
    }
}

const RESET: &str = "\x1b[0m";

/// Whether to colour one output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    color: bool,
}

impl Style {
    /// No colours.
    #[cfg(test)]
    pub const PLAIN: Style = Style { color: false };
    /// Colours, whatever the stream.
    #[cfg(test)]
    pub const COLOR: Style = Style { color: true };

    /// The style of stdout.
    pub fn stdout() -> Style {
        Style::detect(std::io::stdout().is_terminal())
    }

    /// The style of stderr.
    pub fn stderr() -> Style {
        Style::detect(std::io::stderr().is_terminal())
    }

    fn detect(is_terminal: bool) -> Style {
        let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        Style {
            color: wants_color(
                is_terminal,
                env("NO_COLOR").is_some(),
                env("TERM").as_deref(),
            ),
        }
    }

    /// `text` in `paint` when colouring, as is otherwise.
    pub fn paint(self, paint: Option<Paint>, text: &str) -> String {
        match paint {
            Some(paint) if self.color => paint.apply(text),
            _ => text.to_owned(),
        }
    }

    /// The paint to use when colouring, `None` otherwise.
    pub fn pick(self, paint: Option<Paint>) -> Option<Paint> {
        paint.filter(|_| self.color)
    }
}

fn wants_color(is_terminal: bool, no_color: bool, term: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && !no_color && term.is_none_or(|t| t != "dumb")
}

/// The colour of a job state: green for succeeded, red for failed and timed out, yellow for
/// cancelled, blue for running; none for the waiting states.
pub fn state_paint(value: i32) -> Option<Paint> {
    pb::JobState::try_from(value).ok()?;
    name_paint(wire::state_name(value))
}

/// The colour of a state of a job, a pipeline run or a step, by its name: as for jobs, and dim
/// for skipped steps.
pub fn name_paint(state: &str) -> Option<Paint> {
    match state {
        "succeeded" => Some(Paint::Green),
        "failed" | "timed_out" => Some(Paint::Red),
        "cancelled" => Some(Paint::Yellow),
        "running" => Some(Paint::Blue),
        "skipped" => Some(Paint::Dim),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(wants_color(true, false, None));
        assert!(wants_color(true, false, Some(OsStr::new("xterm-256color"))));
        assert!(!wants_color(false, false, None));
        assert!(!wants_color(true, true, None));
        assert!(!wants_color(true, false, Some(OsStr::new("dumb"))));
        // Whatever the environment, a stream that is no terminal gets no colour.
        assert_eq!(Style::detect(false), Style::PLAIN);
    }

    #[test]
    fn plain_style_leaves_text_alone() {
        assert_eq!(Style::PLAIN.paint(Some(Paint::Red), "failed"), "failed");
        assert_eq!(Style::PLAIN.pick(Some(Paint::Red)), None);
        assert_eq!(
            Style::COLOR.paint(Some(Paint::Red), "failed"),
            "\x1b[31mfailed\x1b[0m"
        );
        assert_eq!(Style::COLOR.paint(None, "queued"), "queued");
    }

    #[test]
    fn states_have_their_colours() {
        let paint = |s: pb::JobState| state_paint(s.into());
        assert_eq!(paint(pb::JobState::Succeeded), Some(Paint::Green));
        assert_eq!(paint(pb::JobState::Failed), Some(Paint::Red));
        assert_eq!(paint(pb::JobState::TimedOut), Some(Paint::Red));
        assert_eq!(paint(pb::JobState::Cancelled), Some(Paint::Yellow));
        assert_eq!(paint(pb::JobState::Running), Some(Paint::Blue));
        assert_eq!(paint(pb::JobState::Queued), None);
        assert_eq!(state_paint(99), None);
        assert_eq!(name_paint("skipped"), Some(Paint::Dim));
        assert_eq!(name_paint("waiting"), None);
    }
}
