//! Simulated agents: many worker identities in one task set. Each beats on its own heartbeat
//! subject (core NATS); one durable consumer on every agent's command subject takes the
//! assignments and answers each at once with `Started` and `Finished { exited 0 }` reports
//! (JetStream, de-duplication id per report), as a real agent would for a no-op job.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::Utc;
use futures::StreamExt;
use hodei_domain::{AttemptId, AttemptOutcome, ResourceUsage, Resources, WorkerId};
use hodei_messaging::{AgentCommand, AgentReport, Heartbeat, ReportKind, streams, subjects};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Name of the one durable consumer standing in for every simulated agent.
const CONSUMER: &str = "bench-agents";

/// Each agent beats once an interval, in one of this many slices of it, so that the fleet's
/// beats are spread evenly over the interval, as those of agents started at different times
/// are. (They used to beat all at once, and each burst held up placements while the registry
/// wrote it.)
const SLICES: usize = 50;

/// Attempts each simulated worker holds now, as its heartbeats report them.
type Running = Arc<Mutex<HashMap<WorkerId, Vec<AttemptId>>>>;

/// Simulated agents; stop them with [`SimAgents::stop`].
pub struct SimAgents {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

/// How many agents to simulate and how.
pub struct SimConfig {
    pub agents: usize,
    pub slots: u32,
    pub heartbeat_ms: u64,
}

impl SimAgents {
    /// Starts the heartbeats and the command consumer, and returns once every agent has beaten
    /// once.
    pub async fn start(
        nats_url: &str,
        auth: &hodei_messaging::NatsAuth,
        config: SimConfig,
    ) -> anyhow::Result<SimAgents> {
        let (client, js) = hodei_messaging::connect_with(
            nats_url,
            "hodei-bench-agents",
            Duration::from_secs(10),
            auth,
        )
        .await
        .context("failed to connect the simulated agents")?;
        let ids = (0..config.agents)
            .map(|i| format!("sim-{i:05}").parse::<WorkerId>())
            .collect::<Result<Vec<_>, _>>()
            .context("failed to make worker ids")?;
        let running: Running = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let beats = Beats {
            client: client.clone(),
            ids,
            slots: config.slots,
            running: running.clone(),
            incarnation: hodei_domain::IncarnationId::new(),
        };
        beats.beat(0, 1).await;
        let slice_every = (Duration::from_millis(config.heartbeat_ms) / SLICES as u32)
            .max(Duration::from_micros(1));
        let token = stop.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(slice_every);
            tick.tick().await;
            let mut slice = 0;
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = tick.tick() => beats.beat(slice, SLICES).await,
                }
                slice = (slice + 1) % SLICES;
            }
        });

        let filter = format!("{}.agent.*.cmd", subjects::PREFIX);
        let consumer = streams::consumer(&js, streams::AGENT, streams::durable(CONSUMER, filter))
            .await
            .context("failed to create the simulated agents' consumer")?;
        let messages = consumer
            .messages()
            .await
            .context("failed to pull the simulated agents' commands")?;
        let token = stop.clone();
        tasks.spawn(async move {
            let mut batches = messages.ready_chunks(512);
            // Ended with this task (dropping a `JoinSet` aborts its tasks).
            let mut settling = JoinSet::new();
            loop {
                let batch = tokio::select! {
                    () = token.cancelled() => return,
                    batch = batches.next() => batch,
                };
                let Some(batch) = batch else { return };
                let batch: Vec<jetstream::Message> = batch.into_iter().flatten().collect();
                // Reports are published here, in the order the commands came; their acks and
                // the commands' are awaited beside the next batches, as separate agents do
                // not wait for each other.
                settling.spawn(answer(&js, &running, batch).await);
                while settling.try_join_next().is_some() {}
            }
        });
        Ok(SimAgents { stop, tasks })
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

struct Beats {
    client: async_nats::Client,
    ids: Vec<WorkerId>,
    slots: u32,
    running: Running,
    /// The simulated agents' incarnation, the same for the whole run.
    incarnation: hodei_domain::IncarnationId,
}

