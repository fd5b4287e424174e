//! Scheduling policy on the real system (gateway, schedulers, registry and agents running real
//! processes): global priority across the whole queue, per-tenant quotas, and fair share by
//! weight. Every claim is checked against a ledger the jobs write themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use hodei_proto::v1 as pb;
use hodei_proto::v1::tenant_service_client::TenantServiceClient;
use hodei_system_tests::shell_job;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem};
use hodei_test_support::{http_get, wait_for};

const DEADLINE: Duration = Duration::from_secs(120);

fn tenants(system: &TestSystem) -> TenantServiceClient<hodei_proto::AuthChannel> {
    system.clients(Some(&system.admin_token)).unwrap().tenants
}

/// A job that appends `<name> start <time>` and `<name> end <time>` to `ledger` around
/// `work` (shell).
fn ledger_job(ledger: &Path, name: &str, work: &str) -> pb::JobSpec {
    let ledger = ledger.display();
    shell_job(
        name,
        &format!(
            "echo \"{name} start $(date +%s.%N)\" >> {ledger}; {work}; echo \"{name} end $(date +%s.%N)\" >> {ledger}"
        ),
    )
}

/// A shell loop that waits until `file` exists (the job's own condition, not a sleep of the
/// test).
fn wait_for_file(file: &Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.02; done", file.display())
}

/// Submits `specs` for `tenant` with 16 calls in flight; returns the jobs in order.
async fn submit_all(system: &TestSystem, tenant: &str, specs: Vec<pb::JobSpec>) -> Vec<pb::Job> {
    futures::stream::iter(specs)
        .map(|spec| {
            let mut jobs = system.jobs.clone();
            let tenant = tenant.to_owned();
            async move {
                jobs.submit_job(pb::SubmitJobRequest {
                    spec: Some(spec),
                    tenant,
                })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
            }
        })
        .buffered(16)
        .collect()
        .await
}

