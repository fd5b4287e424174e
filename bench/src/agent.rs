//! `agent`: a real `hodei-agent` process (the binary next to this one, or `--agent-bin`)
//! against a private nats-server, with a temporary work dir. Once it is idle (beating), its
//! `VmRSS` from /proc; then assignments of a trivial command (`true`), one at a time, published
//! on its command subject as the scheduler's outbox relay does (JetStream, de-duplication id),
//! each timed from the publish to its `Started` report seen on `hodei.v1.report.<job id>`.
//! The agent talks only NATS: no database is involved. It is killed at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use chrono::Utc;
use futures::StreamExt;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{AttemptNumber, JobId, JobSpec, WorkerId};
use hodei_messaging::{AgentCommand, AgentReport, ReportKind, subjects};
use hodei_test_support::TestNats;

use crate::procfs::{self, Pid};
use crate::report::{Outcome, histogram};

const S: &str = "agent";
const WORKER: &str = "bench-agent";
const BINARY: &str = "hodei-agent";

/// Parameters of `agent`.
pub struct AgentParams {
    pub binary: Option<PathBuf>,
    pub assignments: usize,
    /// How long the agent is left idle before its memory is read.
    pub settle: Duration,
}

/// The agent binary: the one given, else the `agent` profile's build beside a release build
/// (`target/agent/hodei-agent`, as release images ship it), else `hodei-agent` in this
/// executable's folder (or the one above, when this runs from `deps/`).
pub fn locate(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        anyhow::ensure!(
            path.is_file(),
            "no agent binary at {} (given with --agent-bin)",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("failed to find this executable")?;
    let dir = exe
        .parent()
        .context("this executable has no folder")?
        .to_path_buf();
    let mut candidates = vec![dir.join(BINARY)];
    if dir.ends_with("deps")
        && let Some(up) = dir.parent()
    {
        candidates.push(up.join(BINARY));
    }
    let profile_dir = if dir.ends_with("deps") {
        dir.parent()
    } else {
        Some(dir.as_path())
    };
    if let Some(release) = profile_dir.filter(|d| d.ends_with("release"))
        && let Some(target) = release.parent()
    {
        candidates.insert(0, target.join("agent").join(BINARY));
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let release = dir.components().any(|c| c.as_os_str() == "release");
    anyhow::bail!(
        "no {BINARY} binary at {}: build it first with `cargo build -p hodei-agent{}` (or give \
         its path with --agent-bin)",
        dir.join(BINARY).display(),
        if release { " --profile agent" } else { "" }
    )
}

pub async fn agent(p: AgentParams) -> anyhow::Result<Outcome> {
    let binary = locate(p.binary.clone())?;
    let nats = TestNats::start().await?;
    let dir = tempfile::tempdir().context("failed to create the agent's folder")?;
    let result = run(&nats, &binary, dir.path(), &p).await;
    drop(nats);
    let mut out = result?;
    out.note(format!(
        "agent: {} (a separate process, its default logging to a file) with 4 slots, \
         heartbeat every 500 ms, against a private nats-server; idle rss read after its first \
         heartbeats and {:?} more; {} assignments of `true`, one at a time, each waited to \
         its finished report; 'publish->started' is from this harness's jetstream publish \
         of the assign command to the agent's started report received here, so it includes \
         nats delivery both ways and the report's jetstream publish: an upper bound of \
         receive->spawn; 'assigned_at->started report' uses the report's own time (same \
         clock), without the return trip",
        binary.display(),
        p.settle,
        p.assignments
    ));
    Ok(out)
}

async fn run(
    nats: &TestNats,
    binary: &Path,
    dir: &Path,
    p: &AgentParams,
) -> anyhow::Result<Outcome> {
    let (client, js) =
        hodei_messaging::connect(&nats.url(), "hodei-bench-agent", Duration::from_secs(10))
            .await
            .context("failed to connect to nats")?;
    // What the control plane does before any agent starts.
    hodei_messaging::streams::ensure_all(&js).await?;
    hodei_messaging::artifacts::bucket(&js).await?;
    let worker: WorkerId = WORKER
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid worker id: {e}"))?;
    let mut beats = client
        .subscribe(subjects::heartbeat(&worker))
        .await
        .context("failed to subscribe to the agent's heartbeats")?;
    let mut reports = client
        .subscribe(subjects::all_reports())
        .await
        .context("failed to subscribe to reports")?;
    client.flush().await?;
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).context("failed to create the agent's log")?;
    let log_err = log.try_clone().context("failed to share the agent's log")?;
    let mut child = tokio::process::Command::new(binary)
        .arg("--nats-url")
        .arg(nats.url())
        .args(["--worker-id", WORKER, "--labels", "os=linux"])
        .args([
            "--heartbeat-interval-ms",
            "500",
            "--max-concurrent-jobs",
            "4",
        ])
        .args(["--cpu-millis", "2000", "--memory-mb", "1024"])
        .args(["--kill-grace-ms", "1000", "--drain-timeout-ms", "1000"])
        .arg("--work-dir")
        .arg(dir.join("work"))
        .env_remove("HODEI_METRICS_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let pid = child.id().context("the agent exited at once")?;
    let result = measure(&js, &worker, pid, &mut beats, &mut reports, p).await;
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    result.map_err(|e| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!("agent log tail:\n{}", tail.join("\n")))
    })
}

