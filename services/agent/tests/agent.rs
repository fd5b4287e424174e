#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End-to-end tests of the agent: the production wiring against a private nats-server, real
//! processes, commands published on the agent's subject, and what it reports, logs and beats
//! read back from NATS.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use chrono::Utc;
use futures::StreamExt;
use hodei_agent::{
    Agent, AgentConfig, AgentError, CgroupMode, FENCED_REASON, LEASE_REASON, LOST_REASON,
    RESTARTED_REASON,
};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{AttemptId, AttemptNumber, AttemptOutcome, JobId, JobSpec, WorkerId};
use hodei_messaging::{
    AgentCommand, AgentReport, Heartbeat, LogBatch, LogEntry, LogStreamKind, ReportKind, decode,
    streams, subjects,
};
use hodei_test_support::{TcpProxy, TestNats, wait_for};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Longest wait for anything the agent should do.
const DEADLINE: Duration = Duration::from_secs(20);

/// Everything received on one subject or stream, filled by a background task.
struct Collector<T> {
    items: Arc<Mutex<Vec<T>>>,
    task: JoinHandle<()>,
}

impl<T: Clone + Send + 'static> Collector<T> {
    fn spawn<S>(mut source: S) -> Self
    where
        S: futures::Stream<Item = T> + Unpin + Send + 'static,
    {
        let items = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&items);
        let task = tokio::spawn(async move {
            while let Some(item) = source.next().await {
                sink.lock().unwrap().push(item);
            }
        });
        Self { items, task }
    }

    fn all(&self) -> Vec<T> {
        self.items.lock().unwrap().clone()
    }

    fn find(&self, pred: impl Fn(&T) -> bool) -> Option<T> {
        self.items.lock().unwrap().iter().find(|t| pred(t)).cloned()
    }
}

