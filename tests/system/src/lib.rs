//! A whole Hodei system in one process for end-to-end tests: a private nats-server, a fresh
//! PostgreSQL database, and the gateway, scheduler, registry and agents started through the
//! same `build` + `run_until_stopped` wiring their binaries use.

pub mod browser;
pub mod mute;
pub mod processes;

use std::time::Duration;

use hodei_admin::nats::NatsCredentials;
use hodei_agent::{Agent, AgentConfig};
use hodei_api_gateway::{Gateway, GatewayConfig};
use hodei_domain::{Role, TenantId, WorkerId};
use hodei_messaging::permissions::NatsRole;
use hodei_messaging::{NatsAuth, NatsCredentialArgs};
use hodei_proto::v1 as pb;
use hodei_proto::v1::access_service_client::AccessServiceClient;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_proto::v1::pipeline_service_client::PipelineServiceClient;
use hodei_proto::v1::tenant_service_client::TenantServiceClient;
use hodei_proto::v1::worker_service_client::WorkerServiceClient;
use hodei_proto::{AuthChannel, Bearer};
use hodei_registry::{Registry, RegistryConfig};
use hodei_runtime::BackendConfig;
use hodei_scheduler::{Scheduler, SchedulerConfig};
use hodei_test_support::{
    NatsSecurity, TestDatabase, TestNats, TestSupportError, http_get, wait_for,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Where test services bind their metrics servers: a free port on the loopback interface.
const LOCALHOST_ANY_PORT: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// Heartbeat interval used by test systems, in milliseconds.
pub const HEARTBEAT_MS: u64 = 200;

/// Why a test system could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl From<TestSupportError> for StartError {
    fn from(e: TestSupportError) -> Self {
        StartError(e.to_string())
    }
}

fn fail(what: &str) -> impl Fn(String) -> StartError + '_ {
    move |e| StartError(format!("failed to start {what}: {e}"))
}

fn worker_id(id: &str) -> Result<WorkerId, StartError> {
    id.parse()
        .map_err(|e| StartError(format!("{id:?} is not a worker id: {e}")))
}

fn read_seed(credentials: &NatsCredentials, role: &NatsRole) -> Result<String, StartError> {
    let path = credentials
        .service_seed_file(role)
        .ok_or_else(|| StartError(format!("no nats credential for {role}")))?;
    std::fs::read_to_string(&path)
        .map(|seed| seed.trim().to_owned())
        .map_err(|e| fail("nats credentials")(format!("{}: {e}", path.display())))
}

/// An agent to start: its id and labels (`k=v,k=v`).
pub struct AgentSpec {
    pub id: &'static str,
    pub labels: &'static str,
    pub slots: u32,
}

/// Stores a new API token of `tenant` with `role` straight in the database behind `pool` (as
/// `hodei-admin token create` does) and returns its secret.
pub async fn issue_token(
    pool: &hodei_storage::PgPool,
    tenant: &str,
    role: Role,
) -> Result<String, StartError> {
    let tenant: TenantId = tenant
        .parse()
        .map_err(|e: hodei_domain::IdError| StartError(e.to_string()))?;
    let name = format!("test {role} of {tenant}");
    hodei_admin::create_token(pool, &name, tenant, role, None, "tests")
        .await
        .map(|(_, secret)| secret)
        .map_err(|e| StartError(e.to_string()))
}

/// An endpoint of the gateway at `addr`: `https://` (verified as `localhost`) trusting the CA in `tls_dir` (and
/// presenting its client certificate when `mutual`) when given, else plain `http://`.
pub fn endpoint(
    addr: std::net::SocketAddr,
    tls_dir: Option<&std::path::Path>,
    mutual: bool,
) -> Result<tonic::transport::Endpoint, StartError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let error = |e: &dyn std::fmt::Display| StartError(format!("grpc client: {e}"));
    let Some(dir) = tls_dir else {
        return Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| e.connect_timeout(Duration::from_secs(5)))
            .map_err(|e| error(&e));
    };
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| error(&e));
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .domain_name("localhost");
    if mutual {
        tls = tls.identity(Identity::from_pem(
            read("client.pem")?,
            read("client-key.pem")?,
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| error(&e))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| error(&e))
}

