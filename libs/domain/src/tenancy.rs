//! Tenants' shares of the fleet: the policy an admin sets for a tenant (its weight and its
//! quotas), what a tenant uses, and the order in which waiting jobs get free capacity.
//!
//! The order is: the highest priority first, across the whole queue; within one priority, the
//! tenant furthest below its weighted share (dominant-resource fairness: a tenant's share is
//! the largest of its fractions of the fleet's slots, CPU and memory, divided by its weight);
//! within one tenant, the oldest job first. A job counts with its own priority, or with its
//! tenant's `max_priority` when that is lower: no tenant can put its jobs ahead of the others'
//! (or stop theirs) with priorities its policy does not allow.

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{FieldError, ValidationErrors};
use crate::ids::{JobId, TenantId};
use crate::job::Job;
use crate::spec::{MAX_PRIORITY, MIN_PRIORITY, Resources};
use crate::worker::Worker;

/// The largest weight a tenant may have.
pub const MAX_WEIGHT: u32 = 10_000;

/// What an admin sets for a tenant. A tenant without a policy has weight 1 and no quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantPolicy {
    /// Its share of contended capacity relative to the other tenants' weights.
    pub weight: u32,
    /// Most jobs it may have queued; a submission past it is refused.
    pub max_queued_jobs: Option<u64>,
    /// Most jobs it may have on workers; past it, its jobs stay queued.
    pub max_running_jobs: Option<u64>,
    /// Most CPU (thousandths of a core) its jobs on workers may request together.
    pub max_cpu_millis: Option<u64>,
    /// Most memory (MiB) its jobs on workers may request together.
    pub max_memory_mb: Option<u64>,
    /// The highest priority its jobs count with, in placement order and preemption; a job
    /// asking for more keeps what it asked for but counts with this.
    pub max_priority: Option<i32>,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            weight: 1,
            max_queued_jobs: None,
            max_running_jobs: None,
            max_cpu_millis: None,
            max_memory_mb: None,
            max_priority: None,
        }
    }
}

/// One of a tenant's quotas, named as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    QueuedJobs,
    RunningJobs,
    CpuMillis,
    MemoryMb,
}

impl Quota {
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::QueuedJobs => "max_queued_jobs",
            Quota::RunningJobs => "max_running_jobs",
            Quota::CpuMillis => "max_cpu_millis",
            Quota::MemoryMb => "max_memory_mb",
        }
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quota that holds a job back: which, its limit, and what is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaHold {
    pub quota: Quota,
    pub limit: u64,
    pub in_use: u64,
}

impl QuotaHold {
    /// The reason a held job shows.
    pub fn reason(&self, tenant: &TenantId) -> String {
        match self.quota {
            Quota::QueuedJobs => format!(
                "tenant {tenant} is at its quota {} ({} of {} queued)",
                self.quota, self.in_use, self.limit
            ),
            _ => format!(
                "held by tenant {tenant}'s quota {} ({} of {} in use)",
                self.quota, self.in_use, self.limit
            ),
        }
    }
}

