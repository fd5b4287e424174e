//! `queries`: a database with many jobs (loaded with batched inserts, each job built by the
//! domain's own commands, with its events and search vector), then the read models measured
//! through `hodei_storage` — the functions the gateway calls — and through a real gateway
//! over gRPC: ListJobs by state walked with keyset tokens as deep as the data goes (p50/p99
//! per depth), full-text search, a job's history, a job as of a time, and events in a
//! five-minute window, with the EXPLAIN plans of the deepest page and of searches.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use hodei_api_gateway::{Gateway, GatewayConfig};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{AttemptOutcome, Job, JobEvent, JobId, JobSpec, JobState, TenantId};
use hodei_proto::v1 as pb;
use hodei_runtime::BackendConfig;
use hodei_storage::EventRange;
use hodei_storage::jobs::{self, EventFilter, JobFilter};
use hodei_test_support::{TestDatabase, TestNats};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::report::{Outcome, histogram};

const S: &str = "queries";
/// Rows per INSERT statement while loading.
const LOAD_BATCH: usize = 5_000;
/// The states the page queries ask for (rare, middling and common).
const QUERIED: [JobState; 4] = [
    JobState::Queued,
    JobState::Running,
    JobState::Failed,
    JobState::Succeeded,
];

/// The depth buckets pages are measured in: a name and the deepest page it holds.
const DEPTHS: [(&str, usize); 5] = [
    ("page 1", 1),
    ("pages 2-10", 10),
    ("pages 11-100", 100),
    ("pages 101-1000", 1000),
    ("pages over 1000", usize::MAX),
];

/// Parameters of `queries`.
pub struct QueriesParams {
    pub jobs: usize,
    pub pages_per_state: usize,
    /// Keep the database at the end (its URL is printed).
    pub keep_database: bool,
}

pub async fn queries(p: QueriesParams) -> anyhow::Result<Outcome> {
    let database = TestDatabase::create().await?;
    let pool = database.connect().await?;
    let result = run(&pool, &database, &p).await;
    pool.close().await;
    if p.keep_database {
        eprintln!("queries: database kept: {}", database.url());
    } else {
        let _ = database.cleanup().await;
    }
    result
}

/// Reads measured per read model, through storage and through gRPC.
const READS: usize = 200;
/// Jobs per search page.
const SEARCH_PAGE: u32 = 50;

