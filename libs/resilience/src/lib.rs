//! Resilience for calls to outside dependencies (PostgreSQL, NATS request/reply): one
//! [`CircuitBreaker`] per dependency, shared by clones, and a [`RetryPolicy`] (capped
//! exponential backoff with full jitter) for the loops that retry them.
//!
//! ```no_run
//! use std::io;
//!
//! use hodei_resilience::{BreakerConfig, BreakerError, CircuitBreaker, RetryPolicy, random_unit};
//!
//! /// Connection trouble is a fault of the dependency; any other answer is final.
//! fn is_fault(e: &io::Error) -> bool {
//!     matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset)
//! }
//!
//! async fn load(postgres: &CircuitBreaker) -> Result<u64, BreakerError<io::Error>> {
//!     let policy = RetryPolicy::default();
//!     let mut attempt = 1;
//!     loop {
//!         let answer = postgres
//!             .call_with_timeout(policy.attempt_timeout, is_fault, || async {
//!                 Ok::<_, io::Error>(42)
//!             })
//!             .await;
//!         match answer {
//!             Err(BreakerError::Inner(e)) if is_fault(&e) && attempt < policy.max_attempts => {
//!                 tokio::time::sleep(policy.delay(attempt, random_unit())).await;
//!                 attempt += 1;
//!             }
//!             answer => return answer,
//!         }
//!     }
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
pub use retry::{RetryPolicy, random_unit};