/// The gRPC clients of one gateway, every call carrying one token (or none).
#[derive(Clone)]
pub struct Clients {
    pub jobs: JobServiceClient<AuthChannel>,
    pub pipelines: PipelineServiceClient<AuthChannel>,
    pub workers: WorkerServiceClient<AuthChannel>,
    pub access: AccessServiceClient<AuthChannel>,
    pub tenants: TenantServiceClient<AuthChannel>,
}

impl Clients {
    /// Clients over `channel` whose calls carry `token`.
    pub fn new(channel: Channel, token: Option<&str>) -> Result<Clients, StartError> {
        let bearer = Bearer::new(token).map_err(|e| StartError(e.to_string()))?;
        let channel = bearer.on(channel);
        Ok(Clients {
            jobs: JobServiceClient::new(channel.clone()),
            pipelines: PipelineServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel.clone()),
            access: AccessServiceClient::new(channel.clone()),
            tenants: TenantServiceClient::new(channel),
        })
    }
}

/// A running system. Dropping it without `stop` leaves the tasks to die with the runtime.
pub struct TestSystem {
    pub nats: TestNats,
    pub database: TestDatabase,
    /// Clients with an admin token of tenant `default`.
    pub jobs: JobServiceClient<AuthChannel>,
    pub pipelines: PipelineServiceClient<AuthChannel>,
    pub workers: WorkerServiceClient<AuthChannel>,
    pub access: AccessServiceClient<AuthChannel>,
    /// The admin token the clients above carry.
    pub admin_token: String,
    /// The channel to the gateway, for clients with other tokens.
    pub channel: Channel,
    /// With `SystemOptions::tls`: `ca.pem`, `server.pem`, `client.pem` and their keys.
    tls_dir: Option<tempfile::TempDir>,
    /// Every service's and agent's NATS credential, and the server's authorization block.
    nats_credentials: NatsCredentials,
    _nats_dir: tempfile::TempDir,
    pub grpc_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Scheduler replicas, by index, for tests that crash one.
    schedulers: Vec<JoinHandle<()>>,
    /// In-process agents by id, for tests that crash one.
    agent_tasks: Vec<(String, JoinHandle<()>)>,
    backends: BackendConfig,
    options: SystemOptions,
    /// Per agent id, cancelled once that agent's `run_until_stopped` has returned.
    agents_stopped: Vec<(&'static str, CancellationToken)>,
    work_root: tempfile::TempDir,
    /// Each service's `/metrics`, `/healthz`, `/readyz` address, by name (`api-gateway`,
    /// `scheduler` (and `scheduler-1`, … for more replicas), `registry`, agents by id).
    metrics_addrs: Vec<(String, std::net::SocketAddr)>,
    /// The web console's address, with `SystemOptions::console`.
    console_addr: Option<std::net::SocketAddr>,
}

/// Settings a test may change; the rest are fixed for test systems.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    pub max_queued_jobs: u64,
    pub queue_timeout_ms: u64,
    pub start_timeout_ms: u64,
    /// The same for an attempt that first fetches artifacts of earlier pipeline steps.
    pub start_timeout_artifacts_ms: u64,
    /// How long past its own timeout a running job may stay without a report before the
    /// reconciler ends it.
    pub timeout_grace_ms: u64,
    /// How long agents let running attempts finish when draining.
    pub agent_drain_timeout_ms: u64,
    /// How many scheduler replicas to run.
    pub schedulers: usize,
    /// Schedulers' consumer ack wait: how fast a crashed replica's messages move on.
    pub ack_wait_ms: u64,
    /// Missed heartbeats before the registry marks a worker unreachable.
    pub missed_beats: u32,
    /// How long agents run attempts on without NATS; a silent worker's attempts are handed
    /// back after this plus the kill grace (1 s).
    pub agent_lease_ms: u64,
    /// Schedulers' retention: ended jobs and runs this old move to the archive.
    pub retention_age: Duration,
    /// How often the schedulers' retention looks.
    pub retention_interval: Duration,
    /// Serve the API over TLS with certificates of a CA made for the system (see
    /// [`TestSystem::tls_dir`]); the clients trust that CA.
    pub tls: bool,
    /// With `tls`: require client certificates signed by that CA; the clients present one.
    pub mutual_tls: bool,
    /// Accept OIDC access tokens.
    pub oidc: Option<hodei_api_gateway::OidcArgs>,
    /// The gateway's per-tenant submission rate and burst, and open streams.
    pub tenant_submit_rate: u32,
    pub tenant_submit_burst: u32,
    pub tenant_max_streams: u32,
    /// Serve the web console on a free port (see [`TestSystem::console_url`]).
    pub console: bool,
}

