//! Exactly once under routine faults, proven against what really ran.
//!
//! Every service runs as its own operating-system process, started from the workspace's
//! binaries: the gateway, the scheduler, the registry and three agents with four slots each.
//! Every job appends `start` and `end` lines to a ledger file, and holds an exclusive `flock`
//! on a lock file of its own name while it runs: a second copy of the job that starts while
//! the first still runs finds the lock taken and writes an `overlap` line.
//!
//! Phase by phase, under load, the test injects one fault: SIGKILL and restart of the registry
//! (after every heartbeat in PostgreSQL has gone stale), of the scheduler (with a report
//! waiting), of the gateway; a NATS restart; a PostgreSQL outage; a NATS outage and a
//! PostgreSQL outage that each outlast the running jobs' own timeout and the scheduler's grace
//! while they end (so their reports, not the timeout, must decide); a freeze (SIGSTOP) of the registry and the scheduler
//! together, past a worker's lease and the running jobs' timeout, while they end; a PostgreSQL
//! crash that loses the relays' last deletions of published rows (which commit without
//! waiting for the disk) in the same outage as a NATS restart, so that every message is
//! published again; SIGKILL of an agent and its restart under the same worker id; and a
//! partition of one agent from NATS for longer than its lease, once closing its connection
//! and once keeping it open but passing no byte (a silent partition). Then it checks the
//! ledger and the state of record:
//!
//! - every accepted job ended, and its ledger shows exactly one `end` and no `overlap`;
//! - every recorded outcome is what ran: the job's state and exit code are those of the one
//!   `end` line (every fifth job exits 3 and is not retried);
//! - every job ended within a bound the test prints, per phase;
//! - no attempt was handed back in a phase whose fault only hit an observer (registry,
//!   scheduler, gateway, NATS, PostgreSQL, both timeouts phases, stall, lost deletions):
//!   healthy workers were never blamed;
//! - only the phases that really killed running processes (agent restart, both partitions)
//!   re-ran jobs, at most one agent's slots, and each re-run began after the killed copy was
//!   gone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_system_tests::processes::{self, ServiceProcess, backend_vars, vars};
use hodei_test_support::{TcpProxy, TestDatabase, TestNats, wait_for};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tonic::transport::Channel;

/// Agents' worker ids; the last one reaches NATS through a proxy the test can cut.
const AGENTS: [&str; 3] = ["chaos-a", "chaos-b", "chaos-c"];
/// The agent the test kills and restarts under the same id.
const RESTARTED: &str = "chaos-b";
/// The agent the test cuts off NATS.
const PARTITIONED: &str = "chaos-c";
const SLOTS: u32 = 4;
const HEARTBEAT_MS: u64 = 250;
/// Unreachable (no new work) after 2 s of observed silence.
const MISSED_BEATS: u32 = 8;
/// Agents stop their attempts after 8 s without NATS (a NATS restart, with the clients'
/// reconnect backoff, stays well inside it); the registry hands them back after 8.5 s of
/// observed silence.
const LEASE_MS: u64 = 8_000;
const KILL_GRACE_MS: u64 = 500;
/// Jobs per phase: more than the 12 slots, so that work is queued, placed and running when
/// the fault hits.
const PHASE_JOBS: usize = 16;
/// The partition phases' jobs outlast the lease by far, so that the partitioned agent kills
/// them before any of them ends unreported, even if they started seconds before the cut.
const PARTITION_JOB_SECS: f64 = (LEASE_MS / 1_000 + 6) as f64;
/// How long PostgreSQL stays away: longer than the 2 s of silence that make a worker
/// unreachable.
const PG_OUTAGE: Duration = Duration::from_secs(3);
/// The `timeouts-*` phases' jobs' own timeout: longer than any of them runs (at most 2 s).
const SHORT_TIMEOUT_SECS: u64 = 4;
/// How long a running job may go unreported past its timeout before the scheduler ends it.
const TIMEOUT_GRACE_MS: u64 = 1_000;
/// How long NATS or PostgreSQL stays away in the `timeouts-*` phases: past every running job's
/// timeout and grace, so that each of them is overdue when the backend is back (and within
/// the agents' lease, so that they run their jobs to the end).
const LONG_OUTAGE: Duration =
    Duration::from_millis(SHORT_TIMEOUT_SECS * 1_000 + TIMEOUT_GRACE_MS + 1_000);
