//! The job event store and the `jobs` projection. Every change appends the job's new events
//! (unique `(job_id, seq)`) and updates the projection `WHERE version = expected` in one
//! transaction, so two writers racing on a job cannot both win.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use hodei_domain::{Job, JobEvent, JobId, JobState, PipelineRunId, TenantId};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, QueryBuilder};
use uuid::Uuid;

use crate::error::{RowReader, StorageError, encode, to_i64};
use crate::event_store::{self, EventRange, EventTable, Stored};
use crate::sql::{Unnest, like_prefix};

const COLUMNS: &str = "id, tenant, state, spec, attempts, cancel_requested, preempted_by, not_before, reason, created_at, updated_at, version";

/// Inserts a new job and its first event inside the caller's transaction, linked to the
/// pipeline run step `step` if given, with the current span's trace context. Returns false,
/// inserting nothing, when the tenant already used the job's idempotency key.
pub async fn insert(
    conn: &mut PgConnection,
    job: &Job,
    event: &JobEvent,
    step: Option<(PipelineRunId, &str)>,
) -> Result<bool, StorageError> {
    let spec = job.spec();
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, tenant, name, state, priority, spec, labels, idempotency_key, attempts,
                           current_attempt, worker_id, cancel_requested, not_before, reason, exit_code,
                           created_at, updated_at, version, trace_context, pipeline_run_id, pipeline_step)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '[]', 0, NULL, false, NULL, NULL, NULL, $9, $9, $10, $11, $12, $13)
         ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
    )
    .bind(job.id().as_uuid())
    .bind(job.tenant().as_str())
    .bind(&spec.name)
    .bind(job.state().as_str())
    .bind(spec.priority)
    .bind(encode("job spec", spec)?)
    .bind(encode("job labels", &spec.labels)?)
    .bind(spec.idempotency_key.as_deref())
    .bind(job.created_at())
    .bind(to_i64(job.version()))
    .bind(encode("trace context", &hodei_messaging::trace::current())?)
    .bind(step.map(|(run, _)| run.as_uuid()))
    .bind(step.map(|(_, name)| name))
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO job_search (job_id, state, search)
         SELECT id, state, hodei_job_search(name, labels, spec, NULL) FROM jobs WHERE id = $1",
    )
    .bind(job.id().as_uuid())
    .execute(&mut *conn)
    .await?;
    append_events(conn, std::iter::once(event)).await?;
    Ok(true)
}

/// A new job for [`insert_many`], with the trace context of the submission that made it.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub job: &'a Job,
    pub event: &'a JobEvent,
    pub trace: &'a hodei_messaging::TraceHeaders,
    /// Messages queued in the outbox with the job, handed to the caller's relay once
    /// committed (see [`crate::outbox::append_direct`]).
    pub messages: &'a [hodei_messaging::Outgoing],
    /// The audit log's entry for its submission.
    pub audit: Option<&'a crate::access::AuditEntry>,
}

