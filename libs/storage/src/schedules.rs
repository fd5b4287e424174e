//! Schedules (`schedules`) and their tick history (`schedule_ticks`). Data access only: what a
//! due schedule does is decided by the domain and carried out in [`crate::driver`].

use chrono::{DateTime, Utc};
use hodei_domain::{JobId, PipelineRunId, Schedule, ScheduleId, TenantId, TickRecord};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{RowReader, StorageError, encode, to_i64};

/// The job and run states that have not ended, as SQL lists (the overlap policy's "still
/// going").
const JOB_GOING: &str = "('queued', 'assigned', 'running')";
const RUN_GOING: &str = "('queued', 'running')";

const COLUMNS: &str =
    "id, tenant, spec, paused, next_tick, fire_at, created_at, updated_at, version";

/// Inserts a new schedule. Returns false, inserting nothing, when its tenant already has a
/// schedule of that name.
pub async fn insert(conn: &mut PgConnection, schedule: &Schedule) -> Result<bool, StorageError> {
    let inserted = sqlx::query(
        "INSERT INTO schedules (id, tenant, name, spec, paused, next_tick, fire_at, created_at,
                                updated_at, version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (tenant, name) DO NOTHING",
    )
    .bind(schedule.id().as_uuid())
    .bind(schedule.tenant().as_str())
    .bind(&schedule.spec().name)
    .bind(encode("schedule spec", schedule.spec())?)
    .bind(schedule.paused())
    .bind(schedule.next_tick())
    .bind(schedule.fire_at())
    .bind(schedule.created_at())
    .bind(schedule.updated_at())
    .bind(to_i64(schedule.version()))
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Saves a changed schedule if it is still at `expected_version`; `Conflict` otherwise.
pub async fn save(
    conn: &mut PgConnection,
    schedule: &Schedule,
    expected_version: u64,
) -> Result<(), StorageError> {
    let saved = sqlx::query(
        "UPDATE schedules SET paused = $2, next_tick = $3, fire_at = $4, updated_at = $5, version = $6
         WHERE id = $1 AND version = $7",
    )
    .bind(schedule.id().as_uuid())
    .bind(schedule.paused())
    .bind(schedule.next_tick())
    .bind(schedule.fire_at())
    .bind(schedule.updated_at())
    .bind(to_i64(schedule.version()))
    .bind(to_i64(expected_version))
    .execute(&mut *conn)
    .await?;
    if saved.rows_affected() == 0 {
        return Err(StorageError::Conflict {
            what: format!("schedule {}", schedule.id()),
        });
    }
    Ok(())
}

/// Deletes schedule `id` and its history; false when there was none.
pub async fn delete(conn: &mut PgConnection, id: ScheduleId) -> Result<bool, StorageError> {
    let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1")
        .bind(id.as_uuid())
        .execute(&mut *conn)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// One schedule, if it exists.
pub async fn get(
    conn: impl sqlx::PgExecutor<'_>,
    id: ScheduleId,
) -> Result<Option<Schedule>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// The tenant's schedule called `name`, if any.
pub async fn get_by_name(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: &TenantId,
    name: &str,
) -> Result<Option<Schedule>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE tenant = $1 AND name = $2");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Schedule `id`, locked for the rest of the transaction.
pub async fn lock(
    conn: &mut PgConnection,
    id: ScheduleId,
) -> Result<Option<Schedule>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = $1 FOR UPDATE");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Up to `limit` active schedules due at `now`, soonest first, locked for the rest of the
/// transaction; those another transaction holds are passed over (another replica fires them).
pub async fn claim_due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Schedule>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM schedules
         WHERE NOT paused AND fire_at <= $1
         ORDER BY fire_at LIMIT $2
         FOR UPDATE SKIP LOCKED"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode).collect()
}

/// Puts off schedule `id`'s next firing to `until` (it could not be handled), without
/// moving its next tick.
pub async fn postpone(
    conn: &mut PgConnection,
    id: ScheduleId,
    until: DateTime<Utc>,
) -> Result<(), StorageError> {
    sqlx::query("UPDATE schedules SET fire_at = $2 WHERE id = $1")
        .bind(id.as_uuid())
        .bind(until)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A page of schedules by id, of one tenant or of all, after `after`.
pub async fn list(
    pool: &PgPool,
    tenant: Option<&TenantId>,
    after: Option<ScheduleId>,
    limit: i64,
) -> Result<Vec<Schedule>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM schedules
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::uuid IS NULL OR id > $2)
         ORDER BY id LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant.map(TenantId::as_str))
        .bind(after.map(|id| id.as_uuid()))
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// Records a tick of schedule `id`, with the idempotency key of the trigger that made it, if
/// any. Returns false, recording nothing, when the tick was recorded before: it must not
/// start anything again.
pub async fn record_tick(
    conn: &mut PgConnection,
    id: ScheduleId,
    tick: &TickRecord,
    key: Option<&str>,
) -> Result<bool, StorageError> {
    let inserted = sqlx::query(
        "INSERT INTO schedule_ticks
             (schedule_id, tick, outcome, handled_at, job_id, run_id, detail, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (schedule_id, tick) DO NOTHING",
    )
    .bind(id.as_uuid())
    .bind(tick.tick)
    .bind(tick.outcome.as_str())
    .bind(tick.handled_at)
    .bind(tick.job_id.map(|j| j.as_uuid()))
    .bind(tick.run_id.map(|r| r.as_uuid()))
    .bind(&tick.detail)
    .bind(key)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Sets the `detail` of a tick recorded in this transaction (what firing it cancelled).
pub async fn set_tick_detail(
    conn: &mut PgConnection,
    id: ScheduleId,
    tick: DateTime<Utc>,
    detail: &str,
) -> Result<(), StorageError> {
    sqlx::query("UPDATE schedule_ticks SET detail = $3 WHERE schedule_id = $1 AND tick = $2")
        .bind(id.as_uuid())
        .bind(tick)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What a schedule started that has not ended yet: its job or run, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    Job(JobId),
    Run(PipelineRunId),
}

impl std::fmt::Display for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Started::Job(id) => write!(f, "job {id}"),
            Started::Run(id) => write!(f, "pipeline run {id}"),
        }
    }
}

