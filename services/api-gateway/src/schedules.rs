//! `hodei.v1.ScheduleService`: create, get, list, pause, resume, delete and trigger schedules.
//! The scheduler replicas fire the ticks (`hodei_storage::driver::fire_due_schedules`).

use std::sync::Arc;

use chrono::Utc;
use hodei_domain::{
    Action, PipelineRunId, Principal, Schedule, ScheduleEvent, ScheduleEventKind, ScheduleId,
    ScheduleTarget, TickOutcome, TickRecord,
};
use hodei_messaging::Outgoing;
use hodei_proto::v1 as pb;
use hodei_proto::v1::schedule_service_server::ScheduleService;
use hodei_runtime::Backends;
use hodei_storage::driver::Triggered;
use hodei_storage::{StorageError, driver, outbox, schedules};
use tonic::{Request, Response, Status};

use crate::SOURCE;
use crate::access::{self, Auditor};
use crate::auth::caller;
use crate::errors::{ApiError, IntoStatus};
use crate::limits::TransportLimits;
use crate::quotas::Quotas;
use crate::request;
use crate::secrets::Secrets;

pub struct ScheduleApi {
    backends: Backends,
    secrets: Secrets,
    audit: Auditor,
    quotas: Arc<Quotas>,
}

/// How a pause or a resume changes a schedule.
#[derive(Clone, Copy)]
enum Switch {
    Pause,
    Resume,
}

impl ScheduleApi {
    pub fn new(backends: Backends, secrets: Secrets, audit: Auditor, quotas: Arc<Quotas>) -> Self {
        Self {
            backends,
            secrets,
            audit,
            quotas,
        }
    }

    /// The schedule a request names (its id, or its name in `tenant`), if `who` may see it.
    async fn find(
        &self,
        who: &Principal,
        schedule: &str,
        tenant: &str,
    ) -> Result<Schedule, ApiError> {
        let named = request::filter_text(
            "schedule",
            request::required_text("schedule", schedule)?,
            request::MAX_FILTER_BYTES,
        )?;
        let found = match named.parse::<ScheduleId>() {
            Ok(id) => {
                self.backends
                    .db(|| schedules::get(&self.backends.pool, id))
                    .await?
            }
            Err(_) => {
                let tenant = who.acting_for(request::optional_tenant(tenant)?)?;
                self.backends
                    .db(|| schedules::get_by_name(&self.backends.pool, &tenant, named))
                    .await?
            }
        };
        found
            .filter(|s| who.sees(s.tenant()))
            .ok_or_else(|| ApiError::not_found(format!("schedule {named}")))
    }

    async fn create(
        &self,
        who: &Principal,
        req: pb::CreateScheduleRequest,
    ) -> Result<pb::CreateScheduleResponse, ApiError> {
        who.authorize(Action::Submit)?;
        let tenant = who.acting_for(request::optional_tenant(&req.tenant)?)?;
        let wire = request::required("spec", req.spec)?;
        let mut spec = hodei_proto::schedule_spec_from_wire("spec.", wire)?;
        let limits = TransportLimits::new(self.backends.nats.max_payload());
        spec.target = match spec.target {
            ScheduleTarget::Job { spec: job } => {
                let job = self.secrets.seal_job(*job)?;
                limits.check_job("spec.job.", &job)?;
                ScheduleTarget::Job {
                    spec: Box::new(job),
                }
            }
            ScheduleTarget::Pipeline { spec: pipeline } => {
                let pipeline = self.secrets.seal_pipeline(pipeline)?;
                let run = PipelineRunId::new();
                let (probe, event) =
                    hodei_domain::PipelineRun::submit(run, tenant.clone(), pipeline, Utc::now());
                let announced = Outgoing::pipeline_event(&event, SOURCE)?;
                limits.check_pipeline(probe.spec(), run, std::slice::from_ref(&announced))?;
                crate::limits::check_run_steps(&probe)?;
                ScheduleTarget::Pipeline {
                    spec: probe.spec().clone(),
                }
            }
        };
        let cadence = spec.validate()?;
        let (schedule, event) = Schedule::create(
            ScheduleId::new(),
            tenant,
            spec,
            &cadence,
            req.paused,
            Utc::now(),
            hodei_resilience::random_unit(),
        );
        if schedule.next_tick().is_none() {
            return Err(ApiError::field(
                "spec.cron",
                format!("{:?} has no tick after now", schedule.spec().cron),
            ));
        }
        let message = Outgoing::schedule_event(&event, SOURCE)?;
        let created = self
            .backends
            .db(|| async {
                let mut tx = self.backends.pool.begin().await?;
                if !schedules::insert(&mut tx, &schedule).await? {
                    return Ok(false);
                }
                outbox::append(&mut tx, std::slice::from_ref(&message)).await?;
                tx.commit().await?;
                Ok(true)
            })
            .await?;
        if !created {
            return Err(ApiError::AlreadyExists(format!(
                "tenant {} already has a schedule named {}",
                schedule.tenant(),
                schedule.spec().name
            )));
        }
        self.backends.relay_wake.notify_one();
        tracing::info!(schedule_id = %schedule.id(), name = %schedule.spec().name, cron = %schedule.spec().cron, by = %who.subject, "schedule created");
        Ok(pb::CreateScheduleResponse {
            schedule: Some((&schedule).into()),
        })
    }