impl TenantPolicy {
    /// Every invalid field, named as the API names it.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            errors.push(FieldError::new(
                "weight",
                format!("must be between 1 and {MAX_WEIGHT}"),
            ));
        }
        let limits = [
            (Quota::QueuedJobs, self.max_queued_jobs),
            (Quota::RunningJobs, self.max_running_jobs),
            (Quota::CpuMillis, self.max_cpu_millis),
            (Quota::MemoryMb, self.max_memory_mb),
        ];
        for (quota, limit) in limits {
            if limit.is_some_and(|l| l > i64::MAX as u64) {
                errors.push(FieldError::new(quota.as_str(), "is too large"));
            }
        }
        if self
            .max_priority
            .is_some_and(|p| !(MIN_PRIORITY..=MAX_PRIORITY).contains(&p))
        {
            errors.push(FieldError::new(
                "max_priority",
                format!("must be between {MIN_PRIORITY} and {MAX_PRIORITY}"),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// The priority a job of this tenant asking for `requested` counts with.
    pub fn priority(&self, requested: i32) -> i32 {
        self.max_priority
            .map_or(requested, |cap| requested.min(cap))
    }

    /// Whether the tenant may queue one more job, having `queued`.
    pub fn queue_hold(&self, queued: u64) -> Option<QuotaHold> {
        self.max_queued_jobs
            .filter(|limit| queued >= *limit)
            .map(|limit| QuotaHold {
                quota: Quota::QueuedJobs,
                limit,
                in_use: queued,
            })
    }

    /// The first running quota that one more job requesting `resources` would pass.
    pub fn running_hold(&self, usage: &Usage, resources: &Resources) -> Option<QuotaHold> {
        let checks = [
            (
                Quota::RunningJobs,
                self.max_running_jobs,
                usage.running_jobs,
                1,
            ),
            (
                Quota::CpuMillis,
                self.max_cpu_millis,
                usage.cpu_millis,
                resources.cpu_millis,
            ),
            (
                Quota::MemoryMb,
                self.max_memory_mb,
                usage.memory_mb,
                resources.memory_mb,
            ),
        ];
        checks.into_iter().find_map(|(quota, limit, in_use, more)| {
            limit
                .filter(|limit| in_use.saturating_add(more) > *limit)
                .map(|limit| QuotaHold {
                    quota,
                    limit,
                    in_use,
                })
        })
    }
}

/// What a tenant's jobs on workers hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub running_jobs: u64,
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

impl Usage {
    /// Counts one more job requesting `resources`.
    pub fn add(&mut self, resources: &Resources) {
        self.running_jobs += 1;
        self.cpu_millis = self.cpu_millis.saturating_add(resources.cpu_millis);
        self.memory_mb = self.memory_mb.saturating_add(resources.memory_mb);
    }
}

/// What the fleet offers in all, the denominator of the shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub slots: u64,
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

impl Capacity {
    /// What `workers` offer together.
    pub fn of<'a>(workers: impl IntoIterator<Item = &'a Worker>) -> Capacity {
        workers.into_iter().fold(Capacity::default(), |mut c, w| {
            c.slots += u64::from(w.max_concurrent_jobs());
            c.cpu_millis += w.capacity().cpu_millis;
            c.memory_mb += w.capacity().memory_mb;
            c
        })
    }

    /// `usage`'s dominant share: its largest fraction of the slots, CPU and memory.
    pub fn dominant_share(&self, usage: &Usage) -> f64 {
        let fraction = |used: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                used as f64 / total as f64
            }
        };
        fraction(usage.running_jobs, self.slots)
            .max(fraction(usage.cpu_millis, self.cpu_millis))
            .max(fraction(usage.memory_mb, self.memory_mb))
    }
}

/// Every tenant's policy and usage against the fleet's capacity: what fair ordering and
/// quotas are decided on. Charged as a round places jobs.
#[derive(Debug, Clone, Default)]
pub struct Shares {
    pub capacity: Capacity,
    pub policies: HashMap<TenantId, TenantPolicy>,
    pub usage: HashMap<TenantId, Usage>,
}

/// One tenant's line in the scheduler's view.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantShare {
    pub tenant: TenantId,
    pub weight: u32,
    pub usage: Usage,
    /// Its dominant share of the fleet, 0 to 1.
    pub share: f64,
    /// What its weight entitles it to when every tenant listed competes, 0 to 1.
    pub entitled: f64,
}

impl Shares {
    fn weight(&self, tenant: &TenantId) -> u32 {
        self.policies.get(tenant).map_or(1, |p| p.weight.max(1))
    }

    /// What `tenant` uses now.
    pub fn usage(&self, tenant: &TenantId) -> Usage {
        self.usage.get(tenant).copied().unwrap_or_default()
    }

    /// `tenant`'s dominant share divided by its weight: the lower, the sooner it is served.
    pub fn weighted_share(&self, tenant: &TenantId) -> f64 {
        self.capacity.dominant_share(&self.usage(tenant)) / f64::from(self.weight(tenant))
    }

    /// The priority a job of `tenant` asking for `requested` counts with (see
    /// [`TenantPolicy::priority`]).
    pub fn priority(&self, tenant: &TenantId, requested: i32) -> i32 {
        self.policies
            .get(tenant)
            .map_or(requested, |p| p.priority(requested))
    }

    /// The priority `job` counts with (see [`Shares::priority`]).
    pub fn priority_of(&self, job: &Job) -> i32 {
        self.priority(job.tenant(), job.spec().priority)
    }

    /// The running quota of `tenant` that one more job requesting `resources` would pass.
    pub fn hold(&self, tenant: &TenantId, resources: &Resources) -> Option<QuotaHold> {
        self.policies
            .get(tenant)?
            .running_hold(&self.usage(tenant), resources)
    }

