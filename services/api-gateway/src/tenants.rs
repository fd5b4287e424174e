//! `hodei.v1.TenantService`: tenants' weights and quotas (set by admins, kept in PostgreSQL),
//! and the view of every tenant's share of the fleet. The scheduler enforces them at placement
//! (`hodei_scheduler::placement`), the submission path the queue quota
//! (`hodei_storage::driver::submit_jobs`).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use hodei_domain::{Action, Principal, Shares, TenantId, TenantPolicy};
use hodei_proto::v1 as pb;
use hodei_proto::v1::tenant_service_server::TenantService;
use hodei_runtime::Backends;
use hodei_storage::{StorageError, tenants, workers};
use tonic::{Request, Response, Status};

use crate::access::{Auditor, named_tenant};
use crate::auth::caller;
use crate::errors::{ApiError, IntoStatus};
use crate::request;

pub struct TenantApi {
    backends: Backends,
    audit: Auditor,
}

/// What the view is made of, read together.
struct Snapshot {
    shares: Shares,
    queued: HashMap<TenantId, u64>,
    set_at: HashMap<TenantId, DateTime<Utc>>,
}

fn policy_from_wire(wire: pb::TenantPolicy) -> Result<TenantPolicy, ApiError> {
    let policy = TenantPolicy {
        weight: if wire.weight == 0 { 1 } else { wire.weight },
        max_queued_jobs: wire.max_queued_jobs,
        max_running_jobs: wire.max_running_jobs,
        max_cpu_millis: wire.max_cpu_millis,
        max_memory_mb: wire.max_memory_mb,
        max_priority: wire.max_priority,
    };
    policy
        .validate()
        .map_err(|e| ApiError::from(hodei_domain::DomainError::Invalid(e)))?;
    Ok(policy)
}

fn policy_to_wire(p: &TenantPolicy) -> pb::TenantPolicy {
    pb::TenantPolicy {
        weight: p.weight,
        max_queued_jobs: p.max_queued_jobs,
        max_running_jobs: p.max_running_jobs,
        max_cpu_millis: p.max_cpu_millis,
        max_memory_mb: p.max_memory_mb,
        max_priority: p.max_priority,
    }
}

impl TenantApi {
    pub fn new(backends: Backends, audit: Auditor) -> Self {
        Self { backends, audit }
    }

    async fn snapshot(&self) -> Result<Snapshot, StorageError> {
        let pool = &self.backends.pool;
        let mut set_at = HashMap::new();
        let mut policies = HashMap::new();
        for (tenant, policy, at) in tenants::list_policies(pool).await? {
            set_at.insert(tenant.clone(), at);
            policies.insert(tenant, policy);
        }
        Ok(Snapshot {
            shares: Shares {
                capacity: workers::capacity(pool).await?,
                policies,
                usage: tenants::usage(pool, None).await?,
            },
            queued: tenants::queued(pool, None, &[]).await?,
            set_at,
        })
    }

    /// The view's lines for `only` (every tenant listed when `None`).
    fn lines(snapshot: &Snapshot, only: Option<&TenantId>) -> Vec<pb::Tenant> {
        let named: BTreeSet<TenantId> = snapshot
            .queued
            .keys()
            .chain(snapshot.shares.policies.keys())
            .chain(only)
            .cloned()
            .collect();
        let named: Vec<TenantId> = named.into_iter().collect();
        snapshot
            .shares
            .view(&named)
            .into_iter()
            .filter(|line| only.is_none_or(|t| &line.tenant == t))
            .map(|line| {
                let policy = snapshot
                    .shares
                    .policies
                    .get(&line.tenant)
                    .cloned()
                    .unwrap_or_default();
                pb::Tenant {
                    policy: Some(policy_to_wire(&policy)),
                    policy_updated_at: snapshot
                        .set_at
                        .get(&line.tenant)
                        .map(|t| hodei_proto::timestamp(*t)),
                    queued_jobs: snapshot.queued.get(&line.tenant).copied().unwrap_or(0),
                    running_jobs: line.usage.running_jobs,
                    cpu_millis_in_use: line.usage.cpu_millis,
                    memory_mb_in_use: line.usage.memory_mb,
                    share: line.share,
                    entitled_share: line.entitled,
                    tenant: line.tenant.to_string(),
                }
            })
            .collect()
    }

