//! Test helpers shared by the Hodei crates: a private NATS server with
//! JetStream ([`TestNats`]), a fresh PostgreSQL database per test
//! ([`TestDatabase`]), condition polling ([`wait_for`]), [`free_port`] and a
//! plain HTTP GET ([`http_get`]) for the services' `/metrics` and probes, and a
//! [`TcpProxy`] that cuts one process off a server.
//!
//! The helpers find their servers through the environment that
//! `scripts/test.sh` sets up (see `scripts/lib/deps.sh`):
//!
//! - `HODEI_NATS_SERVER`: path of a nats-server 2.10 or newer (else
//!   `nats-server` on `PATH`, which must also be 2.10 or newer);
//! - `HODEI_TEST_DATABASE_URL`: admin URL of a PostgreSQL server on which
//!   test databases may be created (default
//!   `postgres://postgres@127.0.0.1:5432/postgres`).
//!
//! ```no_run
//! use std::time::Duration;
//! use hodei_test_support::{TestDatabase, TestNats, TestSupportError, wait_for};
//!
//! # async fn example() -> Result<(), TestSupportError> {
//! let nats = TestNats::start().await?;
//! let db = TestDatabase::create().await?;
//! let pool = db.connect().await?;
//! // ... start the code under test against nats.url() and pool ...
//! let ready = wait_for("the thing to be ready", Duration::from_secs(5), || async {
//!     Some(42)
//! })
//! .await?;
//! assert_eq!(ready, 42);
//! pool.close().await;
//! db.cleanup().await?;
//! drop(nats);
//! # Ok(())
//! # }
//! ```

mod database;
mod error;
mod http;
mod nats;
mod proxy;
mod wait;

pub use database::TestDatabase;
pub use error::TestSupportError;
pub use http::{HttpResponse, http_get, http_request, metric_sample};
pub use nats::{NatsSecurity, TestNats};
pub use proxy::TcpProxy;
pub use wait::{free_port, wait_for};
