//! The API gateway: the gRPC front door (`hodei.v1.JobService`, `PipelineService`,
//! `WorkerService`, standard health and server reflection). It validates input at the edge,
//! records submissions and cancellations (aggregate + events + outbox rows in one
//! transaction), answers queries from PostgreSQL and streams events and logs.

mod admission;
mod errors;
mod grpc_trace;
mod history;
mod jobs;
mod limits;
mod pipelines;
mod request;
mod submissions;
mod watch;
mod workers;

use std::net::SocketAddr;

use hodei_proto::v1::job_service_server::JobServiceServer;
use hodei_proto::v1::pipeline_service_server::PipelineServiceServer;
use hodei_proto::v1::worker_service_server::WorkerServiceServer;
use hodei_runtime::{BackendConfig, Backends};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
}

impl GatewayConfig {
    /// Defaults for every setting but the backends and the listen address.
    pub fn new(backends: BackendConfig, grpc_addr: SocketAddr) -> Self {
        Self {
            backends,
            grpc_addr,
            max_queued_jobs: 100_000,
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
    #[error("failed to build the reflection service: {0}")]
    Reflection(String),
    #[error("grpc server failed: {0}")]
    Serve(String),
}

/// A built gateway: connected and listening, not yet serving.
pub struct Gateway {
    config: GatewayConfig,
    backends: Backends,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Gateway {
    pub async fn build(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let backends = Backends::connect(&config.backends, "hodei-api-gateway").await?;
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
        Ok(Gateway {
            config,
            backends,
            listener,
            addr,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hodei_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| GatewayError::Reflection(e.to_string()))?;
        tracing::info!(addr = %self.addr, "grpc api listening");
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
        let pipeline_api =
            pipelines::PipelineApi::new(self.backends.clone(), admission.clone(), shutdown.clone());
        let job_api = jobs::JobApi::new(
            self.backends.clone(),
            admission,
            submissions::Submissions::start(self.backends.clone()),
            shutdown.clone(),
        );
        let result = tonic::transport::Server::builder()
            .trace_fn(grpc_trace::server_span)
            .add_service(health)
            .add_service(reflection)
            .add_service(JobServiceServer::new(job_api))
            .add_service(PipelineServiceServer::new(pipeline_api))
            .add_service(WorkerServiceServer::new(workers::WorkerApi::new(
                self.backends.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
            .await
            .map_err(|e| GatewayError::Serve(e.to_string()));
        shutdown.cancel();
        let _ = relay.await;
        if let Some(observability) = observability {
            let _ = observability.await;
        }
        result
    }
}
