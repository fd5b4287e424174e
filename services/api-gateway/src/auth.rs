//! Authentication: every call but health and reflection carries `authorization: Bearer …`,
//! an opaque Hodei token or an OIDC/JWT access token, or, behind a gateway that requires
//! client certificates, a certificate that names its principal (`hodei_auth::cert`).
//! [`AuthLayer`] resolves it to a
//! [`Principal`] before the call reaches its service, answering UNAUTHENTICATED (or
//! UNAVAILABLE when the token store cannot be read) itself, and hands the principal to the
//! handler in the request's extensions, where [`caller`] finds it.
//!
//! Opaque tokens are looked up by their hash and cached for [`TOKEN_CACHE_TTL`]; a revocation
//! made through this gateway takes effect at once, one made elsewhere within that time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::BoxFuture;
use hodei_auth::{JwtSettings, JwtVerifier, token};
use hodei_domain::Principal;
use hodei_runtime::Backends;
use hodei_storage::access::{self, TokenRecord};
use tonic::Status;

use crate::errors::ApiError;

/// How long a looked-up token is trusted without asking PostgreSQL again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);

/// Most tokens (known or unknown) cached at once; past it the cache starts over.
const TOKEN_CACHE_MAX: usize = 10_000;

/// How often an unknown JWT key id may make the gateway re-read the JWKS file.
const JWKS_RELOAD_EVERY: Duration = Duration::from_secs(10);

/// gRPC services that answer without credentials: what load balancers and stock tools use.
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// OIDC settings: the issuer and its keys.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub settings: JwtSettings,
    /// The JWKS file, re-read when a token names a key it does not hold.
    pub jwks_path: PathBuf,
}

/// Why the authenticator could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("failed to read the jwks file {path}: {reason}")]
pub struct JwksError {
    path: PathBuf,
    reason: String,
}

/// Token lookups by secret hash: when each was made and what it found (none: no such token).
type TokenCache = HashMap<Vec<u8>, (Instant, Option<TokenRecord>)>;

/// Resolves bearer credentials to principals.
pub struct Authenticator {
    backends: Backends,
    tokens: Mutex<TokenCache>,
    oidc: Option<Oidc>,
}

struct Oidc {
    config: OidcConfig,
    verifier: RwLock<Arc<JwtVerifier>>,
    /// When a token's unknown key id last made the JWKS be re-read.
    last_reread: Mutex<Option<Instant>>,
}

impl Oidc {
    fn read(config: &OidcConfig) -> Result<JwtVerifier, JwksError> {
        let error = |reason: String| JwksError {
            path: config.jwks_path.clone(),
            reason,
        };
        let jwks = std::fs::read_to_string(&config.jwks_path).map_err(|e| error(e.to_string()))?;
        JwtVerifier::new(config.settings.clone(), &jwks).map_err(|e| error(e.to_string()))
    }

    fn current(&self) -> Arc<JwtVerifier> {
        match self.verifier.read() {
            Ok(v) => Arc::clone(&v),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads the JWKS when a token names a key it lacks (the issuer rotated keys), at
    /// most every [`JWKS_RELOAD_EVERY`].
    fn verifier_for(&self, credential: &str) -> Arc<JwtVerifier> {
        let current = self.current();
        let Some(kid) = JwtVerifier::key_id(credential) else {
            return current;
        };
        if current.knows_key(&kid) {
            return current;
        }
        let Ok(mut last) = self.last_reread.lock() else {
            return current;
        };
        if last.is_some_and(|at| at.elapsed() < JWKS_RELOAD_EVERY) {
            return current;
        }
        *last = Some(Instant::now());
        match Oidc::read(&self.config) {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                if let Ok(mut slot) = self.verifier.write() {
                    *slot = Arc::clone(&fresh);
                }
                tracing::info!(path = %self.config.jwks_path.display(), "jwks re-read");
                fresh
            }
            Err(e) => {
                tracing::warn!(error = %e, "jwks could not be re-read; keeping the keys held");
                current
            }
        }
    }
}

impl Authenticator {
    pub fn new(backends: Backends, oidc: Option<OidcConfig>) -> Result<Self, JwksError> {
        let oidc = oidc
            .map(|config| {
                Oidc::read(&config).map(|verifier| Oidc {
                    verifier: RwLock::new(Arc::new(verifier)),
                    config,
                    last_reread: Mutex::new(None),
                })
            })
            .transpose()?;
        Ok(Self {
            backends,
            tokens: Mutex::new(HashMap::new()),
            oidc,
        })
    }

