//! The [`Agent`]: connects to NATS, takes commands from its durable consumer, runs the
//! attempts it is assigned, beats, and drains on shutdown.
//!
//! Stopping comes in two strengths. Draining (the `shutdown` token of
//! [`Agent::run_until_stopped`], or a `Drain` command) takes no new command, beats with
//! `draining` set and lets the running attempts finish, up to the drain timeout. A forced stop
//! ([`Agent::force_stop_token`], during a drain or instead of one) cancels the running attempts
//! at once (SIGTERM, kill grace, SIGKILL), reports them `Cancelled` and returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{MessagesErrorKind, Stream as MessageStream};
use futures::StreamExt;
use hodei_domain::{AttemptId, AttemptOutcome, IncarnationId, WorkerId};
use hodei_messaging::seal::OpeningKey;
use hodei_messaging::{
    AgentCommand, MessagingError, artifacts, connect_with, decode, permissions, streams, trace,
};
use hodei_telemetry::{Metrics, ObservabilityServer};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, error, info, warn};

use crate::attempt::{self, Assignment, AttemptContext, Stops};
use crate::cgroup::JobCgroups;
use crate::config::{AgentConfig, Settings};
use crate::error::AgentError;
use crate::heartbeat::Heartbeater;
use crate::lease::{self, Lease};
use crate::observe::{AgentProbes, SERVICE};
use crate::records::{self, Records};
use crate::running::Running;
use crate::work_lock::WorkLock;

/// How long to keep trying the first connection to NATS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// First wait after a failure to pull commands.
const MIN_PULL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait after repeated failures to pull commands.
const MAX_PULL_BACKOFF: Duration = Duration::from_secs(5);
/// After the drain timeout, how long killed attempts get to report, beyond their kill grace.
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// After giving up on reports, how long attempts get to wind down before they are aborted.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// The least time the reports of what the previous incarnation left may take before the
/// agent starts beating anyway (the registry then hands those attempts back itself). The
/// agent waits up to its lease plus kill grace when that is longer: until then, the registry
/// would not hand them back for silence, and once it beats, the new incarnation makes it hand
/// them back at once, so an outcome not stored by then (a job that had ended) is run again.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the agent waits for the command stream's info when an assignment falls under the
/// fence's floor.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// An agent, connected and ready to run: see [`Agent::run_until_stopped`].
pub struct Agent {
    settings: Settings,
    /// New at every start: the registry tells this process from earlier ones by it.
    incarnation: IncarnationId,
    records: Records,
    /// This agent's exclusive hold on its work folder, released when the agent is dropped.
    work_lock: WorkLock,
    /// Where jobs get cgroups of their own, when the host allows.
    cgroups: Option<JobCgroups>,
    client: async_nats::Client,
    js: jetstream::Context,
    artifacts: async_nats::jetstream::object_store::ObjectStore,
    consumer: PullConsumer,
    artifact_reader: artifacts::DirectReader,
    /// Opens the secret values sealed to this incarnation.
    seal: OpeningKey,
    force_stop: CancellationToken,
    metrics: Metrics,
    observability: Option<ObservabilityServer>,
}

/// Why the agent stopped taking commands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StopCause {
    /// The `shutdown` token was cancelled.
    Shutdown,
    /// A `Drain` command came.
    DrainCommand { reason: String },
    /// The force stop token was cancelled.
    Forced,
}

