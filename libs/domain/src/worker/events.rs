//! A worker's events: one for every change of its status, published for people and services
//! to watch.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::WorkerId;
use crate::spec::Resources;

/// Something that happened to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerEvent {
    pub event_id: Uuid,
    pub worker_id: WorkerId,
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: WorkerEventKind,
}

/// What happened to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerEventKind {
    /// First heartbeat of a worker never seen before.
    Registered {
        labels: std::collections::BTreeMap<String, String>,
        capacity: Resources,
        max_concurrent_jobs: u32,
    },
    /// A worker that was lost or offline beats again.
    Returned,
    /// The worker stopped taking new work.
    Draining,
    /// The worker fell silent: no new work for it. The attempts it holds stay its own until
    /// its lease and kill grace have passed (then `Lost`), or until it beats again (then
    /// `Returned`).
    Unreachable {
        #[serde(with = "crate::time::rfc3339")]
        silent_since: DateTime<Utc>,
    },
    /// The worker's attempts were handed back: silent past its lease and kill grace.
    Lost {
        #[serde(with = "crate::time::rfc3339")]
        missed_since: DateTime<Utc>,
    },
    /// The worker came back as a new agent incarnation: the attempts of the previous one
    /// were handed back at once.
    Restarted {
        incarnation: crate::ids::IncarnationId,
        handed_back: usize,
    },
    /// The worker said goodbye.
    Offline,
}

impl WorkerEventKind {
    /// The event's name: the last token of its subject.
    pub fn name(&self) -> &'static str {
        match self {
            WorkerEventKind::Registered { .. } => "registered",
            WorkerEventKind::Returned => "returned",
            WorkerEventKind::Draining => "draining",
            WorkerEventKind::Unreachable { .. } => "unreachable",
            WorkerEventKind::Lost { .. } => "lost",
            WorkerEventKind::Restarted { .. } => "restarted",
            WorkerEventKind::Offline => "offline",
        }
    }
}

impl WorkerEvent {
    pub fn new(worker_id: WorkerId, at: DateTime<Utc>, kind: WorkerEventKind) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            worker_id,
            at,
            kind,
        }
    }
}
