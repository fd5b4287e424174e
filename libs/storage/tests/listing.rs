//! Listing against a real PostgreSQL database (a fresh one per test): keyset pagination walks
//! every row once, newest first (jobs, runs) or by id (workers), and each filter (states,
//! name prefix with LIKE metacharacters taken literally, labels) narrows it, alone and with a
//! cursor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::Utc;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    Job, JobId, JobSpec, JobState, PipelineRun, PipelineState, Resources, StepDraft, TenantId,
    Worker, WorkerId, WorkerStatus,
};
use hodei_storage::jobs::{self, JobFilter};
use hodei_storage::pipelines::{self, RunFilter};
use hodei_storage::{driver, workers};
use hodei_test_support::TestDatabase;

mod common;

async fn database() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await.unwrap();
    let pool = db.connect().await.unwrap();
    hodei_storage::migrate(&pool).await.unwrap();
    (db, pool)
}

async fn submit(pool: &sqlx::PgPool, name: &str, team: &str) -> JobId {
    let mut draft = JobSpecDraft::exec(name, &["true"]);
    draft.labels.insert("team".into(), team.into());
    let (job, event) = Job::submit(
        JobId::new(),
        TenantId::default(),
        JobSpec::try_from(draft).unwrap(),
        Utc::now(),
    );
    driver::submit_job(pool, &job, &event, &[]).await.unwrap();
    job.id()
}

/// Every page of `filter` (with `limit` per page), following the cursor to the end.
async fn all_pages(pool: &sqlx::PgPool, mut filter: JobFilter) -> Vec<Vec<JobId>> {
    let mut pages = Vec::new();
    loop {
        let page: Vec<JobId> = jobs::list(pool, &filter)
            .await
            .unwrap()
            .iter()
            .map(Job::id)
            .collect();
        let last = page.last().copied();
        let full = page.len() == filter.limit as usize;
        if !page.is_empty() {
            pages.push(page);
        }
        match last {
            Some(last) if full => filter.before = Some(last),
            _ => return pages,
        }
    }
}

