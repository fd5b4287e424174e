//! The read models of the event store against a real PostgreSQL database (a fresh one per
//! test): full-text search kept by both submission paths and by an attempt's end, a job's
//! history by sequence number and time, and events across jobs by time, type, tenant and
//! labels, walked with the keyset cursor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{AttemptOutcome, Job, JobId, JobSpec, JobState, TenantId};
use hodei_storage::jobs::{self, EventFilter, JobFilter};
use hodei_storage::{EventRange, driver};
use hodei_test_support::TestDatabase;

async fn database() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await.unwrap();
    let pool = db.connect().await.unwrap();
    hodei_storage::migrate(&pool).await.unwrap();
    (db, pool)
}

fn job(
    tenant: &str,
    name: &str,
    argv: &[&str],
    labels: &[(&str, &str)],
) -> (Job, hodei_domain::JobEvent) {
    let mut draft = JobSpecDraft::exec(name, argv);
    for (k, v) in labels {
        draft.labels.insert((*k).into(), (*v).into());
    }
    Job::submit(
        JobId::new(),
        tenant.parse::<TenantId>().unwrap(),
        JobSpec::try_from(draft).unwrap(),
        Utc::now(),
    )
}

/// Submits through the single-job path.
async fn submit(
    pool: &sqlx::PgPool,
    tenant: &str,
    name: &str,
    argv: &[&str],
    labels: &[(&str, &str)],
) -> Job {
    let (job, event) = job(tenant, name, argv, labels);
    driver::submit_job(pool, &job, &event, &[]).await.unwrap();
    job
}

