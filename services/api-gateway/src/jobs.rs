//! `hodei.v1.JobService`: submit, get, list, cancel, watch and logs.

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{Action, Job, JobId, JobSpec, JobState, Principal};
use hodei_messaging::{LogBatch, LogStreamKind, Outgoing, streams, subjects};
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_server::JobService;
use hodei_runtime::Backends;
use hodei_storage::driver::{self, JobSubmitted, Recorded, Submission};
use hodei_storage::jobs::{self, JobFilter};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::SOURCE;
use crate::access::{self, Auditor};
use crate::admission::Admission;
use crate::answer;
use crate::auth::{self, caller};
use crate::errors::{ApiError, IntoStatus};
use crate::history::{self, AsOf, Located, MAX_QUERY_CHARS};
use crate::limits::TransportLimits;
use crate::quotas::{Permitted, Quotas};
use crate::request;
use crate::secrets::Secrets;
use crate::submissions::Submissions;
use crate::watch::{self, STREAM_POLL};

/// The audit log's name of a submission.
const SUBMIT_JOB: &str = "SubmitJob";
/// The audit log's name of a submission of several jobs.
const SUBMIT_JOBS: &str = "SubmitJobs";
/// Most jobs one `SubmitJobs` call records.
pub const MAX_SUBMIT_BATCH: usize = 1000;

pub struct JobApi {
    backends: Backends,
    secrets: Secrets,
    admission: Admission,
    submissions: Submissions,
    audit: Auditor,
    quotas: Arc<Quotas>,
    shutdown: CancellationToken,
}

