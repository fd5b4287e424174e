//! Connecting to NATS: retries until the server answers, refuses servers older than 2.10.

use std::time::Duration;

use async_nats::jetstream;

/// What can go wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("failed to connect to nats at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("nats server {version} at {url} is too old: hodei needs 2.10 or newer with jetstream")]
    TooOld { url: String, version: String },
    #[error("failed to set up {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("malformed message on {subject}: {source}")]
    Malformed {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to publish to {subject}: {reason}")]
    Publish { subject: String, reason: String },
}

/// Connects to `url` as `name`, retrying the first connection for up to `timeout` and
/// reconnecting forever afterwards. Fails if the server is older than 2.10.
pub async fn connect(
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<(async_nats::Client, jetstream::Context), MessagingError> {
    let err = |reason: String| MessagingError::Connect {
        url: url.to_owned(),
        reason,
    };
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2));
    let client = tokio::time::timeout(timeout, options.connect(url))
        .await
        .map_err(|_| err(format!("no answer within {timeout:?}")))?
        .map_err(|e| err(e.to_string()))?;
    // With retry_on_initial_connect the client may return before the handshake, and the
    // state can read `Connected` a moment before the server's INFO is stored: wait for both.
    let deadline = tokio::time::Instant::now() + timeout;
    let version = loop {
        let version = client.server_info().version;
        if client.connection_state() == async_nats::connection::State::Connected
            && !version.is_empty()
        {
            break version;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(err(format!("not connected within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !version_at_least(&version, 2, 10) {
        return Err(MessagingError::TooOld {
            url: url.to_owned(),
            version,
        });
    }
    let js = jetstream::new(client.clone());
    Ok((client, js))
}

/// Whether a `major.minor.patch[-pre]` version is at least `major.minor`.
pub fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert!(version_at_least("2.10.0", 2, 10));
        assert!(version_at_least("2.15.1", 2, 10));
        assert!(!version_at_least("2.9.10", 2, 10));
        assert!(version_at_least("3.0.0-beta", 2, 10));
    }
}
