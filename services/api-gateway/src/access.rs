//! `hodei.v1.AccessService` (who am I, tokens, the audit log) and the audit trail every
//! mutating call leaves: who made it, for which tenant, on what, and how it ended.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Duration, Utc};
use hodei_auth::token;
use hodei_domain::{Action, Principal, Role, TenantId, TokenId, text};
use hodei_proto::v1 as pb;
use hodei_proto::v1::access_service_server::AccessService;
use hodei_runtime::Backends;
use hodei_storage::access::{self, AuditEntry, TokenRecord};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Request, Response, Status};

use crate::auth::{Authenticator, caller};
use crate::errors::{ApiError, IntoStatus};
use crate::request;

/// Longest token name.
const MAX_TOKEN_NAME: usize = 200;

/// Most audit entries written in one statement.
const AUDIT_BATCH: usize = 512;

/// How long refusals for load are counted before their entry is written.
const REFUSALS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a stopping gateway waits for the audit writer's last entries.
const AUDIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// The audit trail. Calls hand their entries to one writer, which records every entry waiting
/// at that moment in one statement, and are answered once theirs is committed: group commit,
/// as for submissions, so auditing costs no transaction per call.
///
/// Refusals for load (RESOURCE_EXHAUSTED: the queue is full, the tenant's queue quota is
/// reached, the tenant calls faster than its rate) are the exception. Shedding load must stay
/// cheap, and such a call had no effect, so it is answered at once, and the writer records
/// the refusals of each caller, role, tenant, action and target once a second as one entry
/// that says how many there were. A graceful stop writes those still counted
/// ([`AuditWriter::stop`]); a crash loses up to a second of them.
#[derive(Clone)]
pub struct Auditor {
    queue: mpsc::Sender<(AuditEntry, oneshot::Sender<()>)>,
    refusals: Arc<Mutex<Refusals>>,
}

/// The task that writes the audit trail, until [`AuditWriter::stop`].
pub struct AuditWriter {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AuditWriter {
    /// Writes the entries waiting and the refusals still counted, and stops the writer; gives
    /// up after [`AUDIT_FLUSH`] (PostgreSQL away), saying so in the log. Entries handed over
    /// afterwards are not recorded, and logged as lost.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(AUDIT_FLUSH, self.task).await.is_err() {
            tracing::error!(
                waited_ms = AUDIT_FLUSH.as_millis() as u64,
                "audit writer did not finish writing before the stop; its last entries are lost"
            );
        }
    }
}

impl Auditor {
    /// Starts the writer; it runs until [`AuditWriter::stop`] (or once every [`Auditor`] is
    /// gone), and then writes what it holds.
    pub fn start(backends: Backends) -> (Self, AuditWriter) {
        let (queue, mut waiting) = mpsc::channel::<(AuditEntry, oneshot::Sender<()>)>(4096);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let refusals = Arc::new(Mutex::new(Refusals::default()));
        let counted = Arc::clone(&refusals);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(AUDIT_BATCH);
            let mut tick = tokio::time::interval(REFUSALS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    received = waiting.recv_many(&mut batch, AUDIT_BATCH) => {
                        if received == 0 {
                            break;
                        }
                        write_acked(&backends, &mut batch).await;
                    }
                    _ = tick.tick() => {
                        let entries = take(&counted);
                        write(&backends, &entries).await;
                    }
                    _ = &mut stopped => {
                        waiting.close();
                        while waiting.recv_many(&mut batch, AUDIT_BATCH).await > 0 {
                            write_acked(&backends, &mut batch).await;
                        }
                        break;
                    }
                }
            }
            let entries = take(&counted);
            write(&backends, &entries).await;
        });
        (Self { queue, refusals }, AuditWriter { stop, task })
    }

    /// Records the call like [`Auditor::record`] and answers it with `result`.
    pub async fn answer<T>(
        &self,
        who: &Principal,
        tenant: &TenantId,
        action: &str,
        target: &str,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        match &result {
            Err(status) if status.code() == Code::ResourceExhausted => {
                let entry = entry(who, tenant, action, target, &result);
                self.refusals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .count(entry);
            }
            _ => self.record(who, tenant, action, target, &result).await,
        }
        result.map(Response::new)
    }

    /// Records a call `who` made for `tenant`: `action` (the RPC) on `target`, ending in
    /// `result`. Returns once the entry is committed (or its loss logged).
    async fn record<T>(
        &self,
        who: &Principal,
        tenant: &TenantId,
        action: &str,
        target: &str,
        result: &Result<T, Status>,
    ) {
        let entry = entry(who, tenant, action, target, result);
        let (ack, acked) = oneshot::channel();
        if self.queue.send((entry, ack)).await.is_err() {
            tracing::error!(action, target, subject = %who.subject, "audit writer stopped; entry not recorded");
            return;
        }
        let _ = acked.await;
    }
}