/// [`insert`] for many jobs (none a pipeline step), with their first events, messages and
/// audit entries, in one statement: a batch of submissions costs one round trip. Returns, for
/// each job in order, whether it was inserted: false when its tenant already used its
/// idempotency key (before, or earlier in the same batch), or when the job itself is already
/// stored (a batch that committed after its caller stopped waiting, submitted again); nothing
/// of such a job is written.
pub async fn insert_many(
    conn: &mut PgConnection,
    new: &[NewJob<'_>],
) -> Result<Vec<bool>, StorageError> {
    insert_batch(conn, new, false)
        .await?
        .ok_or_else(|| StorageError::Conflict {
            what: "a batch of jobs held by a queue quota".to_owned(),
        })
}

/// [`insert_many`] in a statement that first looks for a queue quota (`max_queued_jobs`) set
/// for the jobs' tenants: if there is one, it writes nothing and returns `None`, and the
/// caller counts their queued jobs against it under a lock (see
/// [`crate::driver::submit_jobs`]). Run outside a transaction it is its own, so a batch whose
/// tenants set no queue quota costs one round trip instead of four (BEGIN, the quotas, the
/// batch, COMMIT).
pub async fn insert_many_unless_queue_quota(
    conn: &mut PgConnection,
    new: &[NewJob<'_>],
) -> Result<Option<Vec<bool>>, StorageError> {
    insert_batch(conn, new, true).await
}

async fn insert_batch(
    conn: &mut PgConnection,
    new: &[NewJob<'_>],
    unless_queue_quota: bool,
) -> Result<Option<Vec<bool>>, StorageError> {
    if new.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let n = new.len();
    let mut ids = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut specs = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut traces = Vec::with_capacity(n);
    for NewJob { job, trace, .. } in new {
        let spec = job.spec();
        ids.push(job.id().as_uuid());
        tenants.push(job.tenant().as_str());
        names.push(spec.name.as_str());
        states.push(job.state().as_str());
        priorities.push(spec.priority);
        specs.push(encode("job spec", spec)?);
        labels.push(encode("job labels", &spec.labels)?);
        keys.push(spec.idempotency_key.as_deref());
        created.push(job.created_at());
        versions.push(to_i64(job.version()));
        traces.push(encode("trace context", trace)?);
    }
    let mut query = QueryBuilder::new("WITH ");
    if unless_queue_quota {
        query.push("quotas AS (");
        crate::tenants::push_quotas_set(&mut query, &tenants, crate::tenants::Limits::Queued);
        query.push("), ");
    }
    query.push(
        "inserted AS (
         INSERT INTO jobs (id, tenant, name, state, priority, spec, labels, idempotency_key, attempts,
                           current_attempt, worker_id, cancel_requested, not_before, reason, exit_code,
                           created_at, updated_at, version, trace_context, pipeline_run_id, pipeline_step)
         SELECT u.id, u.tenant, u.name, u.state, u.priority, u.spec, u.labels, u.key, '[]', 0, NULL,
                false, NULL, NULL, NULL, u.created_at, u.created_at, u.version, u.trace, NULL, NULL
         FROM ",
    );
    Unnest::new(&mut query)
        .column(&ids, "uuid")
        .column(&tenants, "text")
        .column(&names, "text")
        .column(&states, "text")
        .column(&priorities, "int")
        .column(&specs, "jsonb")
        .column(&labels, "jsonb")
        .column(&keys, "text")
        .column(&created, "timestamptz")
        .column(&versions, "bigint")
        .column(&traces, "jsonb")
        .alias(
            "u(id, tenant, name, state, priority, spec, labels, key, created_at, version, trace)",
        );
    if unless_queue_quota {
        query.push(" WHERE NOT EXISTS (SELECT 1 FROM quotas)");
    }
    query.push(
        "
         ON CONFLICT DO NOTHING
         RETURNING id, state, name, labels, spec),
         searched AS (
         INSERT INTO job_search (job_id, state, search)
         SELECT id, state, hodei_job_search(name, labels, spec, NULL) FROM inserted
         RETURNING job_id),
         events AS (",
    );
    // Only what belongs to the jobs inserted is written with them.
    event_store::push_insert(
        &mut query,
        EventTable::Jobs,
        new.iter().map(|n| stored(n.event)),
        Some("inserted"),
    )?;
    let mut of_messages = Vec::new();
    let mut messages = Vec::new();
    for n in new {
        for message in n.messages {
            of_messages.push(n.job.id().as_uuid());
            messages.push(message);
        }
    }
    if !messages.is_empty() {
        query.push("), outbox AS (");
        crate::outbox::push_insert(
            &mut query,
            &messages,
            true,
            Some((&of_messages, "inserted")),
        )?;
    }
    let (of_audit, audit): (Vec<Uuid>, Vec<&crate::access::AuditEntry>) = new
        .iter()
        .filter_map(|n| n.audit.map(|a| (n.job.id().as_uuid(), a)))
        .unzip();
    if !audit.is_empty() {
        query.push("), audit AS (");
        crate::access::push_audit(&mut query, &audit, Some((&of_audit, "inserted")));
    }
    query.push(if unless_queue_quota {
        ") SELECT EXISTS (SELECT 1 FROM quotas), ARRAY(SELECT job_id FROM searched)"
    } else {
        ") SELECT false, ARRAY(SELECT job_id FROM searched)"
    });
    let (held, inserted): (bool, Vec<Uuid>) = query.build_query_as().fetch_one(&mut *conn).await?;
    if held {
        return Ok(None);
    }
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    Ok(Some(ids.iter().map(|id| inserted.contains(id)).collect()))
}

/// The job a tenant submitted with `key`, if any.
pub async fn find_by_idempotency_key(
    pool: &PgPool,
    tenant: &TenantId,
    key: &str,
) -> Result<Option<Job>, StorageError> {
    Ok(find_by_idempotency_keys(pool, tenant, &[key])
        .await?
        .remove(key))
}

/// The jobs a tenant submitted with any of `keys`, by key.
pub async fn find_by_idempotency_keys(
    pool: &PgPool,
    tenant: &TenantId,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, Job>, StorageError> {
    if keys.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE tenant = $1 AND idempotency_key = ANY($2)");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant.as_str())
        .bind(keys)
        .fetch_all(pool)
        .await?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let job = decode(row)?;
        if let Some(key) = job.spec().idempotency_key.clone() {
            found.insert(key, job);
        }
    }
    Ok(found)
}

/// The trace context stored with each of `ids` at submission (see [`insert`]);
/// jobs without one, or unknown, are absent from the answer.
pub async fn trace_contexts(
    conn: impl sqlx::PgExecutor<'_>,
    ids: &[JobId],
) -> Result<std::collections::HashMap<JobId, hodei_messaging::TraceHeaders>, StorageError> {
    if ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let rows: Vec<(Uuid, sqlx::types::Json<hodei_messaging::TraceHeaders>)> = sqlx::query_as(
        "SELECT id, trace_context FROM jobs WHERE id = ANY($1) AND trace_context <> '{}'",
    )
    .bind(&uuids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, json)| (JobId::from_uuid(id), json.0))
        .collect())
}

/// One job, if it exists.
pub async fn get(conn: impl sqlx::PgExecutor<'_>, id: JobId) -> Result<Option<Job>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// The jobs among `ids` that exist, by id: one statement for a batch.
pub async fn get_many(
    conn: impl sqlx::PgExecutor<'_>,
    ids: &[JobId],
) -> Result<HashMap<JobId, Job>, StorageError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ANY($1)");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&uuids)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| decode(row).map(|job| (job.id(), job)))
        .collect()
}

/// [`save`] for many jobs in one statement: each job (with the version it was read at) is
/// saved only if it is still at that version, `events` (already applied to them) are appended
/// and `messages` are queued in the outbox, handed to the caller's relay once committed (see
/// [`crate::outbox::append_direct`]). If any job moved meanwhile, returns `Conflict`: the
/// caller's transaction must then be rolled back, as some jobs were saved. Returns the pipeline
/// run of each saved job that is a step of one: moving those runs is the caller's business.
pub async fn save_many(
    conn: &mut PgConnection,
    changes: &[(&Job, u64)],
    events: &[&JobEvent],
    messages: &[&hodei_messaging::Outgoing],
) -> Result<Vec<(JobId, PipelineRunId)>, StorageError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let n = changes.len();
    let mut ids = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut current = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    let mut cancels = Vec::with_capacity(n);
    let mut preemptions = Vec::with_capacity(n);
    let mut not_befores = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut exit_codes = Vec::with_capacity(n);
    let mut updated = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    for (job, version) in changes {
        ids.push(job.id().as_uuid());
        expected.push(to_i64(*version));
        states.push(job.state().as_str());
        attempts.push(encode("job attempts", &job.attempts())?);
        current.push(i64::from(job.current_attempt().get()));
        workers.push(job.current_attempt_record().map(|a| a.worker_id.as_str()));
        cancels.push(job.cancel_requested());
        preemptions.push(job.preempted_by().map(|id| id.as_uuid()));
        not_befores.push(job.not_before());
        reasons.push(job.reason());
        exit_codes.push(job.exit_code());
        updated.push(job.updated_at());
        versions.push(to_i64(job.version()));
    }
    // The search row's copy of the state moves in the same statement (see `list`).
    let mut query = QueryBuilder::new(
        "WITH saved AS (
         UPDATE jobs j SET state = u.state, attempts = u.attempts, current_attempt = u.current_attempt,
                worker_id = u.worker_id, cancel_requested = u.cancel_requested,
                not_before = u.not_before, reason = u.reason, exit_code = u.exit_code,
                updated_at = u.updated_at, version = u.version, preempted_by = u.preempted_by
         FROM ",
    );
    Unnest::new(&mut query)
        .column(&ids, "uuid")
        .column(&expected, "bigint")
        .column(&states, "text")
        .column(&attempts, "jsonb")
        .column(&current, "bigint")
        .column(&workers, "text")
        .column(&cancels, "bool")
        .column(&not_befores, "timestamptz")
        .column(&reasons, "text")
        .column(&exit_codes, "int")
        .column(&updated, "timestamptz")
        .column(&versions, "bigint")
        .column(&preemptions, "uuid")
        .alias(
            "u(id, expected, state, attempts, current_attempt, worker_id, cancel_requested,
               not_before, reason, exit_code, updated_at, version, preempted_by)",
        );
    query.push(
        "
         WHERE j.id = u.id AND j.version = u.expected
         RETURNING j.id, j.state, j.pipeline_run_id),
         searched AS (
         UPDATE job_search s SET state = saved.state FROM saved
         WHERE s.job_id = saved.id AND s.state <> saved.state)",
    );
    // With the saves: should a job not be saved, the caller rolls all of it back.
    if !events.is_empty() {
        query.push(", events AS (");
        event_store::push_insert(
            &mut query,
            EventTable::Jobs,
            events.iter().map(|e| stored(e)),
            // A job that moved meanwhile gets none: the count below reports the conflict.
            Some("saved"),
        )?;
        query.push(")");
    }
    if !messages.is_empty() {
        query.push(", outbox AS (");
        crate::outbox::push_insert(&mut query, messages, true, None)?;
        query.push(")");
    }
    query.push(" SELECT id, pipeline_run_id FROM saved");
    let saved: Vec<(Uuid, Option<Uuid>)> = query.build_query_as().fetch_all(&mut *conn).await?;
    if saved.len() != n {
        return Err(StorageError::Conflict {
            what: format!("{} of {n} jobs saved together", n - saved.len()),
        });
    }
    let tails: Vec<Uuid> = events
        .iter()
        .filter(|e| !e.output_tail.is_empty())
        .map(|e| e.job_id.as_uuid())
        .collect();
    refresh_search(conn, &tails).await?;
    Ok(saved
        .into_iter()
        .filter_map(|(id, run)| {
            run.map(|run| (JobId::from_uuid(id), PipelineRunId::from_uuid(run)))
        })
        .collect())
}

