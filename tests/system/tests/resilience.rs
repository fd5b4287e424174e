//! Resilience end to end, with real NATS, real PostgreSQL and real processes: scheduler
//! replicas racing for the same workers never over-commit one, a crashed replica loses
//! nothing, the system recovers from a NATS restart and a PostgreSQL outage, and a lost agent
//! is replaced while the attempt it still runs is killed and its late report rejected.
//!
//! The checks read the state of record (PostgreSQL) directly: every attempt's
//! `[assigned_at, finished_at)` interval and every job's terminal events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use hodei_messaging::AgentCommand;
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_system_tests::mute::MuteWorker;
use hodei_system_tests::shell_job as script;
use hodei_system_tests::{AgentSpec, HEARTBEAT_MS, SystemOptions, TestSystem};
use hodei_test_support::wait_for;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// The job states (and event types) that end a job.
const TERMINAL_STATES: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];
/// [`TERMINAL_STATES`] as an SQL list.
const TERMINAL: &str = "'succeeded', 'failed', 'timed_out', 'cancelled'";

/// Agents `agent-0` .. `agent-9` (AgentSpec ids are `&'static str`).
const AGENT_IDS: [&str; 10] = [
    "agent-0", "agent-1", "agent-2", "agent-3", "agent-4", "agent-5", "agent-6", "agent-7",
    "agent-8", "agent-9",
];

fn agents(count: usize, slots: u32) -> Vec<AgentSpec> {
    AGENT_IDS
        .iter()
        .take(count)
        .map(|id| AgentSpec {
            id,
            labels: "",
            slots,
        })
        .collect()
}

/// Submits `specs` from `tasks` concurrent clients; returns the ids of the accepted jobs, and
/// how many submissions were refused with UNAVAILABLE when `unavailable_ok` (any other error
/// fails the test).
async fn submit_all(
    client: JobServiceClient<hodei_proto::AuthChannel>,
    specs: Vec<pb::JobSpec>,
    tasks: usize,
    unavailable_ok: bool,
) -> (Vec<String>, usize) {
    let mut shares: Vec<Vec<pb::JobSpec>> = (0..tasks).map(|_| Vec::new()).collect();
    for (i, spec) in specs.into_iter().enumerate() {
        shares[i % tasks].push(spec);
    }
    let handles: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                let mut refused = 0;
                for spec in share {
                    let request = pb::SubmitJobRequest {
                        spec: Some(spec),
                        tenant: String::new(),
                    };
                    match client.submit_job(request).await {
                        Ok(response) => ids.push(response.into_inner().job.unwrap().id),
                        Err(status)
                            if unavailable_ok && status.code() == tonic::Code::Unavailable =>
                        {
                            refused += 1;
                        }
                        Err(status) => panic!("submission failed: {status:?}"),
                    }
                }
                (ids, refused)
            })
        })
        .collect();
    let mut ids = Vec::new();
    let mut refused = 0;
    for handle in handles {
        let (share, share_refused) = handle.await.unwrap();
        ids.extend(share);
        refused += share_refused;
    }
    (ids, refused)
}

/// A small pool of the test's own on the system's database (separate from the services').
async fn db_pool(system: &TestSystem) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&system.database.url())
        .await
        .unwrap()
}

/// How many jobs are in each state; `None` while PostgreSQL does not answer.
async fn state_counts(pool: &PgPool) -> Option<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(pool)
            .await
            .ok()?;
    Some(rows.into_iter().collect())
}

async fn terminal_count(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM jobs WHERE state IN ({TERMINAL})"
    )))
    .fetch_one(pool)
    .await
    .ok()
}