impl Agent {
    /// Checks `config`, creates the work folder, connects to NATS (as
    /// `hodei-agent-<worker id>`), makes sure the streams exist and gets or creates this
    /// agent's durable consumer `agent-<worker id>` on its command subject.
    pub async fn build(config: AgentConfig) -> Result<Agent, AgentError> {
        let settings = Settings::from_config(config)?;
        tokio::fs::create_dir_all(&settings.work_dir)
            .await
            .map_err(|source| AgentError::WorkDir {
                path: settings.work_dir.clone(),
                source,
            })?;
        // Before anything in the folder is read: another agent's journal is not ours.
        let work_lock = WorkLock::acquire(&settings.work_dir)?;
        let records = Records::open(&settings.work_dir).map_err(|source| AgentError::WorkDir {
            path: settings.work_dir.clone(),
            source,
        })?;
        crate::launch::check_host(settings.job_user.is_some()).map_err(AgentError::Host)?;
        if settings.job_user.is_some() {
            crate::identity::close_work_dir(&settings.work_dir, records.dir()).map_err(
                |source| AgentError::WorkDir {
                    path: settings.work_dir.clone(),
                    source,
                },
            )?;
        } else if crate::identity::is_root() {
            tracing::warn!(
                "jobs run as root: set HODEI_JOB_USER to run them as an unprivileged user"
            );
        }
        let cgroups = JobCgroups::for_agent(
            settings.job_cgroups,
            &settings.worker_id,
            &settings.work_dir,
            settings.capacity,
        )?;
        let id = &settings.worker_id;
        let (client, js) = connect_with(
            &settings.nats_url,
            &permissions::agent_client_name(id),
            CONNECT_TIMEOUT,
            &settings.nats_auth,
        )
        .await?;
        // The control plane creates the streams; an agent's credential may only use them.
        streams::wait_for(
            &js,
            &[
                streams::AGENT,
                streams::REPORTS,
                streams::LOGS,
                &artifacts::stream_name(),
            ],
            CONNECT_TIMEOUT,
        )
        .await?;
        let artifacts = artifacts::existing_bucket(&js).await?;
        let artifact_reader = artifacts::DirectReader::open(&js).await?;
        let consumer =
            streams::consumer(&js, streams::AGENT, permissions::agent_consumer(id)).await?;
        let observability = match settings.metrics_addr {
            Some(addr) => Some(ObservabilityServer::bind(addr).await?),
            None => None,
        };
        info!(
            worker_id = %id,
            nats_url = %settings.nats_url,
            work_dir = %settings.work_dir.display(),
            labels = ?settings.labels,
            cpu_millis = settings.capacity.cpu_millis,
            memory_mb = settings.capacity.memory_mb,
            max_concurrent_jobs = settings.max_concurrent_jobs,
            "agent ready"
        );
        Ok(Agent {
            settings,
            incarnation: IncarnationId::new(),
            // A new key per incarnation, only ever in memory: what the previous process could
            // open dies with it.
            seal: OpeningKey::generate(),
            records,
            work_lock,
            cgroups,
            client,
            js,
            artifacts,
            artifact_reader,
            consumer,
            force_stop: CancellationToken::new(),
            metrics: Metrics::new(SERVICE),
            observability,
        })
    }

