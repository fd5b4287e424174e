//! `event-bus`: real job events (a pool built by driving jobs through submit, assign, start and
//! finish in `hodei_domain`) serialised exactly as the outbox does (`Outgoing::job_event`: the
//! CloudEvents envelope as JSON, on `hodei.v1.evt.job.<id>.<event>`), then:
//!
//! - over core NATS: one connection publishes, batch after batch, another subscribes to
//!   `hodei.v1.evt.>` and counts; events/s from the first publish to the last receipt;
//! - the reference, in the same run and on the same server: the same bytes, serialised
//!   beforehand, published and received the same way;
//! - in process: serialised the same way and passed through a tokio mpsc channel.
//!
//! The publisher never runs more than a window ahead of the subscriber, so no message is
//! dropped as a slow consumer; the breakdown (serialisation alone, envelope decoding alone)
//! says where the time goes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use hodei_domain::JobEvent;
use hodei_messaging::{Envelope, Outgoing, subjects};
use hodei_test_support::TestNats;

use crate::job_events::Fixture;
use crate::report::Outcome;

const S: &str = "event-bus";
/// Distinct events in the pool the runs cycle through.
const POOL: usize = 10_000;
/// Events published between checks of the subscriber's progress.
const BATCH: usize = 1_000;
/// Most events the publisher may be ahead of the subscriber.
const WINDOW: u64 = 50_000;
/// Source in the envelopes, as a service would set it.
const SOURCE: &str = "hodei/scheduler";

/// Parameters of `event-bus`.
pub struct EventBusParams {
    pub events: usize,
}

pub async fn event_bus(p: EventBusParams) -> anyhow::Result<Outcome> {
    let nats = TestNats::start().await?;
    let result = run(&nats, &p).await;
    drop(nats);
    result
}

/// A pool of real job events: submitted, assigned, started, succeeded, job after job.
fn event_pool() -> anyhow::Result<Vec<JobEvent>> {
    let fixture = Fixture::new().map_err(anyhow::Error::msg)?;
    let mut events = Vec::with_capacity(POOL);
    while events.len() < POOL {
        events.extend(fixture.one_job(Utc::now())?);
    }
    events.truncate(POOL);
    Ok(events)
}

async fn run(nats: &TestNats, p: &EventBusParams) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let pool = Arc::new(event_pool()?);
    let serialised: Vec<Outgoing> = pool
        .iter()
        .map(|e| Outgoing::job_event(e, SOURCE))
        .collect::<Result<_, _>>()?;
    let mean_size =
        serialised.iter().map(|o| o.payload.len()).sum::<usize>() as f64 / serialised.len() as f64;
    let raw: Arc<Vec<(String, Bytes)>> = Arc::new(
        serialised
            .iter()
            .map(|o| (o.subject.clone(), Bytes::from(o.payload.clone())))
            .collect(),
    );

    // Breakdown: what one core does alone.
    let t = Instant::now();
    for i in 0..p.events {
        let o = Outgoing::job_event(&pool[i % POOL], SOURCE)?;
        std::hint::black_box(o);
    }
    let serialise_rate = p.events as f64 / t.elapsed().as_secs_f64();
    let decodes = p.events.min(200_000);
    let t = Instant::now();
    for i in 0..decodes {
        let envelope: Envelope = serde_json::from_slice(&raw[i % POOL].1)?;
        std::hint::black_box(envelope);
    }
    let decode_rate = decodes as f64 / t.elapsed().as_secs_f64();

    let url = nats.url();
    let reference = over_nats(&url, p.events, Payloads::Raw(raw.clone())).await?;
    let domain = over_nats(&url, p.events, Payloads::Serialise(pool.clone())).await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let in_process_single = in_process_one_by_one(&pool, p.events).await?;
    let in_process_handed_one = in_process_handed(&pool, p.events, 1).await?;
    let in_process_per_core = in_process_handed(&pool, p.events, cores).await?;
    let packed_rate = over_nats(&url, p.events, Payloads::Packed(Arc::new(packed(&raw)))).await?;

    out.figure(
        S,
        "domain events/s over core nats (serialise, publish, receive)",
        domain,
        "1/s",
        Some(">= 1,500,000"),
    );
    out.figure(
        S,
        "reference: raw core nats publish of the same bytes/s",
        reference,
        "1/s",
        None,
    );
    out.figure(
        S,
        "ratio: domain events to raw publish",
        domain / reference,
        "x",
        None,
    );
    out.figure(
        S,
        format!("reference: the same bytes, {PACKED} envelopes per nats message"),
        packed_rate,
        "1/s",
        None,
    );
    out.figure(
        S,
        "domain events/s in process (serialise, tokio mpsc, receive), one at a time",
        in_process_single,
        "1/s",
        Some(">= 1,500,000"),
    );
    out.figure(
        S,
        format!("domain events/s in process, handed over {HANDED} at a time, one publisher"),
        in_process_handed_one,
        "1/s",
        Some(">= 1,500,000"),
    );
    out.figure(
        S,
        format!("domain events/s in process, handed over {HANDED} at a time, {cores} publishers"),
        in_process_per_core,
        "1/s",
        Some(">= 1,500,000"),
    );
    out.figure(
        S,
        "breakdown: Outgoing::job_event alone, one core",
        serialise_rate,
        "1/s",
        None,
    );
    out.figure(
        S,
        "breakdown: envelope decode alone, one core",
        decode_rate,
        "1/s",
        None,
    );
    out.figure(S, "mean envelope size", mean_size, "B", None);
    out.note(format!(
        "event-bus: {} events cycled from a pool of {POOL} real job events (submitted with \
         spec, assigned, started, succeeded); published on hodei.v1.evt.job.<id>.<event> by one \
         connection, {BATCH} at a time, never more than {WINDOW} ahead of the subscriber (a \
         second connection on hodei.v1.evt.>, counting, not decoding); the reference publishes \
         the same bytes serialised beforehand; the in-process path sends the Outgoing messages \
         through a tokio mpsc channel (65,536 messages) to a task that counts: one at a time \
         from one publisher, then {HANDED} at a time (as a commit hands its messages to the \
         relay) from one publisher and from one per core ({cores}), each serialising its share, \
         the counting task on the same {cores} worker threads; \
         the packed reference (not what hodei publishes) shows what the transport carries when \
         messages hold {PACKED} envelopes each",
        p.events
    ));
    Ok(out)
}

