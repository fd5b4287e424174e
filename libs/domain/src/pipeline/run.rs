//! The `PipelineRun` aggregate: one run of a pipeline, its state machine and its steps'.
//!
//! A run is driven by its steps' jobs: the caller reports that a step's job started or ended
//! ([`PipelineRun::job_started`], [`PipelineRun::job_ended`]) and asks what follows
//! ([`PipelineRun::advance`]): steps whose needs have all ended are queued (the caller creates
//! their jobs) or skipped, and the run ends once every step has. Every change is an event;
//! replaying a run's events rebuilds it exactly.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::ids::{JobId, PipelineRunId, TenantId, named_enum};
use crate::job::JobState;
use crate::pipeline::spec::{PipelineSpec, When};

named_enum! {
    /// Where a run is in its life.
    pub enum PipelineState("pipeline state") {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl PipelineState {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            PipelineState::Succeeded | PipelineState::Failed | PipelineState::Cancelled
        )
    }
}

named_enum! {
    /// Where a step is.
    pub enum StepState("step state") {
        /// Some step it needs has not ended yet.
        Waiting = "waiting",
        /// Its job exists and waits for a worker.
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        /// Its job failed or timed out.
        Failed = "failed",
        /// Its `when` condition did not hold once its needs ended.
        Skipped = "skipped",
        Cancelled = "cancelled",
    }
}

impl StepState {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            StepState::Succeeded | StepState::Failed | StepState::Skipped | StepState::Cancelled
        )
    }

    /// The step's state once its job ended in `job`.
    fn of_job(job: JobState) -> Option<StepState> {
        match job {
            JobState::Succeeded => Some(StepState::Succeeded),
            JobState::Failed | JobState::TimedOut => Some(StepState::Failed),
            JobState::Cancelled => Some(StepState::Cancelled),
            JobState::Queued | JobState::Assigned | JobState::Running => None,
        }
    }
}

/// One concrete step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRun {
    pub name: String,
    /// The step as written (differs from `name` for matrix combinations).
    pub base: String,
    pub needs: Vec<String>,
    pub when: When,
    pub state: StepState,
    pub job_id: Option<JobId>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it was skipped or cancelled, or how its job ended.
    pub reason: Option<String>,
}

/// Something that happened to a run, at position `seq` (1-based) of its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineEvent {
    pub event_id: Uuid,
    pub run_id: PipelineRunId,
    pub seq: u64,
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: PipelineEventKind,
}

/// What happened to a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PipelineEventKind {
    /// The run was accepted (secret values masked).
    Submitted {
        tenant: TenantId,
        spec: PipelineSpec,
    },
    /// A step's needs ended as its `when` wants: its job was created.
    StepQueued { step: String, job_id: JobId },
    /// A step's job started on a worker.
    StepStarted { step: String },
    /// A step's job ended.
    StepFinished {
        step: String,
        state: StepState,
        reason: Option<String>,
    },
    /// A step will not run: its `when` condition did not hold.
    StepSkipped { step: String, reason: String },
    /// A step that had not started was cancelled (run cancelled, or fail-fast).
    StepCancelled { step: String, reason: String },
    /// Somebody asked to cancel the run.
    CancelRequested { reason: String },
    /// Every step ended: the run ended too.
    Finished { state: PipelineState },
}

impl PipelineEventKind {
    /// The event's name: the last token of its subject.
    pub fn name(&self) -> &'static str {
        match self {
            PipelineEventKind::Submitted { .. } => "submitted",
            PipelineEventKind::StepQueued { .. } => "step_queued",
            PipelineEventKind::StepStarted { .. } => "step_started",
            PipelineEventKind::StepFinished { .. } => "step_finished",
            PipelineEventKind::StepSkipped { .. } => "step_skipped",
            PipelineEventKind::StepCancelled { .. } => "step_cancelled",
            PipelineEventKind::CancelRequested { .. } => "cancel_requested",
            PipelineEventKind::Finished { .. } => "finished",
        }
    }
}

/// What [`PipelineRun::advance`] and [`PipelineRun::cancel`] ask the caller to do.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// The events recorded, in order.
    pub events: Vec<PipelineEvent>,
    /// Steps queued: create a job with this id for each (its spec from [`PipelineRun::job_spec`]).
    pub jobs_to_create: Vec<(String, JobId)>,
    /// Jobs of steps that must stop: cancel each through the job's own cancel path.
    pub jobs_to_cancel: Vec<JobId>,
}

