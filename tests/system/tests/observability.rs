//! Metrics and health: after a few jobs every service's `/metrics` shows the counters those
//! jobs moved, `/healthz` answers, and `/readyz` goes false while NATS is down and true again
//! once it is back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, TestSystem};
use hodei_test_support::{http_get, metric_sample, wait_for};

const AGENT: &str = "metrics-agent";
const SERVICES: [&str; 4] = ["api-gateway", "scheduler", "registry", AGENT];

fn script(name: &str, script: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
            interpreter: vec!["/bin/sh".into(), "-c".into()],
            script: script.to_owned(),
        })),
        timeout_secs: 60,
        max_attempts: 1,
        ..Default::default()
    }
}

async fn scrape(addr: SocketAddr) -> String {
    let response = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// Waits until every service's `/readyz` answers `want` (200 or 503).
async fn wait_readiness(system: &TestSystem, want: u16) {
    system
        .wait_readiness(&SERVICES, want, Duration::from_secs(30))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_jobs_and_readiness_follows_nats() {
    let mut system = TestSystem::start(&[AgentSpec {
        id: AGENT,
        labels: "os=linux",
        slots: 2,
    }])
    .await
    .unwrap();

    for service in SERVICES {
        let addr = system.metrics_addr(service).unwrap();
        let health = http_get(addr, "/healthz").await.unwrap();
        assert_eq!(health.status, 200, "{service} /healthz: {}", health.body);
    }
    wait_readiness(&system, 200).await;

    let mut ids = Vec::new();
    for spec in [
        script("ok-1", "echo one"),
        script("ok-2", "echo two"),
        script("fails", "exit 3"),
    ] {
        ids.push(system.submit(spec).await.unwrap().id);
    }
    for id in &ids {
        system
            .wait_terminal(id, Duration::from_secs(60))
            .await
            .unwrap();
    }

    let gateway = scrape(system.metrics_addr("api-gateway").unwrap()).await;
    assert_eq!(
        metric_sample(&gateway, "hodei_jobs_submitted_total"),
        Some(3.0),
        "{gateway}"
    );

    // The scheduler records the reports; wait for the last one's counters (the job's state is
    // committed just before they move).
    let scheduler_addr = system.metrics_addr("scheduler").unwrap();
    let scheduler = wait_for(
        "the scheduler's finish counters",
        Duration::from_secs(10),
        || async move {
            let text = scrape(scheduler_addr).await;
            let done = metric_sample(&text, r#"hodei_jobs_finished_total{outcome="succeeded"}"#)
                == Some(2.0)
                && metric_sample(&text, r#"hodei_jobs_finished_total{outcome="failed"}"#)
                    == Some(1.0);
            done.then_some(text)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        metric_sample(&scheduler, "hodei_jobs_started_total"),
        Some(3.0),
        "{scheduler}"
    );
    assert_eq!(
        metric_sample(&scheduler, "hodei_jobs_queued"),
        Some(0.0),
        "{scheduler}"
    );
    assert!(
        metric_sample(&scheduler, "hodei_placement_duration_seconds_count")
            .is_some_and(|n| n >= 3.0),
        "{scheduler}"
    );

    let registry = scrape(system.metrics_addr("registry").unwrap()).await;
    assert!(
        metric_sample(&registry, "hodei_heartbeats_received_total").is_some_and(|n| n >= 1.0),
        "{registry}"
    );
    assert_eq!(
        metric_sample(&registry, r#"hodei_workers{state="ready"}"#),
        Some(1.0),
        "{registry}"
    );
    assert_eq!(
        metric_sample(&registry, r#"hodei_workers{state="lost"}"#),
        Some(0.0),
        "{registry}"
    );

    let agent = scrape(system.metrics_addr(AGENT).unwrap()).await;
    assert_eq!(
        metric_sample(&agent, "hodei_agent_running_attempts"),
        Some(0.0),
        "{agent}"
    );
    assert_eq!(
        metric_sample(&agent, "hodei_agent_free_slots"),
        Some(2.0),
        "{agent}"
    );
    assert_eq!(
        metric_sample(
            &agent,
            r#"hodei_agent_attempts_finished_total{outcome="succeeded"}"#
        ),
        Some(2.0),
        "{agent}"
    );

    // Readiness follows NATS: false while it is down, true once it is back.
    system.nats.stop().await;
    wait_readiness(&system, 503).await;
    let readyz = http_get(system.metrics_addr("scheduler").unwrap(), "/readyz")
        .await
        .unwrap();
    assert!(readyz.body.contains("nats"), "{}", readyz.body);
    system.nats.restart().await.unwrap();
    wait_readiness(&system, 200).await;

    system.stop().await;
}