impl JobApi {
    pub fn new(
        backends: Backends,
        secrets: Secrets,
        admission: Admission,
        submissions: Submissions,
        audit: Auditor,
        quotas: Arc<Quotas>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backends,
            secrets,
            admission,
            submissions,
            audit,
            quotas,
            shutdown,
        }
    }

    /// Job `id` as it stands, if `who` may see it; an archived job is refused as such (only
    /// its history is left).
    async fn load(&self, who: &Principal, id: JobId) -> Result<Job, Status> {
        history::locate_job(&self.backends, who, id)
            .await
            .and_then(|found| found.live(&format!("job {id}")))
            .into_status()
    }

    /// Submits the job; true with the answer when the job was created, its audit entry
    /// recorded in the same transaction.
    async fn submit(
        &self,
        who: &Principal,
        req: pb::SubmitJobRequest,
    ) -> Result<(pb::SubmitJobResponse, bool), Status> {
        let tenant = access::submitting_for(who, &req.tenant).into_status()?;
        let wire = request::required("spec", req.spec).into_status()?;
        let spec = JobSpec::try_from(JobSpecDraft::from(wire)).into_status()?;
        request::client_idempotency_key(spec.idempotency_key.as_deref(), "jobs").into_status()?;
        let spec = self.secrets.seal_job(spec).into_status()?;
        let limits = TransportLimits::new(self.backends.nats.max_payload());
        limits.check_job("spec.", &spec).into_status()?;
        // Resubmissions of an accepted job are answered even when the queue is full.
        if let Some(key) = spec.idempotency_key.as_deref()
            && let Some(existing) = self
                .backends
                .db(|| jobs::find_by_idempotency_key(&self.backends.pool, &tenant, key))
                .await
                .into_status()?
        {
            return Ok((
                pb::SubmitJobResponse {
                    job: Some(answer::job(&existing)),
                    created: false,
                },
                false,
            ));
        }
        if let Err(refused) = self.admission.check() {
            self.backends.metrics.submissions_refused.inc();
            return Err(refused.into());
        }
        self.quotas.submit(&tenant).into_status()?;
        let (job, event) = Job::submit(JobId::new(), tenant, spec, Utc::now());
        let messages = Outgoing::job_submitted(&job, &event, SOURCE).into_status()?;
        limits.check_messages("spec", &messages).into_status()?;
        let audit = access::entry(
            who,
            job.tenant(),
            SUBMIT_JOB,
            &format!("job {}", job.id()),
            &Ok::<(), Status>(()),
        );
        let submission = Submission {
            job,
            event,
            messages: messages.into(),
            trace: hodei_messaging::trace::current(),
            audit: Some(audit),
        };
        let submitted = self
            .submissions
            .submit(submission)
            .await
            .map_err(ApiError::from)
            .into_status()?;
        let (job, created) = match submitted {
            JobSubmitted::Created(job) => {
                self.backends.metrics.jobs_submitted.inc();
                tracing::Span::current().record("job_id", tracing::field::display(job.id()));
                tracing::info!(job_id = %job.id(), name = %job.spec().name, by = %who.subject, "job submitted");
                (job, true)
            }
            JobSubmitted::Existing(job) => {
                tracing::info!(job_id = %job.id(), "idempotent resubmission returned the existing job");
                (job, false)
            }
            JobSubmitted::OverQuota(reason) => {
                return Err(ApiError::Exhausted(reason)).into_status();
            }
        };
        Ok((
            pb::SubmitJobResponse {
                job: Some(answer::job(&job)),
                created,
            },
            created,
        ))
    }

    /// Submits every new job of `req` in one transaction, or none; true with the answer when
    /// any was created (the audit entries of those committed with them). Jobs whose
    /// idempotency key the tenant used already are answered as recorded, and neither charged
    /// to the tenant nor counted against its queue.
    async fn submit_many(
        &self,
        who: &Principal,
        req: pb::SubmitJobsRequest,
    ) -> Result<(pb::SubmitJobsResponse, bool), Status> {
        let tenant = access::submitting_for(who, &req.tenant).into_status()?;
        let count = match req.specs.len() {
            0 => Err(ApiError::field("specs", "at least one job is required")),
            n if n > MAX_SUBMIT_BATCH => Err(ApiError::field(
                "specs",
                format!("{n} jobs, more than the {MAX_SUBMIT_BATCH} one call may submit"),
            )),
            n => Ok(n),
        }
        .into_status()?;
        let limits = TransportLimits::new(self.backends.nats.max_payload());
        let mut specs = Vec::with_capacity(count);
        let mut keys: HashMap<String, usize> = HashMap::new();
        for (i, wire) in req.specs.into_iter().enumerate() {
            let spec = JobSpec::try_from(JobSpecDraft::from(wire))
                .map_err(ApiError::from)
                .and_then(|spec| {
                    request::client_idempotency_key(spec.idempotency_key.as_deref(), "jobs")?;
                    let spec = self.secrets.seal_job(spec)?;
                    limits.check_job("spec.", &spec)?;
                    Ok(spec)
                })
                .map_err(|e| within(i, e))
                .into_status()?;
            if let Some(key) = spec.idempotency_key.as_deref()
                && let Some(first) = keys.insert(key.to_owned(), i)
            {
                return Err(ApiError::field(
                    format!("specs[{i}].idempotency_key"),
                    format!("the same key as specs[{first}]: each job of a call needs its own"),
                ))
                .into_status();
            }
            specs.push(spec);
        }
        // Jobs a retried call recorded already are answered as they are, even when the queue
        // is full.
        let existing = if keys.is_empty() {
            HashMap::new()
        } else {
            let keys: Vec<&str> = keys.keys().map(String::as_str).collect();
            self.backends
                .db(|| jobs::find_by_idempotency_keys(&self.backends.pool, &tenant, &keys))
                .await
                .into_status()?
        };
        let now = Utc::now();
        let trace = hodei_messaging::trace::current();
        // The answer to each spec, a new job's provisional until it is recorded, and where
        // each submission's answer is.
        let mut results = Vec::with_capacity(count);
        let mut places = Vec::new();
        let mut submissions = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            if let Some(job) = spec
                .idempotency_key
                .as_deref()
                .and_then(|key| existing.get(key))
            {
                results.push(pb::SubmitJobResponse {
                    job: Some(answer::job(job)),
                    created: false,
                });
                continue;
            }
            let (job, event) = Job::submit(JobId::new(), tenant.clone(), spec, now);
            let messages = Outgoing::job_submitted(&job, &event, SOURCE).into_status()?;
            limits
                .check_messages(&format!("specs[{i}]"), &messages)
                .into_status()?;
            let audit = access::entry(
                who,
                job.tenant(),
                SUBMIT_JOBS,
                &format!("job {}", job.id()),
                &Ok::<(), Status>(()),
            );
            places.push(results.len());
            results.push(pb::SubmitJobResponse {
                job: Some((&job).into()),
                created: true,
            });
            submissions.push(Submission {
                job,
                event,
                messages: messages.into(),
                trace: trace.clone(),
                audit: Some(audit),
            });
        }
        let mut answer = pb::SubmitJobsResponse { results };
        answer_fits(&answer).into_status()?;
        let Some(fresh) = u32::try_from(submissions.len())
            .ok()
            .and_then(std::num::NonZeroU32::new)
        else {
            return Ok((answer, false));
        };
        // The queue first: a call it refuses takes nothing from the tenant's bucket.
        if let Err(refused) = self.admission.check_room(u64::from(fresh.get())) {
            self.backends.metrics.submissions_refused.inc();
            return Err(refused.into());
        }
        self.quotas.submit_many(&tenant, fresh).into_status()?;
        let recorded = self
            .backends
            .db(|| driver::submit_jobs_together(&self.backends.pool, &submissions))
            .await
            .into_status()?;
        let mut created = 0;
        let mut committed = Vec::new();
        for ((submission, recorded), place) in submissions.iter_mut().zip(recorded).zip(places) {
            match recorded {
                Recorded::New => {
                    created += 1;
                    committed.append(&mut submission.messages);
                }
                // Recorded meanwhile by a concurrent call with the same key.
                Recorded::Existing(job) => {
                    if let Some(result) = answer.results.get_mut(place) {
                        *result = pb::SubmitJobResponse {
                            job: Some(answer::job(&job)),
                            created: false,
                        };
                    }
                }
                // All or none: every new job is refused with the same reason.
                Recorded::OverQuota(reason) => {
                    return Err(ApiError::Exhausted(format!(
                        "none of the {fresh} new jobs was recorded: {reason}"
                    )))
                    .into_status();
                }
            }
        }
        self.backends.relay.hand_over(committed);
        self.backends.metrics.jobs_submitted.inc_by(created);
        tracing::info!(tenant = %tenant, jobs = count, created, by = %who.subject, "jobs submitted together");
        Ok((answer, created > 0))
    }

    async fn cancel(
        &self,
        who: &Principal,
        id: JobId,
        reason: String,
    ) -> Result<pb::CancelJobResponse, Status> {
        who.authorize(Action::Cancel)
            .map_err(ApiError::from)
            .into_status()?;
        // Another tenant's job is not found, before anything is changed.
        self.load(who, id).await?;
        let saved = self
            .backends
            .db_until_no_conflict(|| async {
                let mut tx = self.backends.pool.begin().await?;
                let done = driver::cancel_job(&mut tx, id, &reason, SOURCE).await?;
                tx.commit().await?;
                Ok(done)
            })
            .await
            .into_status()?;
        let Some((job, event)) = saved else {
            // Not in the hot tables: archived (refused as such) or unknown.
            return Err(self
                .load(who, id)
                .await
                .err()
                .unwrap_or_else(|| ApiError::not_found(format!("job {id}")).into()));
        };
        if let Some(event) = event {
            self.backends.relay_wake.notify_one();
            if job.state().is_terminal() {
                self.backends.metrics.job_finished(job.state().as_str());
            }
            tracing::info!(job_id = %id, event = event.kind.name(), by = %who.subject, "job cancel recorded");
        }
        Ok(pb::CancelJobResponse {
            job: Some(answer::job(&job)),
        })
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway", job_id))]
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = match self.submit(&who, req).await {
            // Created: its audit entry was committed with it.
            Ok((answer, true)) => return Ok(Response::new(answer)),
            Ok((answer, false)) => Ok(answer),
            Err(status) => Err(status),
        };
        let target = match &result {
            Ok(pb::SubmitJobResponse { job: Some(job), .. }) => format!("job {}", job.id),
            _ => "job".to_owned(),
        };
        self.audit
            .answer(&who, &tenant, SUBMIT_JOB, &target, result)
            .await
    }

    async fn submit_jobs(
        &self,
        request: Request<pb::SubmitJobsRequest>,
    ) -> Result<Response<pb::SubmitJobsResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = match self.submit_many(&who, req).await {
            // Created: the new jobs' audit entries were committed with them.
            Ok((answer, true)) => return Ok(Response::new(answer)),
            Ok((answer, false)) => Ok(answer),
            Err(status) => Err(status),
        };
        self.audit
            .answer(&who, &tenant, SUBMIT_JOBS, "jobs", result)
            .await
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: JobId = request::id("job_id", &req.job_id).into_status()?;
        let as_of = req.as_of.map(AsOf::try_from).transpose().into_status()?;
        let found = history::locate_job(&self.backends, &who, id)
            .await
            .into_status()?;
        let tier = found.tier();
        let archived_at = found.archived_at();
        let job = match found {
            Located::Hot(job) if as_of.is_none() => job,
            _ => history::job_as_of(&self.backends, id, tier, as_of)
                .await
                .into_status()?,
        };
        let mut wire = answer::job(&job);
        wire.archived_at = archived_at.map(hodei_proto::timestamp);
        Ok(Response::new(pb::GetJobResponse { job: Some(wire) }))
    }

    async fn get_job_history(
        &self,
        request: Request<pb::GetJobHistoryRequest>,
    ) -> Result<Response<pb::GetJobHistoryResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: JobId = request::id("job_id", &req.job_id).into_status()?;
        let tier = history::locate_job(&self.backends, &who, id)
            .await
            .into_status()?
            .tier();
        history::job_history(&self.backends, id, tier, req.page_size, &req.page_token)
            .await
            .into_status()
            .map(Response::new)
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let who = caller(&request).into_status()?;
        history::list_events(&self.backends, &who, request.into_inner())
            .await
            .into_status()
            .map(Response::new)
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = request::optional_tenant(&req.tenant)
            .and_then(|named| Ok(who.listing_scope(named)?))
            .into_status()?;
        let limit = request::page_size(req.page_size).into_status()?;
        let states = request::enum_values(
            "states",
            "job state",
            &req.states,
            hodei_proto::state_from_wire,
        )
        .into_status()?;
        let before = request::page_token(&req.page_token).into_status()?;
        if req.query.chars().count() > MAX_QUERY_CHARS {
            return Err(ApiError::field(
                "query",
                format!("is longer than {MAX_QUERY_CHARS} characters"),
            )
            .into());
        }
        // A word of the query past 2,047 bytes is refused by PostgreSQL's full-text search.
        request::filter_text("query", &req.query, request::MAX_FILTER_BYTES).into_status()?;
        request::filter_text("name_prefix", &req.name_prefix, request::MAX_FILTER_BYTES)
            .into_status()?;
        let filter = JobFilter {
            tenant,
            states,
            name_prefix: Some(req.name_prefix).filter(|p| !p.is_empty()),
            labels: request::label_filters(req.labels).into_status()?,
            search: Some(req.query).filter(|q| !q.trim().is_empty()),
            before,
            limit,
        };
        let found = self
            .backends
            .db(|| jobs::list(&self.backends.pool, &filter))
            .await
            .into_status()?;
        let (jobs, next_page_token) = request::fit_page(
            &found,
            found.iter().map(answer::job).collect(),
            limit,
            |j| j.id().to_string(),
        );
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: JobId = request::id("job_id", &req.job_id).into_status()?;
        let reason = request::reason_or(req.reason, "cancelled by request").into_status()?;
        let result = self.cancel(&who, id, reason).await;
        let tenant = match &result {
            Ok(pb::CancelJobResponse { job: Some(job) }) => {
                job.tenant.parse().unwrap_or_else(|_| who.tenant.clone())
            }
            _ => who.tenant.clone(),
        };
        self.audit
            .answer(&who, &tenant, "CancelJob", &format!("job {id}"), result)
            .await
    }

    type WatchJobStream = Permitted<ReceiverStream<Result<pb::JobEvent, Status>>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = caller(&request).into_status()?;
        let credential = auth::credential(&request);
        let req = request.into_inner();
        let id: JobId = request::id("job_id", &req.job_id).into_status()?;
        self.load(&who, id).await?;
        let permit = self.quotas.open_stream(&who.tenant).into_status()?;
        // Subscribe before reading history so nothing falls between the two.
        let live = self
            .backends
            .nats
            .subscribe(subjects::job_events_of(&id))
            .await
            .map_err(|e| ApiError::unavailable("event stream", e))?;
        let backends = self.backends.clone();
        let mut state = JobState::Queued;
        let stream = watch::spawn(
            live,
            self.shutdown.clone(),
            req.from_seq,
            move |next| {
                let backends = backends.clone();
                async move { backends.db(|| jobs::events(&backends.pool, id, next)).await }
            },
            move |event: &hodei_domain::JobEvent| {
                let wire = hodei_proto::job_event_to_wire(event, state);
                state = hodei_proto::state_from_wire(wire.state).unwrap_or(state);
                watch::Streamed {
                    wire,
                    seq: event.seq,
                    last: event.kind.is_terminal(),
                }
            },
        );
        Ok(Response::new(Permitted::new(stream, permit, credential)))
    }

    type StreamLogsStream = Permitted<ReceiverStream<Result<pb::LogLine, Status>>>;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let who = caller(&request).into_status()?;
        let credential = auth::credential(&request);
        let req = request.into_inner();
        let id: JobId = request::id("job_id", &req.job_id).into_status()?;
        let mut job = self.load(&who, id).await?;
        let permit = self.quotas.open_stream(&who.tenant).into_status()?;
        let subjects = [subjects::logs_of(&id), subjects::legacy_logs_of(&id)];
        let stream = self
            .backends
            .js
            .get_stream(streams::LOGS)
            .await
            .map_err(|e| ApiError::unavailable("log stream", e))?;
        let has_logs = last_log_sequence(&stream, &subjects).await.is_some();
        let (tx, rx) = mpsc::channel(256);
        if !has_logs && !req.follow {
            return Ok(Response::new(Permitted::new(
                ReceiverStream::new(rx),
                permit,
                credential.clone(),
            )));
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subjects: subjects.to_vec(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ApiError::unavailable("log stream", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ApiError::unavailable("log stream", e))?;
        let backends = self.backends.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut sequence = 0u64;
            let mut last_seen = 0u64;
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    next = messages.next() => Some(next),
                    () = tokio::time::sleep(STREAM_POLL) => None,
                };
                let caught_up = match next {
                    Some(Some(Ok(message))) => {
                        if let Ok(info) = message.info() {
                            last_seen = info.stream_sequence;
                        }
                        let pending = message.info().map(|i| i.pending).unwrap_or(1);
                        match serde_json::from_slice::<LogBatch>(&message.payload) {
                            Ok(batch)
                                if !sent_by_runner(
                                    &backends,
                                    &mut job,
                                    &message.subject,
                                    &batch,
                                )
                                .await =>
                            {
                                tracing::warn!(job_id = %id, subject = %message.subject, attempt = %batch.attempt, "log batch from a worker that did not run its attempt skipped");
                            }
                            Ok(batch) => {
                                for line in batch.lines {
                                    sequence += 1;
                                    if sequence < req.from_sequence {
                                        continue;
                                    }
                                    let stream = match line.stream {
                                        LogStreamKind::Stdout => pb::LogStream::Stdout,
                                        LogStreamKind::Stderr => pb::LogStream::Stderr,
                                    };
                                    let wire = pb::LogLine {
                                        sequence,
                                        attempt: batch.attempt.get(),
                                        stream: stream.into(),
                                        text: line.text,
                                        at: Some(hodei_proto::timestamp(line.at)),
                                    };
                                    if tx.send(Ok(wire)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(subject = %message.subject, error = %e, "malformed log batch skipped")
                            }
                        }
                        pending == 0
                    }
                    Some(Some(Err(e))) => {
                        tracing::warn!(job_id = %id, error = %e, "log stream error");
                        continue;
                    }
                    Some(None) => return,
                    None => true,
                };
                if !caught_up {
                    continue;
                }
                if !req.follow {
                    return;
                }
                // Following: stop once the job has ended and every line stored for it (all
                // stored before the job's end was recorded) has been sent.
                match backends.db(|| jobs::get(&backends.pool, id)).await {
                    Ok(Some(job)) if job.state().is_terminal() => {
                        let last = last_log_sequence(&stream, &subjects).await.unwrap_or(0);
                        if last <= last_seen {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Permitted::new(
            ReceiverStream::new(rx),
            permit,
            credential,
        )))
    }
}

/// Whether the worker `subject` names (`hodei.v1.log.<worker>.<job>`) ran the attempt `batch`
/// is of, by `job`'s attempts, read again when it does not know the attempt yet. A batch on a
/// legacy subject names no worker and is taken.
async fn sent_by_runner(
    backends: &Backends,
    job: &mut Job,
    subject: &str,
    batch: &LogBatch,
) -> bool {
    let Some(sender) =
        subjects::token_after(subject, 3).filter(|_| subject.split('.').count() == 5)
    else {
        return true;
    };
    let runner = |job: &Job| {
        job.attempts()
            .iter()
            .find(|a| a.attempt == batch.attempt)
            .map(|a| a.worker_id.as_str() == sender)
    };
    if let Some(ran) = runner(job) {
        return ran;
    }
    if let Ok(Some(fresh)) = backends.db(|| jobs::get(&backends.pool, job.id())).await {
        *job = fresh;
    }
    runner(job).unwrap_or(false)
}

/// The stream sequence of the newest log batch on any of `subjects`; `None` if there is none.
async fn last_log_sequence(
    stream: &async_nats::jetstream::stream::Stream,
    subjects: &[String],
) -> Option<u64> {
    let mut last = None;
    for subject in subjects {
        if let Ok(message) = stream.get_last_raw_message_by_subject(subject).await {
            last = last.max(Some(message.sequence));
        }
    }
    last
}

/// Refuses a call whose answer would be larger than its caller reads by default.
fn answer_fits(answer: &pb::SubmitJobsResponse) -> Result<(), ApiError> {
    use prost::Message as _;
    let size = answer.encoded_len();
    if size > request::MAX_ANSWER_BYTES {
        return Err(ApiError::field(
            "specs",
            format!(
                "the answer would be {size} bytes, more than the {} a gRPC \
                 client reads by default; submit these jobs in smaller calls",
                request::MAX_ANSWER_BYTES
            ),
        ));
    }
    Ok(())
}

/// `error` about the job at `index` of a `SubmitJobs` call, its fields named under
/// `specs[index].` (a single submission's are named under `spec.`, or bare).
fn within(index: usize, error: ApiError) -> ApiError {
    let name = |field: &str| {
        let field = field.strip_prefix("spec.").unwrap_or(field);
        format!("specs[{index}].{field}")
    };
    match error {
        ApiError::Field { field, reason } => ApiError::Field {
            field: name(&field),
            reason,
        },
        ApiError::Invalid(mut errors) => {
            for e in &mut errors.0 {
                e.field = name(&e.field);
            }
            ApiError::Invalid(errors)
        }
        other => other,
    }
}
