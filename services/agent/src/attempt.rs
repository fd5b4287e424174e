//! Running one attempt: a fresh workspace (with the artifacts of the steps a pipeline step
//! consumes), the process in its own process group, its output
//! (secrets masked) shipped as logs, the timeout and cancellation (SIGTERM, grace, SIGKILL to
//! the group), the artifacts a successful pipeline step produces, and the `Started` and
//! `Finished` reports.
//!
//! The command that assigned the attempt is acknowledged once `Started` is stored (or, if that
//! never happened, once `Finished` is): until then it would be redelivered.
//!
//! The process is started with its parent-death signal set ([`crate::launch`]), so it dies
//! with the agent, and recorded in the work folder ([`crate::records`]) from its start until
//! its `Finished` report is stored, so the next incarnation can sweep and report what this one
//! left.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use hodei_domain::{AttemptId, AttemptOutcome, JobSpec, WorkerId};
use hodei_messaging::{AgentReport, LogStreamKind, ReportKind, subjects};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};
use uuid::Uuid;

use crate::artifacts;
use crate::cgroup::{JobCgroup, JobCgroups};
use crate::group::JobProcesses;
use crate::identity::{Identity, JobUsers};
use crate::launch::{self, JobCommand, JobProcess, JobStart};
use crate::mask::Masker;
use crate::output::{self, LogShipper};
use crate::publish;
use crate::records::{Record, Records};
use crate::running::{Running, Stoppers};

/// The reason given for an attempt still running when the agent's drain timed out: it is
/// reported `Lost` with it.
pub const LOST_REASON: &str = "agent shut down before the attempt finished";
/// The reason given for an attempt the agent stopped because it could not reach NATS for
/// longer than its lease: it is reported `Lost` with it (and requeued elsewhere).
pub const LEASE_REASON: &str =
    "the agent lost contact with NATS for longer than its lease and stopped the attempt";
/// How long a process may take to disappear after SIGKILL before the agent stops waiting.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(5);
/// Shortest wait for a killed job's output to close.
const MIN_OUTPUT_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What every attempt shares: where to publish, who we are, where workspaces live.
pub(crate) struct AttemptContext {
    pub js: jetstream::Context,
    pub worker_id: WorkerId,
    pub work_dir: PathBuf,
    pub kill_grace: Duration,
    /// The agent's own `PATH`, handed to jobs so `argv[0]` is found as on the host.
    pub path: Option<OsString>,
    pub stops: Stops,
    pub metrics: hodei_telemetry::Metrics,
    /// Where pipeline steps' artifacts are kept.
    pub artifacts: async_nats::jetstream::object_store::ObjectStore,
    /// Reads the artifacts of the steps a step consumes (direct gets, no consumer).
    pub artifact_reader: hodei_messaging::artifacts::DirectReader,
    pub artifact_max_bytes: u64,
    /// Where attempts are recorded for the next incarnation.
    pub records: Records,
    /// Who jobs run as, when not as the agent's user.
    pub job_users: Option<Arc<JobUsers>>,
    pub job_limits: crate::config::JobLimits,
    /// Where jobs get cgroups of their own, if the host allows.
    pub cgroups: Option<JobCgroups>,
    /// Opens the secret values sealed to this agent incarnation.
    pub seal: hodei_messaging::seal::OpeningKey,
    /// The agent's hold on its work folder, which jobs' processes do not keep.
    pub work_lock: crate::work_lock::WorkLock,
    /// Which assignments may still run after a lapse of the lease.
    pub fence: crate::lease::Fence,
}

/// The agent's stages of stopping, as seen by attempts. (Draining itself changes nothing for
/// an attempt; a forced stop cancels each attempt through its own token.)
#[derive(Debug, Clone, Default)]
pub(crate) struct Stops {
    /// The drain timed out: running processes are killed and reported lost.
    pub lost: CancellationToken,
    /// The agent is about to return: publishing stops retrying.
    pub give_up: CancellationToken,
}

