//! `SubmitJobs`: several jobs of one tenant recorded in one call, all of them or none. Every
//! job of an accepted call runs once (a ledger the jobs write says so), a call with one bad
//! spec records nothing and names that spec's field, a retried call records nothing twice, and
//! a queue quota the call would pass refuses it whole.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hodei_domain::Role;
use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, TestSystem, shell_job};
use hodei_test_support::wait_for;

const AGENTS: &[AgentSpec] = &[AgentSpec {
    id: "batch-agent",
    labels: "",
    slots: 4,
}];
const DEADLINE: Duration = Duration::from_secs(60);

async fn submit_jobs(
    system: &TestSystem,
    tenant: &str,
    specs: Vec<pb::JobSpec>,
) -> Result<Vec<pb::SubmitJobResponse>, tonic::Status> {
    let response = system
        .jobs
        .clone()
        .submit_jobs(pb::SubmitJobsRequest {
            specs,
            tenant: tenant.to_owned(),
        })
        .await?;
    Ok(response.into_inner().results)
}

/// Names of the jobs of `tenant` whose name starts with `prefix`.
async fn names(system: &TestSystem, tenant: &str, prefix: &str) -> Vec<String> {
    let listed = system
        .jobs
        .clone()
        .list_jobs(pb::ListJobsRequest {
            name_prefix: prefix.to_owned(),
            tenant: tenant.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    listed
        .jobs
        .into_iter()
        .map(|j| j.spec.unwrap_or_default().name)
        .collect()
}

fn keyed(name: &str, key: &str) -> pb::JobSpec {
    pb::JobSpec {
        idempotency_key: key.to_owned(),
        ..shell_job(name, "true")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_recorded_whole_and_each_of_its_jobs_runs_once() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");

    let specs: Vec<pb::JobSpec> = (0..20)
        .map(|i| {
            let name = format!("batch-{i}");
            shell_job(&name, &format!("echo {name} >> '{}'", ledger.display()))
        })
        .collect();
    let results = submit_jobs(&system, "", specs).await.unwrap();
    assert_eq!(results.len(), 20);
    for (i, result) in results.iter().enumerate() {
        assert!(result.created, "{result:?}");
        let job = result.job.as_ref().unwrap();
        assert_eq!(job.spec.as_ref().unwrap().name, format!("batch-{i}"));
    }
    for result in &results {
        let id = &result.job.as_ref().unwrap().id;
        let done = system.wait_terminal(id, DEADLINE).await.unwrap();
        assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    }
    let mut ran: Vec<String> = std::fs::read_to_string(&ledger)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    ran.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("batch-{i}")).collect();
    expected.sort();
    assert_eq!(ran, expected, "each job of the batch ran exactly once");

    // Each created job has its audit entry, committed with it.
    let pool = system.database.connect().await.unwrap();
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'SubmitJobs' AND target LIKE 'job %'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, 20);

    // Retried with the same keys, the call records nothing new and answers the same jobs.
    let first = submit_jobs(
        &system,
        "",
        vec![keyed("again-0", "k-0"), keyed("again-1", "k-1")],
    )
    .await
    .unwrap();
    let retried = submit_jobs(
        &system,
        "",
        vec![keyed("again-0", "k-0"), keyed("again-1", "k-1")],
    )
    .await
    .unwrap();
    assert!(first.iter().all(|r| r.created));
    assert!(retried.iter().all(|r| !r.created), "{retried:?}");
    let ids = |rs: &[pb::SubmitJobResponse]| -> Vec<String> {
        rs.iter()
            .map(|r| r.job.as_ref().unwrap().id.clone())
            .collect()
    };
    assert_eq!(ids(&first), ids(&retried));
    // One known key and one new: the new job is recorded, the known one answered.
    let mixed = submit_jobs(
        &system,
        "",
        vec![keyed("again-1", "k-1"), keyed("again-2", "k-2")],
    )
    .await
    .unwrap();
    assert_eq!(
        mixed.iter().map(|r| r.created).collect::<Vec<_>>(),
        [false, true]
    );
    assert_eq!(names(&system, "", "again-").await.len(), 3);
    pool.close().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_with_one_bad_spec_or_past_a_quota_records_nothing() {
    let system = TestSystem::start(&[]).await.unwrap();

    // An invalid spec is named by its place in the call; nothing of the call is recorded.
    let mut specs: Vec<pb::JobSpec> = (0..4)
        .map(|i| shell_job(&format!("bad-{i}"), "true"))
        .collect();
    specs[2].name = String::new();
    let refused = submit_jobs(&system, "", specs).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("specs[2].name: "),
        "{}",
        refused.message()
    );
    assert!(names(&system, "", "bad-").await.is_empty());

    // Two jobs of one call may not share an idempotency key.
    let refused = submit_jobs(&system, "", vec![keyed("dup-0", "k"), keyed("dup-1", "k")])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .starts_with("specs[1].idempotency_key: the same key as specs[0]"),
        "{}",
        refused.message()
    );
    assert!(names(&system, "", "dup-").await.is_empty());

    // No job, or more than a call may carry, is refused naming `specs`.
    for count in [0, 1001] {
        let specs = (0..count)
            .map(|i| shell_job(&format!("many-{i}"), "true"))
            .collect();
        let refused = submit_jobs(&system, "", specs).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().starts_with("specs: "),
            "{}",
            refused.message()
        );
    }

    // A viewer may not submit.
    let viewer = system.token("team-v", Role::Viewer).await.unwrap();
    let refused = system
        .clients(Some(&viewer))
        .unwrap()
        .jobs
        .submit_jobs(pb::SubmitJobsRequest {
            specs: vec![shell_job("viewed", "true")],
            tenant: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // With a queue quota of 3 (no worker here, so jobs stay queued), a call of 4 is refused
    // whole, a call of 3 is recorded, and then a call of 1 is refused.
    system
        .set_tenant_policy(
            "team-q",
            pb::TenantPolicy {
                weight: 1,
                max_queued_jobs: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let four = (0..4)
        .map(|i| shell_job(&format!("q-{i}"), "true"))
        .collect();
    let refused = submit_jobs(&system, "team-q", four).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .starts_with("none of the 4 new jobs was recorded: ")
            && refused.message().contains("max_queued_jobs"),
        "{}",
        refused.message()
    );
    assert!(names(&system, "team-q", "q-").await.is_empty());
    let three = (0..3)
        .map(|i| shell_job(&format!("q-{i}"), "true"))
        .collect();
    let accepted = submit_jobs(&system, "team-q", three).await.unwrap();
    assert!(accepted.iter().all(|r| r.created));
    let refused = submit_jobs(&system, "team-q", vec![shell_job("q-3", "true")])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(names(&system, "team-q", "q-").await.len(), 3);

    // The refused calls are in the audit log (written after their answers).
    let pool = system.database.connect().await.unwrap();
    let refusals = wait_for("the refused calls in the audit log", DEADLINE, || async {
        let outcomes: Vec<String> = sqlx::query_scalar(
            "SELECT outcome FROM audit_log WHERE action = 'SubmitJobs' AND target = 'jobs'",
        )
        .fetch_all(&pool)
        .await
        .ok()?;
        let count = |what: &str| outcomes.iter().filter(|o| *o == what).count();
        // Refusals for load are summed up, a row per tenant and second.
        (count("ResourceExhausted") > 0).then_some(count("InvalidArgument"))
    })
    .await
    .unwrap();
    assert_eq!(refusals, 4, "two bad specs, no job, too many jobs");
    pool.close().await;
    system.stop().await;
}
