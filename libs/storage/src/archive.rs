//! Retention's data access: ended jobs and pipeline runs moved from the hot tables to
//! `jobs_archive` and `pipeline_runs_archive` (each aggregate's whole event history as one
//! zstd-compressed JSON array), and read back from there.
//!
//! A batch is locked with `FOR UPDATE SKIP LOCKED` and moved in the caller's transaction, so
//! batches stay short, several archivers (one per scheduler replica) never take the same
//! rows, and a job is in exactly one of the two places at every moment.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hodei_domain::{
    JobEvent, JobId, JobState, PipelineEvent, PipelineRunId, PipelineState, TenantId,
};
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::StorageError;
use crate::event_store::EventRange;

/// Where an aggregate's events are kept: the hot event tables, or the archive retention moved
/// them to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Hot,
    Archive,
}

/// zstd's default level: a history compresses about 3x in well under a millisecond.
const ZSTD_LEVEL: i32 = 3;

/// The two archive tables and their statements.
#[derive(Debug, Clone, Copy)]
enum Archive {
    Jobs,
    Runs,
}

/// An archived job or run: when it was archived and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    pub at: DateTime<Utc>,
    pub tenant: TenantId,
}

impl Archive {
    /// When `id` was archived, and its tenant.
    async fn archived(
        self,
        conn: impl sqlx::PgExecutor<'_>,
        id: Uuid,
    ) -> Result<Option<Archived>, StorageError> {
        let sql = format!(
            "SELECT archived_at, tenant FROM {} WHERE id = $1",
            self.name()
        );
        let row: Option<(DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(conn)
            .await?;
        row.map(|(at, tenant)| {
            let tenant =
                tenant
                    .parse()
                    .map_err(|e: hodei_domain::IdError| StorageError::Corrupt {
                        table: self.name(),
                        id: id.to_string(),
                        column: "tenant",
                        reason: e.to_string(),
                    })?;
            Ok(Archived { at, tenant })
        })
        .transpose()
    }

    fn name(self) -> &'static str {
        match self {
            Archive::Jobs => "jobs_archive",
            Archive::Runs => "pipeline_runs_archive",
        }
    }

