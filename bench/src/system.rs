//! The end-to-end scenarios, `throughput` and `latency`: the real gateway, scheduler and
//! registry in process (through `hodei-system-tests`, the wiring their binaries use), a private
//! nats-server with file storage, a fresh PostgreSQL database, and simulated agents.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hodei_domain::AttemptRecord;
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_proto::{AuthChannel, Bearer};
use hodei_system_tests::{SystemOptions, TestSystem};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::reference;
use crate::report::{Outcome, histogram};
use crate::sim::{SimAgents, SimConfig};

/// Heartbeat interval of the simulated agents: inside the test system's 5 s staleness window.
const SIM_HEARTBEAT_MS: u64 = 1_000;
/// Slots of each simulated agent.
const SIM_SLOTS: u32 = 4;

/// The simulated fleet of the scenarios that run the whole system: `agents` agents of
/// [`SIM_SLOTS`] slots, beating every [`SIM_HEARTBEAT_MS`].
fn sim_fleet(agents: usize) -> SimConfig {
    SimConfig {
        agents,
        slots: SIM_SLOTS,
        heartbeat_ms: SIM_HEARTBEAT_MS,
    }
}

/// A running system with its simulated agents and a pool on its database.
struct Bench {
    system: TestSystem,
    agents: SimAgents,
    pool: PgPool,
}

/// Admission limit of the scenarios that must never be refused.
const NO_ADMISSION_LIMIT: u64 = 10_000_000;

impl Bench {
    async fn start(agents: usize, max_queued_jobs: u64) -> anyhow::Result<Bench> {
        let options = SystemOptions {
            max_queued_jobs,
            ..SystemOptions::default()
        };
        let system = TestSystem::start_with(&[], options)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let pool = system.database.connect().await?;
        // One connection speaks for every simulated agent: only the admin credential may.
        let auth = system
            .admin_nats_auth()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let agents_started = SimAgents::start(&system.nats.url(), &auth, sim_fleet(agents)).await;
        let sim = match agents_started {
            Ok(sim) => sim,
            Err(e) => {
                system.stop().await;
                return Err(e);
            }
        };
        let bench = Bench {
            system,
            agents: sim,
            pool,
        };
        let wanted = i64::try_from(agents).unwrap_or(i64::MAX);
        if let Err(e) = wait_count(
            &bench.pool,
            "SELECT count(*) FROM workers WHERE status = 'ready'",
            wanted,
            Duration::from_secs(30),
        )
        .await
        {
            bench.stop().await;
            return Err(e.context("simulated agents were not all registered"));
        }
        Ok(bench)
    }

    async fn stop(self) {
        self.agents.stop().await;
        self.pool.close().await;
        self.system.stop().await;
    }
}

/// Polls `sql` (a count) until it reaches `wanted`; returns when it did, or fails at `within`.
///
/// A count over the jobs table is a scan of the system under test: polled every 20 ms it
/// took 6 ms of postgres each time, 30 % of a core while the last jobs ran. So the count is
/// polled again after half the time its progress so far says is left, between 20 ms and
/// 500 ms: a few polls while far off, every 20 ms near the end, which is as precise.
pub(crate) async fn wait_count(
    pool: &PgPool,
    sql: &'static str,
    wanted: i64,
    within: Duration,
) -> anyhow::Result<Instant> {
    const FINEST: Duration = Duration::from_millis(20);
    const COARSEST: Duration = Duration::from_millis(500);
    let first = Instant::now();
    let deadline = first + within;
    let mut start: Option<i64> = None;
    loop {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await?;
        if n >= wanted {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {n} of {wanted} after {within:?} ({sql})");
        }
        let from = *start.get_or_insert(n);
        let done = (n - from) as f64;
        let pause = if done > 0.0 {
            let left = first.elapsed().as_secs_f64() * (wanted - n) as f64 / done;
            Duration::from_secs_f64(left / 2.0).clamp(FINEST, COARSEST)
        } else {
            FINEST
        };
        tokio::time::sleep(pause).await;
    }
}

