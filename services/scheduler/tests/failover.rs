//! Kill -9 of a real scheduler process in the middle of a 300-job run, while another replica
//! (in the test system) shares its consumers: every job still ends, succeeded, exactly once,
//! and no job ever had two attempts at the same time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use hodei_domain::AttemptRecord;
use hodei_messaging::permissions::NatsRole;
use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem};
use hodei_test_support::{free_port, http_get, metric_sample, wait_for};

const JOBS: usize = 300;

async fn spawn_scheduler(system: &mut TestSystem, metrics_port: u16) -> tokio::process::Child {
    let nats = system.nats_env(&NatsRole::Scheduler).await.unwrap();
    let backends = system.backends();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei-scheduler"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(nats)
        .env("HODEI_DATABASE_URL", &backends.database_url)
        .env("HODEI_ACK_WAIT_MS", "2000")
        .env("HODEI_PLACEMENT_RETRY_MS", "100")
        .env("HODEI_WORKER_STALE_MS", "5000")
        .env("HODEI_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("HODEI_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_scheduler_process_loses_nothing_and_runs_nothing_twice() {
    let options = SystemOptions {
        ack_wait_ms: 2_000,
        ..SystemOptions::default()
    };
    let agents: Vec<AgentSpec> = ["sched-kill-1", "sched-kill-2", "sched-kill-3"]
        .into_iter()
        .map(|id| AgentSpec {
            id,
            labels: "",
            slots: 4,
        })
        .collect();
    let mut system = TestSystem::start_with(&agents, options).await.unwrap();
    let port = free_port().unwrap();
    let mut victim = spawn_scheduler(&mut system, port).await;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(
        "the scheduler process to be ready",
        Duration::from_secs(30),
        || async move { (http_get(metrics, "/readyz").await.ok()?.status == 200).then_some(()) },
    )
    .await
    .unwrap();

    for i in 0..JOBS {
        let spec = pb::JobSpec {
            name: format!("sched-kill-{i}"),
            command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: vec!["/bin/sh".into(), "-c".into()],
                script: "sleep 0.05".into(),
            })),
            timeout_secs: 120,
            ..Default::default()
        };
        system.submit(spec).await.unwrap();
    }
    // Killed once it has placed work of its own, with much of the run still to go.
    let placed = wait_for(
        "the scheduler process to place jobs",
        Duration::from_secs(60),
        || async move {
            let text = http_get(metrics, "/metrics").await.ok()?.body;
            let placed = metric_sample(&text, r#"hodei_placements_total{result="placed"}"#)?;
            (placed >= 5.0).then_some(placed)
        },
    )
    .await
    .unwrap();
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();

    let pool = system.database.connect().await.unwrap();
    wait_for("every job to end", Duration::from_secs(120), || {
        let pool = &pool;
        async move {
            let ended: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs
                 WHERE state IN ('succeeded', 'failed', 'cancelled', 'timed_out')",
            )
            .fetch_one(pool)
            .await
            .ok()?;
            (ended == JOBS as i64).then_some(())
        }
    })
    .await
    .unwrap();
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as("SELECT state, attempts FROM jobs")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), JOBS);
    let mut retried = 0;
    for (state, attempts) in rows {
        assert_eq!(state, "succeeded");
        let attempts: Vec<AttemptRecord> = serde_json::from_value(attempts).unwrap();
        let succeeded = attempts
            .iter()
            .filter(|a| a.outcome.as_ref().is_some_and(|o| o.is_success()))
            .count();
        assert_eq!(succeeded, 1, "{attempts:?}");
        retried += usize::from(attempts.len() > 1);
        // No two attempts of one job overlapped in time.
        for pair in attempts.windows(2) {
            let end = pair[0].finished_at.unwrap();
            assert!(end <= pair[1].assigned_at, "{attempts:?}");
        }
    }
    eprintln!(
        "a_killed_scheduler_process_loses_nothing_and_runs_nothing_twice: killed after it placed \
         {placed} jobs; {JOBS} jobs succeeded once each, {retried} with more than one attempt"
    );
    pool.close().await;
    system.stop().await;
}