/// Saves a job changed by `events` (already applied to it) if it is still at
/// `expected_version`; otherwise returns `Conflict` and changes nothing. Returns the pipeline
/// run the job is a step of, if any: moving that run is the caller's business (see
/// [`crate::driver::save_job`]).
pub async fn save(
    conn: &mut PgConnection,
    job: &Job,
    expected_version: u64,
    events: &[JobEvent],
) -> Result<Option<PipelineRunId>, StorageError> {
    let current = job.current_attempt_record();
    // The search row's copy of the state moves in the same statement (see `list`).
    let updated: Option<(Option<Uuid>,)> = sqlx::query_as(
        "WITH saved AS (
         UPDATE jobs SET state = $3, attempts = $4, current_attempt = $5, worker_id = $6,
                cancel_requested = $7, not_before = $8, reason = $9, exit_code = $10,
                updated_at = $11, version = $12, preempted_by = $13
         WHERE id = $1 AND version = $2
         RETURNING id, state, pipeline_run_id),
         searched AS (
         UPDATE job_search s SET state = saved.state FROM saved
         WHERE s.job_id = saved.id AND s.state <> saved.state)
         SELECT pipeline_run_id FROM saved",
    )
    .bind(job.id().as_uuid())
    .bind(to_i64(expected_version))
    .bind(job.state().as_str())
    .bind(encode("job attempts", &job.attempts())?)
    .bind(i64::from(job.current_attempt().get()))
    .bind(current.map(|a| a.worker_id.as_str()))
    .bind(job.cancel_requested())
    .bind(job.not_before())
    .bind(job.reason())
    .bind(job.exit_code())
    .bind(job.updated_at())
    .bind(to_i64(job.version()))
    .bind(job.preempted_by().map(|id| id.as_uuid()))
    .fetch_optional(&mut *conn)
    .await?;
    let Some((run,)) = updated else {
        return Err(StorageError::Conflict {
            what: format!("job {} at version {expected_version}", job.id()),
        });
    };
    if events.iter().any(|e| !e.output_tail.is_empty()) {
        refresh_search(conn, &[job.id().as_uuid()]).await?;
    }
    append_events(conn, events.iter()).await?;
    Ok(run.map(PipelineRunId::from_uuid))
}

