//! Fires the ticks of due schedules: every `schedule_poll_ms`, a replica claims the schedules
//! whose next tick is due, one at a time (those another replica holds are passed over) and,
//! per schedule in one transaction, records each tick with the job or run it starts and moves
//! the schedule on (`hodei_storage::driver::fire_due_schedule`). A tick is therefore fired once whatever
//! the number of replicas, their crashes and restarts; ticks that fell while no replica ran
//! fire on the next poll if they are inside the schedule's catch-up window.

use std::time::Duration;

use chrono::Utc;
use hodei_domain::ScheduleEventKind;
use hodei_storage::driver;
use tokio_util::sync::CancellationToken;

use crate::{Context, SOURCE};

/// Most schedules handled in one poll (one transaction each); the rest wait for the next.
const PER_POLL: usize = 256;

pub(crate) async fn run(ctx: Context, shutdown: CancellationToken) {
    let poll_every = Duration::from_millis(ctx.config.schedule_poll_ms);
    // A tick is looked at up to a poll late (and a poll may itself run late): that much
    // lateness never counts against a schedule's catch-up window.
    let grace = chrono::Duration::milliseconds(2 * ctx.config.schedule_poll_ms as i64);
    let mut poll = tokio::time::interval(poll_every);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = poll.tick() => {}
        }
        for _ in 0..PER_POLL {
            let fired = ctx
                .backends
                .db(|| {
                    driver::fire_due_schedule(
                        &ctx.backends.pool,
                        Utc::now(),
                        grace,
                        SOURCE,
                        crate::jitter(),
                    )
                })
                .await;
            let handled = match fired {
                Ok(Some(handled)) => handled,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "failed to fire due schedules, trying again at the next poll");
                    break;
                }
            };
            if let Some(put_off) = &handled.failed {
                tracing::warn!(schedule_id = %handled.schedule.id(), name = %handled.schedule.spec().name, error = %put_off.reason, retry_in_ms = put_off.retry_in.num_milliseconds(), "schedule could not be handled, put off");
            }
            if !handled.events.is_empty() {
                ctx.backends.relay_wake.notify_one();
            }
            for event in &handled.events {
                log(
                    handled.schedule.id(),
                    &handled.schedule.spec().name,
                    &event.kind,
                );
                let metrics = &ctx.backends.metrics;
                match &event.kind {
                    ScheduleEventKind::Fired { .. } => metrics.schedule_ticks("fired", 1),
                    ScheduleEventKind::Skipped { .. } => metrics.schedule_ticks("skipped", 1),
                    ScheduleEventKind::Missed(missed) => {
                        metrics.schedule_ticks("missed", missed.count);
                    }
                    _ => {}
                }
            }
        }
    }
}

fn log(id: hodei_domain::ScheduleId, name: &str, kind: &ScheduleEventKind) {
    match kind {
        ScheduleEventKind::Fired {
            tick,
            job_id,
            run_id,
            cancelled,
            ..
        } => {
            tracing::info!(schedule_id = %id, name, tick = %tick.to_rfc3339(), job_id = ?job_id.map(|j| j.to_string()), run_id = ?run_id.map(|r| r.to_string()), cancelled = cancelled.len(), "schedule fired");
        }
        ScheduleEventKind::Skipped { tick, reason } => {
            tracing::info!(schedule_id = %id, name, tick = %tick.to_rfc3339(), reason, "schedule tick skipped");
        }
        ScheduleEventKind::Missed(missed) => {
            tracing::warn!(schedule_id = %id, name, count = missed.count, first = %missed.first.to_rfc3339(), last = %missed.last.to_rfc3339(), "schedule ticks missed, older than the catch-up window");
        }
        _ => {}
    }
}