/// An attempt to run, with the command that assigned it (acknowledged once reported).
pub(crate) struct Assignment {
    pub id: AttemptId,
    pub spec: Box<JobSpec>,
    pub command: jetstream::Message,
    /// What stops it: a `Cancel` command, or the agent's lease expiring.
    pub stoppers: Stoppers,
    /// The agent's running attempts, told when this one's end is reported.
    pub running: Running,
}

/// Why the agent stopped a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    TimedOut,
    Cancelled,
    Lost,
    LeaseExpired,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            StopReason::TimedOut => "timed out",
            StopReason::Cancelled => "cancelled",
            StopReason::Lost => "agent shutting down",
            StopReason::LeaseExpired => "lease expired",
        }
    }
}

/// How the process ended.
#[derive(Debug)]
enum End {
    /// On its own.
    Exited(io::Result<ExitStatus>),
    /// Stopped by the agent.
    Stopped(StopReason),
}

/// Runs the attempt to its end and reports it.
pub(crate) async fn run(ctx: Arc<AttemptContext>, assignment: Assignment) {
    let Assignment {
        id,
        spec,
        command,
        stoppers,
        running,
    } = assignment;
    let workspace = ctx.work_dir.join(format!("{}-{}", id.job_id, id.attempt));
    // Secret values arrive sealed to this incarnation; they are opened only here, for the
    // process's environment and for masking its output.
    let opened = spec.map_secrets(|value| {
        if hodei_messaging::seal::is_sealed(value) {
            ctx.seal.open(value)
        } else {
            Ok(value.to_owned())
        }
    });
    let (spec, opened) = match opened {
        Ok(open) => (Box::new(open), Ok(())),
        Err(e) => (spec, Err(e)),
    };
    let masker = Arc::new(Masker::for_spec(&spec));
    let report_id = Uuid::now_v7();
    let mut pgid = None;
    // Held until the workspace is gone: a range's uid is not handed to another attempt while
    // this one's files or processes may remain.
    let mut identity = None;
    let mut cgroup = None;
    let started = match opened {
        Ok(()) => {
            spawn(
                &ctx,
                id,
                &spec,
                &workspace,
                &stoppers,
                &mut identity,
                &mut cgroup,
            )
            .await
        }
        Err(e) => Err(NotStarted::Failed(format!("secret_env: {e}"))),
    };
    let (mut outcome, mut tail, acked) = match started {
        Ok(child) => {
            let record = Record {
                attempt: id,
                pgid: i32::try_from(child.id()).unwrap_or_default(),
                report_id,
                outcome: None,
                tail: Vec::new(),
            };
            ctx.records.write(&record);
            pgid = Some(record.pgid);
            let processes = JobProcesses::new(child.id(), cgroup.clone());
            supervise(
                &ctx, id, &spec, child, processes, &command, &stoppers, masker, record,
            )
            .await
        }
        Err(NotStarted::Failed(reason)) => {
            // The reason names the program, which may hold a secret value.
            let reason = String::from_utf8_lossy(&masker.mask(reason.as_bytes())).into_owned();
            warn!(job_id = %id.job_id, attempt = %id.attempt, reason = %reason, "attempt failed to start");
            end_log(&ctx, id).await;
            (AttemptOutcome::SpawnFailed { reason }, Vec::new(), false)
        }
        Err(NotStarted::Stopped(reason)) => {
            info!(job_id = %id.job_id, attempt = %id.attempt, reason = reason.as_str(), "attempt stopped before its process started");
            end_log(&ctx, id).await;
            (outcome(&End::Stopped(reason)), Vec::new(), false)
        }
    };
    if let (Some(cgroup), Some(cgroups)) = (cgroup.take(), &ctx.cgroups) {
        tail.extend(give_back_cgroup(id, cgroups, cgroup).await);
    }
    if outcome.is_success()
        && let Some(plan) = &spec.artifacts
        && let Err(reason) =
            artifacts::keep(&ctx.artifacts, plan, &workspace, ctx.artifact_max_bytes).await
    {
        warn!(job_id = %id.job_id, attempt = %id.attempt, reason = %reason, "failed to keep artifacts");
        outcome = AttemptOutcome::ArtifactsFailed { reason };
    }
    let span = tracing::Span::current();
    span.record("outcome", crate::observe::outcome_label(&outcome));
    if let Some(code) = outcome.exit_code() {
        span.record("process.exit.code", code);
    }
    ctx.metrics
        .agent_attempt_finished(crate::observe::outcome_label(&outcome));
    info!(job_id = %id.job_id, attempt = %id.attempt, outcome = %outcome, "attempt finished");
    if let Some(pgid) = pgid {
        ctx.records.write(&Record {
            attempt: id,
            pgid,
            report_id,
            outcome: Some(outcome.clone()),
            tail: tail.clone(),
        });
    }
    let finished = ReportKind::Finished { outcome, tail };
    // The scheduler frees the slot once it stores the report and may assign it at once,
    // before this task sees the report's ack: from here on (the report, the workspace's
    // removal) the attempt no longer counts against the agent's slots.
    running.release_slot(&id);
    if report(&ctx, id, report_id, finished, &ctx.stops.give_up).await {
        ctx.records.remove(&id);
        if !acked {
            ack(&command, id).await;
        }
    }
    match tokio::fs::remove_dir_all(&workspace).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(job_id = %id.job_id, attempt = %id.attempt, workspace = %workspace.display(), error = %e, "failed to remove workspace");
        }
    }
    drop(identity);
}

