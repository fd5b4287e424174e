//! Criterion benchmarks of a job event's way into its envelope, as the outbox writes it
//! (`Outgoing::job_event`), per kind of event, and of its parts: the envelope's JSON alone, the
//! subject alone, one time (`chrono`'s `Serialize` and `hodei_domain::time::rfc3339`), one
//! UUID and one job id. The event bus scenario (`hodei-bench event-bus`) measures the whole
//! path with NATS; these say where a serialisation's time goes.

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hodei_domain::JobEvent;
use hodei_messaging::{Outgoing, OutgoingEnvelope, subjects};

const SOURCE: &str = "hodei/scheduler";

#[path = "../src/job_events.rs"]
mod job_events;

/// One job's submitted, assigned, started and finished events.
fn events() -> Result<Vec<(&'static str, JobEvent)>, String> {
    let fixture = job_events::Fixture::new()?;
    let events = fixture.one_job(Utc::now()).map_err(|e| e.to_string())?;
    Ok(["submitted", "assigned", "started", "finished"]
        .into_iter()
        .zip(events)
        .collect())
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