/// The ledger's lines as (name, event, time).
fn read_ledger(ledger: &Path) -> Vec<(String, String, f64)> {
    std::fs::read_to_string(ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            Some((
                parts.next()?.to_owned(),
                parts.next()?.to_owned(),
                parts.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The first jobs to start, in the ledger's order, are `first`.
fn assert_first_starts<const N: usize>(ledger: &Path, first: [&str; N]) {
    let starts: Vec<String> = read_ledger(ledger)
        .into_iter()
        .filter(|(_, event, _)| event == "start")
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(
        starts.get(..N),
        Some(&first.map(str::to_owned)[..]),
        "the first starts were {:?}",
        starts.iter().take(N + 3).collect::<Vec<_>>()
    );
}

async fn one_agent_system(slots: u32, schedulers: usize) -> TestSystem {
    TestSystem::start_with(
        &[AgentSpec {
            id: "policy-agent",
            labels: "",
            slots,
        }],
        SystemOptions {
            schedulers,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_priority_1000_job_behind_5000_queued_jobs_starts_next() {
    // Two scheduler replicas share the requests, so neither holds the whole queue.
    let system = one_agent_system(1, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let release = dir.path().join("release");
    let blocker = system
        .submit(ledger_job(&ledger, "blocker", &wait_for_file(&release)))
        .await
        .unwrap();
    system
        .wait_job(&blocker.id, "to run", DEADLINE, |s| {
            s == pb::JobState::Running
        })
        .await
        .unwrap();
    let low: Vec<pb::JobSpec> = (0..5000)
        .map(|i| ledger_job(&ledger, &format!("low-{i}"), "true"))
        .collect();
    submit_all(&system, "", low).await;
    let mut high = ledger_job(&ledger, "high", "true");
    high.priority = 1000;
    let high = system.submit(high).await.unwrap();
    std::fs::write(&release, b"").unwrap();
    let done = system.wait_terminal(&high.id, DEADLINE).await.unwrap();
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert_first_starts(&ledger, ["blocker", "high"]);
    system.stop().await;
}

/// `refused` is the answer of team-q's queue quota of 2, naming it.
fn assert_over_queue_quota(refused: &tonic::Status) {
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("max_queued_jobs (2 of 2 queued)"),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_at_its_quotas_waits_or_is_refused_and_says_why() {
    let system = one_agent_system(4, 1).await;
    let mut admin = tenants(&system);
    admin
        .set_tenant_policy(pb::SetTenantPolicyRequest {
            tenant: "team-q".into(),
            policy: Some(pb::TenantPolicy {
                weight: 1,
                max_running_jobs: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let release = dir.path().join("release");
    let specs = (0..3)
        .map(|i| ledger_job(&ledger, &format!("q-{i}"), &wait_for_file(&release)))
        .collect();
    let jobs = submit_all(&system, "team-q", specs).await;

    // One runs; the two others stay queued although the worker has 3 free slots, saying which
    // quota holds them.
    let held = wait_for("two jobs held by the running quota", DEADLINE, || {
        let system = &system;
        let jobs = &jobs;
        async move {
            let mut running = 0;
            let mut held = Vec::new();
            for job in jobs {
                let job = system.get_job(&job.id).await.ok()?;
                match job.state() {
                    pb::JobState::Running => running += 1,
                    pb::JobState::Queued if job.reason.contains("max_running_jobs") => {
                        held.push(job.reason)
                    }
                    _ => {}
                }
            }
            (running == 1 && held.len() == 2).then_some(held)
        }
    })
    .await
    .unwrap();
    assert!(
        held[0].contains("tenant team-q") && held[0].contains("(1 of 1 in use)"),
        "{held:?}"
    );
    let worker = system
        .workers
        .clone()
        .get_worker(pb::GetWorkerRequest {
            worker_id: "policy-agent".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert_eq!(worker.held.len(), 1, "the worker holds one attempt only");

    // With a queue quota of 2 and two queued, a third is refused, naming the quota; other
    // tenants still submit.
    admin
        .set_tenant_policy(pb::SetTenantPolicyRequest {
            tenant: "team-q".into(),
            policy: Some(pb::TenantPolicy {
                weight: 1,
                max_running_jobs: Some(1),
                max_queued_jobs: Some(2),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let refused = system
        .jobs
        .clone()
        .submit_job(pb::SubmitJobRequest {
            spec: Some(shell_job("q-over", "true")),
            tenant: "team-q".into(),
        })
        .await
        .unwrap_err();
    assert_over_queue_quota(&refused);
    // A pipeline run is refused the same way, and nothing of it is recorded.
    let step = pb::PipelineStep {
        name: "only".into(),
        job: Some(shell_job("", "true")),
        ..Default::default()
    };
    let refused = system
        .pipelines
        .clone()
        .submit_pipeline(pb::SubmitPipelineRequest {
            spec: Some(pb::PipelineSpec {
                name: "q-run".into(),
                steps: vec![step],
                ..Default::default()
            }),
            tenant: "team-q".into(),
        })
        .await
        .unwrap_err();
    assert_over_queue_quota(&refused);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pipeline_runs")
        .fetch_one(&system.database.connect().await.unwrap())
        .await
        .unwrap();
    assert_eq!(runs, 0, "a refused run is not recorded");
    let other = system.submit(shell_job("other", "true")).await.unwrap();
    let other = system.wait_terminal(&other.id, DEADLINE).await.unwrap();
    assert_eq!(other.state(), pb::JobState::Succeeded);

    // The view shows the tenant's usage against its quotas.
    let view = admin
        .get_tenant(pb::GetTenantRequest {
            tenant: "team-q".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!((view.running_jobs, view.queued_jobs), (1, 2), "{view:?}");
    assert_eq!(view.policy.unwrap().max_running_jobs, Some(1));

    // Released, all three run, never two at once.
    std::fs::write(&release, b"").unwrap();
    for job in &jobs {
        let done = system.wait_terminal(&job.id, DEADLINE).await.unwrap();
        assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    }
    let mut running = 0;
    let mut most = 0;
    for (_, event, _) in read_ledger(&ledger) {
        running += if event == "start" { 1 } else { -1 };
        most = most.max(running);
    }
    assert_eq!(most, 1, "team-q ran more than its quota at once");

    // The tenant's own submitter may not change its policy; a weight out of range is named.
    let viewer = system
        .token("team-q", hodei_domain::Role::Submitter)
        .await
        .unwrap();
    let mut as_submitter = system.clients(Some(&viewer)).unwrap().tenants;
    let denied = as_submitter
        .set_tenant_policy(pb::SetTenantPolicyRequest {
            tenant: "team-q".into(),
            policy: Some(pb::TenantPolicy::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let bad = admin
        .set_tenant_policy(pb::SetTenantPolicyRequest {
            tenant: "team-q".into(),
            policy: Some(pb::TenantPolicy {
                weight: 20_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("weight"), "{}", bad.message());
    system.stop().await;
}

/// Each job's start and end in the ledger, by name.
fn spans(ledger: &Path) -> HashMap<String, (f64, f64)> {
    let mut spans: HashMap<String, (f64, f64)> = HashMap::new();
    for (name, event, at) in read_ledger(ledger) {
        let span = spans.entry(name).or_insert((f64::NAN, f64::NAN));
        if event == "start" {
            span.0 = at;
        } else {
            span.1 = at;
        }
    }
    spans
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tenants_share_a_small_fleet_by_weight() {
    const SMALL_JOBS: usize = 15;
    const JOB_SLEEP: &str = "sleep 0.8";
    let system = TestSystem::start_with(
        &[
            AgentSpec {
                id: "fair-a",
                labels: "",
                slots: 2,
            },
            AgentSpec {
                id: "fair-b",
                labels: "",
                slots: 2,
            },
        ],
        SystemOptions::default(),
    )
    .await
    .unwrap();
    let mut admin = tenants(&system);
    for (tenant, weight) in [("big", 1), ("small", 3)] {
        admin
            .set_tenant_policy(pb::SetTenantPolicyRequest {
                tenant: tenant.into(),
                policy: Some(pb::TenantPolicy {
                    weight,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    // Jobs long beside the scheduler's view of the tenants' usage, read again every half
    // second (its own placements are charged at once, ends only at the next read), and beside
    // the delays of a loaded machine: a share is a proportion of many starts.
    let big: Vec<pb::JobSpec> = (0..1000)
        .map(|i| ledger_job(&ledger, &format!("big-{i}"), JOB_SLEEP))
        .collect();
    submit_all(&system, "big", big).await;
    // The big tenant holds the whole fleet before the small one asks for any of it.
    wait_for("the big tenant to fill the fleet", DEADLINE, || async {
        let running = spans(&ledger)
            .values()
            .filter(|(start, end)| start.is_finite() && end.is_nan())
            .count();
        (running == 4).then_some(())
    })
    .await
    .unwrap();
    let small: Vec<pb::JobSpec> = (0..SMALL_JOBS)
        .map(|i| ledger_job(&ledger, &format!("small-{i}"), JOB_SLEEP))
        .collect();
    let small = submit_all(&system, "small", small).await;

    // The scheduler's view names both tenants with their weights' entitlement.
    let view = wait_for("both tenants in the view", DEADLINE, || {
        let mut admin = admin.clone();
        async move {
            let tenants = admin
                .list_tenants(pb::ListTenantsRequest {})
                .await
                .ok()?
                .into_inner()
                .tenants;
            let small = tenants.iter().find(|t| t.tenant == "small")?.clone();
            let big = tenants.iter().find(|t| t.tenant == "big")?.clone();
            (small.running_jobs > 0).then_some((small, big))
        }
    })
    .await
    .unwrap();
    assert!(
        (view.0.entitled_share - 0.75).abs() < 1e-9,
        "small is entitled to 3/4: {view:?}"
    );
    assert!(view.1.queued_jobs > 0, "{view:?}");

    for job in &small {
        let done = system.wait_terminal(&job.id, DEADLINE).await.unwrap();
        assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    }
    // Over the time the small tenant had work (its first start to its last start), count the
    // starts of each tenant: weights 3 to 1 on 4 slots give it 3 slots of 4, so about 3/4 of
    // the starts, less the first turn while the big tenant's jobs end.
    let spans = spans(&ledger);
    let small_starts: Vec<f64> = spans
        .iter()
        .filter(|(name, _)| name.starts_with("small-"))
        .map(|(_, (start, _))| *start)
        .collect();
    assert_eq!(small_starts.len(), SMALL_JOBS);
    let first = small_starts.iter().copied().fold(f64::INFINITY, f64::min);
    let last = small_starts
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let big_starts = spans
        .iter()
        .filter(|(name, (start, _))| name.starts_with("big-") && *start >= first && *start <= last)
        .count();
    let share = SMALL_JOBS as f64 / (SMALL_JOBS + big_starts) as f64;
    assert!(
        (0.6..=0.9).contains(&share),
        "the small tenant's share of the starts was {share:.2} ({SMALL_JOBS} against {big_starts}); \
         its weight entitles it to 0.75 ± 0.15"
    );
    assert!(
        big_starts >= 1,
        "the big tenant made no progress while the small one ran"
    );
    // The scheduler exports each tenant's share.
    let metrics = http_get(system.metrics_addr("scheduler").unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics
            .body
            .contains("hodei_tenant_entitled_share{tenant=\"small\"}"),
        "{}",
        metrics.body
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_job_of_a_higher_priority_preempts_a_preemptible_one() {
    let system = one_agent_system(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let release = dir.path().join("release");
    // One attempt only: a preemption must not spend it.
    let mut low = ledger_job(&ledger, "low", &wait_for_file(&release));
    low.preemptible = true;
    low.max_attempts = 1;
    let low = system.submit(low).await.unwrap();
    system
        .wait_job(&low.id, "to run", DEADLINE, |s| s == pb::JobState::Running)
        .await
        .unwrap();
    let mut high = ledger_job(&ledger, "high", "true");
    high.priority = 100;
    let high = system.submit(high).await.unwrap();
    let high = system.wait_terminal(&high.id, DEADLINE).await.unwrap();
    assert_eq!(high.state(), pb::JobState::Succeeded, "{high:?}");

    // The preempted job runs again, as a second attempt, and succeeds.
    let second = system
        .wait_job(&low.id, "to run again", DEADLINE, |s| {
            s == pb::JobState::Running
        })
        .await
        .unwrap();
    std::fs::write(&release, b"").unwrap();
    let low = system.wait_terminal(&low.id, DEADLINE).await.unwrap();
    assert_eq!(low.state(), pb::JobState::Succeeded, "{low:?}");
    assert_eq!(low.attempts.len(), 2, "{low:?}");
    assert_eq!(second.attempts.len(), 2, "{second:?}");
    assert_eq!(
        low.attempts[0]
            .outcome
            .as_ref()
            .and_then(|o| o.kind.clone()),
        Some(pb::attempt_outcome::Kind::Preempted(high.id.clone())),
        "{low:?}"
    );
    // What ran: low (stopped, no end), then high from start to end, then low again; never two
    // at once on the one slot.
    let lines: Vec<String> = read_ledger(&ledger)
        .into_iter()
        .map(|(name, event, _)| format!("{name} {event}"))
        .collect();
    assert_eq!(
        lines,
        [
            "low start",
            "high start",
            "high end",
            "low start",
            "low end"
        ],
        "{lines:?}"
    );
    let history = system
        .jobs
        .clone()
        .get_job_history(pb::GetJobHistoryRequest {
            job_id: low.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let reasons: Vec<&str> = history.events.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("preempted by job {}", high.id))),
        "{reasons:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_s_max_priority_neither_jumps_the_queue_nor_preempts() {
    let system = one_agent_system(1, 1).await;
    let mut admin = tenants(&system);
    let capped_at = |max_priority| pb::SetTenantPolicyRequest {
        tenant: "capped".into(),
        policy: Some(pb::TenantPolicy {
            weight: 1,
            max_priority: Some(max_priority),
            ..Default::default()
        }),
    };
    let refused = admin.set_tenant_policy(capped_at(1001)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("max_priority"), "{refused:?}");
    let set = admin
        .set_tenant_policy(capped_at(0))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(set.policy.unwrap().max_priority, Some(0));

    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let release = dir.path().join("release");
    // Another tenant's preemptible job of priority 0 holds the one slot.
    let mut victim = ledger_job(&ledger, "victim", &wait_for_file(&release));
    victim.preemptible = true;
    let victim = submit_all(&system, "others", vec![victim]).await.remove(0);
    system
        .wait_job(&victim.id, "to run", DEADLINE, |s| {
            s == pb::JobState::Running
        })
        .await
        .unwrap();
    // The capped tenant asks for 1000 and counts with 0: not above the victim's 0. Then a job
    // of priority 5 comes: it is the one the victim is stopped for, and the first to run.
    let mut greedy = ledger_job(&ledger, "greedy", "true");
    greedy.priority = 1000;
    let greedy = submit_all(&system, "capped", vec![greedy]).await.remove(0);
    let mut urgent = ledger_job(&ledger, "urgent", "true");
    urgent.priority = 5;
    let urgent = submit_all(&system, "others", vec![urgent]).await.remove(0);
    let urgent = system.wait_terminal(&urgent.id, DEADLINE).await.unwrap();
    assert_eq!(urgent.state(), pb::JobState::Succeeded, "{urgent:?}");
    std::fs::write(&release, b"").unwrap();
    for id in [&greedy.id, &victim.id] {
        let done = system.wait_terminal(id, DEADLINE).await.unwrap();
        assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    }
    let victim = system.get_job(&victim.id).await.unwrap();
    assert_eq!(
        victim.attempts[0]
            .outcome
            .as_ref()
            .and_then(|o| o.kind.clone()),
        Some(pb::attempt_outcome::Kind::Preempted(urgent.id.clone())),
        "{victim:?}"
    );
    let greedy = system.get_job(&greedy.id).await.unwrap();
    assert_eq!(
        greedy.spec.unwrap().priority,
        1000,
        "it keeps what it asked for"
    );
    assert_first_starts(&ledger, ["victim", "urgent"]);
    system.stop().await;
}
