//! Connecting to NATS: with this process's credential (an nkey) and the CA to check the
//! server's TLS certificate by, retrying until the server answers; refuses servers older
//! than 2.10.

use std::path::{Path, PathBuf};
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
    #[error("cannot read the nats {what} {path}: {reason}")]
    Credential {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// The NATS credential and CA settings of a service or agent, flattened into its
/// configuration.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NatsCredentialArgs {
    /// File whose first line is this process's NATS nkey seed (`SU…`, from `hodei-admin nats`);
    /// anonymous when unset.
    #[arg(long, env = "HODEI_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the NATS server's certificate: the connection is then
    /// TLS and must present a certificate that CA signed.
    #[arg(long, env = "HODEI_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
}

impl NatsCredentialArgs {
    /// The credential these settings name, read from its files.
    pub fn load(&self) -> Result<NatsAuth, MessagingError> {
        NatsAuth::load(self.nats_nkey_file.as_deref(), self.nats_ca.as_deref())
    }
}

/// How a process proves who it is to NATS and checks the server: an nkey seed (`SU…`) and
/// the CA that signed the server's TLS certificate. Empty: anonymous, plain text (a server
/// without authorization).
#[derive(Clone, Default)]
pub struct NatsAuth {
    nkey_seed: Option<String>,
    ca: Option<PathBuf>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "<secret>"))
            .field("ca", &self.ca)
            .finish()
    }
}

impl NatsAuth {
    /// Reads the seed from `nkey_file` (first line; the file should be mode 0600); with `ca`,
    /// the connection must be TLS with a server certificate that CA signed.
    pub fn load(nkey_file: Option<&Path>, ca: Option<&Path>) -> Result<NatsAuth, MessagingError> {
        let nkey_seed = match nkey_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| MessagingError::Credential {
                        what: "nkey file",
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                let seed = text.lines().next().unwrap_or_default().trim().to_owned();
                if !seed.starts_with("SU") {
                    return Err(MessagingError::Credential {
                        what: "nkey file",
                        path: path.to_owned(),
                        reason: "the first line is not a user nkey seed (SU…)".to_owned(),
                    });
                }
                Some(seed)
            }
            None => None,
        };
        if let Some(ca) = ca
            && !ca.is_file()
        {
            return Err(MessagingError::Credential {
                what: "CA file",
                path: ca.to_owned(),
                reason: "not a file".to_owned(),
            });
        }
        Ok(NatsAuth {
            nkey_seed,
            ca: ca.map(Path::to_owned),
        })
    }

    /// An nkey seed held in memory (tests, tools), with an optional CA file.
    pub fn with_seed(seed: impl Into<String>, ca: Option<PathBuf>) -> NatsAuth {
        NatsAuth {
            nkey_seed: Some(seed.into()),
            ca,
        }
    }

    fn apply(&self, mut options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &self.ca {
            options = options.require_tls(true).add_root_certificates(ca.clone());
        }
        options
    }
}

/// Connects anonymously to `url` as `name`; see [`connect_with`].
pub async fn connect(
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<(async_nats::Client, jetstream::Context), MessagingError> {
    connect_with(url, name, timeout, &NatsAuth::default()).await
}

/// Connects to `url` as `name` with `auth`, retrying the first connection for up to `timeout`
/// and reconnecting forever afterwards. Replies arrive under the inbox prefix of `name`
/// ([`crate::permissions::inbox_prefix`]), the only one its credential may subscribe to.
/// Fails if the server is older than 2.10.
pub async fn connect_with(
    url: &str,
    name: &str,
    timeout: Duration,
    auth: &NatsAuth,
) -> Result<(async_nats::Client, jetstream::Context), MessagingError> {
    let err = |reason: String| MessagingError::Connect {
        url: url.to_owned(),
        reason,
    };
    let options = auth.apply(
        async_nats::ConnectOptions::new()
            .name(name)
            .custom_inbox_prefix(crate::permissions::inbox_prefix(name))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2)),
    );
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
