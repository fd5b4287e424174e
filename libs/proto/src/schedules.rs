//! Schedule domain <-> wire conversions.

use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    FieldError, JobSpec, OverlapPolicy, PipelineSpec, Schedule, ScheduleSpec, ScheduleTarget,
    TickRecord, ValidationErrors,
};

use crate::convert::timestamp;
use crate::pipelines::pipeline_spec_from_wire;
use crate::v1 as pb;

/// The catch-up window of a schedule that gives none: one minute.
pub const DEFAULT_CATCH_UP_WINDOW_MS: u64 = 60_000;
/// The history kept by a schedule that gives no limit.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;

/// The time zone of a schedule that gives none.
const DEFAULT_TIME_ZONE: &str = "UTC";

fn prefixed(prefix: &str, errors: ValidationErrors) -> Vec<FieldError> {
    errors
        .0
        .into_iter()
        .map(|e| FieldError::new(format!("{prefix}{}", e.field), e.reason))
        .collect()
}

/// A wire schedule spec, defaults applied and every field checked (the template's with its
/// path: `job.command`, `pipeline.steps[0].name`). Errors are named under `prefix`.
pub fn schedule_spec_from_wire(
    prefix: &str,
    w: pb::ScheduleSpec,
) -> Result<ScheduleSpec, ValidationErrors> {
    let mut errors = Vec::new();
    let target = match w.target {
        Some(pb::schedule_spec::Target::Job(job)) => {
            match JobSpec::try_from(JobSpecDraft::from(job)) {
                Ok(spec) => Some(ScheduleTarget::Job {
                    spec: Box::new(spec),
                }),
                Err(e) => {
                    errors.extend(prefixed(&format!("{prefix}job."), e));
                    None
                }
            }
        }
        Some(pb::schedule_spec::Target::Pipeline(pipeline)) => {
            match pipeline_spec_from_wire(pipeline).and_then(PipelineSpec::try_from) {
                Ok(spec) => Some(ScheduleTarget::Pipeline { spec }),
                Err(e) => {
                    errors.extend(prefixed(&format!("{prefix}pipeline."), e));
                    None
                }
            }
        }
        None => {
            errors.push(FieldError::new(
                format!("{prefix}target"),
                "must be a job or a pipeline",
            ));
            None
        }
    };
    let overlap = match pb::OverlapPolicy::try_from(w.overlap) {
        Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Skip) => OverlapPolicy::Skip,
        Ok(pb::OverlapPolicy::Allow) => OverlapPolicy::Allow,
        Ok(pb::OverlapPolicy::CancelPrevious) => OverlapPolicy::CancelPrevious,
        Err(_) => {
            errors.push(FieldError::new(
                format!("{prefix}overlap"),
                format!("{} is not an overlap policy", w.overlap),
            ));
            OverlapPolicy::Skip
        }
    };
    let Some(target) = target else {
        return Err(ValidationErrors(errors));
    };
    let spec = ScheduleSpec {
        name: w.name,
        cron: w.cron,
        time_zone: if w.time_zone.is_empty() {
            DEFAULT_TIME_ZONE.to_owned()
        } else {
            w.time_zone
        },
        target,
        overlap,
        catch_up_window_ms: if w.catch_up_window_ms == 0 {
            DEFAULT_CATCH_UP_WINDOW_MS
        } else {
            w.catch_up_window_ms
        },
        jitter_ms: w.jitter_ms,
        history_limit: if w.history_limit == 0 {
            DEFAULT_HISTORY_LIMIT
        } else {
            w.history_limit
        },
    };
    if let Err(e) = spec.validate() {
        errors.extend(prefixed(prefix, e));
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(ValidationErrors(errors))
    }
}

impl From<OverlapPolicy> for pb::OverlapPolicy {
    fn from(p: OverlapPolicy) -> Self {
        match p {
            OverlapPolicy::Allow => pb::OverlapPolicy::Allow,
            OverlapPolicy::Skip => pb::OverlapPolicy::Skip,
            OverlapPolicy::CancelPrevious => pb::OverlapPolicy::CancelPrevious,
        }
    }
}

impl From<&ScheduleSpec> for pb::ScheduleSpec {
    /// The spec as the API shows it: the template's secret values masked.
    fn from(s: &ScheduleSpec) -> Self {
        pb::ScheduleSpec {
            name: s.name.clone(),
            cron: s.cron.clone(),
            time_zone: s.time_zone.clone(),
            target: Some(match &s.target {
                ScheduleTarget::Job { spec } => {
                    pb::schedule_spec::Target::Job(spec.as_ref().into())
                }
                ScheduleTarget::Pipeline { spec } => {
                    pb::schedule_spec::Target::Pipeline(spec.into())
                }
            }),
            overlap: pb::OverlapPolicy::from(s.overlap).into(),
            catch_up_window_ms: s.catch_up_window_ms,
            jitter_ms: s.jitter_ms,
            history_limit: s.history_limit,
        }
    }
}

impl From<&TickRecord> for pb::ScheduleTick {
    fn from(t: &TickRecord) -> Self {
        pb::ScheduleTick {
            tick: Some(timestamp(t.tick)),
            outcome: t.outcome.as_str().to_owned(),
            handled_at: Some(timestamp(t.handled_at)),
            job_id: t.job_id.map(|j| j.to_string()).unwrap_or_default(),
            run_id: t.run_id.map(|r| r.to_string()).unwrap_or_default(),
            detail: t.detail.clone(),
        }
    }
}

impl From<&Schedule> for pb::Schedule {
    fn from(s: &Schedule) -> Self {
        pb::Schedule {
            id: s.id().to_string(),
            tenant: s.tenant().to_string(),
            spec: Some(s.spec().into()),
            paused: s.paused(),
            next_tick: s.next_tick().map(timestamp),
            fire_at: s.fire_at().map(timestamp),
            created_at: Some(timestamp(s.created_at())),
            updated_at: Some(timestamp(s.updated_at())),
            recent_ticks: Vec::new(),
        }
    }
}
