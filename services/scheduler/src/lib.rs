//! The scheduler: places queued jobs on workers whose labels, slots and free resources fit,
//! records each assignment (its attempt number is the fencing token) and sends it to the
//! agent; records what agents report; re-drives jobs whose placement is overdue; fires the
//! ticks of schedules.
//!
//! Several replicas may run at once: they share durable consumers, and every write is
//! guarded by optimistic concurrency on the job and the worker.

mod observe;
pub mod placement;
mod reconciler;
mod reports;
mod retention;
mod schedules;
pub mod worker_index;

use std::time::Duration;

use hodei_messaging::streams;
use hodei_runtime::{BackendConfig, Backends};
use tokio_util::sync::CancellationToken;

/// Source name in the envelopes of events this service records.
pub const SOURCE: &str = "hodei/scheduler";
/// This service's name on its spans and metrics.
pub(crate) const SERVICE: &str = "scheduler";

/// Scheduler configuration.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "hodei-scheduler",
    about = "Places jobs on workers and records their progress"
)]
pub struct SchedulerConfig {
    #[command(flatten)]
    pub backends: BackendConfig,
    /// A worker whose last heartbeat is older than this is not given new work, in milliseconds.
    #[arg(long, env = "HODEI_WORKER_STALE_MS", default_value_t = 3000)]
    pub worker_stale_ms: u64,
    /// Interval at which every blocked placement request (no worker could take it) is tried
    /// again, besides whenever a recorded report frees a slot, in milliseconds.
    #[arg(long, env = "HODEI_PLACEMENT_RETRY_MS", default_value_t = 500)]
    pub placement_retry_ms: u64,
    /// A queued job not placed for this long is re-driven by the reconciler, in milliseconds.
    #[arg(long, env = "HODEI_RECONCILE_AFTER_MS", default_value_t = 15_000)]
    pub reconcile_after_ms: u64,
    /// An assigned attempt not started within this is handed back (as a lost attempt), in
    /// milliseconds.
    #[arg(long, env = "HODEI_START_TIMEOUT_MS", default_value_t = 60_000)]
    pub start_timeout_ms: u64,
    /// The same for an attempt that must first fetch artifacts of earlier pipeline steps (its
    /// agent reports it started only once they are in its workspace), in milliseconds.
    #[arg(
        long,
        env = "HODEI_START_TIMEOUT_ARTIFACTS_MS",
        default_value_t = 600_000
    )]
    pub start_timeout_artifacts_ms: u64,
    /// A running job still not reported finished this long after its own timeout is ended as
    /// timed out by the scheduler (its worker may be silent), in milliseconds.
    #[arg(long, env = "HODEI_TIMEOUT_GRACE_MS", default_value_t = 30_000)]
    pub timeout_grace_ms: u64,
    /// A job no worker can take fails after waiting this long in the queue, in milliseconds.
    #[arg(long, env = "HODEI_QUEUE_TIMEOUT_MS", default_value_t = 3_600_000)]
    pub queue_timeout_ms: u64,
    /// How long the shared consumers wait for a scheduler's ack before redelivering to another
    /// replica (how fast a crashed replica's messages are taken over), in milliseconds.
    #[arg(long, env = "HODEI_ACK_WAIT_MS", default_value_t = 30_000)]
    pub ack_wait_ms: u64,
    /// Ended jobs and pipeline runs are moved to the archive tables this long after they
    /// ended (`30d`, `12h`, `90s`); `0s` keeps them all in the hot tables.
    #[arg(long, env = "HODEI_RETENTION_AGE", default_value = "30d", value_parser = humantime::parse_duration)]
    pub retention_age: Duration,
    /// How often retention looks for ended jobs and runs past their age.
    #[arg(long, env = "HODEI_RETENTION_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,
    /// Jobs, and pipeline runs, moved to the archive per transaction.
    #[arg(long, env = "HODEI_RETENTION_BATCH", default_value_t = 500)]
    pub retention_batch: u32,
    /// How often each replica looks for schedules whose next tick is due, in milliseconds.
    #[arg(long, env = "HODEI_SCHEDULE_POLL_MS", default_value_t = 1000)]
    pub schedule_poll_ms: u64,
    /// File whose first line is the control plane's secrets key (an xkey seed, `SX…`, from
    /// `hodei-admin secrets init`): it opens the secret values the gateway sealed, to seal
    /// them again for the assigned agent. Without it, jobs with `secret_env` fail.
    #[arg(long, env = "HODEI_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<std::path::PathBuf>,
}

