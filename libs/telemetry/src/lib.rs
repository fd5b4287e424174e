//! Process plumbing every Hodei binary shares: tracing (logs on stderr, human-readable or
//! JSON, with trace and span ids on every line inside a span; OpenTelemetry spans exported
//! over OTLP/gRPC when an endpoint is configured), the Prometheus metrics catalogue, the small
//! HTTP server for `/metrics`, `/healthz` and `/readyz`, and shutdown on SIGINT/SIGTERM.

mod format;
pub mod http;
pub mod metrics;
mod setup;

pub use http::{Check, ObservabilityServer, Probes};
pub use metrics::Metrics;
pub use setup::{TelemetryConfig, TelemetryGuard, init, init_with};
use tokio_util::sync::CancellationToken;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid {variable} filter: {reason}")]
    Filter {
        variable: &'static str,
        reason: String,
    },
    #[error("failed to install the log subscriber: {0}")]
    Install(String),
    #[error("failed to set up the otlp exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("failed to bind the metrics server on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        child.cancel();
    });
    token
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for sigterm, waiting for sigint only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
