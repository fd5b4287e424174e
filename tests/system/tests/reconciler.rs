//! The scheduler's reconciler ends attempts whose next step is overdue, with a worker that
//! beats but never acts (a test-driven worker on the real bus):
//! - an attempt assigned but not started within the start timeout is handed back as lost,
//!   without spending the job's retries, and its worker is told to kill it;
//! - an attempt started but never reported past the job's timeout plus the grace ends the job
//!   timed out, and its worker is told to kill it;
//! - but a report that waited out an outage of PostgreSQL past those deadlines decides, and
//!   a report's text is made storable first.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hodei_domain::{AttemptNumber, AttemptOutcome, JobId};
use hodei_messaging::{AgentCommand, streams};
use hodei_proto::v1 as pb;
use hodei_system_tests::mute::MuteWorker;
use hodei_system_tests::{SystemOptions, TestSystem, shell_job};
use hodei_test_support::wait_for;

fn sleeper(name: &str, timeout_secs: u64) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
            argv: vec!["sleep".into(), "600".into()],
        })),
        timeout_secs,
        ..Default::default()
    }
}

fn outcome(attempt: &pb::Attempt) -> Option<pb::attempt_outcome::Kind> {
    attempt.outcome.as_ref().and_then(|o| o.kind.clone())
}

