//! What a service with backends tells its `/readyz` and `/metrics`: ready when NATS is
//! connected, PostgreSQL answers and every built-in migration is applied; before each scrape
//! the gauges kept in PostgreSQL (outbox backlog, queue depth, workers by state) are read.

use std::time::Duration;

use hodei_storage::{PgPool, StorageError, jobs, outbox, workers};
use hodei_telemetry::http::BoxFuture;
use hodei_telemetry::{Check, Metrics, Probes};

use crate::Backends;

/// Longest one probe query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// Every worker state, so a state no worker is in reads 0 rather than its last count.
const WORKER_STATES: [&str; 5] = ["ready", "draining", "unreachable", "lost", "offline"];

pub(crate) struct BackendProbes {
    nats: async_nats::Client,
    pool: PgPool,
    breaker: hodei_resilience::CircuitBreaker,
    metrics: Metrics,
}

impl BackendProbes {
    pub(crate) fn new(backends: &Backends) -> Self {
        Self {
            nats: backends.nats.clone(),
            pool: backends.pool.clone(),
            breaker: backends.db_breaker.clone(),
            metrics: backends.metrics.clone(),
        }
    }

    async fn query<T, F>(&self, what: &str, run: F) -> Option<T>
    where
        F: Future<Output = Result<T, StorageError>>,
    {
        match tokio::time::timeout(QUERY_TIMEOUT, run).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.metrics.postgres_errors.inc();
                tracing::debug!(what, error = %e, "metrics query failed");
                None
            }
            Err(_) => {
                self.metrics.postgres_errors.inc();
                tracing::debug!(what, "metrics query timed out");
                None
            }
        }
    }

    async fn checks(&self) -> Vec<Check> {
        let nats = match self.nats.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(format!("not connected ({state})")),
        };
        let applied =
            tokio::time::timeout(QUERY_TIMEOUT, hodei_storage::migrations_applied(&self.pool))
                .await;
        let (postgres, migrations) = match applied {
            Ok(Ok((n, expected))) if n >= expected => (Ok(()), Ok(())),
            Ok(Ok((n, expected))) => (Ok(()), Err(format!("{n} of {expected} migrations applied"))),
            Ok(Err(e)) => (Err(e.to_string()), Err("unknown".to_owned())),
            Err(_) => (
                Err(format!("no answer within {QUERY_TIMEOUT:?}")),
                Err("unknown".to_owned()),
            ),
        };
        vec![
            Check::new("nats", nats),
            Check::new("postgres", postgres),
            Check::new("migrations", migrations),
        ]
    }

    async fn refresh_gauges(&self) {
        // Open only: a half-open breaker waits for the next call to decide, which an idle
        // process may not make for a long time.
        let open = matches!(
            self.breaker.state(),
            hodei_resilience::BreakerState::Open { .. }
        );
        self.metrics.postgres_breaker_open.set(i64::from(open));
        let backlog = self.query("outbox backlog", outbox::backlog(&self.pool));
        if let Some((pending, lag)) = backlog.await {
            self.metrics.outbox_pending.set(pending);
            self.metrics.outbox_lag.set(lag);
        }
        match self.metrics.service() {
            "scheduler" => {
                let queued = self.query("queue depth", jobs::queued_count(&self.pool));
                if let Some(queued) = queued.await {
                    self.metrics.jobs_queued.set(queued);
                }
            }
            "registry" => {
                let by_state = self.query("workers by state", workers::count_by_status(&self.pool));
                if let Some(rows) = by_state.await {
                    for state in WORKER_STATES {
                        let count = rows.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
                        self.metrics.set_workers(state, count);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Probes for BackendProbes {
    fn readiness(&self) -> BoxFuture<'_, Vec<Check>> {
        Box::pin(self.checks())
    }

    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.refresh_gauges())
    }
}
