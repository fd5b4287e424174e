//! Pipeline runs: the event store (`pipeline_events`, unique `(run_id, seq)`) and the
//! `pipeline_runs` projection, and the driving of a run by its steps' jobs.
//!
//! A run moves in the transaction that moves one of its step jobs: [`crate::jobs::save`] calls
//! [`on_step_job`] when a step's job starts or ends, which locks the run's row, lets the
//! aggregate decide, creates the jobs of the steps it releases, cancels the ones it stops and
//! saves the run, all before the job's own change commits. A step's end and its dependants'
//! release are therefore one atomic change: no message can be lost between them, and a crash
//! of any service leaves either both or neither.

use std::collections::{HashMap, VecDeque};

use chrono::Utc;
use hodei_domain::{
    AttemptRecord, Effects, Job, JobEvent, JobEventKind, JobId, PipelineEvent, PipelineRun,
    PipelineRunId, PipelineState, TenantId,
};
use hodei_messaging::{Outgoing, PlaceJob};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{RowReader, StorageError, encode, to_i64};
use crate::event_store::{self, EventTable, Stored};
use crate::jobs;

const COLUMNS: &str = "id, tenant, state, spec, steps, cancel_requested, failing_fast, created_at, updated_at, version";

/// The source of what a step job's start or end makes the run do (`jobs::save` does not know
/// which service is saving).
const DRIVER: &str = "hodei/pipelines";

/// What a submission did.
#[derive(Debug)]
pub enum Submitted {
    /// The run was recorded and its first steps queued.
    Created(PipelineRun),
    /// A run with the same idempotency key existed; it is returned as it is now.
    Existing(PipelineRun),
}

/// Records a new run, its first event and the jobs of the steps that need nothing, in one
/// transaction. With an idempotency key the tenant already used, records nothing and returns
/// the existing run.
pub async fn insert_submitted(
    pool: &PgPool,
    mut run: PipelineRun,
    event: &PipelineEvent,
    source: &str,
) -> Result<Submitted, StorageError> {
    let mut tx = pool.begin().await?;
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
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        tx.rollback().await?;
        let key = run.spec().idempotency_key.clone().unwrap_or_default();
        return match find_by_idempotency_key(pool, run.tenant(), &key).await? {
            Some(existing) => Ok(Submitted::Existing(existing)),
            None => Err(StorageError::Conflict {
                what: format!("pipeline run with idempotency key {key}"),
            }),
        };
    }
    append_events(&mut tx, std::slice::from_ref(event)).await?;
    let mut messages = vec![Outgoing::pipeline_event(event, source)?];
    let version = run.version();
    let effects = run.advance(Utc::now(), JobId::new)?;
    carry_out(&mut tx, &mut run, effects, source, &mut messages).await?;
    save(&mut tx, &run, version, &messages).await?;
    tx.commit().await?;
    Ok(Submitted::Created(run))
}

/// Moves run `run_id` after its step job `job` changed by `events` (already saved): a start
/// marks the step running, an end finishes the step and releases, skips or cancels what
/// follows. Called by [`crate::jobs::save`] inside the job's transaction.
pub(crate) async fn on_step_job(
    conn: &mut PgConnection,
    run_id: PipelineRunId,
    job: &Job,
    events: &[JobEvent],
) -> Result<(), StorageError> {
    let started = events
        .iter()
        .any(|e| matches!(e.kind, JobEventKind::Started { .. }));
    let ended = events.iter().any(|e| e.kind.is_terminal());
    if !started && !ended {
        return Ok(());
    }
    let Some(mut run) = lock(&mut *conn, run_id).await? else {
        return Ok(());
    };
    let version = run.version();
    let now = Utc::now();
    let mut messages = Vec::new();
    if started && let Some(event) = run.job_started(job.id(), now)? {
        append_events(conn, std::slice::from_ref(&event)).await?;
        messages.push(Outgoing::pipeline_event(&event, DRIVER)?);
    }
    if ended {
        let effects = run.job_ended(job.id(), job.state(), job_reason(job), now)?;
        carry_out(conn, &mut run, effects, DRIVER, &mut messages).await?;
    }
    save(conn, &run, version, &messages).await
}

/// Cancels run `id`: steps not started are cancelled, the jobs of queued and running steps go
/// through the job cancel path, `always` steps still run. Returns the run as it is now, or
/// `None` if it does not exist.
pub async fn cancel(
    pool: &PgPool,
    id: PipelineRunId,
    reason: &str,
    source: &str,
) -> Result<Option<PipelineRun>, StorageError> {
    let mut tx = pool.begin().await?;
    let Some(mut run) = lock(&mut tx, id).await? else {
        return Ok(None);
    };
    let version = run.version();
    let effects = run.cancel(reason, Utc::now())?;
    if effects.events.is_empty() {
        return Ok(Some(run));
    }
    let mut messages = Vec::new();
    carry_out(&mut tx, &mut run, effects, source, &mut messages).await?;
    save(&mut tx, &run, version, &messages).await?;
    tx.commit().await?;
    Ok(Some(run))
}

