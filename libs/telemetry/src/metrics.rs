//! Every Prometheus metric Hodei exports, named and described here and nowhere else (as
//! subjects are in `hodei_messaging::subjects`). Each service registers the families it
//! records in its own registry, so its `/metrics` shows its own numbers only, even when
//! several services share a process (as in the system tests).
//!
//! | metric | type | recorded by |
//! |---|---|---|
//! | `hodei_jobs_submitted_total` | counter | api-gateway |
//! | `hodei_submissions_refused_total` | counter | api-gateway (admission control) |
//! | `hodei_grpc_refused_total{code}` | counter | api-gateway: calls answered `unauthenticated`, `permission_denied` or `resource_exhausted` |
//! | `hodei_jobs_started_total` | counter | scheduler |
//! | `hodei_jobs_finished_total{outcome}` | counter | api-gateway, scheduler, registry (whichever records the end) |
//! | `hodei_jobs_queued` | gauge | scheduler (read from PostgreSQL at scrape time) |
//! | `hodei_retention_rows{table}` | gauge | scheduler (counted after each retention pass) |
//! | `hodei_archived_total{kind}` | counter | scheduler |
//! | `hodei_placements_total{result}` | counter | scheduler |
//! | `hodei_schedule_ticks_total{outcome}` | counter | scheduler (fired, skipped, missed) |
//! | `hodei_placement_duration_seconds` | histogram | scheduler |
//! | `hodei_placements_blocked` | gauge | scheduler |
//! | `hodei_tenant_share{tenant}` | gauge | scheduler: each tenant's dominant share of the live fleet (0 to 1), as its last placement round saw it |
//! | `hodei_tenant_entitled_share{tenant}` | gauge | scheduler: the share its weight entitles it to among the tenants competing |
//! | `hodei_tenant_running_jobs{tenant}` | gauge | scheduler: the tenant's jobs on workers |
//! | `hodei_job_queue_wait_seconds` | histogram | scheduler |
//! | `hodei_job_start_delay_seconds` | histogram | scheduler |
//! | `hodei_heartbeats_received_total` | counter | registry |
//! | `hodei_workers{state}` | gauge | registry (read at scrape time) |
//! | `hodei_workers_lost_total` | counter | registry |
//! | `hodei_workers_unreachable_total` | counter | registry |
//! | `hodei_heartbeats_refused_total{field}` | counter | registry |
//! | `hodei_liveness_resets_total{cause}` | counter | registry |
//! | `hodei_liveness_partitions_total` | counter | registry |
//! | `hodei_reports_refused_total{reason}` | counter | scheduler |
//! | `hodei_agent_lease_expired_total` | counter | agent |
//! | `hodei_agent_assignments_refused_total` | counter | agent |
//! | `hodei_messages_dead_lettered_total{kind}` | counter | scheduler, agent |
//! | `hodei_nats_errors_total{operation}` | counter | every service |
//! | `hodei_postgres_errors_total` | counter | api-gateway, scheduler, registry |
//! | `hodei_postgres_breaker_open` | gauge | api-gateway, scheduler, registry (read at scrape time) |
//! | `hodei_outbox_pending` | gauge | api-gateway, scheduler, registry (read at scrape time) |
//! | `hodei_outbox_lag_seconds` | gauge | api-gateway, scheduler, registry (read at scrape time) |
//! | `hodei_outbox_published_total` | counter | api-gateway, scheduler, registry |
//! | `hodei_outbox_dead_lettered_total` | counter | api-gateway, scheduler, registry |
//! | `hodei_outbox_expired_total` | counter | api-gateway, scheduler, registry |
//! | `hodei_agent_running_attempts` | gauge | agent |
//! | `hodei_agent_free_slots` | gauge | agent |
//! | `hodei_agent_attempts_finished_total{outcome}` | counter | agent |

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// One label, e.g. `outcome="succeeded"`.
type Label = [(&'static str, String); 1];

fn label(name: &'static str, value: &str) -> Label {
    [(name, value.to_owned())]
}

/// Which families a service records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Gateway,
    Scheduler,
    Registry,
    Agent,
    /// A name this catalogue does not know: every family is registered.
    Other,
}

impl Role {
    fn of(service: &str) -> Role {
        match service {
            "api-gateway" => Role::Gateway,
            "scheduler" => Role::Scheduler,
            "registry" => Role::Registry,
            "agent" => Role::Agent,
            _ => Role::Other,
        }
    }
}

/// The metrics of one service: cheap to clone, every clone records into the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    service: String,
    registry: Arc<Registry>,
    pub jobs_submitted: Counter,
    pub submissions_refused: Counter,
    grpc_refused: Family<Label, Counter>,
    pub jobs_started: Counter,
    jobs_finished: Family<Label, Counter>,
    pub jobs_queued: Gauge,
    retention_rows: Family<Label, Gauge>,
    archived: Family<Label, Counter>,
    placements: Family<Label, Counter>,
    schedule_ticks: Family<Label, Counter>,
    pub placement_duration: Histogram,
    pub placements_blocked: Gauge,
    tenant_share: Family<Label, Gauge<f64, AtomicU64>>,
    tenant_entitled: Family<Label, Gauge<f64, AtomicU64>>,
    tenant_running: Family<Label, Gauge>,
    pub queue_wait: Histogram,
    pub start_delay: Histogram,
    pub heartbeats_received: Counter,
    workers: Family<Label, Gauge>,
    pub workers_lost: Counter,
    pub workers_unreachable: Counter,
    heartbeats_refused: Family<Label, Counter>,
    liveness_resets: Family<Label, Counter>,
    pub liveness_partitions: Counter,
    reports_refused: Family<Label, Counter>,
    pub agent_lease_expired: Counter,
    pub agent_assignments_refused: Counter,
    messages_dead_lettered: Family<Label, Counter>,
    nats_errors: Family<Label, Counter>,
    pub postgres_errors: Counter,
    pub postgres_breaker_open: Gauge,
    pub outbox_pending: Gauge,
    pub outbox_lag: Gauge<f64, AtomicU64>,
    pub outbox_published: Counter,
    pub outbox_dead_lettered: Counter,
    pub outbox_expired: Counter,
    pub agent_running_attempts: Gauge,
    pub agent_free_slots: Gauge,
    agent_attempts_finished: Family<Label, Counter>,
}

