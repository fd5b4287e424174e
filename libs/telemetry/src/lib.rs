//! Process plumbing every Hodei binary shares: logging initialisation (human-readable by
//! default, JSON with `HODEI_LOG_FORMAT=json`, filtered by `HODEI_LOG`) and shutdown on
//! SIGINT/SIGTERM.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid HODEI_LOG filter: {0}")]
    Filter(String),
    #[error("failed to install the log subscriber: {0}")]
    Install(String),
}

/// Installs the global log subscriber for `service`. Default filter: `info`.
pub fn init(service: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("HODEI_LOG") {
        Ok(f) if !f.is_empty() => {
            EnvFilter::try_new(f).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        _ => EnvFilter::new("info"),
    };
    let json = std::env::var("HODEI_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| TelemetryError::Install(e.to_string()))?;
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    Ok(())
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