impl Default for SystemOptions {
    fn default() -> Self {
        Self {
            max_queued_jobs: 100_000,
            queue_timeout_ms: 3_600_000,
            start_timeout_ms: 60_000,
            start_timeout_artifacts_ms: 600_000,
            timeout_grace_ms: 30_000,
            agent_drain_timeout_ms: 2_000,
            schedulers: 1,
            ack_wait_ms: 30_000,
            // Generous: a loaded CI machine must not declare healthy agents lost.
            missed_beats: 25,
            agent_lease_ms: 2_000,
            retention_age: Duration::from_secs(30 * 86_400),
            retention_interval: Duration::from_secs(600),
            tls: false,
            mutual_tls: false,
            oidc: None,
            tenant_submit_rate: 100_000,
            tenant_submit_burst: 100_000,
            tenant_max_streams: 10_000,
            console: false,
        }
    }
}

/// A registry with the test systems' settings on `backends`, running until `shutdown`: its
/// metrics address and its task.
async fn spawn_registry(
    backends: BackendConfig,
    missed_beats: u32,
    shutdown: CancellationToken,
) -> Result<(Option<std::net::SocketAddr>, JoinHandle<()>), StartError> {
    let registry = Registry::build(RegistryConfig {
        backends,
        heartbeat_interval_ms: HEARTBEAT_MS,
        missed_beats,
        flush_interval_ms: 20,
        partition_share: 0.5,
        partition_min_workers: 3,
    })
    .await
    .map_err(|e| StartError(format!("registry: {e}")))?;
    let addr = registry.metrics_addr();
    let task = tokio::spawn(async move {
        if let Err(e) = registry.run_until_stopped(shutdown).await {
            eprintln!("registry stopped with error: {e}");
        }
    });
    Ok((addr, task))
}

/// A beat of worker `id` as an agent of a new incarnation sends it, with nothing running: a
/// 15 s lease, 10 s kill grace, no labels, 1 CPU, 1,000 MB and 2 slots. Tests change what they
/// need.
pub fn heartbeat(id: &WorkerId) -> hodei_messaging::Heartbeat {
    hodei_messaging::Heartbeat {
        worker_id: id.clone(),
        incarnation: hodei_domain::IncarnationId::new(),
        lease_ms: 15_000,
        kill_grace_ms: 10_000,
        labels: std::collections::BTreeMap::new(),
        capacity: hodei_domain::Resources::new(1000, 1000),
        max_concurrent_jobs: 2,
        usage: Default::default(),
        running: Vec::new(),
        draining: false,
        leaving: false,
        seal_key: None,
        sent_at: chrono::Utc::now(),
    }
}

/// A job that runs `script` with `/bin/sh -c`, a 60 s timeout and defaults otherwise.
pub fn shell_job(name: &str, script: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
            interpreter: vec!["/bin/sh".into(), "-c".into()],
            script: script.to_owned(),
        })),
        timeout_secs: 60,
        ..Default::default()
    }
}

impl TestSystem {
    /// A new token of `tenant` with `role`.
    pub async fn token(&self, tenant: &str, role: Role) -> Result<String, StartError> {
        let pool = self
            .database
            .connect()
            .await
            .map_err(|e| StartError(e.to_string()))?;
        let token = issue_token(&pool, tenant, role).await;
        pool.close().await;
        token
    }

    /// Where the system's CA and certificates are, when it serves TLS.
    /// The web console's base URL (`http://…` or, with `tls`, `https://…`), with
    /// `SystemOptions::console`.
    pub fn console_url(&self) -> Option<String> {
        let scheme = if self.tls_dir.is_some() {
            "https"
        } else {
            "http"
        };
        self.console_addr.map(|a| format!("{scheme}://{a}"))
    }

    pub fn tls_dir(&self) -> Option<&std::path::Path> {
        self.tls_dir.as_ref().map(|d| d.path())
    }

    /// Clients whose calls carry `token` (none: no credentials).
    pub fn clients(&self, token: Option<&str>) -> Result<Clients, StartError> {
        Clients::new(self.channel.clone(), token)
    }

    /// Starts every service and the given agents.
    pub async fn start(agents: &[AgentSpec]) -> Result<TestSystem, StartError> {
        Self::start_with(agents, SystemOptions::default()).await
    }

