//! Black-box tests of the `hodei` binary against an in-process fake API gateway: a tonic
//! server with canned answers on a free port, so the real client wiring (lazy channel,
//! streams, exit codes, stdout/stderr split) runs end to end without the real services.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};

use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_server::{JobService, JobServiceServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

const JOB_ID: &str = "01J0Z3N1W8Q4K5T6Y7V8X9ABCD";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers every job call about the one job it holds; records submitted specs.
#[derive(Clone)]
struct FakeJobs {
    job: pb::Job,
    logs: Vec<pb::LogLine>,
    submitted: Arc<Mutex<Vec<pb::JobSpec>>>,
    cancel_reasons: Arc<Mutex<Vec<String>>>,
    next_page_token: String,
    /// Keep followed log streams open after the last line, like a job that never ends.
    hang: bool,
    /// Hold log lines back until the client has looked the job up, like a job that starts
    /// after the client has shown that it waits.
    logs_after_get: Option<Arc<Semaphore>>,
}

impl FakeJobs {
    fn new(state: pb::JobState, exit_code: Option<i32>, reason: &str) -> Self {
        let line = |sequence, stream: pb::LogStream, text: &str| pb::LogLine {
            sequence,
            attempt: 1,
            stream: stream.into(),
            text: text.into(),
            at: None,
        };
        FakeJobs {
            job: pb::Job {
                id: JOB_ID.into(),
                tenant: "default".into(),
                spec: Some(pb::JobSpec {
                    name: "build".into(),
                    ..Default::default()
                }),
                state: state.into(),
                reason: reason.into(),
                exit_code,
                version: 5,
                ..Default::default()
            },
            logs: vec![
                line(1, pb::LogStream::Stdout, "compiling"),
                line(2, pb::LogStream::Stderr, "warning: unused"),
                line(3, pb::LogStream::Stdout, "done"),
            ],
            submitted: Arc::default(),
            cancel_reasons: Arc::default(),
            next_page_token: String::new(),
            hang: false,
            logs_after_get: None,
        }
    }

    fn job_for(&self, id: &str) -> Result<pb::Job, Status> {
        if id == self.job.id {
            Ok(self.job.clone())
        } else {
            Err(Status::not_found(format!("job {id} not found")))
        }
    }
}

#[tonic::async_trait]
impl JobService for FakeJobs {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        if spec.name.is_empty() {
            return Err(Status::invalid_argument("name: must not be empty"));
        }
        self.submitted.lock().unwrap().push(spec);
        let mut job = self.job.clone();
        job.state = pb::JobState::Queued.into();
        job.exit_code = None;
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(job),
            created: true,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let job = self.job_for(&request.into_inner().job_id)?;
        if let Some(gate) = &self.logs_after_get {
            gate.add_permits(1);
        }
        Ok(Response::new(pb::GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: vec![self.job.clone()],
            next_page_token: self.next_page_token.clone(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let request = request.into_inner();
        let job = self.job_for(&request.job_id)?;
        self.cancel_reasons.lock().unwrap().push(request.reason);
        Ok(Response::new(pb::CancelJobResponse { job: Some(job) }))
    }

    type WatchJobStream = BoxStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.job_for(&request.into_inner().job_id)?;
        let event = pb::JobEvent {
            job_id: JOB_ID.into(),
            seq: 1,
            r#type: "submitted".into(),
            state: pb::JobState::Queued.into(),
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(event)]))))
    }

    type StreamLogsStream = BoxStream<pb::LogLine>;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let request = request.into_inner();
        self.job_for(&request.job_id)?;
        let lines: Vec<_> = self
            .logs
            .iter()
            .filter(|l| l.sequence >= request.from_sequence)
            .cloned()
            .map(Ok)
            .collect();
        if let Some(gate) = self.logs_after_get.clone() {
            let (tx, rx) = mpsc::channel(lines.len().max(1));
            tokio::spawn(async move {
                gate.acquire().await.unwrap().forget();
                for line in lines {
                    tx.send(line).await.unwrap();
                }
            });
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let lines = tokio_stream::iter(lines);
        if self.hang && request.follow {
            Ok(Response::new(Box::pin(
                lines.chain(tokio_stream::pending()),
            )))
        } else {
            Ok(Response::new(Box::pin(lines)))
        }
    }
}

