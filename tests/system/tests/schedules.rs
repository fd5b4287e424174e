//! Schedules, proven against what really ran.
//!
//! The first two tests run every service as its own process (the gateway, two or one
//! scheduler replicas, the registry and an agent). Each scheduled job appends its job id to a
//! ledger file; the test compares the ledger with the ticks of record:
//!
//! - with two scheduler replicas, each SIGKILLed and restarted in turn, every tick of an
//!   every-second schedule fires exactly once: the ticks of record are consecutive seconds
//!   with no gap and no tick twice, and every fired tick's job ran exactly once;
//! - with the only scheduler down for longer than the catch-up window, the ticks inside the
//!   window fire once each when it is back, the older ones are recorded missed (one record,
//!   counting them), and missed plus fired account for every second of the outage.
//!
//! The others run the system in process: the overlap policies (`skip`, `allow`,
//! `cancel_previous`) against the jobs' own ledger, and the API (names, triggers, pause,
//! resume, pipelines, errors naming fields).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_proto::v1::schedule_service_client::ScheduleServiceClient;
use hodei_system_tests::processes::{self, ServiceProcess, backend_vars, vars};
use hodei_system_tests::{AgentSpec, TestSystem, shell_job};
use hodei_test_support::{TestDatabase, TestNats, wait_for};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(60);

type Schedules = ScheduleServiceClient<hodei_proto::AuthChannel>;

fn loopback_port() -> SocketAddr {
    processes::loopback_port().unwrap()
}

/// A job that appends its id to the ledger (and sleeps `secs` first).
fn ledger_job(name: &str, ledger: &Path, secs: f64) -> pb::JobSpec {
    shell_job(
        name,
        &format!(
            "sleep {secs}; echo \"$HODEI_JOB_ID\" >> '{}'",
            ledger.display()
        ),
    )
}

fn schedule_spec(name: &str, cron: &str, job: pb::JobSpec) -> pb::ScheduleSpec {
    pb::ScheduleSpec {
        name: name.to_owned(),
        cron: cron.to_owned(),
        target: Some(pb::schedule_spec::Target::Job(job)),
        overlap: pb::OverlapPolicy::Allow.into(),
        // Enough that no tick of a test is pruned, however slow the machine.
        history_limit: 1000,
        ..Default::default()
    }
}

async fn create(schedules: &mut Schedules, spec: pb::ScheduleSpec) -> pb::Schedule {
    schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap()
}

async fn pause(schedules: &mut Schedules, name: &str) {
    schedules
        .pause_schedule(pb::PauseScheduleRequest {
            schedule: name.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The ledger's job ids, with how many times each ran.
fn ledger(path: &Path) -> BTreeMap<String, usize> {
    let mut runs = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *runs.entry(line.trim().to_owned()).or_insert(0) += 1;
    }
    runs
}

/// One tick of record.
#[derive(Debug, Clone)]
struct Tick {
    tick: DateTime<Utc>,
    outcome: String,
    job_id: Option<String>,
    detail: String,
    /// How long after its time the tick was handled.
    delay: chrono::Duration,
}

/// A `schedule_ticks` row: tick, outcome, job, detail, handled at.
type TickRow = (
    DateTime<Utc>,
    String,
    Option<uuid::Uuid>,
    String,
    DateTime<Utc>,
);

async fn ticks(pool: &PgPool, name: &str) -> Vec<Tick> {
    let rows: Vec<TickRow> = sqlx::query_as(
        "SELECT t.tick, t.outcome, t.job_id, t.detail, t.handled_at FROM schedule_ticks t
         JOIN schedules s ON s.id = t.schedule_id WHERE s.name = $1 ORDER BY t.tick",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(tick, outcome, job_id, detail, handled_at)| Tick {
            tick,
            outcome,
            job_id: job_id.map(|j| j.to_string()),
            detail,
            delay: handled_at - tick,
        })
        .collect()
}

async fn fired(pool: &PgPool, name: &str) -> usize {
    ticks(pool, name)
        .await
        .iter()
        .filter(|t| t.outcome == "fired")
        .count()
}

/// Jobs of record by id: state.
async fn job_states(pool: &PgPool) -> BTreeMap<String, String> {
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as("SELECT id, state FROM jobs")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(id, s)| (id.to_string(), s))
        .collect()
}

/// The system as processes: gateway, registry, `schedulers` scheduler replicas, one agent.
struct Cluster {
    _nats: TestNats,
    _database: TestDatabase,
    dir: tempfile::TempDir,
    _gateway: ServiceProcess,
    _registry: ServiceProcess,
    schedulers: Vec<ServiceProcess>,
    _agent: ServiceProcess,
    schedules: Schedules,
    pool: PgPool,
}

