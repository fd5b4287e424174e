//! The registry: turns agents' heartbeats into worker rows (in batches: one statement per
//! flush, however many agents beat), publishes worker events, and declares workers lost when
//! they fall silent, handing their attempts back to the queue.

mod confirm;
mod heartbeats;
mod liveness;
mod observation;

use std::time::Duration;

use hodei_messaging::subjects;
use hodei_runtime::{BackendConfig, Backends};
use tokio_util::sync::CancellationToken;

use crate::liveness::Policy;
use crate::observation::Observation;

/// Source name in the envelopes of events this service records.
pub const SOURCE: &str = "hodei/registry";
/// This service's name on its spans and metrics.
pub(crate) const SERVICE: &str = "registry";
/// The queue group the registries share heartbeats in.
pub(crate) const QUEUE_GROUP: &str = "hodei-registry";

/// Registry configuration.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "hodei-registry",
    about = "Keeps worker state from agents' heartbeats"
)]
pub struct RegistryConfig {
    #[command(flatten)]
    pub backends: BackendConfig,
    /// Agents' heartbeat interval, in milliseconds.
    #[arg(long, env = "HODEI_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats after which a worker is unreachable: it gets no new work. Its
    /// attempts are handed back only after the lease and kill grace its agent announces.
    #[arg(long, env = "HODEI_MISSED_BEATS", default_value_t = 3)]
    pub missed_beats: u32,
    /// Share of the live fleet (0 to 1) that may be unreachable at once before the registry
    /// takes it for its own partition and declares nobody lost.
    #[arg(long, env = "HODEI_PARTITION_SHARE", default_value_t = 0.5)]
    pub partition_share: f64,
    /// Smallest live fleet the partition rule applies to: below it, every silent worker is
    /// handed back on its own lease.
    #[arg(long, env = "HODEI_PARTITION_MIN_WORKERS", default_value_t = 3)]
    pub partition_min_workers: u32,
    /// How often buffered heartbeats are written, in milliseconds.
    #[arg(long, env = "HODEI_HEARTBEAT_FLUSH_MS", default_value_t = 100)]
    pub flush_interval_ms: u64,
}

/// Why the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Backend(#[from] hodei_runtime::BackendError),
    #[error("failed to subscribe to heartbeats or to the other registries: {0}")]
    Subscribe(String),
    #[error("invalid configuration: {field} {reason}")]
    InvalidConfig {
        field: &'static str,
        reason: &'static str,
    },
}

impl RegistryConfig {
    /// The liveness policy, range-checked.
    fn policy(&self) -> Result<Policy, RegistryError> {
        let invalid = |field, reason| RegistryError::InvalidConfig { field, reason };
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms > 3_600_000 {
            return Err(invalid("heartbeat_interval_ms", "must be 1 to 3600000"));
        }
        if self.missed_beats == 0 || self.missed_beats > 1000 {
            return Err(invalid("missed_beats", "must be 1 to 1000"));
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000 {
            return Err(invalid("flush_interval_ms", "must be 1 to 60000"));
        }
        // Writes later than two heartbeat intervals count as the registry not observing: a
        // longer flush interval would restart its clock at every sweep and hide every silence.
        if self.flush_interval_ms > self.heartbeat_interval_ms {
            return Err(invalid(
                "flush_interval_ms",
                "must be at most heartbeat_interval_ms",
            ));
        }
        if !(self.partition_share > 0.0 && self.partition_share <= 1.0) {
            return Err(invalid("partition_share", "must be above 0 and at most 1"));
        }
        Ok(Policy {
            interval: Duration::from_millis(self.heartbeat_interval_ms),
            missed_beats: self.missed_beats,
            partition_share: self.partition_share,
            partition_min_workers: self.partition_min_workers,
        })
    }
}

/// A built registry, connected and subscribed.
pub struct Registry {
    config: RegistryConfig,
    backends: Backends,
    heartbeats: async_nats::Subscriber,
    /// Other registries' restarts of their liveness clock.
    peers: async_nats::Subscriber,
}

impl Registry {
    pub async fn build(config: RegistryConfig) -> Result<Registry, RegistryError> {
        config.policy()?;
        let backends = Backends::connect(&config.backends, "hodei-registry").await?;
        let heartbeats = backends
            .nats
            .queue_subscribe(subjects::all_heartbeats(), QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| RegistryError::Subscribe(e.to_string()))?;
        let peers = backends
            .nats
            .subscribe(subjects::registry_observation())
            .await
            .map_err(|e| RegistryError::Subscribe(e.to_string()))?;
        Ok(Registry {
            config,
            backends,
            heartbeats,
            peers,
        })
    }

    /// The address of the `/metrics`, `/healthz` and `/readyz` server, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.backends.metrics_addr()
    }

    /// Runs until `shutdown`, then flushes what it buffered.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), RegistryError> {
        let Registry {
            config,
            backends,
            mut heartbeats,
            peers,
        } = self;
        let policy = config.policy()?;
        let observation = Observation::start(&backends.nats, backends.metrics.clone());
        let sharing = tokio::spawn(observation::share(
            backends.nats.clone(),
            peers,
            observation.clone(),
            shutdown.clone(),
        ));
        let relay = backends.spawn_relay(shutdown.clone());
        let observability = backends.spawn_observability(shutdown.clone());
        let liveness = tokio::spawn(liveness::run(
            backends.clone(),
            policy,
            observation.clone(),
            shutdown.clone(),
        ));
        heartbeats::run(
            &backends,
            &mut heartbeats,
            Duration::from_millis(config.flush_interval_ms.max(1)),
            &observation,
            &shutdown,
        )
        .await;
        let _ = liveness.await;
        let _ = sharing.await;
        let _ = relay.await;
        if let Some(observability) = observability {
            let _ = observability.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> RegistryConfig {
        let mut all = vec!["hodei-registry"];
        all.extend_from_slice(args);
        RegistryConfig::parse_from(all)
    }

    #[test]
    fn a_flush_interval_longer_than_the_heartbeat_interval_is_refused() {
        assert!(config(&[]).policy().is_ok());
        let err = config(&[
            "--heartbeat-interval-ms",
            "500",
            "--flush-interval-ms",
            "1000",
        ])
        .policy()
        .unwrap_err()
        .to_string();
        assert!(err.contains("flush_interval_ms"), "{err}");
    }
}
