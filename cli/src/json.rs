//! JSON forms of the wire messages for `--output json`.
//!
//! prost types don't derive serde, so each message is converted by hand: timestamps become
//! RFC 3339 strings (or null when unset), enums their lowercase names ("succeeded"), oneofs an
//! object with a `kind`, maps objects with sorted keys.

use std::collections::{BTreeMap, HashMap};

use hodei_proto::v1 as pb;
use hodei_proto::v1::attempt_outcome::Kind;
use serde_json::{Map, Value, json};

use crate::wire;

pub fn job(j: &pb::Job) -> Value {
    json!({
        "id": j.id,
        "tenant": j.tenant,
        "spec": j.spec.as_ref().map(spec),
        "state": wire::state_name(j.state),
        "attempts": j.attempts.iter().map(attempt).collect::<Vec<_>>(),
        "attempts_omitted": j.attempts_omitted,
        "cancel_requested": j.cancel_requested,
        "reason": j.reason,
        "exit_code": j.exit_code,
        "created_at": wire::rfc3339(j.created_at.as_ref()),
        "updated_at": wire::rfc3339(j.updated_at.as_ref()),
        "version": j.version,
        "not_before": wire::rfc3339(j.not_before.as_ref()),
        "archived_at": wire::rfc3339(j.archived_at.as_ref()),
    })
}

pub fn spec(s: &pb::JobSpec) -> Value {
    let command = s.command.as_ref().map(|c| match c {
        pb::job_spec::Command::Exec(e) => json!({ "kind": "exec", "argv": e.argv }),
        pb::job_spec::Command::Script(s) => json!({
            "kind": "script",
            "interpreter": s.interpreter,
            "script": s.script,
        }),
    });
    json!({
        "name": s.name,
        "command": command,
        "env": string_map(&s.env),
        "secret_env": s.secret_env,
        "working_dir": s.working_dir,
        "timeout_secs": s.timeout_secs,
        "resources": s.resources.as_ref().map(resources),
        "required_labels": string_map(&s.required_labels),
        "priority": s.priority,
        "max_attempts": s.max_attempts,
        "retry_backoff": s.retry_backoff.as_ref().map(|b| json!({
            "initial_ms": b.initial_ms,
            "max_ms": b.max_ms,
        })),
        "idempotency_key": s.idempotency_key,
        "labels": string_map(&s.labels),
    })
}

pub fn attempt(a: &pb::Attempt) -> Value {
    json!({
        "attempt": a.attempt,
        "worker_id": a.worker_id,
        "assigned_at": wire::rfc3339(a.assigned_at.as_ref()),
        "started_at": wire::rfc3339(a.started_at.as_ref()),
        "finished_at": wire::rfc3339(a.finished_at.as_ref()),
        "outcome": outcome(a.outcome.as_ref()),
        "output_tail": a.output_tail,
        "output_tail_omitted": a.output_tail_omitted,
    })
}

/// `{"kind": "exited", "code": 3}`, `{"kind": "timed_out"}`, ...; null when unset.
pub fn outcome(o: Option<&pb::AttemptOutcome>) -> Value {
    let Some(kind) = o.and_then(|o| o.kind.as_ref()) else {
        return Value::Null;
    };
    match kind {
        Kind::Exited(code) => json!({ "kind": "exited", "code": code }),
        Kind::Signalled(signal) => json!({ "kind": "signalled", "signal": signal }),
        Kind::TimedOut(_) => json!({ "kind": "timed_out" }),
        Kind::Cancelled(_) => json!({ "kind": "cancelled" }),
        Kind::SpawnFailed(reason) => json!({ "kind": "spawn_failed", "reason": reason }),
        Kind::Lost(reason) => json!({ "kind": "lost", "reason": reason }),
        Kind::ArtifactsFailed(reason) => json!({ "kind": "artifacts_failed", "reason": reason }),
        Kind::Preempted(by) => json!({ "kind": "preempted", "by": by }),
    }
}