fn noop_spec(i: usize) -> pb::JobSpec {
    pb::JobSpec {
        name: format!("noop-{i}"),
        command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
            argv: vec!["true".to_owned()],
        })),
        timeout_secs: 60,
        ..Default::default()
    }
}

/// `n` gRPC clients of the gateway at `addr`, one HTTP/2 channel each.
pub(crate) async fn connect_clients(
    addr: std::net::SocketAddr,
    token: &str,
    n: usize,
) -> anyhow::Result<Vec<JobServiceClient<AuthChannel>>> {
    let bearer = Bearer::new(Some(token))?;
    let mut clients = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .context("failed to connect a grpc client")?;
        clients.push(JobServiceClient::new(bearer.clone().on(channel)));
    }
    Ok(clients)
}

/// A client of the gateway at `url` with a new admin token, stored in the database behind
/// `pool`: for scenarios that run their own gateway.
pub(crate) async fn admin_client(
    pool: &sqlx::PgPool,
    url: &str,
) -> anyhow::Result<JobServiceClient<AuthChannel>> {
    let token = hodei_system_tests::issue_token(pool, "default", hodei_domain::Role::Admin)
        .await
        .map_err(|e| anyhow::anyhow!("failed to issue a token: {e}"))?;
    let channel = Channel::from_shared(url.to_owned())?
        .connect()
        .await
        .context("failed to connect to the gateway")?;
    Ok(JobServiceClient::new(
        Bearer::new(Some(&token))?.on(channel),
    ))
}

/// Submits `jobs` no-op jobs spread over `clients`, all at once; returns how many times the
/// gateway refused one (each was submitted again).
pub(crate) async fn submit_all(
    clients: Vec<JobServiceClient<AuthChannel>>,
    jobs: usize,
    batch: usize,
) -> anyhow::Result<u64> {
    let mut submitters = JoinSet::new();
    let n_clients = clients.len();
    for (c, mut client) in clients.into_iter().enumerate() {
        submitters.spawn(async move {
            let mut refused = 0;
            let mine: Vec<usize> = (c..jobs).step_by(n_clients).collect();
            for calls in mine.chunks(batch.max(1)) {
                refused += submit_jobs(&mut client, calls).await?;
            }
            anyhow::Ok(refused)
        });
    }
    let mut refused = 0;
    while let Some(joined) = submitters.join_next().await {
        refused += joined.context("a submitter panicked")??;
    }
    Ok(refused)
}

/// The rate figures every end-to-end scenario reports: jobs/s against `target`, the submit
/// phase and the refusals.
pub(crate) fn rate_figures(
    out: &mut Outcome,
    scenario: &'static str,
    rate: f64,
    target: &'static str,
    jobs: usize,
    submitted: Duration,
    refused: u64,
) {
    out.figure(
        scenario,
        "end-to-end jobs/s (submit to completed)",
        rate,
        "1/s",
        Some(target),
    );
    out.figure(
        scenario,
        "submit phase jobs/s (accepted)",
        jobs as f64 / submitted.as_secs_f64(),
        "1/s",
        None,
    );
    out.figure(
        scenario,
        "submissions refused (resource exhausted)",
        refused as f64,
        "count",
        None,
    );
}

/// Submits jobs `indices`, one with SubmitJob or several in one SubmitJobs call, retrying
/// while the gateway answers RESOURCE_EXHAUSTED. Returns how many times it was refused.
async fn submit_jobs(
    client: &mut JobServiceClient<AuthChannel>,
    indices: &[usize],
) -> anyhow::Result<u64> {
    let mut refused = 0;
    loop {
        let answered = match indices {
            [i] => client
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(noop_spec(*i)),
                    tenant: String::new(),
                })
                .await
                .map(drop),
            many => client
                .submit_jobs(pb::SubmitJobsRequest {
                    specs: many.iter().map(|i| noop_spec(*i)).collect(),
                    tenant: String::new(),
                })
                .await
                .map(drop),
        };
        match answered {
            Ok(()) => return Ok(refused),
            Err(status) if status.code() == tonic::Code::ResourceExhausted && refused < 1_000 => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => anyhow::bail!("submit refused: {status}"),
        }
    }
}