impl<T> Drop for Collector<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running agent on a private NATS, with collectors on its reports, logs and heartbeats.
struct Harness {
    /// Kept for the test's lifetime: dropping it kills the server.
    nats: TestNats,
    js: jetstream::Context,
    worker_id: WorkerId,
    work_dir: TempDir,
    shutdown: CancellationToken,
    force_stop: CancellationToken,
    /// The agent run in this process (absent when it runs as a child process).
    agent: Option<JoinHandle<Result<(), AgentError>>>,
    /// The `hodei-agent` binary, when the agent runs as a child process.
    process: Option<tokio::process::Child>,
    reports: Collector<AgentReport>,
    logs: Collector<LogBatch>,
    heartbeats: Collector<Heartbeat>,
    /// The proxy the agent reaches NATS through, when it was started behind one.
    proxy: Option<TcpProxy>,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(1_000).await
    }

    async fn start_with(drain_timeout_ms: u64) -> Harness {
        Harness::start_as(drain_timeout_ms, false).await
    }

    /// Starts the agent in this process, or as the `hodei-agent` binary if `as_binary`.
    async fn start_as(drain_timeout_ms: u64, as_binary: bool) -> Harness {
        Harness::start_leased(drain_timeout_ms, as_binary, 15_000).await
    }

    /// Like [`Harness::start_as`], with a lease of `lease_ms` on the agent's work.
    async fn start_leased(drain_timeout_ms: u64, as_binary: bool, lease_ms: u64) -> Harness {
        Harness::start_full(drain_timeout_ms, as_binary, lease_ms, |_| {}).await
    }

    /// An in-process agent with a lease of `lease_ms` that reaches NATS through a
    /// [`TcpProxy`] the test can stall or cut.
    async fn start_behind_proxy(lease_ms: u64) -> Harness {
        Harness::start_with_proxy(1_000, false, lease_ms, true, |_| {}).await
    }

    /// An in-process agent whose jobs run as `job_user` (`HODEI_JOB_USER`).
    async fn start_isolated(job_user: &str) -> Harness {
        let job_user = job_user.to_owned();
        Harness::start_full(1_000, false, 15_000, |config| {
            config.job_user = Some(job_user);
        })
        .await
    }

    /// An in-process agent that must give every job a cgroup, with a pid limit of
    /// `job_max_processes`.
    async fn start_cgrouped(job_max_processes: u32) -> Harness {
        Harness::start_full(1_000, false, 15_000, |config| {
            config.job_cgroups = CgroupMode::Required;
            config.job_max_processes = job_max_processes;
        })
        .await
    }

    async fn start_full(
        drain_timeout_ms: u64,
        as_binary: bool,
        lease_ms: u64,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> Harness {
        Harness::start_with_proxy(drain_timeout_ms, as_binary, lease_ms, false, configure).await
    }

    async fn start_with_proxy(
        drain_timeout_ms: u64,
        as_binary: bool,
        lease_ms: u64,
        proxied: bool,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> Harness {
        let nats = TestNats::start().await.expect("nats-server starts");
        let proxy = if proxied {
            let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], nats.port()));
            Some(TcpProxy::start(upstream).await.unwrap())
        } else {
            None
        };
        let agent_url = proxy
            .as_ref()
            .map_or_else(|| nats.url(), |p| format!("nats://{}", p.addr()));
        let worker_id: WorkerId = format!("test-{}", Uuid::new_v4().simple()).parse().unwrap();
        let work_dir = tempfile::tempdir().unwrap();
        let (client, js) = hodei_messaging::connect(&nats.url(), "agent-test", DEADLINE)
            .await
            .unwrap();
        // What the control plane does before any agent starts.
        hodei_messaging::streams::ensure_all(&js).await.unwrap();
        hodei_messaging::artifacts::bucket(&js).await.unwrap();

        let beats = client
            .subscribe(subjects::heartbeat(&worker_id))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let heartbeats =
            Collector::spawn(Box::pin(beats.filter_map(|m| async move {
                decode::<Heartbeat>(&m.subject, &m.payload).ok()
            })));

        let mut config = AgentConfig {
            labels: "gpu=true, os=linux".to_owned(),
            cpu_millis: Some(2_000),
            memory_mb: Some(1_024),
            lease_ms,
            drain_timeout_ms,
            ..agent_config(agent_url, &worker_id, work_dir.path())
        };
        configure(&mut config);
        let (agent, process) = if as_binary {
            let process = spawn_binary(&config);
            // Its first heartbeat comes once it has set up the streams.
            wait_for("the agent binary to beat", DEADLINE, || async {
                heartbeats.find(|_| true)
            })
            .await
            .unwrap();
            (None, Some(process))
        } else {
            let agent = Agent::build(config).await.expect("agent builds");
            assert_eq!(agent.worker_id(), &worker_id);
            (Some(agent), None)
        };

        // The agent created the streams; read them back.
        let reports_consumer = js
            .get_stream(streams::REPORTS)
            .await
            .unwrap()
            .get_or_create_consumer(
                "test-reports",
                streams::durable("test-reports", subjects::all_reports()),
            )
            .await
            .unwrap();
        let report_messages = reports_consumer.messages().await.unwrap();
        let reports = Collector::spawn(Box::pin(report_messages.filter_map(|m| async move {
            let m = m.ok()?;
            m.ack().await.ok()?;
            decode::<AgentReport>(&m.subject, &m.payload).ok()
        })));
        let logs_consumer = js
            .get_stream(streams::LOGS)
            .await
            .unwrap()
            .create_consumer(pull::OrderedConfig::default())
            .await
            .unwrap();
        let log_messages = logs_consumer.messages().await.unwrap();
        let logs = Collector::spawn(Box::pin(log_messages.filter_map(|m| async move {
            let m = m.ok()?;
            decode::<LogBatch>(&m.subject, &m.payload).ok()
        })));

        let shutdown = CancellationToken::new();
        let force_stop = agent
            .as_ref()
            .map_or_else(CancellationToken::new, Agent::force_stop_token);
        let agent = agent.map(|agent| tokio::spawn(agent.run_until_stopped(shutdown.clone())));
        Harness {
            nats,
            js,
            worker_id,
            work_dir,
            shutdown,
            force_stop,
            agent,
            process,
            reports,
            logs,
            heartbeats,
            proxy,
        }
    }

    /// Publishes raw bytes on the agent's command subject and waits for JetStream to store them.
    async fn publish_command_bytes(&self, payload: Vec<u8>) {
        self.js
            .publish(subjects::agent_commands(&self.worker_id), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn send(&self, command: &AgentCommand) {
        self.publish_command_bytes(serde_json::to_vec(command).unwrap())
            .await;
    }

    /// Assigns attempt 1 of a new job running `spec`.
    async fn assign(&self, spec: JobSpec) -> AttemptId {
        let id = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        self.assign_attempt(id, spec).await;
        id
    }

    /// Returns once every command sent so far was handled: commands are taken in order, so
    /// once a next job has run and nothing waits, those before it were handled.
    async fn handled_before_the_next(&mut self) {
        let next = self.assign(spec(sh("next", "echo next"))).await;
        assert_eq!(
            self.finished(next).await.0,
            AttemptOutcome::Exited { code: 0 }
        );
        wait_for("every command to be acknowledged", DEADLINE, || async {
            (self.commands_pending().await == 0).then_some(())
        })
        .await
        .unwrap();
    }

    async fn assign_attempt(&self, id: AttemptId, spec: JobSpec) {
        self.send(&AgentCommand::Assign {
            job_id: id.job_id,
            attempt: id.attempt,
            spec: Box::new(spec),
            assigned_at: Utc::now(),
            incarnation: None,
        })
        .await;
    }

    async fn cancel(&self, id: AttemptId) {
        self.send(&AgentCommand::Cancel {
            job_id: id.job_id,
            attempt: id.attempt,
            reason: "test".to_owned(),
        })
        .await;
    }

    /// How many `Started` reports `id` sent.
    fn started_reports(&self, id: AttemptId) -> usize {
        self.reports_of(id)
            .iter()
            .filter(|r| matches!(r.kind, ReportKind::Started { .. }))
            .count()
    }

    fn reports_of(&self, id: AttemptId) -> Vec<AgentReport> {
        self.reports
            .all()
            .into_iter()
            .filter(|r| r.job_id == id.job_id && r.attempt == id.attempt)
            .collect()
    }

    /// Waits for the attempt's `Started` report and returns its pid.
    async fn started(&self, id: AttemptId) -> u32 {
        wait_for("the started report", DEADLINE, || async {
            self.reports_of(id).iter().find_map(|r| match r.kind {
                ReportKind::Started { pid } => Some(pid),
                ReportKind::Finished { .. } => None,
            })
        })
        .await
        .unwrap()
    }

    /// Waits for the attempt's `Finished` report and returns its outcome and tail.
    async fn finished(&self, id: AttemptId) -> (AttemptOutcome, Vec<String>) {
        wait_for("the finished report", DEADLINE, || async {
            self.reports_of(id).into_iter().find_map(|r| match r.kind {
                ReportKind::Finished { outcome, tail } => Some((outcome, tail)),
                ReportKind::Started { .. } => None,
            })
        })
        .await
        .unwrap()
    }

    /// The attempt's batches as received, once its `eof` batch is in.
    async fn log_batches(&self, id: AttemptId) -> Vec<LogBatch> {
        wait_for("the last log batch", DEADLINE, || async {
            let batches: Vec<LogBatch> = self
                .logs
                .all()
                .into_iter()
                .filter(|b| b.job_id == id.job_id && b.attempt == id.attempt)
                .collect();
            batches.iter().any(|b| b.eof).then_some(batches)
        })
        .await
        .unwrap()
    }

    /// The attempt's log lines, once its `eof` batch is in.
    async fn log_lines(&self, id: AttemptId) -> Vec<LogEntry> {
        self.log_batches(id)
            .await
            .into_iter()
            .flat_map(|b| b.lines)
            .collect()
    }

    /// Waits for a heartbeat matching `pred`.
    async fn heartbeat(&self, what: &str, pred: impl Fn(&Heartbeat) -> bool) -> Heartbeat {
        wait_for(what, DEADLINE, || async { self.heartbeats.find(&pred) })
            .await
            .unwrap()
    }

    /// How many commands wait in the agent's stream (acknowledged ones are removed).
    async fn commands_pending(&self) -> u64 {
        let mut stream = self.js.get_stream(streams::AGENT).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    fn workspace(&self, id: AttemptId) -> PathBuf {
        self.work_dir
            .path()
            .join(format!("{}-{}", id.job_id, id.attempt))
    }

    /// The configuration of another agent of the same worker on the same work folder.
    fn next_incarnation(&self) -> AgentConfig {
        agent_config(self.nats.url(), &self.worker_id, self.work_dir.path())
    }

    /// Cancels the shutdown token and waits for the agent to return.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        self.returned().await;
    }

    /// Waits for the in-process agent to return, and checks it returned `Ok`.
    async fn returned(&mut self) {
        let agent = self.agent.take().expect("the agent runs");
        let result = tokio::time::timeout(DEADLINE, agent)
            .await
            .expect("the agent stops in time")
            .expect("the agent task does not panic");
        assert!(result.is_ok(), "{result:?}");
    }
}

/// An agent of `worker_id` on `work_dir`: 3 slots, no labels or capacity given, beating every
/// 100 ms, a 15 s lease and a 60 s drain.
fn agent_config(nats_url: String, worker_id: &WorkerId, work_dir: &std::path::Path) -> AgentConfig {
    AgentConfig {
        nats_url,
        nats_auth: Default::default(),
        worker_id: Some(worker_id.to_string()),
        labels: String::new(),
        max_concurrent_jobs: 3,
        cpu_millis: None,
        memory_mb: None,
        work_dir: Some(work_dir.to_path_buf()),
        heartbeat_interval_ms: 100,
        kill_grace_ms: 500,
        lease_ms: 15_000,
        drain_timeout_ms: 60_000,
        metrics_addr: None,
        artifact_max_bytes: 1024 * 1024,
        job_user: None,
        job_max_processes: 4096,
        job_max_open_files: 65_536,
        job_cgroups: CgroupMode::Auto,
    }
}

/// Starts the `hodei-agent` binary configured as `config`.
fn spawn_binary(config: &AgentConfig) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei-agent"))
        .env("HODEI_NATS_URL", &config.nats_url)
        .env(
            "HODEI_WORKER_ID",
            config.worker_id.as_deref().unwrap_or_default(),
        )
        .env("HODEI_WORK_DIR", config.work_dir.as_deref().unwrap())
        .env("HODEI_HEARTBEAT_INTERVAL_MS", "100")
        .env("HODEI_KILL_GRACE_MS", config.kill_grace_ms.to_string())
        .env("HODEI_LEASE_MS", config.lease_ms.to_string())
        .env(
            "HODEI_DRAIN_TIMEOUT_MS",
            config.drain_timeout_ms.to_string(),
        )
        .env("HODEI_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent binary starts")
}

