//! The `Worker` aggregate: a host running an agent, with its labels, capacity, slots, the
//! attempts it holds and its liveness status. Reservations and releases return `Result` and
//! never let a worker hold more than its slots or capacity allow.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::events::{WorkerEvent, WorkerEventKind};
use crate::ids::{AttemptId, WorkerId};
use crate::spec::Resources;
use crate::specification::{AllOf, Predicate, Specification};

/// Whether a worker takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStatus {
    /// Beating and taking work.
    Ready,
    /// Beating, finishing what it holds, taking nothing new.
    Draining,
    /// Missed too many heartbeats; its attempts are handed back.
    Lost,
    /// Said goodbye.
    Offline,
}

impl WorkerStatus {
    pub const ALL: [WorkerStatus; 4] = [
        WorkerStatus::Ready,
        WorkerStatus::Draining,
        WorkerStatus::Lost,
        WorkerStatus::Offline,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerStatus::Ready => "ready",
            WorkerStatus::Draining => "draining",
            WorkerStatus::Lost => "lost",
            WorkerStatus::Offline => "offline",
        }
    }
}

impl fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkerStatus {
    type Err = crate::ids::IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkerStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| crate::ids::IdError {
                kind: "worker status",
                value: s.to_owned(),
                reason: "not one of ready, draining, lost, offline",
            })
    }
}

/// Resource usage a worker reports in its heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// Whole-host CPU use, 0–100 × cores.
    pub cpu_percent: f32,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    /// One-minute load average.
    pub load_1m: f64,
}

/// An attempt a worker holds, with the resources reserved for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAttempt {
    pub attempt: AttemptId,
    pub resources: Resources,
    pub since: DateTime<Utc>,
}

/// A worker host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    id: WorkerId,
    labels: BTreeMap<String, String>,
    capacity: Resources,
    max_concurrent_jobs: u32,
    status: WorkerStatus,
    held: Vec<HeldAttempt>,
    usage: ResourceUsage,
    registered_at: DateTime<Utc>,
    last_heartbeat_at: DateTime<Utc>,
    version: u64,
}

impl Worker {
    /// A worker seen for the first time.
    pub fn register(
        id: WorkerId,
        labels: BTreeMap<String, String>,
        capacity: Resources,
        max_concurrent_jobs: u32,
        now: DateTime<Utc>,
    ) -> (Worker, WorkerEvent) {
        let event = WorkerEvent::new(
            id.clone(),
            now,
            WorkerEventKind::Registered {
                labels: labels.clone(),
                capacity,
                max_concurrent_jobs,
            },
        );
        let worker = Worker {
            id,
            labels,
            capacity,
            max_concurrent_jobs,
            status: WorkerStatus::Ready,
            held: Vec::new(),
            usage: ResourceUsage::default(),
            registered_at: now,
            last_heartbeat_at: now,
            version: 0,
        };
        (worker, event)
    }