    /// The principal behind a request: its `authorization` header, else the client
    /// certificate (DER) the TLS handshake verified (only a gateway that requires client
    /// certificates has one).
    pub async fn authenticate(
        &self,
        authorization: Option<http::HeaderValue>,
        certificate: Option<Vec<u8>>,
    ) -> Result<Principal, ApiError> {
        let unauthenticated = |why: &str| ApiError::Unauthenticated(why.to_owned());
        let Some(value) = authorization else {
            return match certificate {
                Some(der) => hodei_auth::cert::principal(&der)
                    .map_err(|e| ApiError::Unauthenticated(e.to_string())),
                None => Err(unauthenticated(
                    "missing credentials: send authorization: Bearer <token>",
                )),
            };
        };
        let credential = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| unauthenticated("the authorization header is not Bearer <token>"))?;
        if token::is_opaque(credential) {
            return self.opaque(credential).await;
        }
        let Some(oidc) = &self.oidc else {
            return Err(unauthenticated(
                "unknown token (not a hodei_ token, and no OIDC issuer is configured)",
            ));
        };
        oidc.verifier_for(credential)
            .verify(credential)
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))
    }

    async fn opaque(&self, secret: &str) -> Result<Principal, ApiError> {
        let hash = token::hash(secret);
        let cached = self.tokens.lock().ok().and_then(|cache| {
            cache
                .get(&hash)
                .filter(|(at, _)| at.elapsed() < TOKEN_CACHE_TTL)
                .map(|(_, record)| record.clone())
        });
        let record = match cached {
            Some(record) => record,
            None => {
                let pool = &self.backends.pool;
                let record = self
                    .backends
                    .db(|| access::token_by_hash(pool, &hash))
                    .await?;
                if let Ok(mut cache) = self.tokens.lock() {
                    if cache.len() >= TOKEN_CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(hash, (Instant::now(), record.clone()));
                }
                record
            }
        };
        let token = record.ok_or_else(|| ApiError::Unauthenticated("unknown token".into()))?;
        if token.revoked_at.is_some() {
            return Err(ApiError::Unauthenticated(format!(
                "token {} was revoked",
                token.id
            )));
        }
        if !token.is_valid_at(Utc::now()) {
            return Err(ApiError::Unauthenticated(format!(
                "token {} has expired",
                token.id
            )));
        }
        Ok(Principal {
            subject: format!("token:{}", token.id),
            tenant: token.tenant,
            role: token.role,
        })
    }

    /// Forgets every cached lookup: a token revoked here stops working at once.
    pub fn forget_tokens(&self) {
        if let Ok(mut cache) = self.tokens.lock() {
            cache.clear();
        }
    }
}

/// The metric's name of a code that refuses the caller, if it is one.
fn refusal_name(code: tonic::Code) -> Option<&'static str> {
    match code {
        tonic::Code::Unauthenticated => Some("unauthenticated"),
        tonic::Code::PermissionDenied => Some("permission_denied"),
        tonic::Code::ResourceExhausted => Some("resource_exhausted"),
        _ => None,
    }
}

/// The leaf certificate (DER) the client presented in the TLS handshake, if any.
fn client_certificate<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    certs.first().map(|c| c.as_ref().to_vec())
}

/// What a call authenticated with, kept to check again while a stream the call opened lasts:
/// a token revoked or expired meanwhile ends the stream (see [`crate::quotas::Permitted`]).
#[derive(Clone)]
pub struct Credential {
    auth: Arc<Authenticator>,
    authorization: Option<http::HeaderValue>,
    certificate: Option<Vec<u8>>,
}

impl Credential {
    pub fn new(
        auth: Arc<Authenticator>,
        authorization: Option<http::HeaderValue>,
        certificate: Option<Vec<u8>>,
    ) -> Self {
        Self {
            auth,
            authorization,
            certificate,
        }
    }

    /// Authenticates the credential again (through the token cache).
    pub async fn check(&self) -> Result<Principal, ApiError> {
        self.auth
            .authenticate(self.authorization.clone(), self.certificate.clone())
            .await
    }
}

/// The credential [`AuthLayer`] (or the console) put on a request, if any.
pub fn credential<T>(request: &tonic::Request<T>) -> Option<Credential> {
    request.extensions().get::<Credential>().cloned()
}

/// The principal [`AuthLayer`] put on a request.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Principal, ApiError> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("missing credentials".into()))
}

/// Authenticates every call to the services it wraps but health and reflection.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: Arc::clone(&self.auth),
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is the one that was made ready: take it, leave a fresh one behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = Arc::clone(&self.auth);
        Box::pin(async move {
            let path = request.uri().path();
            if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
                return inner.call(request).await;
            }
            let authorization = request.headers().get(http::header::AUTHORIZATION).cloned();
            let certificate = authorization
                .is_none()
                .then(|| client_certificate(&request))
                .flatten();
            match auth
                .authenticate(authorization.clone(), certificate.clone())
                .await
            {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    request.extensions_mut().insert(Credential::new(
                        Arc::clone(&auth),
                        authorization,
                        certificate,
                    ));
                    let response = inner.call(request).await?;
                    // A refusal is answered before any message: its code is in the headers.
                    if let Some(code) = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32)
                        .and_then(refusal_name)
                    {
                        auth.backends.metrics.grpc_refused(code);
                    }
                    Ok(response)
                }
                Err(e) => {
                    tracing::info!(path = %request.uri().path(), error = %e, "call refused");
                    let status = Status::from(e);
                    if let Some(code) = refusal_name(status.code()) {
                        auth.backends.metrics.grpc_refused(code);
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}
