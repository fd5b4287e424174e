//! What the scheduler counts when it records an agent's report: starts (with the time from
//! submission to the first start) and jobs that reached an end state.

use chrono::{DateTime, Utc};
use hodei_domain::{AttemptNumber, Job, JobState};
use hodei_messaging::{AgentReport, ReportKind};

use crate::Context;

/// Counts what recording `report` did to a job created at `created_at`: `ended` is the end
/// state the report brought the job to, if it did.
pub(crate) fn recorded(
    ctx: &Context,
    created_at: DateTime<Utc>,
    report: &AgentReport,
    ended: Option<JobState>,
    now: DateTime<Utc>,
) {
    let metrics = &ctx.backends.metrics;
    if let ReportKind::Started { .. } = report.kind {
        metrics.jobs_started.inc();
        if report.attempt == AttemptNumber::new(1)
            && let Ok(delay) = (now - created_at).to_std()
        {
            metrics.start_delay.observe(delay.as_secs_f64());
        }
    }
    if let Some(state) = ended {
        metrics.job_finished(state.as_str());
    }
}

/// The end state `job` is in, if it ended.
pub(crate) fn ended(job: &Job) -> Option<JobState> {
    job.state().is_terminal().then(|| job.state())
}