    /// Counts a job placed for `tenant`.
    pub fn charge(&mut self, tenant: &TenantId, resources: &Resources) {
        // Looked up first: the id is cloned only for a tenant charged for the first time.
        match self.usage.get_mut(tenant) {
            Some(usage) => usage.add(resources),
            None => self.usage.entry(tenant.clone()).or_default().add(resources),
        }
    }

    /// Each tenant that uses capacity or is named in `also` (say, tenants with queued jobs),
    /// with its share and what its weight entitles it to among them.
    pub fn view(&self, also: &[TenantId]) -> Vec<TenantShare> {
        let mut tenants: Vec<TenantId> = self
            .usage
            .iter()
            .filter(|(_, u)| u.running_jobs > 0)
            .map(|(t, _)| t.clone())
            .chain(also.iter().cloned())
            .collect();
        tenants.sort();
        tenants.dedup();
        let total: u64 = tenants.iter().map(|t| u64::from(self.weight(t))).sum();
        tenants
            .into_iter()
            .map(|tenant| {
                let weight = self.weight(&tenant);
                let usage = self.usage(&tenant);
                TenantShare {
                    share: self.capacity.dominant_share(&usage),
                    entitled: f64::from(weight) / total.max(1) as f64,
                    weight,
                    usage,
                    tenant,
                }
            })
            .collect()
    }
}

/// Waiting jobs in the order they get capacity (see the module's description). Built from the
/// candidates of a placement round; [`FairQueue::next`] is asked again after every placement,
/// because each one changes its tenant's share.
///
/// Each priority keeps its tenants in a heap by their weighted share as last computed (then
/// their oldest job's id), so a pick looks again only at the tenants whose share could have
/// put them first, not at every tenant with waiting jobs.
#[derive(Debug)]
pub struct FairQueue<T> {
    /// By priority, highest first.
    levels: BTreeMap<std::cmp::Reverse<i32>, Level<T>>,
}

/// One priority's candidates: each tenant's, oldest first, and its tenants by share.
#[derive(Debug)]
struct Level<T> {
    jobs: HashMap<TenantId, VecDeque<(JobId, T)>>,
    /// One entry per tenant with jobs here, smallest first.
    order: BinaryHeap<std::cmp::Reverse<Turn>>,
}

/// A tenant's place in its level: its weighted share when last computed (`-inf` before the
/// first time), then its oldest job's id.
#[derive(Debug)]
struct Turn {
    share: f64,
    head: JobId,
    tenant: TenantId,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.share
            .total_cmp(&other.share)
            .then(self.head.cmp(&other.head))
            .then_with(|| self.tenant.cmp(&other.tenant))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Turn {}

impl<T> FairQueue<T> {
    /// Queues `candidates`: each with its priority, tenant and job id (ids are ordered by
    /// creation).
    pub fn new(candidates: impl IntoIterator<Item = (i32, TenantId, JobId, T)>) -> Self {
        let mut levels: BTreeMap<_, HashMap<TenantId, Vec<(JobId, T)>>> = BTreeMap::new();
        for (priority, tenant, id, item) in candidates {
            levels
                .entry(std::cmp::Reverse(priority))
                .or_default()
                .entry(tenant)
                .or_default()
                .push((id, item));
        }
        let levels = levels
            .into_iter()
            .map(|(priority, tenants)| {
                let mut order = BinaryHeap::with_capacity(tenants.len());
                let jobs = tenants
                    .into_iter()
                    .filter_map(|(tenant, mut jobs)| {
                        jobs.sort_by_key(|(id, _)| *id);
                        let head = jobs.first()?.0;
                        order.push(std::cmp::Reverse(Turn {
                            share: f64::NEG_INFINITY,
                            head,
                            tenant: tenant.clone(),
                        }));
                        Some((tenant, VecDeque::from(jobs)))
                    })
                    .collect();
                (priority, Level { jobs, order })
            })
            .collect();
        Self { levels }
    }

