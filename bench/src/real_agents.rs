//! `real-agents`: the end-to-end system of `throughput` (the real gateway, scheduler and
//! registry in this process through `hodei-system-tests`, a private nats-server with file
//! storage, a fresh PostgreSQL database) with real `hodei-agent` processes instead of
//! simulated agents: each a separate process (the binary `agent::locate` finds), with its own
//! work dir and log file in a temporary folder, killed at the end. Once every agent is `ready`
//! in `workers`, N jobs running `true` are submitted over gRPC by concurrent clients and
//! waited to their end; jobs/s from the first submit to the last completion, the submit→
//! started/completed percentiles of each job's first attempt, and the agents' memory and CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hodei_messaging::permissions::NatsRole;
use hodei_system_tests::{HEARTBEAT_MS, SystemOptions, TestSystem};
use sqlx::PgPool;

use crate::procfs::{self, GroupMeter, Pid};
use crate::report::Outcome;
use crate::{agent, reference, system};

const S: &str = "real-agents";
/// Jobs that have ended, one way or another.
const ENDED: &str =
    "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'timed_out')";
/// Example log lines kept per agent and level.
const LOG_EXAMPLES: usize = 3;

/// Parameters of `real-agents`.
pub struct RealAgentsParams {
    pub binary: Option<PathBuf>,
    /// Where the agents' work folders are made (default: the temporary folder).
    pub work_dir: Option<PathBuf>,
    pub jobs: usize,
    pub clients: usize,
    /// Jobs per submission call (1: SubmitJob; more: SubmitJobs).
    pub batch: usize,
    pub agents: usize,
    /// Slots (`--max-concurrent-jobs`) of each agent.
    pub slots: u32,
    /// How long the agents get to be `ready` in `workers`.
    pub ready_within: Duration,
    /// How long the jobs get to end once submitted.
    pub timeout: Duration,
    pub reference_messages: usize,
    /// `true` processes started for the process-start reference.
    pub reference_processes: usize,
}

/// Starts the system and the agents, runs the jobs, stops everything.
pub async fn real_agents(p: RealAgentsParams) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        p.agents > 0 && p.slots > 0,
        "real-agents needs at least one agent with one slot"
    );
    let binary = agent::locate(p.binary.clone())?;
    let options = SystemOptions {
        max_queued_jobs: 10_000_000,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(&[], options)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let folder = match &p.work_dir {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    };
    let result = match folder.context("failed to create the agents' folder") {
        Ok(dir) => run(&mut system, &binary, dir.path(), &p).await,
        Err(e) => Err(e),
    };
    system.stop().await;
    let mut out = result?;
    out.note(format!(
        "real-agents: {} jobs running `true` (exec, default resources: none requested), {} grpc \
         clients (one http/2 channel each), {} a call, {} {} processes x {} slots (heartbeat every \
         {HEARTBEAT_MS} ms, each its own work dir in {}, default logging to a file) against the \
         system of `throughput`; completion counted in postgres (every 20 ms near the end); latencies from \
         each job's created_at (gateway) to its first attempt's started_at/finished_at; agent \
         rss read once every job had ended; the jetstream and process-start references ran \
         after the agents were killed, the latter starting `true` from one thread per core, \
         each waiting for its process to exit",
        p.jobs,
        p.clients,
        system::calls(p.batch),
        p.agents,
        binary.display(),
        p.slots,
        p.work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .display()
    ));
    Ok(out)
}