/// How jobs are submitted, for the notes: `1 job (SubmitJob)` or `100 jobs (SubmitJobs)`.
pub(crate) fn calls(batch: usize) -> String {
    if batch > 1 {
        format!("{batch} jobs (SubmitJobs)")
    } else {
        "1 job (SubmitJob)".to_owned()
    }
}

/// Parameters of `throughput`.
pub struct ThroughputParams {
    pub jobs: usize,
    pub clients: usize,
    /// Jobs per submission call (1: SubmitJob; more: SubmitJobs).
    pub batch: usize,
    pub agents: usize,
    pub timeout: Duration,
    pub reference_messages: usize,
}

/// N no-op jobs over gRPC by concurrent clients; jobs/s from first submit to last completion,
/// then the reference rates on the same servers.
pub async fn throughput(p: ThroughputParams) -> anyhow::Result<Outcome> {
    let bench = Bench::start(p.agents, NO_ADMISSION_LIMIT).await?;
    let result = throughput_on(&bench, &p).await;
    bench.stop().await;
    let mut out = result?;
    out.note(format!(
        "throughput: {} no-op jobs, {} grpc clients (one http/2 channel each), {} a call, {} \
         simulated agents x {SIM_SLOTS} slots beating every {SIM_HEARTBEAT_MS} ms (spread evenly over it); completion counted in postgres \
         (every 20 ms near the end)",
        p.jobs, p.clients, calls(p.batch), p.agents
    ));
    Ok(out)
}

async fn throughput_on(bench: &Bench, p: &ThroughputParams) -> anyhow::Result<Outcome> {
    const S: &str = "throughput";
    let mut out = Outcome::default();
    let clients =
        connect_clients(bench.system.grpc_addr, &bench.system.admin_token, p.clients).await?;
    let started = Instant::now();
    let refused = submit_all(clients, p.jobs, p.batch).await?;
    let submitted = started.elapsed();
    let wanted = i64::try_from(p.jobs).unwrap_or(i64::MAX);
    let finished = wait_count(
        &bench.pool,
        "SELECT count(*) FROM jobs WHERE state = 'succeeded'",
        wanted,
        p.timeout,
    )
    .await
    .context("jobs did not all complete in time")?;
    let elapsed = finished - started;
    let rate = p.jobs as f64 / elapsed.as_secs_f64();
    rate_figures(&mut out, S, rate, ">= 5,000", p.jobs, submitted, refused);
    let js = reference::jetstream_publishes(
        &bench.system.nats.url(),
        &bench
            .system
            .admin_nats_auth()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        p.reference_messages,
        512,
    )
    .await?;
    let pg = reference::postgres_inserts(&bench.pool, p.reference_messages).await?;
    out.figure(
        S,
        "reference: jetstream persisted publishes/s (512 B)",
        js,
        "1/s",
        None,
    );
    out.figure(
        S,
        "reference: postgres batched inserts/s (1000/stmt)",
        pg,
        "rows/s",
        None,
    );
    out.figure(
        S,
        "ratio: jobs/s to jetstream publishes/s",
        rate / js,
        "x",
        None,
    );
    out.figure(
        S,
        "ratio: jobs/s to postgres inserts/s",
        rate / pg,
        "x",
        None,
    );
    Ok(out)
}

/// Parameters of `latency`.
pub struct LatencyParams {
    pub rate: u32,
    pub duration: Duration,
    pub agents: usize,
    pub timeout: Duration,
}

