//! Settling messages a service cannot handle: they are copied to the dead-letter stream with
//! the subject and the reason in headers, then terminated so they are never redelivered.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};

use crate::subjects;

/// Copies `message` to `hodei.v1.dlq.<kind>` and terminates it. Failures are logged: a
/// message that cannot be dead-lettered is still terminated, so it cannot loop forever.
pub async fn dead_letter(
    js: &jetstream::Context,
    message: &jetstream::Message,
    kind: &str,
    reason: &str,
) {
    tracing::warn!(subject = %message.subject, kind, reason, "message dead-lettered");
    let mut headers = HeaderMap::new();
    headers.insert(subjects::HEADER_DLQ_SUBJECT, message.subject.as_str());
    headers.insert(subjects::HEADER_DLQ_REASON, reason);
    match js
        .publish_with_headers(
            subjects::dead_letter(kind),
            headers,
            message.payload.clone(),
        )
        .await
    {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::warn!(subject = %message.subject, error = %e, "dead letter not acknowledged");
            }
        }
        Err(e) => {
            tracing::warn!(subject = %message.subject, error = %e, "failed to dead-letter message")
        }
    }
    if let Err(e) = message.ack_with(AckKind::Term).await {
        tracing::warn!(subject = %message.subject, error = %e, "failed to terminate message");
    }
}
