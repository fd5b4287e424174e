//! The `Worker` aggregate: a host running an agent, with its labels, capacity, slots, the
//! attempts it holds and its liveness status. Reservations and releases return `Result` and
//! never let a worker hold more than its slots or capacity allow.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

mod events;

pub use events::{WorkerEvent, WorkerEventKind};

use crate::error::DomainError;
use crate::ids::{AttemptId, IncarnationId, WorkerId, named_enum};
use crate::spec::{JobSpec, Resources};
use crate::specification::{AllOf, Predicate, Specification};

named_enum! {
    /// Whether a worker takes work.
    pub enum WorkerStatus("worker status") {
        /// Beating and taking work.
        Ready = "ready",
        /// Beating, finishing what it holds, taking nothing new.
        Draining = "draining",
        /// Silent for a few heartbeat intervals: it takes no new work, but the attempts it
        /// holds stay its own until its lease and kill grace have passed (or its loss is
        /// confirmed).
        Unreachable = "unreachable",
        /// Its attempts were handed back: silent past its lease and kill grace, or confirmed
        /// gone.
        Lost = "lost",
        /// Said goodbye.
        Offline = "offline",
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

/// An attempt a worker holds, with the resources reserved for it and the agent incarnation it
/// was placed with (none for attempts placed before the worker reported one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAttempt {
    pub attempt: AttemptId,
    pub resources: Resources,
    pub since: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<IncarnationId>,
    /// The job asked to be handed back as soon as this worker is unreachable (idempotent work),
    /// not after its lease and kill grace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requeue_when_unreachable: bool,
}

/// How long a worker's attempts may outlive its silence. An agent that cannot reach NATS for
/// `lease_ms` stops its attempts itself (SIGTERM, then SIGKILL after `kill_grace_ms`), so once
/// both have passed since its last heartbeat, none of its processes can still run and its
/// attempts may be handed back without two attempts of a job ever running at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    pub lease_ms: u64,
    pub kill_grace_ms: u64,
}

impl LeaseTerms {
    /// The default lease (15 s) survives a 10 s NATS restart without stopping any work.
    pub const DEFAULT: LeaseTerms = LeaseTerms {
        lease_ms: 15_000,
        kill_grace_ms: 10_000,
    };
    /// Longest lease or kill grace a worker may announce: one day.
    pub const MAX_MS: u64 = 24 * 3600 * 1000;

    /// Terms checked for range: each at most [`LeaseTerms::MAX_MS`], the lease at least 1 ms.
    pub fn new(lease_ms: u64, kill_grace_ms: u64) -> Result<LeaseTerms, DomainError> {
        if lease_ms == 0 || lease_ms > Self::MAX_MS {
            return Err(DomainError::OutOfRange {
                field: "lease_ms",
                value: lease_ms,
                max: Self::MAX_MS,
            });
        }
        if kill_grace_ms > Self::MAX_MS {
            return Err(DomainError::OutOfRange {
                field: "kill_grace_ms",
                value: kill_grace_ms,
                max: Self::MAX_MS,
            });
        }
        Ok(LeaseTerms {
            lease_ms,
            kill_grace_ms,
        })
    }

    /// How long after a worker's last heartbeat its attempts are handed back: lease plus
    /// kill grace.
    pub fn hand_back_after(&self) -> chrono::Duration {
        chrono::Duration::milliseconds(
            i64::try_from(self.lease_ms.saturating_add(self.kill_grace_ms)).unwrap_or(i64::MAX),
        )
    }
}

