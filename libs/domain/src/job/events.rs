//! A job's events: one for every state change. They are appended to the job event store (the
//! audit trail) and published, wrapped in an envelope, for people and services to watch.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AttemptOutcome;
use crate::ids::{AttemptNumber, JobId, TenantId, WorkerId};
use crate::spec::JobSpec;

/// Something that happened to a job, at position `seq` (1-based) of its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub event_id: Uuid,
    pub job_id: JobId,
    pub seq: u64,
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: JobEventKind,
    /// For events that end an attempt: the attempt's last lines of output, for a quick look.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_tail: Vec<String>,
}

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEventKind {
    /// The job was accepted and queued.
    Submitted {
        tenant: TenantId,
        spec: Box<JobSpec>,
    },
    /// An attempt was given to a worker.
    Assigned {
        attempt: AttemptNumber,
        worker_id: WorkerId,
    },
    /// The worker started the attempt's process.
    Started {
        attempt: AttemptNumber,
        worker_id: WorkerId,
    },
    /// An attempt ended without success and the job was queued again for another attempt.
    Requeued {
        attempt: AttemptNumber,
        worker_id: WorkerId,
        outcome: AttemptOutcome,
        #[serde(with = "crate::time::rfc3339")]
        not_before: DateTime<Utc>,
    },
    /// The job ended successfully.
    Succeeded {
        attempt: AttemptNumber,
        worker_id: WorkerId,
        outcome: AttemptOutcome,
    },
    /// The job ended in failure, for good.
    Failed {
        attempt: Option<AttemptNumber>,
        worker_id: Option<WorkerId>,
        outcome: Option<AttemptOutcome>,
        reason: String,
    },
    /// The job ran past its timeout and was stopped.
    TimedOut {
        attempt: AttemptNumber,
        worker_id: WorkerId,
        outcome: AttemptOutcome,
    },
    /// Somebody asked to cancel a job that is on a worker; the worker is told to stop it.
    CancelRequested { reason: String },
    /// The scheduler is stopping this preemptible job's attempt for waiting job `by`, of a
    /// higher priority; the worker is told to stop it.
    PreemptRequested { by: JobId, reason: String },
    /// The job was cancelled.
    Cancelled {
        attempt: Option<AttemptNumber>,
        worker_id: Option<WorkerId>,
        reason: String,
    },
}

impl JobEventKind {
    /// The event's name: the last token of its subject and the suffix of its envelope type.
    pub fn name(&self) -> &'static str {
        match self {
            JobEventKind::Submitted { .. } => "submitted",
            JobEventKind::Assigned { .. } => "assigned",
            JobEventKind::Started { .. } => "started",
            JobEventKind::Requeued { .. } => "requeued",
            JobEventKind::Succeeded { .. } => "succeeded",
            JobEventKind::Failed { .. } => "failed",
            JobEventKind::TimedOut { .. } => "timed_out",
            JobEventKind::CancelRequested { .. } => "cancel_requested",
            JobEventKind::PreemptRequested { .. } => "preempt_requested",
            JobEventKind::Cancelled { .. } => "cancelled",
        }
    }

    /// Whether the job's life ends with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEventKind::Succeeded { .. }
                | JobEventKind::Failed { .. }
                | JobEventKind::TimedOut { .. }
                | JobEventKind::Cancelled { .. }
        )
    }
}