/// How long the registry and the scheduler stay frozen in the `stall` phase: past the silence
/// after which the registry hands a worker's attempts back (lease + kill grace), and past the
/// running jobs' timeout and grace.
const STALL: Duration = Duration::from_millis(LEASE_MS + KILL_GRACE_MS + 1_000);
const DEADLINE: Duration = Duration::from_secs(60);

/// The job each ledger entry comes from: takes its lock, writes `start`, sleeps, writes `end`
/// with the exit code it then exits with.
const JOB_SCRIPT: &str = r#"exec 9>>"$LOCKS/$NAME"
flock -n 9 || echo "overlap $NAME $$" >> "$LEDGER"
echo "start $NAME $$" >> "$LEDGER"
sleep "$SECS"
echo "end $NAME $$ $CODE" >> "$LEDGER"
exit "$CODE"
"#;
/// Every fifth job fails with this exit code, so that outcomes other than success are
/// checked against the ledger too.
const FAILING_CODE: i64 = 3;

/// The whole system as separate processes, with the ledger's folder.
struct Cluster {
    nats: TestNats,
    database: TestDatabase,
    dir: tempfile::TempDir,
    proxy: TcpProxy,
    gateway: ServiceProcess,
    scheduler: ServiceProcess,
    registry: ServiceProcess,
    agents: Vec<ServiceProcess>,
    jobs: JobServiceClient<hodei_proto::AuthChannel>,
    pool: PgPool,
}

fn loopback_port() -> SocketAddr {
    processes::loopback_port().unwrap()
}

