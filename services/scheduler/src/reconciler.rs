//! The reconciler: PostgreSQL is the truth and NATS the transport, so a queued job whose
//! placement request was lost (or dropped) is found here and asked for again. A lost message
//! delays a job; it never loses it.

use std::time::Duration;

use chrono::Utc;
use hodei_messaging::{Outgoing, PlaceJob, streams, subjects};
use hodei_storage::jobs;
use tokio_util::sync::CancellationToken;

use crate::Context;

/// Every `overdue / 3`, re-requests placement of jobs queued for longer than `overdue` that
/// have no request waiting in the work queue.
pub(crate) async fn run(ctx: Context, overdue: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval((overdue / 3).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sweep(&ctx, overdue).await {
            tracing::warn!(error = %e, "reconciler sweep failed");
        }
    }
}

async fn sweep(
    ctx: &Context,
    overdue: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cutoff = Utc::now() - chrono::Duration::from_std(overdue)?;
    let stuck = jobs::overdue_queued(&ctx.backends.pool, cutoff, 500).await?;
    if stuck.is_empty() {
        return Ok(());
    }
    let stream = ctx.backends.js.get_stream(streams::WORK).await?;
    for job in stuck {
        let subject = subjects::place_job(&job.id());
        if stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .is_ok()
        {
            continue;
        }
        let item = PlaceJob {
            job_id: job.id(),
            attempt: job.current_attempt(),
            priority: job.spec().priority,
            not_before: job.not_before(),
        };
        let message = Outgoing::place_job(&item)?;
        ctx.backends
            .js
            .publish(message.subject, message.payload.into())
            .await?
            .await?;
        tracing::info!(job_id = %job.id(), "overdue job re-driven");
    }
    Ok(())
}