    /// Rebuilds a worker from stored fields, for repositories.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        id: WorkerId,
        labels: BTreeMap<String, String>,
        capacity: Resources,
        max_concurrent_jobs: u32,
        status: WorkerStatus,
        held: Vec<HeldAttempt>,
        usage: ResourceUsage,
        registered_at: DateTime<Utc>,
        last_heartbeat_at: DateTime<Utc>,
        version: u64,
    ) -> Worker {
        Worker {
            id,
            labels,
            capacity,
            max_concurrent_jobs,
            status,
            held,
            usage,
            registered_at,
            last_heartbeat_at,
            version,
        }
    }

    pub fn id(&self) -> &WorkerId {
        &self.id
    }
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
    pub fn capacity(&self) -> Resources {
        self.capacity
    }
    pub fn max_concurrent_jobs(&self) -> u32 {
        self.max_concurrent_jobs
    }
    pub fn status(&self) -> WorkerStatus {
        self.status
    }
    pub fn held(&self) -> &[HeldAttempt] {
        &self.held
    }
    pub fn usage(&self) -> ResourceUsage {
        self.usage
    }
    pub fn registered_at(&self) -> DateTime<Utc> {
        self.registered_at
    }
    pub fn last_heartbeat_at(&self) -> DateTime<Utc> {
        self.last_heartbeat_at
    }
    /// Reservation version, for optimistic concurrency between scheduler replicas.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Resources not reserved by held attempts.
    pub fn free_capacity(&self) -> Resources {
        self.held
            .iter()
            .fold(self.capacity, |free, h| free.saturating_sub(&h.resources))
    }

    pub fn free_slots(&self) -> u32 {
        self.max_concurrent_jobs
            .saturating_sub(u32::try_from(self.held.len()).unwrap_or(u32::MAX))
    }

    pub fn holds(&self, attempt: &AttemptId) -> bool {
        self.held.iter().any(|h| &h.attempt == attempt)
    }

    /// A heartbeat: refreshes usage, labels and capacity as the agent reports them. A lost or
    /// offline worker that beats again is ready again (returns the `Returned` event).
    pub fn heartbeat(
        &mut self,
        labels: BTreeMap<String, String>,
        capacity: Resources,
        max_concurrent_jobs: u32,
        usage: ResourceUsage,
        now: DateTime<Utc>,
    ) -> Option<WorkerEvent> {
        self.labels = labels;
        self.capacity = capacity;
        self.max_concurrent_jobs = max_concurrent_jobs;
        self.usage = usage;
        if now > self.last_heartbeat_at {
            self.last_heartbeat_at = now;
        }
        match self.status {
            WorkerStatus::Lost | WorkerStatus::Offline => {
                self.status = WorkerStatus::Ready;
                Some(WorkerEvent::new(
                    self.id.clone(),
                    now,
                    WorkerEventKind::Returned,
                ))
            }
            WorkerStatus::Ready | WorkerStatus::Draining => None,
        }
    }

    /// Reserves a slot and resources for `attempt`. Refused unless the worker is ready, has a
    /// free slot and enough free capacity, and does not already hold the attempt.
    pub fn reserve(
        &mut self,
        attempt: AttemptId,
        resources: Resources,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        if self.status != WorkerStatus::Ready {
            return Err(DomainError::IllegalWorkerTransition {
                action: "reserve a slot on",
                status: self.status.to_string(),
            });
        }
        if self.holds(&attempt) {
            return Err(DomainError::AlreadyHeld {
                worker_id: self.id.to_string(),
                attempt: attempt.to_string(),
            });
        }
        if self.free_slots() == 0 {
            return Err(DomainError::NoFreeSlot {
                worker_id: self.id.to_string(),
                held: self.held.len(),
                max: self.max_concurrent_jobs,
            });
        }
        let free = self.free_capacity();
        for (resource, requested, available) in [
            ("cpu_millis", resources.cpu_millis, free.cpu_millis),
            ("memory_mb", resources.memory_mb, free.memory_mb),
        ] {
            if requested > available {
                return Err(DomainError::InsufficientCapacity {
                    worker_id: self.id.to_string(),
                    resource,
                    requested,
                    free: available,
                });
            }
        }
        self.held.push(HeldAttempt {
            attempt,
            resources,
            since: now,
        });
        self.version += 1;
        Ok(())
    }

    /// Releases the slot of `attempt`.
    pub fn release(&mut self, attempt: &AttemptId) -> Result<HeldAttempt, DomainError> {
        let index = self
            .held
            .iter()
            .position(|h| &h.attempt == attempt)
            .ok_or_else(|| DomainError::NotHeld {
                worker_id: self.id.to_string(),
                attempt: attempt.to_string(),
            })?;
        self.version += 1;
        Ok(self.held.remove(index))
    }

    /// Stops taking new work.
    pub fn drain(&mut self, now: DateTime<Utc>) -> Result<WorkerEvent, DomainError> {
        if self.status != WorkerStatus::Ready {
            return Err(DomainError::IllegalWorkerTransition {
                action: "drain",
                status: self.status.to_string(),
            });
        }
        self.status = WorkerStatus::Draining;
        self.version += 1;
        Ok(WorkerEvent::new(
            self.id.clone(),
            now,
            WorkerEventKind::Draining,
        ))
    }

    /// Declares the worker lost; returns the attempts it held, now released, for requeueing.
    pub fn mark_lost(
        &mut self,
        now: DateTime<Utc>,
    ) -> Result<(WorkerEvent, Vec<HeldAttempt>), DomainError> {
        if !matches!(self.status, WorkerStatus::Ready | WorkerStatus::Draining) {
            return Err(DomainError::IllegalWorkerTransition {
                action: "mark lost",
                status: self.status.to_string(),
            });
        }
        self.status = WorkerStatus::Lost;
        self.version += 1;
        let released = std::mem::take(&mut self.held);
        let event = WorkerEvent::new(
            self.id.clone(),
            now,
            WorkerEventKind::Lost {
                missed_since: self.last_heartbeat_at,
            },
        );
        Ok((event, released))
    }

    /// The worker said goodbye.
    pub fn go_offline(&mut self, now: DateTime<Utc>) -> Result<WorkerEvent, DomainError> {
        if self.status == WorkerStatus::Offline {
            return Err(DomainError::IllegalWorkerTransition {
                action: "take offline",
                status: self.status.to_string(),
            });
        }
        self.status = WorkerStatus::Offline;
        self.version += 1;
        Ok(WorkerEvent::new(
            self.id.clone(),
            now,
            WorkerEventKind::Offline,
        ))
    }
}

