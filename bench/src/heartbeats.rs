//! `heartbeats`: one real registry (in this process) against a private nats-server and a fresh
//! PostgreSQL database, and a fleet of simulated agents beating at a fixed interval. After
//! every agent is registered and a warm-up, a measured window: beats sent (the fleet's
//! count), received (the registry's `hodei_heartbeats_received_total`) and persisted (rows
//! the registry inserted or updated in `worker_beats`, from PostgreSQL's `pg_stat_user_tables`),
//! with the freshness of what is stored (the beat numbers in `worker_beats.usage`), the registry's
//! write transactions, the CPU and memory of this process and the CPU of the nats-server and
//! PostgreSQL backends.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hodei_test_support::{TestDatabase, TestNats};
use sqlx::PgPool;

use crate::fleet::{Fleet, FleetConfig};
use crate::procfs::{self, CpuMeter, GroupMeter, Pid};
use crate::report::Outcome;
use crate::services::{self, RegistrySettings, Services};

const S: &str = "heartbeats";
const RECEIVED: &str = "hodei_heartbeats_received_total";

/// Parameters of `heartbeats`.
pub struct HeartbeatsParams {
    pub agents: usize,
    pub interval: Duration,
    pub window: Duration,
    pub warmup: Duration,
    pub register_within: Duration,
}

pub async fn heartbeats(p: HeartbeatsParams) -> anyhow::Result<Outcome> {
    services::with_backends(async |nats, database| run_with(nats, database, &p).await).await
}

async fn run_with(
    nats: &TestNats,
    database: &TestDatabase,
    p: &HeartbeatsParams,
) -> anyhow::Result<Outcome> {
    let settings = RegistrySettings {
        heartbeat_interval_ms: u64::try_from(p.interval.as_millis()).unwrap_or(u64::MAX),
        missed_beats: 3,
        flush_interval_ms: 100,
        partition_share: 0.5,
    };
    let services = Services::start(nats.url(), database.url(), settings, false).await?;
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
            hold_jobs: false,
            lease: hodei_domain::LeaseTerms::DEFAULT,
        },
    )
    .await;
    let result = match fleet {
        Ok(fleet) => {
            let result = measure(&fleet, &services, &pool, nats.port(), p).await;
            fleet.stop().await;
            result
        }
        Err(e) => Err(e),
    };
    // Beats still in flight are flushed by the registry as it stops.
    services.stop().await;
    pool.close().await;
    let mut out = result?;
    out.note(format!(
        "heartbeats: {} simulated agents beating every {:?} (spread evenly over the interval, \
         one nats connection), one registry (flush every {} ms, at most 2,000 beats a statement), \
         {:?} warm-up after every agent registered, {:?} measured; 'persisted' is rows \
         inserted or updated in worker_beats per pg_stat_user_tables (postgresql publishes a busy \
         backend's counts about once a second: the window's ends are each up to ~1 s late); \
         'behind' compares each worker's last sent beat number with the one stored; the registry, its metrics server and the \
         simulated agents share this process (its cpu and rss below are theirs together)",
        p.agents, p.interval, settings.flush_interval_ms, p.warmup, p.window
    ));
    Ok(out)
}

/// What PostgreSQL says so far: rows written to `workers`, the sum of every worker's stored
/// beat number, committed transactions and milliseconds spent executing statements.
async fn persisted(pool: &PgPool) -> anyhow::Result<(i64, i64, i64, f64)> {
    let (written, commits, active): (i64, i64, f64) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0)::bigint
                 FROM pg_stat_user_tables WHERE relname = 'worker_beats'),
                d.xact_commit, coalesce(d.active_time, 0)::float8
         FROM pg_stat_database d WHERE d.datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .context("failed to read postgresql statistics")?;
    let covered: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum((usage->>'memory_used_mb')::bigint), 0)::bigint FROM worker_beats",
    )
    .fetch_one(pool)
    .await
    .context("failed to read the stored beat numbers")?;
    Ok((written, covered, commits, active))
}

struct Snapshot {
    at: Instant,
    sent: u64,
    received: f64,
    written: i64,
    covered: i64,
    commits: i64,
    active_ms: f64,
}