async fn measure(
    js: &async_nats::jetstream::Context,
    worker: &WorkerId,
    pid: u32,
    beats: &mut async_nats::Subscriber,
    reports: &mut async_nats::Subscriber,
    p: &AgentParams,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let started = Instant::now();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(20), beats.next())
            .await
            .context("the agent sent no heartbeat within 20 s")?
            .context("heartbeat subscription closed")?;
    }
    out.figure(
        S,
        "start to third heartbeat",
        started.elapsed().as_secs_f64() * 1000.0,
        "ms",
        None,
    );
    tokio::time::sleep(p.settle).await;
    let mut idle_max: u64 = 0;
    for _ in 0..5 {
        idle_max = idle_max.max(procfs::memory(Pid::Other(pid))?.rss_kib);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let idle = procfs::memory(Pid::Other(pid))?;
    out.figure(
        S,
        "idle rss (max of 5 reads over 1 s)",
        idle_max as f64 / 1024.0,
        "MiB",
        Some("<= 8 MiB"),
    );
    out.figure(
        S,
        "peak rss before any job (VmHWM)",
        idle.peak_mib(),
        "MiB",
        None,
    );

    let spec = JobSpec::try_from(JobSpecDraft::exec("noop", &["true"]))
        .map_err(|e| anyhow::anyhow!("invalid spec: {e}"))?;
    let mut to_started = histogram()?;
    let mut agent_side = histogram()?;
    for _ in 0..p.assignments {
        let job_id = JobId::new();
        let assigned_at = Utc::now();
        let command = AgentCommand::Assign {
            job_id,
            attempt: AttemptNumber::new(1),
            spec: Box::new(spec.clone()),
            assigned_at,
            incarnation: None,
        };
        let payload = serde_json::to_vec(&command)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            subjects::HEADER_MSG_ID,
            uuid::Uuid::now_v7().to_string().as_str(),
        );
        let t0 = Instant::now();
        let ack = js
            .publish_with_headers(subjects::agent_commands(worker), headers, payload.into())
            .await
            .context("failed to publish an assignment")?;
        let mut finished = false;
        let mut seen_started = false;
        while !finished {
            let message = tokio::time::timeout(Duration::from_secs(10), reports.next())
                .await
                .context("no report from the agent within 10 s")?
                .context("report subscription closed")?;
            let Ok(report) =
                hodei_messaging::decode::<AgentReport>(&message.subject, &message.payload)
            else {
                continue;
            };
            if report.job_id != job_id {
                continue;
            }
            match report.kind {
                ReportKind::Started { .. } if !seen_started => {
                    seen_started = true;
                    let took = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    to_started.record(took.max(1))?;
                    let at = (report.at - assigned_at).num_microseconds().unwrap_or(0);
                    agent_side.record(u64::try_from(at).unwrap_or(0).max(1))?;
                }
                ReportKind::Started { .. } => {}
                ReportKind::Finished { .. } => finished = true,
            }
        }
        ack.await.context("assignment not stored by jetstream")?;
    }
    let after = procfs::memory(Pid::Other(pid))?;
    out.percentiles(S, "publish->started report", &to_started, Some("<= 2 ms"));
    out.percentiles(S, "assigned_at->started report time", &agent_side, None);
    out.figure(S, "rss after the assignments", after.rss_mib(), "MiB", None);
    out.figure(S, "peak rss (VmHWM)", after.peak_mib(), "MiB", None);
    Ok(out)
}
