//! Settling messages a service cannot handle: they are copied to the dead-letter stream with
//! the subject and the reason in headers, then terminated so they are never redelivered; and
//! the growing delay of a message handed back for another try.

use std::time::Duration;

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

/// How many times `message` has been delivered (1 on the first delivery).
pub fn deliveries(message: &jetstream::Message) -> i64 {
    message.info().map_or(1, |info| info.delivered)
}

/// The delay before the next delivery of a message handed back after `deliveries` tries:
/// `base` doubled per earlier delivery, at most `max`. An outage of any length then costs a
/// bounded number of redeliveries a minute instead of exhausting a delivery limit.
pub fn backoff(deliveries: i64, base: Duration, max: Duration) -> Duration {
    let doublings = u32::try_from(deliveries.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    base.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_delivery_up_to_the_cap() {
        let base = Duration::from_millis(250);
        let max = Duration::from_secs(5);
        assert_eq!(backoff(1, base, max), base);
        assert_eq!(backoff(0, base, max), base);
        assert_eq!(backoff(2, base, max), Duration::from_millis(500));
        assert_eq!(backoff(4, base, max), Duration::from_secs(2));
        assert_eq!(backoff(6, base, max), max);
        assert_eq!(backoff(i64::MAX, base, max), max);
    }
}
