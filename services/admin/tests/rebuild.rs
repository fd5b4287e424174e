//! The projection rebuild against a real PostgreSQL database: random job and pipeline
//! histories written through the live paths (single and batch saves, cancels, pending
//! reasons, pipeline runs moved by their step jobs) always fold back to exactly the live
//! projection; a row changed behind the event store's back is found, named by field, and
//! repaired without losing its secrets; and the command line reports and exits as it says.
//! `hodei-admin archive` moves ended jobs and runs with their secrets still masked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::Utc;
use hodei_admin::rebuild::Aggregate;
use hodei_admin::{RebuildOptions, rebuild_projections};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptOutcome, Job, JobId, JobSpec, PipelineRun, PipelineRunId, PipelineSpec,
    PipelineSpecDraft, StepDraft, TenantId,
};
use hodei_storage::{driver, jobs, pipelines};
use hodei_test_support::TestDatabase;
use proptest::prelude::*;

async fn database() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await.unwrap();
    let pool = db.connect().await.unwrap();
    hodei_storage::migrate(&pool).await.unwrap();
    (db, pool)
}

fn outcome(param: u8) -> AttemptOutcome {
    match param % 6 {
        0 => AttemptOutcome::Exited { code: 0 },
        1 => AttemptOutcome::Exited { code: 1 },
        2 => AttemptOutcome::Signalled { signal: 9 },
        3 => AttemptOutcome::TimedOut,
        4 => AttemptOutcome::Lost {
            reason: "worker lost".into(),
        },
        _ => AttemptOutcome::Cancelled,
    }
}

