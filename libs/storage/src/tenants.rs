//! Tenants' policies (`tenant_policies`: weight and quotas) and what their jobs hold and queue,
//! read from `jobs`. Data access only: what a quota or a share decides is the domain's
//! (`hodei_domain::tenancy`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hodei_domain::{TenantId, TenantPolicy, Usage};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder};

use crate::error::{RowReader, StorageError, to_i64};

const COLUMNS: &str = "tenant AS id, weight, max_queued_jobs, max_running_jobs, max_cpu_millis, max_memory_mb, max_priority, updated_at";

fn limit(r: &RowReader<'_>, column: &'static str) -> Result<Option<u64>, StorageError> {
    let v: Option<i64> = r.get(column)?;
    v.map(|v| u64::try_from(v).map_err(|_| r.corrupt(column, format!("negative value {v}"))))
        .transpose()
}

fn decode(row: &PgRow) -> Result<(TenantId, TenantPolicy, DateTime<Utc>), StorageError> {
    let (tenant, r) = RowReader::with_id::<String>("tenant_policies", row)?;
    let tenant = tenant
        .parse()
        .map_err(|e: hodei_domain::IdError| r.corrupt("tenant", e.to_string()))?;
    let weight: i32 = r.get("weight")?;
    let policy = TenantPolicy {
        weight: u32::try_from(weight)
            .map_err(|_| r.corrupt("weight", format!("negative value {weight}")))?,
        max_queued_jobs: limit(&r, "max_queued_jobs")?,
        max_running_jobs: limit(&r, "max_running_jobs")?,
        max_cpu_millis: limit(&r, "max_cpu_millis")?,
        max_memory_mb: limit(&r, "max_memory_mb")?,
        max_priority: r.get("max_priority")?,
    };
    Ok((tenant, policy, r.get("updated_at")?))
}

/// Sets `tenant`'s policy, replacing any.
pub async fn set_policy(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: &TenantId,
    policy: &TenantPolicy,
    now: DateTime<Utc>,
) -> Result<(), StorageError> {
    let bind = |v: Option<u64>| v.map(to_i64);
    sqlx::query(
        "INSERT INTO tenant_policies (tenant, weight, max_queued_jobs, max_running_jobs,
                                      max_cpu_millis, max_memory_mb, max_priority, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant) DO UPDATE SET weight = $2, max_queued_jobs = $3,
             max_running_jobs = $4, max_cpu_millis = $5, max_memory_mb = $6, max_priority = $7,
             updated_at = $8",
    )
    .bind(tenant.as_str())
    .bind(i32::try_from(policy.weight).unwrap_or(i32::MAX))
    .bind(bind(policy.max_queued_jobs))
    .bind(bind(policy.max_running_jobs))
    .bind(bind(policy.max_cpu_millis))
    .bind(bind(policy.max_memory_mb))
    .bind(policy.max_priority)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes `tenant`'s policy (back to weight 1, no quota). False if it had none.
pub async fn delete_policy(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: &TenantId,
) -> Result<bool, StorageError> {
    let done = sqlx::query("DELETE FROM tenant_policies WHERE tenant = $1")
        .bind(tenant.as_str())
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Every policy set, with when it was set.
pub async fn list_policies(
    conn: impl sqlx::PgExecutor<'_>,
) -> Result<Vec<(TenantId, TenantPolicy, DateTime<Utc>)>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM tenant_policies ORDER BY tenant");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode).collect()
}

/// Every policy set.
pub async fn policies(
    conn: impl sqlx::PgExecutor<'_>,
) -> Result<HashMap<TenantId, TenantPolicy>, StorageError> {
    Ok(list_policies(conn)
        .await?
        .into_iter()
        .map(|(t, p, _)| (t, p))
        .collect())
}

/// Which quotas a transaction checks: only the policies that set one are locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// `max_queued_jobs` (submissions).
    Queued,
    /// `max_running_jobs`, `max_cpu_millis`, `max_memory_mb` (placements).
    Running,
}

impl Limits {
    /// The condition on `tenant_policies` of a policy that sets such a quota.
    fn set(self) -> &'static str {
        match self {
            Limits::Queued => "max_queued_jobs IS NOT NULL",
            Limits::Running => {
                "(max_running_jobs IS NOT NULL OR max_cpu_millis IS NOT NULL OR max_memory_mb IS NOT NULL)"
            }
        }
    }
}

