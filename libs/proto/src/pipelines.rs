//! Pipeline domain <-> wire conversions.

use std::collections::HashMap;

use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptRecord, FieldError, JobId, PipelineEvent, PipelineEventKind, PipelineRun, PipelineSpec,
    PipelineSpecDraft, PipelineState, StepArtifacts, StepDraft, StepRun, StepState,
    ValidationErrors, When,
};

use crate::convert::timestamp;
use crate::v1 as pb;

/// A wire pipeline spec as a draft to validate. A step whose `job.name` or
/// `job.idempotency_key` is set is refused naming that field; the rest is left to
/// `PipelineSpec::try_from`.
pub fn pipeline_spec_from_wire(w: pb::PipelineSpec) -> Result<PipelineSpecDraft, ValidationErrors> {
    let mut errors = Vec::new();
    let mut steps = Vec::with_capacity(w.steps.len());
    for (i, step) in w.steps.into_iter().enumerate() {
        let job = step.job.unwrap_or_default();
        if !job.name.is_empty() && job.name != step.name {
            errors.push(FieldError::new(
                format!("steps[{i}].job.name"),
                "must be empty: the step's name is the job's",
            ));
        }
        if !job.idempotency_key.is_empty() {
            errors.push(FieldError::new(
                format!("steps[{i}].job.idempotency_key"),
                "must be empty: the pipeline's idempotency key covers its steps",
            ));
        }
        let job = JobSpecDraft::from(job);
        let when = match pb::When::try_from(step.when) {
            Ok(pb::When::OnFailure) => When::OnFailure,
            Ok(pb::When::Always) => When::Always,
            Ok(pb::When::OnSuccess | pb::When::Unspecified) => When::OnSuccess,
            Err(_) => {
                errors.push(FieldError::new(
                    format!("steps[{i}].when"),
                    format!("unknown value {}", step.when),
                ));
                When::OnSuccess
            }
        };
        steps.push(StepDraft::from_job_fields(
            step.name,
            step.needs,
            when,
            step.matrix
                .into_iter()
                .map(|(k, v)| (k, v.values))
                .collect(),
            step.artifacts
                .map(|a| StepArtifacts {
                    produce: a.produce,
                    consume: a.consume,
                })
                .unwrap_or_default(),
            job.into_job_fields(),
        ));
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    Ok(PipelineSpecDraft {
        name: w.name,
        env: w.env.into_iter().collect(),
        steps,
        fail_fast: w.fail_fast,
        idempotency_key: Some(w.idempotency_key).filter(|k| !k.is_empty()),
        labels: w.labels.into_iter().collect(),
    })
}

fn when_to_wire(w: When) -> pb::When {
    match w {
        When::OnSuccess => pb::When::OnSuccess,
        When::OnFailure => pb::When::OnFailure,
        When::Always => pb::When::Always,
    }
}

impl From<&StepDraft> for pb::PipelineStep {
    fn from(s: &StepDraft) -> Self {
        // The step's own fields as written (its `secret_env` may name the pipeline's env, so
        // they need not be a valid job on their own); masking is the caller's (see
        // `pipeline_spec_to_wire`).
        let mut job = crate::convert::draft_to_wire(&s.own_job());
        job.name.clear();
        let job = Some(job);
        pb::PipelineStep {
            name: s.name.clone(),
            needs: s.needs.clone(),
            when: when_to_wire(s.when).into(),
            matrix: s
                .matrix
                .iter()
                .map(|(k, v)| (k.clone(), pb::MatrixValues { values: v.clone() }))
                .collect(),
            job,
            artifacts: (!s.artifacts.is_empty()).then(|| pb::StepArtifacts {
                produce: s.artifacts.produce.clone(),
                consume: s.artifacts.consume.clone(),
            }),
        }
    }
}

impl From<&PipelineSpec> for pb::PipelineSpec {
    /// The spec as the API shows it: secret values masked.
    fn from(s: &PipelineSpec) -> Self {
        pipeline_spec_to_wire(&s.redacted())
    }
}

/// The spec as a client submits it, secret values included.
pub fn pipeline_spec_to_wire(s: &PipelineSpec) -> pb::PipelineSpec {
    pb::PipelineSpec {
        name: s.name.clone(),
        env: s.env.clone().into_iter().collect(),
        steps: s.steps.iter().map(Into::into).collect(),
        fail_fast: s.fail_fast,
        idempotency_key: s.idempotency_key.clone().unwrap_or_default(),
        labels: s.labels.clone().into_iter().collect(),
    }
}

impl From<PipelineState> for pb::PipelineState {
    fn from(s: PipelineState) -> Self {
        match s {
            PipelineState::Queued => pb::PipelineState::Queued,
            PipelineState::Running => pb::PipelineState::Running,
            PipelineState::Succeeded => pb::PipelineState::Succeeded,
            PipelineState::Failed => pb::PipelineState::Failed,
            PipelineState::Cancelled => pb::PipelineState::Cancelled,
        }
    }
}

/// The domain state of a wire state value; `None` for unspecified or unknown values.
pub fn pipeline_state_from_wire(value: i32) -> Option<PipelineState> {
    match pb::PipelineState::try_from(value).ok()? {
        pb::PipelineState::Unspecified => None,
        pb::PipelineState::Queued => Some(PipelineState::Queued),
        pb::PipelineState::Running => Some(PipelineState::Running),
        pb::PipelineState::Succeeded => Some(PipelineState::Succeeded),
        pb::PipelineState::Failed => Some(PipelineState::Failed),
        pb::PipelineState::Cancelled => Some(PipelineState::Cancelled),
    }
}

impl From<StepState> for pb::StepState {
    fn from(s: StepState) -> Self {
        match s {
            StepState::Waiting => pb::StepState::Waiting,
            StepState::Queued => pb::StepState::Queued,
            StepState::Running => pb::StepState::Running,
            StepState::Succeeded => pb::StepState::Succeeded,
            StepState::Failed => pb::StepState::Failed,
            StepState::Skipped => pb::StepState::Skipped,
            StepState::Cancelled => pb::StepState::Cancelled,
        }
    }
}

fn step_to_wire(s: &StepRun, attempts: Option<&Vec<AttemptRecord>>) -> pb::StepRun {
    pb::StepRun {
        name: s.name.clone(),
        base: s.base.clone(),
        needs: s.needs.clone(),
        when: when_to_wire(s.when).into(),
        state: pb::StepState::from(s.state).into(),
        job_id: s.job_id.map(|j| j.to_string()).unwrap_or_default(),
        queued_at: s.queued_at.map(timestamp),
        started_at: s.started_at.map(timestamp),
        finished_at: s.finished_at.map(timestamp),
        reason: s.reason.clone().unwrap_or_default(),
        attempts: attempts
            .map(|a| a.iter().map(Into::into).collect())
            .unwrap_or_default(),
        attempts_omitted: 0,
    }
}

/// A run on the wire, with each step's job attempts taken from `attempts` (by job id).
pub fn pipeline_run_to_wire(
    run: &PipelineRun,
    attempts: &HashMap<JobId, Vec<AttemptRecord>>,
) -> pb::PipelineRun {
    pb::PipelineRun {
        id: run.id().to_string(),
        tenant: run.tenant().to_string(),
        spec: Some(run.spec().into()),
        state: pb::PipelineState::from(run.state()).into(),
        steps: run
            .steps()
            .iter()
            .map(|s| step_to_wire(s, s.job_id.and_then(|j| attempts.get(&j))))
            .collect(),
        cancel_requested: run.cancel_requested(),
        created_at: Some(timestamp(run.created_at())),
        updated_at: Some(timestamp(run.updated_at())),
        version: run.version(),
        archived_at: None,
    }
}

/// A run event on the wire, with the run's state after it (`current` for events that leave
/// it as it was).
pub fn pipeline_event_to_wire(e: &PipelineEvent, current: PipelineState) -> pb::PipelineEvent {
    let mut out = pb::PipelineEvent {
        run_id: e.run_id.to_string(),
        seq: e.seq,
        at: Some(timestamp(e.at)),
        r#type: e.kind.name().to_owned(),
        state: pb::PipelineState::from(current).into(),
        ..Default::default()
    };
    match &e.kind {
        PipelineEventKind::Submitted { .. } => {
            out.state = pb::PipelineState::Queued.into();
        }
        PipelineEventKind::StepQueued { step, job_id } => {
            out.step = step.clone();
            out.job_id = job_id.to_string();
            out.step_state = pb::StepState::Queued.into();
            out.state = pb::PipelineState::Running.into();
        }
        PipelineEventKind::StepStarted { step } => {
            out.step = step.clone();
            out.step_state = pb::StepState::Running.into();
        }
        PipelineEventKind::StepFinished {
            step,
            state,
            reason,
        } => {
            out.step = step.clone();
            out.step_state = pb::StepState::from(*state).into();
            out.reason = reason.clone().unwrap_or_default();
        }
        PipelineEventKind::StepSkipped { step, reason } => {
            out.step = step.clone();
            out.step_state = pb::StepState::Skipped.into();
            out.reason = reason.clone();
        }
        PipelineEventKind::StepCancelled { step, reason } => {
            out.step = step.clone();
            out.step_state = pb::StepState::Cancelled.into();
            out.reason = reason.clone();
        }
        PipelineEventKind::CancelRequested { reason } => out.reason = reason.clone(),
        PipelineEventKind::Finished { state } => {
            out.state = pb::PipelineState::from(*state).into();
        }
    }
    out
}