async fn run(pool: &PgPool, database: &TestDatabase, p: &QueriesParams) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    hodei_storage::migrate(pool)
        .await
        .context("failed to migrate")?;
    let started = Instant::now();
    load(pool, p.jobs).await?;
    let loaded = started.elapsed();
    // What autovacuum would do to the freshly loaded tables (the insert threshold starts it
    // after a bulk load), done now so that it does not run during the measurements: on two
    // cores it took the tail of the reads with it.
    let vacuumed = Instant::now();
    sqlx::query("VACUUM (ANALYZE) jobs, job_search, job_events")
        .execute(pool)
        .await?;
    out.note(format!(
        "queries: VACUUM (ANALYZE) of the loaded tables before the reads took {:.1} s",
        vacuumed.elapsed().as_secs_f64()
    ));
    out.note(prewarm(pool).await?);
    out.figure(
        S,
        format!("load: {} jobs, rows/s (batched inserts)", p.jobs),
        p.jobs as f64 / loaded.as_secs_f64(),
        "rows/s",
        None,
    );
    let spread: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY 2 DESC")
            .fetch_all(pool)
            .await?;
    out.note(format!(
        "queries: jobs by state: {}",
        spread
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // Each state's pages are walked as a client paginates ListJobs: page 1, then the page
    // before the last id seen (the keyset token), as deep as the data goes; at the end the
    // walk starts again from page 1 until `pages_per_state` pages were read.
    let mut by_depth: Vec<(&str, usize, hdrhistogram::Histogram<u64>)> = DEPTHS
        .iter()
        .map(|(name, deepest)| histogram().map(|h| (*name, *deepest, h)))
        .collect::<Result<_, _>>()?;
    let mut deepest_page = 0usize;
    let mut deep_cursor: Option<(JobState, JobId)> = None;
    for state in QUERIED {
        let mut h = histogram()?;
        let mut filter = JobFilter {
            tenant: None,
            states: vec![state],
            limit: 100,
            ..JobFilter::default()
        };
        // Warm the statement cache and the buffers once before measuring.
        jobs::list(pool, &filter).await?;
        let mut depth = 0usize;
        for _ in 0..p.pages_per_state {
            depth += 1;
            let t = Instant::now();
            let page = jobs::list(pool, &filter).await?;
            let took = duration_micros(t.elapsed());
            anyhow::ensure!(
                depth > 1 || !page.is_empty(),
                "no {} jobs listed",
                state.as_str()
            );
            h.record(took)?;
            if let Some((_, _, bucket)) = by_depth
                .iter_mut()
                .find(|(_, deepest, _)| depth <= *deepest)
            {
                bucket.record(took)?;
            }
            if depth > deepest_page {
                deepest_page = depth;
                deep_cursor = filter.before.map(|id| (state, id));
            }
            filter.before = match page.last() {
                Some(last) if page.len() == 100 => Some(last.id()),
                // The end of this state's jobs: the next page is page 1 again.
                _ => {
                    depth = 0;
                    None
                }
            };
        }
        out.figure(
            S,
            format!("list by state={} keyset walk p50", state.as_str()),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            "ms",
            None,
        );
        out.figure(
            S,
            format!("list by state={} keyset walk p99", state.as_str()),
            h.value_at_quantile(0.99) as f64 / 1000.0,
            "ms",
            Some("<= 5 ms"),
        );
    }
    let mut walked = Vec::new();
    for (name, _, h) in &by_depth {
        if h.is_empty() {
            continue;
        }
        walked.push(format!("{name}: {}", h.len()));
        out.percentiles(
            S,
            &format!("list page 100 at {name}, all states"),
            h,
            Some("<= 5 ms"),
        );
    }
    out.note(format!(
        "queries: {} pages per state, sequential, walked with keyset tokens (before = the last \
         id of the previous page) from page 1 as deep as each state goes, then from page 1 \
         again; pages measured per depth: {}; deepest page {deepest_page}",
        p.pages_per_state,
        walked.join(", ")
    ));
    if let Some((state, before)) = deep_cursor {
        out.note(explain(pool, state, Some(before), deepest_page).await?);
    }
    out.note(explain(pool, JobState::Queued, None, 1).await?);
    read_models(pool, &mut out).await?;
    over_grpc(pool, database, p, &mut out).await?;
    Ok(out)
}

/// Reads every table and index of the schema into the OS page cache (`pg_prewarm`, mode
/// `read`), so that the reads measure the database with its working set in memory, as a
/// server sized for this many jobs keeps it, and not this VM's disk: a page of 100 jobs of a
/// 10 % state visits ~140 heap pages, which take ~50 µs each to read from the disk here (7 ms
/// a page) and ~5 µs from the page cache.
async fn prewarm(pool: &PgPool) -> anyhow::Result<String> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        .execute(pool)
        .await
        .context("failed to create the pg_prewarm extension")?;
    let started = Instant::now();
    // The size in bytes from the server's own block size, and shared_buffers, in one read.
    let (relations, bytes, shared_buffers): (i64, Option<i64>, String) = sqlx::query_as(
        "SELECT count(*),
                (sum(pg_prewarm(c.oid, 'read')) * current_setting('block_size')::int8)::int8,
                current_setting('shared_buffers')
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'i')",
    )
    .fetch_one(pool)
    .await
    .context("failed to prewarm the tables")?;
    Ok(format!(
        "queries: before the reads, {relations} tables and indexes ({} MiB) were read into the \
         OS page cache with pg_prewarm('read') in {:.1} s: the figures are those of a database \
         whose working set is in memory (shared_buffers stays at {shared_buffers})",
        bytes.unwrap_or(0) / (1024 * 1024),
        started.elapsed().as_secs_f64(),
    ))
}

