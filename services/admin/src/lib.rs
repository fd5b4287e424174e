//! `hodei-admin`: operators' commands that work on the state of record directly, beside the
//! running services. `rebuild-projections` checks (and repairs) the `jobs` and
//! `pipeline_runs` projections against the event store; `archive` runs a retention pass now
//! (the schedulers run one every `HODEI_RETENTION_INTERVAL`).

pub mod rebuild;

use std::fmt::Write as _;

use clap::{Parser, Subcommand};

use hodei_storage::archive::{self, Counts, Moved};
pub use rebuild::{RebuildOptions, RebuildReport, rebuild_projections};

/// Operators' commands on a Hodei Pipelines database.
#[derive(Debug, Parser)]
#[command(name = "hodei-admin", version)]
pub struct AdminArgs {
    /// PostgreSQL URL of the state of record.
    #[arg(
        long,
        env = "HODEI_DATABASE_URL",
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/hodei"
    )]
    pub database_url: String,

    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Fold every job and pipeline run from its events and compare it with its projection
    /// row, online, a batch per snapshot. Exits 0 when every row agrees (or was repaired), 3
    /// when differences are left.
    #[command(after_help = "\
Examples:
  hodei-admin rebuild-projections
  hodei-admin rebuild-projections --repair --batch 1000")]
    RebuildProjections {
        /// Overwrite each differing row with the state folded from its events (if the row
        /// has not moved meanwhile; secrets and pending reasons are kept from the row).
        #[arg(long)]
        repair: bool,
        /// Aggregates read per snapshot.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
    /// Move ended jobs and pipeline runs older than `--older-than` to the archive tables now,
    /// a short transaction per batch, beside running schedulers (they share the work).
    #[command(after_help = "\
Examples:
  hodei-admin archive --older-than 30d
  hodei-admin archive --older-than 12h --batch 1000")]
    Archive {
        /// How long ago a job or run must have ended (`30d`, `12h`, `90s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Jobs, and pipeline runs, moved per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
}

/// Moves every job and run that ended more than `older_than` ago to the archive, a batch per
/// transaction, and returns what moved and the row counts after.
pub async fn archive(
    pool: &sqlx::PgPool,
    older_than: std::time::Duration,
    batch: u32,
) -> Result<(Moved, Counts), AdminError> {
    let cutoff = archive::cutoff(older_than).ok_or(AdminError::Age)?;
    let mut total = Moved::default();
    loop {
        let moved = archive::archive_batch(pool, cutoff, batch).await?;
        if moved == Moved::default() {
            break;
        }
        total += moved;
    }
    Ok((total, archive::counts(pool).await?))
}

/// The archive report as people read it.
pub fn archive_text(moved: &Moved, counts: &Counts) -> String {
    format!(
        "archived {} jobs, {} pipeline runs and {} events\n\
         hot: {} jobs, {} pipeline runs; archive: {} jobs, {} pipeline runs\n",
        moved.jobs,
        moved.runs,
        moved.events,
        counts.jobs,
        counts.pipeline_runs,
        counts.jobs_archive,
        counts.pipeline_runs_archive
    )
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Storage(#[from] hodei_storage::StorageError),
    #[error("--older-than reaches before the earliest time this program can count from")]
    Age,
}

/// The report as people read it: one line per differing field, then the totals.
pub fn report_text(report: &RebuildReport) -> String {
    let mut out = String::new();
    for d in &report.differences {
        let _ = writeln!(
            out,
            "{} {}{}",
            d.aggregate.name(),
            d.id,
            if d.repaired { " (repaired)" } else { "" }
        );
        for f in &d.fields {
            let _ = writeln!(
                out,
                "  {}: projection {} / events {}",
                f.field, f.live, f.rebuilt
            );
        }
    }
    let repaired = report.differences.len() - report.unrepaired();
    let _ = writeln!(
        out,
        "checked {} jobs and {} pipeline runs: {} differ from their events, {} repaired",
        report.jobs_checked,
        report.runs_checked,
        report.differences.len(),
        repaired
    );
    out
}
