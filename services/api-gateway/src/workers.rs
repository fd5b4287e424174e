//! `hodei.v1.WorkerService`: the fleet as the registry recorded it.

use chrono::Utc;
use hodei_domain::{Action, Principal, WorkerId, WorkerStatus};
use hodei_messaging::{AgentCommand, Outgoing};
use hodei_proto::v1 as pb;
use hodei_proto::v1::worker_service_server::WorkerService;
use hodei_runtime::Backends;
use tonic::{Request, Response, Status};

use crate::SOURCE;
use crate::access::Auditor;
use crate::auth::caller;
use crate::errors::{ApiError, IntoStatus};
use crate::request;

/// Workers are the fleet's, not a tenant's: every role reads them; draining one takes an
/// operator.
pub struct WorkerApi {
    backends: Backends,
    audit: Auditor,
}

impl WorkerApi {
    pub fn new(backends: Backends, audit: Auditor) -> Self {
        Self { backends, audit }
    }

    async fn drain(
        &self,
        who: &Principal,
        id: WorkerId,
        reason: String,
    ) -> Result<pb::DrainWorkerResponse, Status> {
        who.authorize(Action::Drain)
            .map_err(ApiError::from)
            .into_status()?;
        // `None`: no such worker; `Some((worker, false))`: it was draining already.
        let drained = self
            .backends
            .db_until_no_conflict(|| async {
                let Some(mut worker) =
                    hodei_storage::workers::get(&self.backends.pool, &id).await?
                else {
                    return Ok(None);
                };
                if worker.status() == WorkerStatus::Draining {
                    return Ok(Some((worker, false)));
                }
                let version = worker.version();
                let event = worker.drain(Utc::now())?;
                let command = AgentCommand::Drain {
                    reason: reason.clone(),
                };
                let messages = [
                    Outgoing::worker_event(&event, SOURCE)?,
                    Outgoing::agent_command(&id, &command)?,
                ];
                let mut tx = self.backends.pool.begin().await?;
                hodei_storage::workers::save_reservation(&mut tx, &worker, version).await?;
                hodei_storage::outbox::append(&mut tx, &messages).await?;
                tx.commit().await?;
                Ok(Some((worker, true)))
            })
            .await
            .into_status()?;
        let Some((worker, requested)) = drained else {
            return Err(ApiError::not_found(format!("worker {id}")).into());
        };
        if requested {
            self.backends.relay_wake.notify_one();
            tracing::info!(worker_id = %id, reason, by = %who.subject, "worker drain requested");
        }
        Ok(pb::DrainWorkerResponse {
            worker: Some((&worker).into()),
        })
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        caller(&request).into_status()?;
        let req = request.into_inner();
        let limit = request::page_size(req.page_size).into_status()?;
        let statuses = request::enum_values(
            "statuses",
            "worker status",
            &req.statuses,
            hodei_proto::status_from_wire,
        )
        .into_status()?;
        let after: Option<WorkerId> = request::page_token(&req.page_token).into_status()?;
        let found = self
            .backends
            .db(|| {
                hodei_storage::workers::list(&self.backends.pool, &statuses, after.as_ref(), limit)
            })
            .await
            .into_status()?;
        let next_page_token = request::page_token_after(&found, limit, |w| w.id().to_string());
        Ok(Response::new(pb::ListWorkersResponse {
            workers: found.iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn get_worker(
        &self,
        request: Request<pb::GetWorkerRequest>,
    ) -> Result<Response<pb::GetWorkerResponse>, Status> {
        caller(&request).into_status()?;
        let id: WorkerId =
            request::id("worker_id", &request.into_inner().worker_id).into_status()?;
        let worker = self
            .backends
            .db(|| hodei_storage::workers::get(&self.backends.pool, &id))
            .await
            .into_status()?
            .ok_or_else(|| ApiError::not_found(format!("worker {id}")))?;
        Ok(Response::new(pb::GetWorkerResponse {
            worker: Some((&worker).into()),
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let id: WorkerId = request::id("worker_id", &req.worker_id).into_status()?;
        let reason = request::reason_or(req.reason, "drained by request").into_status()?;
        let result = self.drain(&who, id.clone(), reason).await;
        self.audit
            .answer(
                &who,
                &who.tenant,
                "DrainWorker",
                &format!("worker {id}"),
                result,
            )
            .await
    }
}
