//! The Hodei services the heartbeat scenarios need, started in this process through their
//! `build` + `run_until_stopped` wiring (as `hodei-system-tests` does, but with the registry's
//! heartbeat settings chosen by the scenario): the registry alone, or the gateway, scheduler
//! and registry together.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use hodei_api_gateway::{Gateway, GatewayConfig};
use hodei_registry::{Registry, RegistryConfig};
use hodei_runtime::BackendConfig;
use hodei_scheduler::{Scheduler, SchedulerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the services bind their metrics servers: a free port on the loopback interface.
const LOCALHOST_ANY_PORT: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// The registry's heartbeat settings.
#[derive(Debug, Clone, Copy)]
pub struct RegistrySettings {
    pub heartbeat_interval_ms: u64,
    pub missed_beats: u32,
    pub flush_interval_ms: u64,
    /// Share of the fleet that may go silent at once before the registry suspects its own
    /// partition.
    pub partition_share: f64,
}

/// Running services; stop them with [`Services::stop`].
pub struct Services {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The registry's task, apart so that it can be crashed and started again.
    registry: Option<JoinHandle<()>>,
    backends: BackendConfig,
    settings: RegistrySettings,
    /// The registry's `/metrics` address.
    pub registry_metrics: Option<SocketAddr>,
    /// The gateway's gRPC address, when it was started.
    pub grpc_addr: Option<SocketAddr>,
}

impl Services {
    /// Starts the registry and, with `whole`, the gateway and one scheduler too.
    pub async fn start(
        nats_url: String,
        database_url: String,
        registry: RegistrySettings,
        whole: bool,
    ) -> anyhow::Result<Services> {
        let backends = BackendConfig {
            metrics_addr: Some(LOCALHOST_ANY_PORT.into()),
            ..BackendConfig::new(nats_url, database_url)
        };
        let mut services = Services {
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
            registry: None,
            backends: backends.clone(),
            settings: registry,
            registry_metrics: None,
            grpc_addr: None,
        };
        if let Err(e) = services.start_all(backends, registry, whole).await {
            services.stop().await;
            return Err(e);
        }
        Ok(services)
    }

    /// Starts the registry (again, after [`Services::crash_registry`]).
    pub async fn start_registry(&mut self) -> anyhow::Result<()> {
        let settings = self.settings;
        let registry = Registry::build(RegistryConfig {
            backends: self.backends.clone(),
            heartbeat_interval_ms: settings.heartbeat_interval_ms,
            missed_beats: settings.missed_beats,
            flush_interval_ms: settings.flush_interval_ms,
            partition_share: settings.partition_share,
            partition_min_workers: 3,
        })
        .await
        .context("failed to start the registry")?;
        self.registry_metrics = registry.metrics_addr();
        let token = self.shutdown.clone();
        self.registry = Some(tokio::spawn(async move {
            if let Err(e) = registry.run_until_stopped(token).await {
                eprintln!("registry stopped with error: {e}");
            }
        }));
        Ok(())
    }

    /// Stops the registry mid-work, as a killed process stops: no goodbye, no last flush.
    pub async fn crash_registry(&mut self) {
        if let Some(task) = self.registry.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn start_all(
        &mut self,
        backends: BackendConfig,
        settings: RegistrySettings,
        whole: bool,
    ) -> anyhow::Result<()> {
        self.start_registry().await?;
        if !whole {
            return Ok(());
        }
        let gateway = Gateway::build(GatewayConfig::new(
            backends.clone(),
            LOCALHOST_ANY_PORT.into(),
        ))
        .await
        .context("failed to start the gateway")?;
        self.grpc_addr = Some(gateway.local_addr());
        let token = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = gateway.run_until_stopped(token).await {
                eprintln!("gateway stopped with error: {e}");
            }
        }));
        let scheduler = Scheduler::build(SchedulerConfig {
            // The scheduler places on workers seen within the registry's lost window.
            worker_stale_ms: settings.heartbeat_interval_ms * u64::from(settings.missed_beats),
            placement_retry_ms: 100,
            ..SchedulerConfig::new(backends)
        })
        .await
        .context("failed to start the scheduler")?;
        let token = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = scheduler.run_until_stopped(token).await {
                eprintln!("scheduler stopped with error: {e}");
            }
        }));
        Ok(())
    }

    /// Stops every service and waits for them (10 s each at most).
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks.into_iter().chain(self.registry) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// The value of a counter (without labels) on a Prometheus `/metrics` page.
pub async fn counter(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let page = hodei_test_support::http_get(addr, "/metrics")
        .await
        .with_context(|| format!("failed to read metrics at {addr}"))?;
    hodei_test_support::metric_sample(&page.body, name)
        .with_context(|| format!("no {name} at {addr}/metrics"))
}

/// Runs `scenario` against a private nats-server and a fresh database, removing both after it
/// whatever its outcome.
pub async fn with_backends<T>(
    scenario: impl AsyncFnOnce(
        &mut hodei_test_support::TestNats,
        &hodei_test_support::TestDatabase,
    ) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut nats = hodei_test_support::TestNats::start().await?;
    let database = hodei_test_support::TestDatabase::create().await?;
    let result = scenario(&mut nats, &database).await;
    let _ = database.cleanup().await;
    drop(nats);
    result
}
