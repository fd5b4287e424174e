//! The units of work that change more than one aggregate in one transaction, above the data
//! access modules ([`crate::jobs`], [`crate::pipelines`], [`crate::workers`],
//! [`crate::outbox`]), which know nothing of each other.
//!
//! It owns the driving of pipeline runs: a run moves in the transaction that moves one of its
//! step jobs. [`save_job`] and [`cancel_job`] call [`on_step_job`] when a step's job starts or
//! ends, which locks the run's row, lets the aggregate decide, creates the jobs of the steps it
//! releases, cancels the ones it stops and saves the run, all before the job's own change
//! commits. A step's end and its dependants' release are therefore one atomic change: no
//! message can be lost between them, and a crash of any service leaves either both or neither.

use std::borrow::Cow;
use std::collections::VecDeque;

use chrono::Utc;
use hodei_domain::{
    AttemptId, Effects, Job, JobEvent, JobEventKind, JobId, JobSpec, PipelineEvent, PipelineRun,
    PipelineRunId, WorkerId,
};
use hodei_messaging::{AgentCommand, Outgoing, PlaceJob};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;

use crate::error::StorageError;
use crate::{jobs, outbox, pipelines, schedules, workers};

/// The source of what a step job's start or end makes the run do (the saver of the job does
/// not say which service it is).
const DRIVER: &str = "hodei/pipelines";

/// What a job submission did.
#[derive(Debug)]
pub enum JobSubmitted {
    /// The job was recorded.
    Created(Job),
    /// A job with the same idempotency key existed; it is returned unchanged.
    Existing(Job),
    /// Nothing was recorded: the tenant is at a queue quota (the reason names it).
    OverQuota(String),
}

/// What [`submit_jobs`] did with one submission.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// The job was recorded.
    New,
    /// Its tenant had used its idempotency key: the job already recorded.
    Existing(Box<Job>),
    /// Not recorded: its tenant is at its queue quota; the reason names the quota.
    OverQuota(String),
}

/// Records a new job, its first event and `messages` in one transaction. With an idempotency
/// key already used by the tenant, records nothing and returns the existing job. The trace
/// context of the current span (the submission's) is stored with the job, for the steps
/// later taken on it without a message to continue (see [`jobs::trace_contexts`]).
pub async fn submit_job(
    pool: &PgPool,
    job: &Job,
    event: &JobEvent,
    messages: &[Outgoing],
) -> Result<JobSubmitted, StorageError> {
    let mut tx = pool.begin().await?;
    if !start_job(&mut tx, job, event, messages).await? {
        tx.rollback().await?;
        let key = job.spec().idempotency_key.as_deref().unwrap_or_default();
        return match jobs::find_by_idempotency_key(pool, job.tenant(), key).await? {
            Some(existing) => Ok(JobSubmitted::Existing(existing)),
            None => Err(StorageError::Conflict {
                what: format!("job with idempotency key {key}"),
            }),
        };
    }
    tx.commit().await?;
    Ok(JobSubmitted::Created(job.clone()))
}

/// A submission for [`submit_jobs`]: the job, its first event, the messages to queue with it
/// and the trace context of the submission.
#[derive(Debug, Clone)]
pub struct Submission {
    pub job: Job,
    pub event: JobEvent,
    pub messages: Vec<Outgoing>,
    pub trace: hodei_messaging::TraceHeaders,
    /// The audit log's entry for the submission, recorded with the job (not for a
    /// resubmission that finds the job its idempotency key made).
    pub audit: Option<crate::access::AuditEntry>,
}

impl Submission {
    /// The job as [`jobs::insert_many`] writes it; the caller hands its messages to its relay
    /// once committed.
    fn new_job(&self) -> jobs::NewJob<'_> {
        jobs::NewJob {
            job: &self.job,
            event: &self.event,
            trace: &self.trace,
            messages: &self.messages,
            audit: self.audit.as_ref(),
        }
    }
}

/// [`submit_job`] for many jobs in one transaction (group commit): each job is recorded with
/// its event and messages, unless its tenant already used its idempotency key or is at its
/// queue quota (`max_queued_jobs`, counted in the transaction with the tenant's policy locked,
/// so concurrent submissions cannot pass it together). A batch none of whose tenants sets a
/// queue quota is a single statement, its own transaction (which writes nothing if it finds a
/// quota set). A job already stored by an earlier attempt of the same submission is answered
/// as `Existing`. Answers in the order of `submissions`.
pub async fn submit_jobs(
    pool: &PgPool,
    submissions: &[Submission],
) -> Result<Vec<Recorded>, StorageError> {
    submit(pool, submissions, false).await
}

/// [`submit_jobs`] for the jobs of one request, recorded all together or not at all: if the
/// queue quota of a tenant would refuse any of them, none is recorded and each is answered
/// `OverQuota` with the reason of the first refused. Jobs whose idempotency key their tenant
/// used already are answered `Existing`, the others recorded.
pub async fn submit_jobs_together(
    pool: &PgPool,
    submissions: &[Submission],
) -> Result<Vec<Recorded>, StorageError> {
    submit(pool, submissions, true).await
}

