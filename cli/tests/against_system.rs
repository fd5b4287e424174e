//! The built `hodei` binary against a real system (gateway, scheduler, registry and an agent
//! on a private nats-server and a fresh database).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hodei_system_tests::{AgentSpec, TestSystem};

/// The system's gateway and the admin token the CLI calls it with.
struct Target {
    url: String,
    token: String,
}

impl Target {
    fn of(system: &TestSystem) -> Target {
        Target {
            url: format!("http://{}", system.grpc_addr),
            token: system.admin_token.clone(),
        }
    }
}

async fn hodei(server: &Target, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .arg("--server")
        .arg(&server.url)
        .args(args)
        .env_remove("HODEI_SERVER")
        .env("HODEI_TOKEN", &server.token)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_streams_the_output_and_exits_with_the_jobs_code() {
    let system = TestSystem::start(&[AgentSpec {
        id: "cli-agent",
        labels: "os=linux",
        slots: 2,
    }])
    .await
    .unwrap();
    let server = Target::of(&system);

    let out = hodei(
        &server,
        &[
            "run",
            "--name",
            "cli-ok",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let out = hodei(&server, &["run", "--", "sh", "-c", "echo failing; exit 4"]).await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "failing\n");

    let out = hodei(&server, &["--output", "json", "workers"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"cli-agent\""));

    let out = hodei(
        &server,
        &[
            "submit",
            "--name",
            "bad",
            "--max-attempts",
            "1000",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: invalid_argument:") && stderr.contains("max_attempts"),
        "{stderr}"
    );

    // The shipped example job files run as they are.
    let out = hodei(&server, &["run", "-f", &example("hello.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from hodei\n");

    // The secret reaches the job (its length is printed) but never its output.
    let out = hodei(&server, &["run", "-f", &example("secret.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "calling https://api.example.com with token ********\nthe token has 17 characters\n"
    );

    let out = hodei(&server, &["run", "-f", &example("retry.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "attempt 3: ok\n");

    system.stop().await;
}

/// The path of a file of `examples/jobs`.
fn example(name: &str) -> String {
    format!("{}/../examples/jobs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A pipeline of `build`, `test` (exits with `test_exit`) and `cleanup` (`when: always`).
fn three_steps(test_exit: u8) -> String {
    format!(
        "\
name: cli-pipeline
steps:
  - name: build
    command: {{kind: exec, argv: [echo, built]}}
    timeout_secs: 60
  - name: test
    needs: [build]
    command: {{kind: script, interpreter: [/bin/sh, -c], script: 'echo testing; exit {test_exit}'}}
    timeout_secs: 60
  - name: cleanup
    needs: [test]
    when: always
    command: {{kind: exec, argv: [echo, cleaned]}}
    timeout_secs: 60
"
    )
}

/// The last state the plain output gives each step: lines are `STEP: STATE...`.
fn final_states(stdout: &str) -> std::collections::HashMap<String, String> {
    stdout
        .lines()
        .filter(|l| !l.starts_with("run "))
        .filter_map(|l| {
            let (step, rest) = l.split_once(": ")?;
            let state = rest.split([' ', ':']).next()?;
            Some((step.to_owned(), state.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_run_follows_the_run_and_exits_by_its_outcome() {
    let system = TestSystem::start(&[AgentSpec {
        id: "cli-pipeline-agent",
        labels: "os=linux",
        slots: 2,
    }])
    .await
    .unwrap();
    let server = Target::of(&system);
    let dir = tempfile::tempdir().unwrap();

    let failing = dir.path().join("failing.yaml");
    std::fs::write(&failing, three_steps(3)).unwrap();
    let out = hodei(
        &server,
        &["pipeline", "run", "-f", failing.to_str().unwrap()],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let states = final_states(&stdout);
    assert_eq!(
        states.get("build").map(String::as_str),
        Some("succeeded"),
        "{stdout}"
    );
    assert_eq!(
        states.get("test").map(String::as_str),
        Some("failed"),
        "{stdout}"
    );
    assert_eq!(
        states.get("cleanup").map(String::as_str),
        Some("succeeded"),
        "{stdout}"
    );
    assert!(stdout.contains("test: failed in "), "{stdout}");
    assert!(stdout.contains("(exit code 3)"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("run ") && last.contains("(cli-pipeline): failed after "),
        "{stdout}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout:?}");

    let passing = dir.path().join("passing.yaml");
    std::fs::write(&passing, three_steps(0)).unwrap();
    let out = hodei(
        &server,
        &["pipeline", "run", "-f", passing.to_str().unwrap()],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let states = final_states(&stdout);
    for step in ["build", "test", "cleanup"] {
        assert_eq!(
            states.get(step).map(String::as_str),
            Some("succeeded"),
            "{stdout}"
        );
    }

    // The runs are there to look at afterwards.
    let out = hodei(&server, &["pipeline", "list", "--state", "failed"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let out = hodei(&server, &["pipeline", "get", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("state:     failed"), "{shown}");

    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_made_with_the_cli_open_the_api_over_tls_and_the_audit_log_shows_their_use() {
    let system = TestSystem::start_with(
        &[],
        hodei_system_tests::SystemOptions {
            tls: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ca = system.tls_dir().unwrap().join("ca.pem");
    let cli = |token: &str, args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"));
        command
            .arg("--server")
            .arg(format!("https://127.0.0.1:{}", system.grpc_addr.port()))
            .arg("--ca")
            .arg(&ca)
            .args(args)
            .env_remove("HODEI_SERVER")
            .env("HODEI_TOKEN", token);
        async move { command.output().await.unwrap() }
    };
    let out = cli(
        &system.admin_token,
        &[
            "token",
            "create",
            "--name",
            "bot",
            "--tenant",
            "team-a",
            "--role",
            "submitter",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("hodei_"), "{secret}");

    let out = cli(&secret, &["--output", "json", "whoami"]).await;
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (me["tenant"].as_str(), me["role"].as_str()),
        (Some("team-a"), Some("submitter"))
    );
    let out = cli(&secret, &["submit", "--name", "from-bot", "--", "true"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // A bot may not read the audit log; an admin may, and sees the bot's submission.
    let out = cli(&secret, &["audit"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission_denied"));
    let out = cli(&system.admin_token, &["--output", "json", "audit"]).await;
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let submitted = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "SubmitJob")
        .unwrap();
    assert_eq!(submitted["target"], format!("job {job}"));
    assert_eq!(submitted["tenant"], "team-a");

    // Revoked: refused, with a hint of why.
    let out = cli(
        &system.admin_token,
        &["--output", "json", "token", "list", "--tenant", "team-a"],
    )
    .await;
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = tokens["tokens"][0]["id"].as_str().unwrap().to_owned();
    let out = cli(&system.admin_token, &["token", "revoke", &id]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&secret, &["whoami"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unauthenticated") && err.contains("revoked"),
        "{err}"
    );
    // No token at all.
    let out = cli("", &["list"]).await;
    assert_eq!(out.status.code(), Some(2));
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedules_are_created_triggered_paused_listed_and_deleted_from_the_cli() {
    let system = TestSystem::start(&[AgentSpec {
        id: "cli-schedule-agent",
        labels: "",
        slots: 2,
    }])
    .await
    .unwrap();
    let server = Target::of(&system);

    let out = hodei(
        &server,
        &[
            "schedule",
            "create",
            "nightly-echo",
            "--cron",
            "0 3 * * *",
            "--tz",
            "Europe/Madrid",
            "--catch-up",
            "10m",
            "--paused",
            "--",
            "echo",
            "scheduled",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("next tick"),
        "{out:?}"
    );
    let out = hodei(
        &server,
        &[
            "schedule",
            "create-pipeline",
            "nightly-build",
            "--cron",
            "@daily",
            "--overlap",
            "cancel-previous",
            "-f",
            &format!(
                "{}/../examples/pipelines/build-test-deploy.yaml",
                env!("CARGO_MANIFEST_DIR")
            ),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = hodei(
        &server,
        &[
            "schedule",
            "create",
            "bad",
            "--cron",
            "61 * * * *",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.cron"),
        "{out:?}"
    );

    let out = hodei(&server, &["schedule", "trigger", "nightly-echo"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let job_id = stdout.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(stdout.contains("started job"), "{stdout}");
    system
        .wait_terminal(&job_id, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let out = hodei(&server, &["logs", &job_id]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "scheduled\n");
    // A retried trigger with its idempotency key prints the first one's job, starting none.
    let keyed = [
        "schedule",
        "trigger",
        "nightly-echo",
        "--idempotency-key",
        "run-1",
    ];
    let first = hodei(&server, &keyed).await;
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let again = hodei(&server, &keyed).await;
    assert_eq!(again.stdout, first.stdout, "{again:?}");
    let keyed_job = String::from_utf8_lossy(&first.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(keyed_job, job_id);
    system
        .wait_terminal(&keyed_job, std::time::Duration::from_secs(60))
        .await
        .unwrap();

    let out = hodei(&server, &["schedule", "get", "nightly-echo"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("Europe/Madrid"), "{stdout}");
    assert!(stdout.contains("triggered"), "{stdout}");
    assert!(stdout.contains(&job_id), "{stdout}");
    assert!(stdout.contains("600000 ms"), "{stdout}");

    let out = hodei(&server, &["schedule", "list"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains("nightly-echo") && stdout.contains("paused"),
        "{stdout}"
    );
    assert!(
        stdout.contains("nightly-build") && stdout.contains("cancel_previous"),
        "{stdout}"
    );

    let out = hodei(&server, &["schedule", "resume", "nightly-echo"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed"),
        "{out:?}"
    );
    let out = hodei(&server, &["schedule", "pause", "nightly-echo"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("paused"),
        "{out:?}"
    );
    let out = hodei(
        &server,
        &["--output", "json", "schedule", "get", "nightly-build"],
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["pipeline"]["name"], "build-test-deploy");
    assert_eq!(json["overlap"], "cancel_previous");

    let out = hodei(&server, &["schedule", "delete", "nightly-echo"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = hodei(&server, &["schedule", "get", "nightly-echo"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_policies_are_set_shown_and_reset_from_the_cli() {
    let system = TestSystem::start(&[AgentSpec {
        id: "cli-tenant-agent",
        labels: "",
        slots: 1,
    }])
    .await
    .unwrap();
    let server = Target::of(&system);
    let out = hodei(
        &server,
        &[
            "tenant",
            "set",
            "team-a",
            "--weight",
            "3",
            "--max-running-jobs",
            "5",
            "--max-queued-jobs",
            "100",
            "--max-priority",
            "-5",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("team-a"), "{stdout}");
    assert!(
        stdout.contains("queued<=100 running<=5 priority<=-5"),
        "{stdout}"
    );

    let out = hodei(&server, &["--output", "json", "tenant", "list"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let team = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "team-a")
        .unwrap();
    assert_eq!(team["weight"], 3);
    assert_eq!(team["max_running_jobs"], 5);
    assert_eq!(team["max_priority"], -5);
    assert_eq!(team["entitled_share"], 1.0);

    let out = hodei(&server, &["tenant", "set", "team-a", "--weight", "0"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = hodei(
        &server,
        &["tenant", "set", "team-a", "--max-priority", "1001"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = hodei(&server, &["tenant", "reset", "team-a"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = hodei(&server, &["tenant", "reset", "team-a"]).await;
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_many_submits_a_list_together_or_nothing() {
    let system = TestSystem::start(&[AgentSpec {
        id: "cli-many-agent",
        labels: "",
        slots: 3,
    }])
    .await
    .unwrap();
    let server = Target::of(&system);

    let out = hodei(&server, &["submit-many", "-f", &example("many.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ids: Vec<&str> = stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{stdout}");
    for (i, id) in ids.iter().enumerate() {
        let job = system
            .wait_terminal(id, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.spec.as_ref().unwrap().name, format!("shard-{}", i + 1));
        assert_eq!(
            job.state(),
            hodei_proto::v1::JobState::Succeeded,
            "{:?}",
            job.attempts
        );
    }

    // One invalid entry: nothing is submitted, and the entry is named by its place.
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("bad.yaml");
    std::fs::write(
        &list,
        "- {name: fine, command: {kind: exec, argv: [\"true\"]}}\n\
         - {name: '', command: {kind: exec, argv: [\"true\"]}}\n",
    )
    .unwrap();
    let out = hodei(&server, &["submit-many", "-f", list.to_str().unwrap()]).await;
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml: [1].name: "), "{stderr}");
    let listed = system
        .jobs
        .clone()
        .list_jobs(hodei_proto::v1::ListJobsRequest {
            name_prefix: "fine".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "{:?}", listed.jobs);

    system.stop().await;
}
