//! The error type of the test helpers.

use std::path::PathBuf;

/// Everything that can go wrong while setting up test infrastructure.
#[derive(Debug, thiserror::Error)]
pub enum TestSupportError {
    /// No nats-server binary was found.
    #[error(
        "nats-server not found ({detail}); run the tests through scripts/test.sh, which installs \
         nats-server 2.10+ and sets HODEI_NATS_SERVER"
    )]
    NatsNotFound {
        /// Where it was looked for.
        detail: String,
    },

    /// The nats-server binary found is older than 2.10.
    #[error(
        "nats-server at {} is version {found}, but 2.10 or newer is required; run the tests \
         through scripts/test.sh, which installs a current one and sets HODEI_NATS_SERVER",
        path.display()
    )]
    NatsTooOld {
        /// The binary that was found.
        path: PathBuf,
        /// The version it reported.
        found: String,
    },

    /// `nats-server --version` failed or printed no version.
    #[error("could not read the version of nats-server at {}: {output}", path.display())]
    NatsVersion {
        /// The binary that was run.
        path: PathBuf,
        /// What it printed (or why it could not run).
        output: String,
    },

    /// The nats-server process exited before it was ready.
    #[error("nats-server on port {port} exited before it was ready ({status}); its log: {log}")]
    NatsExited {
        /// The port it was asked to listen on.
        port: u16,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },

    /// An HTTP request to a service's metrics and health server failed.
    #[error("nats-server: {0}")]
    NatsMisuse(String),
    #[error("http GET {url} failed: {reason}")]
    Http {
        /// The URL requested.
        url: String,
        /// What went wrong.
        reason: String,
    },

    /// A condition did not become true before its deadline.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
    },

    /// An i/o operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A database operation failed.
    #[error("{context}: {source}")]
    Database {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },

    /// A database URL could not be understood.
    #[error("invalid database url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl TestSupportError {
    /// Builds a closure that wraps an i/o error with `context`.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// Builds a closure that wraps a database error with `context`.
    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let context = context.into();
        move |source| Self::Database { context, source }
    }
}