    async fn switch(
        &self,
        who: &Principal,
        named: &str,
        tenant: &str,
        switch: Switch,
    ) -> Result<Schedule, ApiError> {
        who.authorize(Action::Submit)?;
        let id = self.find(who, named, tenant).await?.id();
        let saved = self
            .backends
            .db_until_no_conflict(|| async {
                let mut tx = self.backends.pool.begin().await?;
                let Some(mut schedule) = schedules::lock(&mut tx, id).await? else {
                    return Ok(None);
                };
                let version = schedule.version();
                let now = Utc::now();
                match switch {
                    Switch::Pause => {
                        if let Some(event) = schedule.pause(now) {
                            schedules::save(&mut tx, &schedule, version).await?;
                            outbox::append(&mut tx, &[Outgoing::schedule_event(&event, SOURCE)?])
                                .await?;
                        }
                    }
                    Switch::Resume => {
                        driver::resume_schedule(
                            &mut tx,
                            &mut schedule,
                            now,
                            hodei_resilience::random_unit(),
                            SOURCE,
                        )
                        .await?;
                    }
                }
                tx.commit().await?;
                Ok(Some(schedule))
            })
            .await?;
        self.backends.relay_wake.notify_one();
        saved.ok_or_else(|| ApiError::not_found(format!("schedule {named}")))
    }

    /// Deletes it; answers the tenant it belonged to.
    async fn delete(
        &self,
        who: &Principal,
        named: &str,
        tenant: &str,
    ) -> Result<hodei_domain::TenantId, ApiError> {
        who.authorize(Action::Submit)?;
        let found = self.find(who, named, tenant).await?;
        let id = found.id();
        let event = ScheduleEvent::new(id, Utc::now(), ScheduleEventKind::Deleted);
        let message = Outgoing::schedule_event(&event, SOURCE)?;
        let deleted = self
            .backends
            .db(|| async {
                let mut tx = self.backends.pool.begin().await?;
                if !schedules::delete(&mut tx, id).await? {
                    return Ok(false);
                }
                outbox::append(&mut tx, std::slice::from_ref(&message)).await?;
                tx.commit().await?;
                Ok(true)
            })
            .await?;
        if !deleted {
            return Err(ApiError::not_found(format!("schedule {named}")));
        }
        self.backends.relay_wake.notify_one();
        tracing::info!(schedule_id = %id, by = %who.subject, "schedule deleted");
        Ok(found.tenant().clone())
    }

    async fn trigger(
        &self,
        who: &Principal,
        named: &str,
        tenant: &str,
        key: &str,
    ) -> Result<pb::TriggerScheduleResponse, ApiError> {
        who.authorize(Action::Submit)?;
        let key = (!key.is_empty()).then_some(key);
        if key.is_some_and(|k| !hodei_domain::spec::is_idempotency_key(k)) {
            return Err(ApiError::field(
                "idempotency_key",
                hodei_domain::spec::IDEMPOTENCY_KEY_RULE,
            ));
        }
        let found = self.find(who, named, tenant).await?;
        self.quotas.submit(found.tenant())?;
        let triggered = self
            .backends
            .db(|| driver::trigger_schedule(&self.backends.pool, found.id(), key, SOURCE))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("schedule {named}")))?;
        let (schedule, tick) = match triggered {
            Triggered::Now(handled) => {
                self.backends.relay_wake.notify_one();
                let tick = handled.events.iter().find_map(tick_of).ok_or_else(|| {
                    ApiError::Storage(StorageError::Conflict {
                        what: format!("trigger of schedule {named}"),
                    })
                })?;
                tracing::info!(schedule_id = %found.id(), outcome = %tick.outcome, by = %who.subject, "schedule triggered");
                (handled.schedule, tick)
            }
            Triggered::Again { schedule, tick } => {
                tracing::info!(schedule_id = %found.id(), tick = %tick.tick, by = %who.subject, "schedule trigger repeated with the same idempotency key; nothing done");
                (schedule, tick)
            }
        };
        Ok(pb::TriggerScheduleResponse {
            schedule: Some((&schedule).into()),
            tick: Some((&tick).into()),
        })
    }
}