impl Effects {
    fn extend(&mut self, other: Effects) {
        self.events.extend(other.events);
        self.jobs_to_create.extend(other.jobs_to_create);
        self.jobs_to_cancel.extend(other.jobs_to_cancel);
    }
}

/// One run of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineRun {
    id: PipelineRunId,
    tenant: TenantId,
    spec: PipelineSpec,
    state: PipelineState,
    steps: Vec<StepRun>,
    cancel_requested: bool,
    /// Set once a step failed in a `fail_fast` run.
    failing_fast: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: u64,
}

impl PipelineRun {
    /// Accepts a run: queued, every step waiting, at version 1. Call [`PipelineRun::advance`]
    /// to queue the steps that need nothing.
    pub fn submit(
        id: PipelineRunId,
        tenant: TenantId,
        spec: PipelineSpec,
        now: DateTime<Utc>,
    ) -> (PipelineRun, PipelineEvent) {
        let steps = spec
            .expand(id)
            .into_iter()
            .map(|s| StepRun {
                name: s.name,
                base: s.base,
                needs: s.needs,
                when: s.when,
                state: StepState::Waiting,
                job_id: None,
                queued_at: None,
                started_at: None,
                finished_at: None,
                reason: None,
            })
            .collect();
        let now = crate::time::recorded(now);
        let event = PipelineEvent {
            event_id: Uuid::now_v7(),
            run_id: id,
            seq: 1,
            at: now,
            kind: PipelineEventKind::Submitted {
                tenant: tenant.clone(),
                spec: spec.redacted(),
            },
        };
        let run = PipelineRun {
            id,
            tenant,
            spec,
            state: PipelineState::Queued,
            steps,
            cancel_requested: false,
            failing_fast: false,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        (run, event)
    }

    /// Rebuilds a run from its full history. Secret values are not in the history, so a
    /// rebuilt run's spec has them masked.
    pub fn from_events(events: &[PipelineEvent]) -> Result<PipelineRun, DomainError> {
        let illegal = |state: String| DomainError::IllegalPipelineTransition {
            action: "replay",
            state,
        };
        let (first, rest) = events
            .split_first()
            .ok_or_else(|| illegal("empty history".to_owned()))?;
        let PipelineEventKind::Submitted { tenant, spec } = &first.kind else {
            return Err(illegal(format!(
                "history starting with {}",
                first.kind.name()
            )));
        };
        let (mut run, _) =
            PipelineRun::submit(first.run_id, tenant.clone(), spec.clone(), first.at);
        for event in rest {
            run.apply(event)?;
        }
        Ok(run)
    }

    pub fn id(&self) -> PipelineRunId {
        self.id
    }
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
    pub fn spec(&self) -> &PipelineSpec {
        &self.spec
    }
    pub fn state(&self) -> PipelineState {
        self.state
    }
    pub fn steps(&self) -> &[StepRun] {
        &self.steps
    }
    pub fn cancel_requested(&self) -> bool {
        self.cancel_requested
    }
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    pub fn updated_at(&self) -> DateTime<Utc> {
        self.updated_at
    }
    /// The seq of the last event applied: the optimistic-concurrency version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The step whose job is `job_id`.
    pub fn step_of_job(&self, job_id: JobId) -> Option<&StepRun> {
        self.steps.iter().find(|s| s.job_id == Some(job_id))
    }

    /// The job spec of every concrete step, by step name (one expansion of the spec).
    pub fn job_specs(&self) -> BTreeMap<String, crate::spec::JobSpec> {
        self.spec
            .expand(self.id)
            .into_iter()
            .map(|s| (s.name, s.job))
            .collect()
    }

    /// Rebuilds a run from its stored projection, for repositories.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        id: PipelineRunId,
        tenant: TenantId,
        spec: PipelineSpec,
        state: PipelineState,
        steps: Vec<StepRun>,
        cancel_requested: bool,
        failing_fast: bool,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        version: u64,
    ) -> PipelineRun {
        PipelineRun {
            id,
            tenant,
            spec,
            state,
            steps,
            cancel_requested,
            failing_fast,
            created_at,
            updated_at,
            version,
        }
    }

