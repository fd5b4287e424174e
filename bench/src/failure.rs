//! `failure-detection`: the gateway, one scheduler and the registry (heartbeat interval and
//! missed beats as in production settings chosen by the scenario) in this process, a private
//! nats-server, a fresh database, and a fleet of simulated agents that hold the jobs they are
//! given. A few long jobs are submitted and held; then a random 1% of the fleet (every holder
//! among them) is silenced at a recorded instant. For each silenced worker: its last beat
//! sent → `status` `unreachable` (no new work) or later seen in `workers` (polled), and for
//! each job it held: its last beat → the attempt ended `lost` and the job handed back (the
//! attempt's `finished_at`, stamped by the registry in the same transaction), which happens
//! after the lease plus kill grace the simulated agents announce (1 s + 0.5 s here).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hodei_domain::{AttemptOutcome, AttemptRecord, JobId};
use hodei_proto::v1 as pb;
use hodei_test_support::{TestDatabase, TestNats};
use sqlx::PgPool;

use crate::fleet::{self, Fleet, FleetConfig};
use crate::report::{Outcome, histogram};
use crate::services::{self, RegistrySettings, Services};

const S: &str = "failure-detection";
/// The lease and kill grace the simulated agents announce: their attempts are handed back
/// 1.5 s after their last beat.
const SIMULATED_LEASE: hodei_domain::LeaseTerms = hodei_domain::LeaseTerms {
    lease_ms: 1_000,
    kill_grace_ms: 500,
};
/// How often `workers` is polled for lost workers.
const POLL: Duration = Duration::from_millis(10);

/// Parameters of `failure-detection`.
pub struct FailureParams {
    pub agents: usize,
    pub interval: Duration,
    pub missed_beats: u32,
    pub register_within: Duration,
    pub detect_within: Duration,
}

pub async fn failure_detection(p: FailureParams) -> anyhow::Result<Outcome> {
    services::with_backends(async |nats, database| run_with(nats, database, &p).await).await
}

async fn run_with(
    nats: &mut TestNats,
    database: &TestDatabase,
    p: &FailureParams,
) -> anyhow::Result<Outcome> {
    let settings = RegistrySettings {
        heartbeat_interval_ms: u64::try_from(p.interval.as_millis()).unwrap_or(u64::MAX),
        missed_beats: p.missed_beats,
        flush_interval_ms: 100,
        partition_share: 0.5,
    };
    let mut services = Services::start(nats.url(), database.url(), settings, true).await?;
    let pool = match database.connect().await {
        Ok(pool) => pool,
        Err(e) => {
            services.stop().await;
            return Err(e.into());
        }
    };
    let fleet = Fleet::start(
        &nats.url(),
        FleetConfig {
            agents: p.agents,
            interval: p.interval,
            hold_jobs: true,
            lease: SIMULATED_LEASE,
        },
    )
    .await;
    let result = match fleet {
        Ok(fleet) => {
            let result = measure(&fleet, &mut services, nats, &pool, p).await;
            fleet.stop().await;
            result
        }
        Err(e) => Err(e),
    };
    services.stop().await;
    pool.close().await;
    let mut out = result?;
    out.note(format!(
        "failure-detection: {} simulated agents beating every {:?}; registry: interval {:?}, \
         {} missed beats, flush every {} ms, its sweep every fifth of an interval; 'last beat' \
         is when the fleet published the silenced worker's last heartbeat; 'lost' is when a \
         {POLL:?} poll of workers first saw it unreachable (no new work) or lost; 'requeued' \
         is the lost attempt's finished_at (set by the registry in the transaction that \
         requeues the job, after the agents' 1 s lease + 0.5 s kill grace); the \
         registry stores each beat's receipt time and measures silence up to its last \
         written beats, so detection cannot come before last beat + {} intervals",
        p.agents,
        p.interval,
        p.interval,
        p.missed_beats,
        settings.flush_interval_ms,
        p.missed_beats
    ));
    Ok(out)
}

/// A small xorshift generator: the silenced set only needs to be unpredictable, not secure.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

fn long_job(i: usize) -> pb::JobSpec {
    pb::JobSpec {
        name: format!("held-{i}"),
        command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
            argv: vec!["sleep".to_owned(), "3600".to_owned()],
        })),
        timeout_secs: 3600,
        ..Default::default()
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

