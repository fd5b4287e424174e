//! The registry: turns agents' heartbeats into worker rows (in batches: one statement per
//! flush, however many agents beat), publishes worker events, and declares workers lost when
//! they fall silent, handing their attempts back to the queue.

mod confirm;
mod liveness;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::{AttemptId, JobId, JobState, WorkerEvent, WorkerEventKind, WorkerId};
use hodei_messaging::{AgentCommand, Heartbeat, Outgoing, subjects, trace};
use hodei_storage::jobs;
use hodei_storage::workers::{self, HeartbeatEffect};
use hodei_storage::{BackendConfig, Backends};
use tokio_util::sync::CancellationToken;

/// Source name in the envelopes of events this service records.
pub const SOURCE: &str = "hodei/registry";
/// This service's name on its spans and metrics.
pub(crate) const SERVICE: &str = "registry";
/// The queue group the registries share heartbeats in.
const QUEUE_GROUP: &str = "hodei-registry";

/// Registry configuration.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "hodei-registry",
    about = "Keeps worker state from agents' heartbeats"
)]
pub struct RegistryConfig {
    #[command(flatten)]
    pub backends: BackendConfig,
    /// Agents' heartbeat interval, in milliseconds.
    #[arg(long, env = "HODEI_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats after which a worker is declared lost.
    #[arg(long, env = "HODEI_MISSED_BEATS", default_value_t = 3)]
    pub missed_beats: u32,
    /// How often buffered heartbeats are written, in milliseconds.
    #[arg(long, env = "HODEI_HEARTBEAT_FLUSH_MS", default_value_t = 100)]
    pub flush_interval_ms: u64,
}

/// Why the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Backend(#[from] hodei_storage::BackendError),
    #[error("failed to subscribe to heartbeats: {0}")]
    Subscribe(String),
}

/// A built registry, connected and subscribed.
pub struct Registry {
    config: RegistryConfig,
    backends: Backends,
    heartbeats: async_nats::Subscriber,
}

/// Most heartbeats buffered before a flush is forced.
const MAX_BATCH: usize = 2000;

impl Registry {
    pub async fn build(config: RegistryConfig) -> Result<Registry, RegistryError> {
        let backends = Backends::connect(&config.backends, "hodei-registry").await?;
        let heartbeats = backends
            .nats
            .queue_subscribe(subjects::all_heartbeats(), QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| RegistryError::Subscribe(e.to_string()))?;
        Ok(Registry {
            config,
            backends,
            heartbeats,
        })
    }

    /// The address of the `/metrics`, `/healthz` and `/readyz` server, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.backends.metrics_addr()
    }

    /// Runs until `shutdown`, then flushes what it buffered.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), RegistryError> {
        let Registry {
            config,
            backends,
            mut heartbeats,
        } = self;
        let relay = backends.spawn_relay(shutdown.clone());
        let observability = backends.spawn_observability(shutdown.clone());
        let liveness = tokio::spawn(liveness::run(
            backends.clone(),
            Duration::from_millis(config.heartbeat_interval_ms),
            config.missed_beats,
            shutdown.clone(),
        ));
        let mut buffer: HashMap<WorkerId, Heartbeat> = HashMap::new();
        let mut orders = StaleOrders::new();
        let mut seen = confirm::SeenAttempts::default();
        let mut tick =
            tokio::time::interval(Duration::from_millis(config.flush_interval_ms.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                message = heartbeats.next() => {
                    let Some(message) = message else { break };
                    backends.metrics.heartbeats_received.inc();
                    let span = trace::process_heartbeat_span(SERVICE, &message.subject, QUEUE_GROUP, message.headers.as_ref());
                    let entered = span.enter();
                    match hodei_messaging::decode::<Heartbeat>(&message.subject, &message.payload) {
                        Ok(hb) if subjects::token_after(&message.subject, 3) == Some(hb.worker_id.as_str()) => {
                            // Keep the newest beat per worker: only the latest state matters.
                            buffer.insert(hb.worker_id.clone(), hb);
                        }
                        Ok(hb) => tracing::warn!(subject = %message.subject, worker_id = %hb.worker_id, "heartbeat subject does not match its worker id, dropped"),
                        Err(e) => tracing::warn!(subject = %message.subject, error = %e, "malformed heartbeat dropped"),
                    }
                    drop(entered);
                    if buffer.len() >= MAX_BATCH {
                        flush(&backends, &mut buffer, &mut orders, &mut seen).await;
                    }
                }
                _ = tick.tick() => flush(&backends, &mut buffer, &mut orders, &mut seen).await,
            }
        }
        flush(&backends, &mut buffer, &mut orders, &mut seen).await;
        let _ = liveness.await;
        let _ = relay.await;
        if let Some(observability) = observability {
            let _ = observability.await;
        }
        Ok(())
    }
}

/// How long before a kill order for a stale attempt is sent again if the agent still runs it.
const STALE_RESEND: Duration = Duration::from_secs(5);

/// Kill orders sent for stale attempts, and when, so each is not sent with every beat.
type StaleOrders = HashMap<AttemptId, tokio::time::Instant>;

