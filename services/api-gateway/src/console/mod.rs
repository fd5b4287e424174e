//! The web console: jobs, pipeline runs drawn as live DAGs, live logs and workers, in a
//! browser, served by the gateway on its own HTTP port (`HODEI_CONSOLE_ADDR`).
//!
//! Pages are rendered on the server (maud) and made live by one small script
//! (`assets/console.js`): each live region names a server-sent events feed and the URL of its
//! fragment, and reloads the fragment when the feed says something changed. Logs arrive line
//! by line on their own feed. Every asset is compiled into the binary.
//!
//! The console reads and acts through the gRPC services' own handlers, called in process with
//! the caller's [`Principal`](hodei_domain::Principal): the same validation, authorization,
//! tenant scoping, stream quotas and audit as a gRPC client gets. The caller signs in with an
//! API token (or an OIDC access token), kept in an HTTP-only, same-site cookie; state-changing
//! forms also carry a token derived from it and are refused from another origin.

mod dag;
mod live;
mod pages;
mod session;
mod tls;
mod views;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::routing::{get, post};
use hodei_domain::TenantId;
use hodei_runtime::Backends;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::jobs::JobApi;
use crate::pipelines::PipelineApi;
use crate::workers::WorkerApi;

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("failed to bind the console on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up the console's tls: {0}")]
    Tls(String),
}

/// The gRPC handlers the console calls, shared with the gRPC server.
pub struct Services {
    pub jobs: Arc<JobApi>,
    pub pipelines: Arc<PipelineApi>,
    pub workers: Arc<WorkerApi>,
    /// The tenants' stream quotas: a page's live feed holds one stream, as a watch does.
    pub quotas: Arc<crate::quotas::Quotas>,
}

/// The console's certificate and key (PEM files): it serves HTTPS with them.
#[derive(Debug, Clone)]
pub struct ConsoleTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A bound console, not yet serving.
pub struct ConsoleServer {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl ConsoleServer {
    /// Binds `addr` (port 0 picks a free port) and reads the TLS files, if any.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<&ConsoleTls>,
    ) -> Result<ConsoleServer, ConsoleError> {
        let tls = tls.map(tls::server_config).transpose()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ConsoleError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ConsoleError::Bind { addr, source })?;
        Ok(ConsoleServer {
            listener,
            addr,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`.
    pub async fn serve(
        self,
        services: Services,
        auth: Arc<Authenticator>,
        backends: Backends,
        shutdown: CancellationToken,
    ) {
        let secure = self.tls.is_some();
        let live = live::Feed::start(backends.nats.clone(), shutdown.clone());
        let console = Console(Arc::new(Inner {
            services,
            auth,
            backends,
            secure,
            live,
            overview: Mutex::new(HashMap::new()),
            shutdown: shutdown.clone(),
        }));
        let app = router(console);
        let scheme = if secure { "https" } else { "http" };
        tracing::info!(url = %format!("{scheme}://{}/", self.addr), "web console listening");
        let result = match self.tls {
            Some(config) => {
                let listener = tls::TlsListener::start(self.listener, config, shutdown.clone());
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
            None => {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "web console failed");
        }
    }
}

/// The overview's figures by tenant scope, with when they were read.
type OverviewCache = HashMap<Option<TenantId>, (Instant, Arc<pages::Overview>)>;

/// What every console handler shares.
#[derive(Clone)]
pub(crate) struct Console(Arc<Inner>);

pub(crate) struct Inner {
    services: Services,
    auth: Arc<Authenticator>,
    backends: Backends,
    /// Served over TLS: cookies are marked `Secure`.
    secure: bool,
    live: live::Feed,
    /// The overview's figures by tenant scope (none: every tenant), reused for a few seconds
    /// however many people look.
    overview: Mutex<OverviewCache>,
    shutdown: CancellationToken,
}

impl std::ops::Deref for Console {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/{id}", get(pages::job))
        .route("/jobs/{id}/cancel", post(pages::cancel_job))
        .route("/jobs/{id}/log", get(live::job_log))
        .route("/jobs/{id}/events", get(live::job_events))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/cancel", post(pages::cancel_run))
        .route("/runs/{id}/events", get(live::run_events))
        .route(
            "/runs/{id}/artifacts/{step}/{*path}",
            get(pages::download_artifact),
        )
        .route("/workers", get(pages::workers))
        .route("/workers/{id}/drain", post(pages::drain_worker))
        .route("/events/jobs", get(live::jobs_feed))
        .route("/events/runs", get(live::runs_feed))
        .route("/events/workers", get(live::workers_feed))
        .route("/assets/{name}", get(views::asset))
        .fallback(pages::not_found)
        .layer(axum::middleware::map_response(views::security_headers))
        .with_state(console)
}
