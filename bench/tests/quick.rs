//! Runs every scenario of `hodei-bench` once, small, so the harness never rots: each must
//! finish, print its table and write JSON with figures and the machine. No figure is checked
//! against a target here — timing belongs to the benchmarks, not to tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_hodei-bench"))
        .args(args)
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "hodei-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("machine:"), "no machine line:\n{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the harness's own bound is 120 s per scenario"
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn figures_of(run: &serde_json::Value, scenario: &str) -> usize {
    run["outcome"]["figures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["scenario"] == scenario)
        .count()
}

#[test]
fn every_scenario_runs_small() {
    let throughput = run(&[
        "throughput",
        "--jobs",
        "200",
        "--clients",
        "4",
        "--agents",
        "20",
    ]);
    assert!(throughput["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(
        !throughput["machine"]["nats_server"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(
        !throughput["machine"]["postgres"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(figures_of(&throughput, "throughput") >= 5);

    let latency = run(&[
        "latency",
        "--rate",
        "50",
        "--seconds",
        "2",
        "--agents",
        "20",
    ]);
    assert!(figures_of(&latency, "latency") >= 13);

    let queries = run(&["queries", "--jobs", "5000", "--pages", "10"]);
    assert!(figures_of(&queries, "queries") >= 9);
    let notes = queries["outcome"]["notes"].to_string();
    assert!(notes.contains("EXPLAIN"), "no plan in {notes}");
}
