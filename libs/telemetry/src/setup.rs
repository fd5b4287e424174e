//! Installing the global subscriber: a log layer and an OpenTelemetry layer, each with its own
//! filter (a `warn` log filter must not stop INFO spans from being traced), and the tracer
//! provider that exports spans over OTLP/gRPC when an endpoint is configured.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::TelemetryError;
use crate::format::{HumanFormat, JsonWithIds, TraceIdsLayer};

/// Default filter of the log layer.
const DEFAULT_LOG_FILTER: &str = "info";
/// Default filter of the OpenTelemetry layer: Hodei's spans, not the transport's own (the
/// exporter's HTTP/2 client must not trace itself).
const DEFAULT_TRACE_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off";

/// How telemetry is set up; [`TelemetryConfig::from_env`] reads it from the environment.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The `service.name` resource attribute, e.g. `scheduler`.
    pub service: String,
    /// The `service.version` resource attribute.
    pub version: String,
    /// Filter of the log layer (`HODEI_LOG`, default `info`).
    pub log_filter: String,
    /// Filter of the OpenTelemetry layer (`HODEI_TRACE`, default `info`).
    pub trace_filter: String,
    /// Logs as JSON lines (`HODEI_LOG_FORMAT=json`) instead of human-readable text.
    pub json: bool,
    /// OTLP/gRPC endpoint spans are exported to (`HODEI_OTLP_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); no export when unset.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// The configuration for `service` from `HODEI_LOG`, `HODEI_TRACE`, `HODEI_LOG_FORMAT`,
    /// `HODEI_OTLP_ENDPOINT` and `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn from_env(service: &str) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            service: service.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            log_filter: var("HODEI_LOG").unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
            trace_filter: var("HODEI_TRACE").unwrap_or_else(|| DEFAULT_TRACE_FILTER.to_owned()),
            json: var("HODEI_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json")),
            otlp_endpoint: var("HODEI_OTLP_ENDPOINT")
                .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")),
        }
    }
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] exports the spans still
/// buffered. Dropping it without `shutdown` shuts the provider down too, blocking.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Exports every span ended so far, waiting for the collector's answer.
    pub async fn flush(&self) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        // The provider blocks while the exporter, driven by this runtime, does its work.
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "failed to flush spans");
        }
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let stopped = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(5))
        })
        .await;
        if let Ok(Err(e)) = stopped {
            eprintln!("failed to flush traces at shutdown: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

/// Installs the global subscriber for `service`, configured from the environment (see
/// [`TelemetryConfig::from_env`]). Keep the guard until the end of `main` and call
/// [`TelemetryGuard::shutdown`] there. Must be called inside a Tokio runtime.
pub fn init(service: &str) -> Result<TelemetryGuard, TelemetryError> {
    init_with(TelemetryConfig::from_env(service))
}

/// Installs the global subscriber as `config` says.
pub fn init_with(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (subscriber, guard) = subscriber(&config, std::io::stderr, ansi)?;
    subscriber
        .try_init()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    tracing::info!(
        service = %config.service,
        version = %config.version,
        otlp_endpoint = config.otlp_endpoint.as_deref().unwrap_or("none"),
        "starting"
    );
    Ok(guard)
}

/// The subscriber: the OpenTelemetry layer and the log layer, each behind its own filter,
/// writing logs to `writer` (with colours in the fields if `ansi`).
pub(crate) fn subscriber<W>(
    config: &TelemetryConfig,
    writer: W,
    ansi: bool,
) -> Result<(impl Subscriber + Send + Sync + 'static, TelemetryGuard), TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = |variable: &'static str, directives: &str| {
        EnvFilter::try_new(directives).map_err(|e| TelemetryError::Filter {
            variable,
            reason: e.to_string(),
        })
    };
    let log_filter = filter("HODEI_LOG", &config.log_filter)?;
    let trace_filter = filter("HODEI_TRACE", &config.trace_filter)?;
    let provider = tracer_provider(config)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hodei"))
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(trace_filter);
    // Exactly one of the two is set; `Option` keeps the subscriber's type the same.
    let (json, human) = if config.json {
        let json = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .json()
            .flatten_event(true)
            .with_target(false)
            .map_event_format(JsonWithIds::new)
            .with_filter(log_filter);
        (Some(json), None)
    } else {
        let human = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .event_format(HumanFormat)
            .with_filter(log_filter);
        (None, Some(human))
    };
    let subscriber = tracing_subscriber::registry()
        .with(otel)
        .with(TraceIdsLayer::default())
        .with(json)
        .with(human);
    let guard = TelemetryGuard {
        provider: Some(provider),
        exporting: config.otlp_endpoint.is_some(),
    };
    Ok((subscriber, guard))
}

/// A tracer provider with the service's resource, exporting in batches when an endpoint is
/// configured. Without one spans are still made (logs carry their ids, and trace context
/// still crosses NATS) but go nowhere.
fn tracer_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(config.service.clone())
        .with_attribute(KeyValue::new("service.version", config.version.clone()))
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(builder.build());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
    Ok(builder.with_batch_exporter(exporter).build())
}