impl Default for LeaseTerms {
    fn default() -> Self {
        Self::DEFAULT
    }
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
    incarnation: Option<IncarnationId>,
    lease: LeaseTerms,
    /// The public key its current agent incarnation announced: secret values are sealed to
    /// it at assignment. None for an agent that announced none (it gets no job with secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal_key: Option<String>,
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
            incarnation: None,
            lease: LeaseTerms::DEFAULT,
            seal_key: None,
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
        incarnation: Option<IncarnationId>,
        lease: LeaseTerms,
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
            incarnation,
            lease,
            seal_key: None,
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
    /// The agent incarnation of its latest heartbeat, if it reported one.
    pub fn incarnation(&self) -> Option<IncarnationId> {
        self.incarnation
    }
    /// The lease and kill grace its agent announced.
    pub fn lease(&self) -> LeaseTerms {
        self.lease
    }
    /// Sets the incarnation and lease its agent announced (for a worker not yet stored).
    pub fn with_agent(mut self, incarnation: IncarnationId, lease: LeaseTerms) -> Self {
        self.incarnation = Some(incarnation);
        self.lease = lease;
        self
    }
    /// The public key secret values are sealed to for its current agent incarnation.
    pub fn seal_key(&self) -> Option<&str> {
        self.seal_key.as_deref()
    }
    /// Sets the public key its agent announced.
    pub fn with_seal_key(mut self, seal_key: Option<String>) -> Self {
        self.seal_key = seal_key;
        self
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
            WorkerStatus::Unreachable | WorkerStatus::Lost | WorkerStatus::Offline => {
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
            incarnation: self.incarnation,
            requeue_when_unreachable: false,
        });
        self.version += 1;
        Ok(())
    }

    /// Reserves a slot for `attempt` of a job with `spec`: its resources, and whether it is
    /// handed back as soon as the worker is unreachable.
    pub fn reserve_for(
        &mut self,
        attempt: AttemptId,
        spec: &JobSpec,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        self.reserve(attempt, spec.resources, now)?;
        if let Some(held) = self.held.last_mut() {
            held.requeue_when_unreachable = spec.requeue_when_unreachable;
        }
        Ok(())
    }

    /// The reservations of `added` (attempts this copy of the worker holds since it was read)
    /// made again on `current`, the worker as it stands now, which may have moved since the
    /// read. Allowed only if it moved by freeing slots: `current` holds nothing this copy does
    /// not, and has the same agent (incarnation and sealing key), so every command built for
    /// this copy still fits it and the reservations fit in the room they were made in. Each is
    /// then reserved again as [`Worker::reserve`] does (refused unless `current` is ready).
    pub fn rebased_on(&self, current: &Worker, added: &[AttemptId]) -> Result<Worker, DomainError> {
        let moved = |why| DomainError::WorkerMoved {
            worker_id: self.id.to_string(),
            why,
        };
        if current.id != self.id {
            return Err(moved("another worker"));
        }
        if current.incarnation != self.incarnation {
            return Err(moved("its agent restarted"));
        }
        if current.seal_key != self.seal_key {
            return Err(moved("its sealing key changed"));
        }
        if current.held.iter().any(|h| !self.holds(&h.attempt)) {
            return Err(moved("it holds an attempt reserved elsewhere"));
        }
        let mut rebased = current.clone();
        for attempt in added {
            let held = &self.held[self.position_of(attempt)?];
            rebased.reserve(held.attempt, held.resources, held.since)?;
            if let Some(last) = rebased.held.last_mut() {
                last.requeue_when_unreachable = held.requeue_when_unreachable;
            }
        }
        Ok(rebased)
    }

    /// The attempts whose jobs asked to be handed back as soon as the worker is unreachable.
    pub fn attempts_to_requeue_when_unreachable(&self) -> Vec<HeldAttempt> {
        self.held
            .iter()
            .filter(|h| h.requeue_when_unreachable)
            .cloned()
            .collect()
    }

    /// Releases the slot of `attempt`.
    pub fn release(&mut self, attempt: &AttemptId) -> Result<HeldAttempt, DomainError> {
        let index = self.position_of(attempt)?;
        self.version += 1;
        Ok(self.held.remove(index))
    }

    /// Where `attempt` is among the held ones; `NotHeld` if it is not.
    fn position_of(&self, attempt: &AttemptId) -> Result<usize, DomainError> {
        self.held
            .iter()
            .position(|h| &h.attempt == attempt)
            .ok_or_else(|| DomainError::NotHeld {
                worker_id: self.id.to_string(),
                attempt: attempt.to_string(),
            })
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

    /// The worker fell silent: it takes no new work, and keeps its attempts until its lease
    /// and kill grace have passed or its loss is confirmed.
    pub fn mark_unreachable(&mut self, now: DateTime<Utc>) -> Result<WorkerEvent, DomainError> {
        if !matches!(self.status, WorkerStatus::Ready | WorkerStatus::Draining) {
            return Err(DomainError::IllegalWorkerTransition {
                action: "mark unreachable",
                status: self.status.to_string(),
            });
        }
        self.status = WorkerStatus::Unreachable;
        self.version += 1;
        Ok(WorkerEvent::new(
            self.id.clone(),
            now,
            WorkerEventKind::Unreachable {
                silent_since: self.last_heartbeat_at,
            },
        ))
    }

    /// Declares the worker lost: silent past its lease and kill grace, so none of its
    /// processes can still run. The attempts it holds are to be handed back with
    /// [`Worker::release`].
    pub fn mark_lost(&mut self, now: DateTime<Utc>) -> Result<WorkerEvent, DomainError> {
        if !matches!(
            self.status,
            WorkerStatus::Ready | WorkerStatus::Draining | WorkerStatus::Unreachable
        ) {
            return Err(DomainError::IllegalWorkerTransition {
                action: "mark lost",
                status: self.status.to_string(),
            });
        }
        self.status = WorkerStatus::Lost;
        self.version += 1;
        Ok(WorkerEvent::new(
            self.id.clone(),
            now,
            WorkerEventKind::Lost {
                missed_since: self.last_heartbeat_at,
            },
        ))
    }

    /// Whether its attempts may be handed back at `now`: it is lost already, or silent (as far
    /// as `observing_since` lets the observer tell) for longer than its lease and kill grace.
    pub fn silent_past_lease(&self, now: DateTime<Utc>, observing_since: DateTime<Utc>) -> bool {
        let silent_since = self.last_heartbeat_at.max(observing_since);
        now - silent_since > self.lease.hand_back_after()
    }

    /// The attempts it holds from an agent incarnation other than `current`: that process is
    /// gone (a worker came back under the same id), so they no longer run anywhere.
    pub fn attempts_of_other_incarnations(&self, current: IncarnationId) -> Vec<HeldAttempt> {
        self.held
            .iter()
            .filter(|h| h.incarnation != Some(current))
            .cloned()
            .collect()
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

/// What a worker must offer to take a job with `spec`: [`can_take`] its labels and
/// resources, and for a job with secrets, an agent that announced a sealing key.
pub fn can_take_job(spec: &JobSpec) -> AllOf<Worker> {
    can_take_sealed(&spec.required_labels, spec.resources, spec.has_secrets())
}

/// [`can_take`], and when the job carries `secrets`, an agent that announced a sealing key:
/// what [`can_take_job`] asks, from the parts of a specification that placement keeps.
pub fn can_take_sealed(
    required_labels: &BTreeMap<String, String>,
    resources: Resources,
    secrets: bool,
) -> AllOf<Worker> {
    let mut all = can_take(required_labels, resources);
    if secrets {
        all.0.push(Box::new(Predicate::new(
            "an agent that announces a sealing key (for secret_env)",
            |w: &Worker| w.seal_key.is_some(),
        )));
    }
    all
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
    fn reservations_are_rebased_only_on_a_worker_that_freed_slots() {
        let now = Utc::now();
        let (freed, kept) = (attempt(), attempt());
        let mut read = worker(3);
        read.reserve(freed, Resources::new(500, 0), now).unwrap();
        read.reserve(kept, Resources::new(500, 0), now).unwrap();
        // The round reserves one more on its copy; meanwhile a report frees `freed`.
        let mut copy = read.clone();
        let added = attempt();
        copy.reserve(added, Resources::new(500, 0), now).unwrap();
        let mut current = read.clone();
        current.release(&freed).unwrap();

        let rebased = copy.rebased_on(&current, &[added]).unwrap();
        let held: Vec<AttemptId> = rebased.held().iter().map(|h| h.attempt).collect();
        assert_eq!(held, vec![kept, added]);
        assert_eq!(rebased.version(), current.version() + 1);

        // Not on a worker that took an attempt this copy never saw.
        let mut elsewhere = current.clone();
        elsewhere
            .reserve(attempt(), Resources::default(), now)
            .unwrap();
        assert!(matches!(
            copy.rebased_on(&elsewhere, &[added]),
            Err(DomainError::WorkerMoved { .. })
        ));
        // Nor on a restarted agent, nor on a worker that stopped taking work.
        let restarted = current
            .clone()
            .with_agent(IncarnationId::new(), LeaseTerms::default());
        assert!(matches!(
            copy.rebased_on(&restarted, &[added]),
            Err(DomainError::WorkerMoved { .. })
        ));
        let mut draining = current.clone();
        draining.drain(now).unwrap();
        assert!(matches!(
            copy.rebased_on(&draining, &[added]),
            Err(DomainError::IllegalWorkerTransition { .. })
        ));
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
    fn only_jobs_that_ask_for_it_are_marked_for_requeue_when_unreachable() {
        let mut w = worker(2);
        let now = Utc::now();
        let mut draft = crate::spec::JobSpecDraft::exec("idempotent", &["true"]);
        draft.requeue_when_unreachable = true;
        let eager = JobSpec::try_from(draft).unwrap();
        let patient =
            JobSpec::try_from(crate::spec::JobSpecDraft::exec("patient", &["true"])).unwrap();
        let (a, b) = (attempt(), attempt());
        w.reserve_for(a, &eager, now).unwrap();
        w.reserve_for(b, &patient, now).unwrap();
        let marked: Vec<_> = w
            .attempts_to_requeue_when_unreachable()
            .into_iter()
            .map(|h| h.attempt)
            .collect();
        assert_eq!(marked, vec![a]);
    }

    #[test]
    fn lost_worker_hands_back_its_attempts_and_returns_on_heartbeat() {
        let mut w = worker(2);
        let now = Utc::now();
        let a = attempt();
        w.reserve(a, Resources::default(), now).unwrap();
        w.mark_unreachable(now).unwrap();
        assert!(w.reserve(attempt(), Resources::default(), now).is_err());
        assert_eq!(
            w.held().len(),
            1,
            "an unreachable worker keeps its attempts"
        );
        w.mark_lost(now).unwrap();
        w.release(&a).unwrap();
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
    fn attempts_are_handed_back_only_after_lease_and_grace_of_observed_silence() {
        let start = Utc::now();
        let w = worker(1).with_agent(IncarnationId::new(), LeaseTerms::new(3000, 1000).unwrap());
        let seen = w.last_heartbeat_at();
        let at = |ms| seen + chrono::Duration::milliseconds(ms);
        assert!(!w.silent_past_lease(at(3999), start));
        assert!(w.silent_past_lease(at(4001), start));
        // The observer only started watching at +2 s: silence counts from then.
        assert!(!w.silent_past_lease(at(4001), at(2000)));
        assert!(w.silent_past_lease(at(6001), at(2000)));
        assert!(LeaseTerms::new(0, 0).is_err());
        assert!(LeaseTerms::new(1, LeaseTerms::MAX_MS + 1).is_err());
    }

    #[test]
    fn a_new_incarnation_disowns_the_attempts_of_the_previous_one() {
        let now = Utc::now();
        let first = IncarnationId::new();
        let mut w = worker(3).with_agent(first, LeaseTerms::DEFAULT);
        let old = attempt();
        w.reserve(old, Resources::default(), now).unwrap();
        let second = IncarnationId::new();
        w = w.with_agent(second, LeaseTerms::DEFAULT);
        let new = attempt();
        w.reserve(new, Resources::default(), now).unwrap();
        let gone: Vec<_> = w
            .attempts_of_other_incarnations(second)
            .into_iter()
            .map(|h| h.attempt)
            .collect();
        assert_eq!(gone, vec![old]);
        assert!(
            w.attempts_of_other_incarnations(first)
                .iter()
                .any(|h| h.attempt == new)
        );
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