/// A system whose running jobs time out after a grace of 500 ms, and a job sleeping with a
/// timeout of `timeout_secs`, assigned to mute worker `worker` and reported started there.
async fn started_on_mute(
    worker: &str,
    job: &str,
    timeout_secs: u64,
) -> (TestSystem, MuteWorker, pb::Job, JobId, AttemptNumber) {
    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            timeout_grace_ms: 500,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let mut worker = MuteWorker::start(&system, worker).await.unwrap();
    let job = system.submit(sleeper(job, timeout_secs)).await.unwrap();
    let job_id: JobId = job.id.parse().unwrap();
    let AgentCommand::Assign { attempt, .. } =
        worker.next_command(Duration::from_secs(30)).await.unwrap()
    else {
        panic!("the first command is the assignment");
    };
    worker.report_started(job_id, attempt).await.unwrap();
    system
        .wait_job(&job.id, "running", Duration::from_secs(30), |s| {
            s == pb::JobState::Running
        })
        .await
        .unwrap();
    (system, worker, job, job_id, attempt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_not_started_in_time_is_handed_back_without_spending_a_retry() {
    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            start_timeout_ms: 1_000,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let mut worker = MuteWorker::start(&system, "mute").await.unwrap();
    let job = system.submit(sleeper("never-started", 60)).await.unwrap();
    let job_id: JobId = job.id.parse().unwrap();

    let AgentCommand::Assign { attempt, .. } =
        worker.next_command(Duration::from_secs(30)).await.unwrap()
    else {
        panic!("the first command is the assignment");
    };
    assert_eq!(attempt.get(), 1);
    // Never started: the reconciler tells the worker to kill it and hands it back.
    let cancel = worker.next_command(Duration::from_secs(30)).await.unwrap();
    match cancel {
        AgentCommand::Cancel {
            job_id: cancelled,
            attempt,
            reason,
        } => {
            assert_eq!((cancelled, attempt.get()), (job_id, 1));
            assert!(reason.contains("not started on mute"), "{reason}");
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    // Placed again as attempt 2 although max_attempts is 1: a lost attempt spends no retry.
    match worker.next_command(Duration::from_secs(30)).await.unwrap() {
        AgentCommand::Assign { attempt, .. } => assert_eq!(attempt.get(), 2),
        other => panic!("expected the second assignment, got {other:?}"),
    }
    let again = system
        .jobs
        .clone()
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(again.attempts.len(), 2, "{again:?}");
    match outcome(&again.attempts[0]) {
        Some(pb::attempt_outcome::Kind::Lost(reason)) => {
            assert!(reason.contains("not started"), "{reason}")
        }
        other => panic!("the first attempt ended lost, not {other:?}"),
    }
    system.stop().await;
}

/// An agent reports a pipeline step started only once the artifacts of the steps it consumes
/// are in its workspace: the download counts against the longer start timeout of such
/// attempts (60 s here), not that of a plain job (1 s here). A plain job assigned after it and
/// never started is handed back; it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_fetching_artifacts_has_the_longer_start_timeout() {
    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            start_timeout_ms: 1_000,
            start_timeout_artifacts_ms: 60_000,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let mut worker = MuteWorker::start(&system, "fetching").await.unwrap();
    let step = |name: &str, needs: &[&str], produce: &[&str], consume: &[&str]| {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        pb::PipelineStep {
            name: name.into(),
            needs: names(needs),
            job: Some(shell_job("", "true")),
            artifacts: Some(pb::StepArtifacts {
                produce: names(produce),
                consume: names(consume),
            }),
            ..Default::default()
        }
    };
    system
        .submit_pipeline(pb::PipelineSpec {
            name: "fetches".into(),
            steps: vec![
                step("build", &[], &["out"], &[]),
                step("test", &["build"], &[], &["build"]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let AgentCommand::Assign {
        job_id: build,
        attempt,
        ..
    } = worker.next_command(Duration::from_secs(30)).await.unwrap()
    else {
        panic!("the first command is build's assignment");
    };
    worker.report_started(build, attempt).await.unwrap();
    worker
        .report_finished(build, attempt, AttemptOutcome::Exited { code: 0 }, vec![])
        .await
        .unwrap();
    // The step that consumes build's artifacts: assigned, and never reported started.
    let AgentCommand::Assign { job_id: test, .. } =
        worker.next_command(Duration::from_secs(30)).await.unwrap()
    else {
        panic!("the next command is test's assignment");
    };
    let plain = system.submit(sleeper("plain", 60)).await.unwrap();
    let plain: JobId = plain.id.parse().unwrap();
    loop {
        match worker.next_command(Duration::from_secs(30)).await.unwrap() {
            AgentCommand::Cancel { job_id, .. } if job_id == plain => break,
            AgentCommand::Cancel { job_id, reason, .. } if job_id == test => {
                panic!("the step fetching artifacts was handed back: {reason}")
            }
            _ => {}
        }
    }
    let still = system.get_job(&test.to_string()).await.unwrap();
    assert_eq!(still.state(), pb::JobState::Assigned, "{still:?}");
    assert_eq!(still.attempts.len(), 1, "{still:?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_started_attempt_silent_past_its_timeout_and_grace_times_the_job_out() {
    let (system, mut worker, job, job_id, attempt) =
        started_on_mute("silent", "never-reported", 1).await;
    // Its own 1 s timeout and the 500 ms grace pass with no report: timed out, and killed.
    let done = system
        .wait_terminal(&job.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), pb::JobState::TimedOut, "{done:?}");
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(
        outcome(&done.attempts[0]),
        Some(pb::attempt_outcome::Kind::TimedOut(true))
    );
    match worker.next_command(Duration::from_secs(30)).await.unwrap() {
        AgentCommand::Cancel {
            job_id: cancelled,
            attempt: killed,
            reason,
        } => {
            assert_eq!((cancelled, killed), (job_id, attempt));
            assert!(reason.contains("timed out"), "{reason}");
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    system.stop().await;
}

/// A report is as good as what it can store: a job that printed a NUL character (PostgreSQL
/// refuses it in `jsonb`), in a tail longer than an agent keeps, still ends as it ended, with
/// U+FFFD for the NUL and the tail's last 20 lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_report_whose_tail_holds_a_nul_character_is_recorded() {
    let (system, worker, job, job_id, attempt) =
        started_on_mute("nul-tail", "prints-nul", 60).await;
    let mut tail: Vec<String> = (0..30).map(|i| format!("line {i}")).collect();
    tail.push("done\0".into());
    worker
        .report_finished(job_id, attempt, AttemptOutcome::Exited { code: 0 }, tail)
        .await
        .unwrap();
    let done = system
        .wait_terminal(&job.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    let kept = &done.attempts[0].output_tail;
    assert_eq!(kept.len(), 20, "{kept:?}");
    assert_eq!(kept.first().map(String::as_str), Some("line 11"));
    assert_eq!(kept.last().map(String::as_str), Some("done\u{FFFD}"));
    system.stop().await;
}

/// The reports delivered so far by the schedulers' shared consumer, and how many of them
/// wait for their acknowledgement.
async fn report_deliveries(js: &async_nats::jetstream::Context) -> (u64, usize) {
    let stream = js.get_stream(streams::REPORTS).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(streams::REPORTER).await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.delivered.consumer_sequence, info.num_ack_pending)
}

/// An outage of the observer is never evidence against a worker: the worker reported its job
/// done while PostgreSQL was away, and its report waited, held by the scheduler that took it,
/// while the job's timeout and grace passed. When PostgreSQL is back the job ends as its
/// worker reported it, not timed out, and nobody tells the worker to kill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_that_waited_out_a_postgres_outage_decides_and_not_the_timeout() {
    let (system, mut worker, job, job_id, attempt) =
        started_on_mute("patient", "outlives-outage", 1).await;
    // The job started before this instant; its timeout is 1 s and its grace 0.5 s.
    let started = tokio::time::Instant::now();

    system.database.set_available(false).await.unwrap();
    system
        .wait_postgres_breaker_open("scheduler", Duration::from_secs(30))
        .await
        .unwrap();
    let (before, _) = report_deliveries(worker.js()).await;
    worker
        .report_finished(
            job_id,
            attempt,
            AttemptOutcome::Exited { code: 0 },
            vec!["done".into()],
        )
        .await
        .unwrap();
    wait_for(
        "the report to be taken and held",
        Duration::from_secs(60),
        || {
            let js = worker.js().clone();
            async move {
                let (delivered, pending) = report_deliveries(&js).await;
                (delivered > before && pending == 1).then_some(())
            }
        },
    )
    .await
    .unwrap();
    // The outage's length is part of the fault: past the job's timeout and grace, by a second.
    tokio::time::sleep_until(started + Duration::from_millis(2_500)).await;
    let (delivered, _) = report_deliveries(worker.js()).await;
    assert_eq!(
        delivered,
        before + 1,
        "a held report is delivered once, not again and again"
    );
    system.database.set_available(true).await.unwrap();

    let done = system
        .wait_terminal(&job.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 1, "{done:?}");
    // No kill order went out for it.
    if let Ok(command) = worker.next_command(Duration::from_secs(2)).await {
        panic!("no command expected, got {command:?}");
    }
    system.stop().await;
}