/// Recomputes the search vector of `ids` from their saved rows: after an attempt ended with
/// an output tail (the name, labels and command never change).
async fn refresh_search(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), StorageError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE job_search s
         SET search = hodei_job_search(j.name, j.labels, j.spec, j.attempts -> -1 -> 'output_tail')
         FROM jobs j WHERE j.id = ANY($1) AND s.job_id = j.id",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

async fn append_events<'e>(
    conn: &mut PgConnection,
    events: impl ExactSizeIterator<Item = &'e JobEvent>,
) -> Result<(), StorageError> {
    event_store::append(conn, EventTable::Jobs, events.map(stored)).await
}

/// What the event table keeps of a job event.
fn stored(e: &JobEvent) -> Stored<'_, JobEvent> {
    Stored {
        aggregate: e.job_id.as_uuid(),
        seq: e.seq,
        event_id: e.event_id,
        kind: e.kind.name(),
        at: e.at,
        event: e,
    }
}

/// A job's events with `seq >= from_seq`, in order.
pub async fn events(
    pool: &PgPool,
    id: JobId,
    from_seq: u64,
) -> Result<Vec<JobEvent>, StorageError> {
    history(pool, id, EventRange::from(from_seq)).await
}

/// A job's events within `range`, in order.
pub async fn history(
    pool: &PgPool,
    id: JobId,
    range: EventRange,
) -> Result<Vec<JobEvent>, StorageError> {
    event_store::read(pool, EventTable::Jobs, id.as_uuid(), range).await
}

/// The events of each of `ids` (all of them, or those recorded at or before `until`), in
/// order, by job: to fold jobs, as they stand or as they stood at a moment.
pub async fn histories(
    conn: impl sqlx::PgExecutor<'_>,
    ids: &[JobId],
    until: Option<DateTime<Utc>>,
) -> Result<HashMap<JobId, Vec<JobEvent>>, StorageError> {
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let rows = event_store::read_many(conn, EventTable::Jobs, &uuids, until).await?;
    Ok(rows
        .into_iter()
        .map(|(id, events)| (JobId::from_uuid(id), events))
        .collect())
}