    /// Each of `$1`'s aggregates' events as one JSON array text, in seq order.
    fn histories_sql(self) -> &'static str {
        match self {
            Archive::Jobs => {
                "SELECT j.id, coalesce((SELECT jsonb_agg(e.data ORDER BY e.seq)
                                        FROM job_events e WHERE e.job_id = j.id), '[]')::text
                 FROM jobs j WHERE j.id = ANY($1)"
            }
            Archive::Runs => {
                "SELECT r.id, coalesce((SELECT jsonb_agg(e.data ORDER BY e.seq)
                                        FROM pipeline_events e WHERE e.run_id = r.id), '[]')::text
                 FROM pipeline_runs r WHERE r.id = ANY($1)"
            }
        }
    }

    /// Copies the rows `$1` with their compressed histories `$2` into the archive.
    fn insert_sql(self) -> &'static str {
        match self {
            Archive::Jobs => {
                "INSERT INTO jobs_archive (id, tenant, name, state, labels, pipeline_run_id,
                                           created_at, ended_at, archived_at, events)
                 SELECT j.id, j.tenant, j.name, j.state, j.labels, j.pipeline_run_id,
                        j.created_at, j.updated_at, now(), h.events
                 FROM jobs j JOIN unnest($1::uuid[], $2::bytea[]) AS h(id, events) ON h.id = j.id"
            }
            Archive::Runs => {
                "INSERT INTO pipeline_runs_archive (id, tenant, name, state, created_at, ended_at,
                                                    archived_at, events)
                 SELECT r.id, r.tenant, r.name, r.state, r.created_at, r.updated_at, now(), h.events
                 FROM pipeline_runs r JOIN unnest($1::uuid[], $2::bytea[]) AS h(id, events)
                      ON h.id = r.id"
            }
        }
    }

    fn delete_sql(self) -> [&'static str; 2] {
        match self {
            Archive::Jobs => [
                "DELETE FROM job_events WHERE job_id = ANY($1)",
                "DELETE FROM jobs WHERE id = ANY($1)",
            ],
            Archive::Runs => [
                "DELETE FROM pipeline_events WHERE run_id = ANY($1)",
                "DELETE FROM pipeline_runs WHERE id = ANY($1)",
            ],
        }
    }

    fn select_one_sql(self) -> &'static str {
        match self {
            Archive::Jobs => "SELECT events FROM jobs_archive WHERE id = $1",
            Archive::Runs => "SELECT events FROM pipeline_runs_archive WHERE id = $1",
        }
    }

    fn select_many_sql(self) -> &'static str {
        match self {
            Archive::Jobs => "SELECT id, events FROM jobs_archive WHERE id = ANY($1)",
            Archive::Runs => "SELECT id, events FROM pipeline_runs_archive WHERE id = ANY($1)",
        }
    }

    /// Moves the locked aggregates `ids` with their events to the archive: returns how many
    /// aggregates and events left the hot tables (their search rows go with them).
    async fn move_in(
        self,
        conn: &mut PgConnection,
        ids: &[Uuid],
    ) -> Result<(u64, u64), StorageError> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let histories: Vec<(Uuid, String)> = sqlx::query_as(self.histories_sql())
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?;
        let mut packed_ids = Vec::with_capacity(histories.len());
        let mut packed = Vec::with_capacity(histories.len());
        for (id, json) in histories {
            let bytes = zstd::bulk::compress(json.as_bytes(), ZSTD_LEVEL).map_err(|e| {
                StorageError::Encode {
                    what: "archived history",
                    reason: e.to_string(),
                }
            })?;
            packed_ids.push(id);
            packed.push(bytes);
        }
        sqlx::query(self.insert_sql())
            .bind(&packed_ids)
            .bind(&packed)
            .execute(&mut *conn)
            .await?;
        let [events_sql, rows_sql] = self.delete_sql();
        let events = sqlx::query(events_sql)
            .bind(ids)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        let rows = sqlx::query(rows_sql)
            .bind(ids)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        Ok((rows, events))
    }

    /// The archived events of `id` within `range`; empty when it is not archived.
    async fn history<E: DeserializeOwned + Recorded>(
        self,
        conn: impl sqlx::PgExecutor<'_>,
        id: Uuid,
        range: EventRange,
    ) -> Result<Vec<E>, StorageError> {
        let packed: Option<Vec<u8>> = sqlx::query_scalar(self.select_one_sql())
            .bind(id)
            .fetch_optional(conn)
            .await?;
        let Some(packed) = packed else {
            return Ok(Vec::new());
        };
        let limit = range.limit.map_or(usize::MAX, |l| l as usize);
        Ok(self
            .unpack::<E>(id, &packed)?
            .into_iter()
            .filter(|e| within(e, &range))
            .take(limit)
            .collect())
    }

    /// The archived events of each of `ids` (those recorded at or before `until` when given).
    async fn histories<E: DeserializeOwned + Recorded>(
        self,
        conn: impl sqlx::PgExecutor<'_>,
        ids: &[Uuid],
        until: Option<DateTime<Utc>>,
    ) -> Result<HashMap<Uuid, Vec<E>>, StorageError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(self.select_many_sql())
            .bind(ids)
            .fetch_all(conn)
            .await?;
        let range = EventRange {
            from_seq: 0,
            until,
            ..EventRange::default()
        };
        rows.into_iter()
            .map(|(id, packed)| {
                let events = self.unpack::<E>(id, &packed)?;
                Ok((
                    id,
                    events.into_iter().filter(|e| within(e, &range)).collect(),
                ))
            })
            .collect()
    }

    fn unpack<E: DeserializeOwned>(self, id: Uuid, packed: &[u8]) -> Result<Vec<E>, StorageError> {
        let corrupt = |reason: String| StorageError::Corrupt {
            table: self.name(),
            id: id.to_string(),
            column: "events",
            reason,
        };
        let json = zstd::stream::decode_all(packed).map_err(|e| corrupt(e.to_string()))?;
        serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))
    }
}

/// What a range of an archived history is chosen by.
trait Recorded {
    fn seq(&self) -> u64;
    fn at(&self) -> DateTime<Utc>;
}

impl Recorded for JobEvent {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn at(&self) -> DateTime<Utc> {
        self.at
    }
}

impl Recorded for PipelineEvent {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn at(&self) -> DateTime<Utc> {
        self.at
    }
}

fn within(event: &impl Recorded, range: &EventRange) -> bool {
    event.seq() >= range.from_seq
        && range.to_seq.is_none_or(|last| event.seq() <= last)
        && range.until.is_none_or(|until| event.at() <= until)
}

/// What one batch moved to the archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub jobs: u64,
    pub runs: u64,
    pub events: u64,
}

impl std::ops::AddAssign for Moved {
    fn add_assign(&mut self, other: Moved) {
        self.jobs += other.jobs;
        self.runs += other.runs;
        self.events += other.events;
    }
}

/// How many rows each table holds: the hot tables and the archives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub jobs: u64,
    pub pipeline_runs: u64,
    pub jobs_archive: u64,
    pub pipeline_runs_archive: u64,
}

fn ended_job_states() -> Vec<&'static str> {
    JobState::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(JobState::as_str)
        .collect()
}

fn ended_run_states() -> Vec<&'static str> {
    PipelineState::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(PipelineState::as_str)
        .collect()
}