#[tokio::test]
async fn job_pages_walk_every_job_once_newest_first_under_each_filter() {
    let (db, pool) = database().await;
    let mut build = Vec::new();
    let mut test = Vec::new();
    for i in 0..13 {
        build.push(submit(&pool, &format!("build-{i}"), "a").await);
    }
    for i in 0..7 {
        test.push(submit(&pool, &format!("test_{i}"), "b").await);
    }
    // `_` is a LIKE wildcard: a name with another character there must not match `test_`.
    let decoy = submit(&pool, "testX", "b").await;
    let mut cancelled = Vec::new();
    for id in build.iter().step_by(3) {
        let mut tx = pool.begin().await.unwrap();
        driver::cancel_job(&mut tx, *id, "listing test", "test")
            .await
            .unwrap()
            .unwrap();
        tx.commit().await.unwrap();
        cancelled.push(*id);
    }
    let newest_first = |ids: &[JobId]| {
        let mut ids = ids.to_vec();
        ids.sort_by_key(|id| std::cmp::Reverse(id.as_uuid()));
        ids
    };

    let everything: Vec<JobId> = build.iter().chain(&test).chain([&decoy]).copied().collect();
    let pages = all_pages(
        &pool,
        JobFilter {
            tenant: None,
            limit: 6,
            ..JobFilter::default()
        },
    )
    .await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![6, 6, 6, 3]
    );
    assert_eq!(pages.concat(), newest_first(&everything));

    let by_state = all_pages(
        &pool,
        JobFilter {
            tenant: None,
            states: vec![JobState::Cancelled],
            limit: 2,
            ..JobFilter::default()
        },
    )
    .await;
    assert_eq!(by_state.concat(), newest_first(&cancelled));

    let both_states = all_pages(
        &pool,
        JobFilter {
            tenant: None,
            states: vec![JobState::Cancelled, JobState::Queued],
            limit: 100,
            ..JobFilter::default()
        },
    )
    .await;
    assert_eq!(both_states.concat(), newest_first(&everything));

    let by_prefix = all_pages(
        &pool,
        JobFilter {
            tenant: None,
            name_prefix: Some("test_".into()),
            limit: 3,
            ..JobFilter::default()
        },
    )
    .await;
    assert_eq!(by_prefix.concat(), newest_first(&test));

    let by_label = all_pages(
        &pool,
        JobFilter {
            tenant: None,
            labels: BTreeMap::from([("team".to_owned(), "b".to_owned())]),
            limit: 5,
            ..JobFilter::default()
        },
    )
    .await;
    let mut team_b = test.clone();
    team_b.push(decoy);
    assert_eq!(by_label.concat(), newest_first(&team_b));

    let combined = all_pages(
        &pool,
        JobFilter {
            tenant: None,
            states: vec![JobState::Queued],
            name_prefix: Some("build-".into()),
            labels: BTreeMap::from([("team".to_owned(), "a".to_owned())]),
            limit: 4,
            ..JobFilter::default()
        },
    )
    .await;
    let queued_builds: Vec<JobId> = build
        .iter()
        .filter(|id| !cancelled.contains(id))
        .copied()
        .collect();
    assert_eq!(combined.concat(), newest_first(&queued_builds));

    // A cursor past the oldest job gives an empty page.
    let oldest = *newest_first(&everything).last().unwrap();
    let none = jobs::list(
        &pool,
        &JobFilter {
            tenant: None,
            before: Some(oldest),
            limit: 10,
            ..JobFilter::default()
        },
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn run_pages_follow_the_cursor_and_filter_by_state_and_name() {
    let (db, pool) = database().await;
    let mut ids = Vec::new();
    for name in [
        "nightly-1",
        "nightly-2",
        "release_1",
        "releaseX",
        "nightly-3",
    ] {
        let run =
            common::submitted_run(&pool, name, vec![StepDraft::exec("only", &["true"])]).await;
        ids.push(run.id());
    }
    let cancelled = ids[1];
    driver::cancel_run(&pool, cancelled, "listing test", "test")
        .await
        .unwrap()
        .unwrap();

    let mut seen = Vec::new();
    let mut filter = RunFilter {
        tenant: None,
        limit: 2,
        ..RunFilter::default()
    };
    loop {
        let page = pipelines::list(&pool, &filter).await.unwrap();
        seen.extend(page.iter().map(PipelineRun::id));
        match page.last() {
            Some(last) if page.len() == 2 => filter.before = Some(last.id()),
            _ => break,
        }
    }
    let mut expected = ids.clone();
    expected.sort_by_key(|id| std::cmp::Reverse(id.as_uuid()));
    assert_eq!(seen, expected);

    let list = |filter: RunFilter| {
        let pool = pool.clone();
        async move {
            pipelines::list(&pool, &filter)
                .await
                .unwrap()
                .iter()
                .map(PipelineRun::id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(RunFilter {
            tenant: None,
            states: vec![PipelineState::Cancelled],
            limit: 10,
            ..RunFilter::default()
        })
        .await,
        vec![cancelled]
    );
    assert_eq!(
        list(RunFilter {
            tenant: None,
            name_prefix: Some("release_".into()),
            limit: 10,
            ..RunFilter::default()
        })
        .await,
        vec![ids[2]]
    );
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn worker_pages_go_by_id_and_filter_by_status() {
    let (db, pool) = database().await;
    let mut conn = pool.acquire().await.unwrap();
    for i in 0..7 {
        let id: WorkerId = format!("w-{i}").parse().unwrap();
        let (mut worker, _) = Worker::register(
            id,
            BTreeMap::new(),
            Resources::new(1000, 1024),
            2,
            Utc::now(),
        );
        if i % 2 == 1 {
            worker.drain(Utc::now()).unwrap();
        }
        workers::upsert(&mut conn, &worker).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<WorkerId> = None;
    loop {
        let page = workers::list(&pool, &[], after.as_ref(), 3).await.unwrap();
        seen.extend(page.iter().map(|w| w.id().to_string()));
        match page.last() {
            Some(last) if page.len() == 3 => after = Some(last.id().clone()),
            _ => break,
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("w-{i}")).collect::<Vec<_>>());

    let draining: Vec<String> = workers::list(&pool, &[WorkerStatus::Draining], None, 10)
        .await
        .unwrap()
        .iter()
        .map(|w| w.id().to_string())
        .collect();
    assert_eq!(draining, vec!["w-1", "w-3", "w-5"]);
    let after_first: Vec<String> = workers::list(
        &pool,
        &[WorkerStatus::Draining],
        Some(&"w-1".parse().unwrap()),
        10,
    )
    .await
    .unwrap()
    .iter()
    .map(|w| w.id().to_string())
    .collect();
    assert_eq!(after_first, vec!["w-3", "w-5"]);
    db.cleanup().await.unwrap();
}
