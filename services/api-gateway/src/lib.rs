//! The API gateway: the gRPC front door (`hodei.v1.JobService`, `PipelineService`,
//! `WorkerService`, `ScheduleService`, `TenantService`, `AccessService`, standard health and
//! server reflection). It validates input at the edge,
//! records submissions and cancellations (aggregate + events + outbox rows in one
//! transaction), answers queries from PostgreSQL and streams events and logs.

mod access;
mod admission;
mod answer;
mod auth;
mod console;
mod errors;
mod grpc_trace;
mod history;
mod jobs;
mod limits;
mod pipelines;
mod quotas;
mod request;
mod schedules;
mod secrets;
mod submissions;
mod tenants;
mod watch;
mod workers;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;

use hodei_proto::v1::access_service_server::AccessServiceServer;
use hodei_proto::v1::job_service_server::JobServiceServer;
use hodei_proto::v1::pipeline_service_server::PipelineServiceServer;
use hodei_proto::v1::schedule_service_server::ScheduleServiceServer;
use hodei_proto::v1::tenant_service_server::TenantServiceServer;
use hodei_proto::v1::worker_service_server::WorkerServiceServer;
use hodei_runtime::{BackendConfig, Backends};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub use auth::TOKEN_CACHE_TTL;

/// How often the server pings an HTTP/2 connection that carries nothing, and how long it waits
/// for the answer before closing it: a client that went away releases its streams (and its
/// tenant's stream quota) within their sum.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Most bytes one request message may have: a larger one is refused before it is decoded or
/// buffered whole, with OUT_OF_RANGE giving its size and this limit. (What a request asks for
/// must also fit the NATS server's `max_payload`, 1 MiB by default: that is checked once it
/// is decoded, naming the field; see `limits`.) tonic's default, set here as one named figure
/// for every service.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Source name in the envelopes of events this service records.
pub const SOURCE: &str = "hodei/api-gateway";

/// Gateway configuration.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "hodei-api-gateway", about = "The Hodei gRPC API")]
pub struct GatewayConfig {
    #[command(flatten)]
    pub backends: BackendConfig,
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "HODEI_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Admission control: with this many jobs queued, submissions are refused with
    /// RESOURCE_EXHAUSTED until the queue drains.
    #[arg(long, env = "HODEI_MAX_QUEUED_JOBS", default_value_t = 100_000)]
    pub max_queued_jobs: u64,
    /// Jobs (and pipeline runs) one tenant may submit a second, sustained.
    #[arg(long, env = "HODEI_TENANT_SUBMIT_RATE", default_value_t = NonZeroU32::new(5_000).unwrap_or(NonZeroU32::MIN))]
    pub tenant_submit_rate: NonZeroU32,
    /// How many submissions above that rate a tenant may make at once.
    #[arg(long, env = "HODEI_TENANT_SUBMIT_BURST", default_value_t = NonZeroU32::new(10_000).unwrap_or(NonZeroU32::MIN))]
    pub tenant_submit_burst: NonZeroU32,
    /// Streams (watches, log follows, artifact downloads) one tenant may hold open at once.
    #[arg(long, env = "HODEI_TENANT_MAX_STREAMS", default_value_t = 1_000)]
    pub tenant_max_streams: u32,
    /// Concurrent calls one HTTP/2 connection may carry (further ones wait for a free one).
    #[arg(long, env = "HODEI_MAX_STREAMS_PER_CONNECTION", default_value_t = 256)]
    pub max_streams_per_connection: u32,
    /// The control plane's public secrets key (`X…`, from `hodei-admin secrets init`):
    /// secret env values are sealed to it before they are stored. Without it, specs with
    /// `secret_env` are refused.
    #[arg(long, env = "HODEI_SECRETS_PUBLIC_KEY")]
    pub secrets_public_key: Option<String>,
    /// Address of the web console (HTTP, or HTTPS with the gRPC API's certificate); unset:
    /// no console. Port 0 picks a free port.
    #[arg(long, env = "HODEI_CONSOLE_ADDR")]
    pub console_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsConfig,
    #[command(flatten)]
    pub oidc: OidcArgs,
}

