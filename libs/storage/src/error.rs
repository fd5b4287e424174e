//! Storage errors, with PostgreSQL failures sorted into what callers act on.

/// What can go wrong reading or writing the state of record.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The aggregate refused the change (an illegal transition).
    #[error(transparent)]
    Refused(#[from] hodei_domain::DomainError),
    #[error("failed to apply migrations: {0}")]
    Migrate(String),
    /// Somebody else changed the row first (optimistic concurrency): reload and retry.
    #[error("concurrent update of {what}")]
    Conflict { what: String },
    /// A stored row that does not decode: names the table, the row and the column.
    #[error("corrupt row in {table} (id {id}): column {column}: {reason}")]
    Corrupt {
        table: &'static str,
        id: String,
        column: &'static str,
        reason: String,
    },
    #[error("failed to encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    /// PostgreSQL is not answering (circuit open or call timed out): try again later.
    #[error("database unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_in: std::time::Duration,
    },
}

impl StorageError {
    /// Whether the error means PostgreSQL could not be reached or did not answer (what the
    /// circuit breaker counts), as opposed to an answer we did not like.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StorageError::Unavailable { .. } => true,
            StorageError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            StorageError::Database(sqlx::Error::Database(db)) => {
                db.code().as_deref().is_some_and(is_unavailable_sqlstate)
            }
            _ => false,
        }
    }

    /// Whether the error is a unique or serialization violation worth retrying as a conflict.
    pub fn is_conflict(&self) -> bool {
        match self {
            StorageError::Conflict { .. } => true,
            StorageError::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01"))
            }
            _ => false,
        }
    }
}

/// SQLSTATEs that mean the server (or the database) is not taking work right now rather than
/// refusing this statement: connection exceptions (class 08), administrator or crash shutdown
/// and start-up (57P01-57P03), too many connections (53300), a database that does not
/// accept connections (55000, as when `ALLOW_CONNECTIONS false` is set), and a server that
/// takes no writes (25006: a standby during a failover, a database set read-only).
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "55000" | "25006"
        )
}

pub(crate) fn encode<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<serde_json::Value, StorageError> {
    serde_json::to_value(value).map_err(|e| StorageError::Encode {
        what,
        reason: e.to_string(),
    })
}

/// Reads and decodes one column, naming it in the error.
pub(crate) struct RowReader<'r> {
    pub table: &'static str,
    pub id: String,
    pub row: &'r sqlx::postgres::PgRow,
}

impl<'r> RowReader<'r> {
    /// A reader of `row` of `table`, and the row's `id`, which names the row in errors.
    pub fn with_id<K>(
        table: &'static str,
        row: &'r sqlx::postgres::PgRow,
    ) -> Result<(K, Self), StorageError>
    where
        K: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + ToString,
    {
        let id: K = sqlx::Row::try_get(row, "id").map_err(|e| StorageError::Corrupt {
            table,
            id: "?".to_owned(),
            column: "id",
            reason: e.to_string(),
        })?;
        let reader = RowReader {
            table,
            id: id.to_string(),
            row,
        };
        Ok((id, reader))
    }

    pub fn get<T>(&self, column: &'static str) -> Result<T, StorageError>
    where
        T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        use sqlx::Row;
        self.row
            .try_get(column)
            .map_err(|e| self.corrupt(column, e.to_string()))
    }

    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        column: &'static str,
    ) -> Result<T, StorageError> {
        // Straight from the column's bytes to `T`, without a `serde_json::Value` in between.
        self.get::<sqlx::types::Json<T>>(column).map(|json| json.0)
    }

    pub fn parse<T: std::str::FromStr>(&self, column: &'static str) -> Result<T, StorageError>
    where
        T::Err: std::fmt::Display,
    {
        let s: String = self.get(column)?;
        s.parse()
            .map_err(|e: T::Err| self.corrupt(column, e.to_string()))
    }

    pub fn unsigned(&self, column: &'static str) -> Result<u64, StorageError> {
        let v: i64 = self.get(column)?;
        u64::try_from(v).map_err(|_| self.corrupt(column, format!("negative value {v}")))
    }

    pub fn corrupt(&self, column: &'static str, reason: String) -> StorageError {
        StorageError::Corrupt {
            table: self.table,
            id: self.id.clone(),
            column,
            reason,
        }
    }
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl From<serde_json::Error> for StorageError {
    fn from(e: serde_json::Error) -> Self {
        StorageError::Encode {
            what: "json message",
            reason: e.to_string(),
        }
    }
}