    /// The next candidate: of the highest priority waiting, the tenant with the lowest
    /// weighted share under `shares` (the oldest head first among equals), its oldest job.
    ///
    /// `shares` may only grow from one call to the next (a round charges the jobs it places),
    /// which the order relies on: a tenant is looked at again only once the share it was last
    /// seen with comes first.
    pub fn next(&mut self, shares: &Shares) -> Option<(TenantId, T)> {
        loop {
            let mut entry = self.levels.first_entry()?;
            let picked = entry.get_mut().pick(shares);
            if entry.get().order.is_empty() {
                entry.remove();
            }
            if picked.is_some() {
                return picked;
            }
        }
    }
}

impl<T> Level<T> {
    /// This priority's next candidate (see [`FairQueue::next`]); `None` once none is left.
    fn pick(&mut self, shares: &Shares) -> Option<(TenantId, T)> {
        loop {
            let std::cmp::Reverse(turn) = self.order.pop()?;
            let share = shares.weighted_share(&turn.tenant);
            if share.total_cmp(&turn.share).is_ne() {
                debug_assert!(share > turn.share, "a share went down within a round");
                // Its share moved since: back in its place, and look again.
                self.order.push(std::cmp::Reverse(Turn { share, ..turn }));
                continue;
            }
            let Some(jobs) = self.jobs.get_mut(&turn.tenant) else {
                continue;
            };
            let Some((_, item)) = jobs.pop_front() else {
                self.jobs.remove(&turn.tenant);
                continue;
            };
            match jobs.front() {
                Some(&(head, _)) => self.order.push(std::cmp::Reverse(Turn {
                    share,
                    head,
                    tenant: turn.tenant.clone(),
                })),
                None => {
                    self.jobs.remove(&turn.tenant);
                }
            }
            return Some((turn.tenant, item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        name.parse().unwrap()
    }

    fn shares(slots: u64) -> Shares {
        Shares {
            capacity: Capacity {
                slots,
                cpu_millis: 0,
                memory_mb: 0,
            },
            ..Shares::default()
        }
    }

    #[test]
    fn the_highest_priority_comes_first_then_the_oldest() {
        let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
        let mut queue = FairQueue::new([
            (0, tenant("t"), a, "a"),
            (5, tenant("t"), c, "c"),
            (0, tenant("t"), b, "b"),
        ]);
        let s = shares(10);
        let order: Vec<_> = std::iter::from_fn(|| queue.next(&s).map(|(_, i)| i)).collect();
        assert_eq!(order, ["c", "a", "b"]);
    }

    #[test]
    fn capacity_goes_by_weight_between_tenants_of_one_priority() {
        let mut s = shares(40);
        s.policies.insert(
            tenant("big"),
            TenantPolicy {
                weight: 3,
                ..TenantPolicy::default()
            },
        );
        let candidates = (0..100)
            .map(|i| (0, tenant("big"), JobId::new(), i))
            .chain((0..100).map(|i| (0, tenant("small"), JobId::new(), 1000 + i)));
        let mut queue = FairQueue::new(candidates);
        let (mut big, mut small) = (0, 0);
        for _ in 0..40 {
            let (t, _) = queue.next(&s).unwrap();
            s.charge(&t, &Resources::default());
            if t == tenant("big") {
                big += 1;
            } else {
                small += 1;
            }
        }
        assert_eq!((big, small), (30, 10));
        let view = s.view(&[]);
        assert_eq!(view.len(), 2);
        assert!((view[0].entitled - 0.75).abs() < 1e-9, "{view:?}");
        assert!((view[0].share - 0.75).abs() < 1e-9, "{view:?}");
    }

    #[test]
    fn the_order_is_what_comparing_every_tenant_at_every_pick_gives() {
        // A small deterministic generator: the same sequence on every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut s = Shares {
            capacity: Capacity {
                slots: 500,
                cpu_millis: 100_000,
                memory_mb: 100_000,
            },
            ..Shares::default()
        };
        let tenants: Vec<TenantId> = (0..20).map(|t| tenant(&format!("t{t}"))).collect();
        for (i, t) in tenants.iter().enumerate() {
            let weight = u32::try_from(i % 4 + 1).unwrap();
            s.policies.insert(
                t.clone(),
                TenantPolicy {
                    weight,
                    ..TenantPolicy::default()
                },
            );
            for _ in 0..next(5) {
                s.charge(t, &Resources::new(next(2_000), next(2_000)));
            }
        }
        let mut waiting: Vec<(i32, TenantId, JobId)> = (0..400)
            .map(|_| {
                let t = tenants[usize::try_from(next(20)).unwrap()].clone();
                (i32::try_from(next(3)).unwrap(), t, JobId::new())
            })
            .collect();
        let mut queue = FairQueue::new(waiting.iter().map(|(p, t, id)| (*p, t.clone(), *id, *id)));
        while !waiting.is_empty() {
            // Of the highest priority, the tenant with the lowest share (then the oldest
            // head), its oldest job: every tenant compared afresh.
            let top = waiting.iter().map(|(p, _, _)| *p).max().unwrap();
            let expected = waiting
                .iter()
                .filter(|(p, _, _)| *p == top)
                .min_by(|(_, a, a_id), (_, b, b_id)| {
                    s.weighted_share(a)
                        .total_cmp(&s.weighted_share(b))
                        .then(a_id.cmp(b_id))
                })
                .map(|(_, _, id)| *id)
                .unwrap();
            let (tenant, picked) = queue.next(&s).unwrap();
            assert_eq!(picked, expected);
            waiting.retain(|(_, _, id)| *id != picked);
            // Most picks are placed and charged; some are held or find no worker.
            if next(4) != 0 {
                s.charge(&tenant, &Resources::new(next(1_000), next(1_000)));
            }
        }
        assert!(queue.next(&s).is_none());
    }

    #[test]
    fn a_tenant_that_holds_capacity_waits_behind_one_that_holds_none() {
        let mut s = shares(10);
        s.charge(&tenant("busy"), &Resources::default());
        let older = JobId::new();
        let mut queue = FairQueue::new([
            (0, tenant("busy"), older, "busy"),
            (0, tenant("idle"), JobId::new(), "idle"),
        ]);
        assert_eq!(queue.next(&s).unwrap().1, "idle");
        assert_eq!(queue.next(&s).unwrap().1, "busy");
        assert!(queue.next(&s).is_none());
    }

    #[test]
    fn quotas_hold_and_name_themselves() {
        let policy = TenantPolicy {
            max_running_jobs: Some(2),
            max_cpu_millis: Some(1000),
            max_queued_jobs: Some(5),
            ..TenantPolicy::default()
        };
        let mut usage = Usage::default();
        assert_eq!(policy.running_hold(&usage, &Resources::new(1000, 0)), None);
        let hold = policy
            .running_hold(&usage, &Resources::new(1001, 0))
            .unwrap();
        assert_eq!(hold.quota, Quota::CpuMillis);
        usage.add(&Resources::new(500, 0));
        usage.add(&Resources::new(0, 0));
        let hold = policy.running_hold(&usage, &Resources::default()).unwrap();
        assert_eq!(hold.quota, Quota::RunningJobs);
        assert!(
            hold.reason(&tenant("t"))
                .contains("max_running_jobs (2 of 2"),
            "{}",
            hold.reason(&tenant("t"))
        );
        assert!(policy.queue_hold(4).is_none());
        assert_eq!(policy.queue_hold(5).unwrap().quota, Quota::QueuedJobs);
        let bad = TenantPolicy {
            weight: 0,
            max_memory_mb: Some(u64::MAX),
            ..TenantPolicy::default()
        };
        let fields: Vec<String> = bad
            .validate()
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["weight", "max_memory_mb"]);
    }

    #[test]
    fn a_tenant_s_jobs_count_with_no_more_than_its_max_priority() {
        let mut s = shares(10);
        s.policies.insert(
            tenant("capped"),
            TenantPolicy {
                max_priority: Some(10),
                ..TenantPolicy::default()
            },
        );
        assert_eq!(s.priority(&tenant("capped"), 1000), 10);
        assert_eq!(s.priority(&tenant("capped"), 5), 5);
        assert_eq!(s.priority(&tenant("capped"), -1000), -1000);
        assert_eq!(s.priority(&tenant("free"), 1000), 1000);
        // Ordered with what they count with: the capped tenant's older 1000 waits behind 50.
        let capped = JobId::new();
        let free = JobId::new();
        let mut queue = FairQueue::new([
            (
                s.priority(&tenant("capped"), 1000),
                tenant("capped"),
                capped,
                "capped",
            ),
            (
                s.priority(&tenant("free"), 50),
                tenant("free"),
                free,
                "free",
            ),
        ]);
        assert_eq!(queue.next(&s).unwrap().1, "free");
        assert_eq!(queue.next(&s).unwrap().1, "capped");
        for (max_priority, valid) in [
            (Some(-1000), true),
            (Some(1000), true),
            (None, true),
            (Some(1001), false),
            (Some(-1001), false),
        ] {
            let policy = TenantPolicy {
                max_priority,
                ..TenantPolicy::default()
            };
            match policy.validate() {
                Ok(()) => assert!(valid, "{max_priority:?} accepted"),
                Err(e) => {
                    assert!(!valid, "{max_priority:?} refused: {e:?}");
                    assert_eq!(e.0[0].field, "max_priority");
                }
            }
        }
    }
}