    /// The address of the `/metrics`, `/healthz` and `/readyz` server, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.observability
            .as_ref()
            .map(ObservabilityServer::local_addr)
    }

    /// This agent's worker id.
    pub fn worker_id(&self) -> &WorkerId {
        &self.settings.worker_id
    }

    /// The token that stops this agent at once: cancelled (typically on a second SIGTERM, while
    /// draining), [`Agent::run_until_stopped`] takes no new command, cancels the running
    /// attempts (SIGTERM, kill grace, SIGKILL to each process group), waits for them to report
    /// `Cancelled`, and returns. Take it before calling `run_until_stopped`.
    pub fn force_stop_token(&self) -> CancellationToken {
        self.force_stop.clone()
    }

    /// Beats and runs commands until `shutdown` is cancelled or a `Drain` command comes, then
    /// drains: takes no new command, beats with `draining` set, gives running attempts up to
    /// the drain timeout, stops and reports lost the ones still running, and sends a last
    /// heartbeat. The [force stop token](Agent::force_stop_token) cuts this short.
    pub async fn run_until_stopped(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let worker_id = self.settings.worker_id.clone();
        let running = Running::default();
        let stop_serving = CancellationToken::new();
        let observability = self.observability.take().map(|server| {
            let probes = AgentProbes {
                nats: self.client.clone(),
                running: running.clone(),
                max_concurrent_jobs: self.settings.max_concurrent_jobs,
                metrics: self.metrics.clone(),
            };
            AbortOnDropHandle::new(tokio::spawn(server.serve(
                self.metrics.clone(),
                Arc::new(probes),
                stop_serving.clone(),
            )))
        });
        let draining = Arc::new(AtomicBool::new(false));
        let beat_now = Arc::new(Notify::new());
        let stop_beating = CancellationToken::new();
        let stops = Stops::default();
        let fence = lease::Fence::default();
        let ctx = Arc::new(AttemptContext {
            fence: fence.clone(),
            js: self.js.clone(),
            worker_id: worker_id.clone(),
            work_dir: self.settings.work_dir.clone(),
            kill_grace: self.settings.kill_grace,
            path: std::env::var_os("PATH"),
            stops: stops.clone(),
            metrics: self.metrics.clone(),
            artifacts: self.artifacts.clone(),
            artifact_reader: self.artifact_reader.clone(),
            artifact_max_bytes: self.settings.artifact_max_bytes,
            records: self.records.clone(),
            job_limits: self.settings.job_limits,
            cgroups: self.cgroups.clone(),
            seal: self.seal.clone(),
            work_lock: self.work_lock.clone(),
            job_users: self
                .settings
                .job_user
                .clone()
                .map(crate::identity::JobUsers::new),
        });
        // Before the first beat: a report the previous incarnation could not send must be
        // stored before the registry, seeing the new incarnation, hands its attempts back.
        recover(
            &ctx,
            RECOVERY_TIMEOUT.max(self.settings.lease + self.settings.kill_grace),
        )
        .await;
        let lease = Lease::new(self.settings.lease, fence);
        // The background tasks die with this future: an agent dropped mid-run (a crash, in
        // tests) stops beating at once, as a killed process would.
        let lease_watch = AbortOnDropHandle::new(tokio::spawn(lease::watch(
            lease.clone(),
            running.clone(),
            worker_id.clone(),
            self.metrics.clone(),
            stop_beating.clone(),
        )));
        let heartbeats = AbortOnDropHandle::new(tokio::spawn(
            Heartbeater::new(
                self.client.clone(),
                worker_id.clone(),
                self.incarnation,
                lease,
                (self.settings.lease, self.settings.kill_grace),
                self.settings.labels.clone(),
                self.settings.capacity,
                self.settings.max_concurrent_jobs,
                running.clone(),
                Arc::clone(&draining),
            )
            .with_metrics(self.metrics.clone())
            .with_seal_key(self.seal.public_key())
            .run(
                self.settings.heartbeat_interval,
                Arc::clone(&beat_now),
                stop_beating.clone(),
            ),
        ));
        let mut attempts = JoinSet::new();

        let cause = self
            .take_commands(&shutdown, &ctx, &running, &mut attempts)
            .await;

        draining.store(true, Ordering::SeqCst);
        beat_now.notify_one();
        let running_now = running.len();
        let drain_timeout_ms = self.settings.drain_timeout.as_millis();
        match &cause {
            StopCause::Shutdown => {
                info!(worker_id = %worker_id, running = running_now, drain_timeout_ms = %drain_timeout_ms, "shutdown requested, agent draining");
            }
            StopCause::DrainCommand { reason } => {
                info!(worker_id = %worker_id, running = running_now, drain_timeout_ms = %drain_timeout_ms, reason = %reason, "drain requested, agent draining");
            }
            StopCause::Forced => {
                info!(worker_id = %worker_id, running = running_now, "forced stop requested");
            }
        }
        self.drain(&stops, &running, &mut attempts).await;

        stop_beating.cancel();
        let _ = lease_watch.await;
        match heartbeats.await {
            Ok(heartbeater) => heartbeater.last_beat().await,
            Err(e) => error!(worker_id = %worker_id, error = %e, "heartbeat task failed"),
        }
        stop_serving.cancel();
        if let Some(observability) = observability {
            let _ = observability.await;
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove();
        }
        info!(worker_id = %worker_id, "agent stopped");
        Ok(())
    }

    /// Pulls and handles commands until `shutdown` or the force stop token is cancelled or a
    /// `Drain` command comes; returns which.
    async fn take_commands(
        &mut self,
        shutdown: &CancellationToken,
        ctx: &Arc<AttemptContext>,
        running: &Running,
        attempts: &mut JoinSet<()>,
    ) -> StopCause {
        let force = self.force_stop.clone();
        let stop_requested = || async {
            tokio::select! {
                _ = shutdown.cancelled() => StopCause::Shutdown,
                _ = force.cancelled() => StopCause::Forced,
            }
        };
        let mut messages: Option<MessageStream> = None;
        let mut backoff = MIN_PULL_BACKOFF;
        loop {
            let Some(stream) = messages.as_mut() else {
                let pulled = tokio::select! {
                    cause = stop_requested() => return cause,
                    pulled = self.pull() => pulled,
                };
                match pulled {
                    Ok(stream) => messages = Some(stream),
                    Err(e) => {
                        self.metrics.nats_error("consume");
                        warn!(worker_id = %self.settings.worker_id, retry_in_ms = %backoff.as_millis(), error = %e, "failed to pull commands");
                        if let Some(cause) = pause(stop_requested(), &mut backoff).await {
                            return cause;
                        }
                    }
                }
                continue;
            };
            tokio::select! {
                biased;
                cause = stop_requested() => return cause,
                Some(joined) = attempts.join_next() => log_join(joined),
                next = stream.next() => match next {
                    Some(Ok(message)) => {
                        backoff = MIN_PULL_BACKOFF;
                        let span = trace::process_span(
                            SERVICE,
                            &message.subject,
                            &permissions::agent_consumer_name(&self.settings.worker_id),
                            message.headers.as_ref(),
                        );
                        if let Some(reason) = self.handle(message, ctx, running, attempts).instrument(span).await {
                            return StopCause::DrainCommand { reason };
                        }
                    }
                    Some(Err(e)) => {
                        self.metrics.nats_error("consume");
                        warn!(worker_id = %self.settings.worker_id, retry_in_ms = %backoff.as_millis(), error = %e, "failed to pull commands");
                        if e.kind() == MessagesErrorKind::ConsumerDeleted {
                            messages = None;
                        }
                        if let Some(cause) = pause(stop_requested(), &mut backoff).await {
                            return cause;
                        }
                    }
                    None => {
                        warn!(worker_id = %self.settings.worker_id, "command stream ended, pulling again");
                        messages = None;
                    }
                },
            }
        }
    }

    /// Reads when the command stream was created, so that a floor read from a stream since
    /// made again is dropped (see [`lease::Fence`]); if it cannot be read, the floor stays.
    async fn check_command_stream(&self, fence: &lease::Fence) {
        let read = tokio::time::timeout(STREAM_READ_TIMEOUT, self.js.get_stream(streams::AGENT));
        match read.await {
            Ok(Ok(stream)) => {
                if fence.stream_is(stream.cached_info().created.unix_timestamp_nanos()) {
                    warn!(worker_id = %self.settings.worker_id, "the command stream was made again since the lease was renewed, what it stored since is not refused");
                }
            }
            Ok(Err(e)) => {
                debug!(worker_id = %self.settings.worker_id, error = %e, "command stream not read, the fence stays");
            }
            Err(_) => {
                debug!(worker_id = %self.settings.worker_id, "command stream not read in time, the fence stays");
            }
        }
    }

    /// A fresh message stream from this agent's consumer, getting (or creating again) the
    /// consumer first so a deleted consumer comes back.
    async fn pull(&mut self) -> Result<MessageStream, AgentError> {
        let config = permissions::agent_consumer(&self.settings.worker_id);
        self.consumer = streams::consumer(&self.js, streams::AGENT, config).await?;
        self.consumer.messages().await.map_err(|e| {
            AgentError::Messaging(MessagingError::Setup {
                what: format!(
                    "pulling from consumer {}",
                    permissions::agent_consumer_name(&self.settings.worker_id)
                ),
                reason: e.to_string(),
            })
        })
    }

    /// Handles one command message; returns the reason given when it is a `Drain` command.
    async fn handle(
        &self,
        message: jetstream::Message,
        ctx: &Arc<AttemptContext>,
        running: &Running,
        attempts: &mut JoinSet<()>,
    ) -> Option<String> {
        let command: AgentCommand = match decode(&message.subject, &message.payload) {
            Ok(command) => command,
            Err(e) => {
                self.metrics.message_dead_lettered("agent-command");
                // Under the agent's own name: the only dead letters its credential may write.
                hodei_messaging::settle::dead_letter(
                    &self.js,
                    &message,
                    &permissions::agent_dead_letter_kind(&self.settings.worker_id),
                    &e.to_string(),
                )
                .await;
                return None;
            }
        };
        match command {
            AgentCommand::Assign {
                job_id,
                attempt,
                spec,
                incarnation,
                assigned_at,
            } => {
                let id = AttemptId::new(job_id, attempt);
                if let Some(placed_with) = incarnation
                    && placed_with != self.incarnation
                {
                    // Placed with an earlier process of this worker: the registry hands it
                    // back, and running it here could overlap with its next attempt.
                    info!(job_id = %job_id, attempt = %attempt, placed_with = %placed_with, incarnation = %self.incarnation, "assignment for a previous incarnation, ignoring it");
                    ack(&message).await;
                    return None;
                }
                // Stored too long after the assignment was made for the server to have
                // dropped it as a second copy: running it could run the attempt again. If it
                // is the only copy, the attempt was never started and its start timeout hands
                // it back. A command whose stored time cannot be read is refused too.
                let (late, stored) = match message.info() {
                    Ok(info) => {
                        let at = info.published.unix_timestamp_nanos();
                        (
                            stored_late(assigned_at, at),
                            lease::Stored {
                                sequence: info.stream_sequence,
                                at,
                            },
                        )
                    }
                    Err(e) => {
                        warn!(job_id = %job_id, attempt = %attempt, error = %e, "assignment without a readable stored time");
                        (
                            Some(Duration::MAX),
                            lease::Stored {
                                sequence: u64::MAX,
                                at: i128::MIN,
                            },
                        )
                    }
                };
                if let Some(late) = late {
                    self.metrics.agent_assignments_refused.inc();
                    warn!(job_id = %job_id, attempt = %attempt, late_ms = u64::try_from(late.as_millis()).unwrap_or(u64::MAX), "assignment stored too long after it was made, not running it");
                    ack(&message).await;
                    return None;
                }
                // Cancelled before it came (its cancel overtook it): reported cancelled,
                // never run.
                if running.take_cancelled_before_start(&id) {
                    info!(job_id = %job_id, attempt = %attempt, "attempt cancelled before its assignment came, reporting it cancelled");
                    let ctx = Arc::clone(ctx);
                    attempts.spawn(async move {
                        attempt::refuse(&ctx, id, &message, AttemptOutcome::Cancelled).await;
                    });
                    return None;
                }
                // Stored before the lease lapsed (or while it had): the registry may have
                // handed it to another worker meanwhile. Reported lost, so it is requeued at
                // once. Under the floor alone, unless the stream was made again since.
                if ctx.fence.refuses_by_floor_alone(stored) {
                    self.check_command_stream(&ctx.fence).await;
                }
                if ctx.fence.refuses(stored) && running.start(id).is_some() {
                    self.metrics.agent_assignments_refused.inc();
                    warn!(job_id = %job_id, attempt = %attempt, sequence = stored.sequence, "assignment stored before the lease lapsed, reporting it lost");
                    running.release_slot(&id);
                    let ctx = Arc::clone(ctx);
                    let running = running.clone();
                    attempts.spawn(async move {
                        let outcome = AttemptOutcome::Lost {
                            reason: lease::FENCED_REASON.to_owned(),
                        };
                        attempt::refuse(&ctx, id, &message, outcome).await;
                        running.finish(&id);
                    });
                    return None;
                }
                let Some(stoppers) = running.start(id) else {
                    info!(job_id = %job_id, attempt = %attempt, "attempt running or ended here lately, ignoring the assignment");
                    ack(&message).await;
                    return None;
                };
                let count = running.slots_held();
                if count > self.settings.max_concurrent_jobs as usize {
                    warn!(job_id = %job_id, attempt = %attempt, running = count, max_concurrent_jobs = self.settings.max_concurrent_jobs, "more attempts assigned than slots, running it anyway");
                }
                info!(job_id = %job_id, attempt = %attempt, name = %spec.name, "attempt assigned");
                let assignment = Assignment {
                    id,
                    spec,
                    command: message,
                    stoppers,
                    running: running.clone(),
                };
                let ctx = Arc::clone(ctx);
                let running = running.clone();
                // Child of the command's `process` span; lives as long as the attempt.
                let span = tracing::info_span!(
                    "run attempt",
                    hodei.service = SERVICE,
                    job_id = %job_id,
                    attempt = %attempt,
                    worker_id = %self.settings.worker_id,
                    process.pid = tracing::field::Empty,
                    process.exit.code = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                );
                attempts.spawn(
                    async move {
                        attempt::run(ctx, assignment).await;
                        running.finish(&id);
                    }
                    .instrument(span),
                );
                None
            }
            AgentCommand::Cancel {
                job_id,
                attempt,
                reason,
            } => {
                let id = AttemptId::new(job_id, attempt);
                if running.cancel(&id) {
                    info!(job_id = %job_id, attempt = %attempt, reason = %reason, "attempt cancelled");
                } else {
                    debug!(job_id = %job_id, attempt = %attempt, reason = %reason, "cancel for an attempt not running here, remembering it in case its assignment comes later");
                }
                ack(&message).await;
                None
            }
            AgentCommand::Drain { reason } => {
                ack(&message).await;
                Some(reason)
            }
        }
    }

    /// Waits for the attempts up to the drain timeout; then stops the rest (reported lost),
    /// gives them the kill grace and some time to report, and finally aborts what is left.
    /// A forced stop, before the timeout, cancels the attempts (reported cancelled) instead.
    async fn drain(&self, stops: &Stops, running: &Running, attempts: &mut JoinSet<()>) {
        let worker_id = &self.settings.worker_id;
        let forced = self.force_stop.is_cancelled()
            || tokio::select! {
                all = wait_all(attempts, self.settings.drain_timeout) => {
                    if all {
                        return;
                    }
                    false
                }
                _ = self.force_stop.cancelled() => true,
            };
        if forced {
            let cancelled = running.cancel_all();
            warn!(worker_id = %worker_id, cancelled, "forced stop, cancelling the attempts still running");
        } else {
            warn!(worker_id = %worker_id, left = attempts.len(), "drain timeout reached, stopping the attempts still running");
            stops.lost.cancel();
        }
        // Stopping takes up to a grace for the process and one for what it left running.
        let report_window = self.settings.kill_grace * 2 + REPORT_GRACE;
        if wait_all(attempts, report_window).await {
            return;
        }
        warn!(worker_id = %worker_id, left = attempts.len(), "attempts did not report in time, giving up on them");
        stops.give_up.cancel();
        if !wait_all(attempts, ABORT_GRACE).await {
            attempts.abort_all();
            while let Some(joined) = attempts.join_next().await {
                log_join(joined);
            }
        }
    }
}