/// Records what the run decided: its events, the jobs of the steps it queued, the cancels of
/// the jobs it stops. A cancelled job that ends at once (it was still queued) is fed back to
/// the run until nothing more follows. What it records names `source` as its source.
async fn carry_out(
    conn: &mut PgConnection,
    run: &mut PipelineRun,
    effects: Effects,
    source: &str,
    messages: &mut Vec<Outgoing>,
) -> Result<(), StorageError> {
    // The steps' job specs, expanded once, when a step is to be queued.
    let mut specs = None;
    let mut pending = VecDeque::from([effects]);
    while let Some(effects) = pending.pop_front() {
        append_events(conn, &effects.events).await?;
        for event in &effects.events {
            messages.push(Outgoing::pipeline_event(event, source)?);
        }
        for (step, job_id) in &effects.jobs_to_create {
            let specs = specs.get_or_insert_with(|| run.job_specs());
            let spec = specs
                .remove(step)
                .ok_or_else(|| hodei_domain::DomainError::UnknownStep { step: step.clone() })?;
            create_step_job(conn, run, step, spec, *job_id, source).await?;
        }
        for job_id in &effects.jobs_to_cancel {
            let reason = if run.cancel_requested() {
                "pipeline run cancelled"
            } else {
                "fail-fast: another step failed"
            };
            let job = match jobs::request_cancel_unmoved(conn, *job_id, reason, source).await {
                Ok(Some((job, _, _))) => job,
                // Gone, or already ended (its end moves the run on its own).
                Ok(None) | Err(StorageError::Refused(_)) => continue,
                Err(e) => return Err(e),
            };
            if job.state().is_terminal() {
                pending.push_back(run.job_ended(
                    job.id(),
                    job.state(),
                    job_reason(&job),
                    Utc::now(),
                )?);
            }
        }
    }
    Ok(())
}

/// Creates the job of step `step`, linked to the run, and asks for its placement.
async fn create_step_job(
    conn: &mut PgConnection,
    run: &PipelineRun,
    step: &str,
    spec: hodei_domain::JobSpec,
    job_id: JobId,
    source: &str,
) -> Result<(), StorageError> {
    let (job, event) = Job::submit(job_id, run.tenant().clone(), spec, Utc::now());
    jobs::insert_job(conn, &job, &event, Some((run.id(), step))).await?;
    let messages = [
        Outgoing::job_event(&event, source)?,
        Outgoing::place_job(&PlaceJob {
            job_id,
            attempt: job.current_attempt(),
            priority: job.spec().priority,
            not_before: None,
        })?,
    ];
    crate::outbox::append(conn, &messages).await
}

/// How a step's job ended, for the step's `reason`.
fn job_reason(job: &Job) -> Option<String> {
    job.reason().map(str::to_owned).or_else(|| {
        job.current_attempt_record()
            .and_then(|a| a.outcome.as_ref())
            .map(ToString::to_string)
    })
}

/// Saves the run's projection if it is still at `expected_version` (its events were appended
/// already) and queues `messages`.
async fn save(
    conn: &mut PgConnection,
    run: &PipelineRun,
    expected_version: u64,
    messages: &[Outgoing],
) -> Result<(), StorageError> {
    if run.version() != expected_version {
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
    }
    crate::outbox::append(conn, messages).await
}

async fn append_events(
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
async fn lock(
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
    pub states: Vec<PipelineState>,
    pub name_prefix: Option<String>,
    /// Keyset cursor: only runs older than this one.
    pub before: Option<PipelineRunId>,
    pub limit: u32,
}

/// Runs matching `filter`, newest first.
pub async fn list(pool: &PgPool, filter: &RunFilter) -> Result<Vec<PipelineRun>, StorageError> {
    let states: Option<Vec<&str>> = (!filter.states.is_empty())
        .then(|| filter.states.iter().map(PipelineState::as_str).collect());
    let prefix = filter
        .name_prefix
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(jobs::like_prefix);
    let sql = format!(
        "SELECT {COLUMNS} FROM pipeline_runs
         WHERE ($1::text[] IS NULL OR state = ANY($1))
           AND ($2::text IS NULL OR name LIKE $2)
           AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(states)
        .bind(prefix)
        .bind(filter.before.map(|b| b.as_uuid()))
        .bind(i64::from(filter.limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// A run's events with `seq >= from_seq`, in order.
pub async fn events(
    pool: &PgPool,
    id: PipelineRunId,
    from_seq: u64,
) -> Result<Vec<PipelineEvent>, StorageError> {
    event_store::read(pool, EventTable::Pipelines, id.as_uuid(), from_seq).await
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
    let id: Uuid = sqlx::Row::try_get(row, "id").map_err(|e| StorageError::Corrupt {
        table: "pipeline_runs",
        id: "?".to_owned(),
        column: "id",
        reason: e.to_string(),
    })?;
    let r = RowReader {
        table: "pipeline_runs",
        id: id.to_string(),
        row,
    };
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