async fn snapshot(
    fleet: &Fleet,
    metrics: std::net::SocketAddr,
    pool: &PgPool,
) -> anyhow::Result<Snapshot> {
    let at = Instant::now();
    let sent = fleet.sent();
    let (received, persisted) = tokio::join!(services::counter(metrics, RECEIVED), persisted(pool));
    let (written, covered, commits, active_ms) = persisted?;
    Ok(Snapshot {
        at,
        sent,
        received: received?,
        written,
        covered,
        commits,
        active_ms,
    })
}

async fn measure(
    fleet: &Fleet,
    services: &Services,
    pool: &PgPool,
    nats_port: u16,
    p: &HeartbeatsParams,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let metrics = services
        .registry_metrics
        .context("the registry has no metrics address")?;
    let wanted = i64::try_from(p.agents).unwrap_or(i64::MAX);
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM workers")
            .fetch_one(pool)
            .await?;
        if n >= wanted {
            break;
        }
        if started.elapsed() > p.register_within {
            anyhow::bail!(
                "only {n} of {wanted} workers registered after {:?}",
                p.register_within
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out.figure(
        S,
        format!("time to register {} workers", p.agents),
        started.elapsed().as_secs_f64(),
        "s",
        None,
    );
    tokio::time::sleep(p.warmup).await;

    let port = format!("{nats_port}");
    let nats_pids = procfs::find(&["nats-server", &port]);
    let pg_pids: Vec<u32> = sqlx::query_scalar::<_, i32>(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .filter_map(|p| u32::try_from(p).ok())
    .collect();
    let own = CpuMeter::start(Pid::Current)?;
    let nats_cpu = GroupMeter::start(&nats_pids);
    let pg_cpu = GroupMeter::start(&pg_pids);
    let first = snapshot(fleet, metrics, pool).await?;
    tokio::time::sleep(p.window).await;
    let last = snapshot(fleet, metrics, pool).await?;
    let own_cores = own.cores_used()?;
    let (nats_cores, pg_cores) = (nats_cpu.cores_used(), pg_cpu.cores_used());
    let memory = procfs::memory(Pid::Current)?;

    let secs = (last.at - first.at).as_secs_f64();
    let sent = (last.sent - first.sent) as f64;
    let received = last.received - first.received;
    let stored = (last.written - first.written) as f64;
    let commits = (last.commits - first.commits) as f64;
    out.figure(S, "beats sent/s (offered)", sent / secs, "1/s", None);
    out.figure(
        S,
        "beats received/s by the registry",
        received / secs,
        "1/s",
        None,
    );
    out.figure(
        S,
        "beats persisted/s (rows written to worker_beats)",
        stored / secs,
        "1/s",
        Some(">= 20,000"),
    );
    out.figure(S, "persisted / sent", stored / sent.max(1.0), "x", None);
    out.figure(
        S,
        "beats sent but never received (dropped) in the window",
        (sent - received).max(0.0),
        "count",
        None,
    );
    out.figure(
        S,
        "stored state behind the sent beats at the end (beats)",
        last.sent as f64 - last.covered as f64,
        "count",
        None,
    );
    out.figure(
        S,
        "postgresql transactions committed/s",
        commits / secs,
        "1/s",
        None,
    );
    out.figure(
        S,
        "postgresql mean active time per transaction",
        (last.active_ms - first.active_ms) / commits.max(1.0),
        "ms",
        None,
    );
    out.figure(
        S,
        "beats not sent (errors)",
        fleet.failed() as f64,
        "count",
        None,
    );
    out.figure(
        S,
        "cpu of this process (registry + agents)",
        own_cores,
        "cores",
        None,
    );
    out.figure(
        S,
        "rss of this process at the end",
        memory.rss_mib(),
        "MiB",
        None,
    );
    out.figure(
        S,
        "peak rss of this process",
        memory.peak_mib(),
        "MiB",
        None,
    );
    if nats_cpu.len() > 0 {
        out.figure(S, "cpu of the nats-server", nats_cores, "cores", None);
    } else {
        out.note("heartbeats: nats-server process not found in /proc: its cpu not measured");
    }
    if pg_cpu.len() > 0 {
        out.figure(
            S,
            format!("cpu of the {} postgresql backends", pg_cpu.len()),
            pg_cores,
            "cores",
            None,
        );
    } else {
        out.note("heartbeats: postgresql backends not readable in /proc: their cpu not measured");
    }
    Ok(out)
}
