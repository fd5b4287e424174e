//! Publishing to JetStream. Every message carries a de-duplication id, so publishing it again
//! after a lost acknowledgement never stores it twice; [`until_acked`] retries with backoff
//! until the server acknowledges or the caller gives up.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};
use bytes::Bytes;
use hodei_messaging::trace;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, warn};

use crate::observe::SERVICE;

/// First wait between two tries.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Hands `payload` to the client for `subject`, with `msg_id` as its de-duplication id and the
/// context of a `send` span (child of the current span) as its trace context; the returned
/// future resolves when JetStream acknowledges it.
pub(crate) async fn send(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: Bytes,
) -> Result<PublishAckFuture, jetstream::context::PublishError> {
    let span = trace::send_span(SERVICE, subject, msg_id);
    let headers = trace::nats_headers(&span, msg_id);
    js.publish_with_headers(subject.to_owned(), headers, payload)
        .instrument(span)
        .await
}

/// Publishes `payload` until JetStream acknowledges it, waiting longer after each failure
/// (each counted in `hodei_nats_errors_total{operation="publish"}`).
/// Returns `false` if `stop` was cancelled first, or if the server refuses the message for good
/// (too large).
pub(crate) async fn until_acked(
    js: &jetstream::Context,
    metrics: &hodei_telemetry::Metrics,
    subject: &str,
    msg_id: &str,
    payload: Bytes,
    stop: &CancellationToken,
) -> bool {
    let mut backoff = MIN_BACKOFF;
    let mut tries: u32 = 0;
    loop {
        tries += 1;
        let attempt = async {
            send(js, subject, msg_id, payload.clone())
                .await?
                .into_future()
                .await
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = stop.cancelled() => return false,
        };
        match result {
            Ok(_) => return true,
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                error!(subject, size = payload.len(), error = %e, "message too large for the server, dropping it");
                return false;
            }
            Err(e) => {
                metrics.nats_error("publish");
                warn!(subject, tries, retry_in_ms = %backoff.as_millis(), error = %e, "publish not acknowledged, retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return false,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
