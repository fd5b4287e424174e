//! `hodei.v1.WorkerService`: the fleet as the registry recorded it.

use chrono::Utc;
use hodei_domain::{WorkerId, WorkerStatus};
use hodei_messaging::{AgentCommand, Outgoing};
use hodei_proto::v1 as pb;
use hodei_proto::v1::worker_service_server::WorkerService;
use hodei_runtime::Backends;
use tonic::{Request, Response, Status};

use crate::jobs::page_token_after;
use crate::{SOURCE, errors};

pub struct WorkerApi {
    backends: Backends,
}

impl WorkerApi {
    pub fn new(backends: Backends) -> Self {
        Self { backends }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let req = request.into_inner();
        let limit = crate::jobs::page_size(req.page_size)?;
        let statuses = req
            .statuses
            .iter()
            .map(|s| {
                hodei_proto::status_from_wire(*s).ok_or_else(|| {
                    Status::invalid_argument(format!("statuses: unknown worker status {s}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let after: Option<WorkerId> = if req.page_token.is_empty() {
            None
        } else {
            Some(
                req.page_token
                    .parse()
                    .map_err(|e| errors::invalid_id("page_token", &e))?,
            )
        };
        let found = self
            .backends
            .db(|| {
                hodei_storage::workers::list(&self.backends.pool, &statuses, after.as_ref(), limit)
            })
            .await
            .map_err(errors::storage)?;
        let next_page_token = page_token_after(&found, limit, |w| w.id().to_string());
        Ok(Response::new(pb::ListWorkersResponse {
            workers: found.iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn get_worker(
        &self,
        request: Request<pb::GetWorkerRequest>,
    ) -> Result<Response<pb::GetWorkerResponse>, Status> {
        let id: WorkerId = request
            .into_inner()
            .worker_id
            .parse()
            .map_err(|e| errors::invalid_id("worker_id", &e))?;
        let worker = self
            .backends
            .db(|| hodei_storage::workers::get(&self.backends.pool, &id))
            .await
            .map_err(errors::storage)?
            .ok_or_else(|| Status::not_found(format!("worker {id} not found")))?;
        Ok(Response::new(pb::GetWorkerResponse {
            worker: Some((&worker).into()),
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let req = request.into_inner();
        let id: WorkerId = req
            .worker_id
            .parse()
            .map_err(|e| errors::invalid_id("worker_id", &e))?;
        let reason = if req.reason.is_empty() {
            "drained by request".to_owned()
        } else {
            req.reason
        };
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
            .map_err(errors::storage)?;
        let Some((worker, requested)) = drained else {
            return Err(Status::not_found(format!("worker {id} not found")));
        };
        if requested {
            self.backends.relay_wake.notify_one();
            tracing::info!(worker_id = %id, reason, "worker drain requested");
        }
        Ok(Response::new(pb::DrainWorkerResponse {
            worker: Some((&worker).into()),
        }))
    }
}