impl Cluster {
    async fn start() -> Cluster {
        let nats = TestNats::start().await.unwrap();
        let database = TestDatabase::create().await.unwrap();
        let dir = tempfile::Builder::new()
            .prefix("hodei-chaos-")
            .tempdir()
            .unwrap();
        for sub in ["logs", "locks", "work"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let logs = dir.path().join("logs");
        let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], nats.port())))
            .await
            .unwrap();
        let backends = |extra: &[(&str, String)]| backend_vars(&nats, &database, "warn", extra);

        let grpc = loopback_port();
        let mut gateway = ServiceProcess::start(
            "api-gateway",
            "hodei-api-gateway",
            backends(&[("HODEI_GRPC_ADDR", grpc.to_string())]),
            loopback_port(),
            &logs,
        )
        .unwrap();
        // The gateway applies the migrations: the others start once it is ready.
        gateway.wait_readiness(200, DEADLINE).await.unwrap();
        let mut scheduler = ServiceProcess::start(
            "scheduler",
            "hodei-scheduler",
            backends(&[
                ("HODEI_WORKER_STALE_MS", "2000".to_owned()),
                ("HODEI_PLACEMENT_RETRY_MS", "100".to_owned()),
                ("HODEI_RECONCILE_AFTER_MS", "3000".to_owned()),
                ("HODEI_ACK_WAIT_MS", "2000".to_owned()),
                ("HODEI_TIMEOUT_GRACE_MS", TIMEOUT_GRACE_MS.to_string()),
            ]),
            loopback_port(),
            &logs,
        )
        .unwrap();
        let mut registry = ServiceProcess::start(
            "registry",
            "hodei-registry",
            backends(&[
                ("HODEI_HEARTBEAT_INTERVAL_MS", HEARTBEAT_MS.to_string()),
                ("HODEI_MISSED_BEATS", MISSED_BEATS.to_string()),
                ("HODEI_HEARTBEAT_FLUSH_MS", "20".to_owned()),
            ]),
            loopback_port(),
            &logs,
        )
        .unwrap();
        scheduler.wait_readiness(200, DEADLINE).await.unwrap();
        registry.wait_readiness(200, DEADLINE).await.unwrap();

        let mut agents = Vec::new();
        for id in AGENTS {
            let nats_url = if id == PARTITIONED {
                format!("nats://{}", proxy.addr())
            } else {
                nats.url()
            };
            let mut agent = ServiceProcess::start(
                id,
                "hodei-agent",
                vars(&[
                    ("HODEI_NATS_URL", nats_url),
                    ("HODEI_WORKER_ID", id.to_owned()),
                    ("HODEI_MAX_CONCURRENT_JOBS", SLOTS.to_string()),
                    (
                        "HODEI_WORK_DIR",
                        dir.path().join("work").join(id).display().to_string(),
                    ),
                    ("HODEI_HEARTBEAT_INTERVAL_MS", HEARTBEAT_MS.to_string()),
                    ("HODEI_LEASE_MS", LEASE_MS.to_string()),
                    ("HODEI_KILL_GRACE_MS", KILL_GRACE_MS.to_string()),
                    ("HODEI_DRAIN_TIMEOUT_MS", "2000".to_owned()),
                    ("HODEI_LOG", "warn".to_owned()),
                ]),
                loopback_port(),
                &logs,
            )
            .unwrap();
            agent.wait_readiness(200, DEADLINE).await.unwrap();
            agents.push(agent);
        }

        let channel = Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(2))
            .connect(&database.url())
            .await
            .unwrap();
        let cluster = Cluster {
            nats,
            database,
            dir,
            proxy,
            gateway,
            scheduler,
            registry,
            agents,
            jobs: JobServiceClient::new(
                hodei_proto::Bearer::new(Some(
                    &hodei_system_tests::issue_token(&pool, "default", hodei_domain::Role::Admin)
                        .await
                        .unwrap(),
                ))
                .unwrap()
                .on(channel),
            ),
            pool,
        };
        cluster
            .wait_db("every agent to be ready", |pool| async move {
                let ready: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM workers WHERE status = 'ready'")
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                (ready == AGENTS.len() as i64).then_some(())
            })
            .await;
        cluster
    }

    fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger")
    }

    fn agent(&mut self, id: &str) -> &mut ServiceProcess {
        self.agents.iter_mut().find(|a| a.name() == id).unwrap()
    }

    /// Submits the phase's jobs; each sleeps `secs(i)` seconds, within a timeout of 60 s.
    async fn submit(&self, phase: &str, count: usize, secs: impl Fn(usize) -> f64) {
        self.submit_timed(phase, count, secs, 60).await;
    }

    /// Submits the phase's jobs; each sleeps `secs(i)` seconds, within `timeout_secs`.
    async fn submit_timed(
        &self,
        phase: &str,
        count: usize,
        secs: impl Fn(usize) -> f64,
        timeout_secs: u64,
    ) {
        for i in 0..count {
            let name = format!("{phase}-{i:02}");
            let env = [
                ("LEDGER", self.ledger().display().to_string()),
                ("LOCKS", self.dir.path().join("locks").display().to_string()),
                ("NAME", name.clone()),
                ("SECS", format!("{:.3}", secs(i))),
                ("CODE", expected_code(i).to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let spec = pb::JobSpec {
                name,
                command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                    interpreter: vec!["/bin/sh".into(), "-c".into()],
                    script: JOB_SCRIPT.to_owned(),
                })),
                env,
                timeout_secs,
                // A failed run is not retried: the one end in the ledger is the outcome.
                max_attempts: 1,
                ..Default::default()
            };
            self.jobs
                .clone()
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(spec),
                    tenant: String::new(),
                })
                .await
                .unwrap();
        }
    }

    /// Polls the state of record until `f` answers; `None` while PostgreSQL is away.
    async fn wait_db<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match wait_for(what, DEADLINE, || f(self.pool.clone())).await {
            Ok(value) => value,
            Err(e) => panic!("{e}\n{}", self.logs()),
        }
    }

    /// Waits until at least `count` of the phase's jobs run (on `worker`, if given).
    async fn wait_running(&self, phase: &str, count: i64, worker: Option<&str>) {
        let pattern = format!("{phase}-%");
        let worker = worker.map(str::to_owned);
        self.wait_db(&format!("{count} jobs of {phase} to run"), |pool| {
            let (pattern, worker) = (pattern.clone(), worker.clone());
            async move {
                let running: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM jobs WHERE name LIKE $1 AND state = 'running'
                     AND ($2::text IS NULL OR worker_id = $2)",
                )
                .bind(pattern)
                .bind(worker)
                .fetch_one(&pool)
                .await
                .ok()?;
                (running >= count).then_some(())
            }
        })
        .await;
    }

    /// Waits until every job of the phase has ended.
    async fn wait_phase_ended(&self, phase: &str) {
        let pattern = format!("{phase}-%");
        self.wait_db(&format!("every job of {phase} to end"), |pool| {
            let pattern = pattern.clone();
            async move {
                let open: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM jobs WHERE name LIKE $1
                     AND state NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled')",
                )
                .bind(pattern)
                .fetch_one(&pool)
                .await
                .ok()?;
                (open == 0).then_some(())
            }
        })
        .await;
    }

    /// A phase of jobs that outlast the lease, all the slots busy, while the partitioned
    /// agent is cut off until the registry has declared it lost; then the path heals.
    async fn partition(&self, phase: &'static str, how: Cut) -> Phase {
        let submitted = Instant::now();
        self.submit(phase, AGENTS.len() * SLOTS as usize, |_| PARTITION_JOB_SECS)
            .await;
        self.wait_running(phase, (AGENTS.len() * SLOTS as usize) as i64, None)
            .await;
        self.wait_running(phase, 1, Some(PARTITIONED)).await;
        let t = Instant::now();
        match how {
            Cut::Closed => self.proxy.cut(),
            Cut::Silent => self.proxy.stall(),
        }
        self.wait_worker_status(PARTITIONED, "lost").await;
        eprintln!(
            "chaos {phase}: {PARTITIONED} lost and its attempts handed back {:.2} s after the \
             cut (lease {LEASE_MS} ms + kill grace {KILL_GRACE_MS} ms)",
            t.elapsed().as_secs_f64()
        );
        self.proxy.heal();
        self.wait_worker_status(PARTITIONED, "ready").await;
        let fault = t.elapsed();
        self.wait_phase_ended(phase).await;
        Phase {
            name: phase,
            kills_jobs_on: Some(PARTITIONED),
            fault,
            ended: submitted.elapsed(),
        }
    }

    /// Waits until the worker's status in the state of record is `status`.
    async fn wait_worker_status(&self, id: &str, status: &str) {
        self.wait_db(&format!("{id} to be {status}"), |pool| async move {
            let now: String = sqlx::query_scalar("SELECT status FROM workers WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .ok()?;
            (now == status).then_some(())
        })
        .await;
    }

    /// Waits until every worker's last recorded heartbeat is older than the silence that
    /// makes a worker unreachable: what a registry sees when it was not there to observe.
    async fn wait_heartbeats_stale(&self) {
        let stale = Duration::from_millis(HEARTBEAT_MS * u64::from(MISSED_BEATS) + 500);
        self.wait_db("every heartbeat to be stale", |pool| async move {
            let stale: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM worker_beats
                 WHERE last_heartbeat_at < now() - make_interval(secs => $1)",
            )
            .bind(stale.as_secs_f64())
            .fetch_one(&pool)
            .await
            .ok()?;
            (stale == AGENTS.len() as i64).then_some(())
        })
        .await;
    }

    /// How many lines the ledger has now.
    fn ledger_lines(&self) -> usize {
        std::fs::read_to_string(self.ledger())
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// Waits until every run of the phase the ledger shows started has reached its end.
    async fn wait_every_start_ended(&self, phase: &str) {
        let ledger = self.ledger();
        wait_for(
            &format!("the running jobs of {phase} to end"),
            DEADLINE,
            || {
                let ledger = std::fs::read_to_string(&ledger).unwrap_or_default();
                let count = |kind: &str| {
                    ledger
                        .lines()
                        .filter(|line| line.starts_with(&format!("{kind} {phase}-")))
                        .count()
                };
                std::future::ready((count("start") == count("end")).then_some(()))
            },
        )
        .await
        .unwrap();
    }

    /// From now on, keeps a copy of every row written to the outbox.
    async fn keep_outbox_rows(&self) {
        for statement in [
            "CREATE TABLE chaos_outbox_seen (LIKE outbox)",
            "CREATE FUNCTION chaos_keep_outbox_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO chaos_outbox_seen SELECT NEW.*; RETURN NEW; END $$",
            "CREATE TRIGGER chaos_keep_outbox_row AFTER INSERT ON outbox
             FOR EACH ROW EXECUTE FUNCTION chaos_keep_outbox_row()",
        ] {
            sqlx::query(statement).execute(&self.pool).await.unwrap();
        }
    }

    /// Puts back every row kept since [`Cluster::keep_outbox_rows`] that a relay deleted, as
    /// a crash of the server that lost those deletions leaves the outbox; returns how many of
    /// them were assignments.
    async fn lose_outbox_deletions(&self) -> u64 {
        sqlx::query("DROP TRIGGER chaos_keep_outbox_row ON outbox")
            .execute(&self.pool)
            .await
            .unwrap();
        let assignments: i64 = sqlx::query_scalar(
            "WITH lost AS (
                 INSERT INTO outbox SELECT * FROM chaos_outbox_seen s
                 WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id = s.id)
                 RETURNING at_most_once
             )
             SELECT count(*) FILTER (WHERE at_most_once) FROM lost",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        u64::try_from(assignments).unwrap()
    }

    /// The sequence of the last message the agents' stream stored.
    async fn agent_stream_last_seq(&self) -> u64 {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        let mut stream = async_nats::jetstream::new(client)
            .get_stream(hodei_messaging::streams::AGENT)
            .await
            .unwrap();
        stream.info().await.unwrap().state.last_sequence
    }

    /// Waits until the outbox is empty and the agents have taken every assignment from their
    /// stream (a work queue: what they acknowledged is gone from it).
    async fn wait_republished_and_consumed(&self) {
        self.wait_db("the outbox to be published again", |pool| async move {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&pool)
                .await
                .ok()?;
            (left == 0).then_some(())
        })
        .await;
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        wait_for("the agents to take every assignment", DEADLINE, || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream(hodei_messaging::streams::AGENT).await.ok()?;
                (stream.info().await.ok()?.state.messages == 0).then_some(())
            }
        })
        .await
        .unwrap();
    }

    /// Stops `backend` and waits until every service says it is not ready.
    async fn take_away(&mut self, backend: Backend) {
        match backend {
            Backend::Nats => self.nats.stop().await,
            Backend::Postgres => self.database.set_available(false).await.unwrap(),
        }
        self.wait_services(503).await;
    }

    /// Starts `backend` again and waits until every service is ready.
    async fn bring_back(&mut self, backend: Backend) {
        match backend {
            Backend::Nats => self.nats.restart().await.unwrap(),
            Backend::Postgres => self.database.set_available(true).await.unwrap(),
        }
        self.wait_services(200).await;
    }

    /// A phase whose jobs (4 s timeout) run while `backend` goes away, and end while it stays
    /// away past their timeout and the scheduler's grace after it.
    async fn outage_past_timeouts(&mut self, phase: &'static str, backend: Backend) -> Phase {
        let submitted = Instant::now();
        self.submit_timed(phase, PHASE_JOBS, duration_secs, SHORT_TIMEOUT_SECS)
            .await;
        self.wait_running(phase, 8, None).await;
        let t = Instant::now();
        self.take_away(backend).await;
        self.wait_every_start_ended(phase).await;
        tokio::time::sleep_until((t + LONG_OUTAGE).into()).await;
        self.bring_back(backend).await;
        let fault = t.elapsed();
        self.wait_phase_ended(phase).await;
        Phase {
            name: phase,
            kills_jobs_on: None,
            fault,
            ended: submitted.elapsed(),
        }
    }

    async fn wait_services(&mut self, status: u16) {
        for service in [&mut self.gateway, &mut self.scheduler, &mut self.registry] {
            service.wait_readiness(status, DEADLINE).await.unwrap();
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for service in [&self.gateway, &self.scheduler, &self.registry]
            .into_iter()
            .chain(&self.agents)
        {
            out.push_str(&format!(
                "--- {} log tail ---\n{}\n",
                service.name(),
                service.log_tail()
            ));
        }
        out
    }

    /// Per job of the state of record: its state and its attempts' workers and outcomes.
    async fn jobs_of_record(&self) -> BTreeMap<String, Recorded> {
        let jobs: Vec<(String, String)> = sqlx::query_as("SELECT name, state FROM jobs")
            .fetch_all(&self.pool)
            .await
            .unwrap();
        let attempts: Vec<(String, String, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT j.name, a->>'worker_id', a->'outcome'->>'kind',
                    (a->'outcome'->>'code')::bigint
             FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(j.attempts) a
             ORDER BY j.name, (a->>'attempt')::bigint",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut record: BTreeMap<String, Recorded> = jobs
            .into_iter()
            .map(|(name, state)| {
                let job = Recorded {
                    state,
                    attempts: Vec::new(),
                    exit_code: None,
                };
                (name, job)
            })
            .collect();
        for (name, worker, outcome, code) in attempts {
            if let Some(job) = record.get_mut(&name) {
                job.attempts.push((worker, outcome.unwrap_or_default()));
                job.exit_code = code;
            }
        }
        record
    }
}

/// A job as the state of record has it.
#[derive(Debug)]
struct Recorded {
    state: String,
    /// Per attempt, in order: its worker and how it ended (`exited`, `lost`, ...).
    attempts: Vec<(String, String)>,
    /// The last attempt's exit code.
    exit_code: Option<i64>,
}

/// What the jobs themselves wrote, per job name.
#[derive(Debug, Default)]
struct Runs {
    starts: usize,
    /// The exit code of each run that reached its end.
    ends: Vec<i64>,
    overlaps: usize,
}

fn read_ledger(path: &Path) -> BTreeMap<String, Runs> {
    let mut runs: BTreeMap<String, Runs> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let mut words = line.split_whitespace();
        let (Some(kind), Some(name)) = (words.next(), words.next()) else {
            panic!("malformed ledger line {line:?}");
        };
        let entry = runs.entry(name.to_owned()).or_default();
        match kind {
            "start" => entry.starts += 1,
            "end" => entry.ends.push(
                words
                    .nth(1)
                    .and_then(|code| code.parse().ok())
                    .unwrap_or_else(|| panic!("no exit code in {line:?}")),
            ),
            "overlap" => entry.overlaps += 1,
            other => panic!("unknown ledger entry {other:?} in {line:?}"),
        }
    }
    runs
}

