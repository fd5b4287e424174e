//! One attempt of a job: how it ended and its record in the job's history.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AttemptNumber, JobId, WorkerId};

/// How an attempt ended, as the agent (or the liveness checks) saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The process exited with this code.
    Exited { code: i32 },
    /// The process was killed by this signal (not by us).
    Signalled { signal: i32 },
    /// The process ran past the job's timeout and was killed.
    TimedOut,
    /// The process was stopped because the job was cancelled.
    Cancelled,
    /// The process could not be started.
    SpawnFailed { reason: String },
    /// The worker running the attempt was lost (infrastructure failure).
    Lost { reason: String },
    /// The process exited 0 but the step's artifacts could not be kept.
    ArtifactsFailed { reason: String },
    /// Stopped so that job `by`, of a higher priority, could have its place; the job was
    /// queued again without spending a retry.
    Preempted { by: JobId },
}

impl AttemptOutcome {
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            AttemptOutcome::Exited { code } => Some(*code),
            _ => None,
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, AttemptOutcome::Exited { code: 0 })
    }
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptOutcome::Exited { code } => write!(f, "exited with code {code}"),
            AttemptOutcome::Signalled { signal } => write!(f, "killed by signal {signal}"),
            AttemptOutcome::TimedOut => f.write_str("timed out"),
            AttemptOutcome::Cancelled => f.write_str("cancelled"),
            AttemptOutcome::SpawnFailed { reason } => write!(f, "failed to start: {reason}"),
            AttemptOutcome::Lost { reason } => write!(f, "worker lost: {reason}"),
            AttemptOutcome::ArtifactsFailed { reason } => {
                write!(f, "failed to keep artifacts: {reason}")
            }
            AttemptOutcome::Preempted { by } => write!(f, "preempted by job {by}"),
        }
    }
}

/// One attempt in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: AttemptNumber,
    pub worker_id: WorkerId,
    #[serde(with = "crate::time::rfc3339")]
    pub assigned_at: DateTime<Utc>,
    #[serde(default, with = "crate::time::rfc3339::option")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::rfc3339::option")]
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<AttemptOutcome>,
    /// The attempt's last lines of output, as its agent reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_tail: Vec<String>,
}
