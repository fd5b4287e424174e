//! The built `hodei` binary against a real system (gateway, scheduler, registry and an agent
//! on a private nats-server and a fresh database).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hodei_system_tests::{AgentSpec, TestSystem};

async fn hodei(server: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("HODEI_SERVER")
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
    let server = format!("http://{}", system.grpc_addr);

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