/// Why an attempt's process was not started.
enum NotStarted {
    /// Its start failed: reported `spawn_failed` with the reason.
    Failed(String),
    /// It was stopped first (cancelled, its lease ran out, the agent stopping), while its
    /// artifacts were fetched or before: its process never runs, since the attempt may
    /// already have been handed to another worker.
    Stopped(StopReason),
}

impl From<String> for NotStarted {
    fn from(reason: String) -> Self {
        NotStarted::Failed(reason)
    }
}

/// Why the attempt is stopped already, if it is.
fn stopped(ctx: &AttemptContext, stoppers: &Stoppers) -> Option<StopReason> {
    if stoppers.cancel.is_cancelled() {
        Some(StopReason::Cancelled)
    } else if stoppers.lose.is_cancelled() {
        Some(StopReason::LeaseExpired)
    } else if ctx.stops.lost.is_cancelled() {
        Some(StopReason::Lost)
    } else {
        None
    }
}

/// Waits until the attempt is stopped, and says why.
async fn stopping(ctx: &AttemptContext, stoppers: &Stoppers) -> StopReason {
    tokio::select! {
        _ = stoppers.cancel.cancelled() => StopReason::Cancelled,
        _ = stoppers.lose.cancelled() => StopReason::LeaseExpired,
        _ = ctx.stops.lost.cancelled() => StopReason::Lost,
    }
}

