//! Failure policy end to end: retries with backoff keep every attempt in the history, a job no
//! worker can take fails after the queue timeout saying what did not match, and a full queue
//! answers RESOURCE_EXHAUSTED while idempotent resubmissions still get their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::shell_job as script;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem};
use hodei_test_support::wait_for;

async fn wait_state(system: &TestSystem, id: &str, state: pb::JobState) -> pb::Job {
    system
        .wait_job(
            id,
            &format!("to be {state:?}"),
            Duration::from_secs(60),
            |s| s == state,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_attempts_are_retried_with_backoff_and_kept_in_history() {
    let mut system = TestSystem::start(&[AgentSpec {
        id: "retry-agent",
        labels: "",
        slots: 2,
    }])
    .await
    .unwrap();
    let mut spec = script(
        "flaky",
        "echo attempt $HODEI_ATTEMPT; [ \"$HODEI_ATTEMPT\" -ge 3 ]",
    );
    spec.max_attempts = 3;
    spec.retry_backoff = Some(pb::Backoff {
        initial_ms: 50,
        max_ms: 200,
    });
    let job = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await
        .unwrap();
    let id = job.into_inner().job.unwrap().id;
    let done = wait_state(&system, &id, pb::JobState::Succeeded).await;
    let numbers: Vec<u32> = done.attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    let outcomes: Vec<_> = done
        .attempts
        .iter()
        .map(|a| a.outcome.clone().unwrap().kind.unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec![
            pb::attempt_outcome::Kind::Exited(1),
            pb::attempt_outcome::Kind::Exited(1),
            pb::attempt_outcome::Kind::Exited(0)
        ]
    );
    assert_eq!(done.attempts[2].output_tail, vec!["attempt 3".to_owned()]);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unplaceable_job_says_why_and_fails_after_the_queue_timeout() {
    let options = SystemOptions {
        queue_timeout_ms: 1_500,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(
        &[AgentSpec {
            id: "plain-agent",
            labels: "os=linux",
            slots: 1,
        }],
        options,
    )
    .await
    .unwrap();
    let mut spec = script("needs-riscv", "true");
    spec.required_labels.insert("arch".into(), "riscv".into());
    let job = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await
        .unwrap();
    let id = job.into_inner().job.unwrap().id;
    let client = system.jobs.clone();
    let pending = wait_for("pending reason", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let job = client
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    as_of: None,
                })
                .await
                .ok()?
                .into_inner()
                .job?;
            let waiting =
                job.state == pb::JobState::Queued as i32 && job.reason.contains("label arch=riscv");
            (waiting || job.state == pb::JobState::Failed as i32).then_some(job.reason)
        }
    })
    .await
    .unwrap();
    // While it waits, GetJob says why (or, if the first look comes late, why it failed).
    let failed = wait_state(&system, &id, pb::JobState::Failed).await;
    assert!(failed.reason.contains("queue timeout"), "{}", failed.reason);
    assert!(
        failed
            .reason
            .contains("plain-agent: needs label arch=riscv"),
        "{}",
        failed.reason
    );
    assert!(failed.attempts.is_empty());
    assert!(
        pending.contains("plain-agent: needs label arch=riscv"),
        "{pending}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_resource_exhausted() {
    let options = SystemOptions {
        max_queued_jobs: 3,
        ..SystemOptions::default()
    };
    // No agents: everything stays queued.
    let mut system = TestSystem::start_with(&[], options).await.unwrap();
    let mut keyed = script("keyed", "true");
    keyed.idempotency_key = "first".into();
    let first = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(keyed.clone()),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let client = system.jobs.clone();
    let status = wait_for("the queue to fill", Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            let spec = script("filler", "true");
            client
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(spec),
                    tenant: String::new(),
                })
                .await
                .err()
        }
    })
    .await
    .unwrap();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("queue is full"),
        "{}",
        status.message()
    );
    let listed = system
        .jobs
        .list_jobs(pb::ListJobsRequest {
            states: vec![pb::JobState::Queued as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.len() >= 3);
    // An accepted job's resubmission is still answered.
    let again = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(keyed),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job.unwrap().id, first.job.unwrap().id);
    // The refusal is counted.
    let metrics = system.metrics_addr("api-gateway").unwrap();
    let text = hodei_test_support::http_get(metrics, "/metrics")
        .await
        .unwrap()
        .body;
    let refused = hodei_test_support::metric_sample(&text, "hodei_submissions_refused_total");
    assert!(refused.is_some_and(|n| n >= 1.0), "{text}");
    system.stop().await;
}