/// One `hodei-agent` process and its log.
struct RealAgent {
    id: String,
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl RealAgent {
    /// Starts agent `id` with `nats` (its NATS url and credential, as environment), its work
    /// dir and log in `dir`. It is killed when dropped.
    fn spawn(
        binary: &Path,
        nats: Vec<(String, String)>,
        dir: &Path,
        id: String,
        slots: u32,
    ) -> anyhow::Result<RealAgent> {
        let log = dir.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).context("failed to create an agent's log")?;
        let err = out.try_clone().context("failed to share an agent's log")?;
        // Jobs that request nothing (the default) fit any capacity; this one is ample anyway.
        let cpu_millis = u64::from(slots).saturating_mul(1000);
        let memory_mb = u64::from(slots).saturating_mul(256);
        let child = tokio::process::Command::new(binary)
            .envs(nats)
            .args(["--worker-id", &id, "--labels", "os=linux"])
            .args(["--heartbeat-interval-ms", &HEARTBEAT_MS.to_string()])
            .args(["--max-concurrent-jobs", &slots.to_string()])
            .args(["--cpu-millis", &cpu_millis.to_string()])
            .args(["--memory-mb", &memory_mb.to_string()])
            .args(["--kill-grace-ms", "1000", "--drain-timeout-ms", "1000"])
            .arg("--work-dir")
            .arg(dir.join(format!("{id}-work")))
            .env_remove("HODEI_METRICS_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("agent {id} exited at once"))?;
        Ok(RealAgent {
            id,
            child,
            pid,
            log,
        })
    }

    /// Kills the agent and waits for it (at most 5 s).
    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    /// The last `n` lines of its log.
    fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// How many warnings and errors it logged, with a few distinct examples (without their
    /// timestamps), or `None` when there were none.
    fn log_findings(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut examples: Vec<String> = Vec::new();
        for line in log.lines() {
            let Some(level) = level(line) else {
                continue;
            };
            let seen = counts.entry(level).or_default();
            *seen += 1;
            // Past the timestamp, so repeats of one message are recognised.
            let text = line.split_once(' ').map_or(line, |(_, rest)| rest).trim();
            let text: String = text.chars().take(240).collect();
            if *seen <= LOG_EXAMPLES && !examples.contains(&text) {
                examples.push(text);
            }
        }
        if counts.is_empty() {
            return None;
        }
        let counts: Vec<String> = counts.iter().map(|(l, n)| format!("{n} {l}")).collect();
        Some(format!(
            "real-agents: agent {} logged {}: {}",
            self.id,
            counts.join(", "),
            examples.join(" | ")
        ))
    }
}

/// The level of a log line if it is a warning or an error: human-readable lines
/// (`<time> <LEVEL> …`) or JSON lines (`"level":"…"`).
fn level(line: &str) -> Option<&'static str> {
    let found = |l: &str| {
        line.split_whitespace().nth(1) == Some(l) || line.contains(&format!("\"level\":\"{l}\""))
    };
    ["ERROR", "WARN"].into_iter().find(|l| found(l))
}

async fn run(
    system: &mut TestSystem,
    binary: &Path,
    dir: &Path,
    p: &RealAgentsParams,
) -> anyhow::Result<Outcome> {
    let pool = system.database.connect().await?;
    let result = run_with(system, &pool, binary, dir, p).await;
    pool.close().await;
    result
}

async fn run_with(
    system: &mut TestSystem,
    pool: &PgPool,
    binary: &Path,
    dir: &Path,
    p: &RealAgentsParams,
) -> anyhow::Result<Outcome> {
    // Every agent is enrolled before any starts: each enrolment reloads the nats-server's
    // authorization, and an agent connecting during a reload was refused once
    // ("authorization violation" in its log) before it retried.
    let mut enrolled = Vec::with_capacity(p.agents);
    for i in 0..p.agents {
        let id = format!("bench-agent-{i}");
        let worker = NatsRole::Agent(id.parse().context("a bench agent id")?);
        let nats = system
            .nats_env(&worker)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        enrolled.push((id, nats));
    }
    let mut agents = Vec::with_capacity(p.agents);
    for (id, nats) in enrolled {
        agents.push(RealAgent::spawn(binary, nats, dir, id, p.slots)?);
    }
    let result = measure(system, pool, &agents, p).await;
    for a in &mut agents {
        a.kill().await;
    }
    let findings: Vec<String> = agents.iter().filter_map(RealAgent::log_findings).collect();
    let (mut out, rate) = result.map_err(|e| {
        let tails: Vec<String> = agents
            .iter()
            .map(|a| format!("agent {} log tail:\n{}", a.id, a.log_tail(10)))
            .collect();
        e.context(tails.join("\n"))
    })?;
    if findings.is_empty() {
        out.note("real-agents: no agent logged a warning or an error");
    }
    for f in findings {
        out.note(f);
    }
    let js = reference::jetstream_publishes(
        &system.nats.url(),
        &system
            .admin_nats_auth()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        p.reference_messages,
        512,
    )
    .await?;
    out.figure(
        S,
        "reference: jetstream persisted publishes/s (512 B)",
        js,
        "1/s",
        None,
    );
    out.figure(
        S,
        "ratio: jobs/s to jetstream publishes/s",
        rate / js,
        "x",
        None,
    );
    // The program each job runs, started with nothing around it: the most jobs a second
    // this machine could run even if orchestrating them cost nothing.
    let (starts, threads) = reference::process_starts("true", p.reference_processes).await?;
    out.figure(
        S,
        format!("reference: `true` started and reaped/s ({threads} at once)"),
        starts,
        "1/s",
        None,
    );
    out.figure(
        S,
        "ratio: jobs/s to `true` started and reaped/s",
        rate / starts,
        "x",
        None,
    );
    Ok(out)
}