/// The jobs and runs schedule `id` started that have not ended.
pub async fn unfinished(
    conn: &mut PgConnection,
    id: ScheduleId,
) -> Result<Vec<Started>, StorageError> {
    let sql = format!(
        "SELECT t.job_id, t.run_id FROM schedule_ticks t
         LEFT JOIN jobs j ON j.id = t.job_id AND j.state IN {JOB_GOING}
         LEFT JOIN pipeline_runs r ON r.id = t.run_id AND r.state IN {RUN_GOING}
         WHERE t.schedule_id = $1 AND (t.job_id IS NOT NULL OR t.run_id IS NOT NULL)
           AND (j.id IS NOT NULL OR r.id IS NOT NULL)
         ORDER BY t.tick"
    );
    let rows: Vec<(Option<Uuid>, Option<Uuid>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| match row {
            (Some(job), _) => Some(Started::Job(JobId::from_uuid(job))),
            (None, Some(run)) => Some(Started::Run(PipelineRunId::from_uuid(run))),
            (None, None) => None,
        })
        .collect())
}

/// Keeps the newest `keep` ticks of schedule `id`, and any older one whose job or run has not
/// ended (the overlap policy still needs it).
pub async fn prune_ticks(
    conn: &mut PgConnection,
    id: ScheduleId,
    keep: u32,
) -> Result<u64, StorageError> {
    let sql = format!(
        "DELETE FROM schedule_ticks t
         WHERE t.schedule_id = $1
           AND t.tick < (SELECT tick FROM schedule_ticks WHERE schedule_id = $1
                         ORDER BY tick DESC OFFSET $2 - 1 LIMIT 1)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = t.job_id AND j.state IN {JOB_GOING})
           AND NOT EXISTS (SELECT 1 FROM pipeline_runs r WHERE r.id = t.run_id
                           AND r.state IN {RUN_GOING})"
    );
    let pruned = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .bind(i64::from(keep.max(1)))
        .execute(&mut *conn)
        .await?;
    Ok(pruned.rows_affected())
}

/// The newest `limit` ticks of schedule `id`, newest first.
pub async fn ticks(
    pool: &PgPool,
    id: ScheduleId,
    limit: i64,
) -> Result<Vec<TickRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT tick, outcome, handled_at, job_id, run_id, detail FROM schedule_ticks
         WHERE schedule_id = $1 ORDER BY tick DESC LIMIT $2",
    )
    .bind(id.as_uuid())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|row| decode_tick(id, row)).collect()
}

/// The tick of schedule `id` that a trigger with idempotency key `key` recorded, if the
/// history still holds it.
pub async fn tick_by_key(
    conn: &mut PgConnection,
    id: ScheduleId,
    key: &str,
) -> Result<Option<TickRecord>, StorageError> {
    let row = sqlx::query(
        "SELECT tick, outcome, handled_at, job_id, run_id, detail FROM schedule_ticks
         WHERE schedule_id = $1 AND idempotency_key = $2",
    )
    .bind(id.as_uuid())
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| decode_tick(id, &row)).transpose()
}

fn decode_tick(id: ScheduleId, row: &PgRow) -> Result<TickRecord, StorageError> {
    let r = RowReader {
        table: "schedule_ticks",
        id: id.to_string(),
        row,
    };
    Ok(TickRecord {
        tick: r.get("tick")?,
        outcome: r.parse("outcome")?,
        handled_at: r.get("handled_at")?,
        job_id: r.get::<Option<Uuid>>("job_id")?.map(JobId::from_uuid),
        run_id: r
            .get::<Option<Uuid>>("run_id")?
            .map(PipelineRunId::from_uuid),
        detail: r.get("detail")?,
    })
}

fn decode(row: &PgRow) -> Result<Schedule, StorageError> {
    let (id, r) = RowReader::with_id::<Uuid>("schedules", row)?;
    Ok(Schedule::restore(
        ScheduleId::from_uuid(id),
        r.parse("tenant")?,
        r.json("spec")?,
        r.get("paused")?,
        r.get("next_tick")?,
        r.get("fire_at")?,
        r.get("created_at")?,
        r.get("updated_at")?,
        r.unsigned("version")?,
    ))
}