    /// Whether a step failed in a `fail_fast` run (what stopped the others).
    pub fn failing_fast(&self) -> bool {
        self.failing_fast
    }

    fn record(
        &mut self,
        kind: PipelineEventKind,
        now: DateTime<Utc>,
    ) -> Result<PipelineEvent, DomainError> {
        let event = PipelineEvent {
            event_id: Uuid::now_v7(),
            run_id: self.id,
            seq: self.version + 1,
            at: crate::time::recorded(now),
            kind,
        };
        self.apply(&event)?;
        Ok(event)
    }

    fn step_mut(&mut self, name: &str) -> Result<&mut StepRun, DomainError> {
        self.steps
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| DomainError::UnknownStep {
                step: name.to_owned(),
            })
    }

    fn illegal(&self, action: &'static str) -> DomainError {
        DomainError::IllegalPipelineTransition {
            action,
            state: self.state.to_string(),
        }
    }

    /// Applies one event (already decided) to the run.
    pub fn apply(&mut self, event: &PipelineEvent) -> Result<(), DomainError> {
        if event.run_id != self.id {
            return Err(DomainError::ForeignEvent {
                target: format!("pipeline run {}", self.id),
                event_of: format!("pipeline run {}", event.run_id),
            });
        }
        if event.seq != self.version + 1 {
            return Err(DomainError::OutOfOrderEvent {
                job_id: self.id.to_string(),
                seq: event.seq,
                version: self.version,
            });
        }
        if self.state.is_terminal() {
            return Err(self.illegal("change"));
        }
        let at = event.at;
        match &event.kind {
            PipelineEventKind::Submitted { .. } => return Err(self.illegal("submit")),
            PipelineEventKind::StepQueued { step, job_id } => {
                let s = self.step_mut(step)?;
                if s.state != StepState::Waiting {
                    return Err(DomainError::IllegalStepTransition {
                        step: step.clone(),
                        action: "queue",
                        state: s.state.to_string(),
                    });
                }
                s.state = StepState::Queued;
                s.job_id = Some(*job_id);
                s.queued_at = Some(at);
                self.state = PipelineState::Running;
            }
            PipelineEventKind::StepStarted { step } => {
                let s = self.step_mut(step)?;
                if s.state != StepState::Queued {
                    return Err(DomainError::IllegalStepTransition {
                        step: step.clone(),
                        action: "start",
                        state: s.state.to_string(),
                    });
                }
                s.state = StepState::Running;
                s.started_at = Some(at);
            }
            PipelineEventKind::StepFinished {
                step,
                state,
                reason,
            } => {
                let fail_fast = self.spec.fail_fast;
                let s = self.step_mut(step)?;
                if !matches!(s.state, StepState::Queued | StepState::Running)
                    || !state.is_terminal()
                {
                    return Err(DomainError::IllegalStepTransition {
                        step: step.clone(),
                        action: "finish",
                        state: s.state.to_string(),
                    });
                }
                s.state = *state;
                s.finished_at = Some(at);
                s.reason = reason.clone();
                if fail_fast && *state == StepState::Failed {
                    self.failing_fast = true;
                }
            }
            PipelineEventKind::StepSkipped { step, reason }
            | PipelineEventKind::StepCancelled { step, reason } => {
                let cancelled = matches!(event.kind, PipelineEventKind::StepCancelled { .. });
                let s = self.step_mut(step)?;
                if s.state != StepState::Waiting {
                    return Err(DomainError::IllegalStepTransition {
                        step: step.clone(),
                        action: if cancelled { "cancel" } else { "skip" },
                        state: s.state.to_string(),
                    });
                }
                s.state = if cancelled {
                    StepState::Cancelled
                } else {
                    StepState::Skipped
                };
                s.finished_at = Some(at);
                s.reason = Some(reason.clone());
            }
            PipelineEventKind::CancelRequested { .. } => {
                if self.cancel_requested {
                    return Err(self.illegal("cancel again"));
                }
                self.cancel_requested = true;
            }
            PipelineEventKind::Finished { state } => {
                if !state.is_terminal() || self.steps.iter().any(|s| !s.state.is_terminal()) {
                    return Err(self.illegal("finish"));
                }
                self.state = *state;
            }
        }
        self.version = event.seq;
        self.updated_at = at;
        Ok(())
    }

    /// Records that the job of a step started. A job the run does not know, or a step not
    /// queued (a repeated report), changes nothing and returns no event.
    pub fn job_started(
        &mut self,
        job_id: JobId,
        now: DateTime<Utc>,
    ) -> Result<Option<PipelineEvent>, DomainError> {
        let Some(step) = self.step_of_job(job_id) else {
            return Ok(None);
        };
        if step.state != StepState::Queued || self.state.is_terminal() {
            return Ok(None);
        }
        let name = step.name.clone();
        self.record(PipelineEventKind::StepStarted { step: name }, now)
            .map(Some)
    }

    /// Records that the job of a step ended in `job_state` (a terminal job state), then
    /// advances the run. A job the run does not know or already counted changes nothing.
    pub fn job_ended(
        &mut self,
        job_id: JobId,
        job_state: JobState,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Effects, DomainError> {
        let Some(state) = StepState::of_job(job_state) else {
            return Err(DomainError::IllegalStepTransition {
                step: job_id.to_string(),
                action: "finish",
                state: format!("job {job_state}"),
            });
        };
        let Some(step) = self.step_of_job(job_id) else {
            return Ok(Effects::default());
        };
        if !matches!(step.state, StepState::Queued | StepState::Running) || self.state.is_terminal()
        {
            return Ok(Effects::default());
        }
        let name = step.name.clone();
        let was_failing_fast = self.failing_fast;
        let mut effects = Effects::default();
        effects.events.push(self.record(
            PipelineEventKind::StepFinished {
                step: name,
                state,
                reason,
            },
            now,
        )?);
        // The first failure of a fail-fast run stops the `on_success` steps under way.
        if self.failing_fast && !was_failing_fast && !self.cancel_requested {
            effects.jobs_to_cancel = self
                .steps
                .iter()
                .filter(|s| matches!(s.state, StepState::Queued | StepState::Running))
                .filter(|s| s.when == When::OnSuccess)
                .filter_map(|s| s.job_id)
                .collect();
        }
        effects.extend(self.advance(now, JobId::new)?);
        Ok(effects)
    }

    /// Asks for the run to be cancelled: steps not started are cancelled (but `always` steps,
    /// which still run once their needs end), the jobs of queued and running steps are to be
    /// cancelled by the caller (but those of `always` steps, the clean-up the cancel must not
    /// cut short), and the run ends `cancelled` once every step has ended.
    pub fn cancel(&mut self, reason: &str, now: DateTime<Utc>) -> Result<Effects, DomainError> {
        if self.state.is_terminal() {
            return Err(self.illegal("cancel"));
        }
        let mut effects = Effects::default();
        if self.cancel_requested {
            return Ok(effects);
        }
        effects.events.push(self.record(
            PipelineEventKind::CancelRequested {
                reason: reason.to_owned(),
            },
            now,
        )?);
        effects.jobs_to_cancel = self
            .steps
            .iter()
            .filter(|s| matches!(s.state, StepState::Queued | StepState::Running))
            .filter(|s| s.when != When::Always)
            .filter_map(|s| s.job_id)
            .collect();
        effects.extend(self.advance(now, JobId::new)?);
        Ok(effects)
    }

    /// Queues, skips or cancels every waiting step whose fate is decided, and ends the run
    /// once every step has ended. `new_job_id` names the job of each step queued. Calling it
    /// again with nothing new changes nothing.
    pub fn advance(
        &mut self,
        now: DateTime<Utc>,
        mut new_job_id: impl FnMut() -> JobId,
    ) -> Result<Effects, DomainError> {
        let mut effects = Effects::default();
        if self.state.is_terminal() {
            return Ok(effects);
        }
        // A cancel or a fail-fast failure cancels the waiting `on_success` steps.
        let stopping = self.cancel_requested || self.failing_fast;
        // Steps are in an order where needs come first only if written so; loop until stable.
        loop {
            let states: BTreeMap<String, StepState> = self
                .steps
                .iter()
                .map(|s| (s.name.clone(), s.state))
                .collect();
            let mut decided = None;
            for s in &self.steps {
                if s.state != StepState::Waiting {
                    continue;
                }
                let needs: Vec<(&String, StepState)> = s
                    .needs
                    .iter()
                    .map(|n| (n, states.get(n).copied().unwrap_or(StepState::Skipped)))
                    .collect();
                // A cancel also cancels the waiting `on_failure` steps: after a cancel only
                // `always` steps start.
                if (stopping && s.when == When::OnSuccess)
                    || (self.cancel_requested && s.when == When::OnFailure)
                {
                    let why = if self.cancel_requested {
                        "pipeline run cancelled"
                    } else {
                        "fail-fast: another step failed"
                    };
                    decided = Some((s.name.clone(), Decision::Cancel(why.to_owned())));
                    break;
                }
                if needs.iter().any(|(_, st)| !st.is_terminal()) {
                    continue;
                }
                let not_ok: Vec<String> = needs
                    .iter()
                    .filter(|(_, st)| *st != StepState::Succeeded)
                    .map(|(n, st)| format!("{n} {st}"))
                    .collect();
                let failed = needs.iter().any(|(_, st)| *st == StepState::Failed);
                let decision = match s.when {
                    When::Always => Decision::Queue,
                    When::OnSuccess if not_ok.is_empty() => Decision::Queue,
                    When::OnSuccess => {
                        Decision::Skip(format!("needs not succeeded: {}", not_ok.join(", ")))
                    }
                    When::OnFailure if failed => Decision::Queue,
                    When::OnFailure => Decision::Skip("no step it needs failed".to_owned()),
                };
                decided = Some((s.name.clone(), decision));
                break;
            }
            let Some((step, decision)) = decided else {
                break;
            };
            let kind = match decision {
                Decision::Queue => {
                    let job_id = new_job_id();
                    effects.jobs_to_create.push((step.clone(), job_id));
                    PipelineEventKind::StepQueued { step, job_id }
                }
                Decision::Skip(reason) => PipelineEventKind::StepSkipped { step, reason },
                Decision::Cancel(reason) => PipelineEventKind::StepCancelled { step, reason },
            };
            effects.events.push(self.record(kind, now)?);
        }
        if self.steps.iter().all(|s| s.state.is_terminal()) {
            // A step cancelled by itself (its job cancelled, or its agent stopped by force)
            // did not do its work: the run cannot have succeeded.
            let state = if self.cancel_requested {
                PipelineState::Cancelled
            } else if self.steps.iter().any(|s| s.state == StepState::Failed) || self.failing_fast {
                PipelineState::Failed
            } else if self.steps.iter().any(|s| s.state == StepState::Cancelled) {
                PipelineState::Cancelled
            } else {
                PipelineState::Succeeded
            };
            effects
                .events
                .push(self.record(PipelineEventKind::Finished { state }, now)?);
        }
        Ok(effects)
    }
}

