//! A poison input blocks nobody but itself: a job's output with a NUL character is stored
//! with U+FFFD in its place, a spec too large for the transport is refused at
//! the edge naming its field (a request too large to decode, with its size and the limit), a message too large that got into the outbox anyway is taken out
//! of the way (its job fails with the reason) while other users' jobs flow, and a secret named
//! anywhere in a pipeline is masked everywhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use chrono::Utc;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{Job, JobId, JobSpec, TenantId};
use hodei_messaging::{Outgoing, PlaceJob};
use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, TestSystem};
use hodei_test_support::{http_get, metric_sample, wait_for};

const AGENTS: &[AgentSpec] = &[AgentSpec {
    id: "worker",
    labels: "",
    slots: 2,
}];
/// More than the 1 MiB a default nats-server accepts in one message.
const TOO_LARGE: usize = 1_200_000;
const DEADLINE: Duration = Duration::from_secs(30);

fn exec(name: &str, argv: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        })),
        timeout_secs: 60,
        ..Default::default()
    }
}

fn step(name: &str, job: pb::JobSpec) -> pb::PipelineStep {
    pb::PipelineStep {
        name: name.to_owned(),
        job: Some(job),
        ..Default::default()
    }
}

/// Runs `true` and waits for it to succeed: the system still serves others.
async fn others_still_flow(system: &TestSystem, name: &str) {
    let job = system.submit(exec(name, &["true"])).await.unwrap();
    let done = system.wait_terminal(&job.id, DEADLINE).await.unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_too_large_for_nats_is_refused_naming_its_field() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let big = "x".repeat(TOO_LARGE);

    let mut job = exec("big", &["true"]);
    job.env.insert("BIG".into(), big.clone());
    let refused = system.submit(job).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("spec.env[\"BIG\"]: "),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("max_payload"),
        "{}",
        refused.message()
    );

    // In a pipeline: a step's own env, and the pipeline's env every step inherits.
    let mut heavy = exec("heavy", &["true"]);
    heavy.env.insert("BIG".into(), big.clone());
    let refused = system
        .submit_pipeline(pb::PipelineSpec {
            name: "big-step".into(),
            steps: vec![
                step("light", exec("light", &["true"])),
                step("heavy", heavy),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("steps.heavy.env[\"BIG\"]: "),
        "{}",
        refused.message()
    );
    let refused = system
        .submit_pipeline(pb::PipelineSpec {
            name: "big-env".into(),
            env: [("BIG".to_owned(), big)].into(),
            steps: vec![step("light", exec("light", &["true"]))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().starts_with("env[\"BIG\"]: "),
        "{}",
        refused.message()
    );

    // Past the largest request the gateway decodes, refused before it is decoded, with its
    // size and the limit.
    let mut huge = exec("huge", &["true"]);
    huge.env.insert(
        "HUGE".into(),
        "x".repeat(hodei_api_gateway::MAX_REQUEST_BYTES + 1),
    );
    let refused = system.submit(huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains(&format!(
            "limit is: {} bytes",
            hodei_api_gateway::MAX_REQUEST_BYTES
        )),
        "{}",
        refused.message()
    );

    others_still_flow(&system, "after-refusals").await;
    system.stop().await;
}

/// Jobs as large as the edge accepts fill a list's answer past what a client reads (4 MiB):
/// the page is cut there, and its token leads to the rest, so nobody's listing breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_of_large_jobs_is_cut_to_what_a_client_reads() {
    let system = TestSystem::start(&[]).await.unwrap();
    let mut submitted = Vec::new();
    for i in 0..6 {
        let mut spec = exec(&format!("large-{i}"), &["true"]);
        spec.env.insert("BULK".into(), "x".repeat(900_000));
        submitted.push(system.submit(spec).await.unwrap().id);
    }
    let mut listed = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = system
            .jobs
            .clone()
            .list_jobs(pb::ListJobsRequest {
                page_size: 100,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        listed.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    listed.sort();
    submitted.sort();
    assert_eq!(listed, submitted);
    assert!(pages >= 2, "{pages} pages");
    system.stop().await;
}

/// A job may print a NUL character, which PostgreSQL refuses in text: its output tail keeps
/// U+FFFD in its place, and the job ends as it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_prints_a_nul_character_ends_as_it_ended() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let job = system
        .submit(exec("prints-nul", &["printf", "before\\0after\\n"]))
        .await
        .unwrap();
    let done = system.wait_terminal(&job.id, DEADLINE).await.unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(
        done.attempts[0].output_tail,
        vec!["before\u{FFFD}after".to_owned()]
    );
    others_still_flow(&system, "after-nul").await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_too_large_in_the_outbox_fails_its_job_and_blocks_nobody() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let pool = system.database.connect().await.unwrap();
    // As the issue saw it: a job accepted before the edge checked sizes. Its submitted event
    // and its assignment are larger than NATS takes.
    let mut draft = JobSpecDraft::exec("poison", &["true"]);
    draft.env.insert("BIG".into(), "x".repeat(TOO_LARGE));
    let spec = JobSpec::try_from(draft).unwrap();
    let (job, event) = Job::submit(JobId::new(), TenantId::default(), spec, Utc::now());
    let messages = [
        Outgoing::job_event(&event, "test").unwrap(),
        Outgoing::place_job(&PlaceJob {
            job_id: job.id(),
            attempt: job.current_attempt(),
            priority: 0,
            not_before: None,
        })
        .unwrap(),
    ];
    hodei_storage::driver::submit_job(&pool, &job, &event, &messages)
        .await
        .unwrap();
    // Jobs submitted right behind it run.
    let mut behind = Vec::new();
    for i in 0..5 {
        behind.push(
            system
                .submit(exec(&format!("behind-{i}"), &["true"]))
                .await
                .unwrap(),
        );
    }
    for other in &behind {
        let done = system.wait_terminal(&other.id, DEADLINE).await.unwrap();
        assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    }

    let failed = system
        .wait_terminal(&job.id().to_string(), DEADLINE)
        .await
        .unwrap();
    assert_eq!(failed.state(), pb::JobState::Failed, "{failed:?}");
    assert!(
        failed.reason.contains("could not be delivered"),
        "{}",
        failed.reason
    );
    assert_eq!(
        failed.attempts.len(),
        1,
        "not retried: {:?}",
        failed.attempts
    );
    let dead: Vec<(String, Option<chrono::DateTime<Utc>>)> =
        sqlx::query_as("SELECT subject, handled_at FROM outbox_dead ORDER BY dead_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        dead.iter().any(|(subject, _)| subject.ends_with(".cmd")),
        "the assignment is dead-lettered: {dead:?}"
    );
    wait_for("every dead letter to be handled", DEADLINE, || {
        let pool = &pool;
        async move {
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox_dead WHERE handled_at IS NULL")
                    .fetch_one(pool)
                    .await
                    .ok()?;
            (open == 0).then_some(())
        }
    })
    .await
    .unwrap();
    let mut counted = 0.0;
    for service in ["api-gateway", "scheduler", "registry"] {
        let addr = system.metrics_addr(service).unwrap();
        let body = http_get(addr, "/metrics").await.unwrap().body;
        counted += metric_sample(&body, "hodei_outbox_dead_lettered_total").unwrap_or(0.0);
    }
    assert_eq!(counted, dead.len() as f64);
    // The worker's slot came back: two more jobs run side by side on its two slots.
    others_still_flow(&system, "after-poison").await;
    pool.close().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_secret_is_masked_in_every_answer_and_the_job_gets_it() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let mut deploy = exec("deploy", &["sh", "-c", "echo token=$TOKEN"]);
    deploy.secret_env.push("TOKEN".into());
    // The job gets the real value (12 characters), not the mask (8).
    let notify = exec("notify", &["sh", "-c", "test ${#TOKEN} -eq 12"]);
    let run = system
        .submit_pipeline(pb::PipelineSpec {
            name: "secrets".into(),
            env: [("TOKEN".to_owned(), "s3cr3t-value".to_owned())].into(),
            steps: vec![step("deploy", deploy), {
                let mut s = step("notify", notify);
                s.needs = vec!["deploy".into()];
                s
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!format!("{run:?}").contains("s3cr3t-value"), "{run:?}");
    let done = wait_for("the run to end", DEADLINE, || {
        let mut client = system.pipelines.clone();
        let id = run.id.clone();
        async move {
            let run = client
                .get_pipeline_run(pb::GetPipelineRunRequest {
                    run_id: id,
                    as_of: None,
                })
                .await
                .ok()?
                .into_inner()
                .run?;
            (run.state() == pb::PipelineState::Succeeded
                || run.state() == pb::PipelineState::Failed)
                .then_some(run)
        }
    })
    .await
    .unwrap();
    assert_eq!(done.state(), pb::PipelineState::Succeeded, "{done:?}");
    assert!(!format!("{done:?}").contains("s3cr3t-value"), "{done:?}");
    // Each step is shown with its job, the one naming a pipeline secret too.
    let spec = done.spec.as_ref().unwrap();
    assert!(spec.steps.iter().all(|s| s.job.is_some()), "{spec:?}");
    assert_eq!(spec.env["TOKEN"], "********");
    // Each step's job shows the mask; its output masks the value it printed.
    for step in &done.steps {
        let job = system
            .jobs
            .clone()
            .get_job(pb::GetJobRequest {
                job_id: step.job_id.clone(),
                as_of: None,
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert!(!format!("{job:?}").contains("s3cr3t-value"), "{job:?}");
    }
    system.stop().await;
}
