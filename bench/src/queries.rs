//! `queries`: a database with many jobs (loaded with batched inserts straight into `jobs`, a
//! realistic spread of states), then ListJobs by state, pages of 100 walked with keyset tokens
//! as deep as the data goes, through `hodei_storage::jobs::list` — the function the gateway
//! calls — with p50/p99 per depth and the EXPLAIN plans of page 1 and the deepest page.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{AttemptNumber, AttemptOutcome, AttemptRecord, JobId, JobSpec, JobState};
use hodei_storage::jobs::{self, JobFilter};
use hodei_test_support::TestDatabase;
use sqlx::PgPool;

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
}

pub async fn queries(p: QueriesParams) -> anyhow::Result<Outcome> {
    let database = TestDatabase::create().await?;
    let pool = database.connect().await?;
    let result = run(&pool, &p).await;
    pool.close().await;
    let _ = database.cleanup().await;
    result
}

async fn run(pool: &PgPool, p: &QueriesParams) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    hodei_storage::migrate(pool)
        .await
        .context("failed to migrate")?;
    let started = Instant::now();
    load(pool, p.jobs).await?;
    let loaded = started.elapsed();
    sqlx::query("ANALYZE jobs").execute(pool).await?;
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
    out.note(
        "queries: full-text search does not exist in hodei yet (no api, no index): not measured",
    );
    Ok(out)
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

/// Inserts `count` jobs, `LOAD_BATCH` per `INSERT … SELECT FROM unnest`, with every column the
/// gateway and scheduler write: a valid spec, an attempt record for jobs past `queued`.
async fn load(pool: &PgPool, count: usize) -> anyhow::Result<()> {
    let spec = JobSpec::try_from(JobSpecDraft::exec("noop", &["true"]))
        .map_err(|e| anyhow::anyhow!("invalid spec: {e}"))?;
    let spec = serde_json::to_value(&spec)?;
    let now = Utc::now();
    let mut done = 0;
    while done < count {
        let n = LOAD_BATCH.min(count - done);
        let mut ids = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut specs = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut current = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        let mut exit_codes = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        for i in done..done + n {
            let id = JobId::new();
            let state = state_of(i);
            let name = format!("noop-{i}");
            let mut job_spec = spec.clone();
            job_spec["name"] = serde_json::Value::String(name.clone());
            // Spread creation over the last ~12 days, oldest first, as ids are.
            let created_at = now - chrono::Duration::seconds(i64::try_from(count - i)?);
            let worker = format!("worker-{:04}", i % 1000);
            let (record, exit_code, version) = match state {
                JobState::Queued => (None, None, 1_i64),
                JobState::Assigned | JobState::Running => (
                    Some(AttemptRecord {
                        attempt: AttemptNumber::new(1),
                        worker_id: worker.parse()?,
                        assigned_at: created_at,
                        started_at: (state == JobState::Running).then_some(created_at),
                        finished_at: None,
                        outcome: None,
                        output_tail: Vec::new(),
                    }),
                    None,
                    3,
                ),
                _ => {
                    let code = i32::from(state != JobState::Succeeded);
                    (
                        Some(AttemptRecord {
                            attempt: AttemptNumber::new(1),
                            worker_id: worker.parse()?,
                            assigned_at: created_at,
                            started_at: Some(created_at),
                            finished_at: Some(created_at),
                            outcome: Some(AttemptOutcome::Exited { code }),
                            output_tail: Vec::new(),
                        }),
                        Some(code),
                        4,
                    )
                }
            };
            ids.push(id.as_uuid());
            names.push(name);
            states.push(state.as_str());
            specs.push(job_spec);
            current.push(i32::from(record.is_some()));
            workers.push(record.as_ref().map(|r| r.worker_id.to_string()));
            attempts.push(serde_json::to_value(
                record.into_iter().collect::<Vec<_>>(),
            )?);
            exit_codes.push(exit_code);
            created.push(created_at);
            versions.push(version);
        }
        sqlx::query(
            "INSERT INTO jobs (id, tenant, name, state, priority, spec, labels, idempotency_key,
                               attempts, current_attempt, worker_id, cancel_requested, not_before,
                               reason, exit_code, created_at, updated_at, version)
             SELECT id, 'default', name, state, 0, spec, '{}'::jsonb, NULL, attempts, current,
                    worker, false, NULL, NULL, exit_code, created, created, version
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[],
                         $6::int4[], $7::text[], $8::int4[], $9::timestamptz[], $10::int8[])
                  AS t(id, name, state, spec, attempts, current, worker, exit_code, created, version)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&states)
        .bind(&specs)
        .bind(&attempts)
        .bind(&current)
        .bind(&workers)
        .bind(&exit_codes)
        .bind(&created)
        .bind(&versions)
        .execute(pool)
        .await
        .context("failed to load jobs")?;
        done += n;
    }
    Ok(())
}
