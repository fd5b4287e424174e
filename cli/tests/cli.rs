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

    async fn submit_jobs(
        &self,
        request: Request<pb::SubmitJobsRequest>,
    ) -> Result<Response<pb::SubmitJobsResponse>, Status> {
        let mut results = Vec::new();
        for spec in request.into_inner().specs {
            let one = pb::SubmitJobRequest {
                spec: Some(spec),
                tenant: String::new(),
            };
            results.push(self.submit_job(Request::new(one)).await?.into_inner());
        }
        Ok(Response::new(pb::SubmitJobsResponse { results }))
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

    /// Two pages of one event each, to show that `hodei history` follows page tokens.
    async fn get_job_history(
        &self,
        request: Request<pb::GetJobHistoryRequest>,
    ) -> Result<Response<pb::GetJobHistoryResponse>, Status> {
        let request = request.into_inner();
        self.job_for(&request.job_id)?;
        let (event, next_page_token) = match request.page_token.as_str() {
            "" => (
                pb::JobEvent {
                    job_id: JOB_ID.into(),
                    seq: 1,
                    r#type: "submitted".into(),
                    state: pb::JobState::Queued.into(),
                    data: r#"{"type":"submitted"}"#.into(),
                    ..Default::default()
                },
                "1".to_owned(),
            ),
            _ => (
                pb::JobEvent {
                    job_id: JOB_ID.into(),
                    seq: 2,
                    r#type: "assigned".into(),
                    state: pb::JobState::Assigned.into(),
                    attempt: 1,
                    worker_id: "w1".into(),
                    data: r#"{"type":"assigned","attempt":1}"#.into(),
                    ..Default::default()
                },
                String::new(),
            ),
        };
        Ok(Response::new(pb::GetJobHistoryResponse {
            events: vec![event],
            next_page_token,
        }))
    }

    async fn list_events(
        &self,
        _request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Ok(Response::new(pb::ListEventsResponse {
            events: Vec::new(),
            next_page_token: String::new(),
        }))
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
async fn history_follows_every_page_and_get_at_checks_its_moment() {
    let server = format!(
        "http://{}",
        serve(FakeJobs::new(pb::JobState::Succeeded, Some(0), "")).await
    );
    let out = hodei(&server, &["history", JOB_ID]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "  1  -  submitted         queued\n  2  -  assigned          assigned   attempt 1  worker w1\n"
    );
    let out = hodei(&server, &["--output", "json", "history", JOB_ID]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["data"]["attempt"], 1);

    let out = hodei(&server, &["get", "--at", "yesterday", JOB_ID]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("RFC 3339"), "{out:?}");
    let out = hodei(&server, &["get", "--at", "2026-12-03T02:00:00Z", JOB_ID]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
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

// ---------------------------------------------------------------------------------------------
// Pipelines and artifacts, against a fake PipelineService.

use hodei_proto::v1::pipeline_service_server::{PipelineService, PipelineServiceServer};

const RUN_ID: &str = "0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f";

/// Answers every pipeline call about the one run it holds, in its final state; records what
/// is submitted and cancelled.
#[derive(Clone)]
struct FakePipelines {
    run: pb::PipelineRun,
    submitted: Arc<Mutex<Vec<pb::PipelineSpec>>>,
    cancel_reasons: Arc<Mutex<Vec<String>>>,
    /// Keep the event stream open after the history, like a run that never ends.
    hang: bool,
}

impl FakePipelines {
    /// A run of `build`, `test` and `cleanup` (when: always) ended in `state`; `test` failed
    /// unless the run succeeded.
    fn new(state: pb::PipelineState) -> Self {
        let ok = state == pb::PipelineState::Succeeded;
        let step = |name: &str, state: pb::StepState, code: i32, reason: &str| pb::StepRun {
            name: name.into(),
            base: name.into(),
            state: state.into(),
            job_id: format!("job-{name}"),
            reason: reason.into(),
            attempts: vec![pb::Attempt {
                attempt: 1,
                worker_id: "w-1".into(),
                outcome: Some(pb::AttemptOutcome {
                    kind: Some(pb::attempt_outcome::Kind::Exited(code)),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let test = if ok {
            step("test", pb::StepState::Succeeded, 0, "exited with code 0")
        } else {
            step("test", pb::StepState::Failed, 3, "exited with code 3")
        };
        FakePipelines {
            run: pb::PipelineRun {
                id: RUN_ID.into(),
                tenant: "default".into(),
                spec: Some(pb::PipelineSpec {
                    name: "ci".into(),
                    ..Default::default()
                }),
                state: state.into(),
                steps: vec![
                    step("build", pb::StepState::Succeeded, 0, "exited with code 0"),
                    test,
                    step("cleanup", pb::StepState::Succeeded, 0, "exited with code 0"),
                ],
                version: 9,
                ..Default::default()
            },
            submitted: Arc::default(),
            cancel_reasons: Arc::default(),
            hang: false,
        }
    }

    fn run_for(&self, id: &str) -> Result<pb::PipelineRun, Status> {
        if id == self.run.id {
            Ok(self.run.clone())
        } else {
            Err(Status::not_found(format!("pipeline run {id} not found")))
        }
    }

    fn events(&self) -> Vec<pb::PipelineEvent> {
        let event = |seq, r#type: &str, step: &str, state: pb::PipelineState| pb::PipelineEvent {
            run_id: RUN_ID.into(),
            seq,
            r#type: r#type.into(),
            step: step.into(),
            state: state.into(),
            ..Default::default()
        };
        let mut events = vec![
            event(1, "submitted", "", pb::PipelineState::Queued),
            event(2, "step_queued", "build", pb::PipelineState::Running),
            event(3, "step_finished", "build", pb::PipelineState::Running),
        ];
        if !self.hang {
            let end = pb::PipelineState::try_from(self.run.state).unwrap();
            events.push(event(4, "finished", "", end));
        }
        events
    }
}

#[tonic::async_trait]
impl PipelineService for FakePipelines {
    async fn submit_pipeline(
        &self,
        request: Request<pb::SubmitPipelineRequest>,
    ) -> Result<Response<pb::SubmitPipelineResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        self.submitted.lock().unwrap().push(spec);
        let mut run = self.run.clone();
        run.state = pb::PipelineState::Queued.into();
        for step in &mut run.steps {
            step.state = pb::StepState::Waiting.into();
            step.attempts.clear();
        }
        Ok(Response::new(pb::SubmitPipelineResponse {
            run: Some(run),
            created: true,
        }))
    }

    async fn get_pipeline_run(
        &self,
        request: Request<pb::GetPipelineRunRequest>,
    ) -> Result<Response<pb::GetPipelineRunResponse>, Status> {
        let run = self.run_for(&request.into_inner().run_id)?;
        Ok(Response::new(pb::GetPipelineRunResponse { run: Some(run) }))
    }

    async fn list_pipeline_runs(
        &self,
        _request: Request<pb::ListPipelineRunsRequest>,
    ) -> Result<Response<pb::ListPipelineRunsResponse>, Status> {
        Ok(Response::new(pb::ListPipelineRunsResponse {
            runs: vec![self.run.clone()],
            next_page_token: "tok9".into(),
        }))
    }

    async fn cancel_pipeline_run(
        &self,
        request: Request<pb::CancelPipelineRunRequest>,
    ) -> Result<Response<pb::CancelPipelineRunResponse>, Status> {
        let request = request.into_inner();
        let run = self.run_for(&request.run_id)?;
        self.cancel_reasons.lock().unwrap().push(request.reason);
        Ok(Response::new(pb::CancelPipelineRunResponse {
            run: Some(run),
        }))
    }

    type WatchPipelineRunStream = BoxStream<pb::PipelineEvent>;

    async fn watch_pipeline_run(
        &self,
        request: Request<pb::WatchPipelineRunRequest>,
    ) -> Result<Response<Self::WatchPipelineRunStream>, Status> {
        self.run_for(&request.into_inner().run_id)?;
        let events = tokio_stream::iter(self.events().into_iter().map(Ok));
        if self.hang {
            Ok(Response::new(Box::pin(
                events.chain(tokio_stream::pending()),
            )))
        } else {
            Ok(Response::new(Box::pin(events)))
        }
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let request = request.into_inner();
        self.run_for(&request.run_id)?;
        let artifacts = [("build", "dist/app.txt", 12), ("test", "report.xml", 2048)]
            .into_iter()
            .filter(|(step, _, _)| request.step.is_empty() || request.step == *step)
            .map(|(step, path, size)| pb::Artifact {
                step: step.into(),
                path: path.into(),
                size,
                digest: "SHA-256=q1w2e3".into(),
                modified: None,
            })
            .collect();
        Ok(Response::new(pb::ListArtifactsResponse { artifacts }))
    }

    type DownloadArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let request = request.into_inner();
        self.run_for(&request.run_id)?;
        if (request.step.as_str(), request.path.as_str()) != ("build", "dist/app.txt") {
            return Err(Status::not_found(format!(
                "artifact {} of step {} not found",
                request.path, request.step
            )));
        }
        let chunks = ["hello ", "world\n"].map(|data| {
            Ok(pb::ArtifactChunk {
                data: data.as_bytes().to_vec(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

async fn serve_pipelines(pipelines: FakePipelines) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PipelineServiceServer::new(pipelines))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

const PIPELINE: &str = "\
name: ci
steps:
  - name: build
    command: {kind: exec, argv: [make]}
  - name: test
    needs: [build]
    command: {kind: script, interpreter: [/bin/sh, -c], script: 'make test'}
    env: {TOKEN: s3cret}
    secret_env: [TOKEN]
  - name: cleanup
    needs: [test]
    when: always
    command: {kind: exec, argv: [make, clean]}
";

#[tokio::test]
async fn pipeline_run_prints_a_line_per_change_and_exits_1_for_a_failed_run() {
    let fake = FakePipelines::new(pb::PipelineState::Failed);
    let submitted = fake.submitted.clone();
    let server = serve_pipelines(fake).await;
    let (_dir, path) = job_file("ci.yaml", PIPELINE);
    let out = hodei(&server, &["pipeline", "run", "-f", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("run {RUN_ID} (ci): queued"),
            "build: waiting".into(),
            "test: waiting".into(),
            "cleanup: waiting".into(),
            "build: succeeded on w-1 (exit code 0)".into(),
            "test: failed on w-1 (exit code 3): exited with code 3".into(),
            "cleanup: succeeded on w-1 (exit code 0)".into(),
            format!("run {RUN_ID} (ci): failed after 0.0s"),
        ],
        "{stdout}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout:?}");

    let specs = submitted.lock().unwrap().clone();
    assert_eq!(specs.len(), 1);
    let names: Vec<&str> = specs[0].steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["build", "test", "cleanup"]);
    assert_eq!(specs[0].steps[2].when, i32::from(pb::When::Always));
    // The secret travels unmasked: the server needs it to run the step.
    let test_job = specs[0].steps[1].job.clone().unwrap();
    assert_eq!(
        test_job.env.get("TOKEN").map(String::as_str),
        Some("s3cret")
    );
}

#[tokio::test]
async fn pipeline_run_of_a_succeeded_run_exits_0_and_json_prints_events_then_the_run() {
    let server = serve_pipelines(FakePipelines::new(pb::PipelineState::Succeeded)).await;
    let out = hodei_with_stdin(&server, &["pipeline", "run", "-f", "-"], PIPELINE).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stdout).contains("test: succeeded"), "{out:?}");

    let out = hodei_with_stdin(
        &server,
        &["--output", "json", "pipeline", "run", "-f", "-"],
        PIPELINE,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let docs: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = docs[..4]
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["submitted", "step_queued", "step_finished", "finished"]
    );
    assert_eq!(docs.len(), 5);
    assert_eq!(docs[4]["id"], RUN_ID);
    assert_eq!(docs[4]["state"], "succeeded");
    assert_eq!(docs[4]["steps"][2]["state"], "succeeded");
}

/// A port that accepts connections but is never served, and whether anyone connected.
fn silent_server() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    (listener, server)
}

fn nobody_connected(listener: &std::net::TcpListener) -> bool {
    matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test]
async fn a_malformed_pipeline_file_names_line_and_column_and_sends_nothing() {
    let (listener, server) = silent_server();
    let (_dir, path) = job_file(
        "ci.yaml",
        "name: ci\nsteps:\n  - name: build\n    command: {kind: exec, argv: [make]\n",
    );
    let path = path.to_str().unwrap();
    let out = hodei(&server, &["pipeline", "run", "-f", path]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("error: {path}:5:1: ")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let out = hodei_with_stdin(
        &server,
        &["pipeline", "submit", "-f", "-"],
        "name: ci\nsteps:\n  - name: build\n    retries: 3\n    command: {kind: exec, argv: [make]}\n",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("error: <stdin>:4:5: steps[0]: unknown field `retries`"),
        "{}",
        text(&out.stderr)
    );

    let out = hodei_with_stdin(
        &server,
        &["pipeline", "run", "-f", "-"],
        "name: ci\nsteps:\n  - name: sleep\n    command:\n      kind: exec\n      argv: [sleep, 10]\n",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with(
            "error: <stdin>:4:5: steps[0].command: invalid type: integer `10`, expected a string"
        ),
        "{}",
        text(&out.stderr)
    );
    assert!(nobody_connected(&listener));
}

#[tokio::test]
async fn an_invalid_pipeline_lists_every_error_with_its_path_and_sends_nothing() {
    let (listener, server) = silent_server();
    let (_dir, path) = job_file(
        "ci.yaml",
        "\
name: ci
steps:
  - name: build
    command: {kind: exec, argv: [make]}
    max_attempts: 0
  - name: test
    needs: [build, tests]
    command: {kind: exec, argv: []}
  - name: test
    command: {kind: exec, argv: [\"true\"]}
",
    );
    let path = path.to_str().unwrap();
    let out = hodei(&server, &["pipeline", "run", "-f", path]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    for field in [
        "steps[2].name: duplicate step name 'test'",
        "steps.build.max_attempts: ",
        "steps.test.needs[1]: unknown step 'tests'",
        "steps.test.command.argv: ",
    ] {
        assert!(
            stderr.contains(&format!("error: {path}: {field}")),
            "{field}: {stderr}"
        );
    }
    assert!(
        stderr
            .lines()
            .all(|l| l.starts_with(&format!("error: {path}: "))),
        "{stderr}"
    );
    assert!(nobody_connected(&listener));
}

#[tokio::test]
async fn pipeline_get_list_watch_and_cancel() {
    let fake = FakePipelines::new(pb::PipelineState::Failed);
    let cancel_reasons = fake.cancel_reasons.clone();
    let server = serve_pipelines(fake).await;

    let out = hodei(&server, &["pipeline", "get", RUN_ID]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("state:     failed\n"), "{stdout}");
    assert!(
        stdout.contains("STEP     STATE      DURATION  JOB          ATTEMPTS  REASON\n"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("test     failed     -         job-test     1         exited with code 3\n"),
        "{stdout}"
    );

    let out = hodei(&server, &["pipeline", "get", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: not_found: pipeline run nope not found\n"
    );

    let out = hodei(
        &server,
        &["pipeline", "list", "--state", "failed", "--name", "c"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("ID                                    PIPELINE  STATE   STEPS"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{RUN_ID}  ci        failed  3/3 ended, 1 failed")),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("next page: --page-token tok9\n"),
        "{stdout}"
    );

    let out = hodei(&server, &["pipeline", "watch", RUN_ID]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stdout).contains("test: failed"), "{out:?}");

    let out = hodei(&server, &["pipeline", "cancel", "--reason", "oops", RUN_ID]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), format!("run {RUN_ID} failed\n"));
    assert_eq!(cancel_reasons.lock().unwrap().as_slice(), ["oops"]);
}

#[tokio::test]
async fn ctrl_c_cancels_the_run_and_a_second_one_stops_waiting() {
    let mut fake = FakePipelines::new(pb::PipelineState::Running);
    fake.hang = true;
    let submitted = fake.submitted.clone();
    let cancel_reasons = fake.cancel_reasons.clone();
    let server = serve_pipelines(fake).await;
    let (_dir, path) = job_file("ci.yaml", PIPELINE);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .args([
            "--server",
            &server,
            "pipeline",
            "run",
            "-f",
            path.to_str().unwrap(),
        ])
        .env_remove("HODEI_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    // The client listens for Ctrl-C before it submits, so once the run is submitted a signal
    // is the client's to handle.
    hodei_test_support::wait_for("the submission", std::time::Duration::from_secs(10), || {
        let seen = !submitted.lock().unwrap().is_empty();
        async move { seen.then_some(()) }
    })
    .await
    .unwrap();
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
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("cancelling run {RUN_ID}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("stopped waiting for run {RUN_ID}")),
        "{stderr}"
    );
    assert_eq!(
        cancel_reasons.lock().unwrap().as_slice(),
        ["interrupted by the client (ctrl-c)"]
    );
}

#[tokio::test]
async fn pipeline_run_on_a_terminal_redraws_the_steps_in_place() {
    let server = serve_pipelines(FakePipelines::new(pb::PipelineState::Failed)).await;
    let (_dir, path) = job_file("ci.yaml", PIPELINE);
    let out = hodei_on_a_terminal(
        &server,
        &["pipeline", "run", "-f", path.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let screen = text(&out.stdout);
    // The block of 4 lines (the run, 3 steps) is drawn, then drawn again over itself.
    assert!(screen.contains("\x1b[4A"), "{screen:?}");
    assert!(screen.contains("\x1b[31mfailed\x1b[0m"), "{screen:?}");
    let last = &screen[screen.rfind("\x1b[4A").unwrap()..];
    assert!(last.contains("  cleanup  "), "{screen:?}");
}

#[tokio::test]
async fn artifacts_are_listed_and_downloaded() {
    let server = serve_pipelines(FakePipelines::new(pb::PipelineState::Succeeded)).await;
    let out = hodei(&server, &["artifacts", "ls", RUN_ID]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "\
STEP   PATH          SIZE     DIGEST          MODIFIED
build  dist/app.txt  12 B     SHA-256=q1w2e3  -
test   report.xml    2.0 KiB  SHA-256=q1w2e3  -
"
    );
    let out = hodei(
        &server,
        &[
            "--output",
            "json",
            "artifacts",
            "ls",
            RUN_ID,
            "--step",
            "test",
        ],
    )
    .await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["artifacts"].as_array().unwrap().len(), 1);
    assert_eq!(doc["artifacts"][0]["path"], "report.xml");

    // To stdout: the bytes and nothing else.
    let out = hodei(
        &server,
        &[
            "artifacts",
            "get",
            "-o",
            "-",
            RUN_ID,
            "build",
            "dist/app.txt",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"hello world\n");
    assert!(out.stderr.is_empty(), "{out:?}");

    // By default, under its file name in the current directory.
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hodei"))
        .args([
            "--server",
            &server,
            "artifacts",
            "get",
            RUN_ID,
            "build",
            "dist/app.txt",
        ])
        .env_remove("HODEI_SERVER")
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(
        std::fs::read(dir.path().join("app.txt")).unwrap(),
        b"hello world\n"
    );

    let target = dir.path().join("copy.txt");
    let out = hodei(
        &server,
        &[
            "artifacts",
            "get",
            "-o",
            target.to_str().unwrap(),
            RUN_ID,
            "build",
            "missing",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: not_found: artifact missing of step build not found\n"
    );
    assert!(!target.exists());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["app.txt"], "no partial file is left behind");
}
