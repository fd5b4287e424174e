//! The error every guarded call returns: the breaker refused it, it timed out, or the
//! operation itself failed.

use std::time::Duration;

/// Why a call made through a [`CircuitBreaker`](crate::CircuitBreaker) did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker refused the call without running it: the circuit is open, or it is
    /// half-open and every probe slot is taken.
    #[error("{name} is unavailable (circuit open), retry in {retry_in:?}")]
    Open {
        /// Name of the breaker (the dependency).
        name: &'static str,
        /// How long until the breaker admits calls again; zero when a half-open probe is
        /// in flight and the answer depends on its outcome.
        retry_in: Duration,
    },
    /// The operation ran and failed with its own error.
    #[error(transparent)]
    Inner(E),
    /// The operation did not finish within its time limit; it was dropped.
    #[error("{name} did not answer within {after:?}")]
    Timeout {
        /// Name of the breaker (the dependency).
        name: &'static str,
        /// The time limit that elapsed.
        after: Duration,
    },
}

impl<E> BreakerError<E> {
    /// True when the breaker refused the call without running it.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open { .. })
    }

    /// True when the call exceeded its time limit.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// The operation's own error, if that is what happened.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(e) => Some(e),
            Self::Open { .. } | Self::Timeout { .. } => None,
        }
    }

    /// Converts the operation's error, keeping `Open` and `Timeout` as they are.
    pub fn map_inner<F>(self, f: impl FnOnce(E) -> F) -> BreakerError<F> {
        match self {
            Self::Inner(e) => BreakerError::Inner(f(e)),
            Self::Open { name, retry_in } => BreakerError::Open { name, retry_in },
            Self::Timeout { name, after } => BreakerError::Timeout { name, after },
        }
    }
}