/// Filters for [`list_events`]: events recorded in `[from, to)`, oldest first.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Any of these event types (`submitted`, `started`, …); empty for all.
    pub types: Vec<String>,
    pub tenant: Option<TenantId>,
    /// Events of jobs carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
    /// Keyset cursor: only events after this one (its time and event id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: u32,
}

/// One event of [`list_events`], with what the reader needs besides it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedEvent {
    pub event: JobEvent,
    pub tenant: TenantId,
    /// For `cancel_requested`: whether the attempt it stops had started (the job's state is
    /// then `running`, else `assigned`). False for other events.
    pub attempt_started: bool,
}

/// Events across jobs matching `filter`, oldest first (by time, then event id).
pub async fn list_events(
    pool: &PgPool,
    filter: &EventFilter,
) -> Result<Vec<ListedEvent>, StorageError> {
    let rows = list_events_query("", filter)?
        .build()
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            let (_, r) = RowReader::with_id::<Uuid>("job_events", row)?;
            Ok(ListedEvent {
                event: r.json("data")?,
                tenant: r.parse("tenant")?,
                attempt_started: r.get("attempt_started")?,
            })
        })
        .collect()
}

/// The plan of [`list_events`] for `filter`, executed, one line per row.
pub async fn explain_list_events(
    pool: &PgPool,
    filter: &EventFilter,
) -> Result<Vec<String>, StorageError> {
    let mut query = list_events_query("EXPLAIN (ANALYZE, BUFFERS) ", filter)?;
    Ok(query.build_query_scalar().fetch_all(pool).await?)
}

fn list_events_query(
    prefix: &str,
    filter: &EventFilter,
) -> Result<sqlx::QueryBuilder<sqlx::Postgres>, StorageError> {
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "{prefix}SELECT e.job_id AS id, e.data, j.tenant,
                COALESCE(e.type IN ('cancel_requested', 'preempt_requested') AND (
                    SELECT p.type FROM job_events p
                    WHERE p.job_id = e.job_id AND p.seq < e.seq
                      AND p.type NOT IN ('cancel_requested', 'preempt_requested')
                    ORDER BY p.seq DESC LIMIT 1) = 'started', false) AS attempt_started
         FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE true"
    ));
    if let Some(from) = filter.from {
        query.push(" AND e.at >= ").push_bind(from);
    }
    if let Some(to) = filter.to {
        query.push(" AND e.at < ").push_bind(to);
    }
    match filter.types.as_slice() {
        [] => {}
        [one] => {
            query.push(" AND e.type = ").push_bind(one.clone());
        }
        many => {
            query
                .push(" AND e.type = ANY(")
                .push_bind(many.to_vec())
                .push(")");
        }
    }
    if let Some(tenant) = &filter.tenant {
        query
            .push(" AND j.tenant = ")
            .push_bind(tenant.as_str().to_owned());
    }
    if !filter.labels.is_empty() {
        query
            .push(" AND j.labels @> ")
            .push_bind(encode("label filter", &filter.labels)?);
    }
    if let Some((at, event_id)) = filter.after {
        query
            .push(" AND (e.at, e.event_id) > (")
            .push_bind(at)
            .push(", ")
            .push_bind(event_id)
            .push(")");
    }
    query
        .push(" ORDER BY e.at, e.event_id LIMIT ")
        .push_bind(i64::from(filter.limit));
    Ok(query)
}

/// Filters for [`list`].
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this tenant's jobs; none: every tenant's.
    pub tenant: Option<TenantId>,
    pub states: Vec<JobState>,
    pub name_prefix: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Words to match against the job's name, labels, command and latest output tail (see
    /// [`crate::sql::tsquery`]): `a b` both, `"a b"` the phrase, `a or b`, `-a` not.
    pub search: Option<String>,
    /// Keyset cursor: only jobs older than this one.
    pub before: Option<JobId>,
    pub limit: u32,
}

/// Jobs matching `filter`, newest first.
pub async fn list<'c>(
    conn: impl sqlx::Acquire<'c, Database = sqlx::Postgres>,
    filter: &JobFilter,
) -> Result<Vec<Job>, StorageError> {
    let mut conn = conn.acquire().await?;
    let search = search_plan(&mut conn, filter).await?;
    let rows = list_query("", filter, &search)?
        .build()
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(decode).collect()
}

/// The plan PostgreSQL runs [`list`] with for `filter`, executed (`EXPLAIN (ANALYZE, BUFFERS)`),
/// one line per row: to check which index a listing uses.
pub async fn explain_list(pool: &PgPool, filter: &JobFilter) -> Result<Vec<String>, StorageError> {
    let mut conn = pool.acquire().await?;
    let search = search_plan(&mut conn, filter).await?;
    let mut query = list_query("EXPLAIN (ANALYZE, BUFFERS) ", filter, &search)?;
    Ok(query.build_query_scalar().fetch_all(&mut *conn).await?)
}

