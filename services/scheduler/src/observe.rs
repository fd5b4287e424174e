//! What the scheduler counts when it records an agent's report: starts (with the time from
//! submission to the first start) and jobs that reached an end state.

use chrono::{DateTime, Utc};
use hodei_domain::{AttemptNumber, Job};
use hodei_messaging::{AgentReport, ReportKind};

use crate::Context;

/// Counts what recording `report` did to `job` at `now`.
pub(crate) fn recorded(ctx: &Context, job: &Job, report: &AgentReport, now: DateTime<Utc>) {
    let metrics = &ctx.backends.metrics;
    if let ReportKind::Started { .. } = report.kind {
        metrics.jobs_started.inc();
        if report.attempt == AttemptNumber::new(1)
            && let Ok(delay) = (now - job.created_at()).to_std()
        {
            metrics.start_delay.observe(delay.as_secs_f64());
        }
    }
    if job.state().is_terminal() {
        metrics.job_finished(job.state().as_str());
    }
}
