//! The `Job` aggregate: a job's state machine. Every command checks that its transition is
//! legal, returns the event it produced and applies it; a refused command leaves the job as
//! it was. Replaying a job's events rebuilds it exactly.

mod attempt;
mod events;
mod state;

pub use attempt::{AttemptOutcome, AttemptRecord};
pub use events::{JobEvent, JobEventKind};
pub use state::JobState;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::ids::{AttemptId, AttemptNumber, JobId, TenantId, WorkerId};
use crate::spec::JobSpec;

/// How many times a job may lose its worker (infrastructure failures, which do not spend the
/// job's own retry budget) before it fails anyway.
pub const MAX_LOST_ATTEMPTS: u32 = 5;

/// Where a job is, with what only that stage has.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Stage {
    /// Waiting for a worker; after a failed attempt, not before its retry backoff ends.
    Queued { not_before: Option<DateTime<Utc>> },
    /// Held by a worker, assigned or running; a cancel, or a preemption for a waiting job of
    /// a higher priority, may be on its way to it.
    OnWorker {
        running: bool,
        cancel_requested: bool,
        preempted_by: Option<JobId>,
    },
    /// Ended for good, in `state`; whether a cancel had been asked for.
    Ended {
        state: JobState,
        cancel_requested: bool,
    },
}

impl Stage {
    fn state(self) -> JobState {
        match self {
            Stage::Queued { .. } => JobState::Queued,
            Stage::OnWorker { running: false, .. } => JobState::Assigned,
            Stage::OnWorker { running: true, .. } => JobState::Running,
            Stage::Ended { state, .. } => state,
        }
    }

    /// The stage a stored projection describes: `cancel_requested` counts only on a worker or
    /// once ended, `not_before` only in the queue.
    fn of(state: JobState, cancel_requested: bool, not_before: Option<DateTime<Utc>>) -> Stage {
        match state {
            JobState::Queued => Stage::Queued { not_before },
            JobState::Assigned | JobState::Running => Stage::OnWorker {
                running: state == JobState::Running,
                cancel_requested,
                preempted_by: None,
            },
            state => Stage::Ended {
                state,
                cancel_requested,
            },
        }
    }

    fn cancel_requested(self) -> bool {
        match self {
            Stage::Queued { .. } => false,
            Stage::OnWorker {
                cancel_requested, ..
            }
            | Stage::Ended {
                cancel_requested, ..
            } => cancel_requested,
        }
    }
}

/// A job and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    id: JobId,
    tenant: TenantId,
    spec: JobSpec,
    stage: Stage,
    attempts: Vec<AttemptRecord>,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: u64,
}

impl Job {
    /// Accepts a job: it starts queued, at version 1.
    pub fn submit(
        id: JobId,
        tenant: TenantId,
        spec: JobSpec,
        now: DateTime<Utc>,
    ) -> (Job, JobEvent) {
        let now = crate::time::recorded(now);
        let event = JobEvent {
            event_id: Uuid::now_v7(),
            job_id: id,
            seq: 1,
            at: now,
            kind: JobEventKind::Submitted {
                tenant: tenant.clone(),
                // Events are shown to people: secret values never enter them.
                spec: Box::new(spec.redacted()),
            },
            output_tail: Vec::new(),
        };
        let job = Job {
            id,
            tenant,
            spec,
            stage: Stage::Queued { not_before: None },
            attempts: Vec::new(),
            reason: None,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        (job, event)
    }

    /// Rebuilds a job from its full history. Secret env values are not in the history, so a
    /// rebuilt job's spec has them masked.
    pub fn from_events(events: &[JobEvent]) -> Result<Job, DomainError> {
        let (first, rest) = events
            .split_first()
            .ok_or(DomainError::IllegalJobTransition {
                action: "replay",
                state: "empty history".to_owned(),
            })?;
        let JobEventKind::Submitted { tenant, spec } = &first.kind else {
            return Err(DomainError::IllegalJobTransition {
                action: "replay",
                state: format!("history starting with {}", first.kind.name()),
            });
        };
        let (mut job, _) = Job::submit(first.job_id, tenant.clone(), (**spec).clone(), first.at);
        for event in rest {
            job.apply(event)?;
        }
        Ok(job)
    }

    pub fn id(&self) -> JobId {
        self.id
    }
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }
    pub fn state(&self) -> JobState {
        self.stage.state()
    }
    pub fn attempts(&self) -> &[AttemptRecord] {
        &self.attempts
    }
    /// Whether a cancel was asked for while the job was on a worker.
    pub fn cancel_requested(&self) -> bool {
        self.stage.cancel_requested()
    }

