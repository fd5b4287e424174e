//! Criterion benchmarks of a job event's way into its envelope, as the outbox writes it
//! (`Outgoing::job_event`), per kind of event, and of its parts: the envelope's JSON alone and
//! the subject alone. The event bus scenario (`hodei-bench event-bus`) measures the whole
//! path with NATS; these say where a serialisation's time goes.

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{AttemptNumber, AttemptOutcome, Job, JobEvent, JobId, JobSpec, TenantId};
use hodei_messaging::{Outgoing, OutgoingEnvelope, subjects};

const SOURCE: &str = "hodei/scheduler";

/// One job's submitted, assigned, started and finished events.
fn events() -> Result<Vec<(&'static str, JobEvent)>, String> {
    let spec = JobSpec::try_from(JobSpecDraft::exec("build", &["make", "-j2", "test"]))
        .map_err(|e| format!("invalid spec: {e}"))?;
    let worker: hodei_domain::WorkerId = "worker-0001".parse().map_err(|e| format!("{e}"))?;
    let now = Utc::now();
    let (mut job, submitted) = Job::submit(JobId::new(), TenantId::default(), spec, now);
    let fail = |e: hodei_domain::DomainError| e.to_string();
    let assigned = job.assign(worker, now).map_err(fail)?;
    let started = job.start(AttemptNumber::new(1), now).map_err(fail)?;
    let finished = job
        .finish(
            AttemptNumber::new(1),
            AttemptOutcome::Exited { code: 0 },
            now,
            0.0,
        )
        .map_err(fail)?;
    Ok(vec![
        ("submitted", submitted),
        ("assigned", assigned),
        ("started", started),
        ("finished", finished),
    ])
}

fn envelope(c: &mut Criterion) {
    let events = match events() {
        Ok(events) => events,
        Err(e) => {
            eprintln!("cannot make the events: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("job_event");
    group.throughput(Throughput::Elements(1));
    for (kind, event) in &events {
        group.bench_function(format!("outgoing/{kind}"), |b| {
            b.iter(|| Outgoing::job_event(black_box(event), SOURCE))
        });
        group.bench_function(format!("json/{kind}"), |b| {
            b.iter(|| serde_json::to_vec(&OutgoingEnvelope::job(black_box(event), SOURCE)))
        });
    }
    let Some((_, event)) = events.first() else {
        return;
    };
    group.bench_function("subject", |b| {
        b.iter(|| subjects::job_event(black_box(&event.job_id), event.kind.name()))
    });
    // The parts below are written into one buffer, cleared each time, so that the figure is
    // the serialisation's and not the growth of a new vector.
    let mut out = Vec::with_capacity(128);
    group.bench_function("timestamp/chrono", |b| {
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, black_box(&event.at))
        })
    });
    group.bench_function("timestamp/rfc3339", |b| {
        b.iter(|| {
            out.clear();
            hodei_domain::time::rfc3339::serialize(
                black_box(&event.at),
                &mut serde_json::Serializer::new(&mut out),
            )
        })
    });
    group.bench_function("uuid", |b| {
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, black_box(&event.event_id))
        })
    });
    group.bench_function("job_id", |b| {
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, black_box(&event.job_id))
        })
    });
    group.finish();
}

criterion_group!(benches, envelope);
criterion_main!(benches);
