//! Criterion benchmarks of the scheduler core alone: `placement::rank` (filter with the job's
//! specification, then order) against 10,000 workers — one placement decision per iteration,
//! so elements/s is decisions/s — and the `can_take` specification, built and evaluated.

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::worker::can_take;
use hodei_domain::{
    AttemptId, AttemptNumber, Job, JobId, JobSpec, Resources, Specification, TenantId, Worker,
    WorkerId,
};
use hodei_scheduler::placement;

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
    // What a placement runs: the best worker in one pass.
    group.bench_function("best_of_10k_workers", |b| {
        b.iter(|| black_box(placement::best(black_box(&workers), black_box(&job))).is_some());
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

criterion_group!(benches, bench);
criterion_main!(benches);
