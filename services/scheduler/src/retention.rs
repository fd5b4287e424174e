//! Retention: every `retention_interval`, ended jobs and pipeline runs older than
//! `retention_age` are moved from the hot tables to the archive tables, a short transaction
//! per batch (see `hodei_storage::archive`). Every replica runs it; batches lock with
//! `SKIP LOCKED`, so replicas share the work instead of repeating it. After each pass the
//! row counts of the hot and archive tables are exported as `hodei_retention_rows`.

use hodei_storage::StorageError;
use hodei_storage::archive::{self, Moved};
use tokio_util::sync::CancellationToken;

use crate::Context;

pub(crate) async fn run(ctx: Context, shutdown: CancellationToken) {
    let age = ctx.config.retention_age;
    if age.is_zero() {
        tracing::info!("retention off: ended jobs stay in the hot tables");
        return;
    }
    let mut tick = tokio::time::interval(ctx.config.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match pass(&ctx, age, &shutdown).await {
            Ok(moved) if moved != Moved::default() => tracing::info!(
                jobs = moved.jobs,
                pipeline_runs = moved.runs,
                events = moved.events,
                "retention archived ended jobs"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
        if let Err(e) = export_counts(&ctx).await {
            tracing::warn!(error = %e, "retention could not count rows");
        }
    }
}

/// Moves batches until none is left older than `age` (or shutdown).
async fn pass(
    ctx: &Context,
    age: std::time::Duration,
    shutdown: &CancellationToken,
) -> Result<Moved, StorageError> {
    // The configuration caps the age at 100 years, so the cutoff is a time chrono holds.
    let Some(cutoff) = archive::cutoff(age) else {
        return Ok(Moved::default());
    };
    let pool = &ctx.backends.pool;
    let batch = ctx.config.retention_batch;
    let mut total = Moved::default();
    while !shutdown.is_cancelled() {
        let moved = ctx
            .backends
            .db(|| archive::archive_batch(pool, cutoff, batch))
            .await?;
        if moved == Moved::default() {
            break;
        }
        let metrics = &ctx.backends.metrics;
        metrics.archived("job", moved.jobs);
        metrics.archived("pipeline_run", moved.runs);
        metrics.archived("event", moved.events);
        total += moved;
    }
    Ok(total)
}

async fn export_counts(ctx: &Context) -> Result<(), StorageError> {
    let counts = ctx
        .backends
        .db(|| archive::counts(&ctx.backends.pool))
        .await?;
    let metrics = &ctx.backends.metrics;
    for (table, rows) in [
        ("jobs", counts.jobs),
        ("pipeline_runs", counts.pipeline_runs),
        ("jobs_archive", counts.jobs_archive),
        ("pipeline_runs_archive", counts.pipeline_runs_archive),
    ] {
        metrics.set_retention_rows(table, i64::try_from(rows).unwrap_or(i64::MAX));
    }
    Ok(())
}
