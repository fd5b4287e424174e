//! The gateway speaks the standard gRPC services stock tools use: `grpc.health.v1.Health`
//! (grpc-health-probe, Kubernetes gRPC probes) answers SERVING for the server and for each
//! Hodei service, and `grpc.reflection.v1` (grpcurl, grpcui) lists the services and serves
//! their descriptors.
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

const HODEI_SERVICES: [&str; 3] = [
    "hodei.v1.JobService",
    "hodei.v1.PipelineService",
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