    /// The waiting job this one's attempt is being stopped for, while it is on a worker.
    pub fn preempted_by(&self) -> Option<JobId> {
        match self.stage {
            Stage::OnWorker { preempted_by, .. } => preempted_by,
            _ => None,
        }
    }
    /// A requeued job is not placed before this time (retry backoff); none once it left the
    /// queue.
    pub fn not_before(&self) -> Option<DateTime<Utc>> {
        match self.stage {
            Stage::Queued { not_before } => not_before,
            _ => None,
        }
    }
    /// Why the job ended as it did, or why it is waiting.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    pub fn updated_at(&self) -> DateTime<Utc> {
        self.updated_at
    }
    /// The sequence number of the last event applied: the optimistic-concurrency version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The current (latest) attempt number; `AttemptNumber::NONE` before the first assignment.
    pub fn current_attempt(&self) -> AttemptNumber {
        self.attempts
            .last()
            .map_or(AttemptNumber::NONE, |a| a.attempt)
    }

    pub fn current_attempt_record(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }

    /// The exit code of the attempt that ended the job, if it exited.
    pub fn exit_code(&self) -> Option<i32> {
        self.attempts
            .last()
            .and_then(|a| a.outcome.as_ref())
            .and_then(AttemptOutcome::exit_code)
    }

    /// Attempts that counted against the job's retry budget (not worker losses).
    fn spent_attempts(&self) -> u32 {
        count(self.attempts.iter().filter(|a| {
            !matches!(
                a.outcome,
                Some(AttemptOutcome::Lost { .. } | AttemptOutcome::Preempted { .. })
            )
        }))
    }

    fn lost_attempts(&self) -> u32 {
        count(
            self.attempts
                .iter()
                .filter(|a| matches!(a.outcome, Some(AttemptOutcome::Lost { .. }))),
        )
    }

    /// Rebuilds a job from its stored projection fields, for repositories.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        id: JobId,
        tenant: TenantId,
        spec: JobSpec,
        state: JobState,
        attempts: Vec<AttemptRecord>,
        cancel_requested: bool,
        not_before: Option<DateTime<Utc>>,
        reason: Option<String>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        version: u64,
    ) -> Job {
        Job {
            id,
            tenant,
            spec,
            stage: Stage::of(state, cancel_requested, not_before),
            attempts,
            reason,
            created_at,
            updated_at,
            version,
        }
    }

    /// [`Job::restore`]d with the pending preemption its projection stores (counts only on a
    /// worker).
    pub fn with_pending_preemption(mut self, by: Option<JobId>) -> Job {
        if let Stage::OnWorker { preempted_by, .. } = &mut self.stage {
            *preempted_by = by;
        }
        self
    }

    fn illegal(&self, action: &'static str) -> DomainError {
        DomainError::IllegalJobTransition {
            action,
            state: self.state().to_string(),
        }
    }

    fn fence(&self, attempt: AttemptNumber) -> Result<(), DomainError> {
        let current = self.current_attempt();
        if attempt != current || attempt == AttemptNumber::NONE {
            return Err(DomainError::StaleAttempt {
                got: attempt.get(),
                current: current.get(),
            });
        }
        Ok(())
    }

    fn record(&mut self, now: DateTime<Utc>, kind: JobEventKind) -> Result<JobEvent, DomainError> {
        self.record_with_tail(now, kind, Vec::new())
    }

    fn record_with_tail(
        &mut self,
        now: DateTime<Utc>,
        kind: JobEventKind,
        output_tail: Vec<String>,
    ) -> Result<JobEvent, DomainError> {
        let event = JobEvent {
            event_id: Uuid::now_v7(),
            job_id: self.id,
            seq: self.version + 1,
            at: crate::time::recorded(now),
            kind,
            output_tail,
        };
        self.apply(&event)?;
        Ok(event)
    }

    /// Gives the next attempt to `worker_id`. Only a queued job can be assigned.
    pub fn assign(
        &mut self,
        worker_id: WorkerId,
        now: DateTime<Utc>,
    ) -> Result<JobEvent, DomainError> {
        if self.state() != JobState::Queued {
            return Err(self.illegal("assign"));
        }
        let attempt = self.current_attempt().next();
        self.record(now, JobEventKind::Assigned { attempt, worker_id })
    }

    /// The worker started the attempt's process.
    pub fn start(
        &mut self,
        attempt: AttemptNumber,
        now: DateTime<Utc>,
    ) -> Result<JobEvent, DomainError> {
        if self.state().is_terminal() {
            return Err(self.illegal("start"));
        }
        self.fence(attempt)?;
        if self.state() != JobState::Assigned {
            return Err(self.illegal("start"));
        }
        let worker_id = self.worker_of_current()?;
        self.record(now, JobEventKind::Started { attempt, worker_id })
    }

    fn worker_of_current(&self) -> Result<WorkerId, DomainError> {
        self.attempts
            .last()
            .map(|a| a.worker_id.clone())
            .ok_or_else(|| self.illegal("report on"))
    }

    /// The current attempt ended with `outcome`. Decides what happens to the job: success,
    /// another attempt after the backoff (`jitter` in `[0, 1)`), or a terminal failure.
    pub fn finish(
        &mut self,
        attempt: AttemptNumber,
        outcome: AttemptOutcome,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> Result<JobEvent, DomainError> {
        self.finish_with_output(attempt, outcome, Vec::new(), now, jitter)
    }

    /// [`Job::finish`], keeping the attempt's last lines of output with its record.
    pub fn finish_with_output(
        &mut self,
        attempt: AttemptNumber,
        outcome: AttemptOutcome,
        output_tail: Vec<String>,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> Result<JobEvent, DomainError> {
        if self.state().is_terminal() {
            return Err(self.illegal("finish"));
        }
        self.fence(attempt)?;
        if !matches!(self.stage, Stage::OnWorker { .. }) {
            return Err(self.illegal("finish"));
        }
        let worker_id = self.worker_of_current()?;
        let worker = Some(worker_id.clone());
        // Only an attempt stopped by a signal counts as preempted; one that ended otherwise
        // meanwhile (succeeded, failed, timed out, lost its worker) ends as it did.
        let preempted = self.preempted_by().filter(|_| {
            matches!(
                outcome,
                AttemptOutcome::Cancelled | AttemptOutcome::Signalled { .. }
            )
        });
        let kind = if let (Some(by), false) = (preempted, self.cancel_requested()) {
            // Stopped for a job of a higher priority: queued again at once, no retry spent.
            JobEventKind::Requeued {
                attempt,
                worker_id,
                outcome: AttemptOutcome::Preempted { by },
                not_before: crate::time::recorded(now),
            }
        } else if self.cancel_requested() || outcome == AttemptOutcome::Cancelled {
            JobEventKind::Cancelled {
                attempt: Some(attempt),
                worker_id: worker,
                reason: format!("cancelled while on a worker ({outcome})"),
            }
        } else if outcome.is_success() {
            JobEventKind::Succeeded {
                attempt,
                worker_id,
                outcome,
            }
        } else if outcome == AttemptOutcome::TimedOut {
            JobEventKind::TimedOut {
                attempt,
                worker_id,
                outcome,
            }
        } else {
            let lost = matches!(outcome, AttemptOutcome::Lost { .. });
            // The attempt being finished is still counted as in flight; it is spent only when
            // its outcome is not a worker loss.
            let spent = self.spent_attempts() - u32::from(lost);
            let losses = self.lost_attempts() + u32::from(lost);
            if lost && losses >= MAX_LOST_ATTEMPTS {
                JobEventKind::Failed {
                    attempt: Some(attempt),
                    worker_id: worker,
                    reason: format!("lost its worker {losses} times; last: {outcome}"),
                    outcome: Some(outcome),
                }
            } else if lost || spent < self.spec.max_attempts {
                let delay = if lost {
                    std::time::Duration::ZERO
                } else {
                    self.spec.retry_backoff.delay(spent, jitter)
                };
                let not_before = crate::time::recorded(
                    now + ChronoDuration::from_std(delay).unwrap_or(ChronoDuration::zero()),
                );
                JobEventKind::Requeued {
                    attempt,
                    worker_id,
                    outcome,
                    not_before,
                }
            } else {
                JobEventKind::Failed {
                    attempt: Some(attempt),
                    worker_id: worker,
                    reason: format!("attempt {attempt} of {} {outcome}", self.spec.max_attempts),
                    outcome: Some(outcome),
                }
            }
        };
        self.record_with_tail(now, kind, output_tail)
    }

    /// Asks to cancel the job. A queued job is cancelled at once; a job on a worker is marked
    /// and its worker told to stop it (returns the `CancelRequested` event). Cancelling again
    /// while a cancel is pending returns `Ok(None)`.
    pub fn request_cancel(
        &mut self,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<JobEvent>, DomainError> {
        match self.stage {
            Stage::Queued { .. } => self
                .record(
                    now,
                    JobEventKind::Cancelled {
                        attempt: None,
                        worker_id: None,
                        reason: reason.to_owned(),
                    },
                )
                .map(Some),
            Stage::OnWorker {
                cancel_requested: true,
                ..
            } => Ok(None),
            Stage::OnWorker { .. } => self
                .record(
                    now,
                    JobEventKind::CancelRequested {
                        reason: reason.to_owned(),
                    },
                )
                .map(Some),
            _ => Err(self.illegal("cancel")),
        }
    }

    /// Asks to stop this job's attempt so that waiting job `by`, of a higher priority, can have
    /// its place. Only a job marked preemptible, on a worker, not being cancelled or preempted
    /// already. Its worker is told to stop it; when the attempt ends, the job is queued again
    /// at once with the outcome `preempted`, spending no retry.
    pub fn request_preemption(
        &mut self,
        by: JobId,
        now: DateTime<Utc>,
    ) -> Result<JobEvent, DomainError> {
        let stoppable = matches!(
            self.stage,
            Stage::OnWorker {
                cancel_requested: false,
                preempted_by: None,
                ..
            }
        );
        if !self.spec.preemptible || !stoppable {
            return Err(self.illegal("preempt"));
        }
        self.record(
            now,
            JobEventKind::PreemptRequested {
                by,
                reason: format!("preempted by job {by} of a higher priority"),
            },
        )
    }

    /// Fails a queued job that no worker can take (queue timeout), saying why.
    pub fn fail_unplaceable(
        &mut self,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<JobEvent, DomainError> {
        if self.state() != JobState::Queued {
            return Err(self.illegal("fail as unplaceable"));
        }
        self.record(
            now,
            JobEventKind::Failed {
                attempt: None,
                worker_id: None,
                outcome: None,
                reason: reason.to_owned(),
            },
        )
    }

    /// Fails the job because the command assigning `attempt` could not be delivered to its
    /// worker at all (the transport refused it, e.g. larger than the server allows): sending
    /// it again cannot help, so no retry is spent on it.
    pub fn fail_undeliverable(
        &mut self,
        attempt: AttemptNumber,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<JobEvent, DomainError> {
        if self.state() != JobState::Assigned {
            return Err(self.illegal("fail as undeliverable"));
        }
        self.fence(attempt)?;
        let worker_id = self.worker_of_current()?;
        self.record(
            now,
            JobEventKind::Failed {
                attempt: Some(attempt),
                worker_id: Some(worker_id),
                outcome: Some(AttemptOutcome::SpawnFailed {
                    reason: reason.to_owned(),
                }),
                reason: reason.to_owned(),
            },
        )
    }

    /// Applies an event to the state. Commands call this after checking; replay calls it
    /// directly, so it refuses events out of order or illegal for the state.
    pub fn apply(&mut self, event: &JobEvent) -> Result<(), DomainError> {
        if event.seq != self.version + 1 || event.job_id != self.id {
            return Err(DomainError::OutOfOrderEvent {
                job_id: self.id.to_string(),
                seq: event.seq,
                version: self.version,
            });
        }
        if self.state().is_terminal() {
            return Err(self.illegal("apply an event to"));
        }
        let at = event.at;
        match &event.kind {
            JobEventKind::Submitted { .. } => return Err(self.illegal("submit")),
            JobEventKind::Assigned { attempt, worker_id } => {
                self.stage = Stage::OnWorker {
                    running: false,
                    cancel_requested: false,
                    preempted_by: None,
                };
                self.reason = None;
                self.attempts.push(AttemptRecord {
                    attempt: *attempt,
                    worker_id: worker_id.clone(),
                    assigned_at: at,
                    started_at: None,
                    finished_at: None,
                    outcome: None,
                    output_tail: Vec::new(),
                });
            }
            JobEventKind::Started { .. } => {
                self.stage = Stage::OnWorker {
                    running: true,
                    cancel_requested: self.cancel_requested(),
                    preempted_by: self.preempted_by(),
                };
                if let Some(a) = self.attempts.last_mut() {
                    a.started_at = Some(at);
                }
            }
            JobEventKind::Requeued {
                outcome,
                not_before,
                ..
            } => {
                self.stage = Stage::Queued {
                    not_before: Some(*not_before),
                };
                self.reason = Some(format!("retrying: previous attempt {outcome}"));
                self.close_attempt(at, Some(outcome.clone()), &event.output_tail);
            }
            JobEventKind::Succeeded { outcome, .. } | JobEventKind::TimedOut { outcome, .. } => {
                let state = if matches!(event.kind, JobEventKind::Succeeded { .. }) {
                    JobState::Succeeded
                } else {
                    JobState::TimedOut
                };
                self.end(state);
                self.close_attempt(at, Some(outcome.clone()), &event.output_tail);
            }
            JobEventKind::Failed {
                outcome, reason, ..
            } => {
                self.end(JobState::Failed);
                self.reason = Some(reason.clone());
                if outcome.is_some() {
                    self.close_attempt(at, outcome.clone(), &event.output_tail);
                }
            }
            JobEventKind::PreemptRequested { by, reason } => {
                if let Stage::OnWorker { preempted_by, .. } = &mut self.stage {
                    *preempted_by = Some(*by);
                }
                self.reason = Some(reason.clone());
            }
            JobEventKind::CancelRequested { reason } => {
                if let Stage::OnWorker {
                    cancel_requested, ..
                } = &mut self.stage
                {
                    *cancel_requested = true;
                }
                self.reason = Some(reason.clone());
            }
            JobEventKind::Cancelled {
                attempt, reason, ..
            } => {
                self.stage = Stage::Ended {
                    state: JobState::Cancelled,
                    cancel_requested: true,
                };
                self.reason = Some(reason.clone());
                if attempt.is_some() {
                    self.close_attempt(at, Some(AttemptOutcome::Cancelled), &event.output_tail);
                }
            }
        }
        self.version = event.seq;
        self.updated_at = at;
        Ok(())
    }

    /// Ends the job in `state`, keeping whether a cancel had been asked for.
    fn end(&mut self, state: JobState) {
        self.stage = Stage::Ended {
            state,
            cancel_requested: self.cancel_requested(),
        };
    }

    fn close_attempt(
        &mut self,
        at: DateTime<Utc>,
        outcome: Option<AttemptOutcome>,
        tail: &[String],
    ) {
        if let Some(a) = self.attempts.last_mut() {
            a.finished_at = Some(at);
            a.output_tail = tail.to_vec();
            a.outcome = outcome;
        }
    }

    /// The attempt id of the current attempt, if any.
    pub fn current_attempt_id(&self) -> Option<AttemptId> {
        self.attempts
            .last()
            .map(|a| AttemptId::new(self.id, a.attempt))
    }

    /// Stores why a queued job is still waiting (not an event: it changes often).
    pub fn set_pending_reason(&mut self, reason: Option<String>) {
        if let Stage::Queued { .. } = self.stage {
            self.reason = reason;
        }
    }
}

fn count<I: Iterator>(iter: I) -> u32 {
    u32::try_from(iter.count()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSpecDraft;

    fn job(max_attempts: u32) -> Job {
        let mut d = JobSpecDraft::exec("t", &["true"]);
        d.max_attempts = max_attempts;
        let spec = JobSpec::try_from(d).unwrap();
        Job::submit(JobId::new(), TenantId::default(), spec, Utc::now()).0
    }

    fn w(name: &str) -> WorkerId {
        name.parse().unwrap()
    }

    /// A preemptible job stopped for another is queued again at once, spending no retry; a
    /// job not marked preemptible, or already being cancelled, cannot be preempted.
    #[test]
    fn a_preempted_attempt_is_requeued_without_spending_a_retry() {
        let now = Utc::now();
        let by = JobId::new();
        let mut plain = job(1);
        plain.assign(w("a"), now).unwrap();
        plain.start(AttemptNumber::new(1), now).unwrap();
        assert!(plain.request_preemption(by, now).is_err());

        let mut d = JobSpecDraft::exec("t", &["true"]);
        d.preemptible = true;
        let mut j = Job::submit(
            JobId::new(),
            TenantId::default(),
            JobSpec::try_from(d).unwrap(),
            now,
        )
        .0;
        assert!(j.request_preemption(by, now).is_err(), "not on a worker");
        j.assign(w("a"), now).unwrap();
        j.start(AttemptNumber::new(1), now).unwrap();
        j.request_preemption(by, now).unwrap();
        assert_eq!(j.preempted_by(), Some(by));
        assert!(j.request_preemption(by, now).is_err(), "once only");
        let event = j
            .finish(AttemptNumber::new(1), AttemptOutcome::Cancelled, now, 0.5)
            .unwrap();
        assert!(
            matches!(
                event.kind,
                JobEventKind::Requeued {
                    outcome: AttemptOutcome::Preempted { by: b },
                    not_before,
                    ..
                } if b == by && not_before <= crate::time::recorded(now)
            ),
            "{event:?}"
        );
        assert_eq!((j.state(), j.preempted_by()), (JobState::Queued, None));
        // With one attempt allowed, it was queued again all the same, and runs to its end.
        j.assign(w("b"), now).unwrap();
        j.start(AttemptNumber::new(2), now).unwrap();
        j.finish(
            AttemptNumber::new(2),
            AttemptOutcome::Exited { code: 0 },
            now,
            0.0,
        )
        .unwrap();
        assert_eq!(j.state(), JobState::Succeeded);
        // A cancel asked while a preemption is pending ends the job.
        let mut cancelled = Job::submit(JobId::new(), TenantId::default(), j.spec().clone(), now).0;
        cancelled.assign(w("a"), now).unwrap();
        cancelled.request_preemption(by, now).unwrap();
        cancelled.request_cancel("stop", now).unwrap();
        cancelled
            .finish(AttemptNumber::new(1), AttemptOutcome::Cancelled, now, 0.0)
            .unwrap();
        assert_eq!(cancelled.state(), JobState::Cancelled, "a cancel wins");
    }

    /// What only one stage has stays with it: a retry's `not_before` only while queued, a
    /// pending cancel only on a worker and, once it ended, whether one was asked for.
    #[test]
    fn each_stage_carries_only_its_own_data() {
        let now = Utc::now();
        let mut j = job(2);
        j.assign(w("a"), now).unwrap();
        j.finish(
            AttemptNumber::new(1),
            AttemptOutcome::Exited { code: 3 },
            now,
            0.5,
        )
        .unwrap();
        assert_eq!(j.state(), JobState::Queued);
        assert!(j.not_before().is_some());
        j.assign(w("b"), now).unwrap();
        assert_eq!(j.not_before(), None, "a job on a worker waits for nothing");
        j.start(AttemptNumber::new(2), now).unwrap();
        assert!(!j.cancel_requested());
        j.request_cancel("stop", now).unwrap().unwrap();
        assert!(j.cancel_requested());
        assert_eq!(j.state(), JobState::Running);
        assert_eq!(j.request_cancel("again", now).unwrap(), None);
        j.finish(
            AttemptNumber::new(2),
            AttemptOutcome::Exited { code: 0 },
            now,
            0.0,
        )
        .unwrap();
        assert_eq!(j.state(), JobState::Cancelled);
        assert!(
            j.cancel_requested(),
            "an ended job keeps that a cancel was asked for"
        );

        // A queued job that is cancelled ends waiting for nothing.
        let mut q = job(2);
        q.assign(w("a"), now).unwrap();
        q.finish(
            AttemptNumber::new(1),
            AttemptOutcome::Exited { code: 3 },
            now,
            0.5,
        )
        .unwrap();
        q.request_cancel("stop", now).unwrap().unwrap();
        assert_eq!((q.state(), q.not_before()), (JobState::Cancelled, None));

        // A stored row is read back into the stage it describes; what another stage would
        // hold is dropped.
        let restore = |state| {
            Job::restore(
                j.id(),
                j.tenant().clone(),
                j.spec().clone(),
                state,
                Vec::new(),
                true,
                Some(now),
                None,
                now,
                now,
                1,
            )
        };
        let restored = restore(JobState::Queued);
        assert!(!restored.cancel_requested());
        assert_eq!(restored.not_before(), Some(now));
        let ended = restore(JobState::Failed);
        assert!(ended.cancel_requested());
        assert_eq!(ended.not_before(), None);
    }

    #[test]
    fn happy_path_succeeds() {
        let mut j = job(1);
        let now = Utc::now();
        j.assign(w("a"), now).unwrap();
        j.start(AttemptNumber::new(1), now).unwrap();
        let e = j
            .finish(
                AttemptNumber::new(1),
                AttemptOutcome::Exited { code: 0 },
                now,
                0.0,
            )
            .unwrap();
        assert_eq!(e.kind.name(), "succeeded");
        assert_eq!(j.state(), JobState::Succeeded);
        assert_eq!(j.version(), 4);
        assert!(j.assign(w("a"), now).is_err());
    }

    #[test]
    fn failures_retry_until_the_budget_is_spent() {
        let mut j = job(2);
        let now = Utc::now();
        j.assign(w("a"), now).unwrap();
        let e = j
            .finish(
                AttemptNumber::new(1),
                AttemptOutcome::Exited { code: 3 },
                now,
                0.0,
            )
            .unwrap();
        assert_eq!(e.kind.name(), "requeued");
        assert_eq!(j.state(), JobState::Queued);
        j.assign(w("b"), now).unwrap();
        assert!(matches!(
            j.finish(
                AttemptNumber::new(1),
                AttemptOutcome::Exited { code: 0 },
                now,
                0.0
            ),
            Err(DomainError::StaleAttempt { got: 1, current: 2 })
        ));
        j.finish(
            AttemptNumber::new(2),
            AttemptOutcome::Exited { code: 3 },
            now,
            0.0,
        )
        .unwrap();
        assert_eq!(j.state(), JobState::Failed);
        assert_eq!(j.exit_code(), Some(3));
    }

    #[test]
    fn an_undeliverable_assignment_fails_the_job_without_retry() {
        let now = Utc::now();
        let mut draft = crate::spec::JobSpecDraft::exec("big", &["true"]);
        draft.max_attempts = 3;
        let (mut j, _) = Job::submit(
            JobId::new(),
            TenantId::default(),
            JobSpec::try_from(draft).unwrap(),
            now,
        );
        j.assign(w("a"), now).unwrap();
        let attempt = j.current_attempt();
        let event = j
            .fail_undeliverable(attempt, "assign command too large", now)
            .unwrap();
        assert_eq!(event.kind.name(), "failed");
        assert_eq!(j.state(), JobState::Failed);
        assert_eq!(j.reason(), Some("assign command too large"));
        assert!(j.fail_undeliverable(attempt, "again", now).is_err());
    }

    #[test]
    fn lost_workers_do_not_spend_retries() {
        let mut j = job(1);
        let now = Utc::now();
        for n in 1..MAX_LOST_ATTEMPTS {
            j.assign(w("a"), now).unwrap();
            j.finish(
                AttemptNumber::new(n),
                AttemptOutcome::Lost {
                    reason: "gone".into(),
                },
                now,
                0.0,
            )
            .unwrap();
            assert_eq!(j.state(), JobState::Queued);
        }
        j.assign(w("a"), now).unwrap();
        j.finish(
            AttemptNumber::new(MAX_LOST_ATTEMPTS),
            AttemptOutcome::Lost {
                reason: "gone".into(),
            },
            now,
            0.0,
        )
        .unwrap();
        assert_eq!(j.state(), JobState::Failed);
    }

    #[test]
    fn cancel_paths() {
        let now = Utc::now();
        let mut queued = job(1);
        assert_eq!(
            queued
                .request_cancel("user", now)
                .unwrap()
                .unwrap()
                .kind
                .name(),
            "cancelled"
        );
        assert!(queued.request_cancel("user", now).is_err());

        let mut running = job(3);
        running.assign(w("a"), now).unwrap();
        running.start(AttemptNumber::new(1), now).unwrap();
        assert_eq!(
            running
                .request_cancel("user", now)
                .unwrap()
                .unwrap()
                .kind
                .name(),
            "cancel_requested"
        );
        assert!(running.request_cancel("user", now).unwrap().is_none());
        running
            .finish(
                AttemptNumber::new(1),
                AttemptOutcome::Signalled { signal: 15 },
                now,
                0.0,
            )
            .unwrap();
        assert_eq!(running.state(), JobState::Cancelled);
    }

    #[test]
    fn replay_rebuilds_the_same_job() {
        let mut events = Vec::new();
        let mut d = JobSpecDraft::exec("t", &["true"]);
        d.max_attempts = 2;
        let now = Utc::now();
        let (mut j, e) = Job::submit(
            JobId::new(),
            TenantId::default(),
            JobSpec::try_from(d).unwrap(),
            now,
        );
        events.push(e);
        events.push(j.assign(w("a"), now).unwrap());
        events.push(j.start(AttemptNumber::new(1), now).unwrap());
        events.push(
            j.finish(
                AttemptNumber::new(1),
                AttemptOutcome::Exited { code: 1 },
                now,
                0.3,
            )
            .unwrap(),
        );
        events.push(j.assign(w("b"), now).unwrap());
        assert_eq!(Job::from_events(&events).unwrap(), j);
        let mut shuffled = events.clone();
        shuffled.swap(1, 2);
        assert!(Job::from_events(&shuffled).is_err());
    }
}