impl Beats {
    /// Beats for agents `slice`, `slice + slices`, `slice + 2 × slices`… (every agent with
    /// `beat(0, 1)`).
    async fn beat(&self, slice: usize, slices: usize) {
        let labels = BTreeMap::from([("os".to_owned(), "linux".to_owned())]);
        let now = Utc::now();
        for id in self.ids.iter().skip(slice).step_by(slices) {
            let running = lock(&self.running).get(id).cloned().unwrap_or_default();
            let beat = Heartbeat {
                worker_id: id.clone(),
                incarnation: self.incarnation,
                lease_ms: hodei_domain::LeaseTerms::DEFAULT.lease_ms,
                kill_grace_ms: hodei_domain::LeaseTerms::DEFAULT.kill_grace_ms,
                labels: labels.clone(),
                capacity: Resources::new(4000, 8192),
                max_concurrent_jobs: self.slots,
                usage: ResourceUsage::default(),
                running,
                draining: false,
                leaving: false,
                seal_key: None,
                sent_at: now,
            };
            let Ok(payload) = serde_json::to_vec(&beat) else {
                continue;
            };
            if let Err(e) = self
                .client
                .publish(subjects::heartbeat(id), payload.into())
                .await
            {
                eprintln!("simulated heartbeat not sent: {e}");
            }
        }
        let _ = self.client.flush().await;
    }
}

fn lock(running: &Running) -> std::sync::MutexGuard<'_, HashMap<WorkerId, Vec<AttemptId>>> {
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Answers one batch of commands: for every assignment, publishes `Started` then `Finished`
/// (exit 0). Returns what is left to do: await the reports' acknowledgements together, then
/// ack the commands.
async fn answer(
    js: &jetstream::Context,
    running: &Running,
    batch: Vec<jetstream::Message>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut assigned = Vec::new();
    for message in &batch {
        let Ok(command) =
            hodei_messaging::decode::<AgentCommand>(&message.subject, &message.payload)
        else {
            continue;
        };
        let AgentCommand::Assign {
            job_id, attempt, ..
        } = command
        else {
            continue;
        };
        let Some(worker) =
            subjects::token_after(&message.subject, 3).and_then(|t| t.parse::<WorkerId>().ok())
        else {
            continue;
        };
        let attempt_id = AttemptId::new(job_id, attempt);
        lock(running)
            .entry(worker.clone())
            .or_default()
            .push(attempt_id);
        assigned.push((worker, attempt_id));
    }
    let mut acks = Vec::with_capacity(assigned.len() * 2);
    for (worker, attempt) in &assigned {
        let kinds = [
            ReportKind::Started { pid: 1 },
            ReportKind::Finished {
                outcome: AttemptOutcome::Exited { code: 0 },
                tail: Vec::new(),
            },
        ];
        for kind in kinds {
            let report = AgentReport {
                report_id: uuid::Uuid::now_v7(),
                worker_id: worker.clone(),
                job_id: attempt.job_id,
                attempt: attempt.attempt,
                at: Utc::now(),
                kind,
            };
            let Ok(payload) = serde_json::to_vec(&report) else {
                continue;
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                subjects::HEADER_MSG_ID,
                report.report_id.to_string().as_str(),
            );
            match js
                .publish_with_headers(
                    subjects::report(worker, &attempt.job_id),
                    headers,
                    payload.into(),
                )
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => eprintln!("simulated report not published: {e}"),
            }
        }
    }
    let running = running.clone();
    async move {
        for result in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            if let Err(e) = result {
                eprintln!("simulated report not acknowledged: {e}");
            }
        }
        {
            let mut held = lock(&running);
            for (worker, attempt) in &assigned {
                if let Some(list) = held.get_mut(worker) {
                    list.retain(|a| a != attempt);
                }
            }
        }
        for message in &batch {
            if let Err(e) = message.ack().await {
                eprintln!("simulated command not acked: {e}");
            }
        }
    }
}
