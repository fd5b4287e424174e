//! Resilience for calls to outside dependencies (PostgreSQL, NATS request/reply): one
//! [`CircuitBreaker`] per dependency, shared by clones, and [`retry`] with capped
//! exponential backoff, full jitter and a per-attempt timeout on top of it.
//!
//! ```no_run
//! use std::io;
//!
//! use hodei_resilience::{BreakerConfig, BreakerError, CircuitBreaker, RetryPolicy, retry};
//!
//! /// Connection trouble is transient; any other answer is final.
//! fn is_transient(e: &io::Error) -> bool {
//!     matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset)
//! }
//!
//! async fn load(postgres: &CircuitBreaker) -> Result<u64, BreakerError<io::Error>> {
//!     retry(postgres, &RetryPolicy::default(), is_transient, || async {
//!         Ok::<_, io::Error>(42)
//!     })
//!     .await
//! }
//!
//! // One breaker per dependency, cloned into every caller.
//! let postgres = CircuitBreaker::new("postgres", BreakerConfig::default());
//! # let _ = load(&postgres);
//! ```

mod breaker;
mod error;
mod retry;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use error::BreakerError;
pub use retry::{RetryPolicy, random_unit, retry};