/// What the publisher sends: bytes serialised beforehand, events serialised as it goes, or
/// bytes serialised beforehand with several envelopes per message.
enum Payloads {
    Raw(Arc<Vec<(String, Bytes)>>),
    Serialise(Arc<Vec<JobEvent>>),
    Packed(Arc<Vec<(String, Bytes)>>),
}

impl Payloads {
    /// Events per message.
    fn per_message(&self) -> u64 {
        match self {
            Payloads::Packed(_) => PACKED as u64,
            Payloads::Raw(_) | Payloads::Serialise(_) => 1,
        }
    }
}

/// Messages a publisher hands over at a time in process, as a commit of that many does.
const HANDED: usize = 64;

/// Envelopes per message in the packed reference.
const PACKED: usize = 100;

/// The pool's envelopes, `PACKED` per message, one per line.
fn packed(raw: &[(String, Bytes)]) -> Vec<(String, Bytes)> {
    raw.chunks(PACKED)
        .enumerate()
        .map(|(n, chunk)| {
            let mut joined = Vec::with_capacity(chunk.iter().map(|(_, b)| b.len() + 1).sum());
            for (_, bytes) in chunk {
                joined.extend_from_slice(bytes);
                joined.push(b'\n');
            }
            (
                format!("{}.evt.bench.batch{n}", subjects::PREFIX),
                Bytes::from(joined),
            )
        })
        .collect()
}