impl Cluster {
    async fn start(schedulers: usize) -> Cluster {
        let nats = TestNats::start().await.unwrap();
        let database = TestDatabase::create().await.unwrap();
        let dir = tempfile::Builder::new()
            .prefix("hodei-schedules-")
            .tempdir()
            .unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let backends = |extra: &[(&str, String)]| backend_vars(&nats, &database, "info", extra);
        let grpc = loopback_port();
        let mut gateway = ServiceProcess::start(
            "api-gateway",
            "hodei-api-gateway",
            backends(&[("HODEI_GRPC_ADDR", grpc.to_string())]),
            loopback_port(),
            &logs,
        )
        .unwrap();
        gateway.wait_readiness(200, DEADLINE).await.unwrap();
        let mut registry = ServiceProcess::start(
            "registry",
            "hodei-registry",
            backends(&[("HODEI_HEARTBEAT_INTERVAL_MS", "250".to_owned())]),
            loopback_port(),
            &logs,
        )
        .unwrap();
        let mut replicas = Vec::new();
        for i in 0..schedulers {
            let mut scheduler = ServiceProcess::start(
                &format!("scheduler-{i}"),
                "hodei-scheduler",
                backends(&[
                    ("HODEI_SCHEDULE_POLL_MS", "100".to_owned()),
                    ("HODEI_PLACEMENT_RETRY_MS", "100".to_owned()),
                    ("HODEI_ACK_WAIT_MS", "2000".to_owned()),
                ]),
                loopback_port(),
                &logs,
            )
            .unwrap();
            scheduler.wait_readiness(200, DEADLINE).await.unwrap();
            replicas.push(scheduler);
        }
        registry.wait_readiness(200, DEADLINE).await.unwrap();
        let mut agent = ServiceProcess::start(
            "agent",
            "hodei-agent",
            vars(&[
                ("HODEI_NATS_URL", nats.url()),
                ("HODEI_WORKER_ID", "sched-agent".to_owned()),
                ("HODEI_MAX_CONCURRENT_JOBS", "16".to_owned()),
                (
                    "HODEI_WORK_DIR",
                    dir.path().join("work").display().to_string(),
                ),
                ("HODEI_HEARTBEAT_INTERVAL_MS", "250".to_owned()),
                ("HODEI_LOG", "warn".to_owned()),
            ]),
            loopback_port(),
            &logs,
        )
        .unwrap();
        agent.wait_readiness(200, DEADLINE).await.unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&database.url())
            .await
            .unwrap();
        let token = hodei_system_tests::issue_token(&pool, "default", hodei_domain::Role::Admin)
            .await
            .unwrap();
        let channel = Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let schedules =
            ScheduleServiceClient::new(hodei_proto::Bearer::new(Some(&token)).unwrap().on(channel));
        wait_for("the agent to be ready", DEADLINE, || async {
            let ready: i64 =
                sqlx::query_scalar("SELECT count(*) FROM workers WHERE status = 'ready'")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (ready == 1).then_some(())
        })
        .await
        .unwrap();
        Cluster {
            _nats: nats,
            _database: database,
            dir,
            _gateway: gateway,
            _registry: registry,
            schedulers: replicas,
            _agent: agent,
            schedules,
            pool,
        }
    }

    fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger")
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path().join("logs")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            all.push_str(&format!("--- {}\n", path.display()));
            for line in tail.into_iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }

    /// Waits until at least `count` ticks of `name` fired.
    async fn wait_fired(&self, name: &str, count: usize) {
        let pool = &self.pool;
        if let Err(e) = wait_for(
            &format!("{count} ticks of {name}"),
            DEADLINE,
            || async move { (fired(pool, name).await >= count).then_some(()) },
        )
        .await
        {
            panic!("{e}\n{}", self.logs());
        }
    }

    /// Waits until every job of record has ended, and each fired tick's job is in the ledger.
    async fn wait_all_ran(&self, name: &str) {
        let pool = &self.pool;
        let path = self.ledger();
        let path = &path;
        if let Err(e) = wait_for("every scheduled job to end", DEADLINE, || async move {
            let states = job_states(pool).await;
            let ended = states
                .values()
                .all(|s| !matches!(s.as_str(), "queued" | "assigned" | "running"));
            let ran = ledger(path);
            let all_in = ticks(pool, name)
                .await
                .iter()
                .filter_map(|t| t.job_id.clone())
                .all(|j| ran.contains_key(&j));
            (ended && all_in).then_some(())
        })
        .await
        {
            panic!("{e}\n{}", self.logs());
        }
    }
}

