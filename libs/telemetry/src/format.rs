//! Log line formats that name the OpenTelemetry trace and span of the span an event happens
//! in, so a line can be found from a trace and a trace from a line. Human-readable:
//! `<time> <LEVEL> <span>:<span>: <message> <fields> trace_id=… span_id=…`; JSON: the
//! standard flattened event with `trace_id` and `span_id` keys added.

use std::fmt;
use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber, span};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The OpenTelemetry ids of a span, kept in its extensions by [`TraceIdsLayer`].
#[derive(Debug, Clone)]
struct TraceIds {
    trace_id: String,
    span_id: String,
}

/// Records each traced span's OpenTelemetry trace and span ids (lowercase hex) when it is
/// first entered, for the formats to print. It reads them through the dispatcher it was
/// registered with: while an event is being dispatched the current dispatcher cannot be asked.
#[derive(Debug, Default)]
pub(crate) struct TraceIdsLayer {
    dispatch: OnceLock<WeakDispatch>,
}

impl<S> Layer<S> for TraceIdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        if span.extensions().get::<TraceIds>().is_some() {
            return;
        }
        let Some(dispatch) = self.dispatch.get().and_then(WeakDispatch::upgrade) else {
            return;
        };
        // No extension of the span is locked here: the OpenTelemetry layer locks them.
        let Some(cx) = tracing_opentelemetry::get_otel_context(id, &dispatch) else {
            return;
        };
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if sc.is_valid() {
            span.extensions_mut().insert(TraceIds {
                trace_id: sc.trace_id().to_string(),
                span_id: sc.span_id().to_string(),
            });
        }
    }
}

/// The trace and span ids of the span the event being formatted happens in, if it is traced.
fn ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<TraceIds>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    ctx.lookup_current()?
        .extensions()
        .get::<TraceIds>()
        .cloned()
}

/// `<time> <LEVEL> <span>:<span>: <fields> trace_id=… span_id=…`, without colours.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HumanFormat;

impl<S, N> FormatEvent<S, N> for HumanFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut writer)?;
        write!(writer, " {:>5} ", event.metadata().level())?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}:", span.name())?;
            }
            writer.write_char(' ')?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        if let Some(TraceIds { trace_id, span_id }) = ids(ctx) {
            write!(writer, " trace_id={trace_id} span_id={span_id}")?;
        }
        writeln!(writer)
    }
}

/// The JSON format of `inner` with `"trace_id"` and `"span_id"` added to each object.
#[derive(Debug, Clone)]
pub(crate) struct JsonWithIds<F> {
    inner: F,
}

impl<F> JsonWithIds<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<S, N, F> FormatEvent<S, N> for JsonWithIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(TraceIds { trace_id, span_id }) = ids(ctx) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The inner format writes one JSON object per line: add the ids as its first keys.
        match line.strip_prefix('{') {
            Some(rest) => {
                let separator = if rest.starts_with('}') { "" } else { "," };
                write!(
                    writer,
                    "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"{separator}{rest}"
                )
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use crate::TelemetryConfig;
    use crate::setup::subscriber;

    /// Collects what the log layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn config(json: bool) -> TelemetryConfig {
        TelemetryConfig {
            service: "test".to_owned(),
            version: "0.0.0".to_owned(),
            log_filter: "info".to_owned(),
            trace_filter: "info".to_owned(),
            json,
            otlp_endpoint: None,
        }
    }

    fn log_lines(json: bool) -> Vec<String> {
        let captured = Captured::default();
        let (subscriber, _guard) = subscriber(&config(json), captured.clone(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(job_id = "j-1", "outside any span");
            let span = tracing::info_span!("place", worker = "w-1");
            let _entered = span.enter();
            tracing::info!(job_id = "j-1", "job assigned");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    fn is_hex(s: &str, len: usize) -> bool {
        s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
    }

    #[test]
    fn human_lines_inside_a_span_carry_trace_and_span_ids() {
        let lines = log_lines(false);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("INFO outside any span job_id=\"j-1\""),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains("trace_id="), "{}", lines[0]);
        assert!(
            lines[1].contains(" place: job assigned job_id=\"j-1\""),
            "{}",
            lines[1]
        );
        let trace_id = lines[1].split("trace_id=").nth(1).unwrap();
        assert!(is_hex(&trace_id[..32], 32), "{}", lines[1]);
        let span_id = lines[1].split("span_id=").nth(1).unwrap();
        assert!(is_hex(span_id, 16), "{}", lines[1]);
    }

    #[test]
    fn json_lines_inside_a_span_carry_trace_and_span_ids() {
        let lines = log_lines(true);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let outside: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(outside["message"], "outside any span");
        assert!(outside.get("trace_id").is_none());
        let inside: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(inside["message"], "job assigned");
        assert_eq!(inside["job_id"], "j-1");
        assert!(is_hex(inside["trace_id"].as_str().unwrap(), 32), "{inside}");
        assert!(is_hex(inside["span_id"].as_str().unwrap(), 16), "{inside}");
    }
}
