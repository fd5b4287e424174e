//! Domain <-> wire conversions.

use chrono::{DateTime, Utc};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptOutcome, AttemptRecord, Backoff, Command, HeldAttempt, Job, JobEvent, JobEventKind,
    JobSpec, JobState, ResourceUsage, Resources, Worker, WorkerStatus,
};

use crate::v1 as pb;

/// A chrono time as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

impl From<pb::JobSpec> for JobSpecDraft {
    /// Wire zero values become the documented defaults; the draft is then validated by
    /// `JobSpec::try_from`. A spec without a command becomes an empty argv, which validation
    /// reports as `command.argv`.
    fn from(w: pb::JobSpec) -> Self {
        let defaults = JobSpecDraft::exec("", &[]);
        let command = match w.command {
            Some(pb::job_spec::Command::Exec(e)) => Command::Exec { argv: e.argv },
            Some(pb::job_spec::Command::Script(s)) => Command::Script {
                interpreter: s.interpreter,
                script: s.script,
            },
            None => Command::Exec { argv: Vec::new() },
        };
        JobSpecDraft {
            name: w.name,
            command,
            env: w.env.into_iter().collect(),
            secret_env: w.secret_env.into_iter().collect(),
            working_dir: Some(w.working_dir).filter(|s| !s.is_empty()),
            timeout_secs: if w.timeout_secs == 0 {
                defaults.timeout_secs
            } else {
                w.timeout_secs
            },
            resources: w
                .resources
                .map(|r| Resources::new(r.cpu_millis, r.memory_mb))
                .unwrap_or_default(),
            required_labels: w.required_labels.into_iter().collect(),
            priority: w.priority,
            max_attempts: if w.max_attempts == 0 {
                defaults.max_attempts
            } else {
                w.max_attempts
            },
            retry_backoff: w
                .retry_backoff
                .map(|b| Backoff {
                    initial_ms: b.initial_ms,
                    max_ms: b.max_ms,
                })
                .unwrap_or_default(),
            idempotency_key: Some(w.idempotency_key).filter(|s| !s.is_empty()),
            labels: w.labels.into_iter().collect(),
            requeue_when_unreachable: w.requeue_when_unreachable,
            preemptible: w.preemptible,
            artifacts: None,
        }
    }
}

impl From<&JobSpec> for pb::JobSpec {
    /// The spec as the API shows it: secret values masked.
    fn from(s: &JobSpec) -> Self {
        draft_to_wire(&s.redacted())
    }
}

/// A job spec's fields in wire form, as they are (no masking, no validation).
pub(crate) fn draft_to_wire(s: &JobSpecDraft) -> pb::JobSpec {
    {
        let command = match &s.command {
            Command::Exec { argv } => {
                pb::job_spec::Command::Exec(pb::ExecCommand { argv: argv.clone() })
            }
            Command::Script {
                interpreter,
                script,
            } => pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: interpreter.clone(),
                script: script.clone(),
            }),
        };
        pb::JobSpec {
            name: s.name.clone(),
            command: Some(command),
            env: s.env.clone().into_iter().collect(),
            secret_env: s.secret_env.iter().cloned().collect(),
            working_dir: s.working_dir.clone().unwrap_or_default(),
            timeout_secs: s.timeout_secs,
            resources: Some(resources(s.resources)),
            required_labels: s.required_labels.clone().into_iter().collect(),
            priority: s.priority,
            max_attempts: s.max_attempts,
            retry_backoff: Some(pb::Backoff {
                initial_ms: s.retry_backoff.initial_ms,
                max_ms: s.retry_backoff.max_ms,
            }),
            idempotency_key: s.idempotency_key.clone().unwrap_or_default(),
            labels: s.labels.clone().into_iter().collect(),
            requeue_when_unreachable: s.requeue_when_unreachable,
            preemptible: s.preemptible,
        }
    }
}

fn resources(r: Resources) -> pb::Resources {
    pb::Resources {
        cpu_millis: r.cpu_millis,
        memory_mb: r.memory_mb,
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => pb::JobState::Queued,
            JobState::Assigned => pb::JobState::Assigned,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
            JobState::TimedOut => pb::JobState::TimedOut,
        }
    }
}