async fn submit(
    pool: &PgPool,
    submissions: &[Submission],
    together: bool,
) -> Result<Vec<Recorded>, StorageError> {
    // Most tenants set no queue quota: a batch whose tenants have none is one statement.
    let all: Vec<jobs::NewJob<'_>> = submissions.iter().map(Submission::new_job).collect();
    let unlimited = jobs::insert_many_unless_queue_quota(&mut *pool.acquire().await?, &all).await?;
    let (inserted, refused) = match unlimited {
        Some(inserted) => (inserted, vec![None; submissions.len()]),
        None => {
            let mut tx = pool.begin().await?;
            let refused = queue_quota_holds(&mut tx, submissions).await?;
            if together && let Some(reason) = refused.iter().flatten().next().cloned() {
                // Rolled back now, so that the policies' locks go with the answer.
                tx.rollback().await?;
                return Ok(vec![Recorded::OverQuota(reason); submissions.len()]);
            }
            let let_in: Vec<jobs::NewJob<'_>> = submissions
                .iter()
                .zip(&refused)
                .filter(|(_, refused)| refused.is_none())
                .map(|(s, _)| s.new_job())
                .collect();
            let mut inserted_new = jobs::insert_many(&mut tx, &let_in).await?.into_iter();
            let inserted: Vec<bool> = refused
                .iter()
                .map(|r| r.is_none() && inserted_new.next().unwrap_or(false))
                .collect();
            tx.commit().await?;
            (inserted, refused)
        }
    };
    let mut answers = Vec::with_capacity(submissions.len());
    for ((s, inserted), refused) in submissions.iter().zip(inserted).zip(refused) {
        if inserted {
            answers.push(Recorded::New);
            continue;
        }
        let key = s.job.spec().idempotency_key.as_deref();
        let mut existing = match key {
            Some(key) => jobs::find_by_idempotency_key(pool, s.job.tenant(), key).await?,
            None => None,
        };
        // A batch can commit after its caller stopped waiting for it; submitted again (the
        // gateway retries a failed batch job by job), its jobs are found as they were stored.
        if existing.is_none() && refused.is_none() {
            existing = jobs::get(pool, s.job.id()).await?;
        }
        match (existing, refused) {
            (Some(existing), _) => answers.push(Recorded::Existing(Box::new(existing))),
            (None, Some(reason)) => answers.push(Recorded::OverQuota(reason)),
            (None, None) => {
                return Err(StorageError::Conflict {
                    what: format!("job with idempotency key {}", key.unwrap_or_default()),
                });
            }
        }
    }
    Ok(answers)
}

/// For each submission, the reason it is refused when its tenant is at its queue quota: the
/// tenants' policies are locked and their queued jobs counted, each submission counted as it
/// is let in.
async fn queue_quota_holds(
    tx: &mut PgConnection,
    submissions: &[Submission],
) -> Result<Vec<Option<String>>, StorageError> {
    let mut tenants: Vec<&hodei_domain::TenantId> =
        submissions.iter().map(|s| s.job.tenant()).collect();
    tenants.sort();
    tenants.dedup();
    let policies =
        crate::tenants::lock_policies(tx, &tenants, crate::tenants::Limits::Queued).await?;
    if policies.is_empty() {
        return Ok(vec![None; submissions.len()]);
    }
    let limited: Vec<&hodei_domain::TenantId> = policies.keys().collect();
    let mut queued = crate::tenants::queued(&mut *tx, Some(&limited), &[]).await?;
    Ok(submissions
        .iter()
        .map(|s| {
            let tenant = s.job.tenant();
            let policy = policies.get(tenant)?;
            let count = queued.entry(tenant.clone()).or_default();
            match policy.queue_hold(*count) {
                Some(hold) => Some(hold.reason(tenant)),
                None => {
                    *count += 1;
                    None
                }
            }
        })
        .collect())
}

/// The reason a schedule's tick is held when `tenant` is at its queue quota (its policy row
/// locked, as a submission locks it, and its queued jobs but `except` counted); `None` when it
/// has room or sets no queue quota.
async fn tenant_queue_hold(
    conn: &mut PgConnection,
    tenant: &hodei_domain::TenantId,
    except: &[JobId],
) -> Result<Option<String>, StorageError> {
    let policies =
        crate::tenants::lock_policies(conn, &[tenant], crate::tenants::Limits::Queued).await?;
    let Some(policy) = policies.get(tenant) else {
        return Ok(None);
    };
    let queued = crate::tenants::queued(&mut *conn, Some(&[tenant]), except).await?;
    let count = queued.get(tenant).copied().unwrap_or_default();
    Ok(policy.queue_hold(count).map(|hold| hold.reason(tenant)))
}

/// Saves a job changed by `events` (already applied to it) if it is still at
/// `expected_version`; otherwise returns `Conflict` and changes nothing. When the job is a
/// pipeline step and `events` start or end it, its run is moved on in the same transaction.
pub async fn save_job(
    conn: &mut PgConnection,
    job: &Job,
    expected_version: u64,
    events: &[JobEvent],
) -> Result<(), StorageError> {
    if let Some(run) = jobs::save(conn, job, expected_version, events).await? {
        on_step_job(conn, run, job, events).await?;
    }
    Ok(())
}