/// Assigns, starts and ends `job`'s attempt with `tail` (exit 0), one save per step, through
/// the batch save (`save_many`) or the single one (`save`).
async fn run_to_end(pool: &sqlx::PgPool, job: &mut Job, tail: &[&str], batched: bool) {
    let now = Utc::now();
    let mut steps = vec![job.assign("w1".parse().unwrap(), now).unwrap()];
    let attempt = job.current_attempt();
    let before = job.version() - 1;
    steps.push(job.start(attempt, now).unwrap());
    steps.push(
        job.finish_with_output(
            attempt,
            AttemptOutcome::Exited { code: 0 },
            tail.iter().map(|s| (*s).to_owned()).collect(),
            now,
            0.0,
        )
        .unwrap(),
    );
    let mut tx = pool.begin().await.unwrap();
    if batched {
        let events: Vec<&hodei_domain::JobEvent> = steps.iter().collect();
        jobs::save_many(&mut tx, &[(job, before)], &events, &[])
            .await
            .unwrap();
    } else {
        jobs::save(&mut tx, job, before, &steps).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn search(pool: &sqlx::PgPool, words: &str, states: Vec<JobState>, limit: u32) -> Vec<JobId> {
    let mut filter = JobFilter {
        tenant: None,
        states,
        search: Some(words.to_owned()),
        limit,
        ..JobFilter::default()
    };
    let mut found = Vec::new();
    loop {
        let page = jobs::list(pool, &filter).await.unwrap();
        found.extend(page.iter().map(Job::id));
        match page.last() {
            Some(last) if page.len() == limit as usize => filter.before = Some(last.id()),
            _ => return found,
        }
    }
}

fn newest_first(jobs: &[&Job]) -> Vec<JobId> {
    let mut ids: Vec<JobId> = jobs.iter().map(|j| j.id()).collect();
    ids.sort_by_key(|id| std::cmp::Reverse(id.as_uuid()));
    ids
}

#[tokio::test]
async fn search_matches_name_labels_command_and_the_latest_output_tail() {
    let (db, pool) = database().await;
    let mut deploy = submit(
        &pool,
        "default",
        "deploy-web",
        &["kubectl", "apply"],
        &[("team", "platform")],
    )
    .await;
    let mut build = submit(
        &pool,
        "default",
        "build-api",
        &["cargo", "build", "--release"],
        &[("team", "core")],
    )
    .await;
    let lint = submit(
        &pool,
        "default",
        "lint-api",
        &["cargo", "clippy"],
        &[("repo", "hodei")],
    )
    .await;
    // The batch submission path keeps the index too.
    let (batched, event) = job(
        "default",
        "nightly-report",
        &["python3", "report.py"],
        &[("team", "data")],
    );
    let trace = BTreeMap::new();
    let mut tx = pool.begin().await.unwrap();
    jobs::insert_many(
        &mut tx,
        &[jobs::NewJob {
            job: &batched,
            event: &event,
            trace: &trace,
            messages: &[],
            audit: None,
        }],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // Name, label value, command word, any case.
    assert_eq!(search(&pool, "deploy", vec![], 10).await, vec![deploy.id()]);
    assert_eq!(
        search(&pool, "PLATFORM", vec![], 10).await,
        vec![deploy.id()]
    );
    assert_eq!(
        search(&pool, "cargo", vec![], 1).await,
        newest_first(&[&build, &lint])
    );
    assert_eq!(
        search(&pool, "report.py", vec![], 10).await,
        vec![batched.id()]
    );
    // Both words, either word, without a word, a phrase.
    assert_eq!(
        search(&pool, "cargo clippy", vec![], 10).await,
        vec![lint.id()]
    );
    assert_eq!(
        search(&pool, "kubectl or python3", vec![], 10).await,
        newest_first(&[&deploy, &batched])
    );
    assert_eq!(
        search(&pool, "cargo -clippy", vec![], 10).await,
        vec![build.id()]
    );
    assert_eq!(
        search(&pool, "\"cargo build\"", vec![], 10).await,
        vec![build.id()]
    );
    assert!(
        search(&pool, "\"build cargo\"", vec![], 10)
            .await
            .is_empty()
    );
    // Punctuation alone matches nothing and is not an error.
    assert!(search(&pool, "&|!:*", vec![], 10).await.is_empty());

    // An attempt's output tail is searchable once it ends, through either save path.
    assert!(search(&pool, "rollout", vec![], 10).await.is_empty());
    run_to_end(
        &pool,
        &mut deploy,
        &["deployment.apps/web rollout complete"],
        false,
    )
    .await;
    run_to_end(
        &pool,
        &mut build,
        &["Finished release target", "rollout skipped"],
        true,
    )
    .await;
    assert_eq!(
        search(&pool, "rollout", vec![], 10).await,
        newest_first(&[&deploy, &build])
    );
    assert_eq!(
        search(&pool, "complete", vec![], 10).await,
        vec![deploy.id()]
    );
    // Combined with the state filter.
    assert_eq!(
        search(&pool, "cargo", vec![JobState::Succeeded], 10).await,
        vec![build.id()]
    );
    assert_eq!(
        search(&pool, "cargo", vec![JobState::Queued], 10).await,
        vec![lint.id()]
    );
    db.cleanup().await.unwrap();
}

/// Texts of at most 256 bytes are split without a subquery, longer ones with the one that
/// leaves out tokens over 256 bytes: both give whole tokens, each once. (PostgreSQL's own
/// parser splits the long token at its carets.)
#[tokio::test]
async fn whole_tokens_are_found_in_short_and_long_texts() {
    let (db, pool) = database().await;
    let short = submit(
        &pool,
        "default",
        "short",
        &["deploy", "repo-42", "repo-42"],
        &[],
    )
    .await;
    let filler = "word ".repeat(60);
    let overlong = format!("x{}", "^y".repeat(200));
    let long = submit(
        &pool,
        "default",
        "long",
        &[
            "sh",
            "-c",
            &format!("{filler} deployment.apps/web {overlong} REPO-42"),
        ],
        &[],
    )
    .await;
    assert_eq!(
        search(&pool, "repo-42", vec![], 10).await,
        newest_first(&[&short, &long])
    );
    assert_eq!(
        search(&pool, "deployment.apps/web", vec![], 10).await,
        vec![long.id()]
    );
    let (tokens,): (Vec<String>,) =
        sqlx::query_as("SELECT tsvector_to_array(search) FROM job_search WHERE job_id = $1")
            .bind(long.id().as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        tokens
            .iter()
            .filter(|t| *t == "deployment.apps/web")
            .count(),
        1
    );
    assert!(
        !tokens.contains(&overlong),
        "a token over 256 bytes was indexed whole"
    );
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_history_reads_by_sequence_number_time_and_page() {
    let (db, pool) = database().await;
    let mut job = submit(&pool, "default", "h", &["true"], &[]).await;
    run_to_end(&pool, &mut job, &["ok"], false).await;
    let all = jobs::history(&pool, job.id(), EventRange::from(1))
        .await
        .unwrap();
    let kinds: Vec<&str> = all.iter().map(|e| e.kind.name()).collect();
    assert_eq!(kinds, ["submitted", "assigned", "started", "succeeded"]);
    assert_eq!(Job::from_events(&all).unwrap().state(), JobState::Succeeded);

    let first_two = EventRange {
        from_seq: 1,
        to_seq: Some(2),
        ..EventRange::default()
    };
    let folded =
        Job::from_events(&jobs::history(&pool, job.id(), first_two).await.unwrap()).unwrap();
    assert_eq!(folded.state(), JobState::Assigned);
    assert_eq!(folded.version(), 2);

    let page = EventRange {
        from_seq: 2,
        limit: Some(2),
        ..EventRange::default()
    };
    let seqs: Vec<u64> = jobs::history(&pool, job.id(), page)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [2, 3]);

    let before_submission = EventRange {
        from_seq: 1,
        until: Some(all[0].at - Duration::milliseconds(1)),
        ..EventRange::default()
    };
    assert!(
        jobs::history(&pool, job.id(), before_submission)
            .await
            .unwrap()
            .is_empty()
    );
    let at_submission = EventRange {
        from_seq: 1,
        until: Some(all[0].at),
        ..EventRange::default()
    };
    assert_eq!(
        jobs::history(&pool, job.id(), at_submission)
            .await
            .unwrap()
            .len(),
        1
    );
    db.cleanup().await.unwrap();
}

/// Every page of `filter`, following the cursor.
async fn all_events(pool: &sqlx::PgPool, mut filter: EventFilter) -> Vec<jobs::ListedEvent> {
    let mut out = Vec::new();
    loop {
        let page = jobs::list_events(pool, &filter).await.unwrap();
        let full = page.len() == filter.limit as usize;
        filter.after = page.last().map(|e| (e.event.at, e.event.event_id));
        out.extend(page);
        if !full {
            return out;
        }
    }
}

#[tokio::test]
async fn events_across_jobs_walk_in_time_order_under_each_filter() {
    let (db, pool) = database().await;
    let start = Utc::now() - Duration::seconds(1);
    let mut a = submit(&pool, "acme", "a", &["true"], &[("team", "x")]).await;
    let b = submit(&pool, "globex", "b", &["true"], &[("team", "y")]).await;
    run_to_end(&pool, &mut a, &[], true).await;
    // A running job asked to stop: its cancel_requested comes after a start.
    let mut c = submit(&pool, "acme", "c", &["sleep", "9"], &[("team", "x")]).await;
    let now = Utc::now();
    let assigned = c.assign("w2".parse().unwrap(), now).unwrap();
    let started = c.start(c.current_attempt(), now).unwrap();
    let mut tx = pool.begin().await.unwrap();
    jobs::save(&mut tx, &c, 1, &[assigned, started])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    driver::cancel_job(&mut tx, c.id(), "enough", "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // And a queued one cancelled at once.
    let d = submit(&pool, "globex", "d", &["true"], &[]).await;
    let mut tx = pool.begin().await.unwrap();
    driver::cancel_job(&mut tx, d.id(), "not needed", "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let everything = all_events(
        &pool,
        EventFilter {
            limit: 3,
            ..EventFilter::default()
        },
    )
    .await;
    assert_eq!(everything.len(), 4 + 1 + 4 + 2, "{everything:#?}");
    let order: Vec<_> = everything
        .iter()
        .map(|e| (e.event.at, e.event.event_id))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    let once: std::collections::HashSet<_> = everything.iter().map(|e| e.event.event_id).collect();
    assert_eq!(once.len(), everything.len());
    let stop = everything
        .iter()
        .find(|e| e.event.kind.name() == "cancel_requested")
        .unwrap();
    assert_eq!(stop.event.job_id, c.id());
    assert!(stop.attempt_started);
    assert!(
        everything
            .iter()
            .filter(|e| e.event.kind.name() != "cancel_requested")
            .all(|e| !e.attempt_started)
    );

    let by_type = all_events(
        &pool,
        EventFilter {
            types: vec!["submitted".into(), "cancelled".into()],
            limit: 2,
            ..EventFilter::default()
        },
    )
    .await;
    assert_eq!(by_type.len(), 4 + 1);
    let tenant = all_events(
        &pool,
        EventFilter {
            tenant: Some("globex".parse().unwrap()),
            limit: 100,
            ..EventFilter::default()
        },
    )
    .await;
    let jobs_seen: std::collections::BTreeSet<_> = tenant.iter().map(|e| e.event.job_id).collect();
    assert_eq!(jobs_seen, [b.id(), d.id()].into_iter().collect());
    assert!(tenant.iter().all(|e| e.tenant.as_str() == "globex"));
    let labelled = all_events(
        &pool,
        EventFilter {
            labels: BTreeMap::from([("team".to_owned(), "x".to_owned())]),
            limit: 100,
            ..EventFilter::default()
        },
    )
    .await;
    assert_eq!(labelled.len(), 4 + 4);

    // A window: [from, to) by each event's time.
    let third = &everything[2].event;
    let window = all_events(
        &pool,
        EventFilter {
            from: Some(start),
            to: Some(third.at),
            limit: 100,
            ..EventFilter::default()
        },
    )
    .await;
    assert!(window.iter().all(|e| e.event.at < third.at));
    assert!(window.len() >= 2 && window.len() < everything.len());
    let empty = all_events(
        &pool,
        EventFilter {
            to: Some(start),
            limit: 100,
            ..EventFilter::default()
        },
    )
    .await;
    assert!(empty.is_empty());
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn common_and_rare_words_page_the_same_whichever_way_they_are_read() {
    let (db, pool) = database().await;
    // 6,000 jobs carry `common-word` (more than the 5,000 matches read from the index first);
    // every 1,000th also carries `rare-word`.
    let built: Vec<(Job, hodei_domain::JobEvent)> = (0..6_000)
        .map(|i| {
            let rare = if i % 1_000 == 0 { "rare-word" } else { "plain" };
            job("default", &format!("bulk-{i}"), &["common-word", rare], &[])
        })
        .collect();
    let trace = BTreeMap::new();
    for chunk in built.chunks(1_000) {
        let rows: Vec<jobs::NewJob> = chunk
            .iter()
            .map(|(job, event)| jobs::NewJob {
                job,
                event,
                trace: &trace,
                messages: &[],
                audit: None,
            })
            .collect();
        let mut tx = pool.begin().await.unwrap();
        jobs::insert_many(&mut tx, &rows).await.unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query("ANALYZE job_search")
        .execute(&pool)
        .await
        .unwrap();
    let all: Vec<&Job> = built.iter().map(|(j, _)| j).collect();
    let rare: Vec<&Job> = all.iter().step_by(1_000).copied().collect();

    // The rare word is read from the index first (the matches as an array), the common one
    // by the planner's walk; both page the same way.
    let plan = |words: &str| {
        let pool = pool.clone();
        let words = words.to_owned();
        async move {
            jobs::explain_list(
                &pool,
                &JobFilter {
                    tenant: None,
                    search: Some(words),
                    limit: 100,
                    ..JobFilter::default()
                },
            )
            .await
            .unwrap()
            .join("\n")
        }
    };
    let rare_plan = plan("rare-word").await;
    assert!(rare_plan.contains("InitPlan"), "{rare_plan}");
    let common_plan = plan("common-word").await;
    assert!(!common_plan.contains("InitPlan"), "{common_plan}");
    assert_eq!(
        search(&pool, "rare-word", vec![], 2).await,
        newest_first(&rare)
    );
    assert_eq!(
        search(&pool, "common-word", vec![], 500).await,
        newest_first(&all)
    );
    assert_eq!(
        search(&pool, "common-word rare-word", vec![JobState::Queued], 4).await,
        newest_first(&rare)
    );
    assert!(
        search(&pool, "rare-word", vec![JobState::Succeeded], 10)
            .await
            .is_empty()
    );
    db.cleanup().await.unwrap();
}

/// A search with a state drops matches in other states by the search rows' own copy of the
/// state, which every save (single and batched) moves with the job: a job is found under the
/// state it is in now, never under one it left.
#[tokio::test]
async fn a_search_with_a_state_follows_each_job_through_single_and_batched_saves() {
    let (db, pool) = database().await;
    let mut moved = Vec::new();
    for i in 0..4 {
        moved.push(
            submit(
                &pool,
                "default",
                &format!("follow-{i}"),
                &["follow-word"],
                &[],
            )
            .await,
        );
    }
    let waiting = submit(&pool, "default", "follow-waiting", &["follow-word"], &[]).await;
    sqlx::query("ANALYZE job_search")
        .execute(&pool)
        .await
        .unwrap();
    let queued: Vec<&Job> = moved.iter().chain([&waiting]).collect();
    assert_eq!(
        search(&pool, "follow-word", vec![JobState::Queued], 2).await,
        newest_first(&queued)
    );
    for (i, job) in moved.iter_mut().enumerate() {
        run_to_end(&pool, job, &["follow-tail"], i % 2 == 0).await;
    }
    let plan = jobs::explain_list(
        &pool,
        &JobFilter {
            tenant: None,
            states: vec![JobState::Succeeded],
            search: Some("follow-word".to_owned()),
            limit: 10,
            ..JobFilter::default()
        },
    )
    .await
    .unwrap()
    .join("\n");
    // The InitPlan (the matches' ids) reads `job_search` and checks the state there.
    let init_plan = plan
        .split_once("InitPlan")
        .and_then(|(_, rest)| rest.split(" on jobs ").next())
        .unwrap_or_default();
    assert!(
        init_plan.contains("on job_search") && init_plan.contains("state = 'succeeded'"),
        "the state is checked on the search rows: {plan}"
    );
    let ended: Vec<&Job> = moved.iter().collect();
    assert_eq!(
        search(&pool, "follow-word", vec![JobState::Succeeded], 3).await,
        newest_first(&ended)
    );
    assert_eq!(
        search(&pool, "follow-word", vec![JobState::Queued], 3).await,
        vec![waiting.id()]
    );
    assert_eq!(
        search(
            &pool,
            "follow-tail",
            vec![JobState::Queued, JobState::Succeeded],
            3
        )
        .await,
        newest_first(&ended)
    );
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_search s JOIN jobs j ON j.id = s.job_id WHERE s.state <> j.state",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stale, 0);
    db.cleanup().await.unwrap();
}