impl SchedulerConfig {
    /// Defaults for every setting but the backends.
    pub fn new(backends: BackendConfig) -> Self {
        Self {
            backends,
            worker_stale_ms: 3000,
            placement_retry_ms: 500,
            reconcile_after_ms: 15_000,
            start_timeout_ms: 60_000,
            start_timeout_artifacts_ms: 600_000,
            timeout_grace_ms: 30_000,
            queue_timeout_ms: 3_600_000,
            ack_wait_ms: 30_000,
            retention_age: Duration::from_secs(30 * 86_400),
            retention_interval: Duration::from_secs(600),
            retention_batch: 500,
            schedule_poll_ms: 1000,
            secrets_key_file: None,
        }
    }

    /// Checks every duration is in range, before anything uses it: a value past the range
    /// would overflow the time arithmetic it goes into.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        const DAY_MS: u64 = 86_400_000;
        let ranges = [
            ("worker_stale_ms", self.worker_stale_ms, DAY_MS),
            ("placement_retry_ms", self.placement_retry_ms, DAY_MS),
            ("reconcile_after_ms", self.reconcile_after_ms, DAY_MS),
            ("start_timeout_ms", self.start_timeout_ms, DAY_MS),
            (
                "start_timeout_artifacts_ms",
                self.start_timeout_artifacts_ms,
                DAY_MS,
            ),
            ("timeout_grace_ms", self.timeout_grace_ms, DAY_MS),
            ("queue_timeout_ms", self.queue_timeout_ms, 30 * DAY_MS),
            ("ack_wait_ms", self.ack_wait_ms, DAY_MS),
            ("schedule_poll_ms", self.schedule_poll_ms, 60_000),
        ];
        for (field, value, max) in ranges {
            if value == 0 || value > max {
                return Err(SchedulerError::InvalidConfig {
                    field,
                    reason: format!("must be 1 to {max} (milliseconds), not {value}"),
                });
            }
        }
        const MAX_AGE: Duration = Duration::from_secs(100 * 365 * 86_400);
        if self.retention_age > MAX_AGE {
            return Err(SchedulerError::InvalidConfig {
                field: "retention_age",
                reason: format!(
                    "must be at most 100 years, not {}",
                    humantime::format_duration(self.retention_age)
                ),
            });
        }
        if self.retention_interval < Duration::from_millis(100)
            || self.retention_interval > Duration::from_secs(86_400)
        {
            return Err(SchedulerError::InvalidConfig {
                field: "retention_interval",
                reason: format!(
                    "must be 100ms to 1d, not {}",
                    humantime::format_duration(self.retention_interval)
                ),
            });
        }
        if !(1..=10_000).contains(&self.retention_batch) {
            return Err(SchedulerError::InvalidConfig {
                field: "retention_batch",
                reason: format!("must be 1 to 10000, not {}", self.retention_batch),
            });
        }
        Ok(())
    }
}

