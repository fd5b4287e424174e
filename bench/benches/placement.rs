//! Criterion benchmarks of the scheduler core alone: `placement::rank` (filter with the job's
//! specification, then order) against 10,000 workers — one placement decision per iteration,
//! so elements/s is decisions/s — the same decision through the scheduler's `WorkerIndex`,
//! the `can_take` specification, built and evaluated, and a placement round with fair share
//! on: 100 tenants with weights, their queues' heads ordered by `FairQueue`, each decision
//! checking the tenant's quotas, picking the best of 10,000 workers through the index and
//! charging the tenant.

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::worker::can_take;
use hodei_domain::{
    AttemptId, AttemptNumber, Capacity, FairQueue, Job, JobId, JobSpec, Resources, Shares,
    Specification, TenantId, TenantPolicy, Usage, Worker, WorkerId,
};
use hodei_scheduler::placement;
use hodei_scheduler::worker_index::WorkerIndex;

const WORKERS: usize = 10_000;

/// 10,000 ready workers: 90% `os=linux`, ten pools, some already holding attempts.
fn workers() -> Vec<Worker> {
    let now = Utc::now();
    let mut out = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let Ok(id) = format!("worker-{i:05}").parse::<WorkerId>() else {
            continue;
        };
        let os = if i % 10 == 0 { "macos" } else { "linux" };
        let labels = BTreeMap::from([
            ("os".to_owned(), os.to_owned()),
            ("pool".to_owned(), format!("pool-{}", i % 10)),
        ]);
        let (mut worker, _) = Worker::register(id, labels, Resources::new(4000, 8192), 4, now);
        for _ in 0..(i % 4) {
            let attempt = AttemptId::new(JobId::new(), AttemptNumber::new(1));
            let _ = worker.reserve(attempt, Resources::new(500, 512), now);
        }
        out.push(worker);
    }
    out
}

/// A job needing `os=linux`, half a core and 256 MiB.
fn job() -> Option<Job> {
    let mut draft = JobSpecDraft::exec("noop", &["true"]);
    draft.required_labels = BTreeMap::from([("os".to_owned(), "linux".to_owned())]);
    draft.resources = Resources::new(500, 256);
    let spec = JobSpec::try_from(draft).ok()?;
    Some(Job::submit(JobId::new(), TenantId::default(), spec, Utc::now()).0)
}

fn bench(c: &mut Criterion) {
    let workers = workers();
    let Some(job) = job() else {
        eprintln!("could not build the benchmark job");
        return;
    };
    let mut group = c.benchmark_group("placement");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rank_10k_workers", |b| {
        b.iter(|| black_box(placement::rank(black_box(&workers), black_box(&job))).len());
    });
    // The best worker in one pass over all of them.
    group.bench_function("best_of_10k_workers", |b| {
        b.iter(|| black_box(placement::best(black_box(&workers), black_box(&job))).is_some());
    });
    // What a placement runs: the best worker through the scheduler's index (label sets, then
    // preference order).
    let index = WorkerIndex::new(workers.clone());
    group.bench_function("indexed_best_of_10k_workers", |b| {
        b.iter(|| black_box(black_box(&index).best(black_box(&job))).is_some());
    });
    group.finish();

    let mut group = c.benchmark_group("can_take");
    let labels = job.spec().required_labels.clone();
    let resources = job.spec().resources;
    group.throughput(Throughput::Elements(1));
    group.bench_function("build", |b| {
        b.iter(|| can_take(black_box(&labels), black_box(resources)));
    });
    let spec = can_take(&labels, resources);
    group.throughput(Throughput::Elements(WORKERS as u64));
    group.bench_function("evaluate_10k_workers", |b| {
        b.iter(|| {
            black_box(&workers)
                .iter()
                .filter(|w| spec.is_satisfied_by(w))
                .count()
        });
    });
    group.finish();
}

const TENANTS: usize = 100;
/// Jobs at the head of each tenant's queue in a round (the scheduler reads 16).
const HEADS: usize = 16;
/// Decisions timed per iteration: one placement round.
const ROUND: usize = 256;