/// TLS for the gRPC API. Without a certificate the API is served in plain text (for a
/// gateway behind a TLS-terminating proxy, or tests); `scripts/up.sh` always sets one.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    #[arg(long, env = "HODEI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "HODEI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "HODEI_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// OIDC access tokens: accepted when an issuer and its JWKS file are set.
#[derive(clap::Args, Debug, Clone)]
pub struct OidcArgs {
    /// The `iss` accepted tokens carry.
    #[arg(long, env = "HODEI_OIDC_ISSUER", requires = "oidc_jwks")]
    pub oidc_issuer: Option<String>,
    /// The issuer's JWKS, as a file (re-read when a token names a key it lacks).
    #[arg(long, env = "HODEI_OIDC_JWKS", requires = "oidc_issuer")]
    pub oidc_jwks: Option<PathBuf>,
    /// The `aud` accepted tokens must name; unset: not checked.
    #[arg(long, env = "HODEI_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// The claim that holds the tenant.
    #[arg(long, env = "HODEI_OIDC_TENANT_CLAIM", default_value = "hodei_tenant")]
    pub oidc_tenant_claim: String,
    /// The claim that holds the role (viewer, submitter, operator or admin).
    #[arg(long, env = "HODEI_OIDC_ROLE_CLAIM", default_value = "hodei_role")]
    pub oidc_role_claim: String,
}

impl Default for OidcArgs {
    fn default() -> Self {
        Self {
            oidc_issuer: None,
            oidc_jwks: None,
            oidc_audience: None,
            oidc_tenant_claim: "hodei_tenant".into(),
            oidc_role_claim: "hodei_role".into(),
        }
    }
}

impl OidcArgs {
    fn config(&self) -> Option<auth::OidcConfig> {
        let (issuer, jwks) = (self.oidc_issuer.clone()?, self.oidc_jwks.clone()?);
        Some(auth::OidcConfig {
            settings: hodei_auth::JwtSettings {
                issuer,
                audience: self.oidc_audience.clone(),
                tenant_claim: self.oidc_tenant_claim.clone(),
                role_claim: self.oidc_role_claim.clone(),
            },
            jwks_path: jwks,
        })
    }
}

impl TlsConfig {
    fn server_config(&self) -> Result<Option<ServerTlsConfig>, GatewayError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| GatewayError::Tls(format!("{}: {e}", path.display())))
        };
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(Some(config))
    }
}

impl GatewayConfig {
    /// Defaults for every setting but the backends and the listen address.
    pub fn new(backends: BackendConfig, grpc_addr: SocketAddr) -> Self {
        Self {
            backends,
            grpc_addr,
            max_queued_jobs: 100_000,
            tenant_submit_rate: NonZeroU32::new(5_000).unwrap_or(NonZeroU32::MIN),
            tenant_submit_burst: NonZeroU32::new(10_000).unwrap_or(NonZeroU32::MIN),
            tenant_max_streams: 1_000,
            max_streams_per_connection: 256,
            secrets_public_key: None,
            console_addr: None,
            tls: TlsConfig::default(),
            oidc: OidcArgs::default(),
        }
    }
}