/// Serves `jobs` on a free localhost port until the test ends.
async fn serve(jobs: FakeJobs) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobServiceServer::new(jobs))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn hodei(server: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("HODEI_SERVER")
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn run_splits_output_and_exits_with_the_job_code() {
    let fake = FakeJobs::new(pb::JobState::Failed, Some(3), "exited with code 3");
    let submitted = fake.submitted.clone();
    let addr = serve(fake).await;
    let out = hodei(
        &format!("http://{addr}"),
        &[
            "run",
            "--env",
            "A=B",
            "--require",
            "gpu=true",
            "--",
            "make",
            "all",
        ],
    )
    .await;
    assert_eq!(text(&out.stdout), "compiling\ndone\n");
    assert_eq!(text(&out.stderr), "warning: unused\n");
    assert_eq!(out.status.code(), Some(3));

    let specs = submitted.lock().unwrap().clone();
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].name, "make");
    assert_eq!(specs[0].env.get("A").map(String::as_str), Some("B"));
    assert_eq!(
        specs[0].required_labels.get("gpu").map(String::as_str),
        Some("true")
    );
}

#[tokio::test]
async fn run_of_a_succeeded_job_exits_0() {
    let addr = serve(FakeJobs::new(pb::JobState::Succeeded, Some(0), "")).await;
    let out = hodei(&format!("http://{addr}"), &["run", "--script", "make"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "warning: unused\n");
}

#[tokio::test]
async fn run_of_a_timed_out_job_exits_1_with_the_reason() {
    let addr = serve(FakeJobs::new(pb::JobState::TimedOut, None, "ran past 10s")).await;
    let out = hodei(&format!("http://{addr}"), &["run", "--", "sleep", "60"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("warning: unused\njob {JOB_ID} timed_out: ran past 10s\n")
    );
}

#[tokio::test]
async fn run_in_json_prints_lines_then_the_job() {
    let addr = serve(FakeJobs::new(pb::JobState::Succeeded, Some(0), "")).await;
    let out = hodei(
        &format!("http://{addr}"),
        &["--output", "json", "run", "--", "true"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let docs: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 4);
    assert_eq!(docs[1]["stream"], "stderr");
    assert_eq!(docs[3]["id"], JOB_ID);
    assert_eq!(docs[3]["state"], "succeeded");
}

#[tokio::test]
async fn submit_prints_the_id() {
    let addr = serve(FakeJobs::new(pb::JobState::Queued, None, "")).await;
    let out = hodei(&format!("http://{addr}"), &["submit", "--", "echo", "hi"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), format!("{JOB_ID}\n"));
}

#[tokio::test]
async fn server_errors_are_one_line_and_exit_2() {
    let addr = serve(FakeJobs::new(pb::JobState::Queued, None, "")).await;
    let out = hodei(&format!("http://{addr}"), &["get", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), "error: not_found: job nope not found\n");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn an_unreachable_server_exits_2() {
    // Bind then drop a listener: nothing listens on that port any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let server = format!("http://{addr}");
    let out = hodei(&server, &["list"]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("error: cannot reach hodei at {server}: ")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn list_shows_a_table_and_the_next_page() {
    let mut fake = FakeJobs::new(pb::JobState::Running, None, "");
    fake.next_page_token = "tok123".into();
    let addr = serve(fake).await;
    let out = hodei(&format!("http://{addr}"), &["list", "--state", "running"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "ID                          NAME   STATE    ATTEMPT  WORKER  EXIT  AGE"
    );
    assert!(
        lines[1].starts_with(&format!("{JOB_ID}  build  running")),
        "{stdout}"
    );
    assert_eq!(lines[2], "next page: --page-token tok123");
}

#[tokio::test]
async fn logs_and_watch_stream_to_the_end() {
    let addr = serve(FakeJobs::new(pb::JobState::Succeeded, Some(0), "")).await;
    let server = format!("http://{addr}");
    let out = hodei(&server, &["logs", "--from", "2", JOB_ID]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "done\n");
    assert_eq!(text(&out.stderr), "warning: unused\n");

    let out = hodei(&server, &["watch", JOB_ID]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "-  submitted         queued\n");
}

#[tokio::test]
async fn ctrl_c_cancels_the_job_and_a_second_one_stops_waiting() {
    let mut fake = FakeJobs::new(pb::JobState::Running, None, "");
    fake.hang = true;
    let cancel_reasons = fake.cancel_reasons.clone();
    let addr = serve(fake).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .args(["--server", &format!("http://{addr}"), "run", "--", "make"])
        .env_remove("HODEI_SERVER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        stdout.next_line().await.unwrap().as_deref(),
        Some("compiling")
    );
    assert_eq!(stdout.next_line().await.unwrap().as_deref(), Some("done"));
    // The client is now idle, waiting for more lines or a signal.
    // The client listens for Ctrl-C before it prints anything, so no wait is needed here.
    let interrupt = || async {
        let status = tokio::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    };
    interrupt().await;
    hodei_test_support::wait_for(
        "the cancel request",
        std::time::Duration::from_secs(10),
        || {
            let seen = !cancel_reasons.lock().unwrap().is_empty();
            async move { seen.then_some(()) }
        },
    )
    .await
    .unwrap();
    interrupt().await;
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(130));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("cancelling job {JOB_ID}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("stopped waiting for job {JOB_ID}")),
        "{stderr}"
    );
    assert_eq!(
        cancel_reasons.lock().unwrap().as_slice(),
        ["interrupted by the client (ctrl-c)"]
    );
}

/// `hodei` with `input` on its stdin.
async fn hodei_with_stdin(server: &str, args: &[&str], input: &str) -> Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("HODEI_SERVER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

/// `hodei` on a pseudo-terminal, through util-linux `script`: stdout and stderr both reach
/// the terminal, and come back merged, with `\r\n` line ends.
async fn hodei_on_a_terminal(server: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = quote(env!("CARGO_BIN_EXE_hodei"));
    for arg in ["--server", server].iter().chain(args) {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    tokio::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .env_remove("HODEI_SERVER")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .env("COLUMNS", "200")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

/// A job file in a fresh directory, kept as long as the returned guard.
fn job_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

const SECRET_JOB: &str = "\
name: deploy
command:
  kind: script
  interpreter: [/bin/bash, -c]
  script: ./deploy.sh
env:
  TOKEN: s3cret
  REGION: eu
secret_env: [TOKEN]
labels:
  team: web
max_attempts: 3
retry_backoff: {initial_ms: 100, max_ms: 400}
";

#[tokio::test]
async fn submit_from_a_yaml_file_sends_the_file_with_options_over_it() {
    let fake = FakeJobs::new(pb::JobState::Queued, None, "");
    let submitted = fake.submitted.clone();
    let addr = serve(fake).await;
    let (_dir, path) = job_file("deploy.yaml", SECRET_JOB);
    let out = hodei(
        &format!("http://{addr}"),
        &[
            "submit",
            "-f",
            path.to_str().unwrap(),
            "--label",
            "team=ci",
            "--env",
            "REGION=us",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{JOB_ID}\n"));

    let specs = submitted.lock().unwrap().clone();
    assert_eq!(specs.len(), 1);
    let spec = &specs[0];
    assert_eq!(spec.name, "deploy");
    // The secret travels unmasked: the server needs it to run the job.
    assert_eq!(spec.env.get("TOKEN").map(String::as_str), Some("s3cret"));
    assert_eq!(spec.secret_env, vec!["TOKEN"]);
    assert_eq!(spec.env.get("REGION").map(String::as_str), Some("us"));
    assert_eq!(spec.labels.get("team").map(String::as_str), Some("ci"));
    assert_eq!(spec.max_attempts, 3);
    assert_eq!(
        spec.retry_backoff,
        Some(pb::Backoff {
            initial_ms: 100,
            max_ms: 400
        })
    );
    assert_eq!(
        spec.command,
        Some(pb::job_spec::Command::Script(pb::ScriptCommand {
            interpreter: vec!["/bin/bash".into(), "-c".into()],
            script: "./deploy.sh".into(),
        }))
    );
}

#[tokio::test]
async fn run_from_a_json_file_and_from_stdin() {
    let fake = FakeJobs::new(pb::JobState::Succeeded, Some(0), "");
    let submitted = fake.submitted.clone();
    let addr = serve(fake).await;
    let server = format!("http://{addr}");
    let (_dir, path) = job_file(
        "job.json",
        r#"{"name": "from-json", "command": {"kind": "exec", "argv": ["make", "all"]}}"#,
    );
    let out = hodei(&server, &["run", "-f", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "compiling\ndone\n");

    let out = hodei_with_stdin(&server, &["submit", "-f", "-"], SECRET_JOB).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let names: Vec<String> = submitted
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["from-json", "deploy"]);
}

#[tokio::test]
async fn a_malformed_file_is_reported_with_line_and_column() {
    let fake = FakeJobs::new(pb::JobState::Queued, None, "");
    let submitted = fake.submitted.clone();
    let addr = serve(fake).await;
    let server = format!("http://{addr}");

    let (_dir, path) = job_file(
        "job.yaml",
        "name: x\ncommand:\n  kind: exec\n  argv: [echo, hi\n",
    );
    let path = path.to_str().unwrap();
    let out = hodei(&server, &["submit", "-f", path]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {path}:5:1: did not find expected ',' or ']', \
             while parsing a flow sequence at line 4 column 9\n"
        )
    );

    let (_dir, path) = job_file(
        "job.yaml",
        "name: x\ncommand:\n  kind: exec\n  argv: [\"true\"]\nretries: 3\n",
    );
    let path = path.to_str().unwrap();
    let out = hodei(&server, &["run", "-f", path]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: {path}:5:1: unknown field `retries`, expected one of `name`, "
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let out = hodei_with_stdin(&server, &["submit", "-f", "-"], "name: x\nbogus: 1\n").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("error: <stdin>:2:1: unknown field `bogus`"),
        "{}",
        text(&out.stderr)
    );

    let out = hodei(&server, &["submit", "-f", "/nonexistent/job.yaml"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("error: failed to read /nonexistent/job.yaml: "),
        "{}",
        text(&out.stderr)
    );

    assert!(submitted.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_invalid_file_reports_every_field_and_sends_nothing() {
    let fake = FakeJobs::new(pb::JobState::Queued, None, "");
    let submitted = fake.submitted.clone();
    let addr = serve(fake).await;
    let (_dir, path) = job_file(
        "job.yaml",
        "name: x\ncommand: {kind: exec, argv: []}\nmax_attempts: 1000\nenv: {HODEI_X: y}\n",
    );
    let path = path.to_str().unwrap();
    let out = hodei(&format!("http://{addr}"), &["submit", "-f", path]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(&format!("error: {path}: "))),
        "{stderr}"
    );
    for field in ["max_attempts: ", "command.argv: ", "env.HODEI_X: "] {
        assert!(
            stderr.contains(&format!("{path}: {field}")),
            "{field}: {stderr}"
        );
    }
    assert!(submitted.lock().unwrap().is_empty());

    // Options apply before validation.
    let out = hodei(
        &format!("http://{addr}"),
        &[
            "submit",
            "-f",
            path,
            "--max-attempts",
            "2",
            "--env",
            "HODEI_X=z",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).lines().count(),
        2,
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn no_colour_or_status_when_output_is_not_a_terminal() {
    let addr = serve(FakeJobs::new(
        pb::JobState::Failed,
        Some(3),
        "exited with code 3",
    ))
    .await;
    let server = format!("http://{addr}");
    for args in [
        &["list"][..],
        &["get", JOB_ID],
        &["logs", JOB_ID],
        &["run", "--", "make"],
    ] {
        let out = hodei(&server, args).await;
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !all.contains('\x1b') && !all.contains('\r'),
            "{args:?}: {all:?}"
        );
    }
}

#[tokio::test]
async fn on_a_terminal_states_are_coloured_unless_no_color() {
    let addr = serve(FakeJobs::new(
        pb::JobState::Failed,
        Some(3),
        "exited with code 3",
    ))
    .await;
    let server = format!("http://{addr}");
    let out = hodei_on_a_terminal(&server, &["list"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let screen = text(&out.stdout);
    assert!(
        screen.contains(&format!("{JOB_ID}  build  \x1b[31mfailed\x1b[0m ")),
        "{screen:?}"
    );
    let out = hodei_on_a_terminal(&server, &["get", JOB_ID], &[]).await;
    assert!(
        text(&out.stdout).contains("\x1b[31mfailed\x1b[0m\r\n"),
        "{out:?}"
    );

    let out = hodei_on_a_terminal(&server, &["list"], &[("NO_COLOR", "1")]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let screen = text(&out.stdout);
    assert!(
        screen.contains(&format!("{JOB_ID}  build  failed ")),
        "{screen:?}"
    );
    assert!(!screen.contains('\x1b'), "{screen:?}");
}

#[tokio::test]
async fn run_on_a_terminal_shows_why_it_waits_then_the_output() {
    let mut fake = FakeJobs::new(pb::JobState::Queued, None, "no worker has gpu=true");
    fake.logs_after_get = Some(Arc::new(Semaphore::new(0)));
    let addr = serve(fake).await;
    let out = hodei_on_a_terminal(&format!("http://{addr}"), &["run", "--", "make"], &[]).await;
    let screen = text(&out.stdout);
    // Still queued when the stream ends: the fake job never starts for real.
    assert_eq!(out.status.code(), Some(1), "{screen:?}");
    let status = screen
        .find(": queued — no worker has gpu=true")
        .unwrap_or_else(|| panic!("no waiting status in {screen:?}"));
    let start = screen[..status].rfind("waiting ").unwrap();
    let shown = screen[start..].find('\r').unwrap();
    // The status is wiped with as many blanks as it had characters, before the first line.
    let width = screen[start..start + shown].chars().count();
    let wiped = format!("\r{}\rcompiling\r\n", " ".repeat(width));
    assert!(
        screen[start..].starts_with(&format!("{}{wiped}", &screen[start..start + shown])),
        "{screen:?}"
    );
    assert!(
        screen.contains("\x1b[2mwarning: unused\x1b[0m\r\n"),
        "{screen:?}"
    );
    assert!(screen.contains("done\r\n"), "{screen:?}");
}
