//! Who may do what, on the real system over gRPC: credentials (opaque tokens, revocation,
//! expiry, OIDC access tokens), tenants (another tenant's objects are NOT_FOUND on every RPC),
//! roles (PERMISSION_DENIED), the audit log, and TLS with and without client certificates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use hodei_domain::Role;
use hodei_proto::v1 as pb;
use hodei_system_tests::processes::{self, ServiceProcess};
use hodei_system_tests::{
    AgentSpec, Clients, SystemOptions, TestSystem, endpoint, issue_token, shell_job,
};
use hodei_test_support::{TestDatabase, TestNats, http_get, metric_sample, wait_for};
use ring::signature::{Ed25519KeyPair, KeyPair};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

fn agent() -> [AgentSpec; 1] {
    [AgentSpec {
        id: "access-agent",
        labels: "",
        slots: 4,
    }]
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.unwrap_err().code()
}

async fn who_am_i(clients: &Clients) -> Result<pb::WhoAmIResponse, tonic::Status> {
    clients
        .access
        .clone()
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map(|r| r.into_inner())
}

async fn list_jobs(clients: &Clients, tenant: &str) -> Result<Vec<pb::Job>, tonic::Status> {
    clients
        .jobs
        .clone()
        .list_jobs(pb::ListJobsRequest {
            tenant: tenant.to_owned(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().jobs)
}

/// The gateway's count of calls refused with `code`.
/// A team-a token made through the API by the system's admin.
async fn api_token(
    system: &TestSystem,
    name: &str,
    role: &str,
    expires_in_seconds: u64,
) -> pb::CreateTokenResponse {
    system
        .access
        .clone()
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            tenant: "team-a".into(),
            role: role.into(),
            expires_in_seconds,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn refused(system: &TestSystem, code: &str) -> f64 {
    let addr = system.metrics_addr("api-gateway").unwrap();
    let metrics = http_get(addr, "/metrics").await.unwrap().body;
    metric_sample(
        &metrics,
        &format!("hodei_grpc_refused_total{{code=\"{code}\"}}"),
    )
    .unwrap_or(0.0)
}

async fn submit(
    clients: &Clients,
    spec: pb::JobSpec,
) -> Result<pb::SubmitJobResponse, tonic::Status> {
    clients
        .jobs
        .clone()
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_bad_revoked_and_expired_credentials_are_unauthenticated() {
    let system = TestSystem::start(&[]).await.unwrap();

    // No credentials, and credentials that are not ours: every service refuses, saying why.
    let anonymous = system.clients(None).unwrap();
    let status = who_am_i(&anonymous).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("missing credentials"),
        "{status:?}"
    );
    assert_eq!(code(list_jobs(&anonymous, "").await), Code::Unauthenticated);
    let workers = anonymous
        .workers
        .clone()
        .list_workers(pb::ListWorkersRequest::default())
        .await;
    assert_eq!(code(workers), Code::Unauthenticated);
    let runs = anonymous
        .pipelines
        .clone()
        .list_pipeline_runs(pb::ListPipelineRunsRequest::default())
        .await;
    assert_eq!(code(runs), Code::Unauthenticated);
    for bad in [
        "hodei_notatoken",
        "eyJhbGciOiJFZERTQSJ9.e30.c2ln",
        "garbage",
    ] {
        let status = who_am_i(&system.clients(Some(bad)).unwrap())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{bad}: {status:?}");
    }
    let mut basic = tonic::Request::new(pb::WhoAmIRequest {});
    basic
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    let status = anonymous.access.clone().who_am_i(basic).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{status:?}");

    // Every refusal is counted.
    assert!(refused(&system, "unauthenticated").await >= 8.0);

    // A token made through the API works until it is revoked, then at once no longer.
    let created = api_token(&system, "ci", "submitter", 0).await;
    assert!(created.secret.starts_with("hodei_"));
    let token = created.token.unwrap();
    let ci = system.clients(Some(&created.secret)).unwrap();
    let me = who_am_i(&ci).await.unwrap();
    assert_eq!(
        (me.subject.as_str(), me.tenant.as_str(), me.role.as_str()),
        (
            format!("token:{}", token.id).as_str(),
            "team-a",
            "submitter"
        )
    );
    // Only the hash is stored: the secret is nowhere in the database.
    let pool = system.database.connect().await.unwrap();
    let hashes: Vec<Vec<u8>> = sqlx::query_scalar("SELECT secret_hash FROM api_tokens")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        hashes
            .iter()
            .all(|h| h.len() == 32 && h != created.secret.as_bytes())
    );
    let listed = system
        .access
        .clone()
        .list_tokens(pb::ListTokensRequest {
            tenant: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, token.id);
    system
        .access
        .clone()
        .revoke_token(pb::RevokeTokenRequest {
            token_id: token.id.clone(),
        })
        .await
        .unwrap();
    let status = who_am_i(&ci).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{status:?}");

    // Revoked behind the gateway's back (hodei-admin writes the database): refused once the
    // gateway's cache of that token has lapsed.
    let other = system.token("team-a", Role::Viewer).await.unwrap();
    let viewer = system.clients(Some(&other)).unwrap();
    let me = who_am_i(&viewer).await.unwrap();
    let id: uuid::Uuid = me.subject.trim_start_matches("token:").parse().unwrap();
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    wait_for(
        "the revoked token to be refused",
        hodei_api_gateway::TOKEN_CACHE_TTL * 3,
        || async { who_am_i(&viewer).await.err().map(|s| s.code()) },
    )
    .await
    .map(|code| assert_eq!(code, Code::Unauthenticated))
    .unwrap();

    // An expired token is refused.
    let short = api_token(&system, "short", "viewer", 1).await;
    let short = system.clients(Some(&short.secret)).unwrap();
    let status = wait_for("the token to expire", Duration::from_secs(10), || async {
        who_am_i(&short).await.err()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{status:?}");
    system.stop().await;
}

/// Submits a one-step pipeline as `clients` whose step makes an artifact, and waits for it.
async fn artifact_run(clients: &Clients) -> pb::PipelineRun {
    let mut step = pb::PipelineStep {
        name: "make".into(),
        job: Some(shell_job("make", "echo secret-a > out.txt")),
        ..Default::default()
    };
    step.artifacts = Some(pb::StepArtifacts {
        produce: vec!["out.txt".into()],
        consume: vec![],
    });
    let run = clients
        .pipelines
        .clone()
        .submit_pipeline(pb::SubmitPipelineRequest {
            spec: Some(pb::PipelineSpec {
                name: "tenant-a".into(),
                steps: vec![step],
                ..Default::default()
            }),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    wait_for("the run to end", DEADLINE, || async {
        let run = clients
            .pipelines
            .clone()
            .get_pipeline_run(pb::GetPipelineRunRequest {
                run_id: run.id.clone(),
                as_of: None,
            })
            .await
            .ok()?
            .into_inner()
            .run?;
        (run.state == pb::PipelineState::Succeeded as i32).then_some(run)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_see_only_their_own_and_roles_limit_what_they_do_and_the_audit_log_says_who() {
    let system = TestSystem::start(&agent()).await.unwrap();
    let a = system
        .clients(Some(
            &system.token("team-a", Role::Submitter).await.unwrap(),
        ))
        .unwrap();
    let b = system
        .clients(Some(&system.token("team-b", Role::Operator).await.unwrap()))
        .unwrap();
    let b_viewer = system
        .clients(Some(&system.token("team-b", Role::Viewer).await.unwrap()))
        .unwrap();

    // Team A's job and run, in team A (the tenant comes from the token).
    let mut spec = shell_job("a-job", "echo private-output");
    spec.idempotency_key = "shared-key".into();
    let submitted = submit(&a, spec.clone()).await.unwrap();
    let job = submitted.job.unwrap();
    assert_eq!(job.tenant, "team-a");
    system.wait_terminal(&job.id, DEADLINE).await.unwrap();
    let run = artifact_run(&a).await;
    assert_eq!(run.tenant, "team-a");

    // To team B, in any role, they do not exist: every RPC answers NOT_FOUND.
    for (who, clients) in [("operator", &b), ("viewer", &b_viewer)] {
        let mut jobs = clients.jobs.clone();
        let id = job.id.clone();
        let not_found =
            |what: &str, result: Code| assert_eq!(result, Code::NotFound, "{who} {what}");
        not_found(
            "GetJob",
            code(
                jobs.get_job(pb::GetJobRequest {
                    job_id: id.clone(),
                    as_of: None,
                })
                .await,
            ),
        );
        not_found(
            "GetJob as of",
            code(
                jobs.get_job(pb::GetJobRequest {
                    job_id: id.clone(),
                    as_of: Some(pb::get_job_request::AsOf::AsOfSeq(1)),
                })
                .await,
            ),
        );
        not_found(
            "GetJobHistory",
            code(
                jobs.get_job_history(pb::GetJobHistoryRequest {
                    job_id: id.clone(),
                    ..Default::default()
                })
                .await,
            ),
        );
        not_found(
            "WatchJob",
            code(
                jobs.watch_job(pb::WatchJobRequest {
                    job_id: id.clone(),
                    from_seq: 0,
                })
                .await,
            ),
        );
        not_found(
            "StreamLogs",
            code(
                jobs.stream_logs(pb::StreamLogsRequest {
                    job_id: id.clone(),
                    ..Default::default()
                })
                .await,
            ),
        );
        let cancelled = jobs
            .cancel_job(pb::CancelJobRequest {
                job_id: id.clone(),
                reason: String::new(),
            })
            .await;
        let expected = if who == "viewer" {
            Code::PermissionDenied
        } else {
            Code::NotFound
        };
        assert_eq!(code(cancelled), expected, "{who} CancelJob");
        let mut pipelines = clients.pipelines.clone();
        let run_id = run.id.clone();
        not_found(
            "GetPipelineRun",
            code(
                pipelines
                    .get_pipeline_run(pb::GetPipelineRunRequest {
                        run_id: run_id.clone(),
                        as_of: None,
                    })
                    .await,
            ),
        );
        not_found(
            "WatchPipelineRun",
            code(
                pipelines
                    .watch_pipeline_run(pb::WatchPipelineRunRequest {
                        run_id: run_id.clone(),
                        ..Default::default()
                    })
                    .await,
            ),
        );
        not_found(
            "ListArtifacts",
            code(
                pipelines
                    .list_artifacts(pb::ListArtifactsRequest {
                        run_id: run_id.clone(),
                        step: String::new(),
                    })
                    .await,
            ),
        );
        not_found(
            "DownloadArtifact",
            code(
                pipelines
                    .download_artifact(pb::DownloadArtifactRequest {
                        run_id: run_id.clone(),
                        step: "make".into(),
                        path: "out.txt".into(),
                    })
                    .await,
            ),
        );
        let cancelled = pipelines
            .cancel_pipeline_run(pb::CancelPipelineRunRequest {
                run_id,
                reason: String::new(),
            })
            .await;
        assert_eq!(code(cancelled), expected, "{who} CancelPipelineRun");

        // Listings hold only their own tenant's, and naming another tenant is refused.
        assert!(list_jobs(clients, "").await.unwrap().is_empty(), "{who}");
        assert_eq!(
            code(list_jobs(clients, "team-a").await),
            Code::PermissionDenied
        );
        let runs = pipelines
            .list_pipeline_runs(pb::ListPipelineRunsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runs;
        assert!(runs.is_empty(), "{who}");
        let events = jobs
            .list_events(pb::ListEventsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .events;
        assert!(events.is_empty(), "{who}: {events:?}");
        assert_eq!(
            code(
                jobs.list_events(pb::ListEventsRequest {
                    tenant: "team-a".into(),
                    ..Default::default()
                })
                .await
            ),
            Code::PermissionDenied
        );
    }

    // Team A still reads all of it, logs and artifact included.
    let mut logs = a
        .jobs
        .clone()
        .stream_logs(pb::StreamLogsRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let line = logs.next().await.unwrap().unwrap();
    assert_eq!(line.text, "private-output");
    let mut download = a
        .pipelines
        .clone()
        .download_artifact(pb::DownloadArtifactRequest {
            run_id: run.id.clone(),
            step: "make".into(),
            path: "out.txt".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(download.next().await.unwrap().unwrap().data, b"secret-a\n");
    assert_eq!(
        list_jobs(&a, "").await.unwrap().len(),
        2,
        "the job and the run's step"
    );

    // Idempotency keys are per tenant: B's use of A's key makes B's own job.
    let b_job = submit(&b, spec).await.unwrap();
    assert!(b_job.created);
    assert_eq!(b_job.job.as_ref().unwrap().tenant, "team-b");
    assert_ne!(b_job.job.as_ref().unwrap().id, job.id);
    // Acting for another tenant takes an admin.
    let as_a = b
        .jobs
        .clone()
        .submit_job(pb::SubmitJobRequest {
            spec: Some(shell_job("x", "true")),
            tenant: "team-a".into(),
        })
        .await;
    assert_eq!(code(as_a), Code::PermissionDenied);
    let by_admin = system
        .jobs
        .clone()
        .submit_job(pb::SubmitJobRequest {
            spec: Some(shell_job("for-a", "true")),
            tenant: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_admin.job.unwrap().tenant, "team-a");
    // An admin sees every tenant's.
    let all = list_jobs(&system.clients(Some(&system.admin_token)).unwrap(), "")
        .await
        .unwrap();
    assert!(all.iter().any(|j| j.tenant == "team-a") && all.iter().any(|j| j.tenant == "team-b"));

    // Roles: a viewer may not submit or cancel, a submitter may not drain, an operator may;
    // only an admin manages tokens and reads the audit log.
    let status = submit(&b_viewer, shell_job("v", "true")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("role viewer may not submit"),
        "{status:?}"
    );
    let b_job_id = submit(&b, shell_job("b-long", "sleep 60"))
        .await
        .unwrap()
        .job
        .unwrap()
        .id;
    let status = b_viewer
        .jobs
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: b_job_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    b.jobs
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: b_job_id.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap();
    let drain = |clients: &Clients| {
        let mut workers = clients.workers.clone();
        async move {
            workers
                .drain_worker(pb::DrainWorkerRequest {
                    worker_id: "access-agent".into(),
                    reason: "maintenance".into(),
                })
                .await
        }
    };
    assert_eq!(code(drain(&a).await), Code::PermissionDenied);
    drain(&b).await.unwrap();
    assert!(refused(&system, "permission_denied").await >= 4.0);
    let tokens = b
        .access
        .clone()
        .list_tokens(pb::ListTokensRequest::default())
        .await;
    assert_eq!(code(tokens), Code::PermissionDenied);
    let audit = b
        .access
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await;
    assert_eq!(code(audit), Code::PermissionDenied);

    // The audit log has every mutating call: who, for which tenant, on what, and how it ended.
    let events = system
        .access
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    let find = |action: &str, target: &str, outcome: &str| {
        events
            .iter()
            .find(|e| e.action == action && e.target == target && e.outcome == outcome)
            .unwrap_or_else(|| panic!("no {action} {target} {outcome} in {events:#?}"))
    };
    let a_me = who_am_i(&a).await.unwrap();
    let b_me = who_am_i(&b).await.unwrap();
    let submitted = find("SubmitJob", &format!("job {}", job.id), "ok");
    assert_eq!(
        (
            submitted.subject.as_str(),
            submitted.tenant.as_str(),
            submitted.role.as_str()
        ),
        (a_me.subject.as_str(), "team-a", "submitter")
    );
    let cancelled = find("CancelJob", &format!("job {b_job_id}"), "ok");
    assert_eq!(
        (cancelled.subject.as_str(), cancelled.tenant.as_str()),
        (b_me.subject.as_str(), "team-b")
    );
    let denied = find("CancelJob", &format!("job {b_job_id}"), "PermissionDenied");
    assert_eq!(denied.role, "viewer");
    assert!(denied.detail.contains("may not cancel"), "{denied:?}");
    let drained = find("DrainWorker", "worker access-agent", "ok");
    assert_eq!(
        (drained.subject.as_str(), drained.role.as_str()),
        (b_me.subject.as_str(), "operator")
    );
    find("DrainWorker", "worker access-agent", "PermissionDenied");
    find("SubmitPipeline", &format!("pipeline run {}", run.id), "ok");
    // Newest first, paged.
    let page = system
        .access
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 2);
    assert!(page.events[0].id > page.events[1].id);
    let next = system
        .access
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(next.events[0].id < page.events[1].id);
    let team_b = system
        .access
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: "team-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!team_b.is_empty() && team_b.iter().all(|e| e.tenant == "team-b"));
    system.stop().await;
}

/// An OIDC issuer of the test's own: an Ed25519 key and its JWKS document.
struct Issuer {
    pkcs8: Vec<u8>,
    kid: String,
}

impl Issuer {
    fn new(kid: &str) -> Issuer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref()
            .to_vec();
        Issuer {
            pkcs8,
            kid: kid.into(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let pair = Ed25519KeyPair::from_pkcs8(&self.pkcs8).unwrap();
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        })
    }

    fn token(&self, sub: &str, tenant: &str, role: &str, exp_in: i64) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let claims = serde_json::json!({
            "iss": "https://id.test", "aud": "hodei", "sub": sub,
            "exp": chrono::Utc::now().timestamp() + exp_in,
            "hodei_tenant": tenant, "hodei_role": role,
        });
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&self.pkcs8),
        )
        .unwrap()
    }
}

fn write_jwks(path: &std::path::Path, issuers: &[&Issuer]) {
    let keys: Vec<_> = issuers.iter().map(|i| i.jwk()).collect();
    std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oidc_access_tokens_of_the_configured_issuer_are_principals() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let first = Issuer::new("k1");
    write_jwks(&jwks, &[&first]);
    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            oidc: Some(hodei_api_gateway::OidcArgs {
                oidc_issuer: Some("https://id.test".into()),
                oidc_jwks: Some(jwks.clone()),
                oidc_audience: Some("hodei".into()),
                ..Default::default()
            }),
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let alice = system
        .clients(Some(&first.token("alice", "team-a", "submitter", 300)))
        .unwrap();
    let me = who_am_i(&alice).await.unwrap();
    assert_eq!(me.subject, "https://id.test#alice");
    assert_eq!(
        (me.tenant.as_str(), me.role.as_str()),
        ("team-a", "submitter")
    );
    let job = submit(&alice, shell_job("oidc", "true"))
        .await
        .unwrap()
        .job
        .unwrap();
    assert_eq!(job.tenant, "team-a");

    let refused = |token: String| {
        let clients = system.clients(Some(&token)).unwrap();
        async move { who_am_i(&clients).await.unwrap_err() }
    };
    assert_eq!(
        refused(first.token("alice", "team-a", "submitter", -600))
            .await
            .code(),
        Code::Unauthenticated
    );
    let stranger = Issuer::new("k1");
    assert_eq!(
        refused(stranger.token("eve", "team-a", "admin", 300))
            .await
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        refused(first.token("alice", "team-a", "root", 300))
            .await
            .code(),
        Code::Unauthenticated
    );

    // The issuer rotates in a new key: the gateway re-reads the JWKS for the kid it lacks.
    let second = Issuer::new("k2");
    let rotated = second.token("bob", "team-b", "viewer", 300);
    write_jwks(&jwks, &[&first, &second]);
    let me = who_am_i(&system.clients(Some(&rotated)).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (me.subject.as_str(), me.role.as_str()),
        ("https://id.test#bob", "viewer")
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_is_served_over_tls_and_can_require_client_certificates() {
    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            tls: true,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    // The harness's clients speak TLS, trusting the system's CA.
    assert_eq!(
        who_am_i(&system.clients(Some(&system.admin_token)).unwrap())
            .await
            .unwrap()
            .role,
        "admin"
    );
    // Plain text to the TLS port does not get through.
    let plain = hodei_system_tests::endpoint(system.grpc_addr, None, false).unwrap();
    let plain = Clients::new(plain.connect_lazy(), Some(&system.admin_token)).unwrap();
    assert!(who_am_i(&plain).await.is_err());
    system.stop().await;

    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            tls: true,
            mutual_tls: true,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        who_am_i(&system.clients(Some(&system.admin_token)).unwrap())
            .await
            .unwrap()
            .role,
        "admin"
    );
    // Without a client certificate the handshake fails, token or not.
    let no_cert = hodei_system_tests::endpoint(system.grpc_addr, system.tls_dir(), false).unwrap();
    let no_cert = Clients::new(no_cert.connect_lazy(), Some(&system.admin_token)).unwrap();
    assert!(who_am_i(&no_cert).await.is_err());

    // A certificate that names a tenant and a role is a credential of its own: no token.
    let dir = system.tls_dir().unwrap();
    let team_a: hodei_domain::TenantId = "team-a".parse().unwrap();
    hodei_admin::tls_client(dir, "ci-bot", &team_a, Role::Submitter).unwrap();
    let with = |cert: &str, key: &str| {
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
            .domain_name("localhost")
            .identity(tonic::transport::Identity::from_pem(read(cert), read(key)));
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("https://{}", system.grpc_addr))
                .unwrap()
                .tls_config(tls)
                .unwrap();
        Clients::new(endpoint.connect_lazy(), None).unwrap()
    };
    let bot = with("ci-bot.pem", "ci-bot-key.pem");
    let me = who_am_i(&bot).await.unwrap();
    assert_eq!(
        (me.subject.as_str(), me.tenant.as_str(), me.role.as_str()),
        ("cert:ci-bot", "team-a", "submitter")
    );
    let job = submit(&bot, shell_job("by-cert", "true"))
        .await
        .unwrap()
        .job
        .unwrap();
    assert_eq!(job.tenant, "team-a");
    // The shared client certificate names nobody: without a token it is refused.
    let status = who_am_i(&with("client.pem", "client-key.pem"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("tenant (O)"), "{status:?}");
    system.stop().await;
}

/// Submits `n` jobs named `<prefix>-<i>` one after the other; how many were refused for load.
/// Any other failure fails the test.
async fn submit_counting_refusals(clients: &Clients, prefix: &str, n: usize) -> u64 {
    let mut refusals = 0;
    for i in 0..n {
        match submit(clients, shell_job(&format!("{prefix}-{i}"), "true")).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::ResourceExhausted => refusals += 1,
            Err(status) => panic!("a submission failed otherwise: {status:?}"),
        }
    }
    refusals
}

/// How many refused calls an audit entry stands for: counted ones say how many.
fn refused_calls(detail: &str) -> u64 {
    match detail.split_once(" calls refused from ") {
        Some((n, _)) => n.parse().unwrap(),
        None => 1,
    }
}

/// The gateway as an operating-system process, stopped with SIGTERM: in process, the test's
/// runtime would keep the audit writer alive after the gateway's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_for_load_still_counted_when_the_gateway_stops_are_written() {
    let nats = TestNats::start().await.unwrap();
    let database = TestDatabase::create().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let grpc = processes::loopback_port().unwrap();
    let env = processes::backend_vars(
        &nats,
        &database,
        "info",
        &[
            ("HODEI_GRPC_ADDR", grpc.to_string()),
            ("HODEI_TENANT_SUBMIT_RATE", "1".to_owned()),
            ("HODEI_TENANT_SUBMIT_BURST", "1".to_owned()),
        ],
    );
    let mut gateway = ServiceProcess::start(
        "api-gateway",
        "hodei-api-gateway",
        env,
        processes::loopback_port().unwrap(),
        logs.path(),
    )
    .unwrap();
    gateway.wait_readiness(200, DEADLINE).await.unwrap();
    let pool = database.connect().await.unwrap();
    let token = issue_token(&pool, "team-a", Role::Submitter).await.unwrap();
    let a = Clients::new(
        endpoint(grpc, None, false).unwrap().connect_lazy(),
        Some(&token),
    )
    .unwrap();
    let refusals = submit_counting_refusals(&a, "a", 20).await;
    assert!(refusals > 0, "never refused");
    // Stopped at once: the refusals of the last second are still being counted.
    let exit = gateway.stop(DEADLINE).await.unwrap();
    assert!(exit.success(), "{exit}: {}", gateway.log_tail());
    let details: Vec<String> = sqlx::query_scalar(
        "SELECT detail FROM audit_log \
         WHERE tenant = 'team-a' AND action = 'SubmitJob' AND outcome = 'ResourceExhausted'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let counted: u64 = details.iter().map(|detail| refused_calls(detail)).sum();
    assert_eq!(counted, refusals, "{details:?}");
    database.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_submission_rate_or_stream_cap_is_refused_alone() {
    let system = TestSystem::start_with(
        &[],
        SystemOptions {
            tenant_submit_rate: 1,
            tenant_submit_burst: 3,
            tenant_max_streams: 2,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let a = system
        .clients(Some(
            &system.token("team-a", Role::Submitter).await.unwrap(),
        ))
        .unwrap();
    let b = system
        .clients(Some(
            &system.token("team-b", Role::Submitter).await.unwrap(),
        ))
        .unwrap();
    // The burst goes through; then, submitting faster than 1 a second, A is refused (a slow
    // machine may earn A a token or two on the way, hence the loop).
    let mut ids = Vec::new();
    let status = loop {
        match submit(&a, shell_job(&format!("a-{}", ids.len()), "true")).await {
            Ok(job) => ids.push(job.job.unwrap().id),
            Err(status) => break status,
        }
        assert!(ids.len() < 20, "never refused");
    };
    assert!(ids.len() >= 3, "refused within the burst: {status:?}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("tenant team-a submits more than 1 a second (bursts of 3)"),
        "{status:?}"
    );
    // More refusals in a row: answered at once, and audited together, one entry per caller
    // and second saying how many.
    let refusals = 1 + submit_counting_refusals(&a, "again", 5).await;
    let a_subject = who_am_i(&a).await.unwrap().subject;
    wait_for("the refusals in the audit log", DEADLINE, || {
        let mut access = system.access.clone();
        let a_subject = a_subject.clone();
        async move {
            let events = access
                .list_audit_events(pb::ListAuditEventsRequest {
                    tenant: "team-a".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .events;
            let counted: u64 = events
                .iter()
                .filter(|e| {
                    e.action == "SubmitJob"
                        && e.outcome == "ResourceExhausted"
                        && e.subject == a_subject
                })
                .map(|e| refused_calls(&e.detail))
                .sum();
            (counted == refusals).then_some(())
        }
    })
    .await
    .unwrap();
    submit(&b, shell_job("b-0", "true")).await.unwrap();

    // No agent: the jobs stay queued and their watches open.
    let watch = |clients: &Clients, id: &str| {
        let mut jobs = clients.jobs.clone();
        let id = id.to_owned();
        async move {
            jobs.watch_job(pb::WatchJobRequest {
                job_id: id,
                from_seq: 0,
            })
            .await
        }
    };
    let first = watch(&a, &ids[0]).await.unwrap();
    let _second = watch(&a, &ids[1]).await.unwrap();
    let status = watch(&a, &ids[2]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("2 streams open (limit 2)"),
        "{status:?}"
    );
    assert!(refused(&system, "resource_exhausted").await >= 2.0);
    let b_jobs = list_jobs(&b, "").await.unwrap();
    let _b_watch = watch(&b, &b_jobs[0].id).await.unwrap();
    // A stream the client drops gives its place back.
    drop(first);
    wait_for("a freed stream to be reusable", DEADLINE, || async {
        watch(&a, &ids[2]).await.ok()
    })
    .await
    .unwrap();
    system.stop().await;
}

/// A refused call whose message repeats a NUL character the caller sent is audited with the
/// character replaced: PostgreSQL refuses NUL in text, and the audit log is written many
/// entries to a statement, so the entry would have failed itself and every entry beside it.
/// A cancel's reason is bounded and may not hold one at all: it travels to the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn input_with_a_nul_character_is_refused_or_audited_without_it() {
    let system = TestSystem::start(&agent()).await.unwrap();
    let a = system
        .clients(Some(
            &system.token("team-a", Role::Submitter).await.unwrap(),
        ))
        .unwrap();
    let mut spec = shell_job("nul-env", "true");
    spec.env.insert("A\0B".into(), "1".into());
    let refused = submit(&a, spec).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    for reason in ["a\0b".to_owned(), "x".repeat(1025)] {
        let cancel = a
            .jobs
            .clone()
            .cancel_job(pb::CancelJobRequest {
                job_id: uuid::Uuid::now_v7().to_string(),
                reason,
            })
            .await
            .unwrap_err();
        assert_eq!(cancel.code(), Code::InvalidArgument, "{cancel:?}");
        assert!(cancel.message().starts_with("reason: "), "{cancel:?}");
    }
    let drain = system
        .workers
        .clone()
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: "access-agent".into(),
            reason: "a\0b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(drain.code(), Code::InvalidArgument, "{drain:?}");

    // The refused submission is in the audit log, its detail with U+FFFD for the NUL.
    let events = system
        .access
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    let entry = events
        .iter()
        .find(|e| e.action == "SubmitJob" && e.outcome == "InvalidArgument")
        .unwrap_or_else(|| panic!("no refused SubmitJob in {events:#?}"));
    assert!(
        entry.detail.contains("env.A\u{FFFD}B") && !entry.detail.contains('\0'),
        "{entry:?}"
    );
    system.stop().await;
}

/// A stream lasts as long as its credential: a log follow opened with a token ends with
/// UNAUTHENTICATED once the token is revoked, while the job still runs and prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ends_when_its_token_is_revoked() {
    let system = TestSystem::start(&agent()).await.unwrap();
    let created = api_token(&system, "follower", "viewer", 0).await;
    let viewer = system.clients(Some(&created.secret)).unwrap();
    let submitter = system
        .clients(Some(
            &system.token("team-a", Role::Submitter).await.unwrap(),
        ))
        .unwrap();
    let job = submit(
        &submitter,
        shell_job(
            "prints-on",
            "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done",
        ),
    )
    .await
    .unwrap()
    .job
    .unwrap();
    let mut lines = viewer
        .jobs
        .clone()
        .stream_logs(pb::StreamLogsRequest {
            job_id: job.id.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The follow works: lines arrive.
    let first = tokio::time::timeout(DEADLINE, lines.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.text.starts_with("tick"), "{first:?}");

    system
        .access
        .clone()
        .revoke_token(pb::RevokeTokenRequest {
            token_id: created.token.unwrap().id,
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match lines.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .unwrap()
    .expect("the stream ends with a status");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    submitter
        .jobs
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id,
            reason: String::new(),
        })
        .await
        .unwrap();
    system.stop().await;
}