pub fn job_event(e: &pb::JobEvent) -> Value {
    json!({
        "job_id": e.job_id,
        "seq": e.seq,
        "at": wire::rfc3339(e.at.as_ref()),
        "type": e.r#type,
        "state": wire::state_name(e.state),
        "attempt": e.attempt,
        "worker_id": e.worker_id,
        "outcome": outcome(e.outcome.as_ref()),
        "reason": e.reason,
        "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null),
    })
}

pub fn log_line(l: &pb::LogLine) -> Value {
    json!({
        "sequence": l.sequence,
        "attempt": l.attempt,
        "stream": wire::stream_name(l.stream),
        "text": l.text,
        "at": wire::rfc3339(l.at.as_ref()),
    })
}

pub fn pipeline_run(r: &pb::PipelineRun) -> Value {
    json!({
        "id": r.id,
        "tenant": r.tenant,
        "spec": r.spec.as_ref().map(pipeline_spec),
        "state": wire::run_state_name(r.state),
        "steps": r.steps.iter().map(step_run).collect::<Vec<_>>(),
        "cancel_requested": r.cancel_requested,
        "created_at": wire::rfc3339(r.created_at.as_ref()),
        "updated_at": wire::rfc3339(r.updated_at.as_ref()),
        "version": r.version,
        "archived_at": wire::rfc3339(r.archived_at.as_ref()),
    })
}

pub fn pipeline_spec(s: &pb::PipelineSpec) -> Value {
    json!({
        "name": s.name,
        "env": string_map(&s.env),
        "steps": s.steps.iter().map(|step| {
            let matrix: BTreeMap<_, _> = step
                .matrix
                .iter()
                .map(|(k, v)| (k.clone(), v.values.clone()))
                .collect();
            json!({
                "name": step.name,
                "needs": step.needs,
                "when": wire::when_name(step.when),
                "matrix": matrix,
                "job": step.job.as_ref().map(spec),
                "artifacts": step.artifacts.as_ref().map(|a| json!({
                    "produce": a.produce,
                    "consume": a.consume,
                })),
            })
        }).collect::<Vec<_>>(),
        "fail_fast": s.fail_fast,
        "idempotency_key": s.idempotency_key,
        "labels": string_map(&s.labels),
    })
}

pub fn step_run(s: &pb::StepRun) -> Value {
    json!({
        "name": s.name,
        "base": s.base,
        "needs": s.needs,
        "when": wire::when_name(s.when),
        "state": wire::step_state_name(s.state),
        "job_id": s.job_id,
        "queued_at": wire::rfc3339(s.queued_at.as_ref()),
        "started_at": wire::rfc3339(s.started_at.as_ref()),
        "finished_at": wire::rfc3339(s.finished_at.as_ref()),
        "reason": s.reason,
        "attempts": s.attempts.iter().map(attempt).collect::<Vec<_>>(),
        "attempts_omitted": s.attempts_omitted,
    })
}

pub fn pipeline_event(e: &pb::PipelineEvent) -> Value {
    json!({
        "run_id": e.run_id,
        "seq": e.seq,
        "at": wire::rfc3339(e.at.as_ref()),
        "type": e.r#type,
        "step": e.step,
        "step_state": (!e.step.is_empty()).then(|| wire::step_state_name(e.step_state)),
        "job_id": e.job_id,
        "reason": e.reason,
        "state": wire::run_state_name(e.state),
    })
}

pub fn artifact(a: &pb::Artifact) -> Value {
    json!({
        "step": a.step,
        "path": a.path,
        "size": a.size,
        "digest": a.digest,
        "modified": wire::rfc3339(a.modified.as_ref()),
    })
}

