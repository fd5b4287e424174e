//! Retention's data access: ended jobs and pipeline runs moved from the hot tables to
//! `jobs_archive` and `pipeline_runs_archive` (each aggregate's whole event history as one
//! compressed JSON array), and read back from there.
//!
//! A batch is locked with `FOR UPDATE SKIP LOCKED` and moved in the caller's transaction, so
//! batches stay short, several archivers (one per scheduler replica) never take the same
//! rows, and a job is in exactly one of the two places at every moment.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hodei_domain::{JobEvent, JobId, JobState, PipelineEvent, PipelineRunId, PipelineState};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::StorageError;
use crate::event_store::{self, EventRange, EventTable, Tier};

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
    move_jobs(conn, &ids).await
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
    let mut moved = move_jobs(conn, &steps).await?;
    sqlx::query(
        "INSERT INTO pipeline_runs_archive
             (id, tenant, name, state, created_at, ended_at, archived_at, events)
         SELECT r.id, r.tenant, r.name, r.state, r.created_at, r.updated_at, now(),
                coalesce((SELECT jsonb_agg(e.data ORDER BY e.seq)
                          FROM pipeline_events e WHERE e.run_id = r.id), '[]')
         FROM pipeline_runs r WHERE r.id = ANY($1)",
    )
    .bind(&runs)
    .execute(&mut *conn)
    .await?;
    let events = sqlx::query("DELETE FROM pipeline_events WHERE run_id = ANY($1)")
        .bind(&runs)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let deleted = sqlx::query("DELETE FROM pipeline_runs WHERE id = ANY($1)")
        .bind(&runs)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    moved += Moved {
        jobs: 0,
        runs: deleted,
        events,
    };
    Ok(moved)
}

/// Copies the locked jobs `ids` and their events to the archive, then deletes them (their
/// search rows go with them).
async fn move_jobs(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Moved, StorageError> {
    if ids.is_empty() {
        return Ok(Moved::default());
    }
    sqlx::query(
        "INSERT INTO jobs_archive
             (id, tenant, name, state, labels, pipeline_run_id, created_at, ended_at, archived_at, events)
         SELECT j.id, j.tenant, j.name, j.state, j.labels, j.pipeline_run_id, j.created_at,
                j.updated_at, now(),
                coalesce((SELECT jsonb_agg(e.data ORDER BY e.seq)
                          FROM job_events e WHERE e.job_id = j.id), '[]')
         FROM jobs j WHERE j.id = ANY($1)",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    let events = sqlx::query("DELETE FROM job_events WHERE job_id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let jobs = sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(Moved {
        jobs,
        runs: 0,
        events,
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

/// When job `id` was archived; `None` if it is not in the archive.
pub async fn job_archived_at(
    conn: impl sqlx::PgExecutor<'_>,
    id: JobId,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT archived_at FROM jobs_archive WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(conn)
            .await?,
    )
}

/// When pipeline run `id` was archived; `None` if it is not in the archive.
pub async fn run_archived_at(
    conn: impl sqlx::PgExecutor<'_>,
    id: PipelineRunId,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT archived_at FROM pipeline_runs_archive WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(conn)
            .await?,
    )
}

/// An archived job's events within `range`, in order (empty if it is not archived).
pub async fn job_history(
    conn: impl sqlx::PgExecutor<'_>,
    id: JobId,
    range: EventRange,
) -> Result<Vec<JobEvent>, StorageError> {
    event_store::read(conn, EventTable::Jobs, Tier::Archive, id.as_uuid(), range).await
}

/// The archived events of each of `ids` (all, or those recorded at or before `until`), by job.
pub async fn job_histories(
    conn: impl sqlx::PgExecutor<'_>,
    ids: &[JobId],
    until: Option<DateTime<Utc>>,
) -> Result<HashMap<JobId, Vec<JobEvent>>, StorageError> {
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let rows = event_store::read_many(conn, EventTable::Jobs, Tier::Archive, &uuids, until).await?;
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
    event_store::read(
        conn,
        EventTable::Pipelines,
        Tier::Archive,
        id.as_uuid(),
        range,
    )
    .await
}