/// The attempts agents say they run that are no longer theirs (the job ended, moved to another
/// attempt or another worker): the attempt number is the fencing token.
async fn stale_attempts(
    conn: &mut sqlx::PgConnection,
    beats: &[(Heartbeat, chrono::DateTime<Utc>)],
) -> Result<Vec<(WorkerId, AttemptId)>, hodei_storage::StorageError> {
    let ids: Vec<JobId> = beats
        .iter()
        .flat_map(|(hb, _)| hb.running.iter().map(|a| a.job_id))
        .collect();
    let current = jobs::current_attempts(conn, &ids).await?;
    let mut stale = Vec::new();
    for (hb, _) in beats {
        for attempt in &hb.running {
            let owned = current
                .get(&attempt.job_id)
                .is_some_and(|(state, number, worker)| {
                    matches!(state, JobState::Assigned | JobState::Running)
                        && *number == attempt.attempt
                        && worker.as_deref() == Some(hb.worker_id.as_str())
                });
            if !owned {
                stale.push((hb.worker_id.clone(), *attempt));
            }
        }
    }
    Ok(stale)
}

/// Writes buffered heartbeats in one transaction with the worker events they cause, and
/// orders agents to kill attempts that are no longer theirs; a worker that comes back with
/// such attempts stays lost (takes no work) until it has killed them. On a database error the
/// beats are dropped (the next ones carry the same information). Attempts seen for the first
/// time are recorded in their jobs' traces.
async fn flush(
    backends: &Backends,
    buffer: &mut HashMap<WorkerId, Heartbeat>,
    orders: &mut StaleOrders,
    seen: &mut confirm::SeenAttempts,
) {
    if buffer.is_empty() {
        return;
    }
    let now = Utc::now();
    let beats: Vec<(Heartbeat, chrono::DateTime<Utc>)> =
        buffer.drain().map(|(_, hb)| (hb, now)).collect();
    let count = beats.len();
    let sent_before = tokio::time::Instant::now() - STALE_RESEND;
    orders.retain(|_, sent| *sent > sent_before);
    let result: Result<(usize, Vec<AttemptId>), hodei_storage::StorageError> = backends.db(|| async {
        let mut tx = backends.pool.begin().await?;
        let stale = stale_attempts(&mut tx, &beats).await?;
        let hold_back: HashSet<WorkerId> = stale.iter().map(|(w, _)| w.clone()).collect();
        let effects = workers::apply_heartbeats(&mut tx, &beats, &hold_back).await?;
        let mut messages = Vec::new();
        let mut ordered = Vec::new();
        for (worker_id, attempt) in stale {
            if orders.contains_key(&attempt) {
                continue;
            }
            tracing::warn!(worker_id = %worker_id, job_id = %attempt.job_id, attempt = %attempt.attempt, "stale attempt on worker, ordering it killed");
            let command = AgentCommand::Cancel {
                job_id: attempt.job_id,
                attempt: attempt.attempt,
                reason: "stale attempt: the job is no longer this worker's".to_owned(),
            };
            messages.push(Outgoing::agent_command(&worker_id, &command)?);
            ordered.push(attempt);
        }
        for (worker_id, effect) in effects {
            let kind = match effect {
                HeartbeatEffect::Refreshed => continue,
                HeartbeatEffect::Registered => {
                    let Some((hb, _)) = beats.iter().find(|(hb, _)| hb.worker_id == worker_id) else {
                        continue;
                    };
                    tracing::info!(worker_id = %worker_id, labels = ?hb.labels, "worker registered");
                    WorkerEventKind::Registered {
                        labels: hb.labels.clone(),
                        capacity: hb.capacity,
                        max_concurrent_jobs: hb.max_concurrent_jobs,
                    }
                }
                HeartbeatEffect::Returned => {
                    tracing::info!(worker_id = %worker_id, "worker returned");
                    WorkerEventKind::Returned
                }
                HeartbeatEffect::Draining => {
                    tracing::info!(worker_id = %worker_id, "worker draining");
                    WorkerEventKind::Draining
                }
                HeartbeatEffect::Offline => {
                    tracing::info!(worker_id = %worker_id, "worker said goodbye, offline");
                    WorkerEventKind::Offline
                }
            };
            let event = WorkerEvent::new(worker_id, now, kind);
            messages.push(Outgoing::worker_event(&event, SOURCE)?);
        }
        hodei_storage::outbox::append(&mut tx, &messages).await?;
        tx.commit().await?;
        Ok((messages.len(), ordered))
    })
    .await;
    match result {
        Ok((messages, ordered)) => {
            tracing::debug!(count, messages, "heartbeats flushed");
            let sent = tokio::time::Instant::now();
            orders.extend(ordered.into_iter().map(|a| (a, sent)));
            if messages > 0 {
                backends.relay_wake.notify_one();
            }
        }
        Err(e) => tracing::warn!(count, error = %e, "failed to write heartbeats"),
    }
    seen.record(backends, &beats).await;
}
