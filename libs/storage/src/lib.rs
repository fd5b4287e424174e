//! PostgreSQL persistence: the job and pipeline run event stores and their projections,
//! workers, and the transactional outbox. PostgreSQL is the state of record; NATS only carries
//! what was committed here (the relay that publishes the outbox is in `hodei-runtime`).
//!
//! `jobs`, `pipelines`, `schedules`, `workers` and `outbox` are data access, each over its own tables and
//! knowing nothing of the others; [`driver`] holds the units of work that change several of
//! them in one transaction (and drives pipeline runs from their step jobs).

pub mod access;
pub mod archive;
pub mod driver;
pub mod error;
mod event_store;
pub mod jobs;
pub mod outbox;
pub mod pipelines;
pub mod schedules;
mod sql;
pub mod tenants;
pub mod workers;

use std::time::Duration;

pub use archive::Tier;
pub use error::StorageError;
pub use event_store::EventRange;
pub use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Connects a pool to `url`, retrying for up to `timeout` while the server is starting.
pub async fn connect(
    url: &str,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, StorageError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, "postgres not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(StorageError::Database(e)),
        }
    }
}

/// The migrations in `migrations/`, built in.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Applies the migrations in `migrations/`. sqlx takes a PostgreSQL advisory lock, so services
/// starting together apply them once.
pub async fn migrate(pool: &PgPool) -> Result<(), StorageError> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StorageError::Migrate(e.to_string()))
}

/// Whether PostgreSQL answers: the cheapest statement there is.
pub async fn ping(pool: &PgPool) -> Result<(), StorageError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// How many migrations the database has applied, and how many are built in.
pub async fn migrations_applied(pool: &PgPool) -> Result<(usize, usize), StorageError> {
    let expected = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await?;
    Ok((usize::try_from(applied).unwrap_or(0), expected))
}
