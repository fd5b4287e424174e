//! One server span per gRPC call, named `<package.Service>/<Method>` per OpenTelemetry's RPC
//! conventions, continuing the caller's trace when the request carries W3C `traceparent`
//! (and `tracestate`) metadata. Health checks and reflection are not traced.

use hodei_messaging::subjects::{HEADER_TRACEPARENT, HEADER_TRACESTATE};
use hodei_messaging::{TraceHeaders, trace};
use tonic::codegen::http;

/// The span a call is served in.
pub(crate) fn server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    if path.starts_with("grpc.") {
        return tracing::Span::none();
    }
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        hodei.service = "api-gateway",
    );
    let mut incoming = TraceHeaders::new();
    for name in [HEADER_TRACEPARENT, HEADER_TRACESTATE] {
        if let Some(value) = request.headers().get(name).and_then(|v| v.to_str().ok()) {
            incoming.insert(name.to_owned(), value.to_owned());
        }
    }
    trace::set_parent(&span, &incoming);
    span
}