/// Creates a fresh workspace and starts the job's process in it. The environment is only:
/// the agent's `PATH` (so `argv[0]` is looked up as on the host; the job's env may replace
/// it), `HOME` set to the workspace, the job's env, and `HODEI_JOB_ID`, `HODEI_ATTEMPT`,
/// `HODEI_WORKER_ID` and `HODEI_WORKSPACE`.
#[allow(clippy::too_many_arguments)]
async fn spawn(
    ctx: &AttemptContext,
    id: AttemptId,
    spec: &JobSpec,
    workspace: &Path,
    stoppers: &Stoppers,
    identity: &mut Option<Identity>,
    cgroup: &mut Option<JobCgroup>,
) -> Result<JobProcess, NotStarted> {
    let fresh = workspace.to_path_buf();
    tokio::task::spawn_blocking(move || fresh_workspace(&fresh))
        .await
        .map_err(|e| format!("failed to make workspace {}: {e}", workspace.display()))??;
    if let Some(plan) = &spec.artifacts {
        tokio::select! {
            fetched = artifacts::fetch(&ctx.artifact_reader, plan, workspace) => {
                fetched.map_err(|reason| format!("failed to fetch artifacts: {reason}"))?;
            }
            reason = stopping(ctx, stoppers) => return Err(NotStarted::Stopped(reason)),
        }
    }
    let cwd = match &spec.working_dir {
        Some(dir) => {
            let cwd = workspace.join(dir);
            tokio::fs::create_dir_all(&cwd)
                .await
                .map_err(|e| io_err("failed to create working dir", &cwd, e))?;
            cwd
        }
        None => workspace.to_path_buf(),
    };
    let argv = spec.command.argv();
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "the command is empty".to_owned())?;
    // Found as the job's own PATH would find it, so a missing program fails the start here
    // with its name, rather than as a bare error of the exec.
    let search_path = spec
        .env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| ctx.path.clone());
    let resolved = which::which_in(program, search_path, &cwd)
        .map_err(|e| format!("failed to start {program}: {e}"))?;
    let cgroup_procs = match &ctx.cgroups {
        Some(cgroups) => {
            let made = cgroups
                .take(spec.resources, ctx.job_limits.max_processes)
                .await
                .map_err(|e| format!("failed to make the job's cgroup: {e}"))?;
            let procs = made.procs_files();
            *cgroup = Some(made);
            procs.map_err(|e| format!("failed to open the job's cgroup: {e}"))?
        }
        None => Vec::new(),
    };
    let user = match &ctx.job_users {
        Some(users) => {
            let who = users
                .take()
                .ok_or_else(|| "every job uid of HODEI_JOB_USER is in use".to_owned())?;
            who.own(workspace).map_err(|e| {
                io_err(
                    "failed to hand the workspace to the job's user",
                    workspace,
                    e,
                )
            })?;
            let ids = who.ids();
            *identity = Some(who);
            Some(ids)
        }
        None => None,
    };
    let mut command = JobCommand::new(&resolved, &cwd);
    command.args(args);
    if let Some(path) = &ctx.path {
        command.env("PATH", path);
    }
    command
        .env("HOME", workspace)
        .envs(&spec.env)
        .env("HODEI_JOB_ID", id.job_id.to_string())
        .env("HODEI_ATTEMPT", id.attempt.to_string())
        .env("HODEI_WORKER_ID", ctx.worker_id.as_str())
        .env("HODEI_WORKSPACE", workspace);
    let start = JobStart {
        cgroup_procs,
        limits: ctx.job_limits,
        user,
        work_lock: Some(ctx.work_lock.clone()),
    };
    if let Some(reason) = stopped(ctx, stoppers) {
        return Err(NotStarted::Stopped(reason));
    }
    Ok(launch::start(command, start)
        .await
        .map_err(|e| format!("failed to start {program}: {e}"))?)
}

fn io_err(what: &str, path: &Path, e: io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

/// Makes an empty workspace at `path`, removing what an earlier attempt left there: both in one
/// trip to the blocking pool.
fn fresh_workspace(path: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("failed to clear old workspace", path, e)),
    }
    std::fs::create_dir_all(path).map_err(|e| io_err("failed to create workspace", path, e))
}

/// Empties an ended job's cgroup for the next job; returns the line to add to the output's tail
/// when the kernel killed a process of the job at its memory limit.
async fn give_back_cgroup(
    id: AttemptId,
    cgroups: &JobCgroups,
    cgroup: JobCgroup,
) -> Option<String> {
    let released = cgroups.give_back(cgroup).await;
    if released.killed > 0 {
        warn!(job_id = %id.job_id, attempt = %id.attempt, killed = released.killed, "processes left in the job's cgroup killed");
    }
    if let Err(e) = &released.kept {
        warn!(job_id = %id.job_id, attempt = %id.attempt, error = %e, "failed to remove the job's cgroup");
    }
    let oom_kills = released.oom_kills;
    (oom_kills > 0).then(|| {
        let limit_mb = released.memory_limit / (1024 * 1024);
        warn!(job_id = %id.job_id, attempt = %id.attempt, oom_kills, limit_mb, "job reached its memory limit");
        format!(
            "hodei-agent: the job reached its memory limit of {limit_mb} MiB and the kernel killed {oom_kills} of its processes"
        )
    })
}