/// Checks the fired ticks are consecutive seconds and that each one's job ran exactly once.
fn assert_each_second_fired_once(ticks: &[Tick], ledger: &BTreeMap<String, usize>) {
    let fired: Vec<&Tick> = ticks.iter().filter(|t| t.outcome == "fired").collect();
    assert!(
        fired.iter().all(|t| t.tick.timestamp_subsec_nanos() == 0),
        "ticks fall on whole seconds: {fired:?}"
    );
    for pair in fired.windows(2) {
        assert_eq!(
            pair[1].tick - pair[0].tick,
            chrono::Duration::seconds(1),
            "a tick between {} and {} did not fire, or fired twice",
            pair[0].tick,
            pair[1].tick
        );
    }
    let jobs: BTreeSet<&str> = fired.iter().filter_map(|t| t.job_id.as_deref()).collect();
    assert_eq!(jobs.len(), fired.len(), "each tick started its own job");
    for job in &jobs {
        assert_eq!(
            ledger.get(*job),
            Some(&1),
            "job {job} must have run exactly once"
        );
    }
    assert_eq!(
        ledger.len(),
        jobs.len(),
        "the ledger has runs of no other job: {ledger:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_tick_fires_once_with_two_replicas_each_killed_and_restarted() {
    let mut cluster = Cluster::start(2).await;
    let name = "every-second";
    let spec = schedule_spec(
        name,
        "* * * * * *",
        ledger_job(name, &cluster.ledger(), 0.0),
    );
    create(&mut cluster.schedules, spec).await;
    cluster.wait_fired(name, 3).await;
    for replica in 0..2 {
        cluster.schedulers[replica].kill().await;
        let before = fired(&cluster.pool, name).await;
        // The other replica alone fires the next ticks.
        cluster.wait_fired(name, before + 3).await;
        cluster.schedulers[replica].restart().await.unwrap();
        cluster.schedulers[replica]
            .wait_readiness(200, DEADLINE)
            .await
            .unwrap();
        let before = fired(&cluster.pool, name).await;
        cluster.wait_fired(name, before + 3).await;
    }
    pause(&mut cluster.schedules, name).await;
    cluster.wait_all_ran(name).await;

    let ticks = ticks(&cluster.pool, name).await;
    assert!(
        ticks.iter().all(|t| t.outcome == "fired"),
        "no tick skipped or missed: {ticks:?}"
    );
    assert_each_second_fired_once(&ticks, &ledger(&cluster.ledger()));
    let states = job_states(&cluster.pool).await;
    assert!(
        states.values().all(|s| s == "succeeded"),
        "every job succeeded: {states:?}"
    );
    // A figure, not an assertion: how late ticks were handled (100 ms polls; the ticks
    // of the seconds a replica was being killed are handled by the other one).
    let mut delays: Vec<i64> = ticks.iter().map(|t| t.delay.num_milliseconds()).collect();
    delays.sort_unstable();
    eprintln!(
        "every_tick_fires_once: {} ticks from {} to {}, each run once; handled after their time by p50 {} ms, max {} ms",
        ticks.len(),
        ticks[0].tick,
        ticks[ticks.len() - 1].tick,
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticks_inside_the_catch_up_window_fire_after_downtime_and_older_ones_are_missed() {
    let mut cluster = Cluster::start(1).await;
    let name = "catching-up";
    let mut spec = schedule_spec(
        name,
        "* * * * * *",
        ledger_job(name, &cluster.ledger(), 0.0),
    );
    spec.catch_up_window_ms = 3_000;
    create(&mut cluster.schedules, spec).await;
    cluster.wait_fired(name, 2).await;
    cluster.schedulers[0].kill().await;
    let last_before = ticks(&cluster.pool, name).await.last().unwrap().tick;
    // Down for longer than the window: 8 ticks go by with no scheduler.
    let back_at = last_before + chrono::Duration::seconds(8);
    wait_for("8 ticks to pass with no scheduler", DEADLINE, || async {
        (Utc::now() > back_at).then_some(())
    })
    .await
    .unwrap();
    cluster.schedulers[0].restart().await.unwrap();
    cluster.schedulers[0]
        .wait_readiness(200, DEADLINE)
        .await
        .unwrap();
    let pool = &cluster.pool;
    wait_for(
        "the missed record and 2 ticks after it",
        DEADLINE,
        || async move {
            let ticks = ticks(pool, name).await;
            let missed = ticks.iter().position(|t| t.outcome == "missed")?;
            (ticks.len() > missed + 2).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    pause(&mut cluster.schedules, name).await;
    cluster.wait_all_ran(name).await;

    let ticks = ticks(&cluster.pool, name).await;
    let missed: Vec<&Tick> = ticks.iter().filter(|t| t.outcome == "missed").collect();
    assert_eq!(
        missed.len(),
        1,
        "one record for the run of missed ticks: {ticks:?}"
    );
    let count: i64 = missed[0]
        .detail
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The record sits at the last missed tick; the first missed is the one after `last_before`.
    let first_missed = missed[0].tick - chrono::Duration::seconds(count - 1);
    assert_eq!(
        first_missed,
        last_before + chrono::Duration::seconds(1),
        "the missed ticks start right after the last fired before the outage: {ticks:?}"
    );
    let after: Vec<&Tick> = ticks
        .iter()
        .filter(|t| t.outcome == "fired" && t.tick > missed[0].tick)
        .collect();
    assert_eq!(
        after[0].tick - missed[0].tick,
        chrono::Duration::seconds(1),
        "the tick after the missed ones fired: every second of the outage is accounted for"
    );
    assert!(
        count >= 4,
        "at least the ticks older than the 3 s window were missed: {count}"
    );
    assert_each_second_fired_once(
        &ticks
            .iter()
            .filter(|t| t.tick > missed[0].tick)
            .cloned()
            .collect::<Vec<_>>(),
        &ledger(&cluster.ledger())
            .into_iter()
            .filter(|(job, _)| {
                ticks
                    .iter()
                    .any(|t| t.tick > missed[0].tick && t.job_id.as_deref() == Some(job))
            })
            .collect(),
    );
    let runs = ledger(&cluster.ledger());
    let fired_jobs: BTreeSet<String> = ticks.iter().filter_map(|t| t.job_id.clone()).collect();
    assert_eq!(
        runs.keys().cloned().collect::<BTreeSet<_>>(),
        fired_jobs,
        "every fired tick's job ran, and nothing else"
    );
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    eprintln!(
        "catch_up: {count} ticks missed, then {} fired, each once",
        after.len()
    );
}

// --- in process: overlap policies and the API --------------------------------------------------

fn clients(system: &TestSystem) -> (Schedules, JobServiceClient<hodei_proto::AuthChannel>) {
    let channel = hodei_proto::Bearer::new(Some(&system.admin_token))
        .unwrap()
        .on(system.channel.clone());
    (
        ScheduleServiceClient::new(channel.clone()),
        JobServiceClient::new(channel),
    )
}

/// Triggers schedule `name` by hand and returns the tick it answers.
async fn trigger(schedules: &Schedules, name: &str) -> pb::ScheduleTick {
    trigger_keyed(schedules, name, "").await.unwrap()
}

/// Triggers schedule `name` by hand with idempotency `key` (none when empty).
async fn trigger_keyed(
    schedules: &Schedules,
    name: &str,
    key: &str,
) -> Result<pb::ScheduleTick, tonic::Status> {
    Ok(schedules
        .clone()
        .trigger_schedule(pb::TriggerScheduleRequest {
            schedule: name.to_owned(),
            idempotency_key: key.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .tick
        .unwrap())
}

async fn get(schedules: &mut Schedules, name: &str) -> pb::Schedule {
    schedules
        .get_schedule(pb::GetScheduleRequest {
            schedule: name.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap()
}

/// A job that holds an exclusive lock on `lock` while it runs `secs`, writing `overlap` to the
/// ledger when another run of the schedule holds it.
fn locking_job(name: &str, dir: &Path, secs: u32) -> pb::JobSpec {
    let ledger = dir.join(format!("{name}.ledger"));
    let lock = dir.join(format!("{name}.lock"));
    shell_job(
        name,
        &format!(
            "exec 9>>'{lock}'; flock -n 9 || echo overlap >> '{ledger}'; echo \"start $HODEI_JOB_ID\" >> '{ledger}'; sleep {secs}; echo \"end $HODEI_JOB_ID\" >> '{ledger}'",
            lock = lock.display(),
            ledger = ledger.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_overlap_policy_does_what_it_says() {
    let system = TestSystem::start(&[AgentSpec {
        id: "overlap-agent",
        labels: "",
        slots: 16,
    }])
    .await
    .unwrap();
    let (mut schedules, _) = clients(&system);
    let dir = tempfile::tempdir().unwrap();
    for (name, overlap, secs) in [
        ("skipper", pb::OverlapPolicy::Skip, 4),
        ("allower", pb::OverlapPolicy::Allow, 4),
        ("replacer", pb::OverlapPolicy::CancelPrevious, 60),
    ] {
        let mut spec = schedule_spec(name, "* * * * * *", locking_job(name, dir.path(), secs));
        spec.overlap = overlap.into();
        create(&mut schedules, spec).await;
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&system.database.url())
        .await
        .unwrap();
    let pool = &pool;
    wait_for(
        "each schedule to have handled 6 ticks",
        DEADLINE,
        || async move {
            for name in ["skipper", "allower", "replacer"] {
                if ticks(pool, name).await.len() < 6 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
    for name in ["skipper", "allower", "replacer"] {
        pause(&mut schedules, name).await;
    }

    // skip: the ticks while a job ran were skipped, naming it; no two runs at once.
    let skipper = ticks(pool, "skipper").await;
    let skipped: Vec<&Tick> = skipper.iter().filter(|t| t.outcome == "skipped").collect();
    assert!(skipped.len() >= 2, "{skipper:?}");
    let first_job = skipper[0].job_id.clone().unwrap();
    assert!(
        skipped[0].detail.contains(&first_job),
        "a skipped tick names the job still going: {}",
        skipped[0].detail
    );
    // allow: every tick fired, and their jobs ran at the same time.
    let allower = ticks(pool, "allower").await;
    assert!(allower.iter().all(|t| t.outcome == "fired"), "{allower:?}");
    // cancel_previous: every tick fired; each job but the newest was cancelled by the next.
    // (A poll that comes late finds two ticks due at once, on a loaded machine: the older is
    // then recorded replaced by the newer, as the catch-up of `cancel_previous` does.)
    let replacer = ticks(pool, "replacer").await;
    assert!(
        replacer.iter().all(|t| t.outcome == "fired"
            || (t.outcome == "skipped" && t.detail.contains("replaced by the later tick"))),
        "{replacer:?}"
    );
    assert!(
        replacer.iter().filter(|t| t.outcome == "fired").count() >= 3,
        "{replacer:?}"
    );
    let mut jobs = JobServiceClient::new(
        hodei_proto::Bearer::new(Some(&system.admin_token))
            .unwrap()
            .on(system.channel.clone()),
    );
    let replaced: Vec<String> = replacer[..replacer.len() - 1]
        .iter()
        .filter_map(|t| t.job_id.clone())
        .collect();
    // The history says what a firing cancelled, as its event and the trigger's answer do.
    assert!(
        replacer.iter().any(|t| t.outcome == "fired"
            && replaced
                .iter()
                .any(|job| t.detail == format!("cancelled job {job}"))),
        "{replacer:?}"
    );
    for id in &replaced {
        let id = id.clone();
        let job = wait_for("a replaced job to end", DEADLINE, || {
            let mut jobs = jobs.clone();
            let id = id.clone();
            async move {
                let job = jobs
                    .get_job(pb::GetJobRequest {
                        job_id: id,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .job?;
                (job.state == pb::JobState::Cancelled as i32).then_some(job)
            }
        })
        .await
        .unwrap();
        // A running job gets `cancel_requested` with the reason, a queued one ends
        // `cancelled` with it at once.
        let why: String = sqlx::query_scalar(
            "SELECT string_agg(data::text, ' ') FROM job_events WHERE job_id = $1::uuid",
        )
        .bind(&job.id)
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(why.contains("replaced by the tick"), "{why}");
    }
    // Stop the last runs, then read the ledgers once nothing runs.
    for name in ["skipper", "allower", "replacer"] {
        schedules
            .delete_schedule(pb::DeleteScheduleRequest {
                schedule: name.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let _ = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: replacer.last().unwrap().job_id.clone().unwrap(),
            reason: "test over".to_owned(),
        })
        .await;
    wait_for("the skip and allow jobs to end", DEADLINE, || async move {
        let states = job_states(pool).await;
        let going: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE state IN ('queued', 'assigned', 'running')
             AND name IN ('skipper', 'allower')",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        (going == 0 && !states.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let read =
        |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.ledger"))).unwrap();
    assert!(
        !read("skipper").contains("overlap"),
        "skip never runs two at once:\n{}",
        read("skipper")
    );
    assert!(
        read("allower").contains("overlap"),
        "allow runs them side by side:\n{}",
        read("allower")
    );
    eprintln!(
        "overlap: skip {} fired {} skipped; allow {} fired; cancel_previous {} fired, {} replaced",
        skipper.len() - skipped.len(),
        skipped.len(),
        allower.len(),
        replacer.len(),
        replaced.len()
    );
    pool.close().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schedule_api_names_fields_triggers_pauses_and_runs_pipelines() {
    let system = TestSystem::start(&[AgentSpec {
        id: "api-agent",
        labels: "",
        slots: 4,
    }])
    .await
    .unwrap();
    let (mut schedules, _) = clients(&system);
    // Every invalid field is named, with its path.
    let mut bad = schedule_spec("nightly", "61 * * * *", shell_job("x", "true"));
    bad.time_zone = "Mars/Olympus".to_owned();
    bad.catch_up_window_ms = 1;
    let err = schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: Some(bad),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for field in ["spec.cron", "spec.time_zone", "spec.catch_up_window_ms"] {
        assert!(err.message().contains(field), "{}", err.message());
    }
    let mut keyed = shell_job("x", "true");
    keyed.idempotency_key = "mine".to_owned();
    let err = schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: Some(schedule_spec("keyed", "@daily", keyed)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("spec.target.idempotency_key"),
        "{}",
        err.message()
    );

    // Keys that start like a tick's are the schedules' own.
    let mut stolen = shell_job("x", "true");
    stolen.idempotency_key = format!("schedule-{}-0", uuid::Uuid::now_v7());
    let err = system.submit(stolen).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("spec.idempotency_key"),
        "{}",
        err.message()
    );
    // An expression with no tick to come is refused.
    let err = schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: Some(schedule_spec("never", "0 0 30 2 *", shell_job("x", "true"))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("spec.cron"), "{}", err.message());

    // A paused daily pipeline schedule, in a time zone, triggered by hand.
    let pipeline = pb::PipelineSpec {
        name: "nightly-build".to_owned(),
        steps: vec![
            pb::PipelineStep {
                name: "build".to_owned(),
                job: Some(shell_job("", "echo built")),
                ..Default::default()
            },
            pb::PipelineStep {
                name: "test".to_owned(),
                needs: vec!["build".to_owned()],
                job: Some(shell_job("", "echo tested")),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let created = schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: Some(pb::ScheduleSpec {
                name: "nightly".to_owned(),
                cron: "0 3 * * *".to_owned(),
                time_zone: "Europe/Madrid".to_owned(),
                target: Some(pb::schedule_spec::Target::Pipeline(pipeline)),
                ..Default::default()
            }),
            paused: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(created.paused);
    let spec = created.spec.clone().unwrap();
    assert_eq!(
        spec.overlap,
        pb::OverlapPolicy::Skip as i32,
        "skip by default"
    );
    assert_eq!(spec.catch_up_window_ms, 60_000);
    assert_eq!(spec.history_limit, 100);
    let next = created.next_tick.unwrap();
    let next = DateTime::from_timestamp(next.seconds, 0).unwrap();
    let madrid = next.with_timezone(&chrono_tz::Europe::Madrid);
    assert_eq!(madrid.format("%H:%M:%S").to_string(), "03:00:00");

    let err = schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: created.spec.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{}", err.message());

    let triggered = schedules
        .trigger_schedule(pb::TriggerScheduleRequest {
            schedule: "nightly".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tick
        .unwrap();
    assert_eq!(triggered.outcome, "triggered");
    let run = system
        .pipelines
        .clone()
        .get_pipeline_run(pb::GetPipelineRunRequest {
            run_id: triggered.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.spec.unwrap().name, "nightly-build");
    let run_id = triggered.run_id.clone();
    wait_for("the triggered run to succeed", DEADLINE, || {
        let mut pipelines = system.pipelines.clone();
        let run_id = run_id.clone();
        async move {
            let run = pipelines
                .get_pipeline_run(pb::GetPipelineRunRequest {
                    run_id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .run?;
            (run.state == pb::PipelineState::Succeeded as i32).then_some(())
        }
    })
    .await
    .unwrap();

    // Get shows the tick; resume moves the next tick on; list finds it; delete forgets it.
    let got = get(&mut schedules, "nightly").await;
    assert_eq!(got.recent_ticks.len(), 1);
    assert_eq!(got.recent_ticks[0].run_id, triggered.run_id);
    let resumed = schedules
        .resume_schedule(pb::ResumeScheduleRequest {
            schedule: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(!resumed.paused);
    let listed = schedules
        .list_schedules(pb::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert_eq!(listed.len(), 1);
    schedules
        .delete_schedule(pb::DeleteScheduleRequest {
            schedule: "nightly".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = schedules
        .get_schedule(pb::GetScheduleRequest {
            schedule: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Another tenant does not see it.
    let token = system
        .token("other", hodei_domain::Role::Submitter)
        .await
        .unwrap();
    let mut theirs = ScheduleServiceClient::new(
        hodei_proto::Bearer::new(Some(&token))
            .unwrap()
            .on(system.channel.clone()),
    );
    let created = create(
        &mut schedules,
        schedule_spec("ours", "@hourly", shell_job("x", "true")),
    )
    .await;
    let err = theirs
        .trigger_schedule(pb::TriggerScheduleRequest {
            schedule: created.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The history keeps the newest `history_limit` ticks once their jobs have ended.
    let mut short = schedule_spec("short-history", "@yearly", shell_job("x", "true"));
    short.history_limit = 2;
    create(&mut schedules, short).await;
    let mut fired = Vec::new();
    for _ in 0..3 {
        fired.push(trigger(&schedules, "short-history").await.job_id);
    }
    for id in &fired {
        system.wait_terminal(id, DEADLINE).await.unwrap();
    }
    fired.push(trigger(&schedules, "short-history").await.job_id);
    let kept: Vec<String> = get(&mut schedules, "short-history")
        .await
        .recent_ticks
        .into_iter()
        .map(|t| t.job_id)
        .collect();
    assert_eq!(kept, [fired[3].clone(), fired[2].clone()], "newest first");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trigger_retried_with_its_idempotency_key_fires_once() {
    let system = TestSystem::start(&[AgentSpec {
        id: "trigger-agent",
        labels: "",
        slots: 4,
    }])
    .await
    .unwrap();
    let (schedules, _) = clients(&system);
    let dir = tempfile::tempdir().unwrap();
    let ledger_path = dir.path().join("ledger");
    create(
        &mut schedules.clone(),
        schedule_spec(
            "by-hand",
            "@yearly",
            ledger_job("by-hand", &ledger_path, 0.0),
        ),
    )
    .await;
    let trigger = |key: String| {
        let schedules = schedules.clone();
        async move { trigger_keyed(&schedules, "by-hand", &key).await }
    };
    let err = trigger("k".repeat(257)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );

    // Concurrent copies of one trigger (a client retrying while its first call is on its way)
    // and a retry after: one tick, one job.
    let copies = futures::future::join_all((0..4).map(|_| trigger("backup-1".to_owned()))).await;
    let mut ticks: Vec<pb::ScheduleTick> = copies.into_iter().map(Result::unwrap).collect();
    ticks.push(trigger("backup-1".to_owned()).await.unwrap());
    let first = ticks[0].clone();
    assert_eq!(first.outcome, "triggered");
    assert!(!first.job_id.is_empty());
    assert!(ticks.iter().all(|t| *t == first), "{ticks:?}");
    // Another key fires again.
    let second = trigger("backup-2".to_owned()).await.unwrap();
    assert_ne!(second.job_id, first.job_id);
    for id in [&first.job_id, &second.job_id] {
        let job = system.wait_terminal(id, DEADLINE).await.unwrap();
        assert_eq!(job.state(), pb::JobState::Succeeded, "{job:?}");
    }
    let triggered: Vec<String> = get(&mut schedules.clone(), "by-hand")
        .await
        .recent_ticks
        .into_iter()
        .map(|t| t.job_id)
        .collect();
    assert_eq!(triggered, [second.job_id.clone(), first.job_id.clone()]);
    let runs = ledger(&ledger_path);
    assert_eq!(
        runs,
        BTreeMap::from([(first.job_id, 1), (second.job_id, 1)]),
        "each trigger's job ran once, and nothing else ran"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_is_skipped_while_its_tenant_is_at_its_queue_quota() {
    let system = TestSystem::start(&[AgentSpec {
        id: "quota-agent",
        labels: "",
        slots: 4,
    }])
    .await
    .unwrap();
    let (schedules, mut jobs) = clients(&system);
    create(
        &mut schedules.clone(),
        schedule_spec("under-quota", "@yearly", shell_job("under-quota", "true")),
    )
    .await;
    // A queue quota of one, taken by a job no worker can take.
    system
        .set_tenant_policy(
            "default",
            pb::TenantPolicy {
                weight: 1,
                max_queued_jobs: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut waiting = shell_job("waiting", "true");
    waiting
        .required_labels
        .insert("pool".into(), "nowhere".into());
    let waiting = system.submit(waiting).await.unwrap();

    // Held as a submission would be refused: skipped, naming the quota, nothing started.
    let held = trigger(&schedules, "under-quota").await;
    assert_eq!(held.outcome, "skipped", "{held:?}");
    assert!(
        held.detail
            .contains("tenant default is at its quota max_queued_jobs (1 of 1 queued)"),
        "{held:?}"
    );
    assert!(held.job_id.is_empty() && held.run_id.is_empty(), "{held:?}");
    // A trigger skipped so keeps its key: retried with it, it answers the same skip.
    let first = trigger_keyed(&schedules, "under-quota", "full-queue")
        .await
        .unwrap();
    assert_eq!(first.outcome, "skipped", "{first:?}");
    let again = trigger_keyed(&schedules, "under-quota", "full-queue")
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(
        job_states(&system.database.connect().await.unwrap())
            .await
            .len(),
        1,
        "only the waiting job exists"
    );

    // With room again, the next tick fires and its job runs.
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: waiting.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    system.wait_terminal(&waiting.id, DEADLINE).await.unwrap();
    let fired = trigger(&schedules, "under-quota").await;
    assert_eq!(fired.outcome, "triggered", "{fired:?}");
    let job = system.wait_terminal(&fired.job_id, DEADLINE).await.unwrap();
    assert_eq!(job.state(), pb::JobState::Succeeded, "{job:?}");
    let recent: Vec<String> = get(&mut schedules.clone(), "under-quota")
        .await
        .recent_ticks
        .into_iter()
        .map(|t| t.outcome)
        .collect();
    assert_eq!(recent, ["triggered", "skipped", "skipped"]);

    // Under `cancel_previous` the queued job a tick replaces leaves room for its own: a quota
    // of one never stalls such a schedule.
    let mut stuck = shell_job("stuck", "true");
    stuck
        .required_labels
        .insert("pool".into(), "nowhere".into());
    let mut replacing = schedule_spec("replacing", "@yearly", stuck);
    replacing.overlap = pb::OverlapPolicy::CancelPrevious.into();
    create(&mut schedules.clone(), replacing).await;
    let before = trigger(&schedules, "replacing").await;
    assert_eq!(before.outcome, "triggered", "{before:?}");
    let after = trigger(&schedules, "replacing").await;
    assert_eq!(after.outcome, "triggered", "{after:?}");
    let replaced = system
        .wait_terminal(&before.job_id, DEADLINE)
        .await
        .unwrap();
    assert_eq!(replaced.state(), pb::JobState::Cancelled, "{replaced:?}");

    // The queue still full, a pipeline's tick is skipped as `SubmitPipeline` is refused, and
    // fires once there is room.
    let pipeline = pb::PipelineSpec {
        name: "at-quota".to_owned(),
        steps: vec![pb::PipelineStep {
            name: "only".to_owned(),
            job: Some(shell_job("", "true")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut piped = schedule_spec("piped", "@yearly", shell_job("x", "true"));
    piped.target = Some(pb::schedule_spec::Target::Pipeline(pipeline));
    create(&mut schedules.clone(), piped).await;
    let held = trigger(&schedules, "piped").await;
    assert_eq!(held.outcome, "skipped", "{held:?}");
    assert!(
        held.detail.contains("max_queued_jobs (1 of 1 queued)") && held.run_id.is_empty(),
        "{held:?}"
    );
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: after.job_id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    system.wait_terminal(&after.job_id, DEADLINE).await.unwrap();
    let run = trigger(&schedules, "piped").await;
    assert_eq!(run.outcome, "triggered", "{run:?}");
    assert!(!run.run_id.is_empty(), "{run:?}");

    // Under `cancel_previous`, the queued jobs of the run a tick replaces leave room for its
    // own, as the job a job schedule's tick replaces does.
    let pool = system.database.connect().await.unwrap();
    wait_for("the queue to empty", DEADLINE, || {
        let pool = pool.clone();
        async move {
            let queued: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'queued'")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (queued == 0).then_some(())
        }
    })
    .await
    .unwrap();
    let mut stuck_step = shell_job("", "true");
    stuck_step
        .required_labels
        .insert("pool".into(), "nowhere".into());
    let mut runs = schedule_spec("replacing-run", "@yearly", shell_job("x", "true"));
    runs.target = Some(pb::schedule_spec::Target::Pipeline(pb::PipelineSpec {
        name: "replacing-run".to_owned(),
        steps: vec![pb::PipelineStep {
            name: "only".to_owned(),
            job: Some(stuck_step),
            ..Default::default()
        }],
        ..Default::default()
    }));
    runs.overlap = pb::OverlapPolicy::CancelPrevious.into();
    create(&mut schedules.clone(), runs).await;
    let first = trigger(&schedules, "replacing-run").await;
    assert_eq!(first.outcome, "triggered", "{first:?}");
    let second = trigger(&schedules, "replacing-run").await;
    assert_eq!(second.outcome, "triggered", "{second:?}");
    assert_ne!(first.run_id, second.run_id);
    system.stop().await;
}