/// Searches matching at most this many jobs (by the planner's estimate) are read from the
/// GIN index first; more common ones walk the jobs newest first and stop at a page.
const INDEX_FIRST_MAX_MATCHES: f64 = 5_000.0;

/// How a listing applies its search words.
enum SearchPlan {
    None,
    /// Nothing can match (the words hold no token).
    Nothing,
    /// Match ids from the GIN index, then their jobs: cost bounded by the matches.
    IndexFirst(String),
    /// Left to the planner, which walks the jobs in id order checking each against the
    /// words when it expects a page to fill fast: right for common words.
    Planner(String),
}

/// Chooses how `filter`'s search runs. The planner alone walks the primary key for a word it
/// expects in 1 job of 500, stopping after ~50 × 500 rows, which is right when matches are
/// spread evenly, but when none of them has the filter's state (a word and a state that never
/// go together) the walk reads every job: 300+ ms at 1M jobs. So the planner's estimate of
/// the matches is asked for first (planning only, no execution), and words with few matches
/// always start from the index. Its estimates from the most-common-element statistics err
/// towards rare for words not in them, which are rare.
async fn search_plan(
    conn: &mut PgConnection,
    filter: &JobFilter,
) -> Result<SearchPlan, StorageError> {
    let Some(words) = filter.search.as_deref().filter(|w| !w.trim().is_empty()) else {
        return Ok(SearchPlan::None);
    };
    let Some(tsquery) = crate::sql::tsquery(words) else {
        return Ok(SearchPlan::Nothing);
    };
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) SELECT job_id FROM job_search WHERE search @@ $1::tsquery",
    )
    .bind(&tsquery)
    .fetch_one(&mut *conn)
    .await?;
    let estimate = plan
        .pointer("/0/Plan/Plan Rows")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(f64::MAX);
    Ok(if estimate <= INDEX_FIRST_MAX_MATCHES {
        SearchPlan::IndexFirst(tsquery)
    } else {
        SearchPlan::Planner(tsquery)
    })
}

/// The statement of [`list`], after `prefix`. Only the filters given become conditions, so the
/// planner sees `state = $1` and can walk `jobs_state_id (state, id DESC)` for a page by state
/// instead of the whole primary key.
fn list_query(
    prefix: &str,
    filter: &JobFilter,
    search: &SearchPlan,
) -> Result<sqlx::QueryBuilder<sqlx::Postgres>, StorageError> {
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "{prefix}SELECT {COLUMNS} FROM jobs WHERE true"
    ));
    if let Some(tenant) = &filter.tenant {
        query
            .push(" AND tenant = ")
            .push_bind(tenant.as_str().to_owned());
    }
    push_states(&mut query, &filter.states);
    if let Some(name) = filter.name_prefix.as_deref().filter(|p| !p.is_empty()) {
        query.push(" AND name LIKE ").push_bind(like_prefix(name));
    }
    if !filter.labels.is_empty() {
        query
            .push(" AND labels @> ")
            .push_bind(encode("label filter", &filter.labels)?);
    }
    match search {
        SearchPlan::None => {}
        SearchPlan::Nothing => {
            query.push(" AND false");
        }
        // The matches as an array computed once (an InitPlan): the jobs are then fetched by
        // primary key, whatever order the planner would have liked to walk them in. Matches
        // in other states are dropped by the search rows' copy of the state, read in the same
        // heap visit that gives their ids.
        SearchPlan::IndexFirst(tsquery) => {
            query
                .push(" AND id = ANY(ARRAY(SELECT job_id FROM job_search WHERE search @@ ")
                .push_bind(tsquery.clone())
                .push("::tsquery");
            push_states(&mut query, &filter.states);
            query.push("))");
        }
        SearchPlan::Planner(tsquery) => {
            query
                .push(" AND id IN (SELECT job_id FROM job_search WHERE search @@ ")
                .push_bind(tsquery.clone())
                .push("::tsquery)");
        }
    }
    if let Some(before) = filter.before {
        query.push(" AND id < ").push_bind(before.as_uuid());
    }
    query
        .push(" ORDER BY id DESC LIMIT ")
        .push_bind(i64::from(filter.limit));
    Ok(query)
}

/// ` AND state = …` for `states`, if any (a single state as `=`, so the planner can walk
/// `jobs_state_id`).
fn push_states(query: &mut sqlx::QueryBuilder<sqlx::Postgres>, states: &[JobState]) {
    match states {
        [] => {}
        [one] => {
            query.push(" AND state = ").push_bind(one.as_str());
        }
        many => {
            let states: Vec<&str> = many.iter().map(JobState::as_str).collect();
            query.push(" AND state = ANY(").push_bind(states).push(")");
        }
    }
}

