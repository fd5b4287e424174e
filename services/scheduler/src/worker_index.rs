//! The live workers indexed for placement, so a decision does not scan the fleet: workers are
//! grouped by their label set (a fleet has few distinct ones), and each group is kept in
//! placement preference order. A decision looks only at the groups whose labels the job
//! requires, and in each at its first workers until one fits; the best of those is the worker
//! a scan of the whole fleet ([`crate::placement::best`]) would pick.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use hodei_domain::specification::{AllOf, Specification};
use hodei_domain::worker::can_take_job;
use hodei_domain::{Job, Worker, WorkerId};

/// Placement preference (greater is better): most free slots, then most free CPU, then the
/// smallest id, so equal workers are picked in a stable order (spread).
type Key = (u32, u64, Reverse<WorkerId>);

fn key(w: &Worker) -> Key {
    (
        w.free_slots(),
        w.free_capacity().cpu_millis,
        Reverse(w.id().clone()),
    )
}

/// Workers that share one label set, best first when iterated in reverse.
#[derive(Debug)]
struct Group {
    labels: BTreeMap<String, String>,
    order: BTreeSet<(Key, usize)>,
}

/// The live workers, by id and by label set in preference order.
#[derive(Debug, Default)]
pub struct WorkerIndex {
    workers: Vec<Worker>,
    by_id: HashMap<WorkerId, usize>,
    /// Each worker's group, by the worker's position.
    group_of: Vec<usize>,
    groups: Vec<Group>,
    group_by_labels: HashMap<BTreeMap<String, String>, usize>,
}

impl WorkerIndex {
    pub fn new(workers: Vec<Worker>) -> Self {
        let mut index = WorkerIndex {
            by_id: HashMap::with_capacity(workers.len()),
            group_of: Vec::with_capacity(workers.len()),
            ..WorkerIndex::default()
        };
        for (i, worker) in workers.iter().enumerate() {
            let g = index.group_for(worker.labels());
            index.groups[g].order.insert((key(worker), i));
            index.group_of.push(g);
            index.by_id.insert(worker.id().clone(), i);
        }
        index.workers = workers;
        index
    }

    /// The group of the workers labelled `labels`, made if there is none.
    fn group_for(&mut self, labels: &BTreeMap<String, String>) -> usize {
        if let Some(g) = self.group_by_labels.get(labels) {
            return *g;
        }
        self.groups.push(Group {
            labels: labels.clone(),
            order: BTreeSet::new(),
        });
        let g = self.groups.len() - 1;
        self.group_by_labels.insert(labels.clone(), g);
        g
    }

    /// Every worker, in the order read.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn get(&self, id: &WorkerId) -> Option<&Worker> {
        self.by_id.get(id).map(|i| &self.workers[*i])
    }

    /// The worker that can take `job` and comes first in preference, as
    /// [`crate::placement::best`] picks it.
    pub fn best(&self, job: &Job) -> Option<&Worker> {
        self.best_for(&job.spec().required_labels, &can_take_job(job.spec()))
    }

    /// The worker that meets `spec` (which requires `required` labels) and comes first in
    /// preference.
    pub fn best_for(
        &self,
        required: &BTreeMap<String, String>,
        spec: &AllOf<Worker>,
    ) -> Option<&Worker> {
        self.groups
            .iter()
            .filter(|g| required.iter().all(|(k, v)| g.labels.get(k) == Some(v)))
            .filter_map(|g| {
                g.order
                    .iter()
                    .rev()
                    .map(|(_, i)| &self.workers[*i])
                    // Sorted by free slots first: past the first full worker, all are full.
                    .take_while(|w| w.free_slots() > 0)
                    .find(|w| spec.is_satisfied_by(w))
            })
            .max_by_key(|w| key(w))
    }

    /// Changes worker `id` with `change`, keeping its place in the order; `None` if the index
    /// does not have it.
    pub fn update<R>(&mut self, id: &WorkerId, change: impl FnOnce(&mut Worker) -> R) -> Option<R> {
        let i = *self.by_id.get(id)?;
        let before = key(&self.workers[i]);
        self.groups[self.group_of[i]].order.remove(&(before, i));
        let result = change(&mut self.workers[i]);
        // A newer copy of the worker may carry other labels.
        let g = match self.group_by_labels.get(self.workers[i].labels()) {
            Some(g) => *g,
            None => {
                let labels = self.workers[i].labels().clone();
                self.group_for(&labels)
            }
        };
        self.group_of[i] = g;
        self.groups[g].order.insert((key(&self.workers[i]), i));
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;
    use hodei_domain::spec::JobSpecDraft;
    use hodei_domain::{AttemptId, AttemptNumber, JobId, JobSpec, Resources, TenantId};

    use super::*;
    use crate::placement::best;

    fn workers(n: usize) -> Vec<Worker> {
        let now = Utc::now();
        (0..n)
            .map(|i| {
                let labels = BTreeMap::from([
                    (
                        "os".to_owned(),
                        if i.is_multiple_of(3) {
                            "macos"
                        } else {
                            "linux"
                        }
                        .to_owned(),
                    ),
                    ("pool".to_owned(), format!("p{}", i % 4)),
                ]);
                let cpu = 1000 * (1 + (i as u64 * 7) % 4);
                Worker::register(
                    format!("w{i:03}").parse().unwrap(),
                    labels,
                    Resources::new(cpu, 4096),
                    1 + (i as u32 * 5) % 4,
                    now,
                )
                .0
            })
            .collect()
    }

    fn job(i: usize) -> Job {
        let mut d = JobSpecDraft::exec("j", &["true"]);
        if i.is_multiple_of(2) {
            d.required_labels.insert("os".into(), "linux".into());
        }
        if i.is_multiple_of(5) {
            d.required_labels
                .insert("pool".into(), format!("p{}", i % 4));
        }
        d.resources = Resources::new(250 * (i as u64 % 6), 100);
        Job::submit(
            JobId::new(),
            TenantId::default(),
            JobSpec::try_from(d).unwrap(),
            Utc::now(),
        )
        .0
    }

    /// Placing 300 jobs one after the other, reserving each on the worker chosen, the index
    /// picks what a scan of every worker picks, every time, until the fleet is full.
    #[test]
    fn the_index_picks_what_a_scan_picks() {
        let mut index = WorkerIndex::new(workers(60));
        let now = Utc::now();
        let mut placed = 0;
        for i in 0..300 {
            let job = job(i);
            let scanned = best(index.workers(), &job).map(|w| w.id().clone());
            let indexed = index.best(&job).map(|w| w.id().clone());
            assert_eq!(indexed, scanned, "job {i}");
            if let Some(id) = indexed {
                let attempt = AttemptId::new(job.id(), AttemptNumber::new(1));
                index
                    .update(&id, |w| w.reserve(attempt, job.spec().resources, now))
                    .unwrap()
                    .unwrap();
                placed += 1;
            }
        }
        assert!(placed > 50, "{placed}");
        assert!(index.best(&job(1)).is_none() || placed < 300);
    }
}
