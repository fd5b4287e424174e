//! Heartbeats: the agent's sign of life on core NATS, with its incarnation, lease terms,
//! labels, capacity, the host's measured usage and the attempts it runs. Each beat the server
//! confirms renews the agent's [`Lease`]: after the beat the agent publishes an echo to a
//! subject of its own inbox and waits for it to come back through the server, which then has
//! the beat (messages of one connection are handled in order). A flush would not do: it only
//! empties the client's buffer into the socket, which a silent partition (packets dropped, no
//! reset) keeps accepting. A failed publish is logged and tried again at the next tick;
//! heartbeats are never fatal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::{IncarnationId, ResourceUsage, Resources, WorkerId};
use hodei_messaging::{Heartbeat, subjects, trace};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::lease::Lease;
use crate::running::Running;

const MIB: u64 = 1024 * 1024;
/// Longest wait for the last heartbeat to reach the server at shutdown.
const LAST_BEAT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds and sends heartbeats.
pub(crate) struct Heartbeater {
    client: async_nats::Client,
    subject: String,
    worker_id: WorkerId,
    incarnation: IncarnationId,
    lease: Lease,
    lease_ms: u64,
    kill_grace_ms: u64,
    /// Longest wait for the server to confirm a beat.
    confirm_within: Duration,
    /// Where the echo that confirms a beat goes ([`subjects::lease_echo`]).
    echo_subject: String,
    /// The subscription the echoes come back on; made at the first beat (and again after it
    /// failed).
    echoes: Option<async_nats::Subscriber>,
    /// The last echo's number: an echo that came back late is told from the awaited one.
    echo_number: u64,
    labels: BTreeMap<String, String>,
    capacity: Resources,
    max_concurrent_jobs: u32,
    system: System,
    running: Running,
    draining: Arc<AtomicBool>,
    /// Where failed publishes are counted, if anywhere.
    metrics: Option<hodei_telemetry::Metrics>,
    /// This incarnation's public sealing key, announced with every beat.
    seal_key: Option<String>,
}

