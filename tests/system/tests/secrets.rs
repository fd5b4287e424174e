//! Secrets are readable only where a job runs: a job and a pipeline with a secret value run,
//! the job once more after a failed attempt, and each attempt writes the digest of the value
//! it got into a ledger; then a `pg_dump` of the database, every message of every stream and
//! every command sent to the agents are searched for the value, and it is in none of them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, TestSystem, shell_job};
use hodei_test_support::wait_for;

const AGENTS: &[AgentSpec] = &[
    AgentSpec {
        id: "vault-a",
        labels: "",
        slots: 2,
    },
    AgentSpec {
        id: "vault-b",
        labels: "",
        slots: 2,
    },
];

const DEADLINE: Duration = Duration::from_secs(60);

fn sha256_hex(value: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, value.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A script that appends the digest of `$TOKEN` to `ledger` and prints the value.
fn record_token(ledger: &std::path::Path) -> String {
    format!(
        "printf '%s' \"$TOKEN\" | sha256sum | cut -d' ' -f1 >> {ledger}; echo \"token=$TOKEN\"",
        ledger = ledger.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_values_are_in_clear_nowhere_but_in_the_job() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let secret = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();

    // Every command sent to any agent, as it crosses NATS.
    let (admin, _) = system.admin_nats().await.unwrap();
    let mut sent = admin.subscribe("hodei.v1.agent.>").await.unwrap();
    admin.flush().await.unwrap();
    let commands = Arc::new(Mutex::new(Vec::new()));
    let collector = {
        let commands = Arc::clone(&commands);
        tokio::spawn(async move {
            while let Some(message) = sent.next().await {
                commands.lock().unwrap().push(message.payload);
            }
        })
    };

    // A job whose first attempt fails: the retry gets the value again.
    let ledger = dir.path().join("job-ledger");
    let tried = dir.path().join("tried");
    let mut job = shell_job(
        "vault",
        &format!(
            "{}; [ -e {tried} ] || {{ touch {tried}; exit 1; }}",
            record_token(&ledger),
            tried = tried.display()
        ),
    );
    job.env = [("TOKEN".to_owned(), secret.clone())].into();
    job.secret_env = vec!["TOKEN".into()];
    job.max_attempts = 2;
    job.retry_backoff = Some(pb::Backoff {
        initial_ms: 100,
        max_ms: 100,
    });
    let job = system.submit(job).await.unwrap();

    // A pipeline whose own env holds the value, that a step calls secret.
    let run_ledger = dir.path().join("run-ledger");
    let mut step_job = shell_job("use", &record_token(&run_ledger));
    step_job.secret_env = vec!["TOKEN".into()];
    let run = system
        .submit_pipeline(pb::PipelineSpec {
            name: "vault-pipeline".into(),
            env: [("TOKEN".to_owned(), secret.clone())].into(),
            steps: vec![pb::PipelineStep {
                name: "use".into(),
                job: Some(step_job),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();

    let done = system
        .wait_job(&job.id, "to end", DEADLINE, |s| {
            s == pb::JobState::Succeeded || s == pb::JobState::Failed
        })
        .await
        .unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 2, "{done:?}");
    wait_for("the pipeline run to succeed", DEADLINE, || async {
        let run = system.get_run(&run.id).await.ok()?;
        (run.state() == pb::PipelineState::Succeeded).then_some(())
    })
    .await
    .unwrap();

    // What the jobs themselves got: the value, at every attempt.
    let digest = sha256_hex(&secret);
    let job_lines = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(
        job_lines.lines().collect::<Vec<_>>(),
        vec![digest.as_str(); 2]
    );
    let run_lines = std::fs::read_to_string(&run_ledger).unwrap();
    assert_eq!(run_lines.lines().collect::<Vec<_>>(), vec![digest.as_str()]);

    // PostgreSQL: sealed values, never the value.
    let dump = tokio::process::Command::new("pg_dump")
        .arg("--data-only")
        .arg(system.database.url())
        .output()
        .await
        .unwrap();
    assert!(dump.status.success(), "pg_dump: {dump:?}");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        !dump.contains(&secret),
        "the database holds the secret in clear"
    );
    assert!(dump.contains(hodei_messaging::seal::SEALED_PREFIX));

    // Every message still in every stream.
    let (_, js) = system.admin_nats().await.unwrap();
    let names: Vec<String> = js.stream_names().map(|name| name.unwrap()).collect().await;
    assert!(names.len() >= 6, "{names:?}");
    let mut messages = 0;
    for name in names {
        let mut stream = js.get_stream(&name).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        for sequence in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            messages += 1;
            let headers = format!("{:?}", message.headers);
            assert!(
                !String::from_utf8_lossy(&message.payload).contains(&secret)
                    && !headers.contains(&secret),
                "stream {name} message {sequence} on {} holds the secret in clear",
                message.subject
            );
        }
    }
    assert!(messages > 0);

    // The commands that crossed NATS: sealed to their agent, never in clear.
    collector.abort();
    let commands = std::mem::take(&mut *commands.lock().unwrap());
    let assigns: Vec<String> = commands
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .filter(|c| c.contains("\"assign\""))
        .collect();
    assert!(assigns.len() >= 3, "{assigns:?}");
    for command in commands.iter() {
        assert!(!String::from_utf8_lossy(command).contains(&secret));
    }
    assert!(
        assigns
            .iter()
            .filter(|c| c.contains(hodei_messaging::seal::SEALED_PREFIX))
            .count()
            >= 3
    );
    system.stop().await;
}