async fn wait_for_count(
    pool: &PgPool,
    sql: &'static str,
    wanted: i64,
    within: Duration,
    what: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let n = count(pool, sql).await?;
        if n >= wanted {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            anyhow::bail!("only {n} of {wanted} {what} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

async fn measure(
    fleet: &Fleet,
    services: &mut Services,
    nats: &mut TestNats,
    pool: &PgPool,
    p: &FailureParams,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let wanted = i64::try_from(p.agents).unwrap_or(i64::MAX);
    let took = wait_for_count(
        pool,
        "SELECT count(*) FROM workers WHERE status = 'ready'",
        wanted,
        p.register_within,
        "workers ready",
    )
    .await?;
    out.figure(
        S,
        format!("time to register {} workers", p.agents),
        took.as_secs_f64(),
        "s",
        None,
    );

    // Jobs for the silenced workers to hold: one per silenced worker at most.
    let silenced_count = (p.agents / 100).max(2).min(p.agents);
    let grpc = services.grpc_addr.context("the gateway did not start")?;
    let mut client = crate::system::admin_client(pool, &format!("http://{grpc}")).await?;
    for i in 0..silenced_count {
        client
            .submit_job(pb::SubmitJobRequest {
                spec: Some(long_job(i)),
                tenant: String::new(),
            })
            .await
            .context("failed to submit a job to hold")?;
    }
    let jobs_wanted = i64::try_from(silenced_count).unwrap_or(i64::MAX);
    wait_for_count(
        pool,
        "SELECT count(*) FROM jobs WHERE state = 'running'",
        jobs_wanted,
        Duration::from_secs(30),
        "held jobs running",
    )
    .await?;
    // Let the holders' heartbeats carry their attempts for a few beats.
    tokio::time::sleep(p.interval * 3).await;

    let held = fleet.held();
    let mut silenced: Vec<usize> = held
        .iter()
        .filter(|(_, a)| !a.is_empty())
        .map(|(&i, _)| i)
        .collect();
    let holders = silenced.len();
    let mut rng = Rng::seeded();
    while silenced.len() < silenced_count {
        let i = rng.below(fleet.len());
        if !silenced.contains(&i) {
            silenced.push(i);
        }
    }
    let held_jobs: Vec<(usize, JobId)> = silenced
        .iter()
        .flat_map(|&i| {
            held.get(&i)
                .into_iter()
                .flatten()
                .map(move |a| (i, a.job_id))
        })
        .collect();
    let silenced_ids: Vec<String> = silenced.iter().map(|&i| fleet::worker_id(i)).collect();

    let silenced_at = Instant::now();
    fleet.silence(&silenced);
    let mut lost_seen: HashMap<String, Instant> = HashMap::new();
    let deadline = silenced_at + p.detect_within;
    while lost_seen.len() < silenced.len() && Instant::now() < deadline {
        let lost: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM workers WHERE status IN ('unreachable', 'lost') AND id = ANY($1)",
        )
        .bind(&silenced_ids)
        .fetch_all(pool)
        .await?;
        let now = Instant::now();
        for id in lost {
            lost_seen.entry(id).or_insert(now);
        }
        tokio::time::sleep(POLL).await;
    }

    let mut to_lost = histogram()?;
    let mut beat_to_stored = histogram()?;
    let stored: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT worker_id, last_heartbeat_at FROM worker_beats WHERE worker_id = ANY($1)",
    )
    .bind(&silenced_ids)
    .fetch_all(pool)
    .await?;
    let stored: HashMap<String, DateTime<Utc>> = stored.into_iter().collect();
    let mut last_beats = HashMap::new();
    for (&i, id) in silenced.iter().zip(&silenced_ids) {
        let Some(last) = fleet.last_beat(i) else {
            continue;
        };
        last_beats.insert(i, last);
        if let Some(seen) = lost_seen.get(id) {
            to_lost.record(micros(seen.saturating_duration_since(last)))?;
        }
        if let Some(at) = stored.get(id) {
            let sent = fleet.utc_of(last);
            let d = (*at - sent).num_microseconds().unwrap_or(0);
            beat_to_stored.record(u64::try_from(d).unwrap_or(0).max(1))?;
        }
    }
    let false_lost = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM workers WHERE status IN ('unreachable', 'lost') AND NOT (id = ANY($1))",
    )
    .bind(&silenced_ids)
    .fetch_one(pool)
    .await?;

    // The held jobs: when their attempt was ended as lost, and whether the job went back.
    let job_ids: Vec<uuid::Uuid> = held_jobs.iter().map(|(_, j)| j.as_uuid()).collect();
    let mut to_requeued = histogram()?;
    let requeue_deadline = Instant::now() + Duration::from_secs(5);
    let requeued = loop {
        let rows: Vec<(uuid::Uuid, String, serde_json::Value)> =
            sqlx::query_as("SELECT id, state, attempts FROM jobs WHERE id = ANY($1)")
                .bind(&job_ids)
                .fetch_all(pool)
                .await?;
        let mut ended = Vec::new();
        for (id, _state, attempts) in &rows {
            let attempts: Vec<AttemptRecord> = serde_json::from_value(attempts.clone())?;
            let lost_at = attempts.first().and_then(|a| match a.outcome {
                Some(AttemptOutcome::Lost { .. }) => a.finished_at,
                _ => None,
            });
            if let Some(at) = lost_at {
                ended.push((*id, at));
            }
        }
        if ended.len() == job_ids.len() || Instant::now() > requeue_deadline {
            let requeued = ended.len() as u64;
            for (id, at) in ended {
                let holder = held_jobs
                    .iter()
                    .find(|(_, j)| j.as_uuid() == id)
                    .and_then(|(i, _)| last_beats.get(i));
                if let Some(&last) = holder {
                    let d = (at - fleet.utc_of(last)).num_microseconds().unwrap_or(0);
                    to_requeued.record(u64::try_from(d).unwrap_or(0).max(1))?;
                }
            }
            break requeued;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    out.figure(S, "workers silenced", silenced.len() as f64, "count", None);
    out.figure(
        S,
        "silenced workers declared lost",
        lost_seen.len() as f64,
        "count",
        None,
    );
    out.figure(
        S,
        "healthy workers declared lost (false positives)",
        false_lost as f64,
        "count",
        None,
    );
    out.figure(
        S,
        "last beat->lost min",
        to_lost.min() as f64 / 1000.0,
        "ms",
        None,
    );
    out.percentiles(S, "last beat->lost", &to_lost, Some("<= 1,500 ms"));
    out.percentiles(
        S,
        "last beat->stored last_heartbeat_at",
        &beat_to_stored,
        None,
    );
    out.figure(
        S,
        "held jobs on silenced workers",
        job_ids.len() as f64,
        "count",
        None,
    );
    out.figure(S, "held jobs handed back", requeued as f64, "count", None);
    if !to_requeued.is_empty() {
        out.percentiles(S, "last beat->job requeued", &to_requeued, None);
    }
    out.note(format!(
        "failure-detection: {} jobs held by {holders} of the silenced workers; the other {} \
         silenced workers were picked at random; 'last beat->job requeued' is the requeue \
         time of a worker that goes silent (a partition, or a crash with no restart)",
        job_ids.len(),
        silenced.len() - holders
    ));

    // A crash with a restart: the workers holding the jobs now die and come back at once as
    // new incarnations; their first beat confirms the loss.
    let holders = wait_held(fleet, pool, jobs_wanted, &silenced).await?;
    let restarted: Vec<usize> = holders.keys().copied().collect();
    let lost_before = lost_attempts(pool, &job_ids).await?;
    fleet.restart(&restarted);
    let lost = wait_lost(pool, &job_ids, lost_before + job_ids.len()).await?;
    let mut to_requeued = histogram()?;
    for (i, attempts) in &holders {
        let Some(first_beat) = fleet.restart_beat(*i) else {
            continue;
        };
        for attempt in attempts {
            if let Some(at) = lost.get(&(attempt.job_id.as_uuid(), attempt.attempt.get())) {
                let d = (*at - fleet.utc_of(first_beat))
                    .num_microseconds()
                    .unwrap_or(0);
                to_requeued.record(u64::try_from(d).unwrap_or(0).max(1))?;
            }
        }
    }
    out.figure(
        S,
        "crash and restart: jobs held by the restarted workers",
        holders.values().map(Vec::len).sum::<usize>() as f64,
        "count",
        None,
    );
    if !to_requeued.is_empty() {
        out.percentiles(
            S,
            "crash and restart: new incarnation's first beat->job requeued",
            &to_requeued,
            None,
        );
    }

    // Observer outages: nobody healthy may be blamed. The jobs are held again first.
    wait_held(fleet, pool, jobs_wanted, &silenced).await?;
    let settle = Duration::from_millis(SIMULATED_LEASE.lease_ms + SIMULATED_LEASE.kill_grace_ms)
        + p.interval * (p.missed_beats + 4);
    for outage in [Outage::Nats, Outage::Registry] {
        let lost_before = lost_attempts(pool, &job_ids).await?;
        let workers_before = count(pool, LOST_WORKERS).await?;
        match outage {
            Outage::Nats => {
                nats.stop().await;
                tokio::time::sleep(NATS_OUTAGE).await;
                nats.restart().await?;
            }
            Outage::Registry => {
                services.crash_registry().await;
                tokio::time::sleep(REGISTRY_OUTAGE).await;
                services.start_registry().await?;
            }
        }
        // Long enough for any wrong verdict to be reached and acted on.
        tokio::time::sleep(settle).await;
        let handed_back = lost_attempts(pool, &job_ids).await? - lost_before;
        let workers_lost = count(pool, LOST_WORKERS).await? - workers_before;
        let what = outage.describe();
        out.figure(
            S,
            format!("{what}: healthy workers declared lost"),
            workers_lost as f64,
            "count",
            Some("0"),
        );
        out.figure(
            S,
            format!("{what}: held jobs handed back"),
            handed_back as f64,
            "count",
            Some("0"),
        );
    }
    out.note(format!(
        "failure-detection: after the silencing, the workers holding the jobs are restarted as \
         new incarnations (crash and restart); then NATS is stopped for {NATS_OUTAGE:?} and \
         restarted, and the registry is crashed and started again {REGISTRY_OUTAGE:?} later, \
         each followed by {settle:?} (lease + grace + missed beats + 4 intervals) before \
         counting workers newly lost and held attempts handed back"
    ));
    Ok(out)
}

/// How long NATS stays down in the observer-outage check.
const NATS_OUTAGE: Duration = Duration::from_secs(5);
/// How long the registry stays down: longer than the silence that makes a worker unreachable
/// at the default settings.
const REGISTRY_OUTAGE: Duration = Duration::from_secs(3);
const LOST_WORKERS: &str = "SELECT count(*) FROM workers WHERE status = 'lost'";

#[derive(Debug, Clone, Copy)]
enum Outage {
    Nats,
    Registry,
}

impl Outage {
    fn describe(self) -> String {
        match self {
            Outage::Nats => format!("NATS down {NATS_OUTAGE:?}"),
            Outage::Registry => format!("registry down {REGISTRY_OUTAGE:?}"),
        }
    }
}

/// Waits until `wanted` jobs run and the fleet holds them on agents other than `silenced`
/// (which still hold what they had when they went silent); returns those holders.
async fn wait_held(
    fleet: &Fleet,
    pool: &PgPool,
    wanted: i64,
    silenced: &[usize],
) -> anyhow::Result<HashMap<usize, Vec<hodei_domain::AttemptId>>> {
    wait_for_count(
        pool,
        "SELECT count(*) FROM jobs WHERE state = 'running'",
        wanted,
        Duration::from_secs(60),
        "held jobs running",
    )
    .await?;
    let started = Instant::now();
    loop {
        let held: HashMap<_, _> = fleet
            .held()
            .into_iter()
            .filter(|(i, a)| !a.is_empty() && !silenced.contains(i))
            .collect();
        if held.values().map(Vec::len).sum::<usize>() as i64 >= wanted {
            return Ok(held);
        }
        if started.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("the fleet holds fewer than {wanted} jobs after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many attempts of `jobs` ended lost.
async fn lost_attempts(pool: &PgPool, jobs: &[uuid::Uuid]) -> anyhow::Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(j.attempts) a
         WHERE j.id = ANY($1) AND a->'outcome'->>'kind' = 'lost'",
    )
    .bind(jobs)
    .fetch_one(pool)
    .await?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Waits until `wanted` attempts of `jobs` have ended lost; returns when each ended, by
/// (job, attempt number).
async fn wait_lost(
    pool: &PgPool,
    jobs: &[uuid::Uuid],
    wanted: usize,
) -> anyhow::Result<HashMap<(uuid::Uuid, u32), DateTime<Utc>>> {
    let started = Instant::now();
    loop {
        let rows: Vec<(uuid::Uuid, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT j.id, (a->>'attempt')::bigint, (a->>'finished_at')::timestamptz
             FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(j.attempts) a
             WHERE j.id = ANY($1) AND a->'outcome'->>'kind' = 'lost'",
        )
        .bind(jobs)
        .fetch_all(pool)
        .await?;
        if rows.len() >= wanted || started.elapsed() > Duration::from_secs(30) {
            return Ok(rows
                .into_iter()
                .map(|(job, attempt, at)| ((job, u32::try_from(attempt).unwrap_or(0)), at))
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