    async fn one(&self, tenant: &TenantId) -> Result<pb::Tenant, ApiError> {
        let snapshot = self.backends.db(|| self.snapshot()).await?;
        Self::lines(&snapshot, Some(tenant))
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::not_found(format!("tenant {tenant}")))
    }

    async fn set(
        &self,
        who: &Principal,
        req: pb::SetTenantPolicyRequest,
    ) -> Result<pb::SetTenantPolicyResponse, ApiError> {
        who.authorize(Action::Administer)?;
        let tenant = request::tenant(request::required_text("tenant", &req.tenant)?)?;
        let policy = policy_from_wire(request::required("policy", req.policy)?)?;
        self.backends
            .db(|| tenants::set_policy(&self.backends.pool, &tenant, &policy, Utc::now()))
            .await?;
        tracing::info!(tenant = %tenant, weight = policy.weight, by = %who.subject, "tenant policy set");
        Ok(pb::SetTenantPolicyResponse {
            tenant: Some(self.one(&tenant).await?),
        })
    }

    async fn delete(
        &self,
        who: &Principal,
        req: pb::DeleteTenantPolicyRequest,
    ) -> Result<pb::DeleteTenantPolicyResponse, ApiError> {
        who.authorize(Action::Administer)?;
        let tenant = request::tenant(request::required_text("tenant", &req.tenant)?)?;
        let deleted = self
            .backends
            .db(|| tenants::delete_policy(&self.backends.pool, &tenant))
            .await?;
        if !deleted {
            return Err(ApiError::not_found(format!("policy of tenant {tenant}")));
        }
        tracing::info!(tenant = %tenant, by = %who.subject, "tenant policy removed");
        Ok(pb::DeleteTenantPolicyResponse {})
    }
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn set_tenant_policy(
        &self,
        request: Request<pb::SetTenantPolicyRequest>,
    ) -> Result<Response<pb::SetTenantPolicyResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = named_tenant(&who, &req.tenant);
        let target = format!("tenant {tenant}");
        let result = self.set(&who, req).await.into_status();
        self.audit
            .answer(&who, &tenant, "SetTenantPolicy", &target, result)
            .await
    }

    async fn delete_tenant_policy(
        &self,
        request: Request<pb::DeleteTenantPolicyRequest>,
    ) -> Result<Response<pb::DeleteTenantPolicyResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        let tenant = named_tenant(&who, &req.tenant);
        let target = format!("tenant {tenant}");
        let result = self.delete(&who, req).await.into_status();
        self.audit
            .answer(&who, &tenant, "DeleteTenantPolicy", &target, result)
            .await
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let who = caller(&request).into_status()?;
        who.authorize(Action::Read)
            .map_err(ApiError::from)
            .into_status()?;
        let req = request.into_inner();
        let tenant = who
            .acting_for(request::optional_tenant(&req.tenant).into_status()?)
            .map_err(ApiError::from)
            .into_status()?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(self.one(&tenant).await.into_status()?),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let who = caller(&request).into_status()?;
        who.authorize(Action::Read)
            .map_err(ApiError::from)
            .into_status()?;
        let snapshot = self.backends.db(|| self.snapshot()).await.into_status()?;
        let tenants = Self::lines(&snapshot, None)
            .into_iter()
            .filter(|line| {
                line.tenant
                    .parse::<TenantId>()
                    .is_ok_and(|tenant| who.sees(&tenant))
            })
            .collect();
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }
}
