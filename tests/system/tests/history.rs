//! History and search through the real gRPC API: real services, a private nats-server, a
//! fresh database and real processes on one agent. A job's history page by page, the job and
//! a pipeline run as they stood at an earlier event or time, events across jobs by time, type
//! and labels, and ListJobs' `query` finding a word the job printed (and another tenant's
//! search, history and events not reaching it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, TestSystem};
use hodei_test_support::wait_for;
use tonic::Code;

const AGENT: &[AgentSpec] = &[AgentSpec {
    id: "history-agent",
    labels: "os=linux",
    slots: 2,
}];

fn script(name: &str, script: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
            interpreter: vec!["/bin/sh".into(), "-c".into()],
            script: script.to_owned(),
        })),
        timeout_secs: 60,
        labels: [("suite".to_owned(), "history".to_owned())].into(),
        ..Default::default()
    }
}

async fn job_at(
    system: &TestSystem,
    id: &str,
    as_of: pb::get_job_request::AsOf,
) -> Result<pb::Job, tonic::Status> {
    system
        .jobs
        .clone()
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
            as_of: Some(as_of),
        })
        .await
        .map(|r| r.into_inner().job.unwrap())
}

fn secs_before(t: &prost_types::Timestamp, secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.seconds - secs,
        nanos: t.nanos,
    }
}

