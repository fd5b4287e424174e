//! Wire messages shared by the unit tests of the output modules.

use std::collections::HashMap;

use hodei_proto::v1 as pb;
use hodei_proto::v1::attempt_outcome::Kind;
use prost_types::Timestamp;

pub fn ts(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

pub fn sample_job() -> pb::Job {
    pb::Job {
        id: "job-1".into(),
        tenant: "default".into(),
        spec: Some(pb::JobSpec {
            name: "echo".into(),
            command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
                argv: vec!["echo".into(), "hi".into()],
            })),
            env: HashMap::from([("B".into(), "2".into()), ("A".into(), "1".into())]),
            required_labels: HashMap::from([("gpu".into(), "true".into())]),
            max_attempts: 2,
            ..Default::default()
        }),
        state: pb::JobState::Failed.into(),
        attempts: vec![pb::Attempt {
            attempt: 1,
            worker_id: "w-1".into(),
            assigned_at: ts(1_700_000_000),
            started_at: ts(1_700_000_001),
            finished_at: ts(1_700_000_005),
            outcome: Some(pb::AttemptOutcome {
                kind: Some(Kind::Exited(3)),
            }),
            output_tail: vec!["hi".into(), "error: disk full".into()],
            output_tail_omitted: false,
        }],
        cancel_requested: false,
        reason: "exited with code 3".into(),
        exit_code: Some(3),
        created_at: ts(1_700_000_000),
        updated_at: ts(1_700_000_005),
        version: 4,
        not_before: None,
        archived_at: None,
        attempts_omitted: 0,
    }
}

pub fn sample_worker() -> pb::Worker {
    pb::Worker {
        id: "w-1".into(),
        labels: HashMap::from([
            ("gpu".into(), "true".into()),
            ("arch".into(), "amd64".into()),
        ]),
        capacity: Some(pb::Resources {
            cpu_millis: 4000,
            memory_mb: 8192,
        }),
        max_concurrent_jobs: 4,
        status: pb::WorkerStatus::Ready.into(),
        held: vec![pb::HeldAttempt {
            job_id: "job-1".into(),
            attempt: 1,
            resources: Some(pb::Resources {
                cpu_millis: 500,
                memory_mb: 256,
            }),
            since: ts(1_700_000_001),
        }],
        usage: Some(pb::ResourceUsage {
            cpu_percent: 12.34,
            memory_used_mb: 512,
            memory_total_mb: 8192,
            load_1m: 0.5,
        }),
        registered_at: ts(1_699_990_000),
        last_heartbeat_at: ts(1_700_000_005),
    }
}

/// A run of four steps: build succeeded, test failed, deploy running, cleanup waiting.
pub fn sample_run() -> pb::PipelineRun {
    let attempt = |worker: &str, started, finished: Option<i64>, code: Option<i32>| pb::Attempt {
        attempt: 1,
        worker_id: worker.into(),
        started_at: ts(started),
        finished_at: finished.and_then(ts),
        outcome: code.map(|c| pb::AttemptOutcome {
            kind: Some(Kind::Exited(c)),
        }),
        ..Default::default()
    };
    let step = |name: &str, state: pb::StepState, job: &str| pb::StepRun {
        name: name.into(),
        base: name.into(),
        state: state.into(),
        job_id: job.into(),
        ..Default::default()
    };
    let mut build = step("build", pb::StepState::Succeeded, "job-b");
    build.started_at = ts(1_700_000_001);
    build.finished_at = ts(1_700_000_003);
    build.reason = "exited with code 0".into();
    build.attempts = vec![attempt("w-1", 1_700_000_001, Some(1_700_000_003), Some(0))];
    let mut test = step("test", pb::StepState::Failed, "job-t");
    test.needs = vec!["build".into()];
    test.started_at = ts(1_700_000_003);
    test.finished_at = Some(Timestamp {
        seconds: 1_700_000_004,
        nanos: 500_000_000,
    });
    test.reason = "exited with code 3".into();
    test.attempts = vec![attempt("w-1", 1_700_000_003, Some(1_700_000_004), Some(3))];
    let mut deploy = step("deploy", pb::StepState::Running, "job-d");
    deploy.needs = vec!["build".into()];
    deploy.started_at = ts(1_700_000_004);
    deploy.attempts = vec![attempt("w-2", 1_700_000_004, None, None)];
    let mut cleanup = step("cleanup", pb::StepState::Waiting, "");
    cleanup.needs = vec!["test".into(), "deploy".into()];
    cleanup.when = pb::When::Always.into();
    pb::PipelineRun {
        id: "run-1".into(),
        tenant: "default".into(),
        spec: Some(pb::PipelineSpec {
            name: "ci".into(),
            ..Default::default()
        }),
        state: pb::PipelineState::Running.into(),
        steps: vec![build, test, deploy, cleanup],
        cancel_requested: false,
        created_at: ts(1_700_000_000),
        updated_at: ts(1_700_000_005),
        version: 7,
        archived_at: None,
    }
}
