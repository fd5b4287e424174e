//! Pipeline runs: the event store (`pipeline_events`, unique `(run_id, seq)`) and the
//! `pipeline_runs` projection. Data access only: what a step job's move does to its run is
//! decided in [`crate::driver`].

use std::collections::HashMap;

use hodei_domain::{
    AttemptRecord, JobId, PipelineEvent, PipelineRun, PipelineRunId, PipelineState, TenantId,
};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{RowReader, StorageError, encode, to_i64};
use crate::event_store::{self, EventRange, EventTable, Stored};
use crate::sql::like_prefix;

const COLUMNS: &str = "id, tenant, state, spec, steps, cancel_requested, failing_fast, created_at, updated_at, version";

/// Inserts a new run (at its first state) with the current span's trace context. Returns
/// false, inserting nothing, when the tenant already used the run's idempotency key.
pub async fn insert(conn: &mut PgConnection, run: &PipelineRun) -> Result<bool, StorageError> {
    let spec = run.spec();
    let inserted = sqlx::query(
        "INSERT INTO pipeline_runs (id, tenant, name, state, spec, steps, cancel_requested, failing_fast,
                                    idempotency_key, created_at, updated_at, version, trace_context)
         VALUES ($1, $2, $3, $4, $5, $6, false, false, $7, $8, $8, $9, $10)
         ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
    )
    .bind(run.id().as_uuid())
    .bind(run.tenant().as_str())
    .bind(&spec.name)
    .bind(run.state().as_str())
    .bind(encode("pipeline spec", spec)?)
    .bind(encode("pipeline steps", &run.steps())?)
    .bind(spec.idempotency_key.as_deref())
    .bind(run.created_at())
    .bind(to_i64(run.version()))
    .bind(encode("trace context", &hodei_messaging::trace::current())?)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() > 0)
}

/// Saves the run's projection if it changed since `expected_version` (its events were
/// appended already) and is still at that version; otherwise returns `Conflict`.
pub async fn save(
    conn: &mut PgConnection,
    run: &PipelineRun,
    expected_version: u64,
) -> Result<(), StorageError> {
    if run.version() != expected_version {
        overwrite(conn, run, expected_version).await?;
    }
    Ok(())
}

/// Writes the run's projection (state, steps, flags, `updated_at`, version) over the row if
/// it is still at `expected_version`, even at the same version; otherwise returns `Conflict`.
/// For repairing a projection from its events.
pub async fn overwrite(
    conn: &mut PgConnection,
    run: &PipelineRun,
    expected_version: u64,
) -> Result<(), StorageError> {
    let updated = sqlx::query(
        "UPDATE pipeline_runs SET state = $3, steps = $4, cancel_requested = $5, failing_fast = $6,
                    updated_at = $7, version = $8
             WHERE id = $1 AND version = $2",
    )
    .bind(run.id().as_uuid())
    .bind(to_i64(expected_version))
    .bind(run.state().as_str())
    .bind(encode("pipeline steps", &run.steps())?)
    .bind(run.cancel_requested())
    .bind(run.failing_fast())
    .bind(run.updated_at())
    .bind(to_i64(run.version()))
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(StorageError::Conflict {
            what: format!("pipeline run {} at version {expected_version}", run.id()),
        });
    }
    Ok(())
}

/// Appends a run's events inside the caller's transaction.
pub async fn append_events(
    conn: &mut PgConnection,
    events: &[PipelineEvent],
) -> Result<(), StorageError> {
    let stored = events.iter().map(|e| Stored {
        aggregate: e.run_id.as_uuid(),
        seq: e.seq,
        event_id: e.event_id,
        kind: e.kind.name(),
        at: e.at,
        event: e,
    });
    event_store::append(conn, EventTable::Pipelines, stored).await
}