/// Queued jobs whose next step is overdue: not placed `older_than` after they were queued.
pub async fn overdue_queued(
    pool: &PgPool,
    older_than: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Job>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM jobs WHERE state = 'queued' AND updated_at < $1
           AND (not_before IS NULL OR not_before < $1)
         ORDER BY priority DESC, id LIMIT $2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(older_than)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// Those of `waiting` for which a preemption is under way: some job on a worker is being
/// stopped for them.
pub async fn preempting_for(
    conn: impl sqlx::PgExecutor<'_>,
    waiting: &[JobId],
) -> Result<std::collections::HashSet<JobId>, StorageError> {
    let ids: Vec<Uuid> = waiting.iter().map(JobId::as_uuid).collect();
    let found: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT preempted_by FROM jobs
         WHERE preempted_by = ANY($1) AND state IN ('assigned', 'running')",
    )
    .bind(&ids)
    .fetch_all(conn)
    .await?;
    Ok(found.into_iter().map(JobId::from_uuid).collect())
}

/// Running jobs that may be preempted for a job of priority `above`: marked preemptible, of a
/// lower priority as their tenant's policy counts it (their own, or the tenant's
/// `max_priority` if lower), not being cancelled or preempted already (an attempt not started
/// yet is left alone: its agent may not have it, and would ignore the stop); the lowest
/// priority first, the youngest first among equals. At most `limit`.
pub async fn preemptible_on_workers(
    conn: impl sqlx::PgExecutor<'_>,
    above: i32,
    limit: i64,
) -> Result<Vec<Job>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM (
             SELECT j.*, LEAST(j.priority, p.max_priority) AS counted
             FROM jobs j LEFT JOIN tenant_policies p ON p.tenant = j.tenant
             WHERE j.state = 'running' AND NOT j.cancel_requested AND j.preempted_by IS NULL
               AND (j.spec->>'preemptible')::boolean IS TRUE) jobs
         WHERE counted < $1
         ORDER BY counted, id DESC LIMIT $2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(above)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode).collect()
}

/// The head of each tenant's queue: its `per_tenant` placeable queued jobs (backoff over by
/// `now`) of the highest priority, oldest first. One index walk per tenant with queued jobs
/// (`jobs_queued_by_tenant`, the tenants found by skipping through it), so the queue's length
/// does not matter.
pub async fn queued_heads(
    conn: impl sqlx::PgExecutor<'_>,
    per_tenant: i64,
    now: DateTime<Utc>,
) -> Result<Vec<Job>, StorageError> {
    let sql = format!(
        "WITH RECURSIVE t(tenant) AS (
             (SELECT tenant FROM jobs WHERE state = 'queued' ORDER BY tenant LIMIT 1)
             UNION ALL
             SELECT (SELECT j.tenant FROM jobs j WHERE j.state = 'queued' AND j.tenant > t.tenant
                     ORDER BY j.tenant LIMIT 1)
             FROM t WHERE t.tenant IS NOT NULL)
         SELECT h.* FROM t CROSS JOIN LATERAL (
             SELECT {COLUMNS} FROM jobs
             WHERE state = 'queued' AND tenant = t.tenant AND (not_before IS NULL OR not_before <= $1)
             ORDER BY priority DESC, id LIMIT $2) h
         WHERE t.tenant IS NOT NULL"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(per_tenant)
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode).collect()
}

fn decode(row: &PgRow) -> Result<Job, StorageError> {
    let (id, r) = RowReader::with_id::<Uuid>("jobs", row)?;
    Ok(Job::restore(
        JobId::from_uuid(id),
        r.parse("tenant")?,
        r.json("spec")?,
        r.parse("state")?,
        r.json("attempts")?,
        r.get("cancel_requested")?,
        r.get("not_before")?,
        r.get("reason")?,
        r.get("created_at")?,
        r.get("updated_at")?,
        r.unsigned("version")?,
    )
    .with_pending_preemption(r.get::<Option<Uuid>>("preempted_by")?.map(JobId::from_uuid)))
}

/// Records why a queued job is still waiting (not an event: it changes often). Does nothing
/// if the job is no longer queued.
pub async fn set_pending_reason(
    pool: &PgPool,
    id: JobId,
    reason: &str,
) -> Result<(), StorageError> {
    sqlx::query("UPDATE jobs SET reason = $2 WHERE id = $1 AND state = 'queued' AND reason IS DISTINCT FROM $2")
        .bind(id.as_uuid())
        .bind(reason)
        .execute(pool)
        .await?;
    Ok(())
}

/// [`set_pending_reason`] for many jobs in one statement, inside the caller's transaction.
pub async fn set_pending_reasons(
    conn: &mut PgConnection,
    reasons: &[(JobId, String)],
) -> Result<(), StorageError> {
    if reasons.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = reasons.iter().map(|(id, _)| id.as_uuid()).collect();
    let texts: Vec<&str> = reasons.iter().map(|(_, r)| r.as_str()).collect();
    sqlx::query(
        "UPDATE jobs j SET reason = u.reason
         FROM unnest($1::uuid[], $2::text[]) AS u(id, reason)
         WHERE j.id = u.id AND j.state = 'queued' AND j.reason IS DISTINCT FROM u.reason",
    )
    .bind(&ids)
    .bind(&texts)
    .execute(conn)
    .await?;
    Ok(())
}

