//! Job execution on a real agent, end to end: timeouts and cancels stop whole process trees,
//! exit codes and signals end up in the job, large output arrives whole and in order, secret
//! values never leave the system, and a drained worker finishes its work and stops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hodei_proto::v1 as pb;
use hodei_system_tests::shell_job as script;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem};
use hodei_test_support::wait_for;

/// Longest wait for anything a job or the system should do.
const DEADLINE: Duration = Duration::from_secs(30);
/// The kill grace test systems give agents.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// A job that waits until the file `gate` exists, then prints `released`.
fn gated(name: &str, gate: &Path) -> pb::JobSpec {
    let mut spec = script(
        name,
        "while [ ! -e \"$GATE\" ]; do sleep 0.05; done; echo released",
    );
    spec.env
        .insert("GATE".to_owned(), gate.display().to_string());
    spec
}

async fn submit(system: &TestSystem, spec: pb::JobSpec) -> String {
    system.submit(spec).await.unwrap().id
}

async fn get(system: &TestSystem, id: &str) -> pb::Job {
    system
        .jobs
        .clone()
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

async fn wait_terminal(system: &TestSystem, id: &str) -> pb::Job {
    system.wait_terminal(id, DEADLINE).await.unwrap()
}

async fn wait_running(system: &TestSystem, id: &str) -> pb::Job {
    system
        .wait_job(id, "to run", DEADLINE, |state| {
            state == pb::JobState::Running
        })
        .await
        .unwrap()
}

/// Every output line of an ended job, followed to its end.
async fn logs(system: &TestSystem, id: &str) -> Vec<pb::LogLine> {
    let mut stream = system
        .jobs
        .clone()
        .stream_logs(pb::StreamLogsRequest {
            job_id: id.to_owned(),
            from_sequence: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("log lines keep coming")
    {
        lines.push(line.unwrap());
    }
    lines
}

/// The outcome of the job's last attempt.
fn last_outcome(job: &pb::Job) -> pb::attempt_outcome::Kind {
    job.attempts
        .last()
        .and_then(|a| a.outcome.clone())
        .and_then(|o| o.kind)
        .unwrap_or_else(|| panic!("no outcome in {job:?}"))
}

/// Whether the process is gone (or a zombie: dead, not yet reaped by its new parent).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_cancels_exit_codes_and_signals_end_jobs_as_they_should() {
    let system = TestSystem::start(&[AgentSpec {
        id: "exec-agent",
        labels: "os=linux",
        slots: 4,
    }])
    .await
    .unwrap();

    // Submitted together: they run side by side.
    let mut slow = script("slow", "sleep 300 & echo $!; sleep 300");
    slow.timeout_secs = 1;
    let slow = submit(&system, slow).await;
    let exit7 = submit(&system, script("exit-7", "exit 7")).await;
    let killed = submit(&system, script("killed", "kill -9 $$")).await;
    let sleeper = submit(&system, script("sleeper", "exec sleep 300")).await;
    let mut riscv = script("riscv", "true");
    riscv.required_labels.insert("arch".into(), "riscv".into());
    let queued = submit(&system, riscv).await;

    // The timeout stops the whole process tree, the background sleep included.
    let done = wait_terminal(&system, &slow).await;
    assert_eq!(done.state(), pb::JobState::TimedOut, "{done:?}");
    let lines = logs(&system, &slow).await;
    let grandchild: u32 = lines[0].text.parse().unwrap();
    wait_for("the background sleep to be gone", DEADLINE, || async {
        process_gone(grandchild).then_some(())
    })
    .await
    .unwrap();

    let done = wait_terminal(&system, &exit7).await;
    assert_eq!(done.state(), pb::JobState::Failed, "{done:?}");
    assert_eq!(done.exit_code, Some(7));
    assert_eq!(last_outcome(&done), pb::attempt_outcome::Kind::Exited(7));

    let done = wait_terminal(&system, &killed).await;
    assert_eq!(done.state(), pb::JobState::Failed, "{done:?}");
    assert_eq!(last_outcome(&done), pb::attempt_outcome::Kind::Signalled(9));

    // Cancelling a running job stops it within the kill grace and a few seconds.
    wait_running(&system, &sleeper).await;
    let cancelled_at = Instant::now();
    system
        .jobs
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: sleeper.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let done = wait_terminal(&system, &sleeper).await;
    assert_eq!(done.state(), pb::JobState::Cancelled, "{done:?}");
    assert!(
        cancelled_at.elapsed() < KILL_GRACE + Duration::from_secs(5),
        "cancelled after {:?}",
        cancelled_at.elapsed()
    );
    assert_eq!(
        last_outcome(&done),
        pb::attempt_outcome::Kind::Cancelled(true)
    );

    // Cancelling a queued job ends it at once, without an attempt.
    assert_eq!(get(&system, &queued).await.state(), pb::JobState::Queued);
    system
        .jobs
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: queued.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let done = wait_terminal(&system, &queued).await;
    assert_eq!(done.state(), pb::JobState::Cancelled, "{done:?}");
    assert!(done.attempts.is_empty(), "{:?}", done.attempts);

    // A job already ended cannot be cancelled.
    let status = system
        .jobs
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: exit7.clone(),
            reason: "too late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");

    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_arrives_whole_in_order_and_without_secrets() {
    let system = TestSystem::start(&[AgentSpec {
        id: "output-agent",
        labels: "",
        slots: 2,
    }])
    .await
    .unwrap();

    const SECRET: &str = "s3cr3t-t0k3n-value";
    let mut secret = script(
        "secret",
        "echo \"token is $TOKEN\"; echo \"user is $USER_NAME\"",
    );
    secret.env.insert("TOKEN".into(), SECRET.into());
    secret.env.insert("USER_NAME".into(), "alice".into());
    secret.secret_env.push("TOKEN".into());
    let secret = submit(&system, secret).await;
    // 10 MB: 100 000 numbered lines of 99 digits (zero-padded) and a newline.
    const COUNT: u64 = 100_000;
    let big = submit(
        &system,
        script("big", &format!("seq -f '%099.0f' 1 {COUNT}")),
    )
    .await;

    // The secret is masked in the output and absent from the job and its events.
    let done = wait_terminal(&system, &secret).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    let texts: Vec<String> = logs(&system, &secret)
        .await
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, vec!["token is ********", "user is alice"]);
    let spec = done.spec.clone().unwrap();
    assert_eq!(spec.secret_env, vec!["TOKEN".to_owned()]);
    assert_ne!(spec.env["TOKEN"], SECRET);
    assert_eq!(spec.env["USER_NAME"], "alice");
    assert!(!format!("{done:?}").contains(SECRET), "{done:?}");
    let mut events = system
        .jobs
        .clone()
        .watch_job(pb::WatchJobRequest {
            job_id: secret.clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut types = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE, events.next()).await.unwrap() {
        let event = event.unwrap();
        assert!(!format!("{event:?}").contains(SECRET), "{event:?}");
        types.push(event.r#type);
    }
    assert_eq!(
        types.last().map(String::as_str),
        Some("succeeded"),
        "{types:?}"
    );

    // Every line of the large output, in order.
    let done = wait_terminal(&system, &big).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    let lines = logs(&system, &big).await;
    assert_eq!(lines.len() as u64, COUNT);
    for (expected, line) in (1..=COUNT).zip(&lines) {
        assert_eq!(
            line.text,
            format!("{expected:099}"),
            "line {}",
            line.sequence
        );
        assert_eq!(line.sequence, expected);
    }

    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_worker_finishes_its_jobs_takes_no_more_and_stops() {
    const AGENT: &str = "drain-agent";
    let options = SystemOptions {
        // Long enough that the running job is never cut short on a slow machine.
        agent_drain_timeout_ms: 60_000,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(
        &[AgentSpec {
            id: AGENT,
            labels: "",
            slots: 2,
        }],
        options,
    )
    .await
    .unwrap();
    let gates = tempfile::tempdir().unwrap();
    let gate = gates.path().join("gate");
    let running = submit(&system, gated("running", &gate)).await;
    wait_running(&system, &running).await;

    // The agent's own heartbeats tell when it drains.
    let (client, _) = system.admin_nats().await.unwrap();
    let mut beats = client
        .subscribe(format!("hodei.v1.hb.{AGENT}"))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let worker = system
        .workers
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: AGENT.to_owned(),
            reason: "maintenance".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert_eq!(worker.status(), pb::WorkerStatus::Draining);
    let later = submit(&system, script("later", "echo too late")).await;
    // Draining, with the job still running.
    tokio::time::timeout(DEADLINE, async {
        while let Some(beat) = beats.next().await {
            let beat = String::from_utf8_lossy(&beat.payload).into_owned();
            if beat.contains("\"draining\":true") && beat.contains(&running) {
                return;
            }
        }
        panic!("heartbeats ended");
    })
    .await
    .expect("a draining heartbeat listing the running job");

    std::fs::write(&gate, b"").unwrap();
    let done = wait_terminal(&system, &running).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    wait_for("the agent to stop", DEADLINE, || async {
        (system.agent_stopped(AGENT) == Some(true)).then_some(())
    })
    .await
    .unwrap();

    // Its last beat said goodbye: the worker is offline, not lost.
    let workers = system.workers.clone();
    wait_for("the drained worker to be offline", DEADLINE, || {
        let mut workers = workers.clone();
        async move {
            let worker = workers
                .get_worker(pb::GetWorkerRequest {
                    worker_id: AGENT.to_owned(),
                })
                .await
                .ok()?
                .into_inner()
                .worker?;
            (worker.status() == pb::WorkerStatus::Offline).then_some(())
        }
    })
    .await
    .unwrap();
    let later = get(&system, &later).await;
    assert_eq!(later.state(), pb::JobState::Queued, "{later:?}");
    assert!(later.attempts.is_empty(), "{:?}", later.attempts);

    system.stop().await;
}