#[tokio::test]
async fn history_as_of_events_and_search_through_the_api() {
    let system = TestSystem::start(AGENT).await.unwrap();
    let mut jobs = system.jobs.clone();
    let job = system
        .submit(script("history-probe", "echo unicorn-marker-42; echo done"))
        .await
        .unwrap();
    let ended = system
        .wait_terminal(&job.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ended.state, pb::JobState::Succeeded as i32);

    // GetJobHistory, two events a page.
    let mut events = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = jobs
            .get_job_history(pb::GetJobHistoryRequest {
                job_id: job.id.clone(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.events.len() <= 2);
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(types, ["submitted", "assigned", "started", "succeeded"]);
    assert_eq!(pages, 2);
    let states: Vec<i32> = events.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            pb::JobState::Queued,
            pb::JobState::Assigned,
            pb::JobState::Running,
            pb::JobState::Succeeded
        ]
        .map(|s| s as i32)
    );
    let data: serde_json::Value = serde_json::from_str(&events[3].data).unwrap();
    assert_eq!(data["type"], "succeeded");
    assert_eq!(data["outcome"]["code"], 0, "{data}");
    assert!(
        data["output_tail"]
            .to_string()
            .contains("unicorn-marker-42"),
        "{data}"
    );
    let bad = jobs
        .get_job_history(pb::GetJobHistoryRequest {
            job_id: job.id.clone(),
            page_size: 0,
            page_token: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_token: "), "{bad:?}");
    let unknown = jobs
        .get_job_history(pb::GetJobHistoryRequest {
            job_id: "0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // GetJob as of an event, and as of a time.
    use pb::get_job_request::AsOf;
    let first = job_at(&system, &job.id, AsOf::AsOfSeq(1)).await.unwrap();
    assert_eq!(
        (first.state, first.version, first.attempts.len()),
        (pb::JobState::Queued as i32, 1, 0)
    );
    let running = job_at(&system, &job.id, AsOf::AsOfSeq(3)).await.unwrap();
    assert_eq!(running.state, pb::JobState::Running as i32);
    assert_eq!(running.attempts[0].worker_id, "history-agent");
    let too_far = job_at(&system, &job.id, AsOf::AsOfSeq(5))
        .await
        .unwrap_err();
    assert_eq!(too_far.code(), Code::InvalidArgument);
    assert_eq!(
        too_far.message(),
        format!("as_of_seq: job {} has 4 events, not 5", job.id)
    );
    let created = ended.created_at.unwrap();
    let before = job_at(&system, &job.id, AsOf::AsOfTime(secs_before(&created, 1)))
        .await
        .unwrap_err();
    assert_eq!(before.code(), Code::NotFound);
    let at_submission = job_at(&system, &job.id, AsOf::AsOfTime(created))
        .await
        .unwrap();
    assert_eq!(at_submission.state, pb::JobState::Queued as i32);
    let now = job_at(
        &system,
        &job.id,
        AsOf::AsOfTime(hodei_proto::timestamp(chrono::Utc::now())),
    )
    .await
    .unwrap();
    assert_eq!(
        now, ended,
        "the job folded from all its events is the live projection"
    );

    // ListJobs' query matches the output tail, and is bounded.
    let search = |query: &str| pb::ListJobsRequest {
        query: query.to_owned(),
        ..Default::default()
    };
    let found = jobs
        .list_jobs(search("unicorn-marker-42"))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(
        found.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [job.id.as_str()]
    );
    let found = jobs
        .list_jobs(search("history-probe -unicorn"))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(found.is_empty());
    // Another tenant's search does not reach this job (the system's clients are an admin's
    // of tenant `default`); its history and events are not found either.
    let other = system
        .clients(Some(
            &system
                .token("team-other", hodei_domain::Role::Viewer)
                .await
                .unwrap(),
        ))
        .unwrap();
    let mut other_jobs = other.jobs.clone();
    let found = other_jobs
        .list_jobs(search("unicorn-marker-42"))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(found.is_empty(), "{found:?}");
    let history = other_jobs
        .get_job_history(pb::GetJobHistoryRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(history.code(), Code::NotFound);
    let theirs = other_jobs
        .list_events(pb::ListEventsRequest {
            labels: [("suite".to_owned(), "history".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(theirs.is_empty(), "{theirs:?}");
    let long = jobs.list_jobs(search(&"a".repeat(513))).await.unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(long.message().starts_with("query: "), "{long:?}");

    // ListEvents by time, labels and type, three a page.
    let since = secs_before(&created, 1);
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .list_events(pb::ListEventsRequest {
                start_time: Some(since),
                labels: [("suite".to_owned(), "history".to_owned())].into(),
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        listed, events,
        "ListEvents and GetJobHistory agree on the only job"
    );
    let started = jobs
        .list_events(pb::ListEventsRequest {
            types: vec!["started".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].state, pb::JobState::Running as i32);
    let none = jobs
        .list_events(pb::ListEventsRequest {
            end_time: Some(since),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(none.is_empty());
    let bad_type = jobs
        .list_events(pb::ListEventsRequest {
            types: vec!["exploded".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_type.code(), Code::InvalidArgument);
    assert!(
        bad_type
            .message()
            .starts_with("types[0]: unknown event type 'exploded'"),
        "{bad_type:?}"
    );
    let backwards = jobs
        .list_events(pb::ListEventsRequest {
            start_time: Some(created),
            end_time: Some(since),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        backwards.message().starts_with("end_time: "),
        "{backwards:?}"
    );

    // A pipeline run as it stood at its first event and at the end.
    let step = |name: &str, needs: &[&str]| pb::PipelineStep {
        name: name.to_owned(),
        needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        job: Some(script("", "true")),
        ..Default::default()
    };
    let run = system
        .submit_pipeline(pb::PipelineSpec {
            name: "history-run".into(),
            steps: vec![step("a", &[]), step("b", &["a"])],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut pipelines = system.pipelines.clone();
    let get = |as_of| pb::GetPipelineRunRequest {
        run_id: run.id.clone(),
        as_of,
    };
    let live = wait_for("the run to end", Duration::from_secs(60), || {
        let mut pipelines = pipelines.clone();
        let request = get(None);
        async move {
            let run = pipelines
                .get_pipeline_run(request)
                .await
                .ok()?
                .into_inner()
                .run?;
            (run.state == pb::PipelineState::Succeeded as i32).then_some(run)
        }
    })
    .await
    .unwrap();
    use pb::get_pipeline_run_request::AsOf as RunAsOf;
    let at_start = pipelines
        .get_pipeline_run(get(Some(RunAsOf::AsOfSeq(1))))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(at_start.version, 1);
    assert_ne!(at_start.state, pb::PipelineState::Succeeded as i32);
    assert!(
        at_start.steps.iter().all(|s| s.attempts.is_empty()),
        "{at_start:?}"
    );
    let folded = pipelines
        .get_pipeline_run(get(Some(RunAsOf::AsOfSeq(live.version))))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(
        folded, live,
        "the run folded from all its events is the live projection"
    );
    let before = pipelines
        .get_pipeline_run(get(Some(RunAsOf::AsOfTime(secs_before(
            live.created_at.as_ref().unwrap(),
            1,
        )))))
        .await
        .unwrap_err();
    assert_eq!(before.code(), Code::NotFound);
    system.stop().await;
}
