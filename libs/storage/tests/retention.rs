//! Retention against a real PostgreSQL database (a fresh one per test): which jobs and runs
//! move to the archive and which stay, that an archived aggregate folds from its archived
//! events to what it was, that the hot read models forget it, and that concurrent archivers
//! never move the same job twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use chrono::{Duration, Utc};
use hodei_domain::pipeline::StepDraft;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptOutcome, Job, JobId, JobSpec, JobState, PipelineRun, PipelineState, TenantId,
};
use hodei_storage::archive::{self, Counts, Moved};
use hodei_storage::jobs::{self, EventFilter, JobFilter};
use hodei_storage::{EventRange, driver, pipelines};
use hodei_test_support::TestDatabase;

mod common;

async fn database() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await.unwrap();
    let pool = db.connect().await.unwrap();
    hodei_storage::migrate(&pool).await.unwrap();
    (db, pool)
}

async fn submit(pool: &sqlx::PgPool, name: &str) -> Job {
    let mut draft = JobSpecDraft::exec(name, &["echo", name]);
    draft.labels.insert("team".into(), "retention".into());
    let (job, event) = Job::submit(
        JobId::new(),
        TenantId::default(),
        JobSpec::try_from(draft).unwrap(),
        Utc::now(),
    );
    driver::submit_job(pool, &job, &event, &[]).await.unwrap();
    job
}

/// Assigns and starts `job`; ends it with exit 0 and an output tail when `end`.
async fn run(pool: &sqlx::PgPool, job: &mut Job, end: bool) {
    let now = Utc::now();
    let before = job.version();
    let mut steps = vec![job.assign("w1".parse().unwrap(), now).unwrap()];
    let attempt = job.current_attempt();
    steps.push(job.start(attempt, now).unwrap());
    if end {
        steps.push(
            job.finish_with_output(
                attempt,
                AttemptOutcome::Exited { code: 0 },
                vec!["archived tail".to_owned()],
                now,
                0.0,
            )
            .unwrap(),
        );
    }
    let mut tx = pool.begin().await.unwrap();
    jobs::save(&mut tx, job, before, &steps).await.unwrap();
    tx.commit().await.unwrap();
}

async fn submit_run(pool: &sqlx::PgPool, name: &str) -> PipelineRun {
    let steps = vec![
        StepDraft::exec("first", &["true"]),
        StepDraft::exec("second", &["true"]),
    ];
    common::submitted_run(pool, name, steps).await
}

/// Every batch until nothing is left.
async fn archive_all(pool: &sqlx::PgPool, cutoff: chrono::DateTime<Utc>) -> Moved {
    let mut total = Moved::default();
    loop {
        let moved = archive::archive_batch(pool, cutoff, 2).await.unwrap();
        if moved == Moved::default() {
            return total;
        }
        total += moved;
    }
}

fn search(words: &str) -> JobFilter {
    JobFilter {
        tenant: None,
        search: Some(words.to_owned()),
        limit: 100,
        ..JobFilter::default()
    }
}

