//! `hodei.v1.PipelineService`: submit, get, list, cancel and watch pipeline runs.

use std::collections::HashMap;

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::{
    Action, AttemptRecord, JobId, PipelineRun, PipelineRunId, PipelineSpec, PipelineState,
    Principal,
};
use hodei_messaging::{Outgoing, artifacts};
use hodei_proto::v1 as pb;
use hodei_proto::v1::pipeline_service_server::PipelineService;
use hodei_runtime::Backends;
use hodei_storage::driver::{self, RunSubmitted};
use hodei_storage::pipelines::{self, RunFilter};
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
use crate::history::{self, AsOf, Located};
use crate::limits::TransportLimits;
use crate::quotas::{Permitted, Quotas};
use crate::request;
use crate::secrets::Secrets;
use crate::watch;

/// Bytes per chunk of an artifact download.
const DOWNLOAD_CHUNK: usize = 64 * 1024;

pub struct PipelineApi {
    backends: Backends,
    secrets: Secrets,
    admission: Admission,
    audit: Auditor,
    quotas: Arc<Quotas>,
    shutdown: CancellationToken,
}

impl PipelineApi {
    pub fn new(
        backends: Backends,
        secrets: Secrets,
        admission: Admission,
        audit: Auditor,
        quotas: Arc<Quotas>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backends,
            secrets,
            admission,
            audit,
            quotas,
            shutdown,
        }
    }

    /// Run `id` as it stands, if `who` may see it; an archived run is refused as such (only
    /// its history is left).
    async fn load(&self, who: &Principal, id: PipelineRunId) -> Result<PipelineRun, Status> {
        history::locate_run(&self.backends, who, id)
            .await
            .and_then(|found| found.live(&format!("pipeline run {id}")))
            .into_status()
    }

    async fn artifact_store(
        &self,
    ) -> Result<async_nats::jetstream::object_store::ObjectStore, Status> {
        artifacts::bucket(&self.backends.js)
            .await
            .map_err(|e| ApiError::unavailable("artifact store", e).into())
    }

    /// The run on the wire, with its steps' attempts.
    async fn to_wire(&self, run: &PipelineRun) -> Result<pb::PipelineRun, Status> {
        let attempts = self.step_attempts(std::slice::from_ref(run)).await?;
        Ok(answer::fit_run(hodei_proto::pipeline_run_to_wire(
            run, &attempts,
        )))
    }

    /// `runs` on the wire, with their steps' attempts read in one query.
    async fn all_to_wire(&self, runs: &[PipelineRun]) -> Result<Vec<pb::PipelineRun>, Status> {
        let attempts = self.step_attempts(runs).await?;
        Ok(runs
            .iter()
            .map(|run| answer::fit_run(hodei_proto::pipeline_run_to_wire(run, &attempts)))
            .collect())
    }

    /// The attempts of the jobs of `runs`' steps, in one query.
    async fn step_attempts(
        &self,
        runs: &[PipelineRun],
    ) -> Result<HashMap<JobId, Vec<AttemptRecord>>, Status> {
        let jobs: Vec<JobId> = runs
            .iter()
            .flat_map(|r| r.steps().iter().filter_map(|s| s.job_id))
            .collect();
        self.backends
            .db(|| pipelines::step_attempts(&self.backends.pool, &jobs))
            .await
            .into_status()
    }

    async fn submit(
        &self,
        who: &Principal,
        req: pb::SubmitPipelineRequest,
    ) -> Result<pb::SubmitPipelineResponse, Status> {
        let tenant = access::submitting_for(who, &req.tenant).into_status()?;
        let wire = request::required("spec", req.spec).into_status()?;
        let draft = hodei_proto::pipeline_spec_from_wire(wire).into_status()?;
        let spec = PipelineSpec::try_from(draft).into_status()?;
        request::client_idempotency_key(spec.idempotency_key.as_deref(), "runs").into_status()?;
        let spec = self.secrets.seal_pipeline(spec).into_status()?;
        if let Some(key) = spec.idempotency_key.as_deref()
            && let Some(existing) = self
                .backends
                .db(|| pipelines::find_by_idempotency_key(&self.backends.pool, &tenant, key))
                .await
                .into_status()?
        {
            return Ok(pb::SubmitPipelineResponse {
                run: Some(self.to_wire(&existing).await?),
                created: false,
            });
        }
        self.quotas.submit(&tenant).into_status()?;
        if let Err(refused) = self.admission.check() {
            self.backends.metrics.submissions_refused.inc();
            return Err(refused.into());
        }
        let (run, event) = PipelineRun::submit(PipelineRunId::new(), tenant, spec, Utc::now());
        let announced = Outgoing::pipeline_event(&event, SOURCE).into_status()?;
        TransportLimits::new(self.backends.nats.max_payload())
            .check_pipeline(run.spec(), run.id(), std::slice::from_ref(&announced))
            .into_status()?;
        crate::limits::check_run_steps(&run).into_status()?;
        let (run, created) = match self
            .backends
            .db(|| driver::submit_run(&self.backends.pool, run.clone(), &event, SOURCE))
            .await
            .into_status()?
        {
            RunSubmitted::Created(run) => {
                self.backends.relay_wake.notify_one();
                tracing::Span::current().record("run_id", tracing::field::display(run.id()));
                tracing::info!(run_id = %run.id(), name = %run.spec().name, steps = run.steps().len(), "pipeline submitted");
                (run, true)
            }
            RunSubmitted::Existing(run) => {
                tracing::info!(run_id = %run.id(), "idempotent resubmission returned the existing pipeline run");
                (run, false)
            }
            RunSubmitted::OverQuota(reason) => {
                return Err(ApiError::Exhausted(reason)).into_status();
            }
        };
        Ok(pb::SubmitPipelineResponse {
            run: Some(self.to_wire(&run).await?),
            created,
        })
    }

    async fn cancel(
        &self,
        who: &Principal,
        id: PipelineRunId,
        reason: String,
    ) -> Result<pb::CancelPipelineRunResponse, Status> {
        who.authorize(Action::Cancel)
            .map_err(ApiError::from)
            .into_status()?;
        // Another tenant's run is not found, before anything is changed.
        self.load(who, id).await?;
        let cancelled = self
            .backends
            .db_until_no_conflict(|| driver::cancel_run(&self.backends.pool, id, &reason, SOURCE))
            .await
            .into_status()?;
        let Some(run) = cancelled else {
            // Not in the hot tables: archived (refused as such) or unknown.
            return Err(self
                .load(who, id)
                .await
                .err()
                .unwrap_or_else(|| ApiError::not_found(format!("pipeline run {id}")).into()));
        };
        self.backends.relay_wake.notify_one();
        tracing::info!(run_id = %id, state = %run.state(), "pipeline cancel recorded");
        Ok(pb::CancelPipelineRunResponse {
            run: Some(self.to_wire(&run).await?),
        })
    }
}