/// Sweeps and reports what the previous incarnation left in the work folder: kills what is
/// left of each recorded attempt's processes, then reports each attempt (as recorded when its
/// process had ended, as lost otherwise), removing the record once the report is stored.
async fn recover(ctx: &AttemptContext, within: Duration) {
    let left = ctx.records.left();
    if left.is_empty() {
        return;
    }
    info!(worker_id = %ctx.worker_id, attempts = left.len(), "reporting what the previous incarnation left");
    // Bounded by the timeout below, which drops whatever is still publishing.
    let give_up = CancellationToken::new();
    let give_up = &give_up;
    let all = futures::future::join_all(left.into_iter().map(|record| async move {
        records::kill_leftovers(&record);
        let outcome = records::outcome_of(&record);
        info!(job_id = %record.attempt.job_id, attempt = %record.attempt.attempt, outcome = %outcome, "attempt of the previous incarnation");
        let finished = hodei_messaging::ReportKind::Finished {
            outcome,
            tail: record.tail.clone(),
        };
        if attempt::report(ctx, record.attempt, record.report_id, finished, give_up).await {
            ctx.records.remove(&record.attempt);
            let workspace = ctx
                .work_dir
                .join(format!("{}-{}", record.attempt.job_id, record.attempt.attempt));
            let _ = tokio::fs::remove_dir_all(workspace).await;
        }
    }));
    if tokio::time::timeout(within, all).await.is_err() {
        warn!(worker_id = %ctx.worker_id, "reports of the previous incarnation not stored in time, the registry hands those attempts back");
    }
}