/// A fixed offered rate for a fixed time (open loop: each submission is its own task), then
/// submit→assigned/started/completed from each job's first attempt.
pub async fn latency(p: LatencyParams) -> anyhow::Result<Outcome> {
    let bench = Bench::start(p.agents, NO_ADMISSION_LIMIT).await?;
    let result = latency_on(&bench, &p).await;
    bench.stop().await;
    let mut out = result?;
    out.note(format!(
        "latency: {} jobs/s offered for {:?} (open loop), {} simulated agents; 'submit' is the \
         job's created_at (set by the gateway on receipt), the rest come from its first \
         attempt (assigned_at by the scheduler, started_at/finished_at when the scheduler \
         recorded the agent's reports) — one clock, one machine",
        p.rate, p.duration, p.agents
    ));
    Ok(out)
}

async fn latency_on(bench: &Bench, p: &LatencyParams) -> anyhow::Result<Outcome> {
    const S: &str = "latency";
    let mut out = Outcome::default();
    let client = bench.system.jobs.clone();
    let period = Duration::from_secs_f64(1.0 / f64::from(p.rate.max(1)));
    let total = (f64::from(p.rate) * p.duration.as_secs_f64()).round() as usize;
    let mut tick = tokio::time::interval(period);
    let mut submissions = JoinSet::new();
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let mut client = client.clone();
        submissions.spawn(async move {
            let t = Instant::now();
            submit_jobs(&mut client, &[i]).await.map(|_| t.elapsed())
        });
    }
    let offered_for = started.elapsed();
    let mut rtt = histogram()?;
    while let Some(joined) = submissions.join_next().await {
        let took = joined.context("a submission panicked")??;
        rtt.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
    }
    let wanted = i64::try_from(total).unwrap_or(i64::MAX);
    // Jobs still unfinished at the deadline are counted, not waited for: the percentiles
    // below then cover the completed ones only, and the table says how many were missing.
    let drained = wait_count(
        &bench.pool,
        "SELECT count(*) FROM jobs WHERE state = 'succeeded'",
        wanted,
        p.timeout,
    )
    .await;
    if let Err(e) = &drained {
        out.note(format!("latency: not every job completed: {e:#}"));
    }
    let FirstAttempts {
        assigned,
        started: started_h,
        completed,
        ..
    } = FirstAttempts::read(&bench.pool).await?;
    out.figure(
        S,
        "jobs not completed by the deadline",
        (total as u64).saturating_sub(completed.len()) as f64,
        "count",
        None,
    );
    out.figure(
        S,
        "achieved offered rate",
        total as f64 / offered_for.as_secs_f64(),
        "1/s",
        None,
    );
    out.percentiles(S, "grpc submit round trip", &rtt, None);
    out.percentiles(S, "submit->assigned", &assigned, None);
    out.percentiles(
        S,
        "submit->started",
        &started_h,
        Some("<= 20 ms at 1,000/s"),
    );
    out.percentiles(
        S,
        "submit->completed",
        &completed,
        Some("<= 50 ms at 1,000/s"),
    );
    Ok(out)
}

/// Times of each succeeded job's first attempt, from its `created_at`, in microseconds (as
/// `latency` reads them), and how the first attempts were spread.
pub(crate) struct FirstAttempts {
    pub assigned: Histogram<u64>,
    pub started: Histogram<u64>,
    pub completed: Histogram<u64>,
    /// Jobs with more than one attempt.
    pub retried: u64,
    /// First attempts by worker id.
    pub per_worker: BTreeMap<String, u64>,
}

impl FirstAttempts {
    pub(crate) async fn read(pool: &PgPool) -> anyhow::Result<FirstAttempts> {
        let rows: Vec<(DateTime<Utc>, serde_json::Value)> =
            sqlx::query_as("SELECT created_at, attempts FROM jobs WHERE state = 'succeeded'")
                .fetch_all(pool)
                .await?;
        let mut first = FirstAttempts {
            assigned: histogram()?,
            started: histogram()?,
            completed: histogram()?,
            retried: 0,
            per_worker: BTreeMap::new(),
        };
        let micros = |from: DateTime<Utc>, to: DateTime<Utc>| {
            u64::try_from((to - from).num_microseconds().unwrap_or(0))
                .unwrap_or(0)
                .max(1)
        };
        for (created, attempts) in rows {
            let attempts: Vec<AttemptRecord> = serde_json::from_value(attempts)?;
            if attempts.len() > 1 {
                first.retried += 1;
            }
            let Some(a) = attempts.first() else {
                continue;
            };
            *first
                .per_worker
                .entry(a.worker_id.as_str().to_owned())
                .or_default() += 1;
            first.assigned.record(micros(created, a.assigned_at))?;
            if let Some(at) = a.started_at {
                first.started.record(micros(created, at))?;
            }
            if let Some(at) = a.finished_at {
                first.completed.record(micros(created, at))?;
            }
        }
        Ok(first)
    }
}