/// Appends `entries` to the audit log. The calls already had their effect: a failure is
/// loud in the log with every entry's who and what, and fails nothing.
async fn write(backends: &Backends, entries: &[AuditEntry]) {
    if entries.is_empty() {
        return;
    }
    let pool = &backends.pool;
    if let Err(e) = backends.db(|| access::record_audit(pool, entries)).await {
        for entry in entries {
            tracing::error!(error = %e, action = %entry.action, target = %entry.target, subject = %entry.subject, "audit entry not recorded");
        }
    }
}

/// Writes the entries of `batch` (emptying it) and tells each caller that its entry is done.
async fn write_acked(backends: &Backends, batch: &mut Vec<(AuditEntry, oneshot::Sender<()>)>) {
    let (entries, done): (Vec<AuditEntry>, Vec<oneshot::Sender<()>>) = batch.drain(..).unzip();
    write(backends, &entries).await;
    for ack in done {
        let _ = ack.send(());
    }
}

/// The refusals counted so far, as entries; the count starts again.
fn take(refusals: &Mutex<Refusals>) -> Vec<AuditEntry> {
    refusals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// Refusals for load since the last write, by who, for which tenant, which action on what.
#[derive(Debug, Default)]
struct Refusals(HashMap<(String, TenantId, Role, String, String), Counted>);

/// Refusals of one caller, tenant, action and target.
#[derive(Debug)]
struct Counted {
    /// The first one's entry.
    first: AuditEntry,
    count: u64,
    last_at: DateTime<Utc>,
    last_detail: String,
}

impl Refusals {
    fn count(&mut self, entry: AuditEntry) {
        let key = (
            entry.subject.clone(),
            entry.tenant.clone(),
            entry.role,
            entry.action.clone(),
            entry.target.clone(),
        );
        match self.0.entry(key) {
            Entry::Occupied(mut seen) => {
                let counted = seen.get_mut();
                counted.count += 1;
                counted.last_at = entry.at;
                counted.last_detail = entry.detail;
            }
            Entry::Vacant(new) => {
                new.insert(Counted {
                    last_at: entry.at,
                    last_detail: entry.detail.clone(),
                    first: entry,
                    count: 1,
                });
            }
        }
    }

    /// One entry per caller, tenant, action and target: at the first refusal, saying how many
    /// there were until when and what the last one said (a single refusal reads as any other
    /// refused call).
    fn take(&mut self) -> Vec<AuditEntry> {
        self.0
            .drain()
            .map(|(_, c)| {
                let mut entry = c.first;
                if c.count > 1 {
                    entry.detail = format!(
                        "{} calls refused from {} to {}; the last: {}",
                        c.count,
                        entry
                            .at
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        c.last_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        c.last_detail
                    );
                }
                entry
            })
            .collect()
    }
}

/// Longest target an audit entry keeps, in bytes (a target may repeat what the caller sent).
const MAX_AUDIT_TARGET_BYTES: usize = 1024;
/// Longest detail an audit entry keeps, in bytes (a refusal's message may repeat a field).
const MAX_AUDIT_DETAIL_BYTES: usize = 4096;

/// The audit log's entry for a call `who` made for `tenant`: `action` on `target`, ending in
/// `result`. What may repeat the caller's input is made storable (no NUL, cut to a bound):
/// entries are written many in one statement, which one bad entry would fail for all.
pub fn entry<T>(
    who: &Principal,
    tenant: &TenantId,
    action: &str,
    target: &str,
    result: &Result<T, Status>,
) -> AuditEntry {
    let (outcome, detail) = match result {
        Ok(_) => ("ok".to_owned(), String::new()),
        Err(status) => (
            format!("{:?}", status.code()),
            text::storable(status.message(), MAX_AUDIT_DETAIL_BYTES),
        ),
    };
    AuditEntry {
        at: Utc::now(),
        subject: text::storable(&who.subject, MAX_AUDIT_TARGET_BYTES),
        tenant: tenant.clone(),
        role: who.role,
        action: action.to_owned(),
        target: text::storable(target, MAX_AUDIT_TARGET_BYTES),
        outcome,
        detail,
    }
}

/// The tenant a request's `tenant` field has the call act for, as the audit log records it
/// (the caller's own when it names none or names one that is not a tenant id).
pub fn named_tenant(who: &Principal, field: &str) -> TenantId {
    request::optional_tenant(field)
        .ok()
        .flatten()
        .unwrap_or_else(|| who.tenant.clone())
}

/// The tenant a submission's `tenant` field names, once `who` may submit for it: its own
/// when the field is empty, another only for an admin.
pub fn submitting_for(who: &Principal, field: &str) -> Result<TenantId, ApiError> {
    who.authorize(Action::Submit)?;
    Ok(who.acting_for(request::optional_tenant(field)?)?)
}

fn token_to_wire(t: &TokenRecord) -> pb::ApiToken {
    pb::ApiToken {
        id: t.id.to_string(),
        name: t.name.clone(),
        tenant: t.tenant.to_string(),
        role: t.role.to_string(),
        created_by: t.created_by.clone(),
        created_at: Some(hodei_proto::timestamp(t.created_at)),
        expires_at: t.expires_at.map(hodei_proto::timestamp),
        revoked_at: t.revoked_at.map(hodei_proto::timestamp),
    }
}

pub struct AccessApi {
    backends: Backends,
    auth: Arc<Authenticator>,
    audit: Auditor,
}

impl AccessApi {
    pub fn new(backends: Backends, auth: Arc<Authenticator>, audit: Auditor) -> Self {
        Self {
            backends,
            auth,
            audit,
        }
    }

    async fn create_token(
        &self,
        who: &Principal,
        req: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, ApiError> {
        who.authorize(Action::Administer)?;
        let name = request::required_text("name", &req.name)?;
        if name.contains('\0') {
            return Err(ApiError::field("name", "must not contain NUL"));
        }
        if name.chars().count() > MAX_TOKEN_NAME {
            return Err(ApiError::field(
                "name",
                format!("is longer than {MAX_TOKEN_NAME} characters"),
            ));
        }
        let tenant = request::tenant(&req.tenant)?;
        let role: Role = request::required_text("role", &req.role)?
            .parse()
            .map_err(|e| ApiError::field("role", e))?;
        let now = Utc::now();
        let expires_at = match req.expires_in_seconds {
            0 => None,
            s => Some(
                i64::try_from(s)
                    .ok()
                    .and_then(Duration::try_seconds)
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or_else(|| ApiError::field("expires_in_seconds", "is too large"))?,
            ),
        };
        let minted = token::mint().map_err(|e| ApiError::unavailable("random source", e))?;
        let record = TokenRecord::new(name, tenant, role, &who.subject, now, expires_at);
        let pool = &self.backends.pool;
        self.backends
            .db(|| access::insert_token(pool, &record, &minted.hash))
            .await?;
        tracing::info!(token_id = %record.id, tenant = %record.tenant, role = %record.role, by = %who.subject, "token created");
        Ok(pb::CreateTokenResponse {
            token: Some(token_to_wire(&record)),
            secret: minted.secret,
        })
    }

    async fn revoke_token(
        &self,
        who: &Principal,
        id: TokenId,
    ) -> Result<pb::RevokeTokenResponse, ApiError> {
        who.authorize(Action::Administer)?;
        let pool = &self.backends.pool;
        let revoked = self
            .backends
            .db(|| access::revoke_token(pool, id, Utc::now()))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("token {id}")))?;
        self.auth.forget_tokens();
        tracing::info!(token_id = %id, by = %who.subject, "token revoked");
        Ok(pb::RevokeTokenResponse {
            token: Some(token_to_wire(&revoked)),
        })
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = caller(&request).into_status()?;
        Ok(Response::new(pb::WhoAmIResponse {
            subject: who.subject,
            tenant: who.tenant.to_string(),
            role: who.role.to_string(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = caller(&request).into_status()?;
        let req = request.into_inner();
        // The token's tenant (empty means `default`, as for the token itself).
        let tenant = request::tenant(&req.tenant).unwrap_or_else(|_| who.tenant.clone());
        let result = self.create_token(&who, req).await.into_status();
        let target = match &result {
            Ok(created) => created
                .token
                .as_ref()
                .map(|t| format!("token {} ({})", t.id, t.role))
                .unwrap_or_default(),
            Err(_) => "token".to_owned(),
        };
        self.audit
            .answer(&who, &tenant, "CreateToken", &target, result)
            .await
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let who = caller(&request).into_status()?;
        who.authorize(Action::Administer)
            .map_err(ApiError::from)
            .into_status()?;
        let tenant = request::optional_tenant(&request.get_ref().tenant).into_status()?;
        let pool = &self.backends.pool;
        let tokens = self
            .backends
            .db(|| access::list_tokens(pool, tenant.as_ref()))
            .await
            .into_status()?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(token_to_wire).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = caller(&request).into_status()?;
        let id: TokenId = request::id("token_id", &request.get_ref().token_id).into_status()?;
        let result = self.revoke_token(&who, id).await.into_status();
        let tenant = match &result {
            Ok(revoked) => revoked
                .token
                .as_ref()
                .and_then(|t| t.tenant.parse().ok())
                .unwrap_or_else(|| who.tenant.clone()),
            Err(_) => who.tenant.clone(),
        };
        self.audit
            .answer(&who, &tenant, "RevokeToken", &format!("token {id}"), result)
            .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let who = caller(&request).into_status()?;
        who.authorize(Action::Administer)
            .map_err(ApiError::from)
            .into_status()?;
        let req = request.into_inner();
        let tenant = request::optional_tenant(&req.tenant).into_status()?;
        let limit = request::page_size(req.page_size).into_status()?;
        let before = (!req.page_token.is_empty())
            .then(|| req.page_token.parse::<u64>())
            .transpose()
            .map_err(|_| ApiError::field("page_token", "is not a page token of this call"))
            .into_status()?;
        let pool = &self.backends.pool;
        let found = self
            .backends
            .db(|| access::audit_log(pool, tenant.as_ref(), before, limit))
            .await
            .into_status()?;
        let wire = found
            .iter()
            .cloned()
            .map(|r| pb::AuditEvent {
                id: r.id,
                at: Some(hodei_proto::timestamp(r.entry.at)),
                subject: r.entry.subject,
                tenant: r.entry.tenant.to_string(),
                role: r.entry.role.to_string(),
                action: r.entry.action,
                target: r.entry.target,
                outcome: r.entry.outcome,
                detail: r.entry.detail,
            })
            .collect();
        // Up to 4 KiB of detail and 1 KiB of target each: a page of 1,000 can pass what a
        // client reads, and is cut there.
        let (events, next_page_token) =
            request::fit_page(&found, wire, limit, |r| r.id.to_string());
        Ok(Response::new(pb::ListAuditEventsResponse {
            events,
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(subject: &str, second: i64, detail: &str) -> AuditEntry {
        AuditEntry {
            at: DateTime::from_timestamp(1_796_340_955 + second, 0).unwrap(),
            subject: subject.to_owned(),
            tenant: TenantId::default(),
            role: Role::Submitter,
            action: "SubmitJob".to_owned(),
            target: "job".to_owned(),
            outcome: "ResourceExhausted".to_owned(),
            detail: detail.to_owned(),
        }
    }

    /// Refusals for load become one entry per caller and what it did, saying how many; a
    /// single one reads as it was.
    #[test]
    fn refusals_are_counted_into_one_entry_per_caller() {
        let mut refusals = Refusals::default();
        refusals.count(refusal("token:a", 0, "queue full (3 queued)"));
        refusals.count(refusal("token:b", 1, "over its rate"));
        refusals.count(refusal("token:a", 1, "queue full (4 queued)"));
        refusals.count(refusal("token:a", 2, "queue full (5 queued)"));
        let mut entries = refusals.take();
        entries.sort_by(|x, y| x.subject.cmp(&y.subject));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].at, refusal("", 0, "").at);
        assert_eq!(
            entries[0].detail,
            "3 calls refused from 2026-12-03T23:35:55.000Z to 2026-12-03T23:35:57.000Z; the \
             last: queue full (5 queued)"
        );
        assert_eq!(entries[1].detail, "over its rate");
        assert!(refusals.take().is_empty());
    }
}