/// Jobs on a worker whose next step is overdue: assigned but not started within
/// `start_within` (`fetching_within` for a job that first fetches artifacts of earlier
/// pipeline steps), or running for longer than their own timeout plus `grace`.
pub async fn overdue_on_workers(
    pool: &PgPool,
    start_within: std::time::Duration,
    fetching_within: std::time::Duration,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<Job>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM jobs
         WHERE (state = 'assigned' AND updated_at < now() - make_interval(secs =>
                    CASE WHEN spec->'artifacts'->'consume' IS NULL THEN $1 ELSE $4 END))
            OR (state = 'running'
                AND updated_at < now() - make_interval(secs => (spec->>'timeout_secs')::double precision + $2))
         ORDER BY updated_at LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(start_within.as_secs_f64())
        .bind(grace.as_secs_f64())
        .bind(limit)
        .bind(fetching_within.as_secs_f64())
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// The queued jobs of pipeline runs `runs`.
pub async fn queued_of_runs(
    conn: impl sqlx::PgExecutor<'_>,
    runs: &[PipelineRunId],
) -> Result<Vec<JobId>, StorageError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let runs: Vec<Uuid> = runs.iter().map(PipelineRunId::as_uuid).collect();
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE pipeline_run_id = ANY($1) AND state = 'queued'",
    )
    .bind(&runs)
    .fetch_all(conn)
    .await?;
    Ok(ids.into_iter().map(JobId::from_uuid).collect())
}

/// Where each of `ids` stands now: state, current attempt and the worker of that attempt.
/// Unknown ids are absent from the answer.
pub async fn current_attempts(
    conn: &mut PgConnection,
    ids: &[JobId],
) -> Result<
    std::collections::HashMap<JobId, (JobState, hodei_domain::AttemptNumber, Option<String>)>,
    StorageError,
> {
    if ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let uuids: Vec<Uuid> = ids.iter().map(JobId::as_uuid).collect();
    let rows: Vec<(Uuid, String, i32, Option<String>)> =
        sqlx::query_as("SELECT id, state, current_attempt, worker_id FROM jobs WHERE id = ANY($1)")
            .bind(&uuids)
            .fetch_all(conn)
            .await?;
    rows.into_iter()
        .map(|(id, state, attempt, worker)| {
            let corrupt = |column: &'static str, reason: String| StorageError::Corrupt {
                table: "jobs",
                id: id.to_string(),
                column,
                reason,
            };
            let state: JobState = state
                .parse()
                .map_err(|e: hodei_domain::IdError| corrupt("state", e.to_string()))?;
            let attempt = u32::try_from(attempt)
                .map_err(|_| corrupt("current_attempt", format!("negative value {attempt}")))?;
            Ok((
                JobId::from_uuid(id),
                (state, hodei_domain::AttemptNumber::new(attempt), worker),
            ))
        })
        .collect()
}

/// How many jobs wait in the queue.
pub async fn queued_count(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'queued'")
            .fetch_one(pool)
            .await?,
    )
}

/// How many jobs stand in each state, of one tenant or of every tenant; states with none are
/// left out.
pub async fn count_by_state(
    pool: &PgPool,
    tenant: Option<&TenantId>,
) -> Result<Vec<(JobState, i64)>, StorageError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM jobs WHERE ($1::text IS NULL OR tenant = $1) GROUP BY state",
    )
    .bind(tenant.map(TenantId::as_str))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(state, count)| {
            let parsed =
                state
                    .parse()
                    .map_err(|e: hodei_domain::IdError| StorageError::Corrupt {
                        table: "jobs",
                        id: format!("state {state}"),
                        column: "state",
                        reason: e.to_string(),
                    })?;
            Ok((parsed, count))
        })
        .collect()
}

/// How many jobs ended (succeeded, failed, timed out or were cancelled) in each minute since
/// `since`, of one tenant or of every tenant, oldest minute first; minutes with none are left
/// out. Read from the job events by their time.
pub async fn ended_per_minute(
    pool: &PgPool,
    tenant: Option<&TenantId>,
    since: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, i64)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT date_trunc('minute', e.at) AS minute, count(*) \
         FROM job_events e \
         WHERE e.at >= $1 \
           AND e.type IN ('succeeded', 'failed', 'timed_out', 'cancelled') \
           AND ($2::text IS NULL OR EXISTS \
                (SELECT 1 FROM jobs j WHERE j.id = e.job_id AND j.tenant = $2)) \
         GROUP BY minute ORDER BY minute",
    )
    .bind(since)
    .bind(tenant.map(TenantId::as_str))
    .fetch_all(pool)
    .await?)
}