#[tokio::test]
async fn ended_jobs_and_runs_past_the_cutoff_move_and_everything_else_stays() {
    let (db, pool) = database().await;
    // Ended before the cutoff: five standalone jobs (batches of 2 take three rounds).
    let mut ended = Vec::new();
    for i in 0..5 {
        let mut job = submit(&pool, &format!("old-{i}")).await;
        run(&pool, &mut job, true).await;
        ended.push(job);
    }
    // A run cancelled before the cutoff, with its step job(s) cancelled too.
    let old_run = submit_run(&pool, "old-run").await;
    let old_run = driver::cancel_run(&pool, old_run.id(), "done with it", "test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old_run.state(), PipelineState::Cancelled);
    let old_steps: Vec<JobId> = old_run.steps().iter().filter_map(|s| s.job_id).collect();
    assert!(!old_steps.is_empty());
    // Still running at the cutoff, and queued: never archived, however old.
    let mut running = submit(&pool, "still-running").await;
    run(&pool, &mut running, false).await;
    let queued = submit(&pool, "still-queued").await;
    let live_run = submit_run(&pool, "live-run").await;
    // Created before the cutoff but ended after it: kept until it is old enough.
    let mut late = submit(&pool, "ended-late").await;

    let cutoff = Utc::now();
    run(&pool, &mut late, true).await;
    // Created and ended after the cutoff.
    let mut fresh = submit(&pool, "fresh").await;
    run(&pool, &mut fresh, true).await;

    let before: Vec<_> = {
        let mut v = Vec::new();
        for job in &ended {
            v.push(jobs::get(&pool, job.id()).await.unwrap().unwrap());
        }
        v
    };
    let old_run_events = pipelines::history(&pool, old_run.id(), EventRange::from(1))
        .await
        .unwrap();

    let moved = archive_all(&pool, cutoff).await;
    assert_eq!(moved.runs, 1);
    assert_eq!(moved.jobs, 5 + old_steps.len() as u64);
    // 4 events per ended job, 2 per cancelled step job, the run's own.
    assert_eq!(
        moved.events,
        5 * 4 + 2 * old_steps.len() as u64 + old_run_events.len() as u64
    );
    // A second pass finds nothing.
    assert_eq!(archive_all(&pool, cutoff).await, Moved::default());

    // Gone from the hot tables and their read models...
    for job in ended.iter().map(Job::id).chain(old_steps.iter().copied()) {
        assert!(jobs::get(&pool, job).await.unwrap().is_none());
        assert!(
            jobs::history(&pool, job, EventRange::from(1))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            archive::job_archived_at(&pool, job)
                .await
                .unwrap()
                .is_some()
        );
    }
    assert!(pipelines::get(&pool, old_run.id()).await.unwrap().is_none());
    assert!(
        jobs::list(&pool, &search("old-0"))
            .await
            .unwrap()
            .is_empty()
    );
    let events = jobs::list_events(
        &pool,
        &EventFilter {
            limit: 1000,
            ..EventFilter::default()
        },
    )
    .await
    .unwrap();
    let archived: HashSet<JobId> = ended.iter().map(Job::id).chain(old_steps.clone()).collect();
    assert!(events.iter().all(|e| !archived.contains(&e.event.job_id)));

    // ...and each folds from its archived events to what it was.
    for job in &before {
        let history = archive::job_history(&pool, job.id(), EventRange::from(1))
            .await
            .unwrap();
        assert_eq!(history.len(), 4);
        let folded = Job::from_events(&history).unwrap();
        assert_eq!(folded.state(), JobState::Succeeded);
        assert_eq!(folded.attempts(), job.attempts());
        assert_eq!(folded.updated_at(), job.updated_at());
        assert_eq!(folded.version(), job.version());
        // Ranges read the same way as from the hot table.
        let first_two = EventRange {
            from_seq: 1,
            to_seq: Some(2),
            ..EventRange::default()
        };
        let seqs: Vec<u64> = archive::job_history(&pool, job.id(), first_two)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        let until_submission = EventRange {
            from_seq: 1,
            until: Some(history[0].at),
            ..EventRange::default()
        };
        assert_eq!(
            archive::job_history(&pool, job.id(), until_submission)
                .await
                .unwrap()
                .len(),
            1
        );
    }
    let run_history = archive::run_history(&pool, old_run.id(), EventRange::from(1))
        .await
        .unwrap();
    assert_eq!(run_history, old_run_events);
    let folded = PipelineRun::from_events(&run_history).unwrap();
    assert_eq!(folded.state(), PipelineState::Cancelled);
    let steps = archive::job_histories(&pool, &old_steps, None)
        .await
        .unwrap();
    assert_eq!(steps.len(), old_steps.len());
    assert!(
        steps
            .values()
            .all(|events| Job::from_events(events).unwrap().state() == JobState::Cancelled)
    );

    // What must stay stayed, with its search rows.
    for job in [running.id(), queued.id(), late.id(), fresh.id()] {
        assert!(jobs::get(&pool, job).await.unwrap().is_some(), "{job}");
        assert!(
            archive::job_archived_at(&pool, job)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(
        jobs::list(&pool, &search("ended-late"))
            .await
            .unwrap()
            .len(),
        1
    );

    let counts = archive::counts(&pool).await.unwrap();
    let live_steps = pipelines::get(&pool, live_run.id())
        .await
        .unwrap()
        .unwrap()
        .steps()
        .iter()
        .filter(|s| s.job_id.is_some())
        .count() as u64;
    assert_eq!(live_steps, 2);
    assert_eq!(
        counts,
        Counts {
            jobs: 4 + live_steps,
            pipeline_runs: 1,
            jobs_archive: 5 + old_steps.len() as u64,
            pipeline_runs_archive: 1,
        }
    );
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn concurrent_archivers_share_the_work_and_move_each_job_once() {
    let (db, pool) = database().await;
    let mut ids = Vec::new();
    for i in 0..60 {
        let mut job = submit(&pool, &format!("j{i}")).await;
        run(&pool, &mut job, true).await;
        ids.push(job.id());
    }
    let cutoff = Utc::now() + Duration::seconds(1);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut total = Moved::default();
            loop {
                let moved = archive::archive_batch(&pool, cutoff, 5).await.unwrap();
                if moved == Moved::default() {
                    return total;
                }
                total += moved;
            }
        }));
    }
    let mut jobs_moved = 0;
    for task in tasks {
        jobs_moved += task.await.unwrap().jobs;
    }
    assert_eq!(jobs_moved, 60);
    let counts = archive::counts(&pool).await.unwrap();
    assert_eq!((counts.jobs, counts.jobs_archive), (0, 60));
    let histories = archive::job_histories(&pool, &ids, None).await.unwrap();
    assert_eq!(histories.len(), 60);
    assert!(histories.values().all(|events| events.len() == 4));
    db.cleanup().await.unwrap();
}