/// How a partition phase cuts the agent off NATS.
#[derive(Clone, Copy)]
enum Cut {
    /// Every connection closed, new ones refused.
    Closed,
    /// Every connection kept open, no byte passed either way.
    Silent,
}

/// A backend a phase takes away.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Nats,
    Postgres,
}

/// One phase's fault, and how long it took from injection to healing.
struct Phase {
    name: &'static str,
    /// The worker whose running processes the fault kills (so its jobs may run again).
    kills_jobs_on: Option<&'static str>,
    fault: Duration,
    /// From the phase's first submission until its last job ended: the bound every job of
    /// the phase ended within.
    ended: Duration,
}

fn expected_code(i: usize) -> i64 {
    if i % 5 == 4 { FAILING_CODE } else { 0 }
}

fn duration_secs(i: usize) -> f64 {
    1.0 + (i * 37 % 100) as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_fault_runs_a_job_twice_or_blames_a_healthy_worker() {
    let started = Instant::now();
    let mut cluster = Cluster::start().await;
    let mut phases = Vec::new();

    // The registry dies; it comes back once every heartbeat it wrote has gone stale, which is
    // what used to make it declare healthy workers lost.
    let submitted = Instant::now();
    cluster.submit("registry", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("registry", 8, None).await;
    let t = Instant::now();
    cluster.registry.kill().await;
    cluster.wait_heartbeats_stale().await;
    cluster.registry.restart().await.unwrap();
    cluster
        .registry
        .wait_readiness(200, DEADLINE)
        .await
        .unwrap();
    let fault = t.elapsed();
    cluster.wait_phase_ended("registry").await;
    phases.push(Phase {
        name: "registry",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // The scheduler dies with work queued and a report waiting for it.
    let submitted = Instant::now();
    cluster.submit("scheduler", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("scheduler", 8, None).await;
    let t = Instant::now();
    cluster.scheduler.kill().await;
    let lines = cluster.ledger_lines();
    wait_for("a job to end while the scheduler is down", DEADLINE, || {
        let cluster = &cluster;
        async move { (cluster.ledger_lines() > lines).then_some(()) }
    })
    .await
    .unwrap();
    cluster.scheduler.restart().await.unwrap();
    cluster
        .scheduler
        .wait_readiness(200, DEADLINE)
        .await
        .unwrap();
    let fault = t.elapsed();
    cluster.wait_phase_ended("scheduler").await;
    phases.push(Phase {
        name: "scheduler",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // The gateway dies with work in flight; clients come back to the new one.
    let submitted = Instant::now();
    cluster.submit("gateway", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("gateway", 8, None).await;
    let t = Instant::now();
    cluster.gateway.restart().await.unwrap();
    cluster.gateway.wait_readiness(200, DEADLINE).await.unwrap();
    let fault = t.elapsed();
    cluster.wait_phase_ended("gateway").await;
    phases.push(Phase {
        name: "gateway",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // NATS restarts; it stays down until every service has noticed.
    let submitted = Instant::now();
    cluster.submit("nats", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("nats", 8, None).await;
    let t = Instant::now();
    cluster.take_away(Backend::Nats).await;
    // It stays down past the silence that makes a worker unreachable.
    cluster.wait_heartbeats_stale().await;
    cluster.bring_back(Backend::Nats).await;
    let fault = t.elapsed();
    cluster.wait_phase_ended("nats").await;
    phases.push(Phase {
        name: "nats",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // PostgreSQL goes away until every service has noticed.
    let submitted = Instant::now();
    cluster.submit("postgres", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("postgres", 8, None).await;
    let t = Instant::now();
    cluster.take_away(Backend::Postgres).await;
    // The outage's length is part of the fault (nothing to wait for can be read while the
    // database is away): past the silence that makes a worker unreachable.
    tokio::time::sleep_until((t + PG_OUTAGE).into()).await;
    cluster.bring_back(Backend::Postgres).await;
    let fault = t.elapsed();
    cluster.wait_phase_ended("postgres").await;
    phases.push(Phase {
        name: "postgres",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // NATS goes away while the running jobs end, and stays away past their own timeout and
    // the scheduler's grace after it (but within the agents' lease): the agents keep their
    // reports, the scheduler still reaches PostgreSQL, and every running job is overdue there.
    // When NATS is back, the reports decide, not the timeout (silence counts only while the
    // scheduler could have heard it).
    phases.push(
        cluster
            .outage_past_timeouts("timeouts-nats", Backend::Nats)
            .await,
    );

    // PostgreSQL goes away while the running jobs end, and stays away past their own timeout
    // and the scheduler's grace after it: their reports wait in JetStream, and when the
    // database is back, those reports decide, not the timeout.
    phases.push(
        cluster
            .outage_past_timeouts("timeouts-pg", Backend::Postgres)
            .await,
    );

    // The registry and the scheduler freeze where they stand (SIGSTOP, as a stalled host or
    // runtime would), with jobs running, past a worker's lease and the jobs' own timeout and
    // grace; the jobs end meanwhile. Thawed, they find every stored beat and every running job
    // long overdue: what they did not observe is no evidence against the workers, and the
    // reports waiting in JetStream decide.
    let submitted = Instant::now();
    cluster
        .submit_timed("stall", PHASE_JOBS, duration_secs, SHORT_TIMEOUT_SECS)
        .await;
    cluster.wait_running("stall", 8, None).await;
    let t = Instant::now();
    cluster.registry.pause().unwrap();
    cluster.scheduler.pause().unwrap();
    cluster.wait_every_start_ended("stall").await;
    tokio::time::sleep_until((t + STALL).into()).await;
    cluster.registry.resume().unwrap();
    cluster.scheduler.resume().unwrap();
    let fault = t.elapsed();
    cluster.wait_phase_ended("stall").await;
    phases.push(Phase {
        name: "stall",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // PostgreSQL crashes and loses the relays' last deletions of published rows (they commit
    // without waiting for the disk), in the same outage as a NATS restart that forgets which
    // assignments it already stored: every message of the phase is published again, the
    // assignments of running and of ended attempts among them, and none may run twice.
    let submitted = Instant::now();
    cluster.keep_outbox_rows().await;
    cluster.submit("deletions", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("deletions", 8, None).await;
    let stored_before = cluster.agent_stream_last_seq().await;
    let t = Instant::now();
    cluster.take_away(Backend::Nats).await;
    let lost_assignments = cluster.lose_outbox_deletions().await;
    assert!(lost_assignments > 0, "no assignment's deletion to lose");
    cluster.bring_back(Backend::Nats).await;
    let fault = t.elapsed();
    cluster.wait_phase_ended("deletions").await;
    cluster.wait_republished_and_consumed().await;
    let stored = cluster.agent_stream_last_seq().await - stored_before;
    assert!(
        stored >= lost_assignments,
        "the lost assignments' rows were not published again: {stored} stored since, \
         {lost_assignments} lost"
    );
    eprintln!(
        "chaos deletions: {lost_assignments} assignments' deletions lost, {stored} assignments \
         stored again or new after the restart"
    );
    phases.push(Phase {
        name: "deletions",
        kills_jobs_on: None,
        fault,
        ended: submitted.elapsed(),
    });

    // An agent dies with jobs running and comes back under the same worker id: its jobs die
    // with it and run again, once.
    let submitted = Instant::now();
    cluster.submit("agent", PHASE_JOBS, duration_secs).await;
    cluster.wait_running("agent", 2, Some(RESTARTED)).await;
    let t = Instant::now();
    cluster.agent(RESTARTED).restart().await.unwrap();
    cluster
        .agent(RESTARTED)
        .wait_readiness(200, DEADLINE)
        .await
        .unwrap();
    let fault = t.elapsed();
    cluster.wait_phase_ended("agent").await;
    phases.push(Phase {
        name: "agent",
        kills_jobs_on: Some(RESTARTED),
        fault,
        ended: submitted.elapsed(),
    });

    // One agent is cut off NATS, with jobs that outlast its lease: it stops them when its
    // lease runs out, and only then are they handed back and run elsewhere. First the
    // connection is closed (the agent sees it go); then it stays open but silent, as a network
    // that drops packets leaves it: the agent's writes still succeed, only the lack of echoes
    // tells it, and what each side sent meanwhile arrives, late, once the path heals.
    phases.push(cluster.partition("partition", Cut::Closed).await);
    phases.push(cluster.partition("silent", Cut::Silent).await);

    // The ledger and the state of record.
    let ledger = read_ledger(&cluster.ledger());
    let record = cluster.jobs_of_record().await;
    let logs = cluster.logs();
    assert_eq!(
        record.len(),
        10 * PHASE_JOBS + 2 * AGENTS.len() * SLOTS as usize,
        "{record:?}"
    );
    // Every job's verdict, so that a failure names all the jobs it hit.
    let mut wrong = Vec::new();
    for (name, job) in &record {
        let runs = ledger.get(name);
        let Some(Runs {
            ends, overlaps: 0, ..
        }) = runs
        else {
            wrong.push(format!(
                "{name} ran alongside a copy of itself, or never: {runs:?}"
            ));
            continue;
        };
        let [code] = ends.as_slice() else {
            wrong.push(format!(
                "{name} must have run to the end exactly once: {runs:?}"
            ));
            continue;
        };
        let state = if *code == 0 { "succeeded" } else { "failed" };
        if (job.state.as_str(), job.exit_code) != (state, Some(*code)) {
            wrong.push(format!(
                "{name}: the recorded outcome must be what ran: recorded {} (exit code {:?}), \
                 ran to exit code {code}",
                job.state, job.exit_code
            ));
        }
    }
    assert!(wrong.is_empty(), "{}\n{logs}", wrong.join("\n"));
    for phase in &phases {
        let jobs: Vec<_> = record
            .iter()
            .filter(|(name, _)| name.starts_with(&format!("{}-", phase.name)))
            .collect();
        let handed_back: Vec<_> = jobs
            .iter()
            .flat_map(|(name, job)| {
                let earlier = job.attempts.len().saturating_sub(1);
                job.attempts.iter().take(earlier).map(move |a| (name, a))
            })
            .collect();
        let rerun = jobs
            .iter()
            .filter(|(name, _)| ledger.get(*name).is_some_and(|r| r.starts > 1))
            .count();
        eprintln!(
            "chaos {:<13} fault {:>5.2} s, every job ended within {:>5.2} s of its submission, \
             {} attempts handed back, {rerun} jobs started again",
            phase.name,
            phase.fault.as_secs_f64(),
            phase.ended.as_secs_f64(),
            handed_back.len()
        );
        match phase.kills_jobs_on {
            None => assert!(
                handed_back.is_empty(),
                "{}: an observer's outage must not hand back healthy work: {handed_back:?}\n{logs}",
                phase.name
            ),
            Some(worker) => {
                assert!(
                    handed_back
                        .iter()
                        .all(|(_, (on, outcome))| on == worker && outcome == "lost"),
                    "{}: only {worker}'s attempts are handed back: {handed_back:?}\n{logs}",
                    phase.name
                );
                assert!(
                    (1..=SLOTS as usize).contains(&rerun),
                    "{}: the jobs {worker} ran, and only those, start again: {rerun}\n{logs}",
                    phase.name
                );
            }
        }
    }
    eprintln!(
        "chaos: {} jobs, {} ledger lines, {:.1} s in all",
        record.len(),
        cluster.ledger_lines(),
        started.elapsed().as_secs_f64()
    );
    cluster.pool.close().await;
    for agent in &mut cluster.agents {
        agent.kill().await;
    }
    cluster.gateway.kill().await;
    cluster.scheduler.kill().await;
    cluster.registry.kill().await;
    let _ = cluster.database.cleanup().await;
}
