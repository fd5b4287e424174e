//! The JSON payloads carried on Hodei's subjects, and [`Outgoing`]: a message ready to be
//! stored in the outbox and relayed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hodei_domain::text;
use hodei_domain::{
    AttemptId, AttemptNumber, AttemptOutcome, IncarnationId, JobEvent, JobId, JobSpec,
    ResourceUsage, Resources, WorkerEvent, WorkerId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::OutgoingEnvelope;
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
    #[serde(default, with = "hodei_domain::time::rfc3339::option")]
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
        #[serde(with = "hodei_domain::time::rfc3339")]
        assigned_at: DateTime<Utc>,
        /// The agent incarnation the attempt was placed with: another incarnation of the
        /// same worker (the agent restarted meanwhile) must not run it, since the registry
        /// hands such attempts back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incarnation: Option<IncarnationId>,
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

/// What an agent says about an attempt, on `hodei.v1.report.<worker_id>.<job_id>`: the
/// subject names the sender, so a NATS credential can bind it, and a report counts only when
/// subject, payload and the attempt's worker agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Unique per report: redelivered reports are recognised by it.
    pub report_id: Uuid,
    pub worker_id: WorkerId,
    pub job_id: JobId,
    pub attempt: AttemptNumber,
    #[serde(with = "hodei_domain::time::rfc3339")]
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

impl AgentReport {
    /// Lines of output a `Finished` report keeps: the last ones.
    pub const TAIL_LINES: usize = 20;
    /// Longest line of a report's tail, in bytes: the report must fit in one NATS message.
    pub const MAX_TAIL_LINE_BYTES: usize = 4 * 1024;
    /// Longest reason an outcome carries, in bytes.
    pub const MAX_REASON_BYTES: usize = 4 * 1024;

    /// Makes what the agent wrote storable as it is recorded: the tail's last
    /// [`Self::TAIL_LINES`] lines, and each line and an outcome's reason cut to its bound and
    /// with no NUL character (a job may print one; PostgreSQL would refuse it, and with it the
    /// batch of reports the line was recorded in).
    pub fn make_storable(&mut self) {
        let ReportKind::Finished { outcome, tail } = &mut self.kind else {
            return;
        };
        if tail.len() > Self::TAIL_LINES {
            tail.drain(..tail.len() - Self::TAIL_LINES);
        }
        for line in tail.iter_mut() {
            text::make_storable(line, Self::MAX_TAIL_LINE_BYTES);
        }
        match outcome {
            AttemptOutcome::SpawnFailed { reason }
            | AttemptOutcome::Lost { reason }
            | AttemptOutcome::ArtifactsFailed { reason } => {
                text::make_storable(reason, Self::MAX_REASON_BYTES);
            }
            AttemptOutcome::Exited { .. }
            | AttemptOutcome::Signalled { .. }
            | AttemptOutcome::TimedOut
            | AttemptOutcome::Cancelled
            | AttemptOutcome::Preempted { .. } => {}
        }
    }
}

/// An agent's periodic sign of life, with what it has and holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: WorkerId,
    /// New at every agent start: a change tells the registry the previous process is gone.
    pub incarnation: IncarnationId,
    /// How long the agent keeps running attempts without reaching NATS, in milliseconds.
    pub lease_ms: u64,
    /// How long the agent gives a stopped attempt between SIGTERM and SIGKILL.
    pub kill_grace_ms: u64,
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
    /// This agent incarnation's public key (`X…`, see [`crate::seal`]): the scheduler seals
    /// the secret values of the jobs it assigns here to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_key: Option<String>,
    #[serde(with = "hodei_domain::time::rfc3339")]
    pub sent_at: DateTime<Utc>,
}

/// Why a heartbeat was refused before it reached storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat field {field}: {reason}")]
pub struct HeartbeatRefused {
    pub field: &'static str,
    pub reason: String,
}

impl Heartbeat {
    /// Most slots a worker may announce.
    pub const MAX_SLOTS: u32 = 100_000;
    /// Most attempts a heartbeat may list.
    pub const MAX_RUNNING: usize = 100_000;
    /// Most labels a worker may announce, and the longest key or value.
    pub const MAX_LABELS: usize = 256;
    pub const MAX_LABEL_LEN: usize = 256;

