//! Kill -9 of a real agent process in the middle of a job: the registry declares the worker
//! lost, the job is rescheduled on the other agent and succeeds, and its history shows the
//! lost attempt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use hodei_messaging::permissions::NatsRole;
use hodei_proto::v1 as pb;
use hodei_system_tests::{SystemOptions, TestSystem};
use hodei_test_support::wait_for;

async fn spawn_agent(
    system: &mut TestSystem,
    id: &str,
    work: &std::path::Path,
) -> tokio::process::Child {
    let nats = system
        .nats_env(&NatsRole::Agent(id.parse().unwrap()))
        .await
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei-agent"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(nats)
        .env("HODEI_WORKER_ID", id)
        .env("HODEI_AGENT_LABELS", "pool=failover")
        .env("HODEI_MAX_CONCURRENT_JOBS", "2")
        .env("HODEI_HEARTBEAT_INTERVAL_MS", "200")
        .env("HODEI_WORK_DIR", work.join(id))
        .env("HODEI_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn get(system: &TestSystem, id: &str) -> Option<pb::Job> {
    let mut client = system.jobs.clone();
    client
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
            as_of: None,
        })
        .await
        .ok()?
        .into_inner()
        .job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_s_job_is_rescheduled_and_succeeds() {
    // Lost after 3 missed 200 ms beats.
    let options = SystemOptions {
        missed_beats: 3,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(&[], options).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut agents = vec![
        (
            "failover-a",
            spawn_agent(&mut system, "failover-a", work.path()).await,
        ),
        (
            "failover-b",
            spawn_agent(&mut system, "failover-b", work.path()).await,
        ),
    ];
    let mut workers = system.workers.clone();
    wait_for("both agents ready", Duration::from_secs(30), || {
        let mut workers = workers.clone();
        async move {
            let list = workers
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .ok()?
                .into_inner();
            let ready = list
                .workers
                .iter()
                .filter(|w| w.status == pb::WorkerStatus::Ready as i32)
                .count();
            (ready == 2).then_some(())
        }
    })
    .await
    .unwrap();

    // The first attempt blocks until the test lets it go (the killed agent cannot stop its
    // processes: this is how the test ends the orphan); later ones finish at once.
    let release = work.path().join("release");
    let spec = pb::JobSpec {
        name: "survives-a-lost-agent".into(),
        command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
            interpreter: vec!["/bin/sh".into(), "-c".into()],
            script: "if [ \"$HODEI_ATTEMPT\" = 1 ]; then while [ ! -e \"$RELEASE\" ]; do sleep 0.1; done; fi; echo done on $HODEI_WORKER_ID".into(),
        })),
        env: [("RELEASE".to_owned(), release.display().to_string())].into(),
        required_labels: [("pool".to_owned(), "failover".to_owned())].into(),
        timeout_secs: 120,
        ..Default::default()
    };
    let job = system
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let running = wait_for("the first attempt running", Duration::from_secs(30), || {
        let system = &system;
        let id = job.id.clone();
        async move {
            let job = get(system, &id).await?;
            (job.state == pb::JobState::Running as i32).then_some(job)
        }
    })
    .await
    .unwrap();
    let first_worker = running.attempts[0].worker_id.clone();
    let (_, victim) = agents
        .iter_mut()
        .find(|(id, _)| *id == first_worker)
        .unwrap();
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();

    let done = wait_for(
        "the job to succeed elsewhere",
        Duration::from_secs(60),
        || {
            let system = &system;
            let id = job.id.clone();
            async move {
                let job = get(system, &id).await?;
                (job.state == pb::JobState::Succeeded as i32).then_some(job)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, first_worker);
    assert!(
        matches!(
            done.attempts[0]
                .outcome
                .as_ref()
                .and_then(|o| o.kind.clone()),
            Some(pb::attempt_outcome::Kind::Lost(_))
        ),
        "{:?}",
        done.attempts[0]
    );
    assert_ne!(done.attempts[1].worker_id, first_worker);
    assert_eq!(
        done.attempts[1].output_tail,
        vec![format!("done on {}", done.attempts[1].worker_id)]
    );
    let lost = workers
        .get_worker(pb::GetWorkerRequest {
            worker_id: first_worker.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert_eq!(lost.status, pb::WorkerStatus::Lost as i32);

    std::fs::write(&release, b"").unwrap();
    for (_, agent) in &mut agents {
        let _ = agent.start_kill();
        let _ = agent.wait().await;
    }
    system.stop().await;
}
