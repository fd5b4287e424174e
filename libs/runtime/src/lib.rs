//! The process wiring of a Hodei service with state, shared by the gateway, the scheduler and
//! the registry so they start the same way: NATS (streams ensured) and PostgreSQL (migrations
//! applied) connected, every PostgreSQL call through one circuit breaker, the outbox relay
//! that joins them, and the `/metrics`, `/healthz`, `/readyz` server with its probes.

pub mod backends;
pub mod continuity;
mod probes;
pub mod relay;

pub use backends::{BackendConfig, BackendError, Backends, CONFLICT_ATTEMPTS, DB_CALL_TIMEOUT};
pub use continuity::{NatsBreak, NatsContinuity};
