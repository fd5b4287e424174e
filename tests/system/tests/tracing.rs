//! One job, one trace: an OTLP collector inside the test receives the spans of the gateway,
//! the scheduler, the registry and the agent for one submitted job, all in the trace the
//! client started (its `traceparent` metadata is honoured), with a parent chain from the
//! gateway through the scheduler to the agent.
//!
//! The services share this process and its one tracer provider, so spans name their service
//! in the `hodei.service` attribute. This file holds one test: the subscriber is global.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, TestSystem};
use hodei_telemetry::TelemetryConfig;
use hodei_test_support::wait_for;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Every span the collector received.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Collector, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    fn trace(&self, trace_id: &[u8]) -> Vec<Span> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

fn service(span: &Span) -> &str {
    attribute(span, "hodei.service").unwrap_or("?")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The names and services of `span` and its ancestors, from `span` up to the root.
fn ancestry<'a>(span: &'a Span, by_id: &HashMap<Vec<u8>, &'a Span>) -> Vec<&'a Span> {
    let mut chain = vec![span];
    let mut current = span;
    while let Some(parent) = by_id.get(&current.parent_span_id) {
        chain.push(parent);
        current = parent;
    }
    chain
}

fn describe(spans: &[&Span]) -> String {
    spans
        .iter()
        .map(|s| format!("{} [{}]", s.name, service(s)))
        .collect::<Vec<_>>()
        .join(" <- ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_job_is_one_trace_from_gateway_through_scheduler_to_agent() {
    let (collector, collector_addr) = Collector::start().await;
    let telemetry = hodei_telemetry::init_with(TelemetryConfig {
        service: "hodei-system-test".to_owned(),
        version: "test".to_owned(),
        log_filter: "warn".to_owned(),
        trace_filter: "info".to_owned(),
        json: false,
        otlp_endpoint: Some(format!("http://{collector_addr}")),
    })
    .unwrap();
    assert!(telemetry.is_exporting());
    let mut system = TestSystem::start(&[AgentSpec {
        id: "traced-agent",
        labels: "os=linux",
        slots: 2,
    }])
    .await
    .unwrap();

    // The client's own trace: the job's spans must join it.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let trace_id = format!("{:032x}", seed | 1 << 120);
    let client_span = "00f067aa0ba902b7";
    // The job runs until the test releases it, so the registry surely sees it in a heartbeat.
    let release_dir = tempfile::tempdir().unwrap();
    let release = release_dir.path().join("release");
    let mut request = Request::new(pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            name: "traced".to_owned(),
            command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "while [ ! -e \"$RELEASE\" ]; do sleep 0.05; done; echo traced".into(),
                ],
            })),
            env: [("RELEASE".to_owned(), release.display().to_string())].into(),
            timeout_secs: 60,
            ..Default::default()
        }),
        tenant: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let job = system
        .jobs
        .submit_job(request)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();

    let trace_bytes = unhex(&trace_id);
    wait_for(
        "the registry to see the attempt",
        Duration::from_secs(60),
        || {
            let collector = collector.clone();
            let telemetry = &telemetry;
            let trace_bytes = trace_bytes.clone();
            async move {
                telemetry.flush().await;
                collector
                    .trace(&trace_bytes)
                    .iter()
                    .any(|s| service(s) == "registry" && s.name == "attempt reported by worker")
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    std::fs::write(&release, b"").unwrap();

    let client = system.jobs.clone();
    wait_for("the job to succeed", Duration::from_secs(60), || {
        let mut client = client.clone();
        let id = job.id.clone();
        async move {
            let job = client
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    as_of: None,
                })
                .await
                .ok()?
                .into_inner()
                .job?;
            (job.state == pb::JobState::Succeeded as i32).then_some(())
        }
    })
    .await
    .unwrap();

    // Spans arrive in batches: flush until the job's trace holds what the test checks.
    let services = ["api-gateway", "scheduler", "registry", "agent"];
    let spans = wait_for("spans of every service", Duration::from_secs(60), || {
        let collector = collector.clone();
        let telemetry = &telemetry;
        let trace_bytes = trace_bytes.clone();
        async move {
            telemetry.flush().await;
            let spans = collector.trace(&trace_bytes);
            let seen: BTreeSet<&str> = spans.iter().map(service).collect();
            let report_processed = spans
                .iter()
                .any(|s| s.name == "process hodei.v1.report.*.*" && service(s) == "scheduler");
            (services.iter().all(|s| seen.contains(s)) && report_processed).then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|e| {
        let spans = collector.trace(&trace_bytes);
        let names: Vec<String> = spans
            .iter()
            .map(|s| format!("{} [{}]", s.name, service(s)))
            .collect();
        panic!("{e}; the trace holds: {names:?}")
    });

    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();

    // The gateway's server span is the child of the client's span.
    let server = spans
        .iter()
        .find(|s| s.name == "hodei.v1.JobService/SubmitJob")
        .expect("the gateway's SubmitJob span");
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(service(server), "api-gateway");

    // The agent's execution descends from the scheduler's placement, which descends from the
    // gateway's SubmitJob.
    let run = spans
        .iter()
        .find(|s| s.name == "run attempt")
        .expect("the agent's run attempt span");
    assert_eq!(service(run), "agent");
    let chain = ancestry(run, &by_id);
    let names: Vec<(&str, &str)> = chain
        .iter()
        .map(|s| (s.name.as_str(), service(s)))
        .collect();
    // `svc` None: any service. Every writer relays the shared outbox, so a `send` span belongs
    // to whichever service's relay published the message.
    let position = |name: &str, svc: Option<&str>| {
        names
            .iter()
            .position(|(n, s)| *n == name && svc.is_none_or(|svc| *s == svc))
            .unwrap_or_else(|| panic!("{name} [{svc:?}] not in {}", describe(&chain)))
    };
    let agent_process = position("process hodei.v1.agent.*.cmd", Some("agent"));
    let assign_send = position("send hodei.v1.agent.*.cmd", None);
    let placement = position("process hodei.v1.work.place.*", Some("scheduler"));
    let place_send = position("send hodei.v1.work.place.*", None);
    let submit = position("submit_job", Some("api-gateway"));
    let root = position("hodei.v1.JobService/SubmitJob", Some("api-gateway"));
    assert!(
        agent_process < assign_send
            && assign_send < placement
            && placement < place_send
            && place_send < submit
            && submit < root
            && root == chain.len() - 1,
        "{}",
        describe(&chain)
    );

    // The agent's reports reach the scheduler in the same trace, and the registry's view of
    // the attempt joins it too.
    let report = spans
        .iter()
        .find(|s| s.name == "process hodei.v1.report.*.*")
        .unwrap();
    assert!(
        ancestry(report, &by_id)
            .iter()
            .any(|s| s.name == "run attempt"),
        "{}",
        describe(&ancestry(report, &by_id))
    );
    let confirmed = spans
        .iter()
        .find(|s| service(s) == "registry" && s.name == "attempt reported by worker")
        .unwrap();
    assert!(
        ancestry(confirmed, &by_id)
            .iter()
            .any(|s| s.name == "submit_job"),
        "{}",
        describe(&ancestry(confirmed, &by_id))
    );
    // Messaging spans follow the conventions.
    assert_eq!(attribute(run, "job_id"), Some(job.id.as_str()));
    let placement = chain[placement];
    assert_eq!(attribute(placement, "messaging.system"), Some("nats"));
    assert_eq!(
        attribute(placement, "messaging.destination.name"),
        Some(format!("hodei.v1.work.place.{}", job.id).as_str())
    );
    assert_eq!(
        attribute(placement, "messaging.consumer.group.name"),
        Some("scheduler-placer")
    );
    assert!(attribute(placement, "messaging.message.id").is_some_and(|id| !id.is_empty()));

    system.stop().await;
    telemetry.shutdown().await;
}