/// Waits for the agents, runs the jobs and reads the figures. Returns them with the
/// end-to-end jobs/s.
async fn measure(
    system: &TestSystem,
    pool: &PgPool,
    agents: &[RealAgent],
    p: &RealAgentsParams,
) -> anyhow::Result<(Outcome, f64)> {
    let mut out = Outcome::default();
    let spawned = Instant::now();
    system::wait_count(
        pool,
        "SELECT count(*) FROM workers WHERE status = 'ready'",
        i64::try_from(agents.len()).unwrap_or(i64::MAX),
        p.ready_within,
    )
    .await
    .context("the agents were not all ready")?;
    out.figure(
        S,
        "agents started to all ready in workers",
        spawned.elapsed().as_secs_f64() * 1000.0,
        "ms",
        None,
    );

    let clients = system::connect_clients(system.grpc_addr, &system.admin_token, p.clients).await?;
    let pids: Vec<u32> = agents.iter().map(|a| a.pid).collect();
    let cpu = GroupMeter::start(&pids);
    let started = Instant::now();
    let refused = system::submit_all(clients, p.jobs, p.batch).await?;
    let submitted = started.elapsed();
    let finished = system::wait_count(
        pool,
        ENDED,
        i64::try_from(p.jobs).unwrap_or(i64::MAX),
        p.timeout,
    )
    .await
    .context("jobs did not all end in time")?;
    let agents_cores = cpu.cores_used();
    let rate = p.jobs as f64 / (finished - started).as_secs_f64();

    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
            .fetch_all(pool)
            .await?;
    let not_succeeded: i64 = states
        .iter()
        .filter(|(s, _)| s != "succeeded")
        .map(|(_, n)| n)
        .sum();
    if not_succeeded > 0 {
        let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        anyhow::bail!(
            "{not_succeeded} of {} jobs did not succeed ({}); end-to-end {rate:.0} jobs/s",
            p.jobs,
            states.join(", ")
        );
    }
    system::rate_figures(&mut out, S, rate, ">= 1,500", p.jobs, submitted, refused);
    out.figure(
        S,
        "jobs failed (not succeeded)",
        not_succeeded as f64,
        "count",
        None,
    );

    let first = crate::system::FirstAttempts::read(pool).await?;
    out.figure(
        S,
        "jobs retried (more than one attempt)",
        first.retried as f64,
        "count",
        None,
    );
    out.percentiles(S, "submit->assigned", &first.assigned, None);
    out.percentiles(S, "submit->started", &first.started, None);
    out.percentiles(S, "submit->completed", &first.completed, None);

    let mut rss = Vec::with_capacity(agents.len());
    for a in agents {
        rss.push(
            procfs::memory(Pid::Other(a.pid)).with_context(|| {
                format!("failed to read the memory of agent {} (exited?)", a.id)
            })?,
        );
    }
    let max_rss = rss.iter().map(|m| m.rss_kib).max().unwrap_or(0);
    let sum_rss: u64 = rss.iter().map(|m| m.rss_kib).sum();
    let max_peak = rss.iter().map(|m| m.peak_kib).max().unwrap_or(0);
    out.figure(
        S,
        "agent rss at the end (largest)",
        max_rss as f64 / 1024.0,
        "MiB",
        None,
    );
    out.figure(
        S,
        "agent rss at the end (all agents)",
        sum_rss as f64 / 1024.0,
        "MiB",
        None,
    );
    out.figure(
        S,
        "agent peak rss (VmHWM, largest)",
        max_peak as f64 / 1024.0,
        "MiB",
        None,
    );
    out.figure(
        S,
        "agents' cpu, submit to completed (all agents)",
        agents_cores,
        "cores",
        None,
    );
    let spread: Vec<String> = first
        .per_worker
        .iter()
        .map(|(w, n)| format!("{w} {n}"))
        .collect();
    out.note(format!(
        "real-agents: jobs per agent (first attempts): {}",
        spread.join(", ")
    ));
    Ok((out, rate))
}