    /// Range-checks every number and size before the beat reaches SQL, so that one odd beat
    /// is refused alone instead of failing the batch it would be written in.
    pub fn validate(&self) -> Result<(), HeartbeatRefused> {
        let refuse = |field, reason: String| Err(HeartbeatRefused { field, reason });
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > Self::MAX_SLOTS {
            return refuse(
                "max_concurrent_jobs",
                format!(
                    "{} is out of range 1..={}",
                    self.max_concurrent_jobs,
                    Self::MAX_SLOTS
                ),
            );
        }
        let max = i64::MAX as u64;
        for (field, value) in [
            ("capacity.cpu_millis", self.capacity.cpu_millis),
            ("capacity.memory_mb", self.capacity.memory_mb),
            ("usage.memory_used_mb", self.usage.memory_used_mb),
            ("usage.memory_total_mb", self.usage.memory_total_mb),
        ] {
            if value > max {
                return refuse(field, format!("{value} is over {max}"));
            }
        }
        if !self.usage.cpu_percent.is_finite() || self.usage.cpu_percent < 0.0 {
            return refuse(
                "usage.cpu_percent",
                format!(
                    "{} is not a finite non-negative number",
                    self.usage.cpu_percent
                ),
            );
        }
        if !self.usage.load_1m.is_finite() || self.usage.load_1m < 0.0 {
            return refuse(
                "usage.load_1m",
                format!("{} is not a finite non-negative number", self.usage.load_1m),
            );
        }
        if let Err(e) = hodei_domain::LeaseTerms::new(self.lease_ms, self.kill_grace_ms) {
            return refuse("lease_ms", e.to_string());
        }
        if let Some(key) = &self.seal_key
            && let Err(e) = crate::seal::SealingKey::parse(key)
        {
            return refuse("seal_key", e.to_string());
        }
        if self.running.len() > Self::MAX_RUNNING {
            return refuse(
                "running",
                format!(
                    "{} attempts, at most {}",
                    self.running.len(),
                    Self::MAX_RUNNING
                ),
            );
        }
        if self.labels.len() > Self::MAX_LABELS {
            return refuse(
                "labels",
                format!("{} labels, at most {}", self.labels.len(), Self::MAX_LABELS),
            );
        }
        if let Some((key, value)) = self.labels.iter().find(|(k, v)| {
            k.is_empty()
                || k.len() > Self::MAX_LABEL_LEN
                || v.len() > Self::MAX_LABEL_LEN
                || k.contains('\0')
                || v.contains('\0')
        }) {
            return refuse(
                "labels",
                format!(
                    "label '{}' (key {} bytes, value {} bytes): keys 1 to {max} bytes, values at most {max}, without NUL",
                    key.chars().take(32).collect::<String>(),
                    key.len(),
                    value.len(),
                    max = Self::MAX_LABEL_LEN
                ),
            );
        }
        Ok(())
    }
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
    #[serde(with = "hodei_domain::time::rfc3339")]
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

/// An event's envelope as JSON, written into a buffer sized for a typical envelope (about
/// 0.5 KB) so that it is not grown several times on the way.
fn envelope_json(envelope: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let mut json = Vec::with_capacity(768);
    serde_json::to_writer(&mut json, envelope)?;
    Ok(json)
}

/// A message ready for the outbox: subject, JSON payload, the de-duplication id and the trace
/// context of the span it was created in (so its consumer continues that trace).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub id: Uuid,
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: TraceHeaders,
    /// Delivered twice, the message would act twice (an assignment would run its attempt
    /// again): it is never published later than [`crate::streams::AT_MOST_ONCE_WITHIN`] after
    /// its commit, while JetStream still drops a second copy by its id. Past that it is
    /// dropped unpublished, and what waited for it recovers otherwise (an attempt never
    /// started is handed back by its start timeout).
    pub at_most_once: bool,
}