/// 100 tenants with weights 1 to 4 (every tenth with quotas), each using some of the fleet,
/// and the heads of their queues: 16 jobs each over three priorities.
fn fair_share_setup(workers: &[Worker], job: &Job) -> (Shares, Vec<(i32, TenantId, JobId, Job)>) {
    let mut shares = Shares {
        capacity: Capacity::of(workers),
        ..Shares::default()
    };
    let mut candidates = Vec::with_capacity(TENANTS * HEADS);
    for t in 0..TENANTS {
        let Ok(tenant) = format!("tenant-{t:03}").parse::<TenantId>() else {
            continue;
        };
        let weight = u32::try_from(t % 4 + 1).unwrap_or(1);
        shares.policies.insert(
            tenant.clone(),
            TenantPolicy {
                weight,
                max_running_jobs: (t % 10 == 0).then_some(1_000_000),
                ..TenantPolicy::default()
            },
        );
        let running = u64::try_from(t * 37 % 200).unwrap_or(0);
        shares.usage.insert(
            tenant.clone(),
            Usage {
                running_jobs: running,
                cpu_millis: running * 500,
                memory_mb: running * 256,
            },
        );
        for h in 0..HEADS {
            let priority = i32::try_from(h % 3).unwrap_or(0);
            let job = Job::submit(JobId::new(), tenant.clone(), job.spec().clone(), Utc::now()).0;
            candidates.push((priority, tenant.clone(), job.id(), job));
        }
    }
    (shares, candidates)
}

fn fair_share(c: &mut Criterion) {
    let workers = workers();
    let Some(job) = job() else {
        eprintln!("could not build the benchmark job");
        return;
    };
    let (shares, candidates) = fair_share_setup(&workers, &job);
    let mut group = c.benchmark_group("fair_share");
    group.sample_size(20);
    group.throughput(Throughput::Elements(ROUND as u64));
    // What a round decides per job with fair share on: the next job by priority and weighted
    // share, its tenant's quotas, the best of 10,000 workers (through the scheduler's index),
    // the reservation and the charge.
    group.bench_function("round_10k_workers_100_tenants", |b| {
        b.iter_batched(
            || {
                (
                    WorkerIndex::new(workers.clone()),
                    shares.clone(),
                    FairQueue::new(candidates.iter().cloned()),
                )
            },
            |(mut index, mut shares, mut queue)| {
                let now = Utc::now();
                let mut placed = 0;
                for _ in 0..ROUND {
                    let Some((tenant, job)) = queue.next(&shares) else {
                        break;
                    };
                    if shares.hold(&tenant, &job.spec().resources).is_some() {
                        continue;
                    }
                    let Some(id) = index.best(&job).map(|w| w.id().clone()) else {
                        continue;
                    };
                    let attempt = AttemptId::new(job.id(), AttemptNumber::new(1));
                    let reserved = index.update(&id, |w| {
                        w.reserve(attempt, job.spec().resources, now).is_ok()
                    });
                    if reserved == Some(true) {
                        shares.charge(&tenant, &job.spec().resources);
                        placed += 1;
                    }
                }
                // Returned, so that dropping the fleet is not timed.
                (black_box(placed), index, shares, queue)
            },
            criterion::BatchSize::LargeInput,
        );
    });
    // The same round without the policy: 256 jobs of one tenant, each the best of 10,000
    // workers through the index and its reservation there.
    group.bench_function("round_10k_workers_no_policy", |b| {
        b.iter_batched(
            || WorkerIndex::new(workers.clone()),
            |mut index| {
                let now = Utc::now();
                let mut placed = 0;
                for _ in 0..ROUND {
                    let Some(id) = index.best(&job).map(|w| w.id().clone()) else {
                        continue;
                    };
                    let attempt = AttemptId::new(job.id(), AttemptNumber::new(1));
                    if index.update(&id, |w| {
                        w.reserve(attempt, job.spec().resources, now).is_ok()
                    }) == Some(true)
                    {
                        placed += 1;
                    }
                }
                (black_box(placed), index)
            },
            criterion::BatchSize::LargeInput,
        );
    });
    // The fair ordering alone: 1,600 candidates of 100 tenants ordered, one charge each.
    group.throughput(Throughput::Elements((TENANTS * HEADS) as u64));
    group.bench_function("order_1600_heads_100_tenants", |b| {
        b.iter_batched(
            || (shares.clone(), FairQueue::new(candidates.iter().cloned())),
            |(mut shares, mut queue)| {
                let mut n = 0;
                while let Some((tenant, job)) = queue.next(&shares) {
                    shares.charge(&tenant, &job.spec().resources);
                    n += 1;
                }
                (black_box(n), shares, queue)
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, bench, fair_share);
criterion_main!(benches);
