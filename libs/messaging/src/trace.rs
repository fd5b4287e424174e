//! Trace context across NATS. Every message carries its producer's W3C trace context in the
//! `traceparent` and `tracestate` headers, and every consumer continues that trace, so one
//! job's work in the gateway, the schedulers, the registry and the agents is one trace.
//!
//! Spans follow OpenTelemetry's messaging conventions: a producer span `send <subject
//! template>` around each publish and a consumer span `process <subject template>` around each
//! message handled, with `messaging.system = "nats"`, `messaging.destination.name` (the
//! subject), `messaging.destination.template` (the subject with ids as `*`, also used in the
//! span name to keep names few), `messaging.consumer.group.name` and `messaging.message.id`.
//! Every span also says which Hodei service made it (`hodei.service`), which tells services
//! apart when several run in one process.
//!
//! Heartbeats are traced at DEBUG level: one a second per agent would drown the traces of the
//! jobs. Everything else is traced at INFO.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::subjects::{self, HEADER_TRACEPARENT, HEADER_TRACESTATE};

/// A trace context as W3C headers (`traceparent`, `tracestate`); empty when not traced. This
/// is what the outbox and the `jobs.trace_context` column store.
pub type TraceHeaders = BTreeMap<String, String>;

struct MapInjector<'a>(&'a mut TraceHeaders);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a TraceHeaders);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C trace context of `span`; empty if it is not traced.
pub fn headers_of(span: &Span) -> TraceHeaders {
    let mut headers = TraceHeaders::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MapInjector(&mut headers));
    }
    headers
}

/// The W3C trace context of the current span; empty if it is not traced.
pub fn current() -> TraceHeaders {
    headers_of(&Span::current())
}

/// Makes the context in `headers` the parent of `span` (nothing if they hold none). Call it
/// before the span is first entered.
pub fn set_parent(span: &Span, headers: &TraceHeaders) {
    if headers.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MapExtractor(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when the span is not traced (filtered out, no tracing layer).
        let _ = span.set_parent(cx);
    }
}

/// The trace headers found in a NATS message's headers.
pub fn from_nats(headers: Option<&HeaderMap>) -> TraceHeaders {
    let mut found = TraceHeaders::new();
    if let Some(headers) = headers {
        for name in [HEADER_TRACEPARENT, HEADER_TRACESTATE] {
            if let Some(value) = headers.get(name) {
                found.insert(name.to_owned(), value.as_str().to_owned());
            }
        }
    }
    found
}

/// Adds `trace` to a NATS message's headers.
pub fn to_nats(trace: &TraceHeaders, headers: &mut HeaderMap) {
    for (name, value) in trace {
        headers.insert(name.as_str(), value.as_str());
    }
}

/// Builds a messaging span at INFO or DEBUG with the conventional fields.
macro_rules! messaging_span {
    ($level:ident, $operation:literal, $kind:literal, $service:expr, $subject:expr, $consumer:expr, $message_id:expr) => {{
        let template = subjects::template($subject);
        tracing::span!(
            tracing::Level::$level,
            $operation,
            otel.name = %format_args!("{} {}", $operation, template),
            otel.kind = $kind,
            messaging.system = "nats",
            messaging.operation.name = $operation,
            messaging.operation.type = $operation,
            messaging.destination.name = %$subject,
            messaging.destination.template = %template,
            messaging.consumer.group.name = $consumer,
            messaging.message.id = $message_id,
            hodei.service = $service,
        )
    }};
}

/// A producer span `send <subject template>` for publishing `message_id` on `subject`,
/// child of the current span.
pub fn send_span(service: &str, subject: &str, message_id: &str) -> Span {
    messaging_span!(
        INFO,
        "send",
        "producer",
        service,
        subject,
        tracing::field::Empty,
        message_id
    )
}

/// A consumer span `process <subject template>` for handling a message of `consumer`, child
/// of the context its headers carry.
pub fn process_span(
    service: &str,
    subject: &str,
    consumer: &str,
    headers: Option<&HeaderMap>,
) -> Span {
    let message_id = headers
        .and_then(|h| h.get(subjects::HEADER_MSG_ID))
        .map(|v| v.as_str().to_owned());
    let span = messaging_span!(
        INFO,
        "process",
        "consumer",
        service,
        subject,
        consumer,
        message_id.as_deref().unwrap_or_default()
    );
    set_parent(&span, &from_nats(headers));
    span
}

/// [`send_span`] at DEBUG, for heartbeats.
pub fn send_heartbeat_span(service: &str, subject: &str) -> Span {
    messaging_span!(
        DEBUG,
        "send",
        "producer",
        service,
        subject,
        tracing::field::Empty,
        tracing::field::Empty
    )
}

/// [`process_span`] at DEBUG, for heartbeats.
pub fn process_heartbeat_span(
    service: &str,
    subject: &str,
    consumer: &str,
    headers: Option<&HeaderMap>,
) -> Span {
    let span = messaging_span!(
        DEBUG,
        "process",
        "consumer",
        service,
        subject,
        consumer,
        tracing::field::Empty
    );
    set_parent(&span, &from_nats(headers));
    span
}

/// NATS headers for publishing from within `span`: its trace context and `Nats-Msg-Id`.
pub fn nats_headers(span: &Span, message_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    to_nats(&headers_of(span), &mut headers);
    headers.insert(subjects::HEADER_MSG_ID, message_id);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_nats_headers() {
        let mut trace = TraceHeaders::new();
        trace.insert(
            HEADER_TRACEPARENT.to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        );
        trace.insert(HEADER_TRACESTATE.to_owned(), "hodei=1".to_owned());
        let mut nats = HeaderMap::new();
        to_nats(&trace, &mut nats);
        assert_eq!(from_nats(Some(&nats)), trace);
        assert!(from_nats(None).is_empty());
    }

    #[test]
    fn without_a_tracing_layer_nothing_is_injected() {
        let span = send_span("test", "hodei.v1.report.x", "id-1");
        assert!(headers_of(&span).is_empty());
        let headers = nats_headers(&span, "id-1");
        assert!(headers.get(HEADER_TRACEPARENT).is_none());
        assert_eq!(
            headers.get(subjects::HEADER_MSG_ID).map(|v| v.as_str()),
            Some("id-1")
        );
    }
}