enum Decision {
    Queue,
    Skip(String),
    Cancel(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spec::{PipelineSpecDraft, StepDraft};

    fn spec(steps: Vec<StepDraft>, fail_fast: bool) -> PipelineSpec {
        PipelineSpec::try_from(PipelineSpecDraft {
            name: "ci".to_owned(),
            env: BTreeMap::new(),
            steps,
            fail_fast,
            idempotency_key: None,
            labels: BTreeMap::new(),
        })
        .unwrap()
    }

    fn start(steps: Vec<StepDraft>, fail_fast: bool) -> (PipelineRun, Vec<PipelineEvent>, Effects) {
        let now = Utc::now();
        let (mut run, first) = PipelineRun::submit(
            PipelineRunId::new(),
            TenantId::default(),
            spec(steps, fail_fast),
            now,
        );
        let effects = run.advance(now, JobId::new).unwrap();
        let mut events = vec![first];
        events.extend(effects.events.clone());
        (run, events, effects)
    }

    fn job_of(run: &PipelineRun, step: &str) -> JobId {
        run.steps()
            .iter()
            .find(|s| s.name == step)
            .unwrap()
            .job_id
            .unwrap()
    }

    fn state_of(run: &PipelineRun, step: &str) -> StepState {
        run.steps().iter().find(|s| s.name == step).unwrap().state
    }

    fn created(effects: &Effects) -> Vec<&str> {
        effects
            .jobs_to_create
            .iter()
            .map(|(s, _)| s.as_str())
            .collect()
    }

    fn diamond() -> Vec<StepDraft> {
        vec![
            StepDraft::exec("a", &["true"]),
            StepDraft::exec("b", &["true"]).needing(&["a"]),
            StepDraft::exec("c", &["true"]).needing(&["a"]),
            StepDraft::exec("d", &["true"]).needing(&["b", "c"]),
        ]
    }

    #[test]
    fn a_diamond_runs_in_dependency_order_and_replays() {
        let now = Utc::now();
        let (mut run, mut events, effects) = start(diamond(), false);
        assert_eq!(created(&effects), ["a"]);
        assert_eq!(run.state(), PipelineState::Running);
        let a = job_of(&run, "a");
        events.extend(run.job_started(a, now).unwrap());
        let e = run.job_ended(a, JobState::Succeeded, None, now).unwrap();
        assert_eq!(created(&e), ["b", "c"]);
        events.extend(e.events);
        let e = run
            .job_ended(job_of(&run, "b"), JobState::Succeeded, None, now)
            .unwrap();
        assert!(e.jobs_to_create.is_empty(), "d waits for c");
        events.extend(e.events);
        let e = run
            .job_ended(job_of(&run, "c"), JobState::Succeeded, None, now)
            .unwrap();
        assert_eq!(created(&e), ["d"]);
        events.extend(e.events);
        let e = run
            .job_ended(job_of(&run, "d"), JobState::Succeeded, None, now)
            .unwrap();
        events.extend(e.events);
        assert_eq!(run.state(), PipelineState::Succeeded);
        assert_eq!(PipelineRun::from_events(&events).unwrap(), run);
        // Terminal runs change no more; repeated reports change nothing.
        assert!(
            run.job_ended(a, JobState::Succeeded, None, now)
                .unwrap()
                .events
                .is_empty()
        );
        assert!(run.cancel("late", now).is_err());
    }

    #[test]
    fn a_failure_skips_dependants_and_runs_always_and_on_failure_steps() {
        let now = Utc::now();
        let mut cleanup = StepDraft::exec("cleanup", &["true"]).needing(&["deploy"]);
        cleanup.when = When::Always;
        let mut notify = StepDraft::exec("notify", &["true"]).needing(&["build"]);
        notify.when = When::OnFailure;
        let (mut run, _, _) = start(
            vec![
                StepDraft::exec("build", &["true"]),
                StepDraft::exec("deploy", &["true"]).needing(&["build"]),
                cleanup,
                notify,
            ],
            false,
        );
        let e = run
            .job_ended(
                job_of(&run, "build"),
                JobState::Failed,
                Some("exit 3".into()),
                now,
            )
            .unwrap();
        assert_eq!(state_of(&run, "deploy"), StepState::Skipped);
        assert_eq!(created(&e), ["cleanup", "notify"]);
        run.job_ended(job_of(&run, "cleanup"), JobState::Succeeded, None, now)
            .unwrap();
        run.job_ended(job_of(&run, "notify"), JobState::Succeeded, None, now)
            .unwrap();
        assert_eq!(run.state(), PipelineState::Failed);
    }

    #[test]
    fn fail_fast_cancels_running_siblings_and_waiting_steps() {
        let now = Utc::now();
        let (mut run, _, effects) = start(
            vec![
                StepDraft::exec("lint", &["true"]),
                StepDraft::exec("test", &["true"]),
                StepDraft::exec("deploy", &["true"]).needing(&["lint", "test"]),
            ],
            true,
        );
        assert_eq!(created(&effects), ["lint", "test"]);
        let test = job_of(&run, "test");
        let e = run
            .job_ended(job_of(&run, "lint"), JobState::Failed, None, now)
            .unwrap();
        assert_eq!(e.jobs_to_cancel, [test]);
        assert_eq!(state_of(&run, "deploy"), StepState::Cancelled);
        assert_eq!(run.state(), PipelineState::Running);
        run.job_ended(test, JobState::Cancelled, None, now).unwrap();
        assert_eq!(run.state(), PipelineState::Failed);
    }

    #[test]
    fn cancel_stops_what_runs_cancels_what_waits_and_still_runs_always_steps() {
        let now = Utc::now();
        let mut cleanup = StepDraft::exec("cleanup", &["true"]).needing(&["build"]);
        cleanup.when = When::Always;
        let (mut run, _, _) = start(
            vec![
                StepDraft::exec("build", &["true"]),
                StepDraft::exec("deploy", &["true"]).needing(&["build"]),
                cleanup,
            ],
            false,
        );
        let build = job_of(&run, "build");
        let e = run.cancel("stop", now).unwrap();
        assert_eq!(e.jobs_to_cancel, [build]);
        assert_eq!(state_of(&run, "deploy"), StepState::Cancelled);
        assert_eq!(state_of(&run, "cleanup"), StepState::Waiting);
        assert!(run.cancel("again", now).unwrap().events.is_empty());
        let e = run
            .job_ended(build, JobState::Cancelled, None, now)
            .unwrap();
        assert_eq!(created(&e), ["cleanup"]);
        run.job_ended(job_of(&run, "cleanup"), JobState::Succeeded, None, now)
            .unwrap();
        assert_eq!(run.state(), PipelineState::Cancelled);
    }

    #[test]
    fn a_cancel_leaves_always_steps_under_way_and_starts_no_on_failure_step() {
        let now = Utc::now();
        let mut cleanup = StepDraft::exec("cleanup", &["true"]);
        cleanup.when = When::Always;
        let mut notify = StepDraft::exec("notify", &["true"]).needing(&["build", "test"]);
        notify.when = When::OnFailure;
        let (mut run, _, effects) = start(
            vec![
                StepDraft::exec("build", &["true"]),
                StepDraft::exec("test", &["true"]),
                cleanup,
                notify,
            ],
            false,
        );
        assert_eq!(created(&effects), ["build", "test", "cleanup"]);
        run.job_ended(job_of(&run, "build"), JobState::Failed, None, now)
            .unwrap();
        let test = job_of(&run, "test");
        let e = run.cancel("stop", now).unwrap();
        // The clean-up already queued goes on; `notify` will not start, though `build` failed.
        assert_eq!(e.jobs_to_cancel, [test]);
        assert_eq!(state_of(&run, "notify"), StepState::Cancelled);
        let e = run.job_ended(test, JobState::Cancelled, None, now).unwrap();
        assert!(created(&e).is_empty());
        run.job_ended(job_of(&run, "cleanup"), JobState::Succeeded, None, now)
            .unwrap();
        assert_eq!(state_of(&run, "cleanup"), StepState::Succeeded);
        assert_eq!(run.state(), PipelineState::Cancelled);
    }

    #[test]
    fn a_step_whose_job_was_cancelled_keeps_the_run_from_succeeding() {
        let now = Utc::now();
        let (mut run, _, _) = start(
            vec![
                StepDraft::exec("build", &["true"]),
                StepDraft::exec("deploy", &["true"]).needing(&["build"]),
            ],
            false,
        );
        // `CancelJob` on the step's job, or its agent stopped by force: not a cancel of the run.
        run.job_ended(job_of(&run, "build"), JobState::Cancelled, None, now)
            .unwrap();
        assert_eq!(state_of(&run, "deploy"), StepState::Skipped);
        assert_eq!(run.state(), PipelineState::Cancelled);
    }

    #[test]
    fn illegal_events_are_refused_and_leave_the_run_unchanged() {
        let now = Utc::now();
        let (mut run, _, _) = start(diamond(), false);
        let before = run.clone();
        let bad = PipelineEvent {
            event_id: Uuid::now_v7(),
            run_id: run.id(),
            seq: run.version() + 1,
            at: now,
            kind: PipelineEventKind::StepStarted { step: "d".into() },
        };
        assert!(run.apply(&bad).is_err());
        let finish = PipelineEvent {
            kind: PipelineEventKind::Finished {
                state: PipelineState::Succeeded,
            },
            ..bad
        };
        assert!(run.apply(&finish).is_err());
        assert_eq!(run, before);
    }

    #[test]
    fn an_event_of_another_run_is_refused() {
        let (mut run, _, _) = start(diamond(), false);
        let (other, _, _) = start(diamond(), false);
        let before = run.clone();
        let foreign = PipelineEvent {
            event_id: Uuid::now_v7(),
            run_id: other.id(),
            seq: run.version() + 1,
            at: Utc::now(),
            kind: PipelineEventKind::StepStarted { step: "a".into() },
        };
        let err = run.apply(&foreign).unwrap_err();
        assert!(matches!(err, DomainError::ForeignEvent { .. }), "{err}");
        assert_eq!(run, before);
    }
}