#[tonic::async_trait]
impl PipelineService for PipelineApi {
    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway", run_id))]
    async fn submit_pipeline(
        &self,
        request: Request<pb::SubmitPipelineRequest>,
    ) -> Result<Response<pb::SubmitPipelineResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = self.submit(&who, req).await;
        let target = match &result {
            Ok(pb::SubmitPipelineResponse { run: Some(run), .. }) => {
                format!("pipeline run {}", run.id)
            }
            _ => "pipeline run".to_owned(),
        };
        self.audit
            .answer(&who, &tenant, "SubmitPipeline", &target, result)
            .await
    }

    async fn get_pipeline_run(
        &self,
        request: Request<pb::GetPipelineRunRequest>,
    ) -> Result<Response<pb::GetPipelineRunResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: PipelineRunId = request::id("run_id", &req.run_id).into_status()?;
        let as_of = req.as_of.map(AsOf::try_from).transpose().into_status()?;
        let found = history::locate_run(&self.backends, &who, id)
            .await
            .into_status()?;
        let (tier, archived_at) = (found.tier(), found.archived_at());
        let mut wire = match found {
            Located::Hot(run) if as_of.is_none() => self.to_wire(&run).await?,
            _ => {
                let (run, attempts) = history::run_as_of(&self.backends, id, tier, as_of)
                    .await
                    .into_status()?;
                answer::fit_run(hodei_proto::pipeline_run_to_wire(&run, &attempts))
            }
        };
        wire.archived_at = archived_at.map(hodei_proto::timestamp);
        Ok(Response::new(pb::GetPipelineRunResponse {
            run: Some(wire),
        }))
    }

    async fn list_pipeline_runs(
        &self,
        request: Request<pb::ListPipelineRunsRequest>,
    ) -> Result<Response<pb::ListPipelineRunsResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = request::optional_tenant(&req.tenant)
            .and_then(|named| Ok(who.listing_scope(named)?))
            .into_status()?;
        let limit = request::page_size(req.page_size).into_status()?;
        let states = request::enum_values(
            "states",
            "pipeline state",
            &req.states,
            hodei_proto::pipeline_state_from_wire,
        )
        .into_status()?;
        let before = request::page_token(&req.page_token).into_status()?;
        request::filter_text("name_prefix", &req.name_prefix, request::MAX_FILTER_BYTES)
            .into_status()?;
        let filter = RunFilter {
            tenant,
            states,
            name_prefix: Some(req.name_prefix).filter(|p| !p.is_empty()),
            before,
            limit,
        };
        let found = self
            .backends
            .db(|| pipelines::list(&self.backends.pool, &filter))
            .await
            .into_status()?;
        let (runs, next_page_token) =
            request::fit_page(&found, self.all_to_wire(&found).await?, limit, |r| {
                r.id().to_string()
            });
        Ok(Response::new(pb::ListPipelineRunsResponse {
            runs,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn cancel_pipeline_run(
        &self,
        request: Request<pb::CancelPipelineRunRequest>,
    ) -> Result<Response<pb::CancelPipelineRunResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: PipelineRunId = request::id("run_id", &req.run_id).into_status()?;
        let reason = request::reason_or(req.reason, "cancelled by request").into_status()?;
        let result = self.cancel(&who, id, reason).await;
        let tenant = match &result {
            Ok(pb::CancelPipelineRunResponse { run: Some(run) }) => {
                run.tenant.parse().unwrap_or_else(|_| who.tenant.clone())
            }
            _ => who.tenant.clone(),
        };
        self.audit
            .answer(
                &who,
                &tenant,
                "CancelPipelineRun",
                &format!("pipeline run {id}"),
                result,
            )
            .await
    }

    type WatchPipelineRunStream = Permitted<ReceiverStream<Result<pb::PipelineEvent, Status>>>;

    async fn watch_pipeline_run(
        &self,
        request: Request<pb::WatchPipelineRunRequest>,
    ) -> Result<Response<Self::WatchPipelineRunStream>, Status> {
        let who = caller(&request).into_status()?;
        let credential = auth::credential(&request);
        let req = request.into_inner();
        let id: PipelineRunId = request::id("run_id", &req.run_id).into_status()?;
        self.load(&who, id).await?;
        let permit = self.quotas.open_stream(&who.tenant).into_status()?;
        // Subscribe before reading history so nothing falls between the two.
        let live = self
            .backends
            .nats
            .subscribe(hodei_messaging::subjects::pipeline_events_of(&id))
            .await
            .map_err(|e| ApiError::unavailable("event stream", e))?;
        let backends = self.backends.clone();
        let mut state = PipelineState::Queued;
        let stream = watch::spawn(
            live,
            self.shutdown.clone(),
            req.from_seq,
            move |next| {
                let backends = backends.clone();
                async move {
                    backends
                        .db(|| pipelines::events(&backends.pool, id, next))
                        .await
                }
            },
            move |event: &hodei_domain::PipelineEvent| {
                let wire = hodei_proto::pipeline_event_to_wire(event, state);
                state = hodei_proto::pipeline_state_from_wire(wire.state).unwrap_or(state);
                watch::Streamed {
                    wire,
                    seq: event.seq,
                    last: state.is_terminal(),
                }
            },
        );
        Ok(Response::new(Permitted::new(stream, permit, credential)))
    }
    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: PipelineRunId = request::id("run_id", &req.run_id).into_status()?;
        self.load(&who, id).await?;
        let store = self.artifact_store().await?;
        let prefix = if req.step.is_empty() {
            artifacts::run_prefix(&id)
        } else {
            artifacts::step_prefix(&id, &req.step)
        };
        let mut list = store
            .list()
            .await
            .map_err(|e| ApiError::unavailable("artifact store", e))?;
        let mut found = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| ApiError::unavailable("artifact store", e))?;
            if info.deleted || !info.name.starts_with(&prefix) {
                continue;
            }
            let Some((_, step, path)) = artifacts::parse_object_name(&info.name) else {
                continue;
            };
            found.push(pb::Artifact {
                step: step.to_owned(),
                path: path.to_owned(),
                size: u64::try_from(info.size).unwrap_or(u64::MAX),
                digest: info.digest.clone().unwrap_or_default(),
                modified: info.modified.map(|t| prost_types::Timestamp {
                    seconds: t.unix_timestamp(),
                    nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
                }),
            });
        }
        found.sort_by(|a, b| (&a.step, &a.path).cmp(&(&b.step, &b.path)));
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts: found,
        }))
    }

    type DownloadArtifactStream = Permitted<ReceiverStream<Result<pb::ArtifactChunk, Status>>>;

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let who = caller(&request).into_status()?;
        let credential = auth::credential(&request);
        let req = request.into_inner();
        let id: PipelineRunId = request::id("run_id", &req.run_id).into_status()?;
        request::required_text("step", &req.step).into_status()?;
        self.load(&who, id).await?;
        let permit = self.quotas.open_stream(&who.tenant).into_status()?;
        let name = artifacts::object_name(&id, &req.step, &req.path);
        if artifacts::parse_object_name(&name).is_none() {
            return Err(
                ApiError::field("path", "must be relative, without '..' or empty parts").into(),
            );
        }
        let store = self.artifact_store().await?;
        let mut object = store.get(&name).await.map_err(|e| match e.kind() {
            async_nats::jetstream::object_store::GetErrorKind::NotFound => ApiError::not_found(
                format!("artifact {} of step {} in run {id}", req.path, req.step),
            ),
            _ => ApiError::unavailable("artifact store", e),
        })?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; DOWNLOAD_CHUNK];
            loop {
                // The client checks the object's SHA-256 digest as the last chunk is read: a
                // mismatch ends the stream with an error instead of a clean end.
                match object.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = pb::ArtifactChunk {
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(ApiError::DataLoss(format!(
                                "artifact read failed: {e}"
                            ))
                            .into()))
                            .await;
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