    /// Starts every service, with `options`, and the given agents.
    pub async fn start_with(
        agents: &[AgentSpec],
        options: SystemOptions,
    ) -> Result<TestSystem, StartError> {
        let tls_dir = if options.tls {
            let dir = tempfile::tempdir().map_err(|e| fail("tls")(e.to_string()))?;
            hodei_admin::tls_init(dir.path(), &["localhost".into(), "127.0.0.1".into()])
                .map_err(|e| fail("tls")(e.to_string()))?;
            Some(dir)
        } else {
            None
        };
        // NATS admits only the services' and agents' own credentials; with `tls`, over TLS
        // with the same CA.
        let nats_dir = tempfile::tempdir().map_err(|e| fail("nats credentials")(e.to_string()))?;
        let mut nats_credentials = NatsCredentials::init(
            nats_dir.path(),
            tls_dir
                .as_ref()
                .map(|d| (d.path().join("server.pem"), d.path().join("server-key.pem"))),
        )
        .map_err(|e| fail("nats credentials")(e.to_string()))?;
        for spec in agents {
            let id = worker_id(spec.id)?;
            nats_credentials
                .add_agent(&id)
                .map_err(|e| fail("nats credentials")(e.to_string()))?;
        }
        let nats_ca = tls_dir.as_ref().map(|d| d.path().join("ca.pem"));
        // The control plane's secrets key: the gateway seals to it, the schedulers open.
        let secrets_key = nats_dir.path().join("secrets.xk");
        let secrets_public = hodei_admin::secrets_init(&secrets_key)
            .map_err(|e| fail("secrets key")(e.to_string()))?;
        let admin_seed = read_seed(&nats_credentials, &NatsRole::Admin)?;
        let nats = TestNats::start_secured(NatsSecurity {
            config: nats_credentials.server_config(),
            probe_seed: admin_seed,
            ca: nats_ca.clone(),
        })
        .await?;
        let database = TestDatabase::create().await?;
        let backends = BackendConfig {
            metrics_addr: Some(LOCALHOST_ANY_PORT.into()),
            ..BackendConfig::new(nats.url(), database.url())
        };
        let as_service = |role: NatsRole| BackendConfig {
            nats_auth: NatsCredentialArgs {
                nats_nkey_file: nats_credentials.service_seed_file(&role),
                nats_ca: nats_ca.clone(),
            },
            ..backends.clone()
        };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut metrics_addrs = Vec::new();

        let tls = match &tls_dir {
            Some(dir) => hodei_api_gateway::TlsConfig {
                tls_cert: Some(dir.path().join("server.pem")),
                tls_key: Some(dir.path().join("server-key.pem")),
                tls_client_ca: options.mutual_tls.then(|| dir.path().join("ca.pem")),
            },
            None => hodei_api_gateway::TlsConfig::default(),
        };
        let gateway = Gateway::build(GatewayConfig {
            max_queued_jobs: options.max_queued_jobs,
            tls,
            oidc: options.oidc.clone().unwrap_or_default(),
            tenant_submit_rate: std::num::NonZeroU32::new(options.tenant_submit_rate)
                .ok_or_else(|| StartError("tenant_submit_rate must be 1 or more".into()))?,
            tenant_submit_burst: std::num::NonZeroU32::new(options.tenant_submit_burst)
                .ok_or_else(|| StartError("tenant_submit_burst must be 1 or more".into()))?,
            tenant_max_streams: options.tenant_max_streams,
            secrets_public_key: Some(secrets_public),
            console_addr: options.console.then(|| ([127, 0, 0, 1], 0).into()),
            ..GatewayConfig::new(as_service(NatsRole::Gateway), ([127, 0, 0, 1], 0).into())
        })
        .await
        .map_err(|e| fail("gateway")(e.to_string()))?;
        let grpc_addr = gateway.local_addr();
        let console_addr = gateway.console_addr();
        metrics_addrs.extend(
            gateway
                .metrics_addr()
                .map(|a| ("api-gateway".to_owned(), a)),
        );
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = gateway.run_until_stopped(token).await {
                eprintln!("gateway stopped with error: {e}");
            }
        }));

        let mut schedulers = Vec::new();
        for replica in 0..options.schedulers.max(1) {
            let scheduler = Scheduler::build(SchedulerConfig {
                worker_stale_ms: HEARTBEAT_MS * 25,
                placement_retry_ms: 100,
                reconcile_after_ms: 3_000,
                queue_timeout_ms: options.queue_timeout_ms,
                start_timeout_ms: options.start_timeout_ms,
                start_timeout_artifacts_ms: options.start_timeout_artifacts_ms,
                timeout_grace_ms: options.timeout_grace_ms,
                ack_wait_ms: options.ack_wait_ms,
                retention_age: options.retention_age,
                retention_interval: options.retention_interval,
                secrets_key_file: Some(secrets_key.clone()),
                ..SchedulerConfig::new(as_service(NatsRole::Scheduler))
            })
            .await
            .map_err(|e| fail("scheduler")(e.to_string()))?;
            let name = match replica {
                0 => "scheduler".to_owned(),
                n => format!("scheduler-{n}"),
            };
            metrics_addrs.extend(scheduler.metrics_addr().map(|a| (name, a)));
            let token = shutdown.clone();
            schedulers.push(tokio::spawn(async move {
                if let Err(e) = scheduler.run_until_stopped(token).await {
                    eprintln!("scheduler stopped with error: {e}");
                }
            }));
        }

        let (registry, task) = spawn_registry(
            as_service(NatsRole::Registry),
            options.missed_beats,
            shutdown.clone(),
        )
        .await?;
        metrics_addrs.extend(registry.map(|a| ("registry".to_owned(), a)));
        tasks.push(task);

        let work_root = tempfile::tempdir().map_err(|e| fail("agents")(e.to_string()))?;
        let channel = endpoint(
            grpc_addr,
            tls_dir.as_ref().map(|d| d.path()),
            options.mutual_tls,
        )?
        .connect()
        .await
        .map_err(|e| fail("grpc client")(e.to_string()))?;
        let pool = database
            .connect()
            .await
            .map_err(|e| fail("test database pool")(e.to_string()))?;
        let admin_token = issue_token(&pool, "default", Role::Admin).await?;
        pool.close().await;
        let clients = Clients::new(channel.clone(), Some(&admin_token))?;
        let mut system = TestSystem {
            nats,
            database,
            jobs: clients.jobs,
            pipelines: clients.pipelines,
            workers: clients.workers,
            access: clients.access,
            admin_token,
            channel,
            tls_dir,
            nats_credentials,
            _nats_dir: nats_dir,
            grpc_addr,
            shutdown,
            tasks,
            schedulers,
            agent_tasks: Vec::new(),
            backends,
            options,
            agents_stopped: Vec::new(),
            work_root,
            metrics_addrs,
            console_addr,
        };
        for spec in agents {
            system.add_agent(spec, HEARTBEAT_MS).await?;
        }
        Ok(system)
    }

    /// Starts one more in-process agent, beating every `heartbeat_ms`.
    pub async fn add_agent(
        &mut self,
        spec: &AgentSpec,
        heartbeat_ms: u64,
    ) -> Result<(), StartError> {
        let id = worker_id(spec.id)?;
        let nats_auth = NatsCredentialArgs {
            nats_nkey_file: Some(self.enrol_agent(&id).await?),
            nats_ca: self.nats_ca(),
        };
        let agent = Agent::build(AgentConfig {
            nats_url: self.nats.url(),
            nats_auth,
            worker_id: Some(spec.id.to_owned()),
            labels: spec.labels.to_owned(),
            max_concurrent_jobs: spec.slots,
            cpu_millis: Some(4000),
            memory_mb: Some(4096),
            work_dir: Some(self.work_root.path().join(spec.id)),
            heartbeat_interval_ms: heartbeat_ms,
            kill_grace_ms: 1000,
            lease_ms: self.options.agent_lease_ms,
            drain_timeout_ms: self.options.agent_drain_timeout_ms,
            metrics_addr: Some(LOCALHOST_ANY_PORT.into()),
            artifact_max_bytes: 64 * 1024 * 1024,
            job_user: None,
            job_max_processes: 4096,
            job_max_open_files: 65_536,
            job_cgroups: hodei_agent::CgroupMode::Auto,
        })
        .await
        .map_err(|e| fail("agent")(e.to_string()))?;
        self.metrics_addrs
            .extend(agent.metrics_addr().map(|a| (spec.id.to_owned(), a)));
        let token = self.shutdown.clone();
        let stopped = CancellationToken::new();
        self.agents_stopped.push((spec.id, stopped.clone()));
        let task = tokio::spawn(async move {
            if let Err(e) = agent.run_until_stopped(token).await {
                eprintln!("agent stopped with error: {e}");
            }
            stopped.cancel();
        });
        self.agent_tasks.push((spec.id.to_owned(), task));
        Ok(())
    }

    /// The NATS credential of agent `id` (its seed file), enrolling it first if it has none:
    /// the server reloads its authorization and the new key is waited for.
    pub async fn enrol_agent(&mut self, id: &WorkerId) -> Result<std::path::PathBuf, StartError> {
        let path = self.nats_credentials.agent_seed_file(id);
        if path.is_file() {
            return Ok(path);
        }
        let path = self
            .nats_credentials
            .add_agent(id)
            .map_err(|e| fail("nats credentials")(e.to_string()))?;
        self.nats
            .reload(self.nats_credentials.server_config())
            .await?;
        let auth = self.nats_auth(&path)?;
        let url = self.nats.url();
        let name = hodei_messaging::permissions::agent_client_name(id);
        wait_for(
            "nats-server to admit the new agent key",
            Duration::from_secs(10),
            || {
                let (url, name, auth) = (url.clone(), name.clone(), auth.clone());
                async move {
                    hodei_messaging::connect_with(&url, &name, Duration::from_millis(500), &auth)
                        .await
                        .ok()
                }
            },
        )
        .await
        .map_err(|e| StartError(format!("{e} (nats-server log: {})", self.nats.log_tail())))?;
        Ok(path)
    }

    /// Revokes agent `id`'s NATS key and has the server reload: its connections are dropped
    /// and it can no longer connect.
    pub async fn revoke_agent(&mut self, id: &WorkerId) -> Result<bool, StartError> {
        let revoked = self
            .nats_credentials
            .revoke_agent(id)
            .map_err(|e| fail("nats credentials")(e.to_string()))?;
        self.nats
            .reload(self.nats_credentials.server_config())
            .await?;
        Ok(revoked)
    }

    /// The seed file of `role`'s NATS credential, enrolling an agent first.
    async fn seed_file(&mut self, role: &NatsRole) -> Result<std::path::PathBuf, StartError> {
        match role {
            NatsRole::Agent(id) => self.enrol_agent(id).await,
            service => self.service_seed(service),
        }
    }

    /// The environment a service or agent process needs to reach this system's NATS as
    /// `role` (`HODEI_NATS_URL`, `HODEI_NATS_NKEY_FILE`, and `HODEI_NATS_CA` with TLS).
    pub async fn nats_env(&mut self, role: &NatsRole) -> Result<Vec<(String, String)>, StartError> {
        let seed = self.seed_file(role).await?;
        let mut env = vec![
            ("HODEI_NATS_URL".to_owned(), self.nats.url()),
            (
                "HODEI_NATS_NKEY_FILE".to_owned(),
                seed.to_string_lossy().into_owned(),
            ),
        ];
        if let Some(ca) = self.nats_ca() {
            env.push((
                "HODEI_NATS_CA".to_owned(),
                ca.to_string_lossy().into_owned(),
            ));
        }
        Ok(env)
    }

    /// A NATS connection with the `admin` credential, which may publish and subscribe to
    /// anything: for tests that inject messages no service or agent may send.
    pub async fn admin_nats(
        &self,
    ) -> Result<(async_nats::Client, async_nats::jetstream::Context), StartError> {
        let auth = self.admin_nats_auth()?;
        hodei_messaging::connect_with(
            &self.nats.url(),
            &NatsRole::Admin.client_name(),
            Duration::from_secs(10),
            &auth,
        )
        .await
        .map_err(|e| fail("nats client")(e.to_string()))
    }

    /// The `admin` NATS credential, for tools that connect themselves (benchmarks).
    pub fn admin_nats_auth(&self) -> Result<NatsAuth, StartError> {
        self.nats_auth(&self.service_seed(&NatsRole::Admin)?)
    }

    /// The credential whose seed is in `seed`, with the CA of this system's NATS.
    fn nats_auth(&self, seed: &std::path::Path) -> Result<NatsAuth, StartError> {
        NatsAuth::load(Some(seed), self.nats_ca().as_deref())
            .map_err(|e| fail("nats credentials")(e.to_string()))
    }

    /// The seed file of a service's (or admin's) NATS credential.
    fn service_seed(&self, role: &NatsRole) -> Result<std::path::PathBuf, StartError> {
        self.nats_credentials
            .service_seed_file(role)
            .ok_or_else(|| StartError(format!("no nats credential for {role}")))
    }

    /// The CA of the NATS server's certificate, when the system runs with TLS.
    pub fn nats_ca(&self) -> Option<std::path::PathBuf> {
        self.tls_dir.as_ref().map(|d| d.path().join("ca.pem"))
    }

    /// Crashes scheduler replica `index`: its task is aborted mid-work, with no graceful
    /// shutdown (unacked messages wait for the ack wait, open transactions roll back).
    pub fn crash_scheduler(&mut self, index: usize) {
        if let Some(task) = self.schedulers.get(index) {
            task.abort();
        }
    }

    /// Crashes the in-process agent `id`: its task is aborted with no goodbye; its child
    /// processes are killed as the task's state is dropped.
    pub fn crash_agent(&mut self, id: &str) {
        if let Some((_, task)) = self.agent_tasks.iter().find(|(agent, _)| agent == id) {
            task.abort();
        }
    }

    /// Where the backends are, to start services or agents as separate processes.
    pub fn backends(&self) -> &BackendConfig {
        &self.backends
    }

    /// Whether the agent `id` has stopped (its `run_until_stopped` returned). `None` for an
    /// agent this system did not start.
    pub fn agent_stopped(&self, id: &str) -> Option<bool> {
        self.agents_stopped
            .iter()
            .find(|(agent, _)| *agent == id)
            .map(|(_, stopped)| stopped.is_cancelled())
    }

    /// Starts another registry, `registry-<n>`, on this system's NATS (sharing the beats with
    /// the first) and on the database at `database_url`; it stops with the system. Returns
    /// its metrics address.
    pub async fn start_registry(
        &mut self,
        database_url: String,
    ) -> Result<std::net::SocketAddr, StartError> {
        let role = NatsRole::Registry;
        let backends = BackendConfig {
            nats_auth: NatsCredentialArgs {
                nats_nkey_file: self.nats_credentials.service_seed_file(&role),
                nats_ca: self.backends.nats_auth.nats_ca.clone(),
            },
            database_url,
            ..self.backends.clone()
        };
        let (addr, task) =
            spawn_registry(backends, self.options.missed_beats, self.shutdown.clone()).await?;
        self.tasks.push(task);
        let addr = addr.ok_or_else(|| StartError("the registry serves no metrics".into()))?;
        let name = format!(
            "registry-{}",
            self.metrics_addrs
                .iter()
                .filter(|(n, _)| n.starts_with("registry"))
                .count()
        );
        self.metrics_addrs.push((name, addr));
        Ok(addr)
    }

    /// The `/metrics`, `/healthz`, `/readyz` address of a service: `api-gateway`, `scheduler`
    /// (`scheduler-1`, … for further replicas), `registry`, or an agent's id.
    pub fn metrics_addr(&self, service: &str) -> Option<std::net::SocketAddr> {
        self.metrics_addrs
            .iter()
            .find(|(name, _)| name == service)
            .map(|(_, addr)| *addr)
    }

    /// Job `id` as GetJob answers it now.
    pub async fn get_job(&self, id: &str) -> Result<pb::Job, tonic::Status> {
        self.jobs
            .clone()
            .get_job(pb::GetJobRequest {
                job_id: id.to_owned(),
                as_of: None,
            })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| tonic::Status::internal("GetJob answered without a job"))
    }

    /// Pipeline run `id` as GetPipelineRun answers it now.
    pub async fn get_run(&self, id: &str) -> Result<pb::PipelineRun, tonic::Status> {
        self.pipelines
            .clone()
            .get_pipeline_run(pb::GetPipelineRunRequest {
                run_id: id.to_owned(),
                as_of: None,
            })
            .await?
            .into_inner()
            .run
            .ok_or_else(|| tonic::Status::internal("GetPipelineRun answered without a run"))
    }

    /// Sets `tenant`'s policy (weight and quotas) as an admin.
    pub async fn set_tenant_policy(
        &self,
        tenant: &str,
        policy: pb::TenantPolicy,
    ) -> Result<(), tonic::Status> {
        self.clients(Some(&self.admin_token))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .tenants
            .set_tenant_policy(pb::SetTenantPolicyRequest {
                tenant: tenant.to_owned(),
                policy: Some(policy),
            })
            .await?;
        Ok(())
    }

    /// Submits `spec` and returns the accepted job; a refusal is the error.
    pub async fn submit(&self, spec: pb::JobSpec) -> Result<pb::Job, tonic::Status> {
        let response = self
            .jobs
            .clone()
            .submit_job(pb::SubmitJobRequest {
                spec: Some(spec),
                tenant: String::new(),
            })
            .await?;
        response
            .into_inner()
            .job
            .ok_or_else(|| tonic::Status::internal("SubmitJob answered without a job"))
    }

    /// Submits pipeline `spec` and returns the accepted run; a refusal is the error.
    pub async fn submit_pipeline(
        &self,
        spec: pb::PipelineSpec,
    ) -> Result<pb::PipelineRun, tonic::Status> {
        let response = self
            .pipelines
            .clone()
            .submit_pipeline(pb::SubmitPipelineRequest {
                spec: Some(spec),
                tenant: String::new(),
            })
            .await?;
        response
            .into_inner()
            .run
            .ok_or_else(|| tonic::Status::internal("SubmitPipeline answered without a run"))
    }

    /// Waits (up to `deadline`) until `/readyz` of every one of `services` (names as for
    /// [`TestSystem::metrics_addr`]) answers `status` (200 ready, 503 not).
    pub async fn wait_readiness(
        &self,
        services: &[&str],
        status: u16,
        deadline: Duration,
    ) -> Result<(), TestSupportError> {
        for service in services {
            let addr = self.served_at(service, "/readyz")?;
            wait_for(
                &format!("{service} /readyz to answer {status}"),
                deadline,
                || async move {
                    let response = http_get(addr, "/readyz").await.ok()?;
                    (response.status == status).then_some(())
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Where `service` serves `path` (`/readyz`, `/metrics`).
    fn served_at(
        &self,
        service: &str,
        path: &str,
    ) -> Result<std::net::SocketAddr, TestSupportError> {
        self.metrics_addr(service)
            .ok_or_else(|| TestSupportError::Http {
                url: format!("{path} of {service}"),
                reason: "no such service in this test system".to_owned(),
            })
    }

    /// The value of `series` on `service`'s `/metrics` now; `None` if it cannot be read.
    pub async fn metric(&self, service: &str, series: &str) -> Option<f64> {
        let addr = self.served_at(service, "/metrics").ok()?;
        let metrics = http_get(addr, "/metrics").await.ok()?.body;
        hodei_test_support::metric_sample(&metrics, series)
    }

    /// Waits (up to `deadline`) until `service`'s PostgreSQL circuit breaker is open (its
    /// `hodei_postgres_breaker_open` gauge reads 1): the service takes PostgreSQL for away.
    pub async fn wait_postgres_breaker_open(
        &self,
        service: &str,
        deadline: Duration,
    ) -> Result<(), TestSupportError> {
        wait_for(
            &format!("{service}'s postgres breaker to open"),
            deadline,
            || async move {
                let open = self.metric(service, "hodei_postgres_breaker_open").await;
                (open == Some(1.0)).then_some(())
            },
        )
        .await
    }

    /// Waits (up to `deadline`) until job `id` is in a state `pred` accepts, and returns it.
    pub async fn wait_job(
        &self,
        id: &str,
        what: &str,
        deadline: Duration,
        pred: impl Fn(pb::JobState) -> bool,
    ) -> Result<pb::Job, TestSupportError> {
        let client = self.jobs.clone();
        wait_for(&format!("job {id}: {what}"), deadline, || {
            let mut client = client.clone();
            let id = id.to_owned();
            let pred = &pred;
            async move {
                let job = client
                    .get_job(pb::GetJobRequest {
                        job_id: id,
                        as_of: None,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .job?;
                pred(job.state()).then_some(job)
            }
        })
        .await
    }

    /// Waits (up to `deadline`) for job `id` to reach a terminal state, and returns it.
    pub async fn wait_terminal(
        &self,
        id: &str,
        deadline: Duration,
    ) -> Result<pb::Job, TestSupportError> {
        self.wait_job(id, "to end", deadline, |state| {
            matches!(
                state,
                pb::JobState::Succeeded
                    | pb::JobState::Failed
                    | pb::JobState::Cancelled
                    | pb::JobState::TimedOut
            )
        })
        .await
    }

    /// The folder agents keep their workspaces under.
    pub fn work_root(&self) -> &std::path::Path {
        self.work_root.path()
    }

    /// Stops every service, waits for them, and drops the database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let agents = self.agent_tasks.into_iter().map(|(_, task)| task);
        for task in self.tasks.into_iter().chain(self.schedulers).chain(agents) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let _ = self.database.cleanup().await;
    }
}