/// Records one transition of a job inside the caller's transaction: saves the job (at
/// `expected_version`, moving its pipeline run), queues its event for publishing (from
/// `source`), asks for placement again if the job was requeued, and frees the slot `release`
/// names on its worker if the worker still holds it. `extra` messages are queued too.
pub async fn commit_transition(
    conn: &mut PgConnection,
    job: &Job,
    expected_version: u64,
    event: &JobEvent,
    release: Option<(&WorkerId, AttemptId)>,
    extra: Vec<Outgoing>,
    source: &str,
) -> Result<(), StorageError> {
    save_job(conn, job, expected_version, std::slice::from_ref(event)).await?;
    if let Some((worker_id, attempt)) = release
        && let Some(mut worker) = workers::get(&mut *conn, worker_id).await?
    {
        let version = worker.version();
        if worker.release(&attempt).is_ok() {
            workers::save_reservation(conn, &worker, version).await?;
        }
    }
    let mut messages = vec![Outgoing::job_event(event, source)?];
    if let JobEventKind::Requeued { not_before, .. } = &event.kind {
        messages.push(Outgoing::place_job(&PlaceJob {
            job_id: job.id(),
            attempt: job.current_attempt(),
            priority: job.spec().priority,
            not_before: Some(*not_before),
        })?);
    }
    messages.extend(extra);
    outbox::append(conn, &messages).await
}

/// One job's change in a batch for [`commit_transitions`]: the job with `events` already
/// applied, the version it was read at, `extra` messages to queue with its events, and the
/// span of the work that changed it (the messages built here carry its trace context).
#[derive(Debug, Clone)]
pub struct Transition {
    pub job: Job,
    pub expected_version: u64,
    pub events: Vec<JobEvent>,
    pub extra: Vec<Outgoing>,
    pub span: tracing::Span,
}

/// [`commit_transition`] for a batch, inside the caller's transaction, with set-based
/// statements: saves every job at its expected version (moving the pipeline runs of steps
/// that started or ended), frees the slots `releases` names on their workers if the workers
/// still hold them, and queues every event (from `source`) and a placement request for each
/// requeued job. Returns what it wrote. `Conflict` if any job or worker moved meanwhile: the
/// caller rolls back.
pub async fn commit_transitions(
    conn: &mut PgConnection,
    transitions: &[Transition],
    releases: &[(WorkerId, AttemptId)],
    source: &str,
) -> Result<Committed, StorageError> {
    let changes: Vec<(&Job, u64)> = transitions
        .iter()
        .map(|t| (&t.job, t.expected_version))
        .collect();
    let events: Vec<&JobEvent> = transitions.iter().flat_map(|t| &t.events).collect();
    let mut messages: Vec<Cow<'_, Outgoing>> = Vec::with_capacity(events.len() * 2);
    for t in transitions {
        let _entered = t.span.enter();
        for event in &t.events {
            messages.push(Cow::Owned(Outgoing::job_event(event, source)?));
            if let JobEventKind::Requeued { not_before, .. } = &event.kind {
                messages.push(Cow::Owned(Outgoing::place_job(&PlaceJob {
                    job_id: t.job.id(),
                    attempt: t.job.current_attempt(),
                    priority: t.job.spec().priority,
                    not_before: Some(*not_before),
                })?));
            }
        }
        messages.extend(t.extra.iter().map(Cow::Borrowed));
    }
    // Queued with the jobs' saves, and handed to the caller's relay once committed (see
    // `Committed::messages`).
    let queued: Vec<&Outgoing> = messages.iter().map(AsRef::as_ref).collect();
    let runs = jobs::save_many(conn, &changes, &events, &queued).await?;
    let more = !runs.is_empty();
    for (job_id, run) in runs {
        if let Some(t) = transitions.iter().find(|t| t.job.id() == job_id) {
            on_step_job(conn, run, &t.job, &t.events)
                .instrument(t.span.clone())
                .await?;
        }
    }
    let freed = release_slots(conn, releases).await?;
    Ok(Committed {
        freed,
        messages: messages.into_iter().map(Cow::into_owned).collect(),
        more,
    })
}

/// What [`commit_transitions`] wrote.
#[derive(Debug)]
pub struct Committed {
    /// The workers saved with slots freed.
    pub freed: Vec<hodei_domain::Worker>,
    /// The messages it queued in the outbox: hand them to the relay once committed.
    pub messages: Vec<Outgoing>,
    /// Whether it also queued messages that `messages` does not hold (pipeline runs moved):
    /// wake the relay for those.
    pub more: bool,
}

/// Frees each attempt's slot on its worker, if the worker still holds it: every worker is
/// read and saved once. Returns the workers saved.
pub async fn release_slots(
    conn: &mut PgConnection,
    releases: &[(WorkerId, AttemptId)],
) -> Result<Vec<hodei_domain::Worker>, StorageError> {
    if releases.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<&WorkerId> = releases.iter().map(|(w, _)| w).collect();
    ids.sort_unstable();
    ids.dedup();
    // Locked as read: a placement committing on one of them meanwhile waits instead of
    // making this batch conflict.
    let mut found = workers::lock_many(&mut *conn, &ids).await?;
    let versions: Vec<(WorkerId, u64)> = found
        .values()
        .map(|w| (w.id().clone(), w.version()))
        .collect();
    let mut changed = std::collections::BTreeSet::new();
    for (worker_id, attempt) in releases {
        if let Some(worker) = found.get_mut(worker_id)
            && worker.release(attempt).is_ok()
        {
            changed.insert(worker_id);
        }
    }
    let saves: Vec<(&hodei_domain::Worker, u64)> = versions
        .iter()
        .filter(|(id, _)| changed.contains(id))
        .filter_map(|(id, version)| found.get(id).map(|w| (w, *version)))
        .collect();
    workers::save_locked_reservations(conn, &saves).await?;
    Ok(saves.into_iter().map(|(w, _)| w.clone()).collect())
}