/// Watches a started process to its end while reporting `Started`; returns the outcome, the
/// output's last lines and whether the command is acknowledged.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    ctx: &AttemptContext,
    id: AttemptId,
    spec: &JobSpec,
    mut child: JobProcess,
    processes: JobProcesses,
    command: &jetstream::Message,
    stoppers: &Stoppers,
    masker: Arc<Masker>,
    mut record: Record,
) -> (AttemptOutcome, Vec<String>, bool) {
    let deadline = Instant::now() + spec.timeout();
    let pid = child.id();
    tracing::Span::current().record("process.pid", pid);
    info!(job_id = %id.job_id, attempt = %id.attempt, pid, "process started");

    let (lines_tx, lines_rx) = mpsc::channel(output::LINE_CHANNEL_CAPACITY);
    let mut readers = Vec::with_capacity(2);
    if let Some(stdout) = child.stdout.take() {
        let lines = lines_tx.clone();
        readers.push(tokio::spawn(output::read_lines(
            stdout,
            LogStreamKind::Stdout,
            Arc::clone(&masker),
            lines,
        )));
    }
    if let Some(stderr) = child.stderr.take() {
        let lines = lines_tx.clone();
        readers.push(tokio::spawn(output::read_lines(
            stderr,
            LogStreamKind::Stderr,
            Arc::clone(&masker),
            lines,
        )));
    }
    drop(lines_tx);
    let (exited_tx, exited_rx) = oneshot::channel();
    let shipper = tokio::spawn(
        log_shipper(ctx, id)
            .ship(lines_rx, exited_rx)
            .instrument(tracing::Span::current()),
    );

    // Retried until stored (or the agent gives up): a job must not go from assigned to ended
    // without having been seen running, even if the agent began draining meanwhile.
    let announce = async {
        let started = ReportKind::Started { pid };
        let stored = report(ctx, id, Uuid::now_v7(), started, &ctx.stops.give_up).await;
        if stored {
            ack(command, id).await;
        }
        stored
    };
    let watch = async {
        let end = wait_or_stop(ctx, id, &mut child, &processes, deadline, stoppers).await;
        // Recorded at once: an agent killed from here on still has its next incarnation
        // report how the process ended, instead of running the job again.
        record.outcome = Some(journaled(outcome(&end), spec));
        ctx.records.write(&record);
        // The shipper sends its last batch once the pipes are closed too.
        let _ = exited_tx.send(());
        let stopped = matches!(end, End::Stopped(_));
        close_output(ctx, id, &processes, readers, deadline, stoppers, stopped).await;
        end
    };
    let (acked, end) = tokio::join!(announce, watch);
    let tail = shipper.await.unwrap_or_else(|e| {
        error!(job_id = %id.job_id, attempt = %id.attempt, error = %e, "log shipper failed");
        Vec::new()
    });
    (outcome(&end), tail, acked)
}

/// What the journal keeps as the attempt's outcome once its process ended, for the next
/// incarnation to report should this one die before reporting it: a success whose artifacts
/// are still to be kept is not one yet (the record is written again once they are).
fn journaled(outcome: AttemptOutcome, spec: &JobSpec) -> AttemptOutcome {
    if outcome.is_success()
        && spec
            .artifacts
            .as_ref()
            .is_some_and(|plan| !plan.produce.is_empty())
    {
        AttemptOutcome::ArtifactsFailed {
            reason: crate::records::ARTIFACTS_INTERRUPTED_REASON.to_owned(),
        }
    } else {
        outcome
    }
}