/// Waits up to `within` for every attempt to end; returns whether they all did.
async fn wait_all(attempts: &mut JoinSet<()>, within: Duration) -> bool {
    let all = async {
        while let Some(joined) = attempts.join_next().await {
            log_join(joined);
        }
    };
    tokio::time::timeout(within, all).await.is_ok()
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && !e.is_cancelled()
    {
        error!(error = %e, "attempt task failed");
    }
}

/// Waits `backoff` (doubling it for next time) unless a stop is requested first; returns the
/// stop's cause if one was.
async fn pause(
    stop_requested: impl Future<Output = StopCause>,
    backoff: &mut Duration,
) -> Option<StopCause> {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_PULL_BACKOFF);
    tokio::select! {
        cause = stop_requested => Some(cause),
        _ = tokio::time::sleep(wait) => None,
    }
}

/// How long after `assigned_at` an assignment was stored in its stream (at `stored_unix_nanos`,
/// the server's clock), if later than [`streams::AT_MOST_ONCE_WITHIN`]. Every copy stored
/// within that time of `assigned_at` is within the duplicate window of the first, so the
/// server kept only one of them; a copy stored later (a relay's publication held up, a
/// client that buffered it while disconnected, a row republished after its delete was lost)
/// may be a second one, the first out of the server's memory by then. Relays already avoid
/// publishing such rows; this check is what the guarantee rests on. An `assigned_at` out of the
/// range of nanoseconds counts as late.
fn stored_late(
    assigned_at: chrono::DateTime<chrono::Utc>,
    stored_unix_nanos: i128,
) -> Option<Duration> {
    let Some(assigned) = assigned_at.timestamp_nanos_opt() else {
        return Some(Duration::MAX);
    };
    let assigned = i128::from(assigned);
    let after = u64::try_from(stored_unix_nanos.checked_sub(assigned)?).ok()?;
    let after = Duration::from_nanos(after);
    (after > streams::AT_MOST_ONCE_WITHIN).then_some(after)
}

async fn ack(message: &jetstream::Message) {
    if let Err(e) = message.ack().await {
        warn!(subject = %message.subject, error = %e, "failed to acknowledge command");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn nanos(at: chrono::DateTime<chrono::Utc>) -> i128 {
        i128::from(at.timestamp_nanos_opt().unwrap())
    }

    #[test]
    fn an_assignment_is_refused_only_when_stored_past_the_at_most_once_bound() {
        let assigned = chrono::Utc::now();
        let within = chrono::Duration::from_std(streams::AT_MOST_ONCE_WITHIN).unwrap();
        assert_eq!(stored_late(assigned, nanos(assigned)), None);
        assert_eq!(stored_late(assigned, nanos(assigned + within)), None);
        // Stored before it was made: the clocks differ a little; nothing to refuse.
        assert_eq!(stored_late(assigned, nanos(assigned - within * 2)), None);
        let late = within + chrono::Duration::milliseconds(1);
        assert_eq!(
            stored_late(assigned, nanos(assigned + late)),
            Some(late.to_std().unwrap())
        );
    }
}
