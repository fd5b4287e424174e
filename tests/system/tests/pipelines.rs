//! Pipelines end to end: real services, a private nats-server, a fresh database and real
//! processes on real agents. DAG order with parallel branches, failure and `always` steps,
//! fail-fast, matrices, cancel, validation with paths, idempotency, and a scheduler replica
//! crashing in the middle of a run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem};
use hodei_test_support::wait_for;

const TWO_AGENTS: &[AgentSpec] = &[
    AgentSpec {
        id: "pipe-agent-1",
        labels: "os=linux",
        slots: 1,
    },
    AgentSpec {
        id: "pipe-agent-2",
        labels: "os=linux",
        slots: 1,
    },
];

fn step(name: &str, needs: &[&str], script: &str) -> pb::PipelineStep {
    pb::PipelineStep {
        name: name.to_owned(),
        needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        job: Some(pb::JobSpec {
            command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: vec!["/bin/sh".into(), "-c".into()],
                script: script.to_owned(),
            })),
            timeout_secs: 120,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn when(mut s: pb::PipelineStep, w: pb::When) -> pb::PipelineStep {
    s.when = w.into();
    s
}

fn pipeline(name: &str, steps: Vec<pb::PipelineStep>) -> pb::PipelineSpec {
    pb::PipelineSpec {
        name: name.to_owned(),
        steps,
        ..Default::default()
    }
}

async fn get(system: &TestSystem, id: &str) -> pb::PipelineRun {
    system
        .pipelines
        .clone()
        .get_pipeline_run(pb::GetPipelineRunRequest {
            run_id: id.to_owned(),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
}

fn is_terminal(state: i32) -> bool {
    [
        pb::PipelineState::Succeeded,
        pb::PipelineState::Failed,
        pb::PipelineState::Cancelled,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

/// Polls run `id` until `pick` finds what it waits for in it.
async fn wait_run_until<T>(
    system: &TestSystem,
    id: &str,
    what: &str,
    deadline: Duration,
    pick: impl Fn(pb::PipelineRun) -> Option<T>,
) -> T {
    let client = system.pipelines.clone();
    wait_for(&format!("pipeline run {id}: {what}"), deadline, || {
        let mut client = client.clone();
        let id = id.to_owned();
        let pick = &pick;
        async move {
            let run = client
                .get_pipeline_run(pb::GetPipelineRunRequest {
                    run_id: id,
                    as_of: None,
                })
                .await
                .ok()?
                .into_inner()
                .run?;
            pick(run)
        }
    })
    .await
    .unwrap()
}

async fn wait_run(system: &TestSystem, id: &str, deadline: Duration) -> pb::PipelineRun {
    wait_run_until(system, id, "to end", deadline, |run| {
        is_terminal(run.state).then_some(run)
    })
    .await
}

/// Waits until step `name` of run `id` is in `state`.
async fn wait_step(system: &TestSystem, id: &str, name: &str, state: pb::StepState) -> pb::StepRun {
    let what = format!("step {name} to be {state:?}");
    wait_run_until(system, id, &what, Duration::from_secs(60), |run| {
        run.steps
            .into_iter()
            .find(|s| s.name == name && s.state == state as i32)
    })
    .await
}

fn steps(run: &pb::PipelineRun) -> HashMap<String, pb::StepRun> {
    run.steps
        .iter()
        .map(|s| (s.name.clone(), s.clone()))
        .collect()
}

fn state(s: &pb::StepRun) -> pb::StepState {
    pb::StepState::try_from(s.state).unwrap()
}

fn secs(t: &Option<prost_types::Timestamp>) -> f64 {
    let t = t.as_ref().unwrap();
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diamond_runs_in_order_with_its_branches_in_parallel_on_two_agents() {
    let system = TestSystem::start(TWO_AGENTS).await.unwrap();
    // b and c each wait until the other has started (a file each), so they can only succeed
    // if they run at the same time.
    let dir = tempfile::tempdir().unwrap();
    let mark = |name: &str| dir.path().join(name).display().to_string();
    let branch = |me: &str, other: &str| {
        format!(
            "touch {me}; i=0; while [ ! -e {other} ]; do i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.05; done",
            me = mark(me),
            other = mark(other)
        )
    };
    let run = system
        .submit_pipeline(pipeline(
            "diamond",
            vec![
                step("a", &[], "echo a"),
                step("b", &["a"], &branch("b", "c")),
                step("c", &["a"], &branch("c", "b")),
                step("d", &["b", "c"], "echo d"),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(run.steps.len(), 4);
    let run = wait_run(&system, &run.id, Duration::from_secs(90)).await;
    assert_eq!(run.state, pb::PipelineState::Succeeded as i32, "{run:#?}");
    let s = steps(&run);
    for name in ["a", "b", "c", "d"] {
        assert_eq!(
            state(&s[name]),
            pb::StepState::Succeeded,
            "{name}: {:?}",
            s[name]
        );
        assert_eq!(s[name].attempts.len(), 1);
    }
    // Dependency order: a ended before b and c started; d started after both ended.
    assert!(secs(&s["a"].finished_at) <= secs(&s["b"].queued_at));
    assert!(secs(&s["a"].finished_at) <= secs(&s["c"].queued_at));
    assert!(secs(&s["d"].queued_at) >= secs(&s["b"].finished_at));
    assert!(secs(&s["d"].queued_at) >= secs(&s["c"].finished_at));
    // b and c ran at once, on the two agents (each has one slot).
    assert_ne!(s["b"].attempts[0].worker_id, s["c"].attempts[0].worker_id);
    system.stop().await;
}

/// A run whose steps' output tails add up to more than a gRPC client reads (4 MiB) is still
/// answered whole: the tails that matter least are left out and marked, the failed step keeps
/// its tail, and the job's history still has every tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_larger_than_an_answer_is_answered_with_tails_left_out() {
    let system = TestSystem::start(&[AgentSpec {
        id: "pipe-agent-wide",
        labels: "os=linux",
        slots: 8,
    }])
    .await
    .unwrap();
    // 64 steps of 20 lines of 4,000 bytes each: 5 MB of tails. The last one, after all the
    // others, fails.
    let loud = "for i in $(seq 20); do printf '%04000d\\n' \"$i\"; done";
    let mut spec: Vec<_> = (0..63)
        .map(|i| step(&format!("loud-{i:02}"), &[], loud))
        .collect();
    let names: Vec<String> = spec.iter().map(|s| s.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    spec.push(step("broken", &names, &format!("{loud}; exit 1")));
    let run = system
        .submit_pipeline(pipeline("loud", spec))
        .await
        .unwrap();
    let run = wait_run(&system, &run.id, Duration::from_secs(120)).await;
    assert_eq!(run.state, pb::PipelineState::Failed as i32);
    use prost::Message as _;
    assert!(
        run.encoded_len() <= 4 * 1024 * 1024,
        "{}",
        run.encoded_len()
    );
    let s = steps(&run);
    let broken = &s["broken"].attempts[0];
    assert_eq!(
        (broken.output_tail.len(), broken.output_tail_omitted),
        (20, false)
    );
    let cut: Vec<_> = run
        .steps
        .iter()
        .filter(|s| s.attempts[0].output_tail_omitted)
        .collect();
    assert!(!cut.is_empty() && cut.len() < 63, "{}", cut.len());
    assert!(cut.iter().all(|s| s.attempts[0].output_tail.is_empty()));
    assert!(run.steps.iter().all(|s| s.attempts_omitted == 0));
    // The list gives the same run, cut the same way.
    let listed = system
        .pipelines
        .clone()
        .list_pipeline_runs(pb::ListPipelineRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    assert_eq!(listed.runs[0].steps, run.steps);
    // The history of a cut step's job has its tail.
    let history = system
        .jobs
        .clone()
        .get_job_history(pb::GetJobHistoryRequest {
            job_id: cut[0].job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tail = format!("{:04000}", 20);
    assert!(
        history.events.iter().any(|e| e.data.contains(&tail)),
        "{:?}",
        history.events.iter().map(|e| &e.r#type).collect::<Vec<_>>()
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_skips_dependants_runs_always_steps_and_fail_fast_cancels_siblings() {
    let system = TestSystem::start(TWO_AGENTS).await.unwrap();

    let failing = system
        .submit_pipeline(pipeline(
            "failing",
            vec![
                step("build", &[], "exit 3"),
                step("deploy", &["build"], "echo deploy"),
                when(
                    step("cleanup", &["deploy"], "echo cleanup"),
                    pb::When::Always,
                ),
                when(
                    step("notify", &["build"], "echo notify"),
                    pb::When::OnFailure,
                ),
            ],
        ))
        .await
        .unwrap();
    let run = wait_run(&system, &failing.id, Duration::from_secs(60)).await;
    assert_eq!(run.state, pb::PipelineState::Failed as i32, "{run:#?}");
    let s = steps(&run);
    assert_eq!(state(&s["build"]), pb::StepState::Failed);
    assert_eq!(
        s["build"].attempts[0].outcome,
        Some(pb::AttemptOutcome {
            kind: Some(pb::attempt_outcome::Kind::Exited(3)),
        })
    );
    assert_eq!(state(&s["deploy"]), pb::StepState::Skipped);
    assert!(
        s["deploy"].reason.contains("build failed"),
        "{}",
        s["deploy"].reason
    );
    assert_eq!(state(&s["cleanup"]), pb::StepState::Succeeded);
    assert_eq!(state(&s["notify"]), pb::StepState::Succeeded);

    let mut spec = pipeline(
        "fail-fast",
        vec![
            step("lint", &[], "sleep 0.3; exit 1"),
            step("test", &[], "sleep 60"),
            step("publish", &["lint", "test"], "echo publish"),
        ],
    );
    spec.fail_fast = true;
    let fast = system.submit_pipeline(spec).await.unwrap();
    wait_step(&system, &fast.id, "test", pb::StepState::Running).await;
    // The sibling is stopped through the cancel path (SIGTERM to its process group).
    let run = wait_run(&system, &fast.id, Duration::from_secs(30)).await;
    assert_eq!(run.state, pb::PipelineState::Failed as i32, "{run:#?}");
    let s = steps(&run);
    assert_eq!(state(&s["lint"]), pb::StepState::Failed);
    assert_eq!(
        state(&s["test"]),
        pb::StepState::Cancelled,
        "{:?}",
        s["test"]
    );
    assert_eq!(state(&s["publish"]), pb::StepState::Cancelled);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_matrix_expands_into_jobs_with_their_values() {
    let mut system = TestSystem::start(TWO_AGENTS).await.unwrap();
    let mut test = step("test", &["build"], "echo \"$MATRIX_OS/$MATRIX_VERSION\"");
    test.matrix = [
        (
            "os".to_owned(),
            pb::MatrixValues {
                values: vec!["linux".into(), "mac".into()],
            },
        ),
        (
            "version".to_owned(),
            pb::MatrixValues {
                values: vec!["1".into(), "2".into()],
            },
        ),
    ]
    .into();
    let run = system
        .submit_pipeline(pipeline(
            "matrix",
            vec![
                step("build", &[], "true"),
                test,
                step("ship", &["test"], "true"),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(run.steps.len(), 6);
    let run = wait_run(&system, &run.id, Duration::from_secs(90)).await;
    assert_eq!(run.state, pb::PipelineState::Succeeded as i32, "{run:#?}");
    let s = steps(&run);
    let one = &s["test[os=mac,version=2]"];
    assert_eq!(one.base, "test");
    assert_eq!(s["ship"].needs.len(), 4);
    // The combination's values reached the process.
    let mut logs = system
        .jobs
        .stream_logs(pb::StreamLogsRequest {
            job_id: one.job_id.clone(),
            from_sequence: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(line) = logs.message().await.unwrap() {
        text.push(line.text);
    }
    assert_eq!(text, ["mac/2"]);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_running_steps_cancels_waiting_ones_and_still_runs_always_steps() {
    let system = TestSystem::start(TWO_AGENTS).await.unwrap();
    let run = system
        .submit_pipeline(pipeline(
            "cancelled",
            vec![
                step("long", &[], "sleep 60"),
                step("after", &["long"], "echo never"),
                when(
                    step("cleanup", &["after"], "echo cleanup"),
                    pb::When::Always,
                ),
            ],
        ))
        .await
        .unwrap();
    wait_step(&system, &run.id, "long", pb::StepState::Running).await;
    system
        .pipelines
        .clone()
        .cancel_pipeline_run(pb::CancelPipelineRunRequest {
            run_id: run.id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let run = wait_run(&system, &run.id, Duration::from_secs(30)).await;
    assert_eq!(run.state, pb::PipelineState::Cancelled as i32, "{run:#?}");
    let s = steps(&run);
    assert_eq!(state(&s["long"]), pb::StepState::Cancelled);
    assert_eq!(state(&s["after"]), pb::StepState::Cancelled);
    assert_eq!(state(&s["cleanup"]), pb::StepState::Succeeded);
    // A run that ended cannot be cancelled again.
    let again = system
        .pipelines
        .clone()
        .cancel_pipeline_run(pb::CancelPipelineRunRequest {
            run_id: run.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_pipelines_are_refused_with_paths_and_submissions_are_idempotent() {
    let system = TestSystem::start(&[]).await.unwrap();
    let mut bad_job = step("b", &["nope"], "true");
    bad_job.job.as_mut().unwrap().timeout_secs = 10_000_000;
    let err = system
        .submit_pipeline(pipeline(
            "bad",
            vec![
                step("a", &["c"], "true"),
                bad_job,
                step("c", &["a"], "true"),
                step("a", &[], "true"),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for path in [
        "steps.b.needs[0]: unknown step 'nope'",
        "steps.b.timeout_secs",
        "steps[3].name: duplicate step name 'a'",
        "cycle: a -> c -> a",
    ] {
        assert!(
            err.message().contains(path),
            "{path} not in {}",
            err.message()
        );
    }

    let mut spec = pipeline("once", vec![step("only", &[], "true")]);
    spec.idempotency_key = "pipeline-key-1".into();
    let first = system.submit_pipeline(spec.clone()).await.unwrap();
    let second = system.submit_pipeline(spec).await.unwrap();
    assert_eq!(first.id, second.id);
    let listed = system
        .pipelines
        .clone()
        .list_pipeline_runs(pb::ListPipelineRunsRequest {
            name_prefix: "once".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    assert_eq!(get(&system, &first.id).await.spec.unwrap().name, "once");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_survives_the_crash_of_the_scheduler_that_drives_it() {
    let options = SystemOptions {
        schedulers: 2,
        ack_wait_ms: 2_000,
        ..SystemOptions::default()
    };
    let mut system = TestSystem::start_with(TWO_AGENTS, options).await.unwrap();
    let chain: Vec<pb::PipelineStep> = (0..6)
        .map(|i| {
            let needs = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            let refs: Vec<&str> = needs.iter().map(String::as_str).collect();
            step(&format!("s{i}"), &refs, "sleep 0.3")
        })
        .collect();
    let run = system
        .submit_pipeline(pipeline("chain", chain))
        .await
        .unwrap();
    wait_step(&system, &run.id, "s1", pb::StepState::Running).await;
    // Replica 0 dies mid-run, without a goodbye: whatever it held is redelivered to the other.
    system.crash_scheduler(0);
    let run = wait_run(&system, &run.id, Duration::from_secs(90)).await;
    assert_eq!(run.state, pb::PipelineState::Succeeded as i32, "{run:#?}");
    let s = steps(&run);
    for i in 1..6 {
        assert!(
            secs(&s[&format!("s{i}")].queued_at) >= secs(&s[&format!("s{}", i - 1)].finished_at)
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_artifact_made_on_one_agent_is_read_on_another_with_its_checksum() {
    let system = TestSystem::start(&[
        AgentSpec {
            id: "art-builder",
            labels: "role=build",
            slots: 1,
        },
        AgentSpec {
            id: "art-tester",
            labels: "role=test",
            slots: 1,
        },
    ])
    .await
    .unwrap();
    let on = |mut s: pb::PipelineStep, role: &str| {
        s.job
            .as_mut()
            .unwrap()
            .required_labels
            .insert("role".into(), role.into());
        s
    };
    let mut build = on(
        step(
            "build",
            &[],
            "mkdir -p dist/sub && head -c 200000 /dev/urandom > dist/app.bin \
             && echo hello > dist/sub/notes.txt && sha256sum dist/app.bin > app.sha",
        ),
        "build",
    );
    build.artifacts = Some(pb::StepArtifacts {
        produce: vec!["dist".into(), "*.sha".into()],
        consume: vec![],
    });
    let mut check = on(
        step(
            "check",
            &["build"],
            "sha256sum -c app.sha && cat dist/sub/notes.txt",
        ),
        "test",
    );
    check.artifacts = Some(pb::StepArtifacts {
        produce: vec![],
        consume: vec!["build".into()],
    });
    let mut empty = step("empty", &[], "true");
    empty.artifacts = Some(pb::StepArtifacts {
        produce: vec!["nothing/*".into()],
        consume: vec![],
    });
    let run = system
        .submit_pipeline(pipeline("artifacts", vec![build, check, empty]))
        .await
        .unwrap();
    let run = wait_run(&system, &run.id, Duration::from_secs(90)).await;
    let s = steps(&run);
    assert_eq!(
        state(&s["build"]),
        pb::StepState::Succeeded,
        "{:?}",
        s["build"]
    );
    assert_eq!(
        state(&s["check"]),
        pb::StepState::Succeeded,
        "{:?}",
        s["check"]
    );
    assert_eq!(s["build"].attempts[0].worker_id, "art-builder");
    assert_eq!(s["check"].attempts[0].worker_id, "art-tester");
    // A step whose globs match nothing fails, saying so.
    assert_eq!(state(&s["empty"]), pb::StepState::Failed);
    assert!(
        s["empty"].reason.contains("no file matches"),
        "{}",
        s["empty"].reason
    );
    assert_eq!(run.state, pb::PipelineState::Failed as i32);

    let listed = system
        .pipelines
        .clone()
        .list_artifacts(pb::ListArtifactsRequest {
            run_id: run.id.clone(),
            step: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts;
    let paths: Vec<(&str, &str)> = listed
        .iter()
        .map(|a| (a.step.as_str(), a.path.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            ("build", "app.sha"),
            ("build", "dist/app.bin"),
            ("build", "dist/sub/notes.txt")
        ]
    );
    let bin = listed.iter().find(|a| a.path == "dist/app.bin").unwrap();
    assert_eq!(bin.size, 200_000);
    assert!(bin.digest.starts_with("SHA-256="), "{}", bin.digest);

    // The bytes served match the checksum the producing step computed.
    let download = |path: &str| {
        let mut client = system.pipelines.clone();
        let request = pb::DownloadArtifactRequest {
            run_id: run.id.clone(),
            step: "build".into(),
            path: path.into(),
        };
        async move {
            let mut stream = client.download_artifact(request).await?.into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await? {
                bytes.extend(chunk.data);
            }
            Ok::<_, tonic::Status>(bytes)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("dist")).unwrap();
    std::fs::write(
        dir.path().join("dist/app.bin"),
        download("dist/app.bin").await.unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("app.sha"),
        download("app.sha").await.unwrap(),
    )
    .unwrap();
    let verified = std::process::Command::new("sha256sum")
        .args(["-c", "app.sha"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(verified.success());
    let missing = download("dist/none").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let escape = download("../x").await.unwrap_err();
    assert_eq!(escape.code(), tonic::Code::InvalidArgument);
    system.stop().await;
}

/// A random DAG of `n` steps, each needing up to three earlier ones.
fn random_dag(n: usize) -> impl proptest::strategy::Strategy<Value = Vec<pb::PipelineStep>> {
    use proptest::prelude::*;
    proptest::collection::vec(proptest::collection::btree_set(0..n, 0..4), n).prop_map(
        move |needs| {
            (0..n)
                .map(|i| {
                    let names: Vec<String> = needs[i]
                        .iter()
                        .filter(|j| **j < i)
                        .map(|j| format!("s{j}"))
                        .collect();
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    step(&format!("s{i}"), &refs, "true")
                })
                .collect()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_random_fifty_step_dag_completes_in_dependency_order() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    // One DAG drawn by proptest (a fixed seed, so a failure is reproducible), run for real.
    let mut runner = TestRunner::deterministic();
    let dag = random_dag(50).new_tree(&mut runner).unwrap().current();
    let needs: HashMap<String, Vec<String>> = dag
        .iter()
        .map(|s| (s.name.clone(), s.needs.clone()))
        .collect();
    let system = TestSystem::start(TWO_AGENTS).await.unwrap();
    let run = system
        .submit_pipeline(pipeline("random-dag", dag))
        .await
        .unwrap();
    let run = wait_run(&system, &run.id, Duration::from_secs(120)).await;
    assert_eq!(run.state, pb::PipelineState::Succeeded as i32, "{run:#?}");
    let s = steps(&run);
    assert_eq!(s.len(), 50);
    for (name, step_needs) in &needs {
        assert_eq!(state(&s[name]), pb::StepState::Succeeded, "{name}");
        for need in step_needs {
            assert!(
                secs(&s[name].queued_at) >= secs(&s[need].finished_at),
                "{name} queued before {need} finished"
            );
        }
    }
    system.stop().await;
}