/// The smallest time-ordered (v7) id of `at`'s millisecond: every id created before `at` is
/// smaller, so a walk of the primary key up to it sees only aggregates created before `at`.
fn first_id_at(at: DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

/// The moment `age` ago: what ended before it is old enough to archive. `None` when that
/// moment is before the earliest time chrono holds.
pub fn cutoff(age: std::time::Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
}

/// One batch of retention in its own transaction: up to `limit` pipeline runs (with their step
/// jobs) and up to `limit` other jobs that ended before `cutoff` moved to the archive. Nothing
/// left to move when it returns [`Moved::default`].
pub async fn archive_batch(
    pool: &sqlx::PgPool,
    cutoff: DateTime<Utc>,
    limit: u32,
) -> Result<Moved, StorageError> {
    let mut tx = pool.begin().await?;
    let mut moved = archive_runs(&mut tx, cutoff, limit).await?;
    moved += archive_jobs(&mut tx, cutoff, limit).await?;
    tx.commit().await?;
    Ok(moved)
}

/// Moves up to `limit` jobs that are not steps of a pipeline run and ended before `cutoff`,
/// with their events, to the archive.
pub async fn archive_jobs(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: u32,
) -> Result<Moved, StorageError> {
    // Ids are creation-ordered, so the primary key is walked only over jobs created before
    // the cutoff; those still running when it passed are skipped, not indexed separately.
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs
         WHERE id < $1 AND pipeline_run_id IS NULL AND state = ANY($2) AND updated_at < $3
         ORDER BY id LIMIT $4
         FOR UPDATE SKIP LOCKED",
    )
    .bind(first_id_at(cutoff))
    .bind(ended_job_states())
    .bind(cutoff)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let (jobs, events) = Archive::Jobs.move_in(conn, &ids).await?;
    Ok(Moved {
        jobs,
        runs: 0,
        events,
    })
}

/// Moves up to `limit` pipeline runs that ended before `cutoff` and whose step jobs have all
/// ended, with their events and their step jobs, to the archive.
pub async fn archive_runs(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: u32,
) -> Result<Moved, StorageError> {
    let runs: Vec<Uuid> = sqlx::query_scalar(
        "SELECT r.id FROM pipeline_runs r
         WHERE r.id < $1 AND r.state = ANY($2) AND r.updated_at < $3
           AND NOT EXISTS (SELECT 1 FROM jobs j
                           WHERE j.pipeline_run_id = r.id AND NOT (j.state = ANY($4)))
         ORDER BY r.id LIMIT $5
         FOR UPDATE OF r SKIP LOCKED",
    )
    .bind(first_id_at(cutoff))
    .bind(ended_run_states())
    .bind(cutoff)
    .bind(ended_job_states())
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    if runs.is_empty() {
        return Ok(Moved::default());
    }
    let steps: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE pipeline_run_id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&runs)
    .fetch_all(&mut *conn)
    .await?;
    let (jobs, job_events) = Archive::Jobs.move_in(conn, &steps).await?;
    let (runs, run_events) = Archive::Runs.move_in(conn, &runs).await?;
    Ok(Moved {
        jobs,
        runs,
        events: job_events + run_events,
    })
}

/// How many rows the hot tables and the archives hold.
pub async fn counts(conn: impl sqlx::PgExecutor<'_>) -> Result<Counts, StorageError> {
    let (jobs, pipeline_runs, jobs_archive, pipeline_runs_archive): (i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM pipeline_runs),
                    (SELECT count(*) FROM jobs_archive),
                    (SELECT count(*) FROM pipeline_runs_archive)",
        )
        .fetch_one(conn)
        .await?;
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Counts {
        jobs: unsigned(jobs),
        pipeline_runs: unsigned(pipeline_runs),
        jobs_archive: unsigned(jobs_archive),
        pipeline_runs_archive: unsigned(pipeline_runs_archive),
    })
}

/// When job `id` was archived, and its tenant; `None` if it is not in the archive.
pub async fn job_archived_at(
    conn: impl sqlx::PgExecutor<'_>,
    id: JobId,
) -> Result<Option<Archived>, StorageError> {
    Archive::Jobs.archived(conn, id.as_uuid()).await
}

/// When pipeline run `id` was archived, and its tenant; `None` if it is not in the archive.
pub async fn run_archived_at(
    conn: impl sqlx::PgExecutor<'_>,
    id: PipelineRunId,
) -> Result<Option<Archived>, StorageError> {
    Archive::Runs.archived(conn, id.as_uuid()).await
}

/// An archived job's events within `range`, in order (empty if it is not archived).
pub async fn job_history(
    conn: impl sqlx::PgExecutor<'_>,
    id: JobId,
    range: EventRange,
) -> Result<Vec<JobEvent>, StorageError> {
    Archive::Jobs.history(conn, id.as_uuid(), range).await
}

/// The archived events of each of `ids` (all, or those recorded at or before `until`), by job.
pub async fn job_histories(
    conn: impl sqlx::PgExecutor<'_>,
    ids: &[JobId],
    until: Option<DateTime<Utc>>,
) -> Result<HashMap<JobId, Vec<JobEvent>>, StorageError> {
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let rows = Archive::Jobs.histories(conn, &uuids, until).await?;
    Ok(rows
        .into_iter()
        .map(|(id, events)| (JobId::from_uuid(id), events))
        .collect())
}

/// An archived run's events within `range`, in order (empty if it is not archived).
pub async fn run_history(
    conn: impl sqlx::PgExecutor<'_>,
    id: PipelineRunId,
    range: EventRange,
) -> Result<Vec<PipelineEvent>, StorageError> {
    Archive::Runs.history(conn, id.as_uuid(), range).await
}