fn sh(name: &str, script: &str) -> JobSpecDraft {
    JobSpecDraft::exec(name, &["sh", "-c", script])
}

fn spec(draft: JobSpecDraft) -> JobSpec {
    JobSpec::try_from(draft).unwrap()
}

/// Whether the process is gone (or a zombie, dead but not yet reaped by its new parent).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn exit_code_and_output_are_reported() {
    let mut h = Harness::start().await;
    let id = h
        .assign(spec(sh("echo", "echo out; echo err >&2; exit 3")))
        .await;

    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 3 });
    let mut sorted_tail = tail.clone();
    sorted_tail.sort();
    assert_eq!(sorted_tail, vec!["err", "out"]);
    let reports = h.reports_of(id);
    assert_eq!(reports.len(), 2, "{reports:?}");
    match reports[0].kind {
        ReportKind::Started { pid } => assert!(pid > 1),
        ref other => panic!("expected started first, got {other:?}"),
    }
    assert_eq!(reports[0].worker_id, h.worker_id);
    assert_ne!(reports[0].report_id, reports[1].report_id);

    let batches = h.log_batches(id).await;
    let eofs: Vec<usize> = batches
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.eof.then_some(i))
        .collect();
    assert_eq!(eofs, vec![batches.len() - 1], "one eof batch, the last");
    let mut lines: Vec<LogEntry> = batches.into_iter().flat_map(|b| b.lines).collect();
    lines.sort_by_key(|l| l.seq);
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    let mut streams: Vec<(LogStreamKind, &str)> =
        lines.iter().map(|l| (l.stream, l.text.as_str())).collect();
    streams.sort_by_key(|(_, text)| *text);
    assert_eq!(
        streams,
        vec![
            (LogStreamKind::Stderr, "err"),
            (LogStreamKind::Stdout, "out")
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn jobs_run_in_a_fresh_workspace_with_their_environment() {
    let mut h = Harness::start().await;
    let mut draft = sh(
        "env",
        "echo \"$HODEI_JOB_ID $HODEI_ATTEMPT $HODEI_WORKER_ID\"; pwd; echo \"$HOME\"; \
         echo \"$HODEI_WORKSPACE\"; echo \"$GREETING\"; echo \"${CARGO_MANIFEST_DIR:-unset}\"",
    );
    draft.working_dir = Some("sub/dir".to_owned());
    draft.env.insert("GREETING".to_owned(), "hello".to_owned());
    let id = AttemptId::new(JobId::new(), AttemptNumber::new(2));
    h.assign_attempt(id, spec(draft)).await;
    // Cargo sets this for the test process: the job must not inherit it.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());

    let (outcome, _) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    let mut lines = h.log_lines(id).await;
    lines.sort_by_key(|l| l.seq);
    let texts: Vec<String> = lines.into_iter().map(|l| l.text).collect();
    let workspace = std::fs::canonicalize(h.work_dir.path())
        .unwrap()
        .join(format!("{}-2", id.job_id));
    assert_eq!(
        texts,
        vec![
            format!("{} 2 {}", id.job_id, h.worker_id),
            workspace.join("sub/dir").display().to_string(),
            h.workspace(id).display().to_string(),
            h.workspace(id).display().to_string(),
            "hello".to_owned(),
            "unset".to_owned(),
        ]
    );
    wait_for("the workspace to be removed", DEADLINE, || async {
        (!h.workspace(id).exists()).then_some(())
    })
    .await
    .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn jobs_run_as_their_own_user_and_cannot_read_the_agent_or_each_other() {
    if !nix::unistd::geteuid().is_root() {
        // Switching users takes root; CI runs the suite as root.
        eprintln!("skipped: needs root to run jobs as other users");
        return;
    }
    let mut h = Harness::start_isolated("61184-61199").await;
    // A runs on, holding a file in its workspace; B and C try to read it and the agent.
    let gate = h.work_dir.path().join("gate");
    let a = h
        .assign(spec(sh(
            "holder",
            &format!(
                "echo s3cret > mine.txt; id -u; ls -ld .; awk '/Max processes/ {{print $3}}' /proc/self/limits; \
                 ulimit -n; ulimit -c; id -g; \
                 awk '/^(Uid|Groups|NoNewPrivs):/ {{$1 = $1; print}}' /proc/self/status; \
                 while [ ! -e {} ]; do sleep 0.05; done",
                gate.display()
            ),
        )))
        .await;
    h.started(a).await;
    let theirs = h.workspace(a).join("mine.txt");
    wait_for("A's file", DEADLINE, || async {
        theirs.exists().then_some(())
    })
    .await
    .unwrap();
    let b = h
        .assign(spec(sh(
            "snoop",
            &format!(
                "id -u; cat {} && echo READ-OTHER; cat /proc/{}/environ && echo READ-AGENT; \
                 ls {} && echo LISTED-WORK; exit 0",
                theirs.display(),
                std::process::id(),
                h.work_dir.path().display()
            ),
        )))
        .await;
    let (outcome, _) = h.finished(b).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    let lines: Vec<String> = h.log_lines(b).await.into_iter().map(|l| l.text).collect();
    let text = lines.join("\n");
    for forbidden in ["s3cret", "READ-OTHER", "READ-AGENT", "LISTED-WORK", "CARGO"] {
        assert!(!text.contains(forbidden), "{forbidden} in {text}");
    }
    assert!(text.contains("Permission denied"), "{text}");
    std::fs::write(&gate, "").unwrap();
    let (outcome, _) = h.finished(a).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    let a_lines: Vec<String> = h.log_lines(a).await.into_iter().map(|l| l.text).collect();
    let (a_uid, b_uid) = (a_lines[0].clone(), lines[0].clone());
    assert_ne!(a_uid, b_uid, "each attempt has a uid of its own");
    for uid in [&a_uid, &b_uid] {
        let uid: u32 = uid.parse().unwrap();
        assert!((61184..=61199).contains(&uid), "{uid}");
    }
    assert!(a_lines[1].starts_with("drwx------"), "{}", a_lines[1]);
    // As configured, or the agent's own hard limits where those are lower.
    let own = |r| nix::sys::resource::getrlimit(r).unwrap().1;
    let expected = [
        own(nix::sys::resource::Resource::RLIMIT_NPROC)
            .min(4096)
            .to_string(),
        own(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .min(65_536)
            .to_string(),
        "0".to_owned(),
    ];
    assert_eq!(a_lines[2..5], expected, "resource limits");
    // Its gid is its uid's number, real, effective and saved ids are all the job's, it has no
    // supplementary groups, and a setuid program cannot give it privileges back.
    assert_eq!(a_lines[5], a_uid, "gid");
    let status = [
        format!("Uid: {a_uid} {a_uid} {a_uid} {a_uid}"),
        "Groups:".to_owned(),
        "NoNewPrivs: 1".to_owned(),
    ];
    assert_eq!(a_lines[6..9], status, "credentials");
    h.stop().await;
}

/// The limits reach the job with and without a cgroup.
#[tokio::test]
async fn resource_limits_reach_the_job_with_and_without_a_cgroup() {
    let own = |r| nix::sys::resource::getrlimit(r).unwrap().1;
    let nproc = own(nix::sys::resource::Resource::RLIMIT_NPROC).min(777);
    let nofile = own(nix::sys::resource::Resource::RLIMIT_NOFILE).min(333);
    for mode in [CgroupMode::Auto, CgroupMode::Off] {
        let mut h = Harness::start_full(1_000, false, 15_000, |config| {
            config.job_cgroups = mode;
            config.job_max_processes = 777;
            config.job_max_open_files = 333;
        })
        .await;
        let id = h
            .assign(spec(sh(
                "limits",
                "awk '/Max processes/ {print $3; print $4}' /proc/self/limits; \
                 ulimit -Sn; ulimit -Hn; ulimit -c",
            )))
            .await;
        let (outcome, _) = h.finished(id).await;
        assert_eq!(outcome, AttemptOutcome::Exited { code: 0 }, "{mode:?}");
        let lines: Vec<String> = h.log_lines(id).await.into_iter().map(|l| l.text).collect();
        let expected: Vec<String> = [nproc, nproc, nofile, nofile]
            .iter()
            .map(u64::to_string)
            .chain(["0".to_owned()])
            .collect();
        assert_eq!(lines, expected, "{mode:?}");
        h.stop().await;
    }
}

#[tokio::test]
async fn a_command_that_cannot_start_is_reported() {
    let mut h = Harness::start().await;
    let id = h
        .assign(spec(JobSpecDraft::exec(
            "missing",
            &["/nonexistent/program"],
        )))
        .await;
    let (outcome, tail) = h.finished(id).await;
    match outcome {
        AttemptOutcome::SpawnFailed { reason } => {
            assert!(reason.contains("/nonexistent/program"), "{reason}");
        }
        other => panic!("expected a spawn failure, got {other:?}"),
    }
    assert!(tail.is_empty());
    assert!(h.log_lines(id).await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn heartbeats_carry_labels_capacity_and_running_attempts() {
    let mut h = Harness::start().await;
    let first = h.heartbeat("a first heartbeat", |_| true).await;
    assert_eq!(first.worker_id, h.worker_id);
    assert_eq!(first.labels.get("gpu").map(String::as_str), Some("true"));
    assert_eq!(first.labels.get("os").map(String::as_str), Some("linux"));
    assert_eq!(first.capacity.cpu_millis, 2_000);
    assert_eq!(first.capacity.memory_mb, 1_024);
    assert_eq!(first.max_concurrent_jobs, 3);
    assert!(first.usage.memory_total_mb > 0);
    assert!(!first.draining);

    let id = h.assign(spec(sh("sleeper", "sleep 30"))).await;
    h.heartbeat("a heartbeat listing the attempt", |hb| {
        hb.running == vec![id]
    })
    .await;
    h.cancel(id).await;
    h.finished(id).await;
    h.heartbeat("a heartbeat after the attempt ended", |hb| {
        hb.running.is_empty() && hb.sent_at > first.sent_at
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_attempt() {
    let mut h = Harness::start().await;
    let id = h
        .assign(spec(JobSpecDraft::exec("sleep", &["sleep", "30"])))
        .await;
    let pid = h.started(id).await;
    h.cancel(id).await;
    let (outcome, _) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Cancelled);
    wait_for("the process to be gone", DEADLINE, || async {
        process_gone(pid).then_some(())
    })
    .await
    .unwrap();
    // A cancel for an attempt that is not running is acknowledged and ignored.
    h.cancel(AttemptId::new(JobId::new(), AttemptNumber::new(1)))
        .await;
    wait_for("the commands to be acknowledged", DEADLINE, || async {
        (h.commands_pending().await == 0).then_some(())
    })
    .await
    .unwrap();
    h.stop().await;
}

/// A cancel can overtake its assignment (the assignment's row published later by another
/// relay, or held by a client): the assignment that comes after it is reported cancelled and
/// never run, and delivered again it is ignored.
#[tokio::test]
async fn an_assignment_that_comes_after_its_cancel_never_runs() {
    let mut h = Harness::start().await;
    let marker = h.work_dir.path().join("overtaken-ran");
    let id = AttemptId::new(JobId::new(), AttemptNumber::new(1));
    h.cancel(id).await;
    let job = spec(sh("overtaken", &format!("touch {}", marker.display())));
    h.assign_attempt(id, job.clone()).await;
    assert_eq!(h.finished(id).await.0, AttemptOutcome::Cancelled);
    h.assign_attempt(id, job).await;
    h.handled_before_the_next().await;
    assert!(!marker.exists(), "the overtaken assignment ran");
    assert_eq!(h.started_reports(id), 0);
    assert_eq!(
        h.reports_of(id)
            .iter()
            .filter(|r| matches!(r.kind, ReportKind::Finished { .. }))
            .count(),
        1
    );
    h.stop().await;
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let mut h = Harness::start().await;
    let mut draft = sh("slow", "sleep 30 & echo $!; sleep 30");
    draft.timeout_secs = 1;
    let id = h.assign(spec(draft)).await;

    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::TimedOut);
    let grandchild: u32 = tail
        .first()
        .expect("the script printed a pid")
        .parse()
        .unwrap();
    wait_for("the background sleep to be gone", DEADLINE, || async {
        process_gone(grandchild).then_some(())
    })
    .await
    .unwrap();
    let lines = h.log_lines(id).await;
    assert_eq!(lines.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn an_assignment_of_a_running_attempt_is_ignored() {
    let mut h = Harness::start().await;
    let job = spec(JobSpecDraft::exec("sleep", &["sleep", "30"]));
    let id = h.assign(job.clone()).await;
    h.started(id).await;
    h.assign_attempt(id, job).await;
    wait_for(
        "the second assignment to be acknowledged",
        DEADLINE,
        || async { (h.commands_pending().await == 0).then_some(()) },
    )
    .await
    .unwrap();
    h.cancel(id).await;
    assert_eq!(h.finished(id).await.0, AttemptOutcome::Cancelled);
    assert_eq!(h.started_reports(id), 1);
    h.stop().await;
}

#[tokio::test]
async fn an_assignment_delivered_again_after_its_attempt_ended_is_not_run_again() {
    let mut h = Harness::start().await;
    let ledger = tempfile::tempdir().unwrap();
    let ran = ledger.path().join("ran");
    let job = spec(sh("once", &format!("echo ran >> {}", ran.display())));
    let id = h.assign(job.clone()).await;
    assert_eq!(h.finished(id).await.0, AttemptOutcome::Exited { code: 0 });
    // Over, not only reported: no longer listed as running.
    let reported = Utc::now();
    h.heartbeat("a beat listing nothing running", |hb| {
        hb.running.is_empty() && hb.sent_at > reported
    })
    .await;
    // As when the command's ack was lost: the same assignment comes again.
    h.assign_attempt(id, job).await;
    h.handled_before_the_next().await;
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "ran\n");
    assert_eq!(h.started_reports(id), 1);
    h.stop().await;
}

#[tokio::test]
async fn an_assignment_stored_long_after_it_was_made_is_not_run() {
    let mut h = Harness::start().await;
    let ledger = tempfile::tempdir().unwrap();
    let ran = ledger.path().join("ran");
    // A copy a relay could only have stored that late if it held it up (a NATS client that
    // buffered it while disconnected): the first copy may have run already.
    let late = AttemptId::new(JobId::new(), AttemptNumber::new(1));
    let made = Utc::now()
        - chrono::Duration::from_std(streams::AT_MOST_ONCE_WITHIN).unwrap()
        - chrono::Duration::seconds(1);
    h.send(&AgentCommand::Assign {
        job_id: late.job_id,
        attempt: late.attempt,
        spec: Box::new(spec(sh("late", &format!("echo ran >> {}", ran.display())))),
        assigned_at: made,
        incarnation: None,
    })
    .await;
    h.handled_before_the_next().await;
    assert!(!ran.exists(), "the late assignment ran");
    assert!(h.reports_of(late).is_empty(), "{:?}", h.reports_of(late));
    h.stop().await;
}

#[tokio::test]
async fn malformed_commands_are_dropped_and_the_agent_goes_on() {
    let mut h = Harness::start().await;
    h.publish_command_bytes(b"{not json".to_vec()).await;
    h.publish_command_bytes(br#"{"type":"reboot"}"#.to_vec())
        .await;
    let id = h.assign(spec(sh("after", "echo still here"))).await;
    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    assert_eq!(tail, vec!["still here"]);
    // Terminated, not left for redelivery, and kept in the dead-letter stream.
    wait_for("the malformed commands to be gone", DEADLINE, || async {
        (h.commands_pending().await == 0).then_some(())
    })
    .await
    .unwrap();
    let dead = wait_for(
        "the malformed commands to be dead-lettered",
        DEADLINE,
        || async {
            let mut dlq = h.js.get_stream(streams::DLQ).await.ok()?;
            let n = dlq.info().await.ok()?.state.messages;
            (n == 2).then_some(n)
        },
    )
    .await
    .unwrap();
    assert_eq!(dead, 2);
    assert!(!h.agent.as_ref().unwrap().is_finished());
    h.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_attempts_that_finish_within_the_drain_timeout() {
    let mut h = Harness::start_with(15_000).await;
    let id = h.assign(spec(sh("short", "sleep 1; echo done"))).await;
    h.started(id).await;
    h.stop().await;
    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    assert_eq!(tail, vec!["done"]);
    h.heartbeat("a draining heartbeat listing the attempt", |hb| {
        hb.draining && hb.running == vec![id]
    })
    .await;
    h.heartbeat("the last heartbeat, draining and empty", |hb| {
        hb.draining && hb.running.is_empty()
    })
    .await;
}

#[tokio::test]
async fn shutdown_reports_attempts_still_running_after_the_drain_timeout_as_lost() {
    let mut h = Harness::start_with(300).await;
    let id = h.assign(spec(sh("long", "sleep 30"))).await;
    let pid = h.started(id).await;
    h.stop().await;
    let (outcome, _) = h.finished(id).await;
    assert_eq!(
        outcome,
        AttemptOutcome::Lost {
            reason: LOST_REASON.to_owned()
        }
    );
    wait_for("the process to be gone", DEADLINE, || async {
        process_gone(pid).then_some(())
    })
    .await
    .unwrap();
    h.heartbeat("the last heartbeat, draining and empty", |hb| {
        hb.draining && hb.running.is_empty()
    })
    .await;
}

#[tokio::test]
async fn large_output_is_shipped_in_bounded_numbered_batches() {
    let mut h = Harness::start().await;
    // 20000 short lines, then one line of 200000 bytes (cut into 64 KiB pieces).
    let id = h
        .assign(spec(sh(
            "chatty",
            "seq 1 20000; head -c 200000 /dev/zero | tr '\\0' x; echo",
        )))
        .await;
    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });

    let batches = h.log_batches(id).await;
    for batch in &batches {
        assert!(batch.lines.len() <= 500, "{} lines", batch.lines.len());
        let bytes: usize = batch.lines.iter().map(|l| l.text.len()).sum();
        assert!(bytes <= 128 * 1024, "{bytes} bytes");
    }
    let mut lines: Vec<LogEntry> = batches.into_iter().flat_map(|b| b.lines).collect();
    lines.sort_by_key(|l| l.seq);
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (1..=20_004).collect::<Vec<u64>>());
    let numbers: Vec<String> = (1..=20_000).map(|n| n.to_string()).collect();
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(
        texts[..20_000],
        numbers.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    // Cut at 64 KiB, or earlier if `tr` pauses longer than the partial line delay.
    let pieces = &lines[20_000..];
    assert!(pieces.iter().all(|l| l.text.len() <= 65_536));
    assert!(pieces.len() >= 4);
    let long: String = pieces.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(long, "x".repeat(200_000));

    // The tail: the last 20 lines, each cut to 4 KiB.
    let expected: Vec<&str> = lines[lines.len() - 20..]
        .iter()
        .map(|l| &l.text[..l.text.len().min(4 * 1024)])
        .collect();
    assert_eq!(tail, expected);
    h.stop().await;
}

#[tokio::test]
async fn processes_left_running_are_stopped_when_the_job_exits() {
    let mut h = Harness::start().await;
    let id = h
        .assign(spec(sh("leaves", "sleep 30 & echo $!; exit 0")))
        .await;
    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    let leftover: u32 = tail
        .first()
        .expect("the script printed a pid")
        .parse()
        .unwrap();
    wait_for("the background sleep to be gone", DEADLINE, || async {
        process_gone(leftover).then_some(())
    })
    .await
    .unwrap();
    h.stop().await;
}

/// The file `name` of the cgroup that process `pid` is in, in whichever hierarchy (v1 or v2,
/// mounted at their usual places) has it.
fn cgroup_file(pid: u32, name: &str) -> Option<String> {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let roots: Vec<String> = if controllers.is_empty() {
            vec![
                "/sys/fs/cgroup".to_owned(),
                "/sys/fs/cgroup/unified".to_owned(),
            ]
        } else {
            controllers
                .split(',')
                .map(|c| format!("/sys/fs/cgroup/{c}"))
                .chain([format!("/sys/fs/cgroup/{controllers}")])
                .collect()
        };
        roots.iter().find_map(|root| {
            std::fs::read_to_string(std::path::Path::new(root).join(path).join(name))
                .ok()
                .map(|text| text.trim().to_owned())
        })
    })
}

/// The memory limit of `pid`'s cgroup (v2, else v1).
fn memory_limit(pid: u32) -> String {
    cgroup_file(pid, "memory.max")
        .or_else(|| cgroup_file(pid, "memory.limit_in_bytes"))
        .expect("the job's cgroup has a memory limit")
}

/// The CPU quota of `pid`'s cgroup: `cpu.max` (v2), else `cpu.cfs_quota_us` (v1).
fn cpu_quota(pid: u32) -> String {
    cgroup_file(pid, "cpu.max")
        .or_else(|| cgroup_file(pid, "cpu.cfs_quota_us"))
        .expect("a cpu quota")
}

#[tokio::test]
async fn a_job_runs_in_a_cgroup_limited_to_what_it_requested() {
    let mut h = Harness::start_cgrouped(64).await;
    let gate = h.work_dir.path().join("cgroup-gate");
    let mut job = gated_draft("limited", &gate, "running", "done");
    job.resources = hodei_domain::Resources::new(500, 64);
    let id = h.assign(spec(job)).await;
    let pid = h.started(id).await;
    let memory = memory_limit(pid);
    assert_eq!(memory, (64 * 1024 * 1024).to_string());
    let cpu = match cgroup_file(pid, "cpu.max") {
        Some(max) => max,
        None => format!(
            "{} {}",
            cgroup_file(pid, "cpu.cfs_quota_us").expect("a cpu quota"),
            cgroup_file(pid, "cpu.cfs_period_us").expect("a cpu period")
        ),
    };
    assert_eq!(cpu, "50000 100000", "half a core");
    assert_eq!(cgroup_file(pid, "pids.max").as_deref(), Some("64"));
    let procs = cgroup_file(pid, "cgroup.procs").expect("the job's cgroup lists it");
    assert!(
        procs.split_whitespace().any(|p| p == pid.to_string()),
        "{procs}"
    );
    std::fs::write(&gate, b"").unwrap();
    let (outcome, _) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });

    // The next job reuses the emptied cgroup with its own limits: none requested, so the
    // memory the agent offers (1,024 MiB) and no CPU quota.
    let gate = h.work_dir.path().join("cgroup-gate-2");
    let id = h.assign(gated("unlimited", &gate, "running", "done")).await;
    let pid = h.started(id).await;
    let memory = memory_limit(pid);
    assert_eq!(memory, (1024 * 1024 * 1024).to_string());
    let quota = cpu_quota(pid);
    assert!(quota == "-1" || quota.starts_with("max"), "{quota}");
    std::fs::write(&gate, b"").unwrap();
    let (outcome, _) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });

    // And the next one gets the first job's limits back (the agent skips writing limits only
    // when they equal those the cgroup already has).
    let gate = h.work_dir.path().join("cgroup-gate-3");
    let mut job = gated_draft("limited-again", &gate, "running", "done");
    job.resources = hodei_domain::Resources::new(500, 64);
    let id = h.assign(spec(job)).await;
    let pid = h.started(id).await;
    let memory = memory_limit(pid);
    assert_eq!(memory, (64 * 1024 * 1024).to_string());
    let quota = cpu_quota(pid);
    assert!(quota.starts_with("50000"), "{quota}");
    std::fs::write(&gate, b"").unwrap();
    let (outcome, _) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    h.stop().await;
}

#[tokio::test]
async fn a_job_over_its_memory_limit_is_killed_and_its_tail_says_why() {
    let mut h = Harness::start_cgrouped(64).await;
    // `tail -c` keeps the last 200 MB of its input in memory: far past 32 MiB.
    let mut draft = sh(
        "hungry",
        "echo eating; head -c 300000000 /dev/zero | tail -c 200000000 >/dev/null",
    );
    draft.resources = hodei_domain::Resources::new(0, 32);
    let id = h.assign(spec(draft)).await;
    let (outcome, tail) = h.finished(id).await;
    assert!(!outcome.is_success(), "{outcome}");
    let note = tail.last().expect("a tail");
    assert!(
        note.contains("memory limit of 32 MiB") && note.contains("killed"),
        "{tail:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_stop_kills_the_processes_that_left_the_jobs_process_group() {
    let mut h = Harness::start_cgrouped(64).await;
    // `setsid` makes the background sleep the leader of a session and group of its own: no
    // signal to the job's group reaches it, its cgroup does.
    let cancelled = h
        .assign(spec(sh(
            "escapes",
            "setsid sleep 300 & echo escapee $!; sleep 300",
        )))
        .await;
    let escapee = printed_pid(&h, cancelled, "escapee").await;
    h.cancel(cancelled).await;
    let (outcome, _) = h.finished(cancelled).await;
    assert_eq!(outcome, AttemptOutcome::Cancelled);
    wait_for(
        "the cancelled job's escapee to be gone",
        DEADLINE,
        || async { process_gone(escapee).then_some(()) },
    )
    .await
    .unwrap();

    let exited = h
        .assign(spec(sh(
            "escapes-and-exits",
            "setsid sleep 300 & echo $!; exit 0",
        )))
        .await;
    let (outcome, tail) = h.finished(exited).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    let escapee: u32 = tail.first().expect("a pid").parse().unwrap();
    wait_for(
        "the finished job's escapee to be gone",
        DEADLINE,
        || async { process_gone(escapee).then_some(()) },
    )
    .await
    .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_fork_bomb_stops_at_its_jobs_pid_limit() {
    let mut h = Harness::start_cgrouped(16).await;
    let id = h
        .assign(spec(sh(
            "forks",
            "i=0; while [ $i -lt 100 ]; do sleep 300 & i=$((i+1)); done; echo all-started",
        )))
        .await;
    let (outcome, tail) = h.finished(id).await;
    assert!(!outcome.is_success(), "{outcome}: {tail:?}");
    assert!(!tail.iter().any(|line| line == "all-started"), "{tail:?}");
    h.stop().await;
}

/// A job that prints `before`, waits until the file `gate` exists, then prints `after`.
fn gated(name: &str, gate: &std::path::Path, before: &str, after: &str) -> JobSpec {
    spec(gated_draft(name, gate, before, after))
}

/// The draft of [`gated`].
fn gated_draft(name: &str, gate: &std::path::Path, before: &str, after: &str) -> JobSpecDraft {
    let mut draft = sh(
        name,
        &format!(
            "printf '%s' '{before}'; while [ ! -e \"$GATE\" ]; do sleep 0.05; done; echo '{after}'"
        ),
    );
    draft
        .env
        .insert("GATE".to_owned(), gate.display().to_string());
    draft
}

#[tokio::test]
async fn secrets_are_masked_in_logs_and_in_the_tail() {
    let mut h = Harness::start().await;
    let mut draft = sh(
        "secret",
        "echo \"token is $TOKEN\"; printf '%s' \"$TOKEN\" >&2; echo \"plain $PLAIN\"",
    );
    draft
        .env
        .insert("TOKEN".to_owned(), "tok-5ecret-value".to_owned());
    draft.env.insert("PLAIN".to_owned(), "visible".to_owned());
    draft.secret_env.insert("TOKEN".to_owned());
    let id = h.assign(spec(draft)).await;

    let (outcome, tail) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    let mut lines = h.log_lines(id).await;
    lines.sort_by_key(|l| l.seq);
    let mut texts: Vec<(LogStreamKind, String)> =
        lines.into_iter().map(|l| (l.stream, l.text)).collect();
    texts.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        texts,
        vec![
            (LogStreamKind::Stderr, "********".to_owned()),
            (LogStreamKind::Stdout, "plain visible".to_owned()),
            (LogStreamKind::Stdout, "token is ********".to_owned()),
        ]
    );
    assert_eq!(tail.len(), 3);
    assert!(tail.iter().all(|l| !l.contains("5ecret")), "{tail:?}");
    h.stop().await;
}

#[tokio::test]
async fn output_without_a_newline_is_shipped_before_the_line_ends() {
    let mut h = Harness::start().await;
    let gate = h.work_dir.path().join("gate");
    let id = h.assign(gated("partial", &gate, "waiting", " done")).await;
    wait_for("the partial line to be shipped", DEADLINE, || async {
        h.logs
            .find(|b| b.job_id == id.job_id && b.lines.iter().any(|l| l.text == "waiting"))
    })
    .await
    .unwrap();
    std::fs::write(&gate, b"").unwrap();
    assert_eq!(h.finished(id).await.0, AttemptOutcome::Exited { code: 0 });
    let mut lines = h.log_lines(id).await;
    lines.sort_by_key(|l| l.seq);
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, vec!["waiting", " done"]);
    h.stop().await;
}

#[tokio::test]
async fn a_drain_command_stops_new_work_and_lets_running_attempts_finish() {
    let mut h = Harness::start_with(15_000).await;
    let gate = h.work_dir.path().join("gate");
    let running = h.assign(gated("running", &gate, "", "finished")).await;
    h.started(running).await;

    h.send(&AgentCommand::Drain {
        reason: "test".to_owned(),
    })
    .await;
    h.heartbeat("a draining heartbeat listing the attempt", |hb| {
        hb.draining && hb.running == vec![running]
    })
    .await;
    // Work sent after the drain is left in the stream, for another run of the agent.
    let later = h.assign(spec(sh("later", "echo never"))).await;

    std::fs::write(&gate, b"").unwrap();
    let (outcome, tail) = h.finished(running).await;
    assert_eq!(outcome, AttemptOutcome::Exited { code: 0 });
    assert_eq!(tail, vec!["finished"]);
    h.returned().await;
    h.heartbeat("the last heartbeat, draining and empty", |hb| {
        hb.draining && hb.running.is_empty()
    })
    .await;
    assert!(h.reports_of(later).is_empty());
    // The drain command was acknowledged; the later assignment was not.
    assert_eq!(h.commands_pending().await, 1);
}

#[tokio::test]
async fn a_forced_stop_while_draining_cancels_running_attempts() {
    let mut h = Harness::start_with(60_000).await;
    let id = h
        .assign(spec(sh("stubborn", "trap '' TERM; echo ready; sleep 30")))
        .await;
    let pid = h.started(id).await;
    // Signal only once the trap is in place.
    wait_for("the job to be ready", DEADLINE, || async {
        h.logs
            .find(|b| b.job_id == id.job_id && b.lines.iter().any(|l| l.text == "ready"))
    })
    .await
    .unwrap();
    h.shutdown.cancel();
    h.heartbeat("a draining heartbeat listing the attempt", |hb| {
        hb.draining && hb.running == vec![id]
    })
    .await;

    h.force_stop.cancel();
    let (outcome, _) = h.finished(id).await;
    assert_eq!(outcome, AttemptOutcome::Cancelled);
    h.returned().await;
    wait_for("the process to be gone", DEADLINE, || async {
        process_gone(pid).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_binary_drains_on_a_first_signal_and_cancels_on_a_second() {
    let mut h = Harness::start_as(60_000, true).await;
    let id = h
        .assign(spec(sh("stubborn", "trap '' TERM; echo ready; sleep 30")))
        .await;
    h.started(id).await;
    wait_for("the job to be ready", DEADLINE, || async {
        h.logs
            .find(|b| b.job_id == id.job_id && b.lines.iter().any(|l| l.text == "ready"))
    })
    .await
    .unwrap();
    let process = h.process.as_mut().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(process.id().unwrap()).unwrap());

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    h.heartbeat("a draining heartbeat listing the attempt", |hb| {
        hb.draining && hb.running == vec![id]
    })
    .await;
    assert_eq!(
        h.reports_of(id).len(),
        1,
        "only started: still running while draining"
    );

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(h.finished(id).await.0, AttemptOutcome::Cancelled);
    let process = h.process.as_mut().unwrap();
    let status = tokio::time::timeout(DEADLINE, process.wait())
        .await
        .expect("the agent exits in time")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The pid a job printed as `<label> <pid>`, once its line is in the logs.
async fn printed_pid(h: &Harness, id: AttemptId, label: &str) -> u32 {
    wait_for("the job to print a pid", DEADLINE, || async {
        h.logs.all().into_iter().find_map(|b| {
            (b.job_id == id.job_id)
                .then(|| {
                    b.lines.iter().find_map(|l| {
                        l.text
                            .strip_prefix(label)
                            .and_then(|rest| rest.trim().parse().ok())
                    })
                })
                .flatten()
        })
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_second_agent_on_a_work_folder_in_use_refuses_to_start_and_touches_nothing() {
    let mut h = Harness::start_with(60_000).await;
    let id = h.assign(spec(sh("holds", "echo up; sleep 300"))).await;
    h.started(id).await;
    let before = h
        .heartbeat("a heartbeat with the job", |hb| hb.running.len() == 1)
        .await;

    // The binary, started on the folder the running agent holds, says who holds it and ends.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei-agent"))
        .env("HODEI_NATS_URL", h.nats.url())
        .env("HODEI_WORKER_ID", h.worker_id.to_string())
        .env("HODEI_WORK_DIR", h.work_dir.path())
        .env("HODEI_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let refused = tokio::time::timeout(DEADLINE, refused)
        .await
        .expect("the second agent ends in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    let holder = format!(
        "another agent (pid {}) holds the work folder",
        std::process::id()
    );
    assert!(stderr.contains(&holder), "{stderr}");
    // In process, the same refusal as a typed error.
    match Agent::build(h.next_incarnation()).await {
        Err(AgentError::WorkLock(hodei_agent::WorkLockError::InUse { .. })) => {}
        other => panic!("expected the work folder to be in use: {:?}", other.err()),
    }

    // The running agent lost nothing: its job still runs in the same incarnation, and ends.
    let after = h
        .heartbeat("a later heartbeat", |hb| hb.sent_at > before.sent_at)
        .await;
    assert_eq!(after.incarnation, before.incarnation);
    assert_eq!(after.running, before.running);
    h.cancel(id).await;
    assert_eq!(h.finished(id).await.0, AttemptOutcome::Cancelled);

    // Once the first agent has stopped, the folder is free.
    h.stop().await;
    let next = Agent::build(h.next_incarnation()).await;
    assert!(next.is_ok(), "{:?}", next.err());
}

#[tokio::test]
async fn a_killed_agent_takes_its_job_with_it_and_its_next_incarnation_reports_it() {
    let mut h = Harness::start_as(60_000, true).await;
    let first = h.heartbeat("a first heartbeat", |_| true).await.incarnation;
    // A process group: the shell leads it, its background child does not.
    let id = h
        .assign(spec(sh(
            "orphan-maker",
            "sleep 300 & echo child $!; echo leader $$; wait",
        )))
        .await;
    let leader = printed_pid(&h, id, "leader").await;
    let child = printed_pid(&h, id, "child").await;
    let mut process = h.process.take().unwrap();
    process.start_kill().unwrap();
    process.wait().await.unwrap();

    // The group leader dies with its agent (parent-death signal).
    wait_for(
        "the job's leader to die with the agent",
        DEADLINE,
        || async { process_gone(leader).then_some(()) },
    )
    .await
    .unwrap();
    assert!(!process_gone(child), "the leader's own child outlives it");

    // The next incarnation sweeps what is left and reports the attempt lost.
    h.process = Some(spawn_binary(&h.next_incarnation()));
    let (outcome, _) = h.finished(id).await;
    assert_eq!(
        outcome,
        AttemptOutcome::Lost {
            reason: RESTARTED_REASON.to_owned()
        }
    );
    wait_for("what the job left to be swept", DEADLINE, || async {
        process_gone(child).then_some(())
    })
    .await
    .unwrap();
    let next = h
        .heartbeat("a heartbeat of a new incarnation", |hb| {
            hb.incarnation != first
        })
        .await;
    assert!(next.running.is_empty());
    // A command placed with the previous incarnation is not run by this one.
    let stale = AttemptId::new(JobId::new(), AttemptNumber::new(1));
    h.send(&AgentCommand::Assign {
        job_id: stale.job_id,
        attempt: stale.attempt,
        spec: Box::new(spec(sh("stale", "echo ran"))),
        assigned_at: Utc::now(),
        incarnation: Some(first),
    })
    .await;
    wait_for("the stale assignment to be dropped", DEADLINE, || async {
        (h.commands_pending().await == 0).then_some(())
    })
    .await
    .unwrap();
    assert!(h.reports_of(stale).is_empty(), "{:?}", h.reports_of(stale));
}

/// An agent with a 1 s lease behind a proxy, running a long attempt, once the proxy stalled
/// and the agent stopped the attempt (lease, then SIGTERM and the kill grace at most; the
/// client's own pings, every two minutes, would notice only much later).
async fn stalled_past_the_lease() -> (Harness, AttemptId) {
    let h = Harness::start_behind_proxy(1_000).await;
    let id = h
        .assign(spec(sh("long", "echo leader $$; sleep 300")))
        .await;
    let leader = printed_pid(&h, id, "leader").await;
    h.proxy.as_ref().unwrap().stall();
    wait_for("the agent to stop its attempt", DEADLINE, || async {
        process_gone(leader).then_some(())
    })
    .await
    .unwrap();
    (h, id)
}

/// A partition that drops packets without a reset: the agent's socket keeps taking its
/// heartbeats (a flush succeeds), but the server gets none of them. Only a round trip through
/// the server renews the lease, so the agent stops its attempt after its lease, before the
/// registry would hand it back (lease plus kill grace), and reports it once the path heals.
#[tokio::test]
async fn a_silent_partition_stops_the_attempts_after_the_lease() {
    let (mut h, id) = stalled_past_the_lease().await;
    h.proxy.as_ref().unwrap().heal();
    let outcome = h.finished(id).await.0;
    assert_eq!(
        outcome,
        AttemptOutcome::Lost {
            reason: LEASE_REASON.to_owned()
        }
    );
    h.stop().await;
}

/// An assignment stored while the agent was cut off past its lease may have been handed to
/// another worker by the time the path heals (the registry does so after lease plus kill
/// grace): delivered then, it is reported lost (requeued at once), never run; one stored
/// after the renewal runs.
#[tokio::test]
async fn an_assignment_stored_before_the_lease_lapsed_is_reported_lost_not_run() {
    let (mut h, _) = stalled_past_the_lease().await;
    // Stored while the agent is cut off (the test reaches NATS directly).
    let marker = h.work_dir.path().join("stale-ran");
    let stale = h
        .assign(spec(sh("stale", &format!("touch {}", marker.display()))))
        .await;
    h.proxy.as_ref().unwrap().heal();
    let outcome = h.finished(stale).await.0;
    assert_eq!(
        outcome,
        AttemptOutcome::Lost {
            reason: FENCED_REASON.to_owned()
        }
    );
    assert!(
        !h.reports_of(stale)
            .iter()
            .any(|r| matches!(r.kind, ReportKind::Started { .. })),
        "{:?}",
        h.reports_of(stale)
    );
    assert!(!marker.exists(), "the stale assignment ran");
    run_once_the_fence_is_set(&h).await;
    h.stop().await;
}

/// Once a beat is confirmed again after a lapse and the fence set, assignments run again (one
/// stored before that is refused like a stale one): assigns until one runs.
async fn run_once_the_fence_is_set(h: &Harness) {
    let started = Instant::now();
    loop {
        let fresh = h.assign(spec(sh("fresh", "echo fresh"))).await;
        match h.finished(fresh).await.0 {
            AttemptOutcome::Exited { code: 0 } => break,
            AttemptOutcome::Lost { reason } if reason == FENCED_REASON => {
                assert!(started.elapsed() < DEADLINE, "assignments still refused");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
}

/// The fence's floor is a sequence of one command stream: a stream made again (NATS lost its
/// store) numbers its messages from 1 again, all stored after the floor was read, and they run
/// instead of being refused (which would have failed every job placed here as lost).
#[tokio::test]
async fn a_command_stream_made_again_after_a_lapse_keeps_no_floor() {
    let (mut h, _) = stalled_past_the_lease().await;
    h.proxy.as_ref().unwrap().heal();
    run_once_the_fence_is_set(&h).await;
    h.js.delete_stream(streams::AGENT).await.unwrap();
    hodei_messaging::streams::ensure_all(&h.js).await.unwrap();
    let first = h.assign(spec(sh("first", "echo first"))).await;
    assert_eq!(
        h.finished(first).await.0,
        AttemptOutcome::Exited { code: 0 }
    );
    h.stop().await;
}

#[tokio::test]
async fn an_agent_cut_off_from_nats_stops_its_attempts_after_its_lease() {
    let mut h = Harness::start_leased(60_000, false, 1_000).await;
    let id = h
        .assign(spec(sh("long", "echo leader $$; sleep 300")))
        .await;
    let leader = printed_pid(&h, id, "leader").await;
    h.nats.stop().await;
    // Lease (1 s), then SIGTERM and the kill grace at most.
    wait_for("the agent to stop its attempt", DEADLINE, || async {
        process_gone(leader).then_some(())
    })
    .await
    .unwrap();
    h.nats.restart().await.unwrap();
    // Reported once NATS is back, read from the stream afresh.
    let stream = h.js.get_stream(streams::REPORTS).await.unwrap();
    let outcome = wait_for("the lost report", DEADLINE, || async {
        // The test's collector may have taken it from the work queue already.
        let collected = h.reports_of(id).into_iter().find_map(|r| match r.kind {
            ReportKind::Finished { outcome, .. } => Some(outcome),
            ReportKind::Started { .. } => None,
        });
        if collected.is_some() {
            return collected;
        }
        let message = stream
            .get_last_raw_message_by_subject(&subjects::report(&h.worker_id, &id.job_id))
            .await
            .ok()?;
        match decode::<AgentReport>(&message.subject, &message.payload)
            .ok()?
            .kind
        {
            ReportKind::Finished { outcome, .. } => Some(outcome),
            ReportKind::Started { .. } => None,
        }
    })
    .await
    .unwrap();
    assert_eq!(
        outcome,
        AttemptOutcome::Lost {
            reason: LEASE_REASON.to_owned()
        }
    );
    h.stop().await;
}