/// Why the scheduler failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Backend(#[from] hodei_runtime::BackendError),
    #[error(transparent)]
    Messaging(#[from] hodei_messaging::MessagingError),
    #[error("failed to consume {what}: {reason}")]
    Consume { what: &'static str, reason: String },
    #[error("invalid configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("secrets key: {0}")]
    SecretsKey(#[from] hodei_messaging::seal::SealError),
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct Context {
    pub backends: Backends,
    pub config: SchedulerConfig,
    /// Notified when recorded reports free slots: blocked placements are tried again.
    pub capacity: std::sync::Arc<tokio::sync::Notify>,
    /// Workers as saved by recorded reports that freed slots, for placement to bring its view
    /// up to date with at the start of its next round (without waiting for the round).
    pub freed: std::sync::Arc<std::sync::Mutex<Vec<hodei_domain::Worker>>>,
    /// Opens the secret values sealed to the control plane.
    pub secrets: Option<hodei_messaging::seal::OpeningKey>,
}

impl Context {
    /// Hands what a [`hodei_storage::driver::commit_transitions`] queued to the relay, once
    /// its transaction committed, and returns the workers it freed slots on.
    pub(crate) fn committed(
        &self,
        committed: hodei_storage::driver::Committed,
    ) -> Vec<hodei_domain::Worker> {
        self.backends.relay.hand_over(committed.messages);
        if committed.more {
            self.backends.relay_wake.notify_one();
        }
        committed.freed
    }

    /// Hands the workers a report batch saved with slots freed to placement, and wakes it.
    pub(crate) fn freed(&self, workers: Vec<hodei_domain::Worker>) {
        self.freed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(workers);
        self.capacity.notify_one();
    }

    /// The workers handed over by [`Context::freed`] since the last call.
    pub(crate) fn take_freed(&self) -> Vec<hodei_domain::Worker> {
        std::mem::take(
            &mut *self
                .freed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// A built scheduler, connected, with its consumers created.
pub struct Scheduler {
    ctx: Context,
    placer: async_nats::jetstream::consumer::PullConsumer,
    reporter: async_nats::jetstream::consumer::PullConsumer,
}

impl Scheduler {
    pub async fn build(config: SchedulerConfig) -> Result<Scheduler, SchedulerError> {
        config.validate()?;
        let secrets = config
            .secrets_key_file
            .as_deref()
            .map(hodei_messaging::seal::OpeningKey::load)
            .transpose()?;
        if secrets.is_none() {
            tracing::warn!(
                "no HODEI_SECRETS_KEY_FILE: jobs with secret_env will fail at placement"
            );
        }
        let backends = Backends::connect(&config.backends, "hodei-scheduler").await?;
        // Waiting for a worker is normal for a placement, so its deliveries are not capped.
        let mut placer_config =
            streams::durable(streams::PLACER, hodei_messaging::subjects::all_place_jobs());
        placer_config.max_deliver = -1;
        let ack_wait = Duration::from_millis(config.ack_wait_ms);
        placer_config.ack_wait = ack_wait;
        let mut reporter_config =
            streams::durable(streams::REPORTER, hodei_messaging::subjects::all_reports());
        reporter_config.ack_wait = ack_wait;
        // A report must outlive a PostgreSQL outage of any length: the handler backs off and
        // dead-letters the ones that fail for other reasons, so the server does not cap them.
        reporter_config.max_deliver = -1;
        let placer = streams::consumer(&backends.js, streams::WORK, placer_config).await?;
        let reporter = streams::consumer(&backends.js, streams::REPORTS, reporter_config).await?;
        Ok(Scheduler {
            ctx: Context {
                backends,
                config,
                capacity: std::sync::Arc::default(),
                freed: std::sync::Arc::default(),
                secrets,
            },
            placer,
            reporter,
        })
    }

    /// The address of the `/metrics`, `/healthz` and `/readyz` server, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.ctx.backends.metrics_addr()
    }

    /// Runs until `shutdown`; messages being handled are finished first.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
    ) -> Result<(), SchedulerError> {
        let relay = self.ctx.backends.spawn_relay(shutdown.clone());
        let observability = self.ctx.backends.spawn_observability(shutdown.clone());
        let reconciler = tokio::spawn(reconciler::run(
            self.ctx.clone(),
            Duration::from_millis(self.ctx.config.reconcile_after_ms),
            shutdown.clone(),
        ));
        let retention = tokio::spawn(retention::run(self.ctx.clone(), shutdown.clone()));
        let schedules = tokio::spawn(schedules::run(self.ctx.clone(), shutdown.clone()));
        let placer = placement::run(self.ctx.clone(), self.placer, shutdown.clone());
        let reporter = reports::run(self.ctx.clone(), self.reporter, shutdown.clone());
        let (placed, reported) = tokio::join!(placer, reporter);
        shutdown.cancel();
        let _ = reconciler.await;
        let _ = retention.await;
        let _ = schedules.await;
        let _ = relay.await;
        if let Some(observability) = observability {
            let _ = observability.await;
        }
        placed.and(reported)
    }
}

/// Times the steps of a round or a batch, for its debug event: each [`Laps::lap`] is the time
/// in milliseconds since the one before (or since the start).
pub(crate) struct Laps(std::time::Instant);

impl Laps {
    pub(crate) fn start() -> Self {
        Self(std::time::Instant::now())
    }

    pub(crate) fn lap(&mut self) -> f64 {
        let now = std::time::Instant::now();
        let took = now.duration_since(self.0).as_secs_f64() * 1e3;
        self.0 = now;
        took
    }
}

/// A number in `[0, 1)` for retry jitter.
pub(crate) fn jitter() -> f64 {
    hodei_resilience::random_unit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SchedulerConfig {
        SchedulerConfig::new(BackendConfig::new(
            "nats://127.0.0.1:4222".to_owned(),
            "postgres://localhost/hodei".to_owned(),
        ))
    }

    #[test]
    fn the_defaults_are_in_range() {
        config().validate().unwrap();
    }

    #[test]
    fn out_of_range_durations_are_refused_naming_the_setting() {
        let mut huge = config();
        huge.worker_stale_ms = u64::MAX;
        let err = huge.validate().unwrap_err().to_string();
        assert!(err.contains("worker_stale_ms"), "{err}");
        let mut zero = config();
        zero.ack_wait_ms = 0;
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("ack_wait_ms"), "{err}");
    }
}