/// The tick record a fired or skipped event stands for.
fn tick_of(event: &ScheduleEvent) -> Option<TickRecord> {
    match &event.kind {
        ScheduleEventKind::Fired {
            tick,
            manual,
            job_id,
            run_id,
            cancelled,
        } => Some(TickRecord {
            tick: *tick,
            outcome: if *manual {
                TickOutcome::Triggered
            } else {
                TickOutcome::Fired
            },
            handled_at: event.at,
            job_id: *job_id,
            run_id: *run_id,
            detail: hodei_domain::schedule::cancelled_detail(cancelled),
        }),
        ScheduleEventKind::Skipped { tick, reason } => Some(TickRecord {
            tick: *tick,
            outcome: TickOutcome::Skipped,
            handled_at: event.at,
            job_id: None,
            run_id: None,
            detail: reason.clone(),
        }),
        _ => None,
    }
}

#[tonic::async_trait]
impl ScheduleService for ScheduleApi {
    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::CreateScheduleResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let name = req
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let result = self.create(&who, req).await.into_status();
        let target = match &result {
            Ok(pb::CreateScheduleResponse {
                schedule: Some(s), ..
            }) => format!("schedule {}", s.id),
            _ => format!("schedule {name}"),
        };
        self.audit
            .answer(&who, &tenant, "CreateSchedule", &target, result)
            .await
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn get_schedule(
        &self,
        request: Request<pb::GetScheduleRequest>,
    ) -> Result<Response<pb::GetScheduleResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        who.authorize(Action::Read)
            .map_err(ApiError::from)
            .into_status()?;
        let schedule = self
            .find(&who, &req.schedule, &req.tenant)
            .await
            .into_status()?;
        let limit = i64::from(schedule.spec().history_limit);
        let ticks = self
            .backends
            .db(|| schedules::ticks(&self.backends.pool, schedule.id(), limit))
            .await
            .into_status()?;
        let mut wire = pb::Schedule::from(&schedule);
        wire.recent_ticks = ticks.iter().map(Into::into).collect();
        Ok(Response::new(pb::GetScheduleResponse {
            schedule: Some(wire),
        }))
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        who.authorize(Action::Read)
            .map_err(ApiError::from)
            .into_status()?;
        let tenant = request::optional_tenant(&req.tenant)
            .and_then(|named| Ok(who.listing_scope(named)?))
            .into_status()?;
        let limit = request::page_size(req.page_size).into_status()?;
        let after = request::page_token(&req.page_token).into_status()?;
        let found = self
            .backends
            .db(|| {
                schedules::list(
                    &self.backends.pool,
                    tenant.as_ref(),
                    after,
                    i64::from(limit),
                )
            })
            .await
            .into_status()?;
        // Each schedule carries its template, up to NATS' `max_payload`: a page is cut where
        // the answer would pass what a client reads.
        let (schedules, next_page_token) =
            request::fit_page(&found, found.iter().map(Into::into).collect(), limit, |s| {
                s.id().to_string()
            });
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Result<Response<pb::PauseScheduleResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = self
            .switch(&who, &req.schedule, &req.tenant, Switch::Pause)
            .await;
        let tenant = result.as_ref().map_or(tenant, |s| s.tenant().clone());
        let result = result
            .map(|s| pb::PauseScheduleResponse {
                schedule: Some((&s).into()),
            })
            .into_status();
        let target = format!("schedule {}", req.schedule);
        self.audit
            .answer(&who, &tenant, "PauseSchedule", &target, result)
            .await
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::ResumeScheduleResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = self
            .switch(&who, &req.schedule, &req.tenant, Switch::Resume)
            .await;
        let tenant = result.as_ref().map_or(tenant, |s| s.tenant().clone());
        let result = result
            .map(|s| pb::ResumeScheduleResponse {
                schedule: Some((&s).into()),
            })
            .into_status();
        let target = format!("schedule {}", req.schedule);
        self.audit
            .answer(&who, &tenant, "ResumeSchedule", &target, result)
            .await
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = self.delete(&who, &req.schedule, &req.tenant).await;
        let tenant = result.as_ref().map_or(tenant, Clone::clone);
        let result = result.map(|_| pb::DeleteScheduleResponse {}).into_status();
        let target = format!("schedule {}", req.schedule);
        self.audit
            .answer(&who, &tenant, "DeleteSchedule", &target, result)
            .await
    }

    #[tracing::instrument(skip_all, fields(hodei.service = "api-gateway"))]
    async fn trigger_schedule(
        &self,
        request: Request<pb::TriggerScheduleRequest>,
    ) -> Result<Response<pb::TriggerScheduleResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = access::named_tenant(&who, &req.tenant);
        let result = self
            .trigger(&who, &req.schedule, &req.tenant, &req.idempotency_key)
            .await;
        let tenant = match &result {
            Ok(pb::TriggerScheduleResponse {
                schedule: Some(s), ..
            }) => request::tenant(&s.tenant).unwrap_or(tenant),
            _ => tenant,
        };
        let result = result.into_status();
        let target = format!("schedule {}", req.schedule);
        self.audit
            .answer(&who, &tenant, "TriggerSchedule", &target, result)
            .await
    }
}