/// Applies one random operation to job `id` through the live write paths; an operation the
/// job's state does not allow is skipped, as the services would refuse it.
async fn operate(pool: &sqlx::PgPool, id: JobId, op: u8, param: u8) {
    let Some(mut job) = jobs::get(pool, id).await.unwrap() else {
        return;
    };
    let before = job.version();
    let now = Utc::now();
    let event = match op % 5 {
        0 => job.assign(format!("w{}", param % 3).parse().unwrap(), now),
        1 => job.start(job.current_attempt(), now),
        2 => job.finish_with_output(
            job.current_attempt(),
            outcome(param),
            vec![format!("line {param}")],
            now,
            f64::from(param) / 256.0,
        ),
        3 => {
            let mut tx = pool.begin().await.unwrap();
            match driver::cancel_job(&mut tx, id, "random cancel", "test").await {
                Ok(_) => tx.commit().await.unwrap(),
                // An ended job: the API answers FAILED_PRECONDITION.
                Err(hodei_storage::StorageError::Refused(_)) => tx.rollback().await.unwrap(),
                Err(e) => panic!("cancel failed: {e}"),
            }
            return;
        }
        _ => {
            jobs::set_pending_reason(pool, id, &format!("waiting for w{param}"))
                .await
                .unwrap();
            return;
        }
    };
    let Ok(event) = event else {
        return;
    };
    let mut tx = pool.begin().await.unwrap();
    if param.is_multiple_of(2) {
        // The path reports and placements take, and the one that moves pipeline runs.
        driver::save_job(&mut tx, &job, before, std::slice::from_ref(&event))
            .await
            .unwrap();
    } else if jobs::get(&mut *tx, id)
        .await
        .unwrap()
        .is_some_and(|j| j.spec().name.starts_with("solo"))
    {
        jobs::save_many(&mut tx, &[(&job, before)], &[&event], &[])
            .await
            .unwrap();
    } else {
        driver::save_job(&mut tx, &job, before, std::slice::from_ref(&event))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn submit_job(pool: &sqlx::PgPool, name: &str, attempts: u32, secret: bool) -> JobId {
    let mut draft = JobSpecDraft::exec(name, &["true"]);
    draft.max_attempts = attempts;
    if secret {
        draft.env.insert("TOKEN".into(), "hunter2".into());
        draft.secret_env.insert("TOKEN".into());
    }
    let (job, event) = Job::submit(
        JobId::new(),
        TenantId::default(),
        JobSpec::try_from(draft).unwrap(),
        Utc::now(),
    );
    driver::submit_job(pool, &job, &event, &[]).await.unwrap();
    job.id()
}

async fn submit_run(pool: &sqlx::PgPool, fail_fast: bool) -> PipelineRunId {
    let spec = PipelineSpec::try_from(PipelineSpecDraft {
        name: "random".to_owned(),
        env: BTreeMap::from([("TOKEN".to_owned(), "run-secret".to_owned())]),
        steps: vec![
            StepDraft::exec("a", &["true"]),
            StepDraft::exec("b", &["true"]).needing(&["a"]),
            StepDraft::exec("c", &["true"]),
        ],
        fail_fast,
        idempotency_key: None,
        labels: BTreeMap::new(),
    })
    .unwrap();
    let (run, event) =
        PipelineRun::submit(PipelineRunId::new(), TenantId::default(), spec, Utc::now());
    let id = run.id();
    driver::submit_run(pool, run, &event, "test").await.unwrap();
    id
}

async fn step_jobs(pool: &sqlx::PgPool, run: PipelineRunId) -> Vec<JobId> {
    pipelines::get(pool, run)
        .await
        .unwrap()
        .map(|r| r.steps().iter().filter_map(|s| s.job_id).collect())
        .unwrap_or_default()
}

fn options(repair: bool) -> RebuildOptions {
    RebuildOptions { batch: 7, repair }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_histories_fold_back_to_the_live_projection(
        jobs_ops in proptest::collection::vec(
            (1u32..4, any::<bool>(), proptest::collection::vec((any::<u8>(), any::<u8>()), 0..14)),
            1..4,
        ),
        run_ops in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..24),
        fail_fast in any::<bool>(),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (db, pool) = database().await;
            let mut expected_jobs = 0u64;
            for (i, (attempts, secret, ops)) in jobs_ops.iter().enumerate() {
                let id = submit_job(&pool, &format!("solo-{i}"), *attempts, *secret).await;
                expected_jobs += 1;
                for (op, param) in ops {
                    operate(&pool, id, *op, *param).await;
                }
            }
            let run = submit_run(&pool, fail_fast).await;
            for (op, param) in &run_ops {
                if *op % 16 == 15 {
                    match driver::cancel_run(&pool, run, "random cancel", "test").await {
                        Ok(_) | Err(hodei_storage::StorageError::Refused(_)) => {}
                        Err(e) => panic!("cancel failed: {e}"),
                    }
                    continue;
                }
                let steps = step_jobs(&pool, run).await;
                if steps.is_empty() {
                    continue;
                }
                let step = steps[usize::from(*param) % steps.len()];
                operate(&pool, step, *op, param / 2).await;
            }
            expected_jobs += step_jobs(&pool, run).await.len() as u64;
            let report = rebuild_projections(&pool, options(false)).await.unwrap();
            assert_eq!(report.differences, Vec::new(), "{report:#?}");
            assert_eq!(report.jobs_checked, expected_jobs);
            assert_eq!(report.runs_checked, 1);
            pool.close().await;
            db.cleanup().await.unwrap();
        });
    }
}