/// Waits for the process to exit, or stops it (SIGTERM, grace, SIGKILL to its group and
/// cgroup) at the deadline, on cancel, or when the agent gives up draining.
async fn wait_or_stop(
    ctx: &AttemptContext,
    id: AttemptId,
    child: &mut JobProcess,
    processes: &JobProcesses,
    deadline: Instant,
    stoppers: &Stoppers,
) -> End {
    let reason = tokio::select! {
        status = child.wait() => return End::Exited(status),
        _ = tokio::time::sleep_until(deadline) => StopReason::TimedOut,
        reason = stopping(ctx, stoppers) => reason,
    };
    info!(job_id = %id.job_id, attempt = %id.attempt, reason = reason.as_str(), grace_ms = %ctx.kill_grace.as_millis(), "stopping process group");
    let status = if processes.is_tracked() {
        processes
            .terminate(ctx.kill_grace, AFTER_KILL_WAIT, child.wait())
            .await
    } else {
        if let Err(e) = child.start_kill() {
            warn!(job_id = %id.job_id, attempt = %id.attempt, error = %e, "failed to kill process");
        }
        tokio::time::timeout(AFTER_KILL_WAIT, child.wait())
            .await
            .ok()
    };
    match status {
        Some(Ok(status)) => {
            info!(job_id = %id.job_id, attempt = %id.attempt, status = %status, "process stopped");
        }
        Some(Err(e)) => {
            warn!(job_id = %id.job_id, attempt = %id.attempt, error = %e, "failed to wait for the stopped process");
        }
        None => {
            error!(job_id = %id.job_id, attempt = %id.attempt, "process still there after sigkill");
        }
    }
    End::Stopped(reason)
}

/// Once the leader has exited: stops whatever the job left running in its group and cgroup
/// (SIGTERM, grace, SIGKILL), then waits for the output pipes to close. Output held open by a
/// process outside both is cut at the deadline or on cancel (or, for a stopped job, after the
/// grace period).
async fn close_output(
    ctx: &AttemptContext,
    id: AttemptId,
    processes: &JobProcesses,
    readers: Vec<JoinHandle<()>>,
    deadline: Instant,
    stoppers: &Stoppers,
    stopped: bool,
) {
    if processes.signal(Signal::SIGTERM) {
        info!(job_id = %id.job_id, attempt = %id.attempt, pgid = ?processes.pgid(), "stopping processes the job left running");
        if !processes.wait_empty(ctx.kill_grace).await {
            processes.kill().await;
        }
    }
    let aborts: Vec<_> = readers.iter().map(JoinHandle::abort_handle).collect();
    let done = futures::future::join_all(readers);
    tokio::pin!(done);
    let closed = if stopped {
        let wait = ctx.kill_grace.max(MIN_OUTPUT_CLOSE_WAIT);
        tokio::time::timeout(wait, &mut done).await.is_ok()
    } else {
        tokio::select! {
            _ = &mut done => true,
            _ = tokio::time::sleep_until(deadline) => false,
            _ = stoppers.cancel.cancelled() => false,
            _ = stoppers.lose.cancelled() => false,
            _ = ctx.stops.lost.cancelled() => false,
        }
    };
    if !closed {
        warn!(job_id = %id.job_id, attempt = %id.attempt, "output still open after the process ended, closing it");
        for abort in aborts {
            abort.abort();
        }
    }
}

/// The outcome to report for how the process ended.
fn outcome(end: &End) -> AttemptOutcome {
    match end {
        End::Stopped(StopReason::TimedOut) => AttemptOutcome::TimedOut,
        End::Stopped(StopReason::Cancelled) => AttemptOutcome::Cancelled,
        End::Stopped(StopReason::Lost) => AttemptOutcome::Lost {
            reason: LOST_REASON.to_owned(),
        },
        End::Stopped(StopReason::LeaseExpired) => AttemptOutcome::Lost {
            reason: LEASE_REASON.to_owned(),
        },
        End::Exited(Ok(status)) => match (status.code(), status.signal()) {
            (Some(code), _) => AttemptOutcome::Exited { code },
            (None, Some(signal)) => AttemptOutcome::Signalled { signal },
            (None, None) => AttemptOutcome::Lost {
                reason: format!("process ended with an unknown status: {status}"),
            },
        },
        End::Exited(Err(e)) => AttemptOutcome::Lost {
            reason: format!("failed to wait for the process: {e}"),
        },
    }
}

/// What ships attempt `id`'s log.
fn log_shipper(ctx: &AttemptContext, id: AttemptId) -> LogShipper {
    LogShipper::new(
        ctx.js.clone(),
        ctx.metrics.clone(),
        &ctx.worker_id,
        id,
        ctx.stops.give_up.clone(),
    )
}

/// Ends the log of attempt `id`, which ran no process, for whoever follows it.
async fn end_log(ctx: &AttemptContext, id: AttemptId) {
    log_shipper(ctx, id).eof_only().await;
}

