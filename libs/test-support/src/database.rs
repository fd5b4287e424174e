//! A fresh, empty PostgreSQL database per test, created on the server named
//! by `HODEI_TEST_DATABASE_URL`.

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};

use crate::TestSupportError;

/// Environment variable holding the admin URL of the test server.
const ADMIN_URL_ENV: &str = "HODEI_TEST_DATABASE_URL";
/// Admin URL used when `HODEI_TEST_DATABASE_URL` is not set.
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long connecting (admin connection or pool acquire) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in the pool returned by [`TestDatabase::connect`].
const POOL_SIZE: u32 = 5;

/// A fresh, empty PostgreSQL database with a unique name (`hodei_test_<uuid>`),
/// dropped (`WITH (FORCE)`) by [`TestDatabase::cleanup`].
///
/// It is created through the admin URL in the environment variable
/// `HODEI_TEST_DATABASE_URL` (default
/// `postgres://postgres@127.0.0.1:5432/postgres`). Dropping a `TestDatabase`
/// without calling `cleanup` leaves the database behind.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates the database. Safe to call from many tests at once: names are
    /// unique and the database is copied from `template0`, which no session
    /// can be connected to.
    pub async fn create() -> Result<TestDatabase, TestSupportError> {
        let admin_url = std::env::var(ADMIN_URL_ENV)
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned());
        let name = format!("hodei_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_database(&admin_url, &name)?;
        let mut admin = admin_connect(&admin_url).await?;
        // `name` is made of [a-z0-9_] only, so it is safe to splice in.
        let created = sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0"
        )))
        .execute(&mut admin)
        .await
        .map_err(TestSupportError::db(format!("creating database {name}")));
        close(admin).await;
        created?;
        tracing::debug!(database = %name, "test database created");
        Ok(TestDatabase {
            admin_url,
            name,
            url,
        })
    }

    /// The URL of the new database.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The name of the new database.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a small pool (at most 5 connections) to the new database.
    pub async fn connect(&self) -> Result<PgPool, TestSupportError> {
        PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect(&self.url)
            .await
            .map_err(TestSupportError::db(format!(
                "connecting to test database {}",
                self.name
            )))
    }

    /// Takes the database away (no new connections, every session terminated), or gives it
    /// back: a PostgreSQL outage as the services see it, without touching other tests'
    /// databases on the same server.
    pub async fn set_available(&self, available: bool) -> Result<(), TestSupportError> {
        let mut admin = admin_connect(&self.admin_url).await?;
        let name = &self.name;
        let result = async {
            // `name` is made of [a-z0-9_] only, so it is safe to splice in.
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {available}"
            )))
            .execute(&mut admin)
            .await?;
            if !available {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(name)
                .execute(&mut admin)
                .await?;
            }
            Ok::<(), sqlx::Error>(())
        }
        .await
        .map_err(TestSupportError::db(format!(
            "setting database {name} available={available}"
        )));
        close(admin).await;
        result
    }

    /// Drops the database, closing any sessions still connected to it.
    pub async fn cleanup(self) -> Result<(), TestSupportError> {
        let mut admin = admin_connect(&self.admin_url).await?;
        let name = &self.name;
        let dropped = sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .map_err(TestSupportError::db(format!("dropping database {name}")));
        close(admin).await;
        dropped?;
        Ok(())
    }
}

/// Opens one connection with the admin URL, within [`CONNECT_TIMEOUT`].
async fn admin_connect(admin_url: &str) -> Result<PgConnection, TestSupportError> {
    let connecting = PgConnection::connect(admin_url);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connection) => connection.map_err(TestSupportError::db(format!(
            "connecting to the test postgresql server ({ADMIN_URL_ENV}); run the tests \
             through scripts/test.sh, which starts one"
        ))),
        Err(_) => Err(TestSupportError::Timeout {
            what: format!("a connection to the test postgresql server ({ADMIN_URL_ENV})"),
        }),
    }
}

/// Closes an admin connection; a failure only matters to the server's logs.
async fn close(connection: PgConnection) {
    if let Err(err) = connection.close().await {
        tracing::debug!(error = %err, "closing the admin connection failed");
    }
}

/// Replaces the database (path) of a `postgres://` URL, keeping its query.
fn with_database(url: &str, database: &str) -> Result<String, TestSupportError> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start =
        base.find("://")
            .map(|i| i + 3)
            .ok_or_else(|| TestSupportError::InvalidUrl {
                url: url.to_owned(),
                reason: "no scheme (expected postgres://...)".to_owned(),
            })?;
    let path_start = base
        .get(authority_start..)
        .and_then(|rest| rest.find('/'))
        .map_or(base.len(), |i| authority_start + i);
    let prefix = base.get(..path_start).unwrap_or(base);
    let mut out = format!("{prefix}/{database}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn replaces_the_database_in_urls() -> TestResult {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x")?,
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@localhost:1/db?sslmode=disable", "x")?,
            "postgres://u:p@localhost:1/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://localhost", "x")?,
            "postgresql://localhost/x"
        );
        assert_eq!(
            with_database("postgres://localhost?sslmode=disable", "x")?,
            "postgres://localhost/x?sslmode=disable"
        );
        assert!(with_database("localhost:5432/db", "x").is_err());
        Ok(())
    }

    async fn database_exists(admin_url: &str, name: &str) -> Result<bool, sqlx::Error> {
        let mut admin = PgConnection::connect(admin_url).await?;
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut admin)
            .await?;
        admin.close().await?;
        Ok(found.is_some())
    }

    #[tokio::test]
    async fn creates_queries_and_drops_a_database() -> TestResult {
        let db = TestDatabase::create().await?;
        assert!(db.name().starts_with("hodei_test_"));
        assert!(db.url().ends_with(db.name()), "{}", db.url());
        let admin_url = db.admin_url.clone();
        let name = db.name().to_owned();

        let pool = db.connect().await?;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
        assert_eq!(one, 1);
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await?;
        assert_eq!(current, name);
        assert!(database_exists(&admin_url, &name).await?);

        // The pool is still open: cleanup must force its sessions out.
        db.cleanup().await?;
        assert!(!database_exists(&admin_url, &name).await?);
        pool.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn creates_many_databases_concurrently() -> TestResult {
        let created = futures::future::join_all((0..6).map(|_| TestDatabase::create())).await;
        let mut dbs = Vec::new();
        for db in created {
            dbs.push(db?);
        }
        let mut names: Vec<_> = dbs.iter().map(|db| db.name().to_owned()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), dbs.len());
        let cleaned = futures::future::join_all(dbs.into_iter().map(TestDatabase::cleanup)).await;
        for result in cleaned {
            result?;
        }
        Ok(())
    }
}