/// The domain state of a wire state; `None` for UNSPECIFIED or unknown values.
pub fn state_from_wire(value: i32) -> Option<JobState> {
    match pb::JobState::try_from(value).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Assigned => Some(JobState::Assigned),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
        pb::JobState::TimedOut => Some(JobState::TimedOut),
    }
}

impl From<&AttemptOutcome> for pb::AttemptOutcome {
    fn from(o: &AttemptOutcome) -> Self {
        use pb::attempt_outcome::Kind;
        let kind = match o {
            AttemptOutcome::Exited { code } => Kind::Exited(*code),
            AttemptOutcome::Signalled { signal } => Kind::Signalled(*signal),
            AttemptOutcome::TimedOut => Kind::TimedOut(true),
            AttemptOutcome::Cancelled => Kind::Cancelled(true),
            AttemptOutcome::SpawnFailed { reason } => Kind::SpawnFailed(reason.clone()),
            AttemptOutcome::Lost { reason } => Kind::Lost(reason.clone()),
            AttemptOutcome::ArtifactsFailed { reason } => Kind::ArtifactsFailed(reason.clone()),
            AttemptOutcome::Preempted { by } => Kind::Preempted(by.to_string()),
        };
        pb::AttemptOutcome { kind: Some(kind) }
    }
}

impl From<&AttemptRecord> for pb::Attempt {
    fn from(a: &AttemptRecord) -> Self {
        pb::Attempt {
            attempt: a.attempt.get(),
            worker_id: a.worker_id.to_string(),
            assigned_at: Some(timestamp(a.assigned_at)),
            started_at: a.started_at.map(timestamp),
            finished_at: a.finished_at.map(timestamp),
            outcome: a.outcome.as_ref().map(Into::into),
            output_tail: a.output_tail.clone(),
            output_tail_omitted: false,
        }
    }
}

impl From<&Job> for pb::Job {
    fn from(j: &Job) -> Self {
        pb::Job {
            id: j.id().to_string(),
            tenant: j.tenant().to_string(),
            spec: Some(j.spec().into()),
            state: pb::JobState::from(j.state()).into(),
            attempts: j.attempts().iter().map(Into::into).collect(),
            cancel_requested: j.cancel_requested(),
            reason: j.reason().unwrap_or_default().to_owned(),
            exit_code: j.exit_code(),
            created_at: Some(timestamp(j.created_at())),
            updated_at: Some(timestamp(j.updated_at())),
            version: j.version(),
            not_before: j.not_before().map(timestamp),
            archived_at: None,
            attempts_omitted: 0,
        }
    }
}

/// A job event on the wire, with the state the job is in after it (`current` for events that
/// do not change the state, such as `cancel_requested`).
pub fn job_event_to_wire(e: &JobEvent, current: JobState) -> pb::JobEvent {
    let mut out = pb::JobEvent {
        job_id: e.job_id.to_string(),
        seq: e.seq,
        at: Some(timestamp(e.at)),
        r#type: e.kind.name().to_owned(),
        // Serialising an event cannot fail: every map in it has string keys.
        data: serde_json::to_string(e).unwrap_or_default(),
        ..Default::default()
    };
    let state = match &e.kind {
        JobEventKind::Submitted { .. } => JobState::Queued,
        JobEventKind::Assigned { attempt, worker_id } => {
            out.attempt = attempt.get();
            out.worker_id = worker_id.to_string();
            JobState::Assigned
        }
        JobEventKind::Started { attempt, worker_id } => {
            out.attempt = attempt.get();
            out.worker_id = worker_id.to_string();
            JobState::Running
        }
        JobEventKind::Requeued {
            attempt,
            worker_id,
            outcome,
            ..
        } => {
            out.attempt = attempt.get();
            out.worker_id = worker_id.to_string();
            out.outcome = Some(outcome.into());
            JobState::Queued
        }
        JobEventKind::Succeeded {
            attempt,
            worker_id,
            outcome,
        }
        | JobEventKind::TimedOut {
            attempt,
            worker_id,
            outcome,
        } => {
            out.attempt = attempt.get();
            out.worker_id = worker_id.to_string();
            out.outcome = Some(outcome.into());
            if matches!(e.kind, JobEventKind::Succeeded { .. }) {
                JobState::Succeeded
            } else {
                JobState::TimedOut
            }
        }
        JobEventKind::Failed {
            attempt,
            worker_id,
            outcome,
            reason,
        } => {
            out.attempt = attempt.map_or(0, |a| a.get());
            out.worker_id = worker_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            out.outcome = outcome.as_ref().map(Into::into);
            out.reason = reason.clone();
            JobState::Failed
        }
        JobEventKind::CancelRequested { reason }
        | JobEventKind::PreemptRequested { reason, .. } => {
            out.reason = reason.clone();
            current
        }
        JobEventKind::Cancelled {
            attempt,
            worker_id,
            reason,
        } => {
            out.attempt = attempt.map_or(0, |a| a.get());
            out.worker_id = worker_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            out.reason = reason.clone();
            JobState::Cancelled
        }
    };
    out.state = pb::JobState::from(state).into();
    out
}