/// Parameters of `overload`.
pub struct OverloadParams {
    pub rate: u32,
    pub duration: Duration,
    pub agents: usize,
    pub max_queued_jobs: u64,
    pub timeout: Duration,
    /// The services as separate processes (each one's memory read apart), not in this one.
    pub processes: bool,
}

/// Submissions in flight at once, at most: past it the harness offers less rather than pile
/// up waiting tasks of its own (their memory would count as the services').
const OVERLOAD_IN_FLIGHT: usize = 4_096;

/// How often the overload scenario reads its process's memory and the queue.
const OVERLOAD_SAMPLE: Duration = Duration::from_millis(250);

/// A rate above what the system completes, offered open loop for a while with the gateway's
/// admission limit set: what is refused (RESOURCE_EXHAUSTED), whether the process's memory
/// stays bounded, and whether every accepted job still runs.
pub async fn overload(p: OverloadParams) -> anyhow::Result<Outcome> {
    use crate::procfs::Pid;

    let mut out = if p.processes {
        overload_processes(&p).await?
    } else {
        let bench = Bench::start(p.agents, p.max_queued_jobs).await?;
        let watched = [(String::new(), Pid::Current)];
        let result = overload_on(&bench.system.jobs, &bench.pool, &watched, &p).await;
        bench.stop().await;
        result?
    };
    let place = if p.processes {
        "the gateway, the scheduler and the registry run as separate processes (release \
         binaries next to this one), each one's rss read apart; the simulated agents and the \
         load run in this process (`harness`)"
    } else {
        "the services, the simulated agents and the load share this process, so its rss is an \
         upper bound of the services'"
    };
    out.note(format!(
        "overload: {} jobs/s offered for {:?} (open loop, one attempt each, at most \
         {OVERLOAD_IN_FLIGHT} in flight), HODEI_MAX_QUEUED_JOBS {}, {} simulated agents x 4 \
         slots; {place}; memory read every {OVERLOAD_SAMPLE:?}",
        p.rate, p.duration, p.max_queued_jobs, p.agents
    ));
    Ok(out)
}

/// `overload` with the services as separate processes.
async fn overload_processes(p: &OverloadParams) -> anyhow::Result<Outcome> {
    use crate::processes::ServiceProcesses;
    use crate::procfs::Pid;

    let services = ServiceProcesses::start(p.max_queued_jobs).await?;
    let pids = services.pids();
    let mut watched: Vec<(String, Pid)> = pids
        .iter()
        .map(|(name, pid)| (name.clone(), Pid::Other(*pid)))
        .collect();
    watched.push(("harness".to_owned(), Pid::Current));
    let result = async {
        let no_credential = hodei_messaging::NatsAuth::load(None, None)?;
        let pool = services.pool().await?;
        let config = sim_fleet(p.agents);
        let sim = match SimAgents::start(&services.nats.url(), &no_credential, config).await {
            Ok(sim) => sim,
            Err(e) => {
                pool.close().await;
                return Err(e);
            }
        };
        let result = async {
            wait_count(
                &pool,
                "SELECT count(*) FROM workers WHERE status = 'ready'",
                i64::try_from(p.agents).unwrap_or(i64::MAX),
                Duration::from_secs(30),
            )
            .await
            .context("simulated agents were not all registered")?;
            overload_on(&services.jobs, &pool, &watched, p).await
        }
        .await;
        sim.stop().await;
        pool.close().await;
        result
    }
    .await;
    // A service that died during the run would leave its figures cut short, silently.
    let died: Vec<&str> = pids
        .iter()
        .filter(|(_, pid)| crate::procfs::memory(Pid::Other(*pid)).is_err())
        .map(|(name, _)| name.as_str())
        .collect();
    let result = match result {
        Ok(out) if died.is_empty() => Ok(out),
        Ok(mut out) => {
            out.note(format!(
                "overload: {} exited during the run; the memory figures of a process end when \
                 it did. The ends of the services' logs:\n{}",
                died.join(", "),
                services.log_tails()
            ));
            Ok(out)
        }
        Err(e) => Err(e.context(format!(
            "the ends of the services' logs:\n{}",
            services.log_tails()
        ))),
    };
    services.stop().await;
    result
}