/// Writes into `query` a `SELECT` of the tenants among `tenants` whose policy sets a quota of
/// `limits` (at most one row): for a statement that writes only when there is none (as one of
/// its `WITH` clauses). It takes no lock: a statement that finds none writes in its own
/// transaction, and one that finds some writes nothing (see [`lock_policies`] for the check
/// that counts against a quota).
pub(crate) fn push_quotas_set(
    query: &mut QueryBuilder<Postgres>,
    tenants: &[&str],
    limits: Limits,
) {
    let mut names = tenants.to_vec();
    names.sort_unstable();
    names.dedup();
    query.push("SELECT tenant FROM tenant_policies WHERE tenant = ANY(");
    query.push_bind(names);
    query.push(format_args!("::text[]) AND {} LIMIT 1", limits.set()));
}

/// The policies of `tenants` that set a quota of `limits`, locked until the caller's
/// transaction ends: what a check of a quota against the counts read next relies on, with
/// concurrent writers. Tenants without such a quota take no lock.
pub async fn lock_policies(
    conn: &mut PgConnection,
    tenants: &[&TenantId],
    limits: Limits,
) -> Result<HashMap<TenantId, TenantPolicy>, StorageError> {
    if tenants.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<&str> = tenants.iter().map(|t| t.as_str()).collect();
    // In one order, so two transactions locking overlapping sets cannot deadlock.
    let sql = format!(
        "SELECT {COLUMNS} FROM tenant_policies WHERE tenant = ANY($1) AND {}
         ORDER BY tenant FOR UPDATE",
        limits.set()
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&names)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| decode(row).map(|(t, p, _)| (t, p)))
        .collect()
}

/// What each tenant's jobs on workers (assigned or running) hold; only `tenants` when given.
pub async fn usage(
    conn: impl sqlx::PgExecutor<'_>,
    tenants: Option<&[&TenantId]>,
) -> Result<HashMap<TenantId, Usage>, StorageError> {
    let names: Option<Vec<&str>> = tenants.map(|ts| ts.iter().map(|t| t.as_str()).collect());
    let rows: Vec<(String, i64, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT tenant, count(*),
                sum((spec->'resources'->>'cpu_millis')::bigint)::bigint,
                sum((spec->'resources'->>'memory_mb')::bigint)::bigint
         FROM jobs
         WHERE state IN ('assigned', 'running') AND ($1::text[] IS NULL OR tenant = ANY($1))
         GROUP BY tenant",
    )
    .bind(names)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(tenant, jobs, cpu, memory)| {
            let tenant =
                tenant
                    .parse()
                    .map_err(|e: hodei_domain::IdError| StorageError::Corrupt {
                        table: "jobs",
                        id: tenant.clone(),
                        column: "tenant",
                        reason: e.to_string(),
                    })?;
            let unsigned = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
            Ok((
                tenant,
                Usage {
                    running_jobs: unsigned(Some(jobs)),
                    cpu_millis: unsigned(cpu),
                    memory_mb: unsigned(memory),
                },
            ))
        })
        .collect()
}

/// How many jobs each tenant has queued, leaving out `except`; only `tenants` when given.
pub async fn queued(
    conn: impl sqlx::PgExecutor<'_>,
    tenants: Option<&[&TenantId]>,
    except: &[hodei_domain::JobId],
) -> Result<HashMap<TenantId, u64>, StorageError> {
    let names: Option<Vec<&str>> = tenants.map(|ts| ts.iter().map(|t| t.as_str()).collect());
    let except: Vec<uuid::Uuid> = except.iter().map(hodei_domain::JobId::as_uuid).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tenant, count(*) FROM jobs
         WHERE state = 'queued' AND ($1::text[] IS NULL OR tenant = ANY($1))
           AND NOT (id = ANY($2))
         GROUP BY tenant",
    )
    .bind(names)
    .bind(&except)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(tenant, n)| Ok((job_tenant(tenant)?, u64::try_from(n).unwrap_or(0))))
        .collect()
}

/// A tenant as `jobs.tenant` holds it.
fn job_tenant(name: String) -> Result<TenantId, StorageError> {
    name.parse()
        .map_err(|e: hodei_domain::IdError| StorageError::Corrupt {
            table: "jobs",
            id: name.clone(),
            column: "tenant",
            reason: e.to_string(),
        })
}
