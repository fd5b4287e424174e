//! The gateway speaks the standard gRPC services stock tools use: `grpc.health.v1.Health`
//! (grpc-health-probe, Kubernetes gRPC probes) answers SERVING for the server and for each
//! Hodei service, and server reflection, in both `grpc.reflection.v1` and `v1alpha`, lists
//! the services and serves their descriptors: to a tonic client, to grpcurl 1.8 and to
//! Python's grpcio-reflection, the last two speaking `v1alpha` only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hodei_system_tests::TestSystem;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const HODEI_SERVICES: [&str; 5] = [
    "hodei.v1.JobService",
    "hodei.v1.PipelineService",
    "hodei.v1.ScheduleService",
    "hodei.v1.TenantService",
    "hodei.v1.WorkerService",
];

async fn channel(system: &TestSystem) -> Channel {
    Channel::from_shared(format!("http://{}", system.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One reflection request's answer, or the status the stream ended with.
async fn try_reflect(
    channel: Channel,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    Ok(answers.message().await?.unwrap().message_response.unwrap())
}

async fn reflect(channel: Channel, request: MessageRequest) -> MessageResponse {
    try_reflect(channel, request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_serving_for_the_server_and_each_service() {
    let system = TestSystem::start(&[]).await.unwrap();
    let mut health = HealthClient::new(channel(&system).await);
    for service in std::iter::once("").chain(HODEI_SERVICES) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "hodei.v1.NoSuchService".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_serves_their_descriptors() {
    let system = TestSystem::start(&[]).await.unwrap();
    let channel = channel(&system).await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(channel.clone(), MessageRequest::ListServices(String::new())).await
    else {
        panic!("a list of services");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in HODEI_SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    for symbol in HODEI_SERVICES.iter().chain(&["hodei.v1.SubmitJobRequest"]) {
        let answer = reflect(
            channel.clone(),
            MessageRequest::FileContainingSymbol((*symbol).to_owned()),
        )
        .await;
        let MessageResponse::FileDescriptorResponse(files) = answer else {
            panic!("descriptors for {symbol}, got {answer:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
    }
    let missing = try_reflect(
        channel,
        MessageRequest::FileContainingSymbol("hodei.v1.Nothing".to_owned()),
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    system.stop().await;
}

/// A stock tool found by `scripts/test.sh` (`hodei_ensure_grpc_clients`).
fn stock_tool(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| {
        panic!(
            "{variable} is not set: run the tests through scripts/test.sh, or `source \
             scripts/lib/deps.sh && hodei_ensure_grpc_clients` first"
        )
    })
}

/// Checks that a WatchJob stream, as grpcurl or Python printed its events, went from the
/// submission to the job's success; returns how many events it had.
fn assert_watched_to_the_end<'a>(events: impl Iterator<Item = &'a serde_json::Value>) -> usize {
    let types: Vec<&str> = events
        .map(|e| e["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(types.first(), Some(&"submitted"), "{types:?}");
    assert_eq!(types.last(), Some(&"succeeded"), "{types:?}");
    types.len()
}

/// grpcurl 1.8 (which asks `grpc.reflection.v1alpha` only, and fails with "server does not
/// support the reflection API" against a v1-only server) lists and describes the services,
/// submits a job from JSON and watches it to the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_1_8_lists_describes_submits_and_watches_through_reflection_v1alpha() {
    let grpcurl = stock_tool("HODEI_GRPCURL");
    let system = TestSystem::start(&[hodei_system_tests::AgentSpec {
        id: "grpcurl-agent",
        labels: "",
        slots: 1,
    }])
    .await
    .unwrap();
    let address = system.grpc_addr.to_string();
    let auth = format!("authorization: Bearer {}", system.admin_token);
    let run = |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        async move {
            let out = tokio::process::Command::new(&grpcurl)
                .args(&args)
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                out.status.success(),
                "grpcurl {args:?} failed: {stderr}{stdout}"
            );
            stdout
        }
    };
    let arg = |s: &str| s.to_owned();

    let version = std::process::Command::new(&grpcurl)
        .arg("-version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stderr).into_owned()
        + &String::from_utf8_lossy(&version.stdout);
    assert!(version.contains("v1.8."), "{version}");
    let listed = run(vec![arg("-plaintext"), address.clone(), arg("list")]).await;
    for service in HODEI_SERVICES.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        assert!(
            listed.lines().any(|l| l == *service),
            "{service} missing from {listed}"
        );
    }
    let described = run(vec![
        arg("-plaintext"),
        address.clone(),
        arg("describe"),
        arg("hodei.v1.JobService"),
    ])
    .await;
    assert!(
        described.contains("rpc SubmitJob ( .hodei.v1.SubmitJobRequest )"),
        "{described}"
    );
    let message = run(vec![
        arg("-plaintext"),
        address.clone(),
        arg("describe"),
        arg("hodei.v1.JobSpec"),
    ])
    .await;
    assert!(message.contains("string name = 1;"), "{message}");

    let spec = serde_json::json!({
        "spec": {
            "name": "from-grpcurl",
            "script": {"interpreter": ["/bin/sh", "-c"], "script": "echo hello from grpcurl"},
            "timeoutSecs": 60,
            "labels": {"via": "grpcurl"}
        }
    });
    let submitted = run(vec![
        arg("-plaintext"),
        arg("-H"),
        auth.clone(),
        arg("-d"),
        spec.to_string(),
        address.clone(),
        arg("hodei.v1.JobService/SubmitJob"),
    ])
    .await;
    let submitted: serde_json::Value = serde_json::from_str(&submitted).unwrap();
    let job_id = submitted["job"]["id"].as_str().unwrap().to_owned();
    assert_eq!(submitted["created"], true, "{submitted}");
    assert_eq!(submitted["job"]["spec"]["labels"]["via"], "grpcurl");

    // The stream ends by itself when the job has ended: grpcurl exits 0 after the last event.
    let watched = run(vec![
        arg("-plaintext"),
        arg("-max-time"),
        arg("60"),
        arg("-H"),
        auth,
        arg("-d"),
        serde_json::json!({ "jobId": job_id }).to_string(),
        address,
        arg("hodei.v1.JobService/WatchJob"),
    ])
    .await;
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&watched)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_watched_to_the_end(events.iter());
    assert_eq!(
        system.get_job(&job_id).await.unwrap().state(),
        hodei_proto::v1::JobState::Succeeded
    );
    system.stop().await;
}

/// Python's grpcio-reflection (`grpc_reflection.v1alpha`, the only version it has): a client
/// that knows nothing of Hodei but the address loads the descriptors, builds a
/// SubmitJobRequest from them, submits it and watches the job to the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_reflection_submits_and_watches_a_job_from_descriptors_alone() {
    let pythonpath = stock_tool("HODEI_GRPC_PYTHONPATH");
    let system = TestSystem::start(&[hodei_system_tests::AgentSpec {
        id: "python-agent",
        labels: "",
        slots: 1,
    }])
    .await
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/reflect_v1alpha.py");
    let spec = serde_json::json!({
        "name": "from-python",
        "script": {"interpreter": ["/bin/sh", "-c"], "script": "echo hello from python"},
        "timeoutSecs": 60
    });
    let out = tokio::process::Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .arg(script)
        .arg(system.grpc_addr.to_string())
        .arg(&system.admin_token)
        .arg(spec.to_string())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "reflect_v1alpha.py failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let services: Vec<&str> = lines[0]["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for service in HODEI_SERVICES {
        assert!(
            services.contains(&service),
            "{service} missing from {services:?}"
        );
    }
    let job_id = lines[1]["submitted"].as_str().unwrap();
    let watched = assert_watched_to_the_end(lines.iter().filter_map(|l| l.get("event")));
    assert_eq!(
        lines.last().unwrap()["watched"].as_u64(),
        Some(watched as u64)
    );
    let job = system.get_job(job_id).await.unwrap();
    assert_eq!(job.state(), hodei_proto::v1::JobState::Succeeded);
    assert_eq!(job.spec.unwrap().name, "from-python");
    system.stop().await;
}