/// Run `id`, its row locked until the end of the caller's transaction.
pub async fn lock(
    conn: &mut PgConnection,
    id: PipelineRunId,
) -> Result<Option<PipelineRun>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM pipeline_runs WHERE id = $1 FOR UPDATE");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// One run, if it exists.
pub async fn get(
    conn: impl sqlx::PgExecutor<'_>,
    id: PipelineRunId,
) -> Result<Option<PipelineRun>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM pipeline_runs WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// The run a tenant submitted with `key`, if any.
pub async fn find_by_idempotency_key(
    pool: &PgPool,
    tenant: &TenantId,
    key: &str,
) -> Result<Option<PipelineRun>, StorageError> {
    let sql =
        format!("SELECT {COLUMNS} FROM pipeline_runs WHERE tenant = $1 AND idempotency_key = $2");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant.as_str())
        .bind(key)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Filters for [`list`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this tenant's runs; none: every tenant's.
    pub tenant: Option<TenantId>,
    pub states: Vec<PipelineState>,
    pub name_prefix: Option<String>,
    /// Keyset cursor: only runs older than this one.
    pub before: Option<PipelineRunId>,
    pub limit: u32,
}

/// Runs matching `filter`, newest first.
pub async fn list(
    conn: impl sqlx::PgExecutor<'_>,
    filter: &RunFilter,
) -> Result<Vec<PipelineRun>, StorageError> {
    let states: Option<Vec<&str>> = (!filter.states.is_empty())
        .then(|| filter.states.iter().map(PipelineState::as_str).collect());
    let prefix = filter
        .name_prefix
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(like_prefix);
    let sql = format!(
        "SELECT {COLUMNS} FROM pipeline_runs
         WHERE ($1::text[] IS NULL OR state = ANY($1))
           AND ($2::text IS NULL OR name LIKE $2)
           AND ($3::uuid IS NULL OR id < $3)
           AND ($5::text IS NULL OR tenant = $5)
         ORDER BY id DESC LIMIT $4"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(states)
        .bind(prefix)
        .bind(filter.before.map(|b| b.as_uuid()))
        .bind(i64::from(filter.limit))
        .bind(filter.tenant.as_ref().map(TenantId::as_str))
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode).collect()
}

/// A run's events with `seq >= from_seq`, in order.
pub async fn events(
    pool: &PgPool,
    id: PipelineRunId,
    from_seq: u64,
) -> Result<Vec<PipelineEvent>, StorageError> {
    history(pool, id, EventRange::from(from_seq)).await
}

/// Every event of each of `runs`, in order, by run: to fold them.
pub async fn histories(
    conn: impl sqlx::PgExecutor<'_>,
    runs: &[PipelineRunId],
) -> Result<HashMap<PipelineRunId, Vec<PipelineEvent>>, StorageError> {
    let uuids: Vec<Uuid> = runs.iter().map(PipelineRunId::as_uuid).collect();
    let rows = event_store::read_many(conn, EventTable::Pipelines, &uuids, None).await?;
    Ok(rows
        .into_iter()
        .map(|(id, events)| (PipelineRunId::from_uuid(id), events))
        .collect())
}

/// A run's events within `range`, in order.
pub async fn history(
    pool: &PgPool,
    id: PipelineRunId,
    range: EventRange,
) -> Result<Vec<PipelineEvent>, StorageError> {
    event_store::read(pool, EventTable::Pipelines, id.as_uuid(), range).await
}

/// The attempts of each of `ids` (the jobs of a run's steps), for showing a run.
pub async fn step_attempts(
    pool: &PgPool,
    ids: &[JobId],
) -> Result<HashMap<JobId, Vec<AttemptRecord>>, StorageError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let rows: Vec<(Uuid, serde_json::Value)> =
        sqlx::query_as("SELECT id, attempts FROM jobs WHERE id = ANY($1)")
            .bind(&uuids)
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(id, attempts)| {
            let attempts = serde_json::from_value(attempts).map_err(|e| StorageError::Corrupt {
                table: "jobs",
                id: id.to_string(),
                column: "attempts",
                reason: e.to_string(),
            })?;
            Ok((JobId::from_uuid(id), attempts))
        })
        .collect()
}

fn decode(row: &PgRow) -> Result<PipelineRun, StorageError> {
    let (id, r) = RowReader::with_id::<Uuid>("pipeline_runs", row)?;
    Ok(PipelineRun::restore(
        PipelineRunId::from_uuid(id),
        r.parse("tenant")?,
        r.json("spec")?,
        r.parse("state")?,
        r.json("steps")?,
        r.get("cancel_requested")?,
        r.get("failing_fast")?,
        r.get("created_at")?,
        r.get("updated_at")?,
        r.unsigned("version")?,
    ))
}
