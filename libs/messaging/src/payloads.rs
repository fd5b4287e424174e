//! The JSON payloads carried on Hodei's subjects, and [`Outgoing`]: a message ready to be
//! stored in the outbox and relayed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hodei_domain::{
    AttemptId, AttemptNumber, AttemptOutcome, JobEvent, JobId, JobSpec, ResourceUsage, Resources,
    WorkerEvent, WorkerId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::subjects;
use crate::trace::{self, TraceHeaders};

/// A job that needs placing, on the work queue. `attempt` is the job's current attempt
/// number when it was queued: a scheduler that finds the job moved on drops the item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceJob {
    pub job_id: JobId,
    pub attempt: AttemptNumber,
    /// The job's priority, so a scheduler can take the most urgent of a batch first.
    pub priority: i32,
    pub not_before: Option<DateTime<Utc>>,
}

/// A command for one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentCommand {
    /// Run this attempt.
    Assign {
        job_id: JobId,
        attempt: AttemptNumber,
        spec: Box<JobSpec>,
        assigned_at: DateTime<Utc>,
    },
    /// Stop this attempt (SIGTERM, then SIGKILL after the grace period).
    Cancel {
        job_id: JobId,
        attempt: AttemptNumber,
        reason: String,
    },
    /// Stop taking work, let running attempts finish, then exit (as on SIGTERM).
    Drain { reason: String },
}

/// What an agent says about an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Unique per report: redelivered reports are recognised by it.
    pub report_id: Uuid,
    pub worker_id: WorkerId,
    pub job_id: JobId,
    pub attempt: AttemptNumber,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: ReportKind,
}

/// The report itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReportKind {
    /// The process is running.
    Started { pid: u32 },
    /// The attempt ended; `tail` holds its last lines of output.
    Finished {
        outcome: AttemptOutcome,
        tail: Vec<String>,
    },
}

/// An agent's periodic sign of life, with what it has and holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: WorkerId,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub max_concurrent_jobs: u32,
    pub usage: ResourceUsage,
    /// Attempts running on the agent now.
    pub running: Vec<AttemptId>,
    pub draining: bool,
    /// The agent's last beat before it exits: the worker goes offline (not lost).
    #[serde(default)]
    pub leaving: bool,
    pub sent_at: DateTime<Utc>,
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStreamKind {
    Stdout,
    Stderr,
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Per attempt, from 1, in the order the agent read the lines.
    pub seq: u64,
    pub stream: LogStreamKind,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// A batch of a job's output lines; `eof` marks the attempt's last batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    pub job_id: JobId,
    pub attempt: AttemptNumber,
    pub lines: Vec<LogEntry>,
    pub eof: bool,
}

/// A message ready for the outbox: subject, JSON payload, the de-duplication id and the trace
/// context of the span it was created in (so its consumer continues that trace).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub id: Uuid,
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: TraceHeaders,
}

impl Outgoing {
    /// A job event, in its envelope, on `hodei.v1.evt.job.<id>.<event>`.
    pub fn job_event(event: &JobEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.event_id,
            subject: subjects::job_event(&event.job_id, event.kind.name()),
            payload: serde_json::to_vec(&Envelope::for_job(event, source)?)?,
            headers: trace::current(),
        })
    }

    /// A pipeline run's event, in its envelope, on `hodei.v1.evt.pipeline.<id>.<event>`.
    pub fn pipeline_event(
        event: &hodei_domain::PipelineEvent,
        source: &str,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.event_id,
            subject: subjects::pipeline_event(&event.run_id, event.kind.name()),
            payload: serde_json::to_vec(&Envelope::for_pipeline(event, source)?)?,
            headers: trace::current(),
        })
    }

    /// A worker event, in its envelope, on `hodei.v1.evt.worker.<id>.<event>`.
    pub fn worker_event(event: &WorkerEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.event_id,
            subject: subjects::worker_event(&event.worker_id, event.kind.name()),
            payload: serde_json::to_vec(&Envelope::for_worker(event, source)?)?,
            headers: trace::current(),
        })
    }

    /// A work item asking a scheduler to place the job.
    pub fn place_job(item: &PlaceJob) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: Uuid::now_v7(),
            subject: subjects::place_job(&item.job_id),
            payload: serde_json::to_vec(item)?,
            headers: trace::current(),
        })
    }

    /// A command for an agent.
    pub fn agent_command(worker: &WorkerId, cmd: &AgentCommand) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: Uuid::now_v7(),
            subject: subjects::agent_commands(worker),
            payload: serde_json::to_vec(cmd)?,
            headers: trace::current(),
        })
    }
}
