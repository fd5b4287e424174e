//! Forged and odd messages on the bus harm nobody but their sender: a report from a worker
//! that does not hold the attempt is dead-lettered without touching the job, and a stream of
//! out-of-range heartbeats is refused beat by beat while real workers stay ready and jobs flow,
//! and a log batch from a worker that did not run its attempt is not shown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use chrono::Utc;
use hodei_domain::{AttemptNumber, AttemptOutcome, JobId, WorkerId};
use hodei_messaging::{AgentReport, Heartbeat, ReportKind, streams, subjects};
use hodei_proto::v1 as pb;
use hodei_system_tests::shell_job as script;
use hodei_system_tests::{AgentSpec, TestSystem, heartbeat};
use hodei_test_support::{http_get, metric_sample, wait_for};

const AGENTS: &[AgentSpec] = &[AgentSpec {
    id: "honest",
    labels: "",
    slots: 2,
}];

async fn metric(system: &TestSystem, service: &str, series: &str) -> f64 {
    let addr = system.metrics_addr(service).unwrap();
    let body = http_get(addr, "/metrics").await.unwrap().body;
    metric_sample(&body, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_report_is_dead_lettered_and_the_job_keeps_its_true_outcome() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let job = system
        .submit(script(
            "honest-work",
            &format!(
                "while [ ! -e {} ]; do sleep 0.05; done; echo honest; exit 3",
                go.display()
            ),
        ))
        .await
        .unwrap();
    system
        .wait_job(&job.id, "running", Duration::from_secs(30), |s| {
            s == pb::JobState::Running
        })
        .await
        .unwrap();
    let job_id: JobId = job.id.parse().unwrap();
    // As admin, whom nats-server lets publish anything: the scheduler's own check is what
    // refuses these (nats_access.rs shows the server refusing agents and services).
    let (client, js) = system.admin_nats().await.unwrap();
    let forged = |worker: &str| AgentReport {
        report_id: uuid::Uuid::now_v7(),
        worker_id: worker.parse().unwrap(),
        job_id,
        attempt: AttemptNumber::new(1),
        at: Utc::now(),
        kind: ReportKind::Finished {
            outcome: AttemptOutcome::Exited { code: 0 },
            tail: vec!["made up".to_owned()],
        },
    };
    let mallory: WorkerId = "mallory".parse().unwrap();
    let honest: WorkerId = "honest".parse().unwrap();
    // From a worker that does not hold the attempt, on its own subject; and claiming to be
    // another worker than the subject names.
    for (subject, report) in [
        (subjects::report(&mallory, &job_id), forged("mallory")),
        (subjects::report(&honest, &job_id), forged("mallory")),
        (subjects::report(&mallory, &job_id), forged("honest")),
    ] {
        js.publish(subject, serde_json::to_vec(&report).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for(
        "the forged reports to be dead-lettered",
        Duration::from_secs(20),
        || async {
            let refused = metric(
                &system,
                "scheduler",
                r#"hodei_reports_refused_total{reason="sender"}"#,
            )
            .await;
            (refused >= 3.0).then_some(())
        },
    )
    .await
    .unwrap();
    let mut dlq = js.get_stream(streams::DLQ).await.unwrap();
    assert!(dlq.info().await.unwrap().state.messages >= 3);
    let still = system
        .wait_job(&job.id, "still running", Duration::from_secs(5), |_| true)
        .await
        .unwrap();
    assert_eq!(still.state(), pb::JobState::Running, "{still:?}");

    std::fs::write(&go, b"").unwrap();
    let done = system
        .wait_terminal(&job.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), pb::JobState::Failed);
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].output_tail, vec!["honest".to_owned()]);
    drop(client);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_range_heartbeats_are_refused_alone_and_real_workers_stay_ready() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let (client, _) = system.admin_nats().await.unwrap();
    let odd: WorkerId = "odd-worker".parse().unwrap();
    let beat = Heartbeat {
        max_concurrent_jobs: u32::MAX,
        ..heartbeat(&odd)
    };
    let payload = serde_json::to_vec(&beat).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let beating = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.is_cancelled() {
                tick.tick().await;
                let _ = client
                    .publish(subjects::heartbeat(&odd), payload.clone().into())
                    .await;
            }
        })
    };
    wait_for(
        "odd heartbeats to be refused",
        Duration::from_secs(20),
        || async {
            let refused = metric(
                &system,
                "registry",
                r#"hodei_heartbeats_refused_total{field="max_concurrent_jobs"}"#,
            )
            .await;
            (refused >= 10.0).then_some(())
        },
    )
    .await
    .unwrap();
    // While they keep coming, the real worker is ready and its jobs run.
    for i in 0..3 {
        let job = system
            .submit(script(&format!("flows-{i}"), "echo ok"))
            .await
            .unwrap();
        let done = system
            .wait_terminal(&job.id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(done.state(), pb::JobState::Succeeded);
    }
    let mut workers = system.workers.clone();
    let list = workers
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(list.len(), 1, "the odd worker was never stored: {list:?}");
    assert_eq!(list[0].status(), pb::WorkerStatus::Ready);
    stop.cancel();
    beating.await.unwrap();
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_batch_from_a_worker_that_did_not_run_the_attempt_is_not_shown() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let job = system
        .submit(script("honest-logs", "echo honest line"))
        .await
        .unwrap();
    let done = system
        .wait_terminal(&job.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    let job_id: JobId = job.id.parse().unwrap();
    // As admin (no agent's key may publish this): a batch for attempt 1 under another
    // worker's name, and one under the runner's name for an attempt it never had.
    let (_, js) = system.admin_nats().await.unwrap();
    let forged = |attempt: u32, text: &str| {
        serde_json::to_vec(&hodei_messaging::LogBatch {
            job_id,
            attempt: AttemptNumber::new(attempt),
            lines: vec![hodei_messaging::LogEntry {
                seq: 1,
                stream: hodei_messaging::LogStreamKind::Stdout,
                text: text.to_owned(),
                at: Utc::now(),
            }],
            eof: true,
        })
        .unwrap()
    };
    let impostor: WorkerId = "impostor".parse().unwrap();
    let honest: WorkerId = "honest".parse().unwrap();
    for (subject, payload) in [
        (
            subjects::log(&impostor, &job_id),
            forged(1, "forged by another"),
        ),
        (subjects::log(&honest, &job_id), forged(7, "forged attempt")),
    ] {
        js.publish(subject, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut stream = system
        .jobs
        .clone()
        .stream_logs(pb::StreamLogsRequest {
            job_id: job.id.clone(),
            from_sequence: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut texts = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        texts.push(line.text);
    }
    assert_eq!(texts, vec!["honest line".to_owned()]);
    system.stop().await;
}
