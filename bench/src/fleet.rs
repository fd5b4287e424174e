//! A fleet of simulated agents for the heartbeat scenarios: many worker identities beating on
//! their own heartbeat subjects over one NATS connection, their beats spread evenly over the
//! interval (as independent agents would be), each beat numbered. Any of them can be silenced
//! at once; the instant of each agent's last beat is kept. Optionally the fleet takes
//! assignments and holds them: it reports `Started` and keeps the attempt in its heartbeats
//! until the fleet stops, so a silenced worker leaves held jobs behind.
//!
//! The beat number travels in `usage.memory_used_mb` (the registry stores `usage` as sent),
//! so the `workers` table says how many beats of each worker were persisted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use hodei_domain::{AttemptId, ResourceUsage, Resources, WorkerId};
use hodei_messaging::{AgentCommand, AgentReport, Heartbeat, ReportKind, streams, subjects};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Beats are sent in this many slices per interval.
const SLICES: usize = 50;
/// The fleet's consumer on every agent's command subject.
const CONSUMER: &str = "bench-fleet";

/// How many agents, how often, and whether they take work.
pub struct FleetConfig {
    pub agents: usize,
    pub interval: Duration,
    pub hold_jobs: bool,
    /// The lease and kill grace the simulated agents announce.
    pub lease: hodei_domain::LeaseTerms,
}

/// What the beating task and the scenario share.
struct Shared {
    ids: Vec<WorkerId>,
    silenced: Vec<AtomicBool>,
    /// Nanoseconds after `base` of each agent's last beat published.
    last_beat_ns: Vec<AtomicU64>,
    /// Beats published so far, by every agent.
    sent: AtomicU64,
    /// Beats that could not be serialised or published.
    failed: AtomicU64,
    base: Instant,
    base_utc: DateTime<Utc>,
    held: Mutex<HashMap<usize, Vec<AttemptId>>>,
    /// The simulated agents' first incarnation and lease terms.
    incarnation: hodei_domain::IncarnationId,
    /// Agents restarted by [`Fleet::restart`], with their new incarnation.
    restarted: Mutex<HashMap<usize, hodei_domain::IncarnationId>>,
    /// Nanoseconds after `base` of each restarted agent's first beat as its new incarnation.
    restart_beat_ns: Vec<AtomicU64>,
    lease: hodei_domain::LeaseTerms,
}

/// A running fleet; stop it with [`Fleet::stop`].
pub struct Fleet {
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts beating (and, with `hold_jobs`, taking assignments).
    pub async fn start(nats_url: &str, config: FleetConfig) -> anyhow::Result<Fleet> {
        let (client, js) =
            hodei_messaging::connect(nats_url, "hodei-bench-fleet", Duration::from_secs(10))
                .await
                .context("failed to connect the simulated agents")?;
        let ids = (0..config.agents)
            .map(|i| worker_id(i).parse::<WorkerId>())
            .collect::<Result<Vec<_>, _>>()
            .context("failed to make worker ids")?;
        let n = ids.len();
        let shared = Arc::new(Shared {
            ids,
            silenced: (0..n).map(|_| AtomicBool::new(false)).collect(),
            last_beat_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            base: Instant::now(),
            base_utc: Utc::now(),
            held: Mutex::new(HashMap::new()),
            incarnation: hodei_domain::IncarnationId::new(),
            restarted: Mutex::new(HashMap::new()),
            restart_beat_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            lease: config.lease,
        });
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if config.hold_jobs {
            let filter = format!("{}.agent.*.cmd", subjects::PREFIX);
            let consumer =
                streams::consumer(&js, streams::AGENT, streams::durable(CONSUMER, filter))
                    .await
                    .context("failed to create the fleet's command consumer")?;
            let messages = consumer
                .messages()
                .await
                .context("failed to pull the fleet's commands")?;
            let token = stop.clone();
            let shared = shared.clone();
            tasks.spawn(async move {
                let mut batches = messages.ready_chunks(256);
                loop {
                    let batch = tokio::select! {
                        () = token.cancelled() => return,
                        batch = batches.next() => batch,
                    };
                    let Some(batch) = batch else { return };
                    let batch: Vec<jetstream::Message> = batch.into_iter().flatten().collect();
                    hold(&js, &shared, batch).await;
                }
            });
        }
        let token = stop.clone();
        let beating = shared.clone();
        let interval = config.interval;
        tasks.spawn(async move {
            beat(client, beating, interval, token).await;
        });
        Ok(Fleet {
            shared,
            stop,
            tasks,
        })
    }