/// Waits until `expected` jobs have ended; returns the states seen then.
async fn wait_all_ended(
    pool: &PgPool,
    expected: usize,
    deadline: Duration,
) -> BTreeMap<String, i64> {
    let result = wait_for(
        &format!("{expected} jobs to end"),
        deadline,
        || async move {
            let counts = state_counts(pool).await?;
            let ended: i64 = counts
                .iter()
                .filter(|(state, _)| TERMINAL_STATES.contains(&state.as_str()))
                .map(|(_, n)| n)
                .sum();
            (ended >= expected as i64).then_some(counts)
        },
    )
    .await;
    match result {
        Ok(counts) => counts,
        Err(e) => panic!("{e}; states now: {:?}", state_counts(pool).await),
    }
}

/// One attempt as stored in `jobs.attempts`, with times in microseconds since the epoch.
#[derive(Debug, Clone, sqlx::FromRow)]
struct AttemptRow {
    job_id: String,
    worker_id: String,
    assigned_us: i64,
    finished_us: Option<i64>,
    /// `exited`, `lost`, ... (`None` while the attempt runs).
    outcome: Option<String>,
}

async fn attempt_rows(pool: &PgPool) -> Vec<AttemptRow> {
    sqlx::query_as(
        "SELECT j.id::text AS job_id, a->>'worker_id' AS worker_id,
                (extract(epoch FROM (a->>'assigned_at')::timestamptz) * 1000000)::bigint
                    AS assigned_us,
                (extract(epoch FROM (a->>'finished_at')::timestamptz) * 1000000)::bigint
                    AS finished_us,
                a->'outcome'->>'kind' AS outcome
         FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(j.attempts) a
         ORDER BY j.id, (a->>'attempt')::bigint",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// How many attempts ended each way.
fn outcomes(rows: &[AttemptRow]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for row in rows {
        let kind = row.outcome.clone().unwrap_or_else(|| "none".to_owned());
        *counts.entry(kind).or_default() += 1;
    }
    counts
}

/// The most `[start, end)` intervals open at one instant.
fn max_overlap(intervals: &[(i64, i64)]) -> usize {
    let mut points: Vec<(i64, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // At equal times ends (-1) sort before starts (+1): the intervals are half-open.
    points.sort_unstable();
    let (mut open, mut max) = (0i32, 0i32);
    for (_, delta) in points {
        open += delta;
        max = max.max(open);
    }
    usize::try_from(max).unwrap_or_default()
}

/// Every job ends exactly once: one terminal event per job in `job_events`.
async fn assert_each_job_ends_once(pool: &PgPool, expected_jobs: usize) {
    let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT j.id::text, count(e.seq) FROM jobs j
         LEFT JOIN job_events e ON e.job_id = j.id AND e.type IN ({TERMINAL})
         GROUP BY j.id"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), expected_jobs);
    let wrong: Vec<_> = rows.iter().filter(|(_, ends)| *ends != 1).collect();
    assert!(
        wrong.is_empty(),
        "jobs without exactly one terminal event: {wrong:?}"
    );
}

/// Every job in the database succeeded.
async fn assert_all_succeeded(pool: &PgPool, expected_jobs: usize) {
    let counts = state_counts(pool).await.unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([("succeeded".to_owned(), expected_jobs as i64)]),
        "job states"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_never_overcommit_a_worker() {
    const JOBS: usize = 300;
    const SLOTS: u32 = 2;
    let started = Instant::now();
    let options = SystemOptions {
        schedulers: 2,
        ..SystemOptions::default()
    };
    let system = TestSystem::start_with(&agents(10, SLOTS), options)
        .await
        .unwrap();
    let pool = db_pool(&system).await;
    let specs = (0..JOBS)
        .map(|i| script(&format!("short-{i}"), &format!("sleep 0.0{}", i % 5)))
        .collect();
    let (ids, _) = submit_all(system.jobs.clone(), specs, 4, false).await;
    assert_eq!(ids.len(), JOBS);
    wait_all_ended(&pool, JOBS, Duration::from_secs(60)).await;

    assert_all_succeeded(&pool, JOBS).await;
    assert_each_job_ends_once(&pool, JOBS).await;
    let rows = attempt_rows(&pool).await;
    let mut by_worker: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for row in &rows {
        let finished = row
            .finished_us
            .unwrap_or_else(|| panic!("attempt never finished: {row:?}"));
        by_worker
            .entry(row.worker_id.clone())
            .or_default()
            .push((row.assigned_us, finished));
    }
    for (worker, intervals) in &by_worker {
        let max = max_overlap(intervals);
        assert!(
            max <= SLOTS as usize,
            "worker {worker} held {max} attempts at once with {SLOTS} slots"
        );
    }
    // Both replicas had work to race for: the load was spread over the fleet.
    assert!(by_worker.len() >= 5, "attempts per worker: {by_worker:?}");
    eprintln!(
        "two_schedulers_never_overcommit_a_worker: {JOBS} jobs, attempts {:?} on {} workers in {:?}",
        outcomes(&rows),
        by_worker.len(),
        started.elapsed()
    );
    pool.close().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_scheduler_replica_loses_nothing() {
    const JOBS: usize = 500;
    let started = Instant::now();
    let options = SystemOptions {
        schedulers: 2,
        ack_wait_ms: 2_000,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(&agents(4, 4), options)
        .await
        .unwrap();
    let pool = db_pool(&system).await;
    let specs = (0..JOBS)
        .map(|i| script(&format!("true-{i}"), "true"))
        .collect();
    let submitting = tokio::spawn(submit_all(system.jobs.clone(), specs, 4, false));
    wait_for("100 jobs to end", Duration::from_secs(60), || {
        let pool = &pool;
        async move { (terminal_count(pool).await? >= 100).then_some(()) }
    })
    .await
    .unwrap();
    let crashed_at = started.elapsed();
    system.crash_scheduler(0);
    let (ids, _) = submitting.await.unwrap();
    assert_eq!(ids.len(), JOBS);
    wait_all_ended(&pool, JOBS, Duration::from_secs(60)).await;

    assert_all_succeeded(&pool, JOBS).await;
    assert_each_job_ends_once(&pool, JOBS).await;
    let rows = attempt_rows(&pool).await;
    let mut by_job: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    for row in &rows {
        let finished = row
            .finished_us
            .unwrap_or_else(|| panic!("attempt never finished: {row:?}"));
        by_job
            .entry(row.job_id.as_str())
            .or_default()
            .push((row.assigned_us, finished));
    }
    assert_eq!(by_job.len(), JOBS, "every job has attempts");
    for (job, intervals) in &by_job {
        assert_eq!(
            max_overlap(intervals),
            1,
            "job {job} had overlapping attempts: {intervals:?}"
        );
    }
    let retried = by_job.values().filter(|a| a.len() > 1).count();
    eprintln!(
        "a_crashed_scheduler_replica_loses_nothing: crashed replica 0 at {crashed_at:?}, \
         {JOBS} jobs ({retried} with more than one attempt, attempts {:?}) in {:?}",
        outcomes(&rows),
        started.elapsed()
    );
    pool.close().await;
    system.stop().await;
}

/// Jobs for the outage tests: long enough that the run spans the outage on 4 slots.
fn outage_jobs(prefix: &str, count: usize) -> Vec<pb::JobSpec> {
    (0..count)
        .map(|i| script(&format!("{prefix}-{i}"), "sleep 0.2"))
        .collect()
}

/// The services of the outage tests' systems (two agents) that check PostgreSQL, and all.
const PG_SERVICES: [&str; 3] = ["api-gateway", "scheduler", "registry"];
const ALL_SERVICES: [&str; 5] = ["api-gateway", "scheduler", "registry", "agent-0", "agent-1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restart_mid_run() {
    const JOBS: usize = 60;
    let started = Instant::now();
    let mut system = TestSystem::start(&agents(2, 2)).await.unwrap();
    let pool = db_pool(&system).await;
    let (ids, _) = submit_all(system.jobs.clone(), outage_jobs("nats", JOBS), 4, false).await;
    assert_eq!(ids.len(), JOBS);
    wait_for("10 jobs to end", Duration::from_secs(30), || {
        let pool = &pool;
        async move { (terminal_count(pool).await? >= 10).then_some(()) }
    })
    .await
    .unwrap();
    let before = terminal_count(&pool).await.unwrap();

    system.nats.stop().await;
    // NATS stays down until every service has noticed (its readiness says so).
    system
        .wait_readiness(&ALL_SERVICES, 503, Duration::from_secs(30))
        .await
        .unwrap();
    system.nats.restart().await.unwrap();
    let restarted_at = started.elapsed();

    wait_all_ended(&pool, JOBS, Duration::from_secs(60)).await;
    assert!(
        before < JOBS as i64,
        "the outage came after every job had ended"
    );
    assert_all_succeeded(&pool, JOBS).await;
    assert_each_job_ends_once(&pool, JOBS).await;
    eprintln!(
        "nats_restart_mid_run: {before} of {JOBS} jobs ended before the outage, NATS back at \
         {restarted_at:?}, all ended at {:?}",
        started.elapsed()
    );
    pool.close().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_mid_run() {
    const JOBS: usize = 60;
    let started = Instant::now();
    let system = TestSystem::start(&agents(2, 2)).await.unwrap();
    let pool = db_pool(&system).await;
    let (mut ids, _) = submit_all(system.jobs.clone(), outage_jobs("pg", JOBS), 4, false).await;
    assert_eq!(ids.len(), JOBS);
    wait_for("10 jobs to end", Duration::from_secs(30), || {
        let pool = &pool;
        async move { (terminal_count(pool).await? >= 10).then_some(()) }
    })
    .await
    .unwrap();
    let before = terminal_count(&pool).await.unwrap();

    system.database.set_available(false).await.unwrap();
    // Submissions while the database is away may be refused (UNAVAILABLE); only the
    // accepted ones count.
    let (during, refused) =
        submit_all(system.jobs.clone(), outage_jobs("pg-during", 5), 1, true).await;
    ids.extend(during);
    // PostgreSQL stays away until every service that uses it has noticed.
    system
        .wait_readiness(&PG_SERVICES, 503, Duration::from_secs(30))
        .await
        .unwrap();
    system.database.set_available(true).await.unwrap();
    let back_at = started.elapsed();

    wait_all_ended(&pool, ids.len(), Duration::from_secs(60)).await;
    assert!(
        before < JOBS as i64,
        "the outage came after every job had ended"
    );
    assert_all_succeeded(&pool, ids.len()).await;
    assert_each_job_ends_once(&pool, ids.len()).await;
    eprintln!(
        "postgres_outage_mid_run: {before} of {JOBS} jobs ended before the outage, {refused} \
         submissions refused during it, database back at {back_at:?}, all {} ended at {:?}",
        ids.len(),
        started.elapsed()
    );
    pool.close().await;
    system.stop().await;
}

/// Whether process `pid` still runs (exists and is not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name, which ends with ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

async fn get_job(system: &TestSystem, id: &str) -> Option<pb::Job> {
    system
        .jobs
        .clone()
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
            as_of: None,
        })
        .await
        .ok()?
        .into_inner()
        .job
}

async fn worker_status(system: &TestSystem, id: &str) -> Option<pb::WorkerStatus> {
    let workers = system
        .workers
        .clone()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .ok()?
        .into_inner()
        .workers;
    let worker = workers.into_iter().find(|w| w.id == id)?;
    pb::WorkerStatus::try_from(worker.status).ok()
}

/// Most of the fleet silent at once is taken for the registry's own partition (a NATS route
/// it cannot see): nobody is declared lost while it lasts. When it ends, the workers whose
/// beats come back a moment after the others' are not handed back for the partition's whole
/// length: silence counts from when the partition was seen to end, not from their last beat.
/// The workers here keep running their attempts all along, as agents whose lease is renewed
/// through their own NATS server do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_heard_a_moment_after_the_rest_of_a_silent_fleet_keeps_its_attempts() {
    let system = TestSystem::start_with(&[], SystemOptions::default())
        .await
        .unwrap();
    // Handed back after 6 s of silence (lease 5 s, kill grace 1 s); 2 slots each.
    let mut workers = Vec::new();
    for id in ["quiet-a", "quiet-b", "quiet-c"] {
        workers.push(
            MuteWorker::start_leased(&system, id, 5_000, 1_000)
                .await
                .unwrap(),
        );
    }
    let mut jobs = Vec::new();
    for i in 0..6 {
        let job = system
            .submit(script(&format!("held-{i}"), "sleep 600"))
            .await
            .unwrap();
        jobs.push(job.id);
    }
    // The six slots take the six jobs, two on each worker; each reports them started.
    for worker in &mut workers {
        for _ in 0..2 {
            let AgentCommand::Assign {
                job_id, attempt, ..
            } = worker.next_command(Duration::from_secs(30)).await.unwrap()
            else {
                panic!("only assignments are sent");
            };
            worker.report_started(job_id, attempt).await.unwrap();
        }
    }
    for id in &jobs {
        system
            .wait_job(id, "running", Duration::from_secs(30), |s| {
                s == pb::JobState::Running
            })
            .await
            .unwrap();
    }
    let all_are = |status: pb::WorkerStatus, ids: &'static [&'static str]| {
        let system = &system;
        async move {
            wait_for(
                &format!("{ids:?} to be {status:?}"),
                Duration::from_secs(20),
                || async move {
                    for id in ids {
                        if worker_status(system, id).await? != status {
                            return None;
                        }
                    }
                    Some(())
                },
            )
            .await
            .unwrap();
        }
    };
    for worker in &workers {
        worker.fall_silent();
    }
    all_are(
        pb::WorkerStatus::Unreachable,
        &["quiet-a", "quiet-b", "quiet-c"],
    )
    .await;
    // The partition lasts past the lease and kill grace (6 s) since every worker's last beat.
    wait_for(
        "every worker silent past its lease and kill grace",
        Duration::from_secs(30),
        || async {
            let workers = system
                .workers
                .clone()
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .ok()?
                .into_inner()
                .workers;
            let now = chrono::Utc::now().timestamp();
            workers
                .iter()
                .filter(|w| w.id.starts_with("quiet-"))
                .all(|w| {
                    w.last_heartbeat_at
                        .as_ref()
                        .is_some_and(|t| now - t.seconds > 7)
                })
                .then_some(())
        },
    )
    .await
    .unwrap();
    workers[0].speak();
    workers[1].speak();
    all_are(pb::WorkerStatus::Ready, &["quiet-a", "quiet-b"]).await;
    // The last one is heard a moment later: once the registry has taken the partition for
    // over (or, as it did before, handed the last one back at once).
    wait_for(
        "the registry to see the partition end",
        Duration::from_secs(20),
        || async {
            let ended = system
                .metric(
                    "registry",
                    r#"hodei_liveness_resets_total{cause="partition"}"#,
                )
                .await
                .is_some_and(|n| n >= 1.0);
            let lost = worker_status(&system, "quiet-c").await == Some(pb::WorkerStatus::Lost);
            (ended || lost).then_some(())
        },
    )
    .await
    .unwrap();
    workers[2].speak();
    all_are(pb::WorkerStatus::Ready, &["quiet-c"]).await;
    for id in &jobs {
        let job = system.get_job(id).await.unwrap();
        assert_eq!(
            (
                job.state(),
                job.attempts.len(),
                job.attempts[0].outcome.is_none()
            ),
            (pb::JobState::Running, 1, true),
            "{job:?}"
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_worker_gets_no_new_work_but_keeps_its_attempt_within_its_lease() {
    const FLAKY: AgentSpec = AgentSpec {
        id: "flaky",
        labels: "pool=a",
        slots: 2,
    };
    let started = Instant::now();
    // The registry expects a beat every 200 ms: a worker silent for 600 ms is unreachable
    // (no new work: `can_take` wants a ready worker).
    // Agents hold a 5 s lease, so a worker beating every 2 s never loses its attempts.
    let options = SystemOptions {
        missed_beats: 3,
        agent_lease_ms: 5_000,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(&[], options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().display().to_string();
    let go = dir.path().join("go");
    // Every attempt records its shell's pid, then waits for the test to say go.
    let waiting = |name: &str| {
        let mut spec = script(
            name,
            &format!(
                "echo $$ > {dir_path}/pid-{name}-$HODEI_WORKER_ID-$HODEI_ATTEMPT
                 while [ ! -e {dir_path}/go ]; do sleep 0.05; done"
            ),
        );
        spec.required_labels.insert("pool".into(), "a".into());
        spec
    };
    let first = system.submit(waiting("first")).await.unwrap().id;

    // "flaky" beats every 2 s: between two beats the registry finds it silent.
    system.add_agent(&FLAKY, 2_000).await.unwrap();
    let pid_file = dir.path().join("pid-first-flaky-1");
    let flaky_pid: u32 = wait_for(
        "the first job to start on flaky",
        Duration::from_secs(20),
        || read_pid(&pid_file),
    )
    .await
    .unwrap();
    wait_for(
        "flaky to be unreachable between its beats",
        Duration::from_secs(15),
        || async {
            (worker_status(&system, "flaky").await? == pb::WorkerStatus::Unreachable).then_some(())
        },
    )
    .await
    .unwrap();
    // Flaky's next beat brings it back, its attempt untouched.
    wait_for(
        "flaky to be ready again",
        Duration::from_secs(15),
        || async {
            (worker_status(&system, "flaky").await? == pb::WorkerStatus::Ready).then_some(())
        },
    )
    .await
    .unwrap();
    assert!(process_alive(flaky_pid));

    std::fs::write(&go, b"").unwrap();
    let done = wait_for("the job to succeed", Duration::from_secs(20), || async {
        let job = get_job(&system, &first).await?;
        (job.state == pb::JobState::Succeeded as i32).then_some(job)
    })
    .await
    .unwrap();
    assert_eq!(
        done.attempts.len(),
        1,
        "never handed back: {:?}",
        done.attempts
    );
    assert_eq!(done.attempts[0].worker_id, "flaky");
    eprintln!(
        "a_silent_worker_gets_no_new_work_but_keeps_its_attempt_within_its_lease: done in {:?}",
        started.elapsed()
    );
    system.stop().await;
}

/// The pid in `file`, once it has been written.
async fn read_pid(file: &Path) -> Option<u32> {
    tokio::fs::read_to_string(file)
        .await
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_asks_for_it_is_requeued_as_soon_as_its_worker_is_unreachable() {
    const FLAKY: AgentSpec = AgentSpec {
        id: "flaky",
        labels: "pool=a",
        slots: 2,
    };
    const STEADY: AgentSpec = AgentSpec {
        id: "steady",
        labels: "pool=a",
        slots: 2,
    };
    // Unreachable after 600 ms of silence; the agents' lease (60 s) is far away.
    let options = SystemOptions {
        missed_beats: 3,
        agent_lease_ms: 60_000,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(&[FLAKY], options).await.unwrap();
    // On flaky the jobs wait until the test ends; anywhere else they succeed at once.
    let job = |name: &str, requeue_when_unreachable: bool| {
        let mut spec = script(
            name,
            r#"if [ "$HODEI_WORKER_ID" = flaky ]; then sleep 600; fi"#,
        );
        spec.required_labels.insert("pool".into(), "a".into());
        spec.requeue_when_unreachable = requeue_when_unreachable;
        spec
    };
    let idempotent = system.submit(job("idempotent", true)).await.unwrap().id;
    let patient = system.submit(job("patient", false)).await.unwrap().id;
    for id in [&idempotent, &patient] {
        system
            .wait_job(id, "to run on flaky", Duration::from_secs(20), |s| {
                s == pb::JobState::Running
            })
            .await
            .unwrap();
    }
    system.add_agent(&STEADY, HEARTBEAT_MS).await.unwrap();
    let silenced = Instant::now();
    system.crash_agent("flaky");

    let done = system
        .wait_terminal(&idempotent, Duration::from_secs(20))
        .await
        .unwrap();
    let took = silenced.elapsed();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, "flaky");
    assert!(
        format!("{:?}", done.attempts[0].outcome).contains("requeue_when_unreachable"),
        "{:?}",
        done.attempts[0].outcome
    );
    assert_eq!(done.attempts[1].worker_id, "steady");
    // The job that did not ask for it waits for flaky's lease.
    let waiting = get_job(&system, &patient).await.unwrap();
    assert_eq!(waiting.state(), pb::JobState::Running, "{waiting:?}");
    assert_eq!(waiting.attempts.len(), 1, "{:?}", waiting.attempts);
    eprintln!(
        "a_job_that_asks_for_it_is_requeued_as_soon_as_its_worker_is_unreachable: ran again \
         and ended {took:?} after its worker went silent"
    );
    system.stop().await;
}

/// The placement requests delivered so far by the schedulers' shared consumer, and how many
/// of them wait for their acknowledgement.
async fn placement_deliveries(js: &async_nats::jetstream::Context) -> (u64, usize) {
    let stream = js.get_stream(hodei_messaging::streams::WORK).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(hodei_messaging::streams::PLACER)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.delivered.consumer_sequence, info.num_ack_pending)
}

/// While PostgreSQL is away, the placement requests a scheduler holds wait with it, kept in
/// progress: none is handed back to be delivered again and again for as long as the outage
/// lasts (each delivery a wake-up of the scheduler and a message for NATS).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_requests_wait_out_a_postgres_outage_without_being_redelivered() {
    const JOBS: usize = 50;
    const DEADLINE: Duration = Duration::from_secs(30);
    let system = TestSystem::start_with(&[], SystemOptions::default())
        .await
        .unwrap();
    let (_, js) = system.admin_nats().await.unwrap();
    // No worker: every request is held, waiting for one.
    for i in 0..JOBS {
        system
            .submit(script(&format!("held-{i:02}"), "true"))
            .await
            .unwrap();
    }
    wait_for("every request held", DEADLINE, || {
        let js = js.clone();
        async move { (placement_deliveries(&js).await.1 == JOBS).then_some(()) }
    })
    .await
    .unwrap();

    system.database.set_available(false).await.unwrap();
    // From when the scheduler takes PostgreSQL for away (a call that fails alone is retried
    // as one that failed for its own reasons).
    system
        .wait_postgres_breaker_open("scheduler", DEADLINE)
        .await
        .unwrap();
    let (before, _) = placement_deliveries(&js).await;
    // The outage lasts until the scheduler has tried again many times: 45 more failed calls,
    // of which its placement retries (100 ms apart here, every tenth a full pass over the
    // held requests) are at least two in three.
    const FAILED: &str = "hodei_postgres_errors_total";
    let failed = system.metric("scheduler", FAILED).await.unwrap_or(0.0);
    wait_for(
        "45 more failed calls of the scheduler",
        DEADLINE,
        || async {
            let now = system.metric("scheduler", FAILED).await?;
            (now >= failed + 45.0).then_some(())
        },
    )
    .await
    .unwrap();
    let (during, pending) = placement_deliveries(&js).await;
    system.database.set_available(true).await.unwrap();
    assert_eq!(
        (during, pending),
        (before, JOBS),
        "requests were delivered again during the outage"
    );
    system
        .wait_readiness(&["scheduler"], 200, DEADLINE)
        .await
        .unwrap();
    system.stop().await;
}
