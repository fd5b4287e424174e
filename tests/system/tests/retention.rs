//! Retention through the real services: schedulers with a retention age of seconds move an
//! ended job and an ended pipeline run (with its step jobs) to the archive, and the gateway
//! still answers GetJob, GetJobHistory and GetPipelineRun for them from their archived events,
//! says clearly that they were archived where only a live job will do (WatchJob, CancelJob),
//! and the hot listings no longer show them. The scheduler exports what it moved and kept.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem, shell_job};
use hodei_test_support::{http_get, metric_sample, wait_for};
use tonic::Code;

const AGENT: &[AgentSpec] = &[AgentSpec {
    id: "retention-agent",
    labels: "os=linux",
    slots: 2,
}];

#[tokio::test]
async fn ended_jobs_and_runs_are_archived_and_still_read_by_id() {
    let options = SystemOptions {
        retention_age: Duration::from_secs(3),
        retention_interval: Duration::from_millis(200),
        ..SystemOptions::default()
    };
    let system = TestSystem::start_with(AGENT, options).await.unwrap();
    let job = system
        .submit(shell_job("retention-probe", "echo archive-marker-7"))
        .await
        .unwrap();
    let run = system
        .submit_pipeline(pb::PipelineSpec {
            name: "retention-run".into(),
            steps: vec![
                pb::PipelineStep {
                    name: "one".into(),
                    job: Some(shell_job("", "echo one")),
                    ..Default::default()
                },
                pb::PipelineStep {
                    name: "two".into(),
                    needs: vec!["one".into()],
                    job: Some(shell_job("", "echo two")),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ended = system
        .wait_terminal(&job.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ended.state, pb::JobState::Succeeded as i32);
    ended.archived_at = None;
    let mut ended_run = wait_for("the run to end", Duration::from_secs(60), || async {
        system
            .get_run(&run.id)
            .await
            .ok()
            .filter(|r| r.state == pb::PipelineState::Succeeded as i32)
    })
    .await
    .unwrap();
    ended_run.archived_at = None;

    // Archived a few seconds after they ended, and folded from the archive to what they were.
    let archived = wait_for(
        "the job to be archived",
        Duration::from_secs(60),
        || async {
            system
                .get_job(&job.id)
                .await
                .ok()
                .filter(|j| j.archived_at.is_some())
        },
    )
    .await
    .unwrap();
    let archived_at = archived.archived_at.unwrap();
    assert!(archived_at.seconds >= ended.updated_at.unwrap().seconds + 3);
    assert_eq!(
        pb::Job {
            archived_at: None,
            ..archived.clone()
        },
        ended
    );
    let archived_run = wait_for(
        "the run to be archived",
        Duration::from_secs(60),
        || async {
            system
                .get_run(&run.id)
                .await
                .ok()
                .filter(|r| r.archived_at.is_some())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        pb::PipelineRun {
            archived_at: None,
            ..archived_run.clone()
        },
        ended_run
    );
    // Its step jobs went with it.
    for step in &archived_run.steps {
        let step_job = system.get_job(&step.job_id).await.unwrap();
        assert!(step_job.archived_at.is_some(), "{}", step.name);
    }

    // Its history pages and as-of reads come from the archive.
    let mut jobs = system.jobs.clone();
    let history = jobs
        .get_job_history(pb::GetJobHistoryRequest {
            job_id: job.id.clone(),
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let types: Vec<&str> = history.events.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(types, ["submitted", "assigned", "started"]);
    assert_eq!(history.next_page_token, "3");
    let assigned = jobs
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
            as_of: Some(pb::get_job_request::AsOf::AsOfSeq(2)),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(assigned.state, pb::JobState::Assigned as i32);
    assert_eq!(assigned.archived_at, Some(archived_at));

    // Only a live job will do: refused, saying why.
    let cancel = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(cancel.code(), Code::FailedPrecondition);
    assert!(
        cancel
            .message()
            .starts_with(&format!("job {} was archived at ", job.id)),
        "{cancel:?}"
    );
    let watch = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            from_seq: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::FailedPrecondition);
    let unknown = system
        .get_job("0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // The hot listings forget them.
    let listed = jobs
        .list_jobs(pb::ListJobsRequest {
            query: "archive-marker-7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(listed.is_empty());
    let runs = system
        .pipelines
        .clone()
        .list_pipeline_runs(pb::ListPipelineRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(runs.is_empty());

    // The scheduler counts what it moved and what each table holds.
    let addr = system.metrics_addr("scheduler").unwrap();
    let metrics = wait_for("the retention metrics", Duration::from_secs(30), || async {
        let text = http_get(addr, "/metrics").await.ok()?.body;
        (metric_sample(&text, r#"hodei_retention_rows{table="jobs_archive"}"#) == Some(3.0))
            .then_some(text)
    })
    .await
    .unwrap();
    assert_eq!(
        metric_sample(&metrics, r#"hodei_archived_total{kind="job"}"#),
        Some(3.0)
    );
    assert_eq!(
        metric_sample(&metrics, r#"hodei_archived_total{kind="pipeline_run"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&metrics, r#"hodei_retention_rows{table="jobs"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric_sample(
            &metrics,
            r#"hodei_retention_rows{table="pipeline_runs_archive"}"#
        ),
        Some(1.0)
    );
    system.stop().await;
}