/// Saves, inside the caller's transaction, the workers a placement round reserved slots on:
/// each given as the round's copy, the version the copy was read at, and the attempts the
/// round reserved on it. The workers are locked; one still at the version read is saved as
/// the round left it. One that moved meanwhile only by freeing slots (a report recorded
/// between the round's read and its commit, as happens all the time on a small fleet) gets
/// the round's reservations made again on it as it stands (see
/// [`hodei_domain::Worker::rebased_on`]) instead of failing the round. Returns the workers
/// saved. `Conflict` if any moved otherwise: the caller rolls back.
pub async fn reserve_slots(
    conn: &mut PgConnection,
    reserved: &[(&hodei_domain::Worker, u64, &[AttemptId])],
) -> Result<Vec<hodei_domain::Worker>, StorageError> {
    if reserved.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<&WorkerId> = reserved.iter().map(|(w, _, _)| w.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    let current = workers::lock_many(&mut *conn, &ids).await?;
    let mut saves = Vec::with_capacity(reserved.len());
    for (copy, read_version, added) in reserved {
        let Some(now) = current.get(copy.id()) else {
            return Err(StorageError::Conflict {
                what: format!("worker {} is gone", copy.id()),
            });
        };
        if now.version() == *read_version {
            saves.push(((*copy).clone(), *read_version));
        } else {
            let rebased = copy
                .rebased_on(now, added)
                .map_err(|e| StorageError::Conflict {
                    what: e.to_string(),
                })?;
            saves.push((rebased, now.version()));
        }
    }
    let refs: Vec<(&hodei_domain::Worker, u64)> = saves.iter().map(|(w, v)| (w, *v)).collect();
    workers::save_locked_reservations(conn, &refs).await?;
    Ok(saves.into_iter().map(|(w, _)| w).collect())
}

/// Asks for job `id` to be cancelled inside the caller's transaction: a queued job ends
/// cancelled at once, a job on a worker gets `cancel_requested` and its agent a `cancel`
/// command; a pipeline step's run moves on. Returns the job as it is now and the event
/// recorded (none when a cancel was already on its way), or `None` for an unknown job. A job
/// already ended is refused ([`StorageError::Refused`]).
pub async fn cancel_job(
    conn: &mut PgConnection,
    id: JobId,
    reason: &str,
    source: &str,
) -> Result<Option<(Job, Option<JobEvent>)>, StorageError> {
    let Some((job, event, run)) = cancel_job_unmoved(conn, id, reason, source).await? else {
        return Ok(None);
    };
    if let (Some(event), Some(run)) = (&event, run) {
        on_step_job(conn, run, &job, std::slice::from_ref(event)).await?;
    }
    Ok(Some((job, event)))
}

/// [`cancel_job`] without moving the job's pipeline run; also returns the run, for the caller
/// (the run's own driving, which is already moving it) to move.
async fn cancel_job_unmoved(
    conn: &mut PgConnection,
    id: JobId,
    reason: &str,
    source: &str,
) -> Result<Option<(Job, Option<JobEvent>, Option<PipelineRunId>)>, StorageError> {
    let Some(mut job) = jobs::get(&mut *conn, id).await? else {
        return Ok(None);
    };
    let version = job.version();
    let Some(event) = job.request_cancel(reason, Utc::now())? else {
        return Ok(Some((job, None, None)));
    };
    let mut messages = vec![Outgoing::job_event(&event, source)?];
    if let (JobEventKind::CancelRequested { .. }, Some(attempt)) =
        (&event.kind, job.current_attempt_record())
    {
        let command = AgentCommand::Cancel {
            job_id: id,
            attempt: attempt.attempt,
            reason: reason.to_owned(),
        };
        messages.push(Outgoing::agent_command(&attempt.worker_id, &command)?);
    }
    let run = jobs::save(conn, &job, version, std::slice::from_ref(&event)).await?;
    outbox::append(conn, &messages).await?;
    Ok(Some((job, Some(event), run)))
}

/// What a run submission did.
#[derive(Debug)]
pub enum RunSubmitted {
    /// The run was recorded and its first steps queued.
    Created(PipelineRun),
    /// A run with the same idempotency key existed; it is returned as it is now.
    Existing(PipelineRun),
    /// Nothing was recorded: the tenant is at its queue quota (the reason says so).
    OverQuota(String),
}

/// Records a new run, its first event and the jobs of the steps that need nothing, in one
/// transaction. With an idempotency key the tenant already used, records nothing and returns
/// the existing run. A tenant at its queue quota (`max_queued_jobs`, counted with its policy
/// locked, as a job submission counts it) gets nothing recorded: a run is let in while its
/// tenant may queue one more job, and its later steps are never refused.
pub async fn submit_run(
    pool: &PgPool,
    run: PipelineRun,
    event: &PipelineEvent,
    source: &str,
) -> Result<RunSubmitted, StorageError> {
    let mut tx = pool.begin().await?;
    let key = run.spec().idempotency_key.clone();
    let tenant = run.tenant().clone();
    let refused = tenant_queue_hold(&mut tx, &tenant, &[]).await?;
    let started = match refused {
        Some(_) => None,
        None => start_run(&mut tx, run, event, source).await?,
    };
    let Some(run) = started else {
        tx.rollback().await?;
        // A submission retried after its run was recorded answers that run, quota or not.
        let existing = match key.as_deref() {
            Some(key) => pipelines::find_by_idempotency_key(pool, &tenant, key).await?,
            None => None,
        };
        return match (existing, refused) {
            (Some(existing), _) => Ok(RunSubmitted::Existing(existing)),
            (None, Some(reason)) => Ok(RunSubmitted::OverQuota(reason)),
            (None, None) => Err(StorageError::Conflict {
                what: format!(
                    "pipeline run with idempotency key {}",
                    key.unwrap_or_default()
                ),
            }),
        };
    };
    tx.commit().await?;
    Ok(RunSubmitted::Created(run))
}

/// [`submit_run`] inside the caller's transaction: records the run, its first event and the
/// jobs of the steps that need nothing. `None`, recording nothing, when the tenant already
/// used the run's idempotency key.
pub async fn start_run(
    conn: &mut PgConnection,
    mut run: PipelineRun,
    event: &PipelineEvent,
    source: &str,
) -> Result<Option<PipelineRun>, StorageError> {
    if !pipelines::insert(conn, &run).await? {
        return Ok(None);
    }
    pipelines::append_events(conn, std::slice::from_ref(event)).await?;
    let mut messages = vec![Outgoing::pipeline_event(event, source)?];
    let version = run.version();
    let effects = run.advance(Utc::now(), JobId::new)?;
    carry_out(conn, &mut run, effects, source, &mut messages).await?;
    save_run(conn, &run, version, &messages).await?;
    Ok(Some(run))
}

/// Records a new job, its first event and `messages` inside the caller's transaction. False,
/// recording nothing, when its tenant already used its idempotency key.
pub async fn start_job(
    conn: &mut PgConnection,
    job: &Job,
    event: &JobEvent,
    messages: &[Outgoing],
) -> Result<bool, StorageError> {
    if !jobs::insert(conn, job, event, None).await? {
        return Ok(false);
    }
    outbox::append(conn, messages).await?;
    Ok(true)
}

/// Cancels run `id`: steps not started are cancelled, the jobs of queued and running steps go
/// through the job cancel path, `always` steps still run. Returns the run as it is now, or
/// `None` if it does not exist.
pub async fn cancel_run(
    pool: &PgPool,
    id: PipelineRunId,
    reason: &str,
    source: &str,
) -> Result<Option<PipelineRun>, StorageError> {
    let mut tx = pool.begin().await?;
    let run = cancel_run_in(&mut tx, id, reason, source).await?;
    tx.commit().await?;
    Ok(run.map(|(run, _)| run))
}

/// [`cancel_run`] inside the caller's transaction; with the run, whether this cancel changed
/// it (false when a cancel was under way already, or it had ended).
pub async fn cancel_run_in(
    conn: &mut PgConnection,
    id: PipelineRunId,
    reason: &str,
    source: &str,
) -> Result<Option<(PipelineRun, bool)>, StorageError> {
    let Some(mut run) = pipelines::lock(conn, id).await? else {
        return Ok(None);
    };
    let version = run.version();
    let effects = run.cancel(reason, Utc::now())?;
    if effects.events.is_empty() {
        return Ok(Some((run, false)));
    }
    let mut messages = Vec::new();
    carry_out(conn, &mut run, effects, source, &mut messages).await?;
    save_run(conn, &run, version, &messages).await?;
    Ok(Some((run, true)))
}

/// Moves run `run_id` after its step job `job` changed by `events` (already saved): a start
/// marks the step running, an end finishes the step and releases, skips or cancels what
/// follows.
async fn on_step_job(
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
    let Some(mut run) = pipelines::lock(&mut *conn, run_id).await? else {
        return Ok(());
    };
    let version = run.version();
    let now = Utc::now();
    let mut messages = Vec::new();
    if started && let Some(event) = run.job_started(job.id(), now)? {
        pipelines::append_events(conn, std::slice::from_ref(&event)).await?;
        messages.push(Outgoing::pipeline_event(&event, DRIVER)?);
    }
    if ended {
        let effects = run.job_ended(job.id(), job.state(), job_reason(job), now)?;
        carry_out(conn, &mut run, effects, DRIVER, &mut messages).await?;
    }
    save_run(conn, &run, version, &messages).await
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
        pipelines::append_events(conn, &effects.events).await?;
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
            let job = match cancel_job_unmoved(conn, *job_id, reason, source).await {
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
    spec: JobSpec,
    job_id: JobId,
    source: &str,
) -> Result<(), StorageError> {
    let (job, event) = Job::submit(job_id, run.tenant().clone(), spec, Utc::now());
    // A step's job carries no idempotency key (the run's validation refuses one): an insert
    // that did nothing is never a silent loss. A second job for the step fails on the unique
    // index `jobs_pipeline_step`.
    if !jobs::insert(conn, &job, &event, Some((run.id(), step))).await? {
        return Err(StorageError::Conflict {
            what: format!("job of step {step} of pipeline run {}", run.id()),
        });
    }
    outbox::append(conn, &Outgoing::job_submitted(&job, &event, source)?).await
}

/// Saves the run's projection (at `expected_version`) and queues `messages`.
async fn save_run(
    conn: &mut PgConnection,
    run: &PipelineRun,
    expected_version: u64,
    messages: &[Outgoing],
) -> Result<(), StorageError> {
    pipelines::save(conn, run, expected_version).await?;
    outbox::append(conn, messages).await
}

/// How a step's job ended, for the step's `reason`.
fn job_reason(job: &Job) -> Option<String> {
    job.reason().map(str::to_owned).or_else(|| {
        job.current_attempt_record()
            .and_then(|a| a.outcome.as_ref())
            .map(ToString::to_string)
    })
}

/// What handling a due schedule, or a trigger, did.
#[derive(Debug, Clone)]
pub struct ScheduleHandled {
    pub schedule: hodei_domain::Schedule,
    pub events: Vec<hodei_domain::ScheduleEvent>,
    /// Why the schedule could not be handled, and for how long it was put off.
    pub failed: Option<PutOff>,
}

/// A due schedule that could not be handled: why, and how long until it is tried again.
#[derive(Debug, Clone)]
pub struct PutOff {
    pub reason: String,
    /// [`RETRY_CONFLICT`] after a concurrent change, [`RETRY_FAILED`] otherwise.
    pub retry_in: chrono::Duration,
}

/// What a trigger by hand did.
#[derive(Debug, Clone)]
pub enum Triggered {
    /// It fired (or was skipped by the overlap policy or the tenant's queue quota) now.
    Now(ScheduleHandled),
    /// A trigger with the same idempotency key did, earlier: its tick, and nothing done again.
    Again {
        schedule: hodei_domain::Schedule,
        tick: hodei_domain::TickRecord,
    },
}

/// How long a schedule that could not be handled (for a reason other than PostgreSQL being
/// away or a concurrent change) is put off, so it does not stand first in line at every poll.
pub const RETRY_FAILED: chrono::Duration = chrono::Duration::seconds(60);

/// How long a schedule whose firing met a concurrent change (a row another transaction moved
/// first, a deadlock, a key already taken) is put off: the other due schedules are handled
/// first, and it is tried again about a poll later. A conflict that lasts thus delays only its
/// own schedule, never the ones due after it.
pub const RETRY_CONFLICT: chrono::Duration = chrono::Duration::seconds(1);

/// Fires what is due of the soonest due schedule no other replica holds, in one transaction:
/// its ticks, the jobs and runs they start, what the overlap policy cancels, its next tick.
/// `None` when no schedule is due. A tick is recorded (primary key `(schedule, tick)`) in the
/// transaction that starts its job, so it fires once whatever the replicas do. `grace` is how
/// late the caller may look (its polling interval); `jitter_unit` is a number in `[0, 1)`.
pub async fn fire_due_schedule(
    pool: &PgPool,
    now: chrono::DateTime<Utc>,
    grace: chrono::Duration,
    source: &str,
    jitter_unit: f64,
) -> Result<Option<ScheduleHandled>, StorageError> {
    let mut tx = pool.begin().await?;
    let Some(mut schedule) = schedules::claim_due(&mut tx, now, 1).await?.pop() else {
        return Ok(None);
    };
    let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
    match fire_schedule(
        &mut savepoint,
        &mut schedule,
        now,
        grace,
        source,
        jitter_unit,
    )
    .await
    {
        Ok(events) => {
            savepoint.commit().await?;
            tx.commit().await?;
            Ok(Some(ScheduleHandled {
                schedule,
                events,
                failed: None,
            }))
        }
        Err(e) if e.is_unavailable() => Err(e),
        Err(e) => {
            // The savepoint's rollback undoes its statements and their locks, a unique
            // violation's or a deadlock's included: the schedule's own lock is kept.
            savepoint.rollback().await?;
            let retry_in = if e.is_conflict() {
                RETRY_CONFLICT
            } else {
                RETRY_FAILED
            };
            schedules::postpone(&mut tx, schedule.id(), now + retry_in).await?;
            tx.commit().await?;
            Ok(Some(ScheduleHandled {
                schedule,
                events: Vec::new(),
                failed: Some(PutOff {
                    reason: e.to_string(),
                    retry_in,
                }),
            }))
        }
    }
}

/// One due schedule: records its missed ticks, fires the others and moves it on.
async fn fire_schedule(
    conn: &mut PgConnection,
    schedule: &mut hodei_domain::Schedule,
    now: chrono::DateTime<Utc>,
    grace: chrono::Duration,
    source: &str,
    jitter_unit: f64,
) -> Result<Vec<hodei_domain::ScheduleEvent>, StorageError> {
    use hodei_domain::{OverlapPolicy, ScheduleEvent, ScheduleEventKind, TickOutcome, TickRecord};
    let version = schedule.version();
    let cadence = schedule
        .cadence()
        .map_err(hodei_domain::DomainError::from)?;
    let mut round = schedule.round(&cadence, now, grace);
    let mut events = Vec::new();
    if let Some(missed) = round.missed {
        let detail = format!(
            "{}{} ticks from {} to {} were older than the catch-up window of {} ms",
            missed.count,
            if missed.more { " or more" } else { "" },
            missed.first.to_rfc3339(),
            missed.last.to_rfc3339(),
            schedule.spec().catch_up_window_ms
        );
        let record = TickRecord {
            tick: missed.last,
            outcome: TickOutcome::Missed,
            handled_at: now,
            job_id: None,
            run_id: None,
            detail,
        };
        if schedules::record_tick(conn, schedule.id(), &record, None).await? {
            events.push(ScheduleEvent::new(
                schedule.id(),
                now,
                ScheduleEventKind::Missed(missed),
            ));
        }
    }
    // Catching up with cancel_previous, each tick would cancel the one before it: only the
    // newest starts, the others are recorded skipped.
    if schedule.spec().overlap == OverlapPolicy::CancelPrevious && round.fire.len() > 1 {
        let newest = round.fire.split_off(round.fire.len() - 1);
        for tick in std::mem::replace(&mut round.fire, newest) {
            let reason = format!(
                "replaced by the later tick {} of the same catch-up (overlap policy cancel_previous)",
                round.fire[0].to_rfc3339()
            );
            events.extend(skip_tick(conn, schedule.id(), tick, reason, None, now).await?);
        }
    }
    for tick in round.fire {
        if let Some(event) = fire_tick(conn, schedule, tick, FiredBy::Schedule, now, source).await?
        {
            events.push(event);
        }
    }
    schedule.advance(round.next_tick, now, jitter_unit);
    schedules::save(conn, schedule, version).await?;
    schedules::prune_ticks(conn, schedule.id(), schedule.spec().history_limit).await?;
    append_schedule_events(conn, &events, source).await?;
    Ok(events)
}

/// Fires schedule `id` now, by hand, as its overlap policy and its tenant's queue quota allow;
/// a trigger with the idempotency `key` of one still in the schedule's history does nothing
/// and answers that one's tick. `None` for an unknown schedule.
pub async fn trigger_schedule(
    pool: &PgPool,
    id: hodei_domain::ScheduleId,
    key: Option<&str>,
    source: &str,
) -> Result<Option<Triggered>, StorageError> {
    let mut tx = pool.begin().await?;
    let Some(schedule) = schedules::lock(&mut tx, id).await? else {
        return Ok(None);
    };
    // Under the schedule's lock: a trigger with the same key waits, then finds this one's tick.
    if let Some(key) = key
        && let Some(tick) = schedules::tick_by_key(&mut tx, id, key).await?
    {
        tx.commit().await?;
        return Ok(Some(Triggered::Again { schedule, tick }));
    }
    // As stored: the tick answered now equals the one a retry reads back.
    let now = hodei_domain::time::recorded(Utc::now());
    let events: Vec<_> = fire_tick(&mut tx, &schedule, now, FiredBy::Hand { key }, now, source)
        .await?
        .into_iter()
        .collect();
    append_schedule_events(&mut tx, &events, source).await?;
    schedules::prune_ticks(&mut tx, schedule.id(), schedule.spec().history_limit).await?;
    tx.commit().await?;
    Ok(Some(Triggered::Now(ScheduleHandled {
        schedule,
        events,
        failed: None,
    })))
}

/// Queues schedule `events` in the outbox, as sent by `source`.
async fn append_schedule_events(
    conn: &mut PgConnection,
    events: &[hodei_domain::ScheduleEvent],
    source: &str,
) -> Result<(), StorageError> {
    let messages = events
        .iter()
        .map(|e| Outgoing::schedule_event(e, source))
        .collect::<Result<Vec<_>, _>>()?;
    outbox::append(conn, &messages).await
}

/// Records `tick` of schedule `id` skipped for `reason` (with the trigger's idempotency `key`,
/// if any): its event, or `None` when the tick was handled before.
async fn skip_tick(
    conn: &mut PgConnection,
    id: hodei_domain::ScheduleId,
    tick: chrono::DateTime<Utc>,
    reason: String,
    key: Option<&str>,
    now: chrono::DateTime<Utc>,
) -> Result<Option<hodei_domain::ScheduleEvent>, StorageError> {
    use hodei_domain::{ScheduleEvent, ScheduleEventKind, TickOutcome, TickRecord};
    let record = TickRecord {
        tick,
        outcome: TickOutcome::Skipped,
        handled_at: now,
        job_id: None,
        run_id: None,
        detail: reason.clone(),
    };
    if !schedules::record_tick(conn, id, &record, key).await? {
        return Ok(None);
    }
    Ok(Some(ScheduleEvent::new(
        id,
        now,
        ScheduleEventKind::Skipped { tick, reason },
    )))
}

/// Resumes schedule `schedule` (locked by the caller) at `now`, saving it at `version`. A tick
/// that was due before it was paused and had not fired yet (its jitter or the next poll was
/// still to come) does not fire: it is recorded skipped, with an event, rather than dropped
/// without a trace. The events, `resumed` first; none when it was not paused.
pub async fn resume_schedule(
    conn: &mut PgConnection,
    schedule: &mut hodei_domain::Schedule,
    now: chrono::DateTime<Utc>,
    jitter_unit: f64,
    source: &str,
) -> Result<Vec<hodei_domain::ScheduleEvent>, StorageError> {
    let version = schedule.version();
    let cadence = schedule
        .cadence()
        .map_err(hodei_domain::DomainError::from)?;
    let paused_at = schedule.updated_at();
    let unfired = schedule.unfired_at_pause();
    let Some(resumed) = schedule.resume(&cadence, now, jitter_unit) else {
        return Ok(Vec::new());
    };
    let mut events = vec![resumed];
    if let Some(tick) = unfired
        && schedule.next_tick().is_none_or(|next| next > tick)
    {
        let reason = format!(
            "the schedule was paused at {} before this tick fired (its jitter or the next poll was still to come)",
            paused_at.to_rfc3339()
        );
        events.extend(skip_tick(conn, schedule.id(), tick, reason, None, now).await?);
    }
    schedules::save(conn, schedule, version).await?;
    append_schedule_events(conn, &events, source).await?;
    Ok(events)
}

/// Who fires a tick: the schedule's own time, or a trigger by hand with its idempotency key.
#[derive(Debug, Clone, Copy)]
enum FiredBy<'a> {
    Schedule,
    Hand { key: Option<&'a str> },
}

/// Fires one tick: records it, then, when an earlier job or run has not ended, does what the
/// overlap policy says (skip this tick, or cancel them), then starts the template's job or
/// run keyed by the tick. A job's tick is recorded skipped instead while the tenant is at its
/// queue quota. `None` when the tick was handled before (nothing is done again).
async fn fire_tick(
    conn: &mut PgConnection,
    schedule: &hodei_domain::Schedule,
    tick: chrono::DateTime<Utc>,
    by: FiredBy<'_>,
    now: chrono::DateTime<Utc>,
    source: &str,
) -> Result<Option<hodei_domain::ScheduleEvent>, StorageError> {
    let (manual, key) = match by {
        FiredBy::Schedule => (false, None),
        FiredBy::Hand { key } => (true, key),
    };
    use hodei_domain::{
        Firing, OverlapPolicy, PipelineRunId, ScheduleEvent, ScheduleEventKind, TickOutcome,
        TickRecord,
    };
    let unfinished = match schedule.spec().overlap {
        OverlapPolicy::Allow => Vec::new(),
        OverlapPolicy::Skip | OverlapPolicy::CancelPrevious => {
            schedules::unfinished(conn, schedule.id()).await?
        }
    };
    let skipped = if schedule.spec().overlap == OverlapPolicy::Skip && !unfinished.is_empty() {
        let going: Vec<String> = unfinished.iter().map(ToString::to_string).collect();
        Some(format!(
            "{} has not ended (overlap policy skip)",
            going.join(", ")
        ))
    } else {
        // The tenant's queue quota holds a tick as it refuses `SubmitJob` and
        // `SubmitPipeline`. The jobs this tick would replace (`cancel_previous`: the previous
        // job, or the queued jobs of the previous run) do not count: they leave the queue as
        // its job or run joins it.
        let mut replaced = Vec::new();
        let mut runs = Vec::new();
        for started in &unfinished {
            match started {
                schedules::Started::Job(id) => replaced.push(*id),
                schedules::Started::Run(id) => runs.push(*id),
            }
        }
        replaced.extend(jobs::queued_of_runs(&mut *conn, &runs).await?);
        tenant_queue_hold(conn, schedule.tenant(), &replaced).await?
    };
    if let Some(reason) = skipped {
        return skip_tick(conn, schedule.id(), tick, reason, key, now).await;
    }
    /// What the tick starts.
    enum Start {
        Job(Box<Job>, JobEvent),
        Run(Box<PipelineRun>, PipelineEvent),
    }
    let tenant = schedule.tenant().clone();
    let start = match schedule.firing(tick)? {
        Firing::Job(spec) => {
            let (job, event) = Job::submit(JobId::new(), tenant, *spec, now);
            Start::Job(Box::new(job), event)
        }
        Firing::Pipeline(spec) => {
            let (run, event) = PipelineRun::submit(PipelineRunId::new(), tenant, spec, now);
            Start::Run(Box::new(run), event)
        }
    };
    let (job_id, run_id) = match &start {
        Start::Job(job, _) => (Some(job.id()), None),
        Start::Run(run, _) => (None, Some(run.id())),
    };
    // Recorded first: a tick handled before cancels nothing and starts nothing.
    let record = TickRecord {
        tick,
        outcome: if manual {
            TickOutcome::Triggered
        } else {
            TickOutcome::Fired
        },
        handled_at: now,
        job_id,
        run_id,
        detail: String::new(),
    };
    if !schedules::record_tick(conn, schedule.id(), &record, key).await? {
        return Ok(None);
    }
    let mut cancelled = Vec::new();
    if schedule.spec().overlap == OverlapPolicy::CancelPrevious {
        let reason = format!(
            "replaced by the tick of {} of schedule {}",
            tick.to_rfc3339(),
            schedule.spec().name
        );
        for started in unfinished {
            let done = match &started {
                schedules::Started::Job(id) => cancel_job(conn, *id, &reason, source)
                    .await
                    .map(|done| done.and_then(|(_, event)| event).is_some()),
                schedules::Started::Run(id) => cancel_run_in(conn, *id, &reason, source)
                    .await
                    .map(|run| run.is_some_and(|(_, changed)| changed)),
            };
            match done {
                Ok(true) => cancelled.push(started.to_string()),
                // It ended since it was read, or a cancel was on its way already.
                Ok(false) | Err(StorageError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if !cancelled.is_empty() {
            let detail = hodei_domain::schedule::cancelled_detail(&cancelled);
            schedules::set_tick_detail(conn, schedule.id(), tick, &detail).await?;
        }
    }
    match start {
        Start::Job(job, event) => {
            let messages = Outgoing::job_submitted(&job, &event, source)?;
            if !start_job(conn, &job, &event, &messages).await? {
                return Err(StorageError::Conflict {
                    what: format!("job of tick {tick} of schedule {}", schedule.id()),
                });
            }
        }
        Start::Run(run, event) => {
            if start_run(conn, *run, &event, source).await?.is_none() {
                return Err(StorageError::Conflict {
                    what: format!("pipeline run of tick {tick} of schedule {}", schedule.id()),
                });
            }
        }
    }
    Ok(Some(ScheduleEvent::new(
        schedule.id(),
        now,
        ScheduleEventKind::Fired {
            tick,
            manual,
            job_id,
            run_id,
            cancelled,
        },
    )))
}
