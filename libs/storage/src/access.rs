//! API tokens (stored by their secret's hash) and the audit log.

use chrono::{DateTime, Utc};
use hodei_domain::{Role, TenantId, TokenId};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder};

use crate::error::{RowReader, StorageError};
use crate::sql::Unnest;

const TOKEN_COLUMNS: &str =
    "id, name, tenant, role, created_by, created_at, expires_at, revoked_at";

/// A token as stored, without its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: TokenId,
    pub name: String,
    pub tenant: TenantId,
    pub role: Role,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenRecord {
    /// A new token of `tenant` with `role`, made by `created_by` at `created_at`, not
    /// revoked.
    pub fn new(
        name: &str,
        tenant: TenantId,
        role: Role,
        created_by: &str,
        created_at: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> TokenRecord {
        TokenRecord {
            id: TokenId::new(),
            name: name.to_owned(),
            tenant,
            role,
            created_by: created_by.to_owned(),
            created_at,
            expires_at,
            revoked_at: None,
        }
    }

    /// Whether the token still opens the API at `now`: not revoked, not expired.
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }
}

/// Stores a new token under the hash of its secret.
pub async fn insert_token(
    conn: impl sqlx::PgExecutor<'_>,
    token: &TokenRecord,
    secret_hash: &[u8],
) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO api_tokens (id, name, tenant, role, secret_hash, created_by, created_at,
                                 expires_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(token.id.as_uuid())
    .bind(&token.name)
    .bind(token.tenant.as_str())
    .bind(token.role.as_str())
    .bind(secret_hash)
    .bind(&token.created_by)
    .bind(token.created_at)
    .bind(token.expires_at)
    .bind(token.revoked_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The token whose secret hashes to `secret_hash`, if any (valid or not).
pub async fn token_by_hash(
    conn: impl sqlx::PgExecutor<'_>,
    secret_hash: &[u8],
) -> Result<Option<TokenRecord>, StorageError> {
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_hash = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(secret_hash)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode_token).transpose()
}

/// Tokens of `tenant` (every tenant's when none), newest first.
pub async fn list_tokens(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: Option<&TenantId>,
) -> Result<Vec<TokenRecord>, StorageError> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE ($1::text IS NULL OR tenant = $1)
         ORDER BY id DESC"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant.map(TenantId::as_str))
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode_token).collect()
}

/// Revokes token `id` at `at` (a token revoked before keeps its first revocation time); the
/// token as it now stands, or none when there is no such token.
pub async fn revoke_token(
    conn: impl sqlx::PgExecutor<'_>,
    id: TokenId,
    at: DateTime<Utc>,
) -> Result<Option<TokenRecord>, StorageError> {
    let sql = format!(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1
         RETURNING {TOKEN_COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .bind(at)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode_token).transpose()
}

fn decode_token(row: &PgRow) -> Result<TokenRecord, StorageError> {
    let (id, r) = RowReader::with_id::<uuid::Uuid>("api_tokens", row)?;
    Ok(TokenRecord {
        id: TokenId::from_uuid(id),
        name: r.get("name")?,
        tenant: r.parse("tenant")?,
        role: r.parse("role")?,
        created_by: r.get("created_by")?,
        created_at: r.get("created_at")?,
        expires_at: r.get("expires_at")?,
        revoked_at: r.get("revoked_at")?,
    })
}

/// One audited call: who (a token id or a JWT's issuer and subject) with which role, for
/// which tenant, did what to what, and how it ended (`ok` or a gRPC code name).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub subject: String,
    pub tenant: TenantId,
    pub role: Role,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

/// Appends entries to the audit log, in one statement.
pub async fn record_audit(
    conn: impl sqlx::PgExecutor<'_>,
    entries: &[AuditEntry],
) -> Result<(), StorageError> {
    let entries: Vec<&AuditEntry> = entries.iter().collect();
    let mut query = QueryBuilder::new("");
    push_audit(&mut query, &entries, None);
    query.build().execute(conn).await?;
    Ok(())
}

/// Writes into `query` the `INSERT` that appends `entries` to the audit log, for a statement
/// that also does other writes (as one of its `WITH` clauses). With `only`, each entry's job
/// and the name of an earlier `WITH` clause that returns an `id` column: only the entries of
/// the jobs it returned are appended.
pub(crate) fn push_audit(
    query: &mut QueryBuilder<Postgres>,
    entries: &[&AuditEntry],
    only: Option<(&[uuid::Uuid], &str)>,
) {
    let column = |f: fn(&AuditEntry) -> &str| entries.iter().map(|e| f(e)).collect::<Vec<_>>();
    let at: Vec<DateTime<Utc>> = entries.iter().map(|e| e.at).collect();
    let tenants: Vec<&str> = entries.iter().map(|e| e.tenant.as_str()).collect();
    let roles: Vec<String> = entries.iter().map(|e| e.role.to_string()).collect();
    query.push(
        "INSERT INTO audit_log (at, subject, tenant, role, action, target, outcome, detail)
         SELECT a.at, a.subject, a.tenant, a.role, a.action, a.target, a.outcome, a.detail
         FROM ",
    );
    Unnest::new(query)
        .column(at, "timestamptz")
        .column(column(|e| e.subject.as_str()), "text")
        .column(tenants, "text")
        .column(roles, "text")
        .column(column(|e| e.action.as_str()), "text")
        .column(column(|e| e.target.as_str()), "text")
        .column(column(|e| e.outcome.as_str()), "text")
        .column(column(|e| e.detail.as_str()), "text")
        .alias_of_jobs(
            "a",
            "at, subject, tenant, role, action, target, outcome, detail",
            only,
        );
}

/// An entry of the audit log with its position (newer entries have larger ids).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub id: u64,
    pub entry: AuditEntry,
}

/// Audit entries of `tenant` (every tenant's when none), newest first, older than entry
/// `before` when given.
pub async fn audit_log(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: Option<&TenantId>,
    before: Option<u64>,
    limit: u32,
) -> Result<Vec<AuditRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT id, at, subject, tenant, role, action, target, outcome, detail FROM audit_log
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(tenant.map(TenantId::as_str))
    .bind(before.map(|b| i64::try_from(b).unwrap_or(i64::MAX)))
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            let (_, r) = RowReader::with_id::<i64>("audit_log", row)?;
            Ok(AuditRecord {
                id: r.unsigned("id")?,
                entry: AuditEntry {
                    at: r.get("at")?,
                    subject: r.get("subject")?,
                    tenant: r.parse("tenant")?,
                    role: r.parse("role")?,
                    action: r.get("action")?,
                    target: r.get("target")?,
                    outcome: r.get("outcome")?,
                    detail: r.get("detail")?,
                },
            })
        })
        .collect()
}
