//! Abuse limits per tenant, so one tenant's client cannot take the gateway from the others:
//! a submission rate (a token bucket per tenant: jobs, and pipeline runs, a second with a
//! burst) and a cap on the streams (watches, log follows, artifact downloads) a tenant holds
//! open at once. Both answer RESOURCE_EXHAUSTED, naming the limit. A stream also ends, with
//! UNAUTHENTICATED, once the credential it was opened with is revoked or expires. (Per connection, HTTP/2
//! caps concurrent streams and keepalive pings drop peers that went away; see `lib.rs`.)

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use hodei_domain::TenantId;
use tokio::sync::oneshot;
use tonic::Status;

use crate::auth::Credential;
use crate::errors::ApiError;

/// The limits, shared by every call.
pub struct Quotas {
    submissions: DefaultKeyedRateLimiter<TenantId>,
    rate: NonZeroU32,
    burst: NonZeroU32,
    streams: Mutex<HashMap<TenantId, u32>>,
    max_streams: u32,
}

impl Quotas {
    /// `rate` submissions a second per tenant with bursts of `burst`; at most `max_streams`
    /// streams open per tenant.
    pub fn new(rate: NonZeroU32, burst: NonZeroU32, max_streams: u32) -> Arc<Self> {
        Arc::new(Self {
            submissions: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            rate,
            burst,
            streams: Mutex::new(HashMap::new()),
            max_streams,
        })
    }

    /// Takes one submission from `tenant`'s bucket, or says when the next one is allowed.
    pub fn submit(&self, tenant: &TenantId) -> Result<(), ApiError> {
        self.submit_many(tenant, NonZeroU32::MIN)
    }

    /// Takes `n` submissions (the jobs of one call) from `tenant`'s bucket at once, or says
    /// when they are allowed; more than a burst never are.
    pub fn submit_many(&self, tenant: &TenantId, n: NonZeroU32) -> Result<(), ApiError> {
        match self.submissions.check_key_n(tenant, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::Exhausted(format!(
                    "tenant {tenant} submits more than {} a second (bursts of {}); retry in {} ms",
                    self.rate,
                    self.burst,
                    wait.as_millis().max(1)
                )))
            }
            Err(_) => Err(ApiError::Exhausted(format!(
                "{n} jobs in one call are more than tenant {tenant}'s burst of {} submissions; \
                 submit them in smaller calls",
                self.burst
            ))),
        }
    }

    /// Opens one of `tenant`'s streams; it is closed when the permit is dropped.
    pub fn open_stream(self: &Arc<Self>, tenant: &TenantId) -> Result<StreamPermit, ApiError> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| ApiError::unavailable("stream quota", "lock poisoned"))?;
        let open = streams.entry(tenant.clone()).or_insert(0);
        if *open >= self.max_streams {
            return Err(ApiError::Exhausted(format!(
                "tenant {tenant} has {open} streams open (limit {}); close one first",
                self.max_streams
            )));
        }
        *open += 1;
        Ok(StreamPermit {
            quotas: Arc::clone(self),
            tenant: tenant.clone(),
        })
    }
}

/// One open stream of a tenant's.
pub struct StreamPermit {
    quotas: Arc<Quotas>,
    tenant: TenantId,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Ok(mut streams) = self.quotas.streams.lock()
            && let Some(open) = streams.get_mut(&self.tenant)
        {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.tenant);
            }
        }
    }
}

/// A response stream that holds its tenant's permit until the client is done with it.
pub struct Permitted<S> {
    inner: S,
    _permit: StreamPermit,
    /// Says why the caller's credential no longer authenticates, once it does not.
    revoked: Option<oneshot::Receiver<Status>>,
    /// The stream ended on its credential.
    ended: bool,
}

/// How often a stream's credential is authenticated again while the stream lasts. With the
/// token cache's [`crate::auth::TOKEN_CACHE_TTL`], a stream outlives its token's revocation
/// or expiry by at most the sum of the two.
pub const CREDENTIAL_RECHECK: Duration = Duration::from_secs(5);

impl<S> Permitted<S> {
    /// `inner`, holding `permit`, ended with UNAUTHENTICATED once `credential` (the one the
    /// call was made with) no longer authenticates: a stream may last days, its token not.
    pub fn new(inner: S, permit: StreamPermit, credential: Option<Credential>) -> Self {
        let revoked = credential.map(|credential| {
            let (tx, rx) = oneshot::channel();
            tokio::spawn(recheck(credential, tx));
            rx
        });
        Self {
            inner,
            _permit: permit,
            revoked,
            ended: false,
        }
    }
}

/// Authenticates `credential` every [`CREDENTIAL_RECHECK`] until it fails (sent on `tx`) or
/// the stream is gone. A check that cannot be made (the database away) is no evidence against
/// the caller: the next one decides.
async fn recheck(credential: Credential, mut tx: oneshot::Sender<Status>) {
    let mut tick = tokio::time::interval(CREDENTIAL_RECHECK);
    tick.tick().await;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            _ = tick.tick() => {}
        }
        match credential.check().await {
            Ok(_) => {}
            Err(ApiError::Unauthenticated(why)) => {
                let _ = tx.send(Status::unauthenticated(why));
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "a stream's credential could not be checked");
            }
        }
    }
}

impl<T, S: futures::Stream<Item = Result<T, Status>> + Unpin> futures::Stream for Permitted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(revoked) = self.revoked.as_mut()
            && let Poll::Ready(told) = Pin::new(revoked).poll(cx)
        {
            self.revoked = None;
            if let Ok(status) = told {
                self.ended = true;
                return Poll::Ready(Some(Err(status)));
            }
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn a_tenant_over_its_rate_is_refused_without_touching_another() {
        let quotas = Quotas::new(n(1), n(3), 10);
        let (a, b): (TenantId, TenantId) = ("a".parse().unwrap(), "b".parse().unwrap());
        for _ in 0..3 {
            quotas.submit(&a).unwrap();
        }
        let refused = quotas.submit(&a).unwrap_err().to_string();
        assert!(
            refused.contains("tenant a submits more than 1 a second (bursts of 3)"),
            "{refused}"
        );
        quotas.submit(&b).unwrap();
    }

    #[test]
    fn streams_are_counted_until_their_permits_drop() {
        let quotas = Quotas::new(n(1), n(1), 2);
        let a: TenantId = "a".parse().unwrap();
        let first = quotas.open_stream(&a).unwrap();
        let _second = quotas.open_stream(&a).unwrap();
        let refused = quotas.open_stream(&a).err().unwrap().to_string();
        assert!(refused.contains("2 streams open (limit 2)"), "{refused}");
        quotas.open_stream(&"b".parse().unwrap()).unwrap();
        drop(first);
        quotas.open_stream(&a).unwrap();
    }
}
