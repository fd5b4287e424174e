//! The small HTTP server every service runs beside its real work, on its own port
//! (`HODEI_METRICS_ADDR`): `/metrics` (Prometheus/OpenMetrics text), `/healthz` (the process
//! answers) and `/readyz` (its dependencies answer: 200 when every check passes, 503 with the
//! failing ones otherwise).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::TelemetryError;
use crate::metrics::Metrics;

/// Longest a readiness check or a scrape-time refresh may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The OpenMetrics text content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A boxed future, for [`Probes`] to be usable as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The outcome of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `nats`.
    pub name: &'static str,
    /// `Err` says why it failed.
    pub result: Result<(), String>,
}

impl Check {
    pub fn new(name: &'static str, result: Result<(), String>) -> Self {
        Self { name, result }
    }
}

/// What a service knows about its own state.
pub trait Probes: Send + Sync + 'static {
    /// The checks `/readyz` reports; ready when all pass.
    fn readiness(&self) -> BoxFuture<'_, Vec<Check>>;

    /// Brings gauges read from outside (PostgreSQL, the running attempts) up to date before a
    /// scrape.
    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A bound, not yet serving, observability server.
#[derive(Debug)]
pub struct ObservabilityServer {
    listener: TcpListener,
    addr: SocketAddr,
}

struct Shared {
    metrics: Metrics,
    probes: Arc<dyn Probes>,
}

impl ObservabilityServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, TelemetryError> {
        let bind_err = |source| TelemetryError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self { listener, addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`.
    pub async fn serve(
        self,
        metrics: Metrics,
        probes: Arc<dyn Probes>,
        shutdown: CancellationToken,
    ) {
        let service = metrics.service().to_owned();
        let app = Router::new()
            .route("/metrics", get(scrape))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Arc::new(Shared { metrics, probes }));
        tracing::info!(service, addr = %self.addr, "metrics and health listening");
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::warn!(service, error = %e, "metrics server failed");
        }
    }
}

async fn scrape(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if tokio::time::timeout(PROBE_TIMEOUT, shared.probes.refresh())
        .await
        .is_err()
    {
        tracing::debug!("metrics refresh timed out, serving the last values");
    }
    match shared.metrics.encode() {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("failed to encode metrics: {e}\n"),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let checks = match tokio::time::timeout(PROBE_TIMEOUT, shared.probes.readiness()).await {
        Ok(checks) => checks,
        Err(_) => vec![Check::new(
            "readiness",
            Err(format!("checks did not answer within {PROBE_TIMEOUT:?}")),
        )],
    };
    let ready = checks.iter().all(|c| c.result.is_ok());
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    for check in &checks {
        match &check.result {
            Ok(()) => body.push_str(&format!("{}: ok\n", check.name)),
            Err(why) => body.push_str(&format!("{}: {why}\n", check.name)),
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