#[tokio::test]
async fn a_row_changed_behind_the_event_store_is_found_and_repaired_keeping_its_secrets() {
    let (db, pool) = database().await;
    let job = submit_job(&pool, "solo-secret", 1, true).await;
    operate(&pool, job, 0, 0).await;
    operate(&pool, job, 1, 0).await;
    let run = submit_run(&pool, false).await;
    let fine = submit_job(&pool, "solo-fine", 1, false).await;
    // Somebody edits the projections by hand.
    sqlx::query("UPDATE jobs SET state = 'succeeded', exit_code = 0 WHERE id = $1")
        .bind(job.as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE pipeline_runs SET cancel_requested = true WHERE id = $1")
        .bind(run.as_uuid())
        .execute(&pool)
        .await
        .unwrap();

    let found = rebuild_projections(&pool, options(false)).await.unwrap();
    assert_eq!(found.differences.len(), 2, "{found:#?}");
    let by_job = found
        .differences
        .iter()
        .find(|d| d.aggregate == Aggregate::Job)
        .unwrap();
    assert_eq!(by_job.id, job.to_string());
    assert_eq!(by_job.fields.len(), 1);
    assert_eq!(by_job.fields[0].field, "state");
    assert_eq!(
        (
            by_job.fields[0].live.as_str(),
            by_job.fields[0].rebuilt.as_str()
        ),
        ("Succeeded", "Running")
    );
    let by_run = found
        .differences
        .iter()
        .find(|d| d.aggregate == Aggregate::PipelineRun)
        .unwrap();
    assert_eq!(by_run.fields[0].field, "cancel_requested");
    assert!(found.differences.iter().all(|d| !d.repaired));
    assert_ne!(by_job.id, fine.to_string());

    let repaired = rebuild_projections(&pool, options(true)).await.unwrap();
    assert_eq!(repaired.differences.len(), 2);
    assert_eq!(repaired.unrepaired(), 0);
    let again = rebuild_projections(&pool, options(false)).await.unwrap();
    assert!(again.differences.is_empty(), "{again:#?}");
    let (state, exit_code, token): (String, Option<i32>, String) =
        sqlx::query_as("SELECT state, exit_code, spec->'env'->>'TOKEN' FROM jobs WHERE id = $1")
            .bind(job.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), exit_code, token.as_str()),
        ("running", None, "hunter2")
    );
    let run_token: String =
        sqlx::query_scalar("SELECT spec->'env'->>'TOKEN' FROM pipeline_runs WHERE id = $1")
            .bind(run.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(run_token, "run-secret");
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn the_command_reports_each_field_and_exits_3_while_differences_are_left() {
    let (db, pool) = database().await;
    let job = submit_job(&pool, "solo-cli", 1, false).await;
    sqlx::query("UPDATE jobs SET version = 9 WHERE id = $1")
        .bind(job.as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    let run = |repair: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hodei-admin"));
        cmd.args(["rebuild-projections", "--batch", "2"])
            .env("HODEI_DATABASE_URL", db.url())
            .env("RUST_LOG", "error");
        if repair {
            cmd.arg("--repair");
        }
        cmd.output().unwrap()
    };
    let out = run(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stdout.contains(&format!("job {job}\n  version: projection 9 / events 1\n")),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(
            "checked 1 jobs and 0 pipeline runs: 1 differ from their events, 0 repaired\n"
        ),
        "{stdout}"
    );
    let out = run(true);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("(repaired)"));
    let out = run(false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn archive_moves_ended_jobs_and_runs_and_keeps_secrets_masked() {
    let (db, pool) = database().await;
    let job = submit_job(&pool, "secret-job", 1, true).await;
    let mut tx = pool.begin().await.unwrap();
    driver::cancel_job(&mut tx, job, "done", "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let run = submit_run(&pool, false).await;
    let steps = step_jobs(&pool, run).await;
    driver::cancel_run(&pool, run, "done", "test")
        .await
        .unwrap();
    let live = submit_job(&pool, "still-queued", 1, false).await;

    let archive = |older_than: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hodei-admin"))
            .args(["archive", "--older-than", older_than, "--batch", "1"])
            .env("HODEI_DATABASE_URL", db.url())
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    // Nothing ended an hour ago.
    let out = archive("1h");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("archived 0 jobs, 0 pipeline runs"),
        "{out:?}"
    );
    let out = archive("0s");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let moved_jobs = 1 + steps.len();
    assert!(
        stdout.starts_with(&format!("archived {moved_jobs} jobs, 1 pipeline runs and ")),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(&format!(
            "hot: 1 jobs, 0 pipeline runs; archive: {moved_jobs} jobs, 1 pipeline runs\n"
        )),
        "{stdout}"
    );
    assert!(jobs::get(&pool, live).await.unwrap().is_some());
    // The secret job's archived history masks the value, as its events did.
    let archived =
        hodei_storage::archive::job_history(&pool, job, hodei_storage::EventRange::from(1))
            .await
            .unwrap();
    assert!(!archived.is_empty());
    let text = serde_json::to_string(&archived).unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains(hodei_domain::spec::SECRET_MASK), "{text}");

    let out = archive("soon");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--older-than"),
        "{out:?}"
    );
    pool.close().await;
    db.cleanup().await.unwrap();
}