/// Reports attempt `id` ended with `outcome` without running it, then acknowledges its
/// `command` (left for redelivery if the report was not stored).
pub(crate) async fn refuse(
    ctx: &AttemptContext,
    id: AttemptId,
    command: &jetstream::Message,
    outcome: AttemptOutcome,
) {
    end_log(ctx, id).await;
    let finished = ReportKind::Finished {
        outcome,
        tail: Vec::new(),
    };
    if report(ctx, id, Uuid::now_v7(), finished, &ctx.stops.give_up).await {
        ack(command, id).await;
    }
}

/// Publishes a report on the attempt (de-duplicated by `report_id`) until it is stored or
/// `stop` is cancelled; returns whether it was stored.
pub(crate) async fn report(
    ctx: &AttemptContext,
    id: AttemptId,
    report_id: Uuid,
    kind: ReportKind,
    stop: &CancellationToken,
) -> bool {
    let report = AgentReport {
        report_id,
        worker_id: ctx.worker_id.clone(),
        job_id: id.job_id,
        attempt: id.attempt,
        at: Utc::now(),
        kind,
    };
    let payload = match serde_json::to_vec(&report) {
        Ok(json) => json,
        Err(e) => {
            error!(job_id = %id.job_id, attempt = %id.attempt, error = %e, "failed to encode report");
            return false;
        }
    };
    let stored = publish::until_acked(
        &ctx.js,
        &ctx.metrics,
        &subjects::report(&ctx.worker_id, &id.job_id),
        &report.report_id.to_string(),
        payload.into(),
        stop,
    )
    .await;
    if !stored {
        warn!(job_id = %id.job_id, attempt = %id.attempt, "report not stored, giving up");
    }
    stored
}

async fn ack(command: &jetstream::Message, id: AttemptId) {
    if let Err(e) = command.ack().await {
        warn!(job_id = %id.job_id, attempt = %id.attempt, error = %e, "failed to acknowledge command");
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command as StdCommand;

    use super::*;

    fn status_of(script: &str) -> ExitStatus {
        StdCommand::new("sh").args(["-c", script]).status().unwrap()
    }

    /// An agent killed while it keeps a step's artifacts leaves a journal that says they
    /// failed, not that the step succeeded.
    #[test]
    fn a_success_is_journaled_as_such_only_when_no_artifacts_are_to_be_kept() {
        let draft = hodei_domain::spec::JobSpecDraft::exec("plain", &["true"]);
        let plain = JobSpec::try_from(draft.clone()).unwrap();
        let mut producing = draft;
        producing.artifacts = Some(hodei_domain::ArtifactPlan {
            run_id: hodei_domain::PipelineRunId::new(),
            step: "build".into(),
            produce: vec!["dist/**".into()],
            consume: Vec::new(),
        });
        let producing = JobSpec::try_from(producing).unwrap();
        let success = AttemptOutcome::Exited { code: 0 };
        assert_eq!(journaled(success.clone(), &plain), success);
        assert_eq!(
            journaled(success, &producing),
            AttemptOutcome::ArtifactsFailed {
                reason: crate::records::ARTIFACTS_INTERRUPTED_REASON.to_owned()
            }
        );
        let failed = AttemptOutcome::Exited { code: 3 };
        assert_eq!(journaled(failed.clone(), &producing), failed);
    }

    #[test]
    fn exits_and_signals_become_outcomes() {
        assert_eq!(
            outcome(&End::Exited(Ok(status_of("exit 3")))),
            AttemptOutcome::Exited { code: 3 }
        );
        assert_eq!(
            outcome(&End::Exited(Ok(status_of("kill -9 $$")))),
            AttemptOutcome::Signalled { signal: 9 }
        );
        assert_eq!(
            outcome(&End::Stopped(StopReason::TimedOut)),
            AttemptOutcome::TimedOut
        );
        assert_eq!(
            outcome(&End::Stopped(StopReason::Lost)),
            AttemptOutcome::Lost {
                reason: LOST_REASON.to_owned()
            }
        );
    }
}