pub fn tenant(t: &pb::Tenant) -> Value {
    let policy = t.policy.unwrap_or_default();
    json!({
        "tenant": t.tenant,
        "weight": policy.weight.max(1),
        "max_queued_jobs": policy.max_queued_jobs,
        "max_running_jobs": policy.max_running_jobs,
        "max_cpu_millis": policy.max_cpu_millis,
        "max_memory_mb": policy.max_memory_mb,
        "max_priority": policy.max_priority,
        "policy_updated_at": wire::rfc3339(t.policy_updated_at.as_ref()),
        "queued_jobs": t.queued_jobs,
        "running_jobs": t.running_jobs,
        "cpu_millis_in_use": t.cpu_millis_in_use,
        "memory_mb_in_use": t.memory_mb_in_use,
        "share": t.share,
        "entitled_share": t.entitled_share,
    })
}

pub fn worker(w: &pb::Worker) -> Value {
    json!({
        "id": w.id,
        "labels": string_map(&w.labels),
        "capacity": w.capacity.as_ref().map(resources),
        "max_concurrent_jobs": w.max_concurrent_jobs,
        "status": wire::status_name(w.status),
        "held": w.held.iter().map(|h| json!({
            "job_id": h.job_id,
            "attempt": h.attempt,
            "resources": h.resources.as_ref().map(resources),
            "since": wire::rfc3339(h.since.as_ref()),
        })).collect::<Vec<_>>(),
        "usage": w.usage.as_ref().map(|u| json!({
            "cpu_percent": round2(f64::from(u.cpu_percent)),
            "memory_used_mb": u.memory_used_mb,
            "memory_total_mb": u.memory_total_mb,
            "load_1m": round2(u.load_1m),
        })),
        "registered_at": wire::rfc3339(w.registered_at.as_ref()),
        "last_heartbeat_at": wire::rfc3339(w.last_heartbeat_at.as_ref()),
    })
}

fn resources(r: &pb::Resources) -> Value {
    json!({ "cpu_millis": r.cpu_millis, "memory_mb": r.memory_mb })
}