impl Metrics {
    /// The metrics of `service` (`api-gateway`, `scheduler`, `registry` or `agent`), each
    /// family it records registered in a registry of its own.
    pub fn new(service: &str) -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.005, 2.0, 16));
        let metrics = Metrics {
            service: service.to_owned(),
            registry: Arc::new(Registry::default()),
            jobs_submitted: Counter::default(),
            submissions_refused: Counter::default(),
            grpc_refused: Family::default(),
            jobs_started: Counter::default(),
            jobs_finished: Family::default(),
            jobs_queued: Gauge::default(),
            retention_rows: Family::default(),
            archived: Family::default(),
            placements: Family::default(),
            schedule_ticks: Family::default(),
            placement_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            placements_blocked: Gauge::default(),
            tenant_share: Family::default(),
            tenant_entitled: Family::default(),
            tenant_running: Family::default(),
            queue_wait: seconds(),
            start_delay: seconds(),
            heartbeats_received: Counter::default(),
            workers: Family::default(),
            workers_lost: Counter::default(),
            workers_unreachable: Counter::default(),
            heartbeats_refused: Family::default(),
            liveness_resets: Family::default(),
            liveness_partitions: Counter::default(),
            reports_refused: Family::default(),
            agent_lease_expired: Counter::default(),
            agent_assignments_refused: Counter::default(),
            messages_dead_lettered: Family::default(),
            nats_errors: Family::default(),
            postgres_errors: Counter::default(),
            postgres_breaker_open: Gauge::default(),
            outbox_pending: Gauge::default(),
            outbox_lag: Gauge::default(),
            outbox_published: Counter::default(),
            outbox_dead_lettered: Counter::default(),
            outbox_expired: Counter::default(),
            agent_running_attempts: Gauge::default(),
            agent_free_slots: Gauge::default(),
            agent_attempts_finished: Family::default(),
        };
        let mut registry = Registry::with_prefix("hodei");
        metrics.register(Role::of(service), &mut registry);
        Metrics {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    fn register(&self, role: Role, r: &mut Registry) {
        use Role::{Agent, Gateway, Other, Registry as Reg, Scheduler};
        let is = |roles: &[Role]| role == Other || roles.contains(&role);
        if is(&[Gateway]) {
            r.register(
                "jobs_submitted",
                "Jobs accepted by SubmitJob and SubmitJobs (idempotent resubmissions not counted)",
                self.jobs_submitted.clone(),
            );
            r.register(
                "grpc_refused",
                "gRPC calls refused for who made them: unauthenticated, permission_denied (role or tenant) or resource_exhausted (a limit)",
                self.grpc_refused.clone(),
            );
            r.register(
                "submissions_refused",
                "Job and pipeline submissions refused with RESOURCE_EXHAUSTED by admission control",
                self.submissions_refused.clone(),
            );
        }
        if is(&[Scheduler]) {
            r.register(
                "schedule_ticks",
                "Schedule ticks handled, by outcome (fired, skipped by the overlap policy or the tenant's queue quota, missed: older than the catch-up window)",
                self.schedule_ticks.clone(),
            );
            r.register(
                "jobs_started",
                "Attempts whose process started, as reported by agents",
                self.jobs_started.clone(),
            );
            r.register(
                "jobs_queued",
                "Jobs waiting in the queue (state queued)",
                self.jobs_queued.clone(),
            );
            r.register(
                "retention_rows",
                "Rows kept in the hot tables and moved to the archives, by table (jobs, pipeline_runs, jobs_archive, pipeline_runs_archive)",
                self.retention_rows.clone(),
            );
            r.register(
                "archived",
                "Rows retention moved to the archive, by kind (job, pipeline_run, event)",
                self.archived.clone(),
            );
            r.register(
                "placements",
                "Placement requests handled, by result (placed, no_worker, not_yet, stale, error)",
                self.placements.clone(),
            );
            r.register_with_unit(
                "placement_duration",
                "Time to place one job: load it and the live workers, filter, rank, commit the assignment",
                Unit::Seconds,
                self.placement_duration.clone(),
            );
            r.register(
                "tenant_share",
                "Each tenant's dominant share of the live fleet (its largest fraction of slots, CPU and memory), 0 to 1",
                self.tenant_share.clone(),
            );
            r.register(
                "tenant_entitled_share",
                "The share of contended capacity each tenant's weight entitles it to among the tenants competing, 0 to 1",
                self.tenant_entitled.clone(),
            );
            r.register(
                "tenant_running_jobs",
                "Each tenant's jobs on workers (assigned or running)",
                self.tenant_running.clone(),
            );
            r.register(
                "placements_blocked",
                "Placement requests this scheduler holds because no live worker can take them now",
                self.placements_blocked.clone(),
            );
            r.register_with_unit(
                "job_queue_wait",
                "Time from a job becoming placeable (submitted, or requeued and its backoff over) to its assignment",
                Unit::Seconds,
                self.queue_wait.clone(),
            );
            r.register_with_unit(
                "job_start_delay",
                "Time from a job's submission to the start of its first attempt",
                Unit::Seconds,
                self.start_delay.clone(),
            );
        }
        if is(&[Gateway, Scheduler, Reg]) {
            r.register(
                "jobs_finished",
                "Jobs that reached an end state, by outcome (succeeded, failed, timed_out, cancelled)",
                self.jobs_finished.clone(),
            );
            r.register(
                "postgres_errors",
                "PostgreSQL calls that failed (unreachable, timed out, circuit open or an error answer)",
                self.postgres_errors.clone(),
            );
            r.register(
                "postgres_breaker_open",
                "1 while this process's PostgreSQL circuit breaker is open (its calls fail fast, and the work that meets it waits, held), else 0",
                self.postgres_breaker_open.clone(),
            );
            r.register(
                "outbox_pending",
                "Committed messages waiting in the outbox to be published",
                self.outbox_pending.clone(),
            );
            r.register_with_unit(
                "outbox_lag",
                "Age of the oldest message waiting in the outbox (0 when empty)",
                Unit::Seconds,
                self.outbox_lag.clone(),
            );
            r.register(
                "outbox_published",
                "Outbox messages this process published and JetStream acknowledged",
                self.outbox_published.clone(),
            );
            r.register(
                "outbox_dead_lettered",
                "Outbox messages the transport refused for good (too large), moved to outbox_dead",
                self.outbox_dead_lettered.clone(),
            );
            r.register(
                "outbox_expired",
                "Outbox messages that must not be delivered twice (assignments), found too old to publish (past half the duplicate window) and deleted unpublished",
                self.outbox_expired.clone(),
            );
        }
        if is(&[Reg]) {
            r.register(
                "heartbeats_received",
                "Agent heartbeats received",
                self.heartbeats_received.clone(),
            );
            r.register(
                "workers",
                "Known workers by state (ready, draining, lost, offline)",
                self.workers.clone(),
            );
            r.register(
                "workers_lost",
                "Workers declared lost: silent past their lease and kill grace, their attempts handed back",
                self.workers_lost.clone(),
            );
            r.register(
                "workers_unreachable",
                "Workers marked unreachable (no new work) after missing their heartbeats",
                self.workers_unreachable.clone(),
            );
            r.register(
                "heartbeats_refused",
                "Heartbeats refused alone before reaching storage, by the field that failed",
                self.heartbeats_refused.clone(),
            );
            r.register(
                "liveness_resets",
                "Times the registry restarted counting silence because it could not observe (start, nats, postgres, lag)",
                self.liveness_resets.clone(),
            );
            r.register(
                "liveness_partitions",
                "Sweeps in which too large a share of the fleet was silent at once, so nobody was declared lost",
                self.liveness_partitions.clone(),
            );
        }
        if is(&[Scheduler]) {
            r.register(
                "reports_refused",
                "Agent reports refused and dead-lettered, by reason (sender, malformed, unrecordable)",
                self.reports_refused.clone(),
            );
        }
        if is(&[Scheduler, Agent]) {
            r.register(
                "messages_dead_lettered",
                "Messages refused alone and dead-lettered, by kind (place, agent-command); reports are counted in reports_refused",
                self.messages_dead_lettered.clone(),
            );
        }
        if is(&[Gateway, Scheduler, Reg, Agent]) {
            r.register(
                "nats_errors",
                "NATS operations that failed, by operation (publish, consume, ack)",
                self.nats_errors.clone(),
            );
        }
        if is(&[Agent]) {
            r.register(
                "agent_running_attempts",
                "Attempts this agent runs now",
                self.agent_running_attempts.clone(),
            );
            r.register(
                "agent_free_slots",
                "Attempts this agent could take on now (max concurrent jobs minus running)",
                self.agent_free_slots.clone(),
            );
            r.register(
                "agent_attempts_finished",
                "Attempts this agent ran to their end, by outcome",
                self.agent_attempts_finished.clone(),
            );
            r.register(
                "agent_lease_expired",
                "Times this agent stopped its attempts itself after losing NATS for longer than its lease",
                self.agent_lease_expired.clone(),
            );
            r.register(
                "agent_assignments_refused",
                "Assignments not run because they were stored in their stream too long after they were made (more than 60 s): they may be a second copy",
                self.agent_assignments_refused.clone(),
            );
        }
    }

    /// The service these metrics belong to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Counts a job that reached an end state (`succeeded`, `failed`, `timed_out`, `cancelled`).
    pub fn job_finished(&self, outcome: &str) {
        self.jobs_finished
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// Sets how many rows `table` holds (`jobs`, `jobs_archive`, ...).
    /// Records one tenant's line of the scheduler's view of the shares.
    pub fn set_tenant_share(&self, tenant: &str, share: f64, entitled: f64, running: i64) {
        let key = label("tenant", tenant);
        self.tenant_share.get_or_create(&key).set(share);
        self.tenant_entitled.get_or_create(&key).set(entitled);
        self.tenant_running.get_or_create(&key).set(running);
    }

    pub fn set_retention_rows(&self, table: &str, rows: i64) {
        self.retention_rows
            .get_or_create(&label("table", table))
            .set(rows);
    }

    /// Counts `n` rows of `kind` (`job`, `pipeline_run`, `event`) moved to the archive.
    pub fn archived(&self, kind: &str, n: u64) {
        self.archived.get_or_create(&label("kind", kind)).inc_by(n);
    }

    /// Counts `n` schedule ticks handled with `outcome` (`fired`, `skipped`, `missed`).
    pub fn schedule_ticks(&self, outcome: &str, n: u64) {
        self.schedule_ticks
            .get_or_create(&label("outcome", outcome))
            .inc_by(n);
    }

    /// Counts a handled placement request by result.
    pub fn placement(&self, result: &str) {
        self.placements
            .get_or_create(&label("result", result))
            .inc();
    }

    /// Sets how many workers are in `state`.
    pub fn set_workers(&self, state: &str, count: i64) {
        self.workers
            .get_or_create(&label("state", state))
            .set(count);
    }

    /// Counts a failed NATS `operation` (`publish`, `consume`, `ack`).
    pub fn nats_error(&self, operation: &str) {
        self.nats_errors
            .get_or_create(&label("operation", operation))
            .inc();
    }

    /// Counts a gRPC call refused for its caller, by the code's name (`unauthenticated`,
    /// `permission_denied`, `resource_exhausted`).
    pub fn grpc_refused(&self, code: &str) {
        self.grpc_refused.get_or_create(&label("code", code)).inc();
    }

    /// Counts a heartbeat refused before storage, by the field that failed validation.
    pub fn heartbeat_refused(&self, field: &str) {
        self.heartbeats_refused
            .get_or_create(&label("field", field))
            .inc();
    }

    /// Counts a restart of the registry's silence clock, by cause.
    pub fn liveness_reset(&self, cause: &str) {
        self.liveness_resets
            .get_or_create(&label("cause", cause))
            .inc();
    }

    /// Counts a report refused and dead-lettered, by reason.
    /// A consumed message of `kind` that was refused alone and dead-lettered.
    pub fn message_dead_lettered(&self, kind: &str) {
        self.messages_dead_lettered
            .get_or_create(&label("kind", kind))
            .inc();
    }

    pub fn report_refused(&self, reason: &str) {
        self.reports_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// Counts an attempt the agent ran to its end, by outcome.
    pub fn agent_attempt_finished(&self, outcome: &str) {
        self.agent_attempts_finished
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// The registered families in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_exports_only_what_it_records() {
        let scheduler = Metrics::new("scheduler");
        scheduler.jobs_started.inc();
        scheduler.job_finished("succeeded");
        scheduler.placement_duration.observe(0.002);
        let text = scheduler.encode().unwrap();
        assert!(text.contains("hodei_jobs_started_total 1"), "{text}");
        assert!(
            text.contains("hodei_jobs_finished_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hodei_placement_duration_seconds_count 1"),
            "{text}"
        );
        assert!(!text.contains("hodei_jobs_submitted"), "{text}");
        assert!(!text.contains("hodei_agent_free_slots"), "{text}");

        let agent = Metrics::new("agent");
        agent.agent_free_slots.set(3);
        let text = agent.encode().unwrap();
        assert!(text.contains("hodei_agent_free_slots 3"), "{text}");
        assert!(!text.contains("hodei_postgres_errors"), "{text}");
    }
}