/// What the offered submissions got.
#[derive(Default)]
struct Answers {
    accepted: u64,
    refused: u64,
    failed: u64,
    first_failure: Option<String>,
    /// When the first refusal came, from the start of the load.
    first_refusal: Option<Duration>,
}

/// Offers the load to `client`, reads the memory of each process in `watched` (by name; one
/// unnamed process: the figures carry no name) and checks on `pool` that every accepted job
/// ran.
async fn overload_on(
    client: &JobServiceClient<AuthChannel>,
    pool: &PgPool,
    watched: &[(String, crate::procfs::Pid)],
    p: &OverloadParams,
) -> anyhow::Result<Outcome> {
    use std::sync::{Arc, Mutex};

    use crate::procfs;

    const S: &str = "overload";
    let mut out = Outcome::default();
    let before = watched
        .iter()
        .map(|(_, pid)| procfs::memory(*pid).map(|m| m.rss_mib()))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let answers = Arc::new(Mutex::new(Answers::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(OVERLOAD_IN_FLIGHT));
    let period = Duration::from_secs_f64(1.0 / f64::from(p.rate.max(1)));
    let total = (f64::from(p.rate) * p.duration.as_secs_f64()).round() as usize;
    // The sampler: (seconds since the start, each watched process's rss MiB) until told to
    // stop; a process that cannot be read (it died) reads as NaN.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = sampling.clone();
        let pids: Vec<procfs::Pid> = watched.iter().map(|(_, pid)| *pid).collect();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(OVERLOAD_SAMPLE);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return samples,
                    _ = tick.tick() => {}
                }
                let rss: Vec<f64> = pids
                    .iter()
                    .map(|pid| procfs::memory(*pid).map_or(f64::NAN, |m| m.rss_mib()))
                    .collect();
                samples.push((started.elapsed().as_secs_f64(), rss));
            }
        })
    };
    let mut tick = tokio::time::interval(period);
    let mut submissions = JoinSet::new();
    let mut not_offered = 0u64;
    let mut rtt_refused = histogram()?;
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            not_offered += 1;
            continue;
        };
        let mut client = client.clone();
        let answers = Arc::clone(&answers);
        submissions.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let since_start = t - started;
            let request = pb::SubmitJobRequest {
                spec: Some(noop_spec(i)),
                tenant: String::new(),
            };
            let result = client.submit_job(request).await;
            let took = t.elapsed();
            let mut a = answers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match result {
                Ok(_) => a.accepted += 1,
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    a.refused += 1;
                    a.first_refusal.get_or_insert(since_start);
                    return Some(took);
                }
                Err(status) => {
                    a.failed += 1;
                    a.first_failure.get_or_insert_with(|| status.to_string());
                }
            }
            None
        });
        while let Some(joined) = submissions.try_join_next() {
            if let Some(took) = joined.context("a submission panicked")? {
                rtt_refused.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
            }
        }
    }
    let offered_for = started.elapsed();
    while let Some(joined) = submissions.join_next().await {
        if let Some(took) = joined.context("a submission panicked")? {
            rtt_refused.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
        }
    }
    let queued_at_end: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'queued'")
        .fetch_one(pool)
        .await?;
    let (accepted, refused, failed, first_failure, first_refusal) = {
        let a = answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            a.accepted,
            a.refused,
            a.failed,
            a.first_failure.clone(),
            a.first_refusal,
        )
    };
    // Nothing accepted is lost: every accepted job runs once the load stops.
    let drained = wait_count(
        pool,
        "SELECT count(*) FROM jobs WHERE state = 'succeeded'",
        i64::try_from(accepted).unwrap_or(i64::MAX),
        p.timeout,
    )
    .await;
    let drained_after = started.elapsed();
    sampling.cancel();
    let samples = sampler.await.context("the memory sampler panicked")?;
    let load_end = offered_for.as_secs_f64();
    // The peak rss of the `i`th watched process between two times.
    let during = |i: usize, from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .filter_map(|(_, m)| m.get(i).copied())
            .fold(f64::NAN, f64::max)
    };
    let offered = total as f64 / load_end;
    out.figure(S, "offered rate", offered, "1/s", None);
    out.figure(
        S,
        "accepted/s while offered",
        accepted as f64 / load_end,
        "1/s",
        None,
    );
    out.figure(S, "submissions accepted", accepted as f64, "count", None);
    out.figure(
        S,
        "submissions refused (resource exhausted)",
        refused as f64,
        "count",
        Some("callers get RESOURCE_EXHAUSTED"),
    );
    out.figure(
        S,
        "submissions failed otherwise",
        failed as f64,
        "count",
        None,
    );
    out.figure(
        S,
        "not offered (harness in-flight cap)",
        not_offered as f64,
        "count",
        None,
    );
    out.percentiles(S, "refusal round trip", &rtt_refused, None);
    out.figure(
        S,
        "queued jobs when the load stopped",
        queued_at_end as f64,
        "count",
        None,
    );
    // Once the queue is full the system is at its steady state: admission refuses what it
    // cannot hold. Bounded memory means the second half of that state needs no more than
    // the first.
    let full = first_refusal.map_or(load_end, |d| d.as_secs_f64());
    let middle = full + (load_end - full) / 2.0;
    out.figure(S, "first refusal, seconds into the load", full, "s", None);
    for (i, (name, _)) in watched.iter().enumerate() {
        let named = |what: &str| {
            if name.is_empty() {
                what.to_owned()
            } else {
                format!("{name}: {what}")
            }
        };
        let bound = (name != "harness").then_some("bounded");
        let before = before.get(i).copied().unwrap_or(f64::NAN);
        out.figure(S, named("rss before the load"), before, "MiB", None);
        let phases = [
            ("peak rss, filling the queue", 0.0, full, None),
            ("peak rss, queue full, first half", full, middle, None),
            ("peak rss, queue full, second half", middle, load_end, bound),
            ("peak rss, draining", load_end, f64::MAX, None),
        ];
        for (what, from, to, target) in phases {
            out.figure(S, named(what), during(i, from, to), "MiB", target);
        }
        // Minute by minute of the full queue: whether the growth levels off.
        let minutes: Vec<String> = (0..)
            .map(|m| full + 60.0 * f64::from(m))
            .take_while(|start| *start < load_end)
            .map(|start| format!("{:.1}", during(i, start, (start + 60.0).min(load_end))))
            .collect();
        out.note(format!(
            "overload: {}: {}",
            named("peak rss in each minute of the full queue (MiB)"),
            minutes.join(", ")
        ));
    }
    match drained {
        Ok(_) => out.figure(
            S,
            "every accepted job succeeded, seconds after the first submission",
            drained_after.as_secs_f64(),
            "s",
            None,
        ),
        Err(e) => out.note(format!(
            "overload: accepted jobs did not all succeed: {e:#}"
        )),
    }
    if let Some(first) = first_failure {
        out.note(format!("overload: first other failure: {first}"));
    }
    Ok(out)
}