    /// Beats published so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Beats that failed to serialise or publish.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.shared.ids.len()
    }

    /// Stops the agents at `indexes` from beating, from now on.
    pub fn silence(&self, indexes: &[usize]) {
        for &i in indexes {
            if let Some(flag) = self.shared.silenced.get(i) {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Kills the agents at `indexes` and starts them again at once: what they held is gone,
    /// and their next beats carry a new incarnation.
    pub fn restart(&self, indexes: &[usize]) {
        let mut held = lock(&self.shared.held);
        let mut restarted = lock(&self.shared.restarted);
        for &i in indexes {
            held.remove(&i);
            restarted.insert(i, hodei_domain::IncarnationId::new());
            if let Some(at) = self.shared.restart_beat_ns.get(i) {
                at.store(0, Ordering::SeqCst);
            }
        }
    }

    /// When agent `index` first beat as the incarnation [`Fleet::restart`] gave it.
    pub fn restart_beat(&self, index: usize) -> Option<Instant> {
        let ns = self
            .shared
            .restart_beat_ns
            .get(index)?
            .load(Ordering::SeqCst);
        (ns > 0).then(|| self.shared.base + Duration::from_nanos(ns))
    }

    /// When agent `index` last published a beat, if it ever did.
    pub fn last_beat(&self, index: usize) -> Option<Instant> {
        let ns = self.shared.last_beat_ns.get(index)?.load(Ordering::SeqCst);
        (ns > 0).then(|| self.shared.base + Duration::from_nanos(ns))
    }

    /// The wall-clock time of an instant, on the clock the services stamp rows with.
    pub fn utc_of(&self, at: Instant) -> DateTime<Utc> {
        let since = at.saturating_duration_since(self.shared.base);
        self.shared.base_utc + chrono::Duration::from_std(since).unwrap_or_default()
    }

    /// Attempts held now, by agent index.
    pub fn held(&self) -> HashMap<usize, Vec<AttemptId>> {
        lock(&self.shared.held).clone()
    }

    /// Stops beating and consuming, and waits for the tasks.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// The id of fleet agent `i`.
pub fn worker_id(i: usize) -> String {
    format!("fleet-{i:05}")
}

fn index_of(id: &str) -> Option<usize> {
    id.strip_prefix("fleet-")?.parse().ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publishes one slice of the fleet every `interval / SLICES` until `stop`: agent `i` beats in
/// slice `i % SLICES`, so the fleet's beats are spread evenly. Ticks missed while the machine
/// is busy are caught up at once (the rate offered is kept).
async fn beat(
    client: async_nats::Client,
    shared: Arc<Shared>,
    interval: Duration,
    stop: CancellationToken,
) {
    let labels = BTreeMap::from([("os".to_owned(), "linux".to_owned())]);
    let n = shared.ids.len();
    let mut seq = vec![0_u64; n];
    let mut tick = tokio::time::interval((interval / SLICES as u32).max(Duration::from_micros(1)));
    let mut slice = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = lock(&shared.held).clone();
        let restarted = lock(&shared.restarted).clone();
        let now = Utc::now();
        for i in (slice..n).step_by(SLICES) {
            if shared.silenced[i].load(Ordering::SeqCst) {
                continue;
            }
            seq[i] += 1;
            let id = &shared.ids[i];
            let beat = Heartbeat {
                worker_id: id.clone(),
                incarnation: restarted.get(&i).copied().unwrap_or(shared.incarnation),
                lease_ms: shared.lease.lease_ms,
                kill_grace_ms: shared.lease.kill_grace_ms,
                labels: labels.clone(),
                capacity: Resources::new(4000, 8192),
                max_concurrent_jobs: 4,
                usage: ResourceUsage {
                    memory_used_mb: seq[i],
                    memory_total_mb: 8192,
                    ..ResourceUsage::default()
                },
                running: held.get(&i).cloned().unwrap_or_default(),
                draining: false,
                leaving: false,
                seal_key: None,
                sent_at: now,
            };
            let Ok(payload) = serde_json::to_vec(&beat) else {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if client
                .publish(subjects::heartbeat(id), payload.into())
                .await
                .is_err()
            {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let at = u64::try_from(shared.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            shared.last_beat_ns[i].store(at.max(1), Ordering::SeqCst);
            if restarted.contains_key(&i) {
                // Only the first beat of the new incarnation is kept.
                let _ = shared.restart_beat_ns[i].compare_exchange(
                    0,
                    at.max(1),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        slice = (slice + 1) % SLICES;
        if slice == 0 {
            let _ = client.flush().await;
        }
    }
}

/// Takes a batch of commands: every assignment is held (reported `Started`, kept in the
/// agent's heartbeats); everything is acked.
async fn hold(js: &jetstream::Context, shared: &Shared, batch: Vec<jetstream::Message>) {
    for message in &batch {
        let command = hodei_messaging::decode::<AgentCommand>(&message.subject, &message.payload);
        let worker = subjects::token_after(&message.subject, 3).and_then(|t| {
            let i = index_of(t)?;
            Some((i, shared.ids.get(i)?.clone()))
        });
        if let (
            Ok(AgentCommand::Assign {
                job_id, attempt, ..
            }),
            Some((index, worker_id)),
        ) = (command, worker)
        {
            lock(&shared.held)
                .entry(index)
                .or_default()
                .push(AttemptId::new(job_id, attempt));
            let report = AgentReport {
                report_id: uuid::Uuid::now_v7(),
                worker_id,
                job_id,
                attempt,
                at: Utc::now(),
                kind: ReportKind::Started { pid: 1 },
            };
            if let Ok(payload) = serde_json::to_vec(&report) {
                let mut headers = HeaderMap::new();
                headers.insert(
                    subjects::HEADER_MSG_ID,
                    report.report_id.to_string().as_str(),
                );
                match js
                    .publish_with_headers(
                        subjects::report(&report.worker_id, &job_id),
                        headers,
                        payload.into(),
                    )
                    .await
                {
                    Ok(ack) => {
                        if let Err(e) = ack.await {
                            eprintln!("fleet report not acknowledged: {e}");
                        }
                    }
                    Err(e) => eprintln!("fleet report not published: {e}"),
                }
            }
        }
        if let Err(e) = message.ack().await {
            eprintln!("fleet command not acked: {e}");
        }
    }
}
