//! End to end: real services, a private nats-server, a fresh PostgreSQL database and real
//! child processes on two agents (one with `gpu=true`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt;
use hodei_proto::v1 as pb;
use hodei_system_tests::shell_job as script;
use hodei_system_tests::{AgentSpec, TestSystem};
use hodei_test_support::wait_for;

const AGENTS: &[AgentSpec] = &[
    AgentSpec {
        id: "agent-gpu",
        labels: "gpu=true,os=linux",
        slots: 2,
    },
    AgentSpec {
        id: "agent-cpu",
        labels: "os=linux",
        slots: 2,
    },
];

async fn submit(system: &mut TestSystem, spec: pb::JobSpec) -> pb::Job {
    system.submit(spec).await.unwrap()
}

async fn wait_terminal(system: &TestSystem, id: &str) -> pb::Job {
    system
        .wait_terminal(id, Duration::from_secs(60))
        .await
        .unwrap()
}

async fn logs(system: &mut TestSystem, id: &str, follow: bool) -> Vec<pb::LogLine> {
    let mut stream = system
        .jobs
        .stream_logs(pb::StreamLogsRequest {
            job_id: id.to_owned(),
            from_sequence: 0,
            follow,
        })
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .unwrap()
    {
        lines.push(line.unwrap());
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_end_to_end_with_logs_exit_codes_and_labels() {
    let mut system = TestSystem::start(AGENTS).await.unwrap();

    // Exit 0: succeeded, output in StreamLogs (followed live, then replayed).
    let ok = submit(
        &mut system,
        script("hello", "echo hello from hodei; echo to stderr >&2"),
    )
    .await;
    let followed = logs(&mut system, &ok.id, true).await;
    let done = wait_terminal(&system, &ok.id).await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.exit_code, Some(0));
    let replayed = logs(&mut system, &ok.id, false).await;
    for lines in [&followed, &replayed] {
        let texts: Vec<(&str, i32)> = lines.iter().map(|l| (l.text.as_str(), l.stream)).collect();
        assert!(
            texts.contains(&("hello from hodei", pb::LogStream::Stdout as i32)),
            "{texts:?}"
        );
        assert!(
            texts.contains(&("to stderr", pb::LogStream::Stderr as i32)),
            "{texts:?}"
        );
        let seqs: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
        assert_eq!(seqs, (1..=lines.len() as u64).collect::<Vec<_>>());
    }

    // Exit 3: failed with exit code 3.
    let bad = submit(&mut system, script("exit-3", "echo about to fail; exit 3")).await;
    let done = wait_terminal(&system, &bad.id).await;
    assert_eq!(done.state, pb::JobState::Failed as i32, "{done:?}");
    assert_eq!(done.exit_code, Some(3));
    // The last lines of output stay with the attempt for a quick look.
    assert_eq!(
        done.attempts[0].output_tail,
        vec!["about to fail".to_owned()]
    );
    assert!(
        done.reason.contains("exited with code 3"),
        "{}",
        done.reason
    );

    // gpu=true runs only on the agent that has it.
    let mut gpu_jobs = Vec::new();
    for i in 0..4 {
        let mut spec = script(&format!("gpu-{i}"), "echo on $HODEI_WORKER_ID");
        spec.required_labels.insert("gpu".into(), "true".into());
        gpu_jobs.push(submit(&mut system, spec).await.id);
    }
    for id in &gpu_jobs {
        let done = wait_terminal(&system, id).await;
        assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
        assert!(
            done.attempts.iter().all(|a| a.worker_id == "agent-gpu"),
            "{:?}",
            done.attempts
        );
        let lines = logs(&mut system, id, false).await;
        assert_eq!(lines[0].text, "on agent-gpu");
    }

    // The history is there for WatchJob, from the first event to the terminal one.
    let mut watch = system
        .jobs
        .watch_job(pb::WatchJobRequest {
            job_id: ok.id.clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut types = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
    {
        types.push(event.unwrap().r#type);
    }
    assert_eq!(types, vec!["submitted", "assigned", "started", "succeeded"]);

    // Both agents registered, with their labels.
    let workers = system
        .workers
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = workers.workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, vec!["agent-cpu", "agent-gpu"]);

    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_submissions_are_idempotent() {
    let mut system = TestSystem::start(AGENTS).await.unwrap();

    // An invalid spec: INVALID_ARGUMENT naming each field.
    let mut spec = script("", "true");
    spec.max_attempts = 1000;
    let status = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("name:"), "{}", status.message());
    assert!(
        status.message().contains("max_attempts:"),
        "{}",
        status.message()
    );
    let status = system
        .jobs
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("job_id:"),
        "{}",
        status.message()
    );
    // A message that repeats a huge input is cut: whole, it would pass the 16 KiB of
    // headers a client accepts, and the client would see a protocol error, not the status.
    let status = system
        .jobs
        .get_job(pb::GetJobRequest {
            job_id: "x".repeat(40_000),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("job_id:")
            && status.message().ends_with("more bytes not shown)"),
        "{}",
        &status.message()[..200.min(status.message().len())]
    );
    // Filters PostgreSQL could not compare with are refused naming their field, not failed
    // as internal errors.
    let refused = [
        (
            pb::ListJobsRequest {
                name_prefix: "a\0".into(),
                ..Default::default()
            },
            "name_prefix:",
        ),
        (
            pb::ListJobsRequest {
                labels: [("team".to_owned(), "\0".to_owned())].into(),
                ..Default::default()
            },
            "labels.team:",
        ),
        (
            pb::ListJobsRequest {
                query: "𝄞".repeat(512),
                ..Default::default()
            },
            "query:",
        ),
    ];
    for (request, field) in refused {
        let status = system.jobs.list_jobs(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    let status = system
        .jobs
        .list_events(pb::ListEventsRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: -300_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("start_time:"),
        "{}",
        status.message()
    );
    let status = system
        .jobs
        .get_job(pb::GetJobRequest {
            job_id: "0195a4c4-0000-7000-8000-000000000000".into(),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // The same idempotency key twice: one job.
    let mut spec = script("once", "echo once");
    spec.idempotency_key = "deploy-42".into();
    let first = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec.clone()),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let second = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.job.unwrap().id, second.job.unwrap().id);

    // Garbage on every subject the services consume: logged, settled, nothing crashes.
    // (As admin: no service's or agent's credential may publish these.)
    let (client, js) = system.admin_nats().await.unwrap();
    for subject in [
        "hodei.v1.work.place.not-a-job",
        "hodei.v1.report.not-a-job",
        "hodei.v1.agent.agent-cpu.cmd",
    ] {
        js.publish(subject, "{not json".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    client
        .publish("hodei.v1.hb.agent-cpu", "\u{0}garbage".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    wait_for(
        "malformed messages dead-lettered",
        Duration::from_secs(20),
        || {
            let js = js.clone();
            async move {
                let mut dlq = js.get_stream("HODEI_DLQ").await.ok()?;
                let count = dlq.info().await.ok()?.state.messages;
                // The agent's own, under its name (its credential may write no other).
                let agents = dlq
                    .get_last_raw_message_by_subject("hodei.v1.dlq.agent-command.agent-cpu")
                    .await
                    .ok()?;
                (count >= 3 && agents.payload.as_ref() == b"{not json").then_some(())
            }
        },
    )
    .await
    .unwrap();

    // ...and the system still runs jobs.
    let after = submit(&mut system, script("after-garbage", "echo still fine")).await;
    let done = wait_terminal(&system, &after.id).await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");

    system.stop().await;
}