/// Publishes `count` messages on one connection and receives them on another; messages/s from
/// the first publish to the last receipt.
async fn over_nats(url: &str, count: usize, payloads: Payloads) -> anyhow::Result<f64> {
    let publisher = async_nats::ConnectOptions::new()
        .name("hodei-bench-event-publisher")
        .connect(url)
        .await
        .context("failed to connect the event publisher")?;
    let receiver = async_nats::ConnectOptions::new()
        .name("hodei-bench-event-subscriber")
        .subscription_capacity(1 << 17)
        .connect(url)
        .await
        .context("failed to connect the event subscriber")?;
    let mut subscription = receiver
        .subscribe(subjects::all_events())
        .await
        .context("failed to subscribe to events")?;
    // The subscription is in place once a probe published on the other connection arrives.
    let probe = format!("{}.evt.bench.probe", subjects::PREFIX);
    let ready_by = Instant::now() + Duration::from_secs(10);
    loop {
        anyhow::ensure!(
            Instant::now() < ready_by,
            "the event subscription received no probe within 10 s"
        );
        publisher.publish(probe.clone(), Bytes::new()).await?;
        publisher.flush().await?;
        if let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(50), subscription.next()).await
        {
            break;
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let per = payloads.per_message();
    let total = u64::try_from(count).unwrap_or(u64::MAX).div_ceil(per) * per;
    let counter = received.clone();
    let counting = tokio::spawn(async move {
        let mut last = Instant::now();
        while counter.load(Ordering::Relaxed) < total {
            match tokio::time::timeout(Duration::from_secs(5), subscription.next()).await {
                Ok(Some(message)) if message.subject.as_str() == probe => {}
                Ok(Some(message)) => {
                    std::hint::black_box(message.payload.len());
                    counter.fetch_add(per, Ordering::Relaxed);
                    last = Instant::now();
                }
                Ok(None) | Err(_) => break,
            }
        }
        last
    });
    let started = Instant::now();
    let mut sent: u64 = 0;
    while sent < total {
        let n = (total - sent).min(BATCH as u64 * per);
        for k in (sent..sent + n).step_by(usize::try_from(per).unwrap_or(1)) {
            let i = usize::try_from(k).unwrap_or(0) % POOL;
            match &payloads {
                Payloads::Packed(packed) => {
                    let (subject, bytes) = &packed[i / PACKED % packed.len()];
                    publisher.publish(subject.clone(), bytes.clone()).await?;
                }
                Payloads::Raw(raw) => {
                    let (subject, bytes) = &raw[i];
                    publisher.publish(subject.clone(), bytes.clone()).await?;
                }
                Payloads::Serialise(events) => {
                    let o = Outgoing::job_event(&events[i], SOURCE)?;
                    publisher.publish(o.subject, o.payload.into()).await?;
                }
            }
        }
        sent += n;
        while sent.saturating_sub(received.load(Ordering::Relaxed)) > WINDOW {
            if counting.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    publisher
        .flush()
        .await
        .context("failed to flush the publisher")?;
    let last = counting.await.context("the event subscriber panicked")?;
    let got = received.load(Ordering::Relaxed);
    anyhow::ensure!(
        got == total,
        "only {got} of {total} events received (the subscriber stalled for 5 s)"
    );
    Ok(total as f64 / (last - started).as_secs_f64())
}

/// Serialises `count` events as the outbox does and passes each through a tokio mpsc channel
/// to a task that counts them; events/s from the first send to the last receipt.
async fn in_process_one_by_one(pool: &[JobEvent], count: usize) -> anyhow::Result<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(1 << 16);
    let counting = tokio::spawn(async move {
        let mut n = 0_usize;
        while let Some(o) = rx.recv().await {
            std::hint::black_box(o.payload.len());
            n += 1;
        }
        (n, Instant::now())
    });
    let started = Instant::now();
    for i in 0..count {
        let o = Outgoing::job_event(&pool[i % POOL], SOURCE)?;
        tx.send(o)
            .await
            .map_err(|_| anyhow::anyhow!("the in-process receiver stopped"))?;
    }
    drop(tx);
    let (n, last) = counting.await.context("the in-process receiver panicked")?;
    anyhow::ensure!(n == count, "only {n} of {count} events received in process");
    Ok(count as f64 / (last - started).as_secs_f64())
}

/// Serialises `count` events as the outbox does, on `publishers` tasks, and hands them to one
/// task that counts them through a tokio mpsc channel, [`HANDED`] at a time (a commit hands its
/// messages to the relay as one `Vec`, as `hodei_runtime::relay::Handoff` does); events/s from
/// the first serialisation to the last receipt.
async fn in_process_handed(
    pool: &Arc<Vec<JobEvent>>,
    count: usize,
    publishers: usize,
) -> anyhow::Result<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Outgoing>>((1 << 16) / HANDED);
    let counting = tokio::spawn(async move {
        let mut n = 0_usize;
        while let Some(handed) = rx.recv().await {
            for o in &handed {
                std::hint::black_box(o.payload.len());
            }
            n += handed.len();
        }
        (n, Instant::now())
    });
    let started = Instant::now();
    let mut sending = Vec::with_capacity(publishers);
    for publisher in 0..publishers {
        let (tx, pool) = (tx.clone(), pool.clone());
        let share = count / publishers + usize::from(publisher < count % publishers);
        sending.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = HANDED.min(share - sent);
                let mut handed = Vec::with_capacity(n);
                for i in sent..sent + n {
                    let event = &pool[(i * publishers + publisher) % pool.len()];
                    handed.push(Outgoing::job_event(event, SOURCE)?);
                }
                tx.send(handed)
                    .await
                    .map_err(|_| anyhow::anyhow!("the in-process receiver stopped"))?;
                sent += n;
            }
            anyhow::Ok(())
        }));
    }
    drop(tx);
    for publisher in sending {
        publisher
            .await
            .context("an in-process publisher panicked")??;
    }
    let (n, last) = counting.await.context("the in-process receiver panicked")?;
    anyhow::ensure!(n == count, "only {n} of {count} events received in process");
    Ok(count as f64 / (last - started).as_secs_f64())
}
