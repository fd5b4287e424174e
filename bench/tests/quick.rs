//! Runs every scenario of `hodei-bench` once, small, so the harness never rots: each must
//! finish, print its table and write JSON with figures and the machine. No figure is checked
//! against a target here — timing belongs to the benchmarks, not to tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> serde_json::Value {
    let (output, json) = run_raw(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "hodei-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("machine:"), "no machine line:\n{stdout}");
    json.unwrap()
}

/// Runs the harness; returns its output and, if it wrote one, its JSON.
fn run_raw(args: &[&str]) -> (std::process::Output, Option<serde_json::Value>) {
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
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the harness's own bound is 120 s per scenario"
    );
    let written = std::fs::read(&json)
        .ok()
        .map(|raw| serde_json::from_slice(&raw).unwrap());
    (output, written)
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
        // SubmitJobs; the other scenarios submit one job a call.
        "--batch",
        "10",
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

    let heartbeats = run(&["heartbeats", "--agents", "200", "--seconds", "2"]);
    assert!(figures_of(&heartbeats, "heartbeats") >= 9);

    let failure = run(&["failure-detection", "--agents", "100"]);
    assert!(figures_of(&failure, "failure-detection") >= 11);

    let events = run(&["event-bus", "--events", "20000"]);
    assert!(figures_of(&events, "event-bus") >= 7);

    let overload = run(&["overload", "--seconds", "2", "--agents", "20"]);
    assert!(figures_of(&overload, "overload") >= 16);

    // With `--processes` the services run from the binaries next to hodei-bench, which
    // `cargo build --workspace --bins` (the suite's command) builds.
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_hodei-bench"));
    if bench.with_file_name("hodei-api-gateway").is_file() {
        let apart = run(&[
            "overload",
            "--processes",
            "--seconds",
            "2",
            "--agents",
            "20",
        ]);
        let figures = apart["outcome"]["figures"].as_array().unwrap();
        for service in ["api-gateway", "scheduler", "registry", "harness"] {
            let named = format!("{service}: rss before the load");
            assert!(
                figures.iter().any(|f| f["metric"] == named.as_str()),
                "no {named:?} in {figures:?}"
            );
        }
    }

    // The agent scenario runs the hodei-agent binary next to hodei-bench; `cargo test -p
    // hodei-bench` alone does not build it, and then the harness must say how to.
    let agent_bin = bench.with_file_name("hodei-agent");
    if agent_bin.is_file() {
        let agent = run(&["agent", "--assignments", "5"]);
        assert!(figures_of(&agent, "agent") >= 9);
        let real = run(&[
            "real-agents",
            "--jobs",
            "40",
            "--agents",
            "2",
            "--slots",
            "4",
        ]);
        assert!(figures_of(&real, "real-agents") >= 10);
    } else {
        let (output, _) = run_raw(&["agent", "--assignments", "5"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success());
        assert!(stdout.contains("machine:"), "no machine line:\n{stdout}");
        assert!(
            stdout.contains("cargo build -p hodei-agent"),
            "the missing agent binary is not explained:\n{stdout}"
        );
        eprintln!(
            "agent scenario not measured: {} is not built",
            agent_bin.display()
        );
    }
}