/// Keys sorted, so output is stable whatever the HashMap order.
fn string_map(m: &HashMap<String, String>) -> Value {
    let sorted: BTreeMap<_, _> = m.iter().collect();
    Value::Object(
        sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

/// Two decimals: the wire's f32 would otherwise print as 12.300000190734863.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{sample_job, sample_run, ts};

    #[test]
    fn job_converts_to_json() {
        let want = json!({
            "id": "job-1",
            "tenant": "default",
            "spec": {
                "name": "echo",
                "command": { "kind": "exec", "argv": ["echo", "hi"] },
                "env": { "A": "1", "B": "2" },
                "secret_env": [],
                "working_dir": "",
                "timeout_secs": 0,
                "resources": null,
                "required_labels": { "gpu": "true" },
                "priority": 0,
                "max_attempts": 2,
                "retry_backoff": null,
                "idempotency_key": "",
                "labels": {},
            },
            "state": "failed",
            "attempts": [{
                "attempt": 1,
                "worker_id": "w-1",
                "assigned_at": "2023-11-14T22:13:20Z",
                "started_at": "2023-11-14T22:13:21Z",
                "finished_at": "2023-11-14T22:13:25Z",
                "outcome": { "kind": "exited", "code": 3 },
                "output_tail": ["hi", "error: disk full"],
                "output_tail_omitted": false,
            }],
            "attempts_omitted": 0,
            "cancel_requested": false,
            "reason": "exited with code 3",
            "exit_code": 3,
            "created_at": "2023-11-14T22:13:20Z",
            "updated_at": "2023-11-14T22:13:25Z",
            "version": 4,
            "not_before": null,
            "archived_at": null,
        });
        assert_eq!(job(&sample_job()), want);
    }

    #[test]
    fn pipeline_runs_and_events_convert_to_json() {
        let v = pipeline_run(&sample_run());
        assert_eq!(v["state"], "running");
        assert_eq!(v["spec"]["name"], "ci");
        assert_eq!(v["steps"][1]["state"], "failed");
        assert_eq!(v["steps"][1]["needs"], json!(["build"]));
        assert_eq!(
            v["steps"][1]["attempts"][0]["outcome"],
            json!({"kind": "exited", "code": 3})
        );
        assert_eq!(v["steps"][3]["when"], "always");
        assert_eq!(v["steps"][3]["started_at"], Value::Null);

        let e = pb::PipelineEvent {
            run_id: "run-1".into(),
            seq: 3,
            at: ts(1_700_000_000),
            r#type: "step_finished".into(),
            step: "test".into(),
            step_state: pb::StepState::Failed.into(),
            job_id: "job-t".into(),
            reason: "exited with code 3".into(),
            state: pb::PipelineState::Running.into(),
        };
        let v = pipeline_event(&e);
        assert_eq!(v["step_state"], "failed");
        assert_eq!(v["state"], "running");
        let v = pipeline_event(&pb::PipelineEvent {
            r#type: "finished".into(),
            state: pb::PipelineState::Failed.into(),
            ..e
        });
        assert_eq!(v["step"], "test");
        let v = pipeline_event(&pb::PipelineEvent {
            r#type: "submitted".into(),
            ..Default::default()
        });
        assert_eq!(v["step_state"], Value::Null);
    }

    #[test]
    fn keys_print_sorted() {
        let text = serde_json::to_string(&job(&sample_job())).unwrap();
        let a = text.find("\"A\":\"1\"").unwrap();
        let b = text.find("\"B\":\"2\"").unwrap();
        assert!(a < b, "{text}");
    }

    #[test]
    fn script_command_and_missing_exit_code() {
        let mut j = sample_job();
        j.exit_code = None;
        j.state = pb::JobState::TimedOut.into();
        if let Some(s) = j.spec.as_mut() {
            s.command = Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: vec!["/bin/sh".into(), "-c".into()],
                script: "sleep 9".into(),
            }));
        }
        let v = job(&j);
        assert_eq!(v["exit_code"], Value::Null);
        assert_eq!(v["state"], "timed_out");
        assert_eq!(
            v["spec"]["command"],
            json!({ "kind": "script", "interpreter": ["/bin/sh", "-c"], "script": "sleep 9" })
        );
    }

    #[test]
    fn event_log_line_and_worker() {
        let e = pb::JobEvent {
            job_id: "job-1".into(),
            seq: 2,
            at: ts(1_700_000_000),
            r#type: "requeued".into(),
            state: pb::JobState::Queued.into(),
            attempt: 1,
            worker_id: "w-1".into(),
            outcome: Some(pb::AttemptOutcome {
                kind: Some(Kind::Lost("no heartbeat".into())),
            }),
            reason: String::new(),
            data: r#"{"type":"requeued","attempt":1}"#.into(),
        };
        let v = job_event(&e);
        assert_eq!(v["state"], "queued");
        assert_eq!(v["data"]["attempt"], 1);
        assert_eq!(
            v["outcome"],
            json!({ "kind": "lost", "reason": "no heartbeat" })
        );

        let l = pb::LogLine {
            sequence: 9,
            attempt: 1,
            stream: pb::LogStream::Stderr.into(),
            text: "oops".into(),
            at: ts(1_700_000_000),
        };
        assert_eq!(
            log_line(&l),
            json!({ "sequence": 9, "attempt": 1, "stream": "stderr", "text": "oops",
                    "at": "2023-11-14T22:13:20Z" })
        );

        let w = pb::Worker {
            id: "w-1".into(),
            status: pb::WorkerStatus::Ready.into(),
            usage: Some(pb::ResourceUsage {
                cpu_percent: 12.3,
                memory_used_mb: 512,
                memory_total_mb: 2048,
                load_1m: 0.5,
            }),
            ..Default::default()
        };
        let v = worker(&w);
        assert_eq!(v["status"], "ready");
        assert_eq!(v["usage"]["cpu_percent"], json!(12.3));
        assert_eq!(v["registered_at"], Value::Null);
    }
}