impl Heartbeater {
    /// A heartbeater for `worker_id`, reading the attempts from `running` and whether the
    /// agent is draining from `draining`, renewing `lease` with every confirmed beat.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: async_nats::Client,
        worker_id: WorkerId,
        incarnation: IncarnationId,
        lease: Lease,
        (lease_length, kill_grace): (Duration, Duration),
        labels: BTreeMap<String, String>,
        capacity: Resources,
        max_concurrent_jobs: u32,
        running: Running,
        draining: Arc<AtomicBool>,
    ) -> Self {
        // CPU use is measured between two refreshes: this is the first.
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            client,
            subject: subjects::heartbeat(&worker_id),
            echo_subject: subjects::lease_echo(&worker_id),
            echoes: None,
            echo_number: 0,
            worker_id,
            incarnation,
            lease,
            lease_ms: u64::try_from(lease_length.as_millis()).unwrap_or(u64::MAX),
            kill_grace_ms: u64::try_from(kill_grace.as_millis()).unwrap_or(u64::MAX),
            confirm_within: lease_length / 4,
            labels,
            capacity,
            max_concurrent_jobs,
            system,
            running,
            draining,
            metrics: None,
            seal_key: None,
        }
    }

    /// Counts failed publishes in `metrics` (`hodei_nats_errors_total{operation="heartbeat"}`).
    pub fn with_metrics(mut self, metrics: hodei_telemetry::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Announces `seal_key` (this incarnation's public key) with every beat.
    pub fn with_seal_key(mut self, seal_key: String) -> Self {
        self.seal_key = Some(seal_key);
        self
    }

    /// Beats every `interval` (the first at once) and whenever `now` is notified, until `stop`
    /// is cancelled. Returns itself so the caller can send a last heartbeat.
    pub async fn run(
        mut self,
        interval: Duration,
        now: Arc<Notify>,
        stop: CancellationToken,
    ) -> Self {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.beat().await,
                _ = now.notified() => self.beat().await,
            }
        }
        self
    }

    /// Sends the last heartbeat, saying goodbye, and waits (briefly) until it has left.
    pub async fn last_beat(mut self) {
        self.send(true).await;
        match tokio::time::timeout(LAST_BEAT_FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(worker_id = %self.worker_id, error = %e, "failed to flush the last heartbeat")
            }
            Err(_) => warn!(worker_id = %self.worker_id, "last heartbeat not flushed in time"),
        }
    }

    /// Sends one heartbeat.
    pub async fn beat(&mut self) {
        self.send(false).await;
    }

    /// Publishes the next echo and waits until it comes back through the server: everything
    /// published before it, the beat included, has then reached the server.
    async fn confirm(&mut self) -> Result<(), String> {
        let echoes = match &mut self.echoes {
            Some(echoes) => echoes,
            None => {
                let subscribed = self
                    .client
                    .subscribe(self.echo_subject.clone())
                    .await
                    .map_err(|e| format!("subscribing to the echoes: {e}"))?;
                self.echoes.insert(subscribed)
            }
        };
        self.echo_number = self.echo_number.wrapping_add(1);
        let number = self.echo_number.to_string();
        self.client
            .publish(self.echo_subject.clone(), number.clone().into())
            .await
            .map_err(|e| format!("publishing the echo: {e}"))?;
        loop {
            match echoes.next().await {
                Some(echo) if echo.payload.as_ref() == number.as_bytes() => return Ok(()),
                // An earlier beat's echo, come back after its wait ended.
                Some(_) => {}
                None => {
                    self.echoes = None;
                    return Err("the echo subscription ended".to_owned());
                }
            }
        }
    }

    /// After a lapse, once a beat is confirmed: reads the command stream's last sequence, up
    /// to which assignments stay refused (see [`Fence`]). Tried again at the next beat if the
    /// stream cannot be read.
    async fn reopen_fence(&self) {
        let fence = self.lease.fence();
        if !fence.lapsed() {
            return;
        }
        let js = async_nats::jetstream::new(self.client.clone());
        let read = tokio::time::timeout(
            self.confirm_within,
            js.get_stream(hodei_messaging::streams::AGENT),
        )
        .await;
        match read {
            Ok(Ok(stream)) => {
                let info = stream.cached_info();
                let last = info.state.last_sequence;
                fence.reopen(last, info.created.unix_timestamp_nanos());
                info!(worker_id = %self.worker_id, refused_through = last, "lease renewed after a lapse, assignments stored before now are refused");
            }
            Ok(Err(e)) => {
                debug!(worker_id = %self.worker_id, error = %e, "command stream not read after a lapse, assignments still refused");
            }
            Err(_) => {
                debug!(worker_id = %self.worker_id, "command stream not read in time after a lapse, assignments still refused");
            }
        }
    }

    /// Waits, at most `confirm_within`, for the echo that confirms what was published before
    /// it; once it is back, renews the lease from `sent` and, after a lapse, sets the fence.
    async fn renew_when_confirmed(&mut self, sent: tokio::time::Instant) {
        match tokio::time::timeout(self.confirm_within, self.confirm()).await {
            Ok(Ok(())) => {
                self.lease.renew(sent);
                self.reopen_fence().await;
            }
            Ok(Err(e)) => {
                debug!(worker_id = %self.worker_id, error = %e, "contact with nats not confirmed")
            }
            Err(_) => {
                debug!(worker_id = %self.worker_id, "contact with nats not confirmed in time")
            }
        }
    }

    async fn send(&mut self, leaving: bool) {
        // Fenced, the agent refuses its assignments: it does not beat, so the registry takes it
        // for silent and places nothing on it, until an echo comes back and the fence is set.
        // (Were its beats to arrive while its echoes do not, say with a NATS authorization
        // that predates the echo, it would otherwise get work only to refuse it.)
        if !leaving && self.lease.fence().lapsed() {
            self.renew_when_confirmed(tokio::time::Instant::now()).await;
            return;
        }
        let heartbeat = Heartbeat {
            worker_id: self.worker_id.clone(),
            incarnation: self.incarnation,
            lease_ms: self.lease_ms,
            kill_grace_ms: self.kill_grace_ms,
            labels: self.labels.clone(),
            capacity: self.capacity,
            max_concurrent_jobs: self.max_concurrent_jobs,
            usage: self.usage(),
            running: self.running.list(),
            draining: self.draining.load(Ordering::SeqCst),
            leaving,
            seal_key: self.seal_key.clone(),
            sent_at: Utc::now(),
        };
        let payload = match serde_json::to_vec(&heartbeat) {
            Ok(json) => json,
            Err(e) => {
                warn!(worker_id = %self.worker_id, error = %e, "failed to encode heartbeat");
                return;
            }
        };
        let span = trace::send_heartbeat_span(crate::observe::SERVICE, &self.subject);
        let mut headers = async_nats::HeaderMap::new();
        trace::to_nats(&trace::headers_of(&span), &mut headers);
        let sent = tokio::time::Instant::now();
        match self
            .client
            .publish_with_headers(self.subject.clone(), headers, payload.into())
            .instrument(span)
            .await
        {
            Ok(()) => {
                debug!(
                    worker_id = %self.worker_id,
                    running = heartbeat.running.len(),
                    draining = heartbeat.draining,
                    "heartbeat sent"
                );
                self.renew_when_confirmed(sent).await;
            }
            Err(e) => {
                if let Some(metrics) = &self.metrics {
                    metrics.nats_error("heartbeat");
                }
                warn!(worker_id = %self.worker_id, error = %e, "failed to publish heartbeat, retrying next tick");
            }
        }
    }

    /// The host's usage now: CPU since the previous call, memory, one-minute load.
    fn usage(&mut self) -> ResourceUsage {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        // `global_cpu_usage` is the mean over cores; the domain counts up to 100 per core.
        let cores = self.system.cpus().len().max(1) as f32;
        ResourceUsage {
            cpu_percent: self.system.global_cpu_usage() * cores,
            memory_used_mb: self.system.used_memory() / MIB,
            memory_total_mb: self.system.total_memory() / MIB,
            load_1m: System::load_average().one,
        }
    }
}
