//! Figures as measured: a table for people and JSON for tools.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::machine::Machine;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// The target of TARGETS.md this figure is compared with, if any.
    pub target: Option<&'static str>,
}

/// What one scenario measured.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub figures: Vec<Figure>,
    /// Free text worth keeping: parameters, EXPLAIN plans, what was not measured and why.
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn figure(
        &mut self,
        scenario: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<&'static str>,
    ) {
        self.figures.push(Figure {
            scenario,
            metric: metric.into(),
            value,
            unit,
            target,
        });
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// p50, p90, p99 and max of `histogram` (microseconds), as milliseconds.
    pub fn percentiles(
        &mut self,
        scenario: &'static str,
        what: &str,
        histogram: &Histogram<u64>,
        p99_target: Option<&'static str>,
    ) {
        for (label, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)] {
            let target = if label == "p99" { p99_target } else { None };
            let ms = histogram.value_at_quantile(q) as f64 / 1000.0;
            self.figure(scenario, format!("{what} {label}"), ms, "ms", target);
        }
        let max = histogram.max() as f64 / 1000.0;
        self.figure(scenario, format!("{what} max"), max, "ms", None);
    }

    pub fn extend(&mut self, other: Outcome) {
        self.figures.extend(other.figures);
        self.notes.extend(other.notes);
    }
}

/// A whole run: the machine, the mode and every scenario's outcome.
#[derive(Debug, Serialize)]
pub struct Run {
    pub machine: Machine,
    pub mode: &'static str,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub outcome: Outcome,
}

impl Run {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.machine.describe());
        let _ = writeln!(out, "mode: {}, started {}", self.mode, self.started_at);
        let _ = writeln!(
            out,
            "\n{:<17} {:<62} {:>14} {:<6} target",
            "scenario", "metric", "value", "unit"
        );
        for f in &self.outcome.figures {
            let _ = writeln!(
                out,
                "{:<17} {:<62} {:>14} {:<6} {}",
                f.scenario,
                f.metric,
                format_value(f.value),
                f.unit,
                f.target.unwrap_or("")
            );
        }
        if !self.outcome.notes.is_empty() {
            let _ = writeln!(out, "\nnotes:");
            for n in &self.outcome.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self).context("failed to encode the run")?;
        std::fs::write(path, json).with_context(|| format!("failed to write {}", path.display()))
    }
}

fn format_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// A histogram of microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("failed to create a histogram")
}