/// `n` ids spread over the table (every `count / n`-th by id order).
async fn sample_ids(
    pool: &PgPool,
    n: usize,
) -> anyhow::Result<Vec<(JobId, chrono::DateTime<Utc>)>> {
    let rows: Vec<(uuid::Uuid, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, created_at FROM (
             SELECT id, created_at, row_number() OVER (ORDER BY id) AS r,
                    count(*) OVER () AS total FROM jobs) t
         WHERE r % GREATEST(total / $1, 1) = 0 LIMIT $1",
    )
    .bind(i64::try_from(n)?)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, at)| (JobId::from_uuid(id), at))
        .collect())
}

/// What a search read asks for: words and states.
fn searches(i: usize) -> [(&'static str, String, Vec<JobState>); 4] {
    [
        (
            "rare word (1 job in 10,000)",
            format!("artifact-{}", (i * 7919) % 10_000),
            vec![],
        ),
        (
            "middling word (1 in 500)",
            format!("repo-{}", (i * 31) % 500),
            vec![],
        ),
        ("common word (every job)", "make".to_owned(), vec![]),
        (
            "middling word and state=succeeded",
            format!("repo-{}", (i * 17) % 500),
            vec![JobState::Succeeded],
        ),
    ]
}

fn micros_since(t: Instant) -> u64 {
    duration_micros(t.elapsed())
}

/// Search, history, as-of and events-in-a-window reads through `hodei_storage`.
async fn read_models(pool: &PgPool, out: &mut Outcome) -> anyhow::Result<()> {
    let ids = sample_ids(pool, READS).await?;
    let mut by_search: Vec<(&str, hdrhistogram::Histogram<u64>)> = Vec::new();
    // The slowest search with a state filter, to EXPLAIN.
    let mut slowest: Option<(u64, JobFilter)> = None;
    for i in 0..READS {
        for (what, words, states) in searches(i) {
            let filter = JobFilter {
                tenant: None,
                states,
                search: Some(words),
                limit: SEARCH_PAGE,
                ..JobFilter::default()
            };
            let t = Instant::now();
            jobs::list(pool, &filter).await?;
            let took = micros_since(t);
            if !filter.states.is_empty() && slowest.as_ref().is_none_or(|(t, _)| took > *t) {
                slowest = Some((took, filter));
            }
            match by_search.iter_mut().find(|(w, _)| *w == what) {
                Some((_, h)) => h.record(took)?,
                None => {
                    let mut h = histogram()?;
                    h.record(took)?;
                    by_search.push((what, h));
                }
            }
        }
    }
    for (what, h) in &by_search {
        out.percentiles(
            S,
            &format!("storage: search page {SEARCH_PAGE}, {what}"),
            h,
            Some("<= 20 ms"),
        );
    }
    let (mut history, mut as_of, mut window) = (histogram()?, histogram()?, histogram()?);
    let oldest: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT min(at) FROM job_events")
        .fetch_one(pool)
        .await?;
    let span = (Utc::now() - oldest).num_seconds().max(301);
    for (i, (id, created)) in ids.iter().enumerate() {
        let t = Instant::now();
        let events = jobs::history(pool, *id, EventRange::from(1)).await?;
        history.record(micros_since(t))?;
        anyhow::ensure!(!events.is_empty(), "job {id} has no history");
        let t = Instant::now();
        let range = EventRange {
            from_seq: 1,
            until: Some(*created + chrono::Duration::milliseconds(15)),
            ..EventRange::default()
        };
        let folded = Job::from_events(&jobs::history(pool, *id, range).await?)?;
        as_of.record(micros_since(t))?;
        anyhow::ensure!(folded.version() >= 1);
        let from = oldest + chrono::Duration::seconds((i as i64 * 7919) % (span - 300));
        let filter = EventFilter {
            from: Some(from),
            to: Some(from + chrono::Duration::seconds(300)),
            limit: 100,
            ..EventFilter::default()
        };
        let t = Instant::now();
        jobs::list_events(pool, &filter).await?;
        window.record(micros_since(t))?;
    }
    out.percentiles(
        S,
        "storage: a job's whole history",
        &history,
        Some("<= 10 ms"),
    );
    out.percentiles(
        S,
        "storage: a job as of a time (events read and folded)",
        &as_of,
        Some("<= 10 ms"),
    );
    out.percentiles(
        S,
        "storage: events in a 5-minute window, page 100",
        &window,
        None,
    );
    if let Some((took, filter)) = slowest {
        let plan = jobs::explain_list(pool, &filter)
            .await
            .context("failed to explain a search")?;
        out.note(format!(
            "queries: EXPLAIN (ANALYZE, BUFFERS) of the slowest search with a state ({:.1} ms when \
             measured), '{}' state={}:\n    {}",
            took as f64 / 1000.0,
            filter.search.as_deref().unwrap_or_default(),
            filter.states.first().map_or("", JobState::as_str),
            plan.join("\n    ")
        ));
    }
    for (what, words) in [("a rare word", "artifact-4242"), ("a common word", "make")] {
        let filter = JobFilter {
            tenant: None,
            search: Some(words.to_owned()),
            limit: SEARCH_PAGE,
            ..JobFilter::default()
        };
        let plan = jobs::explain_list(pool, &filter)
            .await
            .context("failed to explain a search")?;
        out.note(format!(
            "queries: EXPLAIN (ANALYZE, BUFFERS) of a search page {SEARCH_PAGE} for {what} ('{words}'):\n    {}",
            plan.join("\n    ")
        ));
    }
    Ok(())
}

/// The same reads, and a keyset walk, through a real gateway over gRPC (its own private
/// nats-server; no scheduler, so nothing moves the loaded jobs meanwhile).
async fn over_grpc(
    pool: &PgPool,
    database: &TestDatabase,
    p: &QueriesParams,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let nats = TestNats::start().await?;
    let backends = BackendConfig::new(nats.url(), database.url());
    let gateway = Gateway::build(GatewayConfig::new(backends, ([127, 0, 0, 1], 0).into()))
        .await
        .context("failed to start the gateway")?;
    let addr = gateway.local_addr();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    let url = format!("http://{addr}");
    let mut result = grpc_reads(pool, &url, p, out).await;
    if result.is_ok() {
        result = retention(pool, &url, out).await;
    }
    shutdown.cancel();
    let _ = serving.await;
    result
}

async fn grpc_reads(
    pool: &PgPool,
    url: &str,
    p: &QueriesParams,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let mut client = crate::system::admin_client(pool, url).await?;
    // The keyset walk of `succeeded` jobs, as a client pages ListJobs.
    let mut walk = histogram()?;
    let mut token = String::new();
    for _ in 0..p.pages_per_state {
        let t = Instant::now();
        let page = client
            .list_jobs(pb::ListJobsRequest {
                states: vec![pb::JobState::Succeeded.into()],
                page_size: 100,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        walk.record(micros_since(t))?;
        token = page.next_page_token;
    }
    out.percentiles(
        S,
        &format!(
            "grpc: ListJobs state=succeeded, {} pages of 100 walked",
            p.pages_per_state
        ),
        &walk,
        Some("<= 5 ms"),
    );
    let (mut rare, mut common) = (histogram()?, histogram()?);
    for i in 0..READS {
        for (h, words) in [
            (&mut rare, format!("artifact-{}", (i * 7919) % 10_000)),
            (&mut common, "make".to_owned()),
        ] {
            let t = Instant::now();
            client
                .list_jobs(pb::ListJobsRequest {
                    query: words,
                    page_size: SEARCH_PAGE,
                    ..Default::default()
                })
                .await?;
            h.record(micros_since(t))?;
        }
    }
    out.percentiles(
        S,
        &format!("grpc: ListJobs query, page {SEARCH_PAGE}, a rare word"),
        &rare,
        Some("<= 20 ms"),
    );
    out.percentiles(
        S,
        &format!("grpc: ListJobs query, page {SEARCH_PAGE}, a common word"),
        &common,
        Some("<= 20 ms"),
    );
    let (mut history, mut as_of) = (histogram()?, histogram()?);
    for (id, created) in sample_ids(pool, READS).await? {
        let t = Instant::now();
        client
            .get_job_history(pb::GetJobHistoryRequest {
                job_id: id.to_string(),
                ..Default::default()
            })
            .await?;
        history.record(micros_since(t))?;
        let t = Instant::now();
        client
            .get_job(pb::GetJobRequest {
                job_id: id.to_string(),
                as_of: Some(pb::get_job_request::AsOf::AsOfTime(hodei_proto::timestamp(
                    created + chrono::Duration::milliseconds(15),
                ))),
            })
            .await?;
        as_of.record(micros_since(t))?;
    }
    out.percentiles(S, "grpc: GetJobHistory", &history, Some("<= 10 ms"));
    out.percentiles(S, "grpc: GetJob as_of_time", &as_of, Some("<= 10 ms"));
    Ok(())
}

/// Batches of retention measured: each moves up to `RETENTION_BATCH` jobs.
const RETENTION_BATCHES: usize = 40;
const RETENTION_BATCH: u32 = 500;

/// Retention on the loaded table: `RETENTION_BATCHES` batches of the oldest ended jobs moved
/// to the archive (each its own transaction, timed: how long its rows stay locked), the space
/// a job takes hot and archived, and an archived job read back by id through storage and
/// through GetJob.
async fn retention(pool: &PgPool, url: &str, out: &mut Outcome) -> anyhow::Result<()> {
    let (hot_bytes, hot_jobs): (i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('jobs') + pg_total_relation_size('job_events')
                + pg_total_relation_size('job_search'), (SELECT count(*) FROM jobs)",
    )
    .fetch_one(pool)
    .await?;
    // Everything that ended before the newest job was created: the oldest go first.
    let cutoff = Utc::now();
    let mut batches = histogram()?;
    let mut moved = hodei_storage::archive::Moved::default();
    let started = Instant::now();
    for _ in 0..RETENTION_BATCHES {
        let t = Instant::now();
        let batch = hodei_storage::archive::archive_batch(pool, cutoff, RETENTION_BATCH).await?;
        batches.record(micros_since(t))?;
        moved += batch;
    }
    let took = started.elapsed();
    anyhow::ensure!(moved.jobs > 0, "retention moved nothing");
    out.percentiles(
        S,
        &format!("retention: one batch of {RETENTION_BATCH} jobs moved (one transaction)"),
        &batches,
        None,
    );
    out.figure(
        S,
        "retention: jobs archived per second, one archiver",
        moved.jobs as f64 / took.as_secs_f64(),
        "jobs/s",
        None,
    );
    let archive_bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('jobs_archive')")
        .fetch_one(pool)
        .await?;
    let archived: Vec<(uuid::Uuid, i32)> =
        sqlx::query_as("SELECT id, octet_length(events) FROM jobs_archive ORDER BY id LIMIT $1")
            .bind(i64::try_from(READS)?)
            .fetch_all(pool)
            .await?;
    let (mut storage, mut grpc) = (histogram()?, histogram()?);
    let mut client = crate::system::admin_client(pool, url).await?;
    let (mut json_bytes, mut stored_bytes) = (0usize, 0usize);
    for (id, stored) in &archived {
        let id = JobId::from_uuid(*id);
        let t = Instant::now();
        anyhow::ensure!(jobs::get(pool, id).await?.is_none());
        hodei_storage::archive::job_archived_at(pool, id)
            .await?
            .context("an archived job is not in the archive")?;
        let events = hodei_storage::archive::job_history(pool, id, EventRange::from(1)).await?;
        Job::from_events(&events)?;
        storage.record(micros_since(t))?;
        json_bytes += serde_json::to_vec(&events)?.len();
        stored_bytes += usize::try_from(*stored)?;
        let t = Instant::now();
        let job = client
            .get_job(pb::GetJobRequest {
                job_id: id.to_string(),
                as_of: None,
            })
            .await?
            .into_inner()
            .job
            .context("GetJob answered without a job")?;
        grpc.record(micros_since(t))?;
        anyhow::ensure!(job.archived_at.is_some(), "job {id} is not said archived");
    }
    out.percentiles(
        S,
        "storage: an archived job by id (hot miss, archive, fold)",
        &storage,
        None,
    );
    out.percentiles(S, "grpc: GetJob of an archived job", &grpc, None);
    let sampled = archived.len().max(1);
    out.note(format!(
        "queries: retention moved {} jobs and {} events in {RETENTION_BATCHES} batches; a job \
         takes {} bytes hot (jobs, job_events, job_search and their indexes) and {} bytes in \
         jobs_archive; over {} archived jobs its history is {} bytes of JSON and {} bytes \
         stored (zstd, {:.1}x)",
        moved.jobs,
        moved.events,
        hot_bytes / hot_jobs.max(1),
        archive_bytes / i64::try_from(moved.jobs)?.max(1),
        archived.len(),
        json_bytes / sampled,
        stored_bytes / sampled,
        json_bytes as f64 / stored_bytes.max(1) as f64,
    ));
    Ok(())
}

fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// EXPLAIN ANALYZE of the statement `jobs::list` runs for `state`, page of 100, before
/// `before` (page `depth` of a walk).
async fn explain(
    pool: &PgPool,
    state: JobState,
    before: Option<JobId>,
    depth: usize,
) -> anyhow::Result<String> {
    let filter = JobFilter {
        tenant: None,
        states: vec![state],
        limit: 100,
        before,
        ..JobFilter::default()
    };
    let rows = jobs::explain_list(pool, &filter)
        .await
        .context("failed to explain the list query")?;
    Ok(format!(
        "queries: EXPLAIN (ANALYZE, BUFFERS) of ListJobs state={} page 100 at page {depth}:\n    {}",
        state.as_str(),
        rows.join("\n    ")
    ))
}

/// The state of row `i`: a fixed, scattered spread (70% succeeded, 10% failed, 5% cancelled,
/// 2% timed out, 8% queued, 3% running, 2% assigned).
fn state_of(i: usize) -> JobState {
    match i.wrapping_mul(2_654_435_761) % 100 {
        0..70 => JobState::Succeeded,
        70..80 => JobState::Failed,
        80..85 => JobState::Cancelled,
        85..87 => JobState::TimedOut,
        87..95 => JobState::Queued,
        95..98 => JobState::Running,
        _ => JobState::Assigned,
    }
}

/// Job `i` as the live path would have recorded it: submitted at `created_at` and moved to
/// `state` by the domain's own commands, with its events. Names, labels, commands and output
/// tails vary so that search terms match few (`artifact-N`: 1 job in 10,000), some (`repo-N`:
/// 1 in 500) or every job (`make`).
fn job_of(i: usize, created_at: chrono::DateTime<Utc>) -> anyhow::Result<(Job, Vec<JobEvent>)> {
    let target = format!("target-{}", i % 100);
    let mut draft = JobSpecDraft::exec(format!("noop-{i}"), &["make", &target]);
    draft
        .labels
        .insert("team".into(), format!("team-{}", i % 20));
    draft
        .labels
        .insert("repo".into(), format!("repo-{}", i % 500));
    let spec = JobSpec::try_from(draft).map_err(|e| anyhow::anyhow!("invalid spec: {e}"))?;
    // The id of a job created at `created_at`, as `JobId::new()` would have made it then:
    // ids are time-ordered, and retention walks them by creation time.
    let micros = created_at.timestamp_micros();
    let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        u64::try_from(micros / 1_000_000)?,
        u32::try_from(micros % 1_000_000)? * 1000,
    ));
    let (mut job, first) = Job::submit(JobId::from_uuid(id), TenantId::default(), spec, created_at);
    let mut events = vec![first];
    let state = state_of(i);
    let worker: hodei_domain::WorkerId = format!("worker-{:04}", i % 1000).parse()?;
    let at = |ms: i64| created_at + chrono::Duration::milliseconds(ms);
    if state == JobState::Cancelled {
        events.extend(job.request_cancel("bench", at(5))?);
    } else if state != JobState::Queued {
        events.push(job.assign(worker, at(10))?);
        if state != JobState::Assigned {
            events.push(job.start(job.current_attempt(), at(20))?);
        }
        let outcome = match state {
            JobState::Succeeded => Some(AttemptOutcome::Exited { code: 0 }),
            JobState::Failed => Some(AttemptOutcome::Exited { code: 1 }),
            JobState::TimedOut => Some(AttemptOutcome::TimedOut),
            _ => None,
        };
        if let Some(outcome) = outcome {
            let tail = vec![format!("artifact-{} built", i % 10_000), "done".to_owned()];
            events.push(job.finish_with_output(
                job.current_attempt(),
                outcome,
                tail,
                at(900),
                0.0,
            )?);
        }
    }
    Ok((job, events))
}

/// Inserts `count` jobs with their events and search vectors, `LOAD_BATCH` per statement
/// (`INSERT … SELECT FROM unnest`), every column as the gateway and scheduler write it.
async fn load(pool: &PgPool, count: usize) -> anyhow::Result<()> {
    let now = Utc::now();
    let mut done = 0;
    while done < count {
        let n = LOAD_BATCH.min(count - done);
        let mut rows = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n * 4);
        for i in done..done + n {
            // Spread creation over the last ~12 days (at 1,000,000 jobs), oldest first.
            let created_at = now - chrono::Duration::seconds(i64::try_from(count - i)?);
            let (job, history) = job_of(i, created_at)?;
            rows.push(job);
            events.extend(history);
        }
        let ids: Vec<uuid::Uuid> = rows.iter().map(|j| j.id().as_uuid()).collect();
        let names: Vec<&str> = rows.iter().map(|j| j.spec().name.as_str()).collect();
        let states: Vec<&str> = rows.iter().map(|j| j.state().as_str()).collect();
        let specs = rows
            .iter()
            .map(|j| serde_json::to_value(j.spec()))
            .collect::<Result<Vec<_>, _>>()?;
        let labels = rows
            .iter()
            .map(|j| serde_json::to_value(&j.spec().labels))
            .collect::<Result<Vec<_>, _>>()?;
        let attempts = rows
            .iter()
            .map(|j| serde_json::to_value(j.attempts()))
            .collect::<Result<Vec<_>, _>>()?;
        let current: Vec<i32> = rows
            .iter()
            .map(|j| i32::try_from(j.current_attempt().get()).unwrap_or(i32::MAX))
            .collect();
        let workers: Vec<Option<String>> = rows
            .iter()
            .map(|j| j.current_attempt_record().map(|a| a.worker_id.to_string()))
            .collect();
        let cancels: Vec<bool> = rows.iter().map(Job::cancel_requested).collect();
        let exit_codes: Vec<Option<i32>> = rows.iter().map(Job::exit_code).collect();
        let created: Vec<_> = rows.iter().map(Job::created_at).collect();
        let updated: Vec<_> = rows.iter().map(Job::updated_at).collect();
        let versions: Vec<i64> = rows
            .iter()
            .map(|j| i64::try_from(j.version()).unwrap_or(i64::MAX))
            .collect();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, tenant, name, state, priority, spec, labels, idempotency_key,
                               attempts, current_attempt, worker_id, cancel_requested, not_before,
                               reason, exit_code, created_at, updated_at, version)
             SELECT id, 'default', name, state, 0, spec, labels, NULL, attempts, current,
                    worker, cancel, NULL, NULL, exit_code, created, updated, version
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[],
                         $7::int4[], $8::text[], $9::bool[], $10::int4[], $11::timestamptz[],
                         $12::timestamptz[], $13::int8[])
                  AS t(id, name, state, spec, labels, attempts, current, worker, cancel, exit_code,
                       created, updated, version)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&states)
        .bind(&specs)
        .bind(&labels)
        .bind(&attempts)
        .bind(&current)
        .bind(&workers)
        .bind(&cancels)
        .bind(&exit_codes)
        .bind(&created)
        .bind(&updated)
        .bind(&versions)
        .execute(&mut *tx)
        .await
        .context("failed to load jobs")?;
        sqlx::query(
            "INSERT INTO job_search (job_id, state, search)
             SELECT id, state, hodei_job_search(name, labels, spec, attempts -> -1 -> 'output_tail')
             FROM jobs WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .context("failed to load search vectors")?;
        let job_ids: Vec<uuid::Uuid> = events.iter().map(|e| e.job_id.as_uuid()).collect();
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| i64::try_from(e.seq).unwrap_or(i64::MAX))
            .collect();
        let event_ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
        let ats: Vec<_> = events.iter().map(|e| e.at).collect();
        let data = events
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO job_events (job_id, seq, event_id, type, at, data)
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::timestamptz[], $6::jsonb[])",
        )
        .bind(&job_ids)
        .bind(&seqs)
        .bind(&event_ids)
        .bind(&kinds)
        .bind(&ats)
        .bind(&data)
        .execute(&mut *tx)
        .await
        .context("failed to load events")?;
        tx.commit().await?;
        done += n;
    }
    Ok(())
}