/// Why the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Backend(#[from] hodei_runtime::BackendError),
    #[error("failed to bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up tls: {0}")]
    Tls(String),
    #[error("HODEI_SECRETS_PUBLIC_KEY: {0}")]
    SecretsKey(#[from] hodei_messaging::seal::SealError),
    #[error(transparent)]
    Jwks(#[from] auth::JwksError),
    #[error("failed to build the reflection service: {0}")]
    Reflection(String),
    #[error("grpc server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
}

/// A built gateway: connected and listening, not yet serving.
pub struct Gateway {
    config: GatewayConfig,
    backends: Backends,
    auth: Arc<auth::Authenticator>,
    secrets: secrets::Secrets,
    tls: Option<ServerTlsConfig>,
    listener: TcpListener,
    addr: SocketAddr,
    console: Option<console::ConsoleServer>,
}

impl Gateway {
    pub async fn build(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let tls = config.tls.server_config()?;
        let secrets = secrets::Secrets::new(
            config
                .secrets_public_key
                .as_deref()
                .map(hodei_messaging::seal::SealingKey::parse)
                .transpose()?,
        );
        let backends = Backends::connect(&config.backends, "hodei-api-gateway").await?;
        let auth = Arc::new(auth::Authenticator::new(
            backends.clone(),
            config.oidc.config(),
        )?);
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
        let console = match config.console_addr {
            Some(console_addr) => {
                let files = match (&config.tls.tls_cert, &config.tls.tls_key) {
                    (Some(cert), Some(key)) => Some(console::ConsoleTls {
                        cert: cert.clone(),
                        key: key.clone(),
                    }),
                    _ => None,
                };
                Some(console::ConsoleServer::bind(console_addr, files.as_ref()).await?)
            }
            None => None,
        };
        Ok(Gateway {
            config,
            backends,
            auth,
            secrets,
            tls,
            listener,
            addr,
            console,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the web console, if configured.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console
            .as_ref()
            .map(console::ConsoleServer::local_addr)
    }

    /// The address of the `/metrics`, `/healthz` and `/readyz` server, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.backends.metrics_addr()
    }

    /// Serves until `shutdown`, then lets in-flight calls finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let relay = self.backends.spawn_relay(shutdown.clone());
        let observability = self.backends.spawn_observability(shutdown.clone());
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<JobServiceServer<jobs::JobApi>>()
            .await;
        health_reporter
            .set_serving::<WorkerServiceServer<workers::WorkerApi>>()
            .await;
        health_reporter
            .set_serving::<PipelineServiceServer<pipelines::PipelineApi>>()
            .await;
        health_reporter
            .set_serving::<AccessServiceServer<access::AccessApi>>()
            .await;
        health_reporter
            .set_serving::<ScheduleServiceServer<schedules::ScheduleApi>>()
            .await;
        health_reporter
            .set_serving::<TenantServiceServer<tenants::TenantApi>>()
            .await;
        // Both reflection versions: grpcurl before 1.9, grpcio-reflection clients and many
        // other stock tools ask `v1alpha` only, newer ones try `v1` first.
        let reflection = reflection_builder()
            .build_v1()
            .map_err(|e| GatewayError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection_builder()
            .build_v1alpha()
            .map_err(|e| GatewayError::Reflection(e.to_string()))?;
        tracing::info!(addr = %self.addr, tls = self.tls.is_some(), "grpc api listening");
        // Nagle off on every accepted connection: a response goes out as several small writes
        // (headers, data, trailers), and with Nagle on the last one waits for the client's
        // delayed ACK, adding ~40 ms to a unary call on loopback. (`Server::tcp_nodelay`
        // applies only to listeners tonic binds itself.)
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(self.listener),
            |accepted| accepted.and_then(|stream| stream.set_nodelay(true).map(|()| stream)),
        );
        let admission = admission::Admission::start(
            self.backends.clone(),
            self.config.max_queued_jobs,
            shutdown.clone(),
        );
        let (audit, audit_writer) = access::Auditor::start(self.backends.clone());
        let quotas = quotas::Quotas::new(
            self.config.tenant_submit_rate,
            self.config.tenant_submit_burst,
            self.config.tenant_max_streams,
        );
        let pipeline_api = Arc::new(pipelines::PipelineApi::new(
            self.backends.clone(),
            self.secrets.clone(),
            admission.clone(),
            audit.clone(),
            Arc::clone(&quotas),
            shutdown.clone(),
        ));
        let schedule_api = schedules::ScheduleApi::new(
            self.backends.clone(),
            self.secrets.clone(),
            audit.clone(),
            Arc::clone(&quotas),
        );
        let job_api = Arc::new(jobs::JobApi::new(
            self.backends.clone(),
            self.secrets.clone(),
            admission,
            submissions::Submissions::start(self.backends.clone()),
            audit.clone(),
            Arc::clone(&quotas),
            shutdown.clone(),
        ));
        let worker_api = Arc::new(workers::WorkerApi::new(
            self.backends.clone(),
            audit.clone(),
        ));
        let console = self.console.map(|server| {
            let services = console::Services {
                jobs: Arc::clone(&job_api),
                pipelines: Arc::clone(&pipeline_api),
                workers: Arc::clone(&worker_api),
                quotas: Arc::clone(&quotas),
            };
            tokio::spawn(server.serve(
                services,
                Arc::clone(&self.auth),
                self.backends.clone(),
                shutdown.clone(),
            ))
        });
        let access_api =
            access::AccessApi::new(self.backends.clone(), Arc::clone(&self.auth), audit.clone());
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            server = server
                .tls_config(tls)
                .map_err(|e| GatewayError::Tls(e.to_string()))?;
        }
        let result = server
            .max_concurrent_streams(Some(self.config.max_streams_per_connection))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .trace_fn(grpc_trace::server_span)
            .layer(auth::AuthLayer::new(Arc::clone(&self.auth)))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                JobServiceServer::from_arc(job_api).max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                PipelineServiceServer::from_arc(pipeline_api)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                ScheduleServiceServer::new(schedule_api)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                TenantServiceServer::new(tenants::TenantApi::new(
                    self.backends.clone(),
                    audit.clone(),
                ))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                WorkerServiceServer::from_arc(worker_api)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                AccessServiceServer::new(access_api).max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
            .await
            .map_err(|e| GatewayError::Serve(e.to_string()));
        shutdown.cancel();
        if let Some(console) = console
            && let Err(e) = console.await
        {
            tracing::error!(error = %e, "web console task failed");
        }
        // Every call has been answered: the audit trail's last entries, and the refusals
        // still counted, go in before the gateway stops.
        audit_writer.stop().await;
        let _ = relay.await;
        if let Some(observability) = observability {
            let _ = observability.await;
        }
        result
    }
}

/// Server reflection over Hodei's services and the health service, for either version.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hodei_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
