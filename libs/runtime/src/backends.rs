//! The connections a Hodei service with state needs: NATS (JetStream streams ensured) and
//! PostgreSQL (migrations applied), plus the outbox relay that joins them, the service's
//! metrics and its `/metrics`, `/healthz`, `/readyz` server. Shared by the gateway, the
//! scheduler and the registry so they start the same way.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use hodei_messaging::{MessagingError, streams, subjects};
use hodei_resilience::{BreakerConfig, BreakerError, CircuitBreaker};
use hodei_telemetry::{Metrics, ObservabilityServer, TelemetryError};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use hodei_storage::StorageError;

/// Where the backends are. Flattened into each service's configuration.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendConfig {
    /// NATS server URL (2.10 or newer, JetStream enabled).
    #[arg(long, env = "HODEI_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[command(flatten)]
    pub nats_auth: hodei_messaging::NatsCredentialArgs,
    /// PostgreSQL URL of the Hodei database.
    #[arg(
        long,
        env = "HODEI_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/hodei"
    )]
    pub database_url: String,
    /// Largest number of PostgreSQL connections this process opens.
    #[arg(long, env = "HODEI_DATABASE_POOL", default_value_t = 10)]
    pub database_pool: u32,
    /// How long to keep trying to reach NATS and PostgreSQL at start-up, in seconds.
    #[arg(long, env = "HODEI_CONNECT_TIMEOUT_SECS", default_value_t = 30)]
    pub connect_timeout_secs: u64,
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz` (port 0 picks a
    /// free port); none when unset.
    #[arg(long, env = "HODEI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl BackendConfig {
    /// A configuration for these URLs with default pool size and timeout.
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_auth: Default::default(),
            database_url: database_url.into(),
            database_pool: 10,
            connect_timeout_secs: 30,
            metrics_addr: None,
        }
    }
}

/// Why a service could not reach its backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Messaging(#[from] MessagingError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// Connected backends.
#[derive(Clone)]
pub struct Backends {
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub pool: PgPool,
    /// Notify after committing outbox rows so the relay claims and publishes them at once.
    pub relay_wake: Arc<Notify>,
    /// Hand the messages just committed to the outbox to the relay, to be published from
    /// memory (the hot paths' alternative to `relay_wake`).
    pub relay: crate::relay::Handoff,
    /// The relay's end of `relay`, until [`Backends::spawn_relay`] takes it.
    handed_over: Arc<Mutex<Option<crate::relay::HandedOver>>>,
    /// The circuit breaker every PostgreSQL call of this process goes through.
    pub db_breaker: CircuitBreaker,
    /// This service's metrics.
    pub metrics: Metrics,
    /// The bound metrics and health server, until [`Backends::spawn_observability`] takes it.
    observability: Arc<Mutex<Option<ObservabilityServer>>>,
    metrics_addr: Option<SocketAddr>,
}

/// Tries in all of a unit of work that keeps losing optimistic-concurrency races.
pub const CONFLICT_ATTEMPTS: u32 = 8;

/// Longest a unit of PostgreSQL work may take before it counts as a failure.
pub const DB_CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Backends {
    /// Connects to NATS and PostgreSQL, ensures the streams, applies the migrations and binds
    /// the metrics server if configured. `client_name` is `hodei-<service>`; the service name
    /// picks the metrics it records.
    pub async fn connect(
        config: &BackendConfig,
        client_name: &str,
    ) -> Result<Backends, BackendError> {
        let timeout = Duration::from_secs(config.connect_timeout_secs);
        let auth = config.nats_auth.load()?;
        let (nats, js) =
            hodei_messaging::connect_with(&config.nats_url, client_name, timeout, &auth).await?;
        streams::ensure_all(&js).await?;
        // Agents may use the artifact bucket, not create it.
        hodei_messaging::artifacts::bucket(&js).await?;
        let pool =
            hodei_storage::connect(&config.database_url, config.database_pool, timeout).await?;
        hodei_storage::migrate(&pool).await?;
        let service = client_name.strip_prefix("hodei-").unwrap_or(client_name);
        let observability = match config.metrics_addr {
            Some(addr) => Some(ObservabilityServer::bind(addr).await?),
            None => None,
        };
        let relay_wake = Arc::new(Notify::new());
        let (relay, handed_over) = crate::relay::handoff(relay_wake.clone());
        Ok(Backends {
            nats,
            js,
            pool,
            relay_wake,
            relay,
            handed_over: Arc::new(Mutex::new(Some(handed_over))),
            db_breaker: CircuitBreaker::new("postgres", BreakerConfig::default()),
            metrics: Metrics::new(service),
            metrics_addr: observability.as_ref().map(ObservabilityServer::local_addr),
            observability: Arc::new(Mutex::new(observability)),
        })
    }

    /// The address of the metrics and health server, if one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`, if a metrics address is
    /// configured (and it is not served yet).
    pub fn spawn_observability(&self, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let server = self
            .observability
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        let probes = Arc::new(crate::probes::BackendProbes::new(self));
        Some(tokio::spawn(server.serve(
            self.metrics.clone(),
            probes,
            shutdown,
        )))
    }

    /// Runs one unit of PostgreSQL work through the breaker, with a timeout: while PostgreSQL
    /// keeps failing, calls fail fast with `Unavailable` instead of piling up.
    pub async fn db<T, F, Fut>(&self, op: F) -> Result<T, StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let result = guarded(&self.db_breaker, op).await;
        if let Err(e) = &result
            && !e.is_conflict()
        {
            self.metrics.postgres_errors.inc();
        }
        result
    }

    /// Whether this process takes PostgreSQL for away: its breaker opened after consecutive
    /// failures and has not closed since. Work that meets it may wait, held; a call that
    /// failed alone is retried as one that failed for its own reasons.
    pub fn postgres_away(&self) -> bool {
        self.db_breaker.state() != hodei_resilience::BreakerState::Closed
    }

    /// Runs `op` through [`Backends::db`], again while it fails with a version conflict, at
    /// most [`CONFLICT_ATTEMPTS`] times in all: another writer moved the row first, and the
    /// next try re-reads it and decides again. When every try lost, the last conflict is the
    /// answer.
    pub async fn db_until_no_conflict<T, F, Fut>(&self, mut op: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let mut tries = 1;
        loop {
            match self.db(&mut op).await {
                Err(e) if e.is_conflict() && tries < CONFLICT_ATTEMPTS => tries += 1,
                result => return result,
            }
        }
    }

    /// Whether a report from `worker` about `job` still waits in the reports stream (a work
    /// queue: recorded reports are gone from it). When the stream cannot be asked, the answer
    /// is yes: an attempt is never ended for its worker's silence while its outcome may be on
    /// its way.
    pub async fn report_pending(
        &self,
        worker: &hodei_domain::WorkerId,
        job: &hodei_domain::JobId,
    ) -> bool {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = match self.js.get_stream(streams::REPORTS).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "failed to open the reports stream, deferring");
                return true;
            }
        };
        match stream
            .get_last_raw_message_by_subject(&subjects::report(worker, job))
            .await
        {
            Ok(_) => true,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => false,
            Err(e) => {
                tracing::warn!(error = %e, "failed to look for pending reports, deferring");
                true
            }
        }
    }

    /// Starts the outbox relay; it stops when `shutdown` is cancelled. Only the first call
    /// relays what is handed over; a second one only claims.
    pub fn spawn_relay(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let handed = self
            .handed_over
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| crate::relay::handoff(self.relay_wake.clone()).1);
        tokio::spawn(crate::relay::run_relay(
            self.pool.clone(),
            self.js.clone(),
            handed,
            Duration::from_millis(200),
            self.metrics.clone(),
            shutdown,
        ))
    }
}

/// Runs `op` through `breaker` with [`DB_CALL_TIMEOUT`], mapping an open circuit or a timeout
/// to [`StorageError::Unavailable`].
pub async fn guarded<T, F, Fut>(breaker: &CircuitBreaker, op: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    breaker
        .call_with_timeout(DB_CALL_TIMEOUT, StorageError::is_unavailable, op)
        .await
        .map_err(|e| match e {
            BreakerError::Inner(e) => e,
            BreakerError::Open { retry_in, .. } => StorageError::Unavailable {
                reason: format!("circuit open after repeated failures, retry in {retry_in:?}"),
                retry_in,
            },
            BreakerError::Timeout { after, .. } => StorageError::Unavailable {
                reason: format!("no answer within {after:?}"),
                retry_in: Duration::from_millis(500),
            },
        })
}