impl Outgoing {
    /// A job event, in its envelope, on `hodei.v1.evt.job.<id>.<event>`.
    pub fn job_event(event: &JobEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.event_id,
            subject: subjects::job_event(&event.job_id, event.kind.name()),
            payload: envelope_json(&OutgoingEnvelope::job(event, source))?,
            headers: trace::current(),
            at_most_once: false,
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
            payload: envelope_json(&OutgoingEnvelope::pipeline(event, source))?,
            headers: trace::current(),
            at_most_once: false,
        })
    }

    /// A schedule's event, in its envelope, on `hodei.v1.evt.schedule.<id>.<event>`.
    pub fn schedule_event(
        event: &hodei_domain::ScheduleEvent,
        source: &str,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.event_id,
            subject: subjects::schedule_event(&event.schedule_id, event.kind.name()),
            payload: envelope_json(&OutgoingEnvelope::schedule(event, source))?,
            headers: trace::current(),
            at_most_once: false,
        })
    }

    /// A worker event, in its envelope, on `hodei.v1.evt.worker.<id>.<event>`.
    pub fn worker_event(event: &WorkerEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.event_id,
            subject: subjects::worker_event(&event.worker_id, event.kind.name()),
            payload: envelope_json(&OutgoingEnvelope::worker(event, source))?,
            headers: trace::current(),
            at_most_once: false,
        })
    }

    /// What a new job announces: its first event and the request to place its first attempt.
    pub fn job_submitted(
        job: &hodei_domain::Job,
        event: &JobEvent,
        source: &str,
    ) -> Result<[Self; 2], serde_json::Error> {
        Ok([
            Self::job_event(event, source)?,
            Self::place_job(&PlaceJob {
                job_id: job.id(),
                attempt: job.current_attempt(),
                priority: job.spec().priority,
                not_before: None,
            })?,
        ])
    }

    /// A work item asking a scheduler to place the job.
    pub fn place_job(item: &PlaceJob) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: Uuid::now_v7(),
            subject: subjects::place_job(&item.job_id),
            payload: serde_json::to_vec(item)?,
            headers: trace::current(),
            at_most_once: false,
        })
    }

    /// A command for an agent.
    pub fn agent_command(worker: &WorkerId, cmd: &AgentCommand) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: Uuid::now_v7(),
            subject: subjects::agent_commands(worker),
            payload: serde_json::to_vec(cmd)?,
            headers: trace::current(),
            at_most_once: matches!(cmd, AgentCommand::Assign { .. }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat() -> Heartbeat {
        Heartbeat {
            worker_id: "w-1".parse().unwrap(),
            incarnation: IncarnationId::new(),
            lease_ms: 15_000,
            kill_grace_ms: 10_000,
            labels: BTreeMap::new(),
            capacity: Resources::new(1000, 1024),
            max_concurrent_jobs: 4,
            usage: ResourceUsage::default(),
            running: Vec::new(),
            draining: false,
            leaving: false,
            seal_key: None,
            sent_at: Utc::now(),
        }
    }

    #[test]
    fn heartbeat_numbers_are_range_checked() {
        assert_eq!(beat().validate(), Ok(()));
        let mut odd = beat();
        odd.max_concurrent_jobs = u32::MAX;
        assert_eq!(odd.validate().unwrap_err().field, "max_concurrent_jobs");
        let mut odd = beat();
        odd.capacity.cpu_millis = u64::MAX;
        assert_eq!(odd.validate().unwrap_err().field, "capacity.cpu_millis");
        let mut odd = beat();
        odd.usage.cpu_percent = f32::NAN;
        assert_eq!(odd.validate().unwrap_err().field, "usage.cpu_percent");
        let mut odd = beat();
        odd.lease_ms = 0;
        assert_eq!(odd.validate().unwrap_err().field, "lease_ms");
        let mut odd = beat();
        odd.labels.insert("k".repeat(300), "v".to_owned());
        assert_eq!(odd.validate().unwrap_err().field, "labels");
        // PostgreSQL refuses NUL in the labels' jsonb: the beat is refused alone.
        let mut odd = beat();
        odd.labels.insert("zone".to_owned(), "a\0".to_owned());
        assert_eq!(odd.validate().unwrap_err().field, "labels");
    }

    /// What an agent wrote is stored: the tail's last lines, each and a reason bounded and
    /// without NUL.
    #[test]
    fn a_report_is_made_storable() {
        let mut tail: Vec<String> = (0..25).map(|i| i.to_string()).collect();
        tail.push(format!(
            "x\0{}",
            "y".repeat(AgentReport::MAX_TAIL_LINE_BYTES)
        ));
        let mut report = AgentReport {
            report_id: Uuid::now_v7(),
            worker_id: "w".parse().unwrap(),
            job_id: JobId::new(),
            attempt: AttemptNumber::new(1),
            at: Utc::now(),
            kind: ReportKind::Finished {
                outcome: AttemptOutcome::SpawnFailed {
                    reason: "no\0such".to_owned(),
                },
                tail,
            },
        };
        report.make_storable();
        let ReportKind::Finished { outcome, tail } = report.kind else {
            panic!("still finished");
        };
        assert_eq!(tail.len(), AgentReport::TAIL_LINES);
        assert_eq!(tail[0], "6");
        let last = tail.last().unwrap();
        assert!(last.starts_with("x\u{FFFD}y") && last.len() <= AgentReport::MAX_TAIL_LINE_BYTES);
        assert_eq!(
            outcome,
            AttemptOutcome::SpawnFailed {
                reason: "no\u{FFFD}such".to_owned()
            }
        );
    }
}