/// The specification a worker must meet to take a job with these requirements: ready, every
/// required label present with the required value, a free slot and enough free resources.
/// `unmet` on it tells a person what did not match.
pub fn can_take(required_labels: &BTreeMap<String, String>, resources: Resources) -> AllOf<Worker> {
    let mut rules: Vec<Box<dyn Specification<Worker>>> = vec![
        Box::new(Predicate::new("status is ready", |w: &Worker| {
            w.status == WorkerStatus::Ready
        })),
        Box::new(Predicate::new("has a free slot", |w: &Worker| {
            w.free_slots() > 0
        })),
    ];
    for (key, value) in required_labels {
        let (k, v) = (key.clone(), value.clone());
        rules.push(Box::new(Predicate::new(
            format!("label {key}={value}"),
            move |w: &Worker| w.labels.get(&k) == Some(&v),
        )));
    }
    if resources.cpu_millis > 0 {
        rules.push(Box::new(Predicate::new(
            format!("{} free cpu millicores", resources.cpu_millis),
            move |w: &Worker| w.free_capacity().cpu_millis >= resources.cpu_millis,
        )));
    }
    if resources.memory_mb > 0 {
        rules.push(Box::new(Predicate::new(
            format!("{} MiB free memory", resources.memory_mb),
            move |w: &Worker| w.free_capacity().memory_mb >= resources.memory_mb,
        )));
    }
    AllOf(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AttemptNumber, JobId};

    fn worker(max: u32) -> Worker {
        let labels = BTreeMap::from([("gpu".to_owned(), "true".to_owned())]);
        Worker::register(
            "w1".parse().unwrap(),
            labels,
            Resources::new(2000, 1024),
            max,
            Utc::now(),
        )
        .0
    }

    fn attempt() -> AttemptId {
        AttemptId::new(JobId::new(), AttemptNumber::new(1))
    }

    #[test]
    fn slots_and_capacity_are_enforced() {
        let mut w = worker(2);
        let now = Utc::now();
        w.reserve(attempt(), Resources::new(1500, 0), now).unwrap();
        assert!(matches!(
            w.reserve(attempt(), Resources::new(1000, 0), now),
            Err(DomainError::InsufficientCapacity {
                resource: "cpu_millis",
                ..
            })
        ));
        let a = attempt();
        w.reserve(a, Resources::new(500, 0), now).unwrap();
        assert!(matches!(
            w.reserve(attempt(), Resources::default(), now),
            Err(DomainError::NoFreeSlot { .. })
        ));
        w.release(&a).unwrap();
        assert!(w.release(&a).is_err());
        assert_eq!(w.free_slots(), 1);
    }

    #[test]
    fn lost_worker_hands_back_its_attempts_and_returns_on_heartbeat() {
        let mut w = worker(2);
        let now = Utc::now();
        w.reserve(attempt(), Resources::default(), now).unwrap();
        let (_, released) = w.mark_lost(now).unwrap();
        assert_eq!(released.len(), 1);
        assert!(w.reserve(attempt(), Resources::default(), now).is_err());
        let event = w.heartbeat(
            w.labels().clone(),
            w.capacity(),
            2,
            ResourceUsage::default(),
            now,
        );
        assert_eq!(event.unwrap().kind.name(), "returned");
        assert_eq!(w.status(), WorkerStatus::Ready);
    }

    #[test]
    fn can_take_explains_what_does_not_match() {
        let w = worker(1);
        let need = BTreeMap::from([("gpu".to_owned(), "true".to_owned())]);
        assert!(can_take(&need, Resources::new(100, 100)).is_satisfied_by(&w));
        let other = BTreeMap::from([("os".to_owned(), "mac".to_owned())]);
        assert_eq!(
            can_take(&other, Resources::new(4000, 0)).unmet(&w),
            vec!["label os=mac", "4000 free cpu millicores"]
        );
    }
}
