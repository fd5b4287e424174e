//! The gateway, the scheduler and the registry as separate operating-system processes, started
//! from the binaries built next to this one (`cargo build --release --bins`), as an operator
//! runs them: each has its own memory, so a scenario reads each service's RSS apart from the
//! harness's. Settings follow the in-process test system's where a scenario's figures depend
//! on them (staleness, placement retry, reconcile, heartbeat flush).

use std::time::Duration;

use anyhow::Context as _;
use hodei_domain::Role;
use hodei_proto::AuthChannel;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_system_tests::processes::{ServiceProcess, backend_vars, loopback_port};
use hodei_system_tests::{Clients, HEARTBEAT_MS, SystemOptions, endpoint, issue_token};
use hodei_test_support::{TestDatabase, TestNats};
use sqlx::PgPool;

/// How long a service may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The three services as processes, on a private nats-server and a fresh database.
pub struct ServiceProcesses {
    pub nats: TestNats,
    pub database: TestDatabase,
    /// The gateway, the scheduler and the registry, in that order.
    pub services: Vec<ServiceProcess>,
    /// A client of the gateway with an admin token of tenant `default`.
    pub jobs: JobServiceClient<AuthChannel>,
    /// The folder of the services' logs, removed when this is dropped.
    _logs: tempfile::TempDir,
}

impl ServiceProcesses {
    /// Starts the services, the gateway with `max_queued_jobs` as its admission limit, and
    /// waits until each is ready. On failure nothing is left behind: the database is dropped
    /// and the processes started are killed.
    pub async fn start(max_queued_jobs: u64) -> anyhow::Result<ServiceProcesses> {
        let nats = TestNats::start()
            .await
            .context("failed to start nats-server")?;
        let database = TestDatabase::create()
            .await
            .context("failed to create the database")?;
        match launch(&nats, &database, max_queued_jobs).await {
            Ok((services, jobs, logs)) => Ok(ServiceProcesses {
                nats,
                database,
                services,
                jobs,
                _logs: logs,
            }),
            Err(e) => {
                let _ = database.cleanup().await;
                Err(e)
            }
        }
    }

    /// A pool on the services' database.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        Ok(self.database.connect().await?)
    }

    /// Each running service's name and process id.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.services
            .iter()
            .filter_map(|s| Some((s.name().to_owned(), s.pid()?)))
            .collect()
    }

    /// The end of each service's log, for an error.
    pub fn log_tails(&self) -> String {
        self.services
            .iter()
            .map(|s| format!("{}:\n{}", s.name(), s.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills the services, reaps them and drops their database.
    pub async fn stop(mut self) {
        for service in &mut self.services {
            service.kill().await;
        }
        if let Err(e) = self.database.cleanup().await {
            eprintln!("could not drop the services' database: {e}");
        }
    }
}

/// Starts the services on `nats` and `database`; see [`ServiceProcesses::start`].
async fn launch(
    nats: &TestNats,
    database: &TestDatabase,
    max_queued_jobs: u64,
) -> anyhow::Result<(
    Vec<ServiceProcess>,
    JobServiceClient<AuthChannel>,
    tempfile::TempDir,
)> {
    let dir = tempfile::Builder::new()
        .prefix("hodei-bench-services-")
        .tempdir()
        .context("failed to make a folder for the services' logs")?;
    let backends = |extra: &[(&str, String)]| backend_vars(nats, database, "warn", extra);
    // The in-process test system's settings, where the figures depend on them.
    let options = SystemOptions::default();
    let grpc = loopback_port()?;
    let mut gateway = ServiceProcess::start(
        "api-gateway",
        "hodei-api-gateway",
        backends(&[
            ("HODEI_GRPC_ADDR", grpc.to_string()),
            ("HODEI_MAX_QUEUED_JOBS", max_queued_jobs.to_string()),
            (
                "HODEI_TENANT_SUBMIT_RATE",
                options.tenant_submit_rate.to_string(),
            ),
            (
                "HODEI_TENANT_SUBMIT_BURST",
                options.tenant_submit_burst.to_string(),
            ),
        ]),
        loopback_port()?,
        dir.path(),
    )?;
    // The gateway applies the migrations: the others start once it is ready.
    gateway.wait_readiness(200, READY_WITHIN).await?;
    let scheduler = ServiceProcess::start(
        "scheduler",
        "hodei-scheduler",
        backends(&[
            ("HODEI_WORKER_STALE_MS", (HEARTBEAT_MS * 25).to_string()),
            ("HODEI_PLACEMENT_RETRY_MS", "100".to_owned()),
            ("HODEI_RECONCILE_AFTER_MS", "3000".to_owned()),
        ]),
        loopback_port()?,
        dir.path(),
    )?;
    let registry = ServiceProcess::start(
        "registry",
        "hodei-registry",
        backends(&[
            ("HODEI_HEARTBEAT_INTERVAL_MS", HEARTBEAT_MS.to_string()),
            ("HODEI_MISSED_BEATS", options.missed_beats.to_string()),
            ("HODEI_HEARTBEAT_FLUSH_MS", "20".to_owned()),
        ]),
        loopback_port()?,
        dir.path(),
    )?;
    let mut services = vec![gateway, scheduler, registry];
    for service in services.iter_mut().skip(1) {
        service.wait_readiness(200, READY_WITHIN).await?;
    }
    let pool = database.connect().await?;
    let token = issue_token(&pool, "default", Role::Admin).await;
    pool.close().await;
    let channel = endpoint(grpc, None, false)?.connect_lazy();
    let clients = Clients::new(channel, Some(&token?))?;
    Ok((services, clients.jobs, dir))
}