impl From<WorkerStatus> for pb::WorkerStatus {
    fn from(s: WorkerStatus) -> Self {
        match s {
            WorkerStatus::Ready => pb::WorkerStatus::Ready,
            WorkerStatus::Draining => pb::WorkerStatus::Draining,
            WorkerStatus::Unreachable => pb::WorkerStatus::Unreachable,
            WorkerStatus::Lost => pb::WorkerStatus::Lost,
            WorkerStatus::Offline => pb::WorkerStatus::Offline,
        }
    }
}

/// The domain status of a wire status; `None` for UNSPECIFIED or unknown values.
pub fn status_from_wire(value: i32) -> Option<WorkerStatus> {
    match pb::WorkerStatus::try_from(value).ok()? {
        pb::WorkerStatus::Unspecified => None,
        pb::WorkerStatus::Ready => Some(WorkerStatus::Ready),
        pb::WorkerStatus::Draining => Some(WorkerStatus::Draining),
        pb::WorkerStatus::Unreachable => Some(WorkerStatus::Unreachable),
        pb::WorkerStatus::Lost => Some(WorkerStatus::Lost),
        pb::WorkerStatus::Offline => Some(WorkerStatus::Offline),
    }
}

impl From<&HeldAttempt> for pb::HeldAttempt {
    fn from(h: &HeldAttempt) -> Self {
        pb::HeldAttempt {
            job_id: h.attempt.job_id.to_string(),
            attempt: h.attempt.attempt.get(),
            resources: Some(resources(h.resources)),
            since: Some(timestamp(h.since)),
        }
    }
}

fn usage(u: ResourceUsage) -> pb::ResourceUsage {
    pb::ResourceUsage {
        cpu_percent: u.cpu_percent,
        memory_used_mb: u.memory_used_mb,
        memory_total_mb: u.memory_total_mb,
        load_1m: u.load_1m,
    }
}

impl From<&Worker> for pb::Worker {
    fn from(w: &Worker) -> Self {
        pb::Worker {
            id: w.id().to_string(),
            labels: w.labels().clone().into_iter().collect(),
            capacity: Some(resources(w.capacity())),
            max_concurrent_jobs: w.max_concurrent_jobs(),
            status: pb::WorkerStatus::from(w.status()).into(),
            held: w.held().iter().map(Into::into).collect(),
            usage: Some(usage(w.usage())),
            registered_at: Some(timestamp(w.registered_at())),
            last_heartbeat_at: Some(timestamp(w.last_heartbeat_at())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_the_wire() {
        let mut d = JobSpecDraft::exec("x", &["echo", "hi"]);
        d.required_labels.insert("gpu".into(), "true".into());
        d.idempotency_key = Some("k".into());
        let spec = JobSpec::try_from(d.clone()).unwrap();
        let wire = pb::JobSpec::from(&spec);
        assert_eq!(JobSpecDraft::from(wire), d);
    }

    #[test]
    fn wire_zero_values_get_defaults() {
        let draft = JobSpecDraft::from(pb::JobSpec {
            name: "n".into(),
            command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
                argv: vec!["true".into()],
            })),
            ..Default::default()
        });
        let spec = JobSpec::try_from(draft).unwrap();
        assert_eq!(spec.timeout_secs, 3600);
        assert_eq!(spec.max_attempts, 1);
    }
}
