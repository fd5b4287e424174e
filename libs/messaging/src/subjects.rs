//! Every NATS subject and header name Hodei uses, built here and nowhere else. All subjects
//! live under the versioned prefix `hodei.v1`.

use hodei_domain::{JobId, PipelineRunId, ScheduleId, WorkerId};
use uuid::Uuid;

/// The versioned root of every subject.
pub const PREFIX: &str = "hodei.v1";

/// Header carrying the JetStream de-duplication id (the event or message id).
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context header: the trace and the span that produced the message.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// W3C trace context header: vendor-specific trace state, passed on unchanged.
pub const HEADER_TRACESTATE: &str = "tracestate";
/// Header carrying the subject a dead-lettered message was received on.
pub const HEADER_DLQ_SUBJECT: &str = "Hodei-Dlq-Subject";
/// Header carrying why a message was dead-lettered.
pub const HEADER_DLQ_REASON: &str = "Hodei-Dlq-Reason";

/// `hodei.v1.evt.job.<job_id>.<event>`: a job's domain event.
pub fn job_event(job_id: &JobId, event: &str) -> String {
    event_subject("job", job_id.encode(&mut Uuid::encode_buffer()), event)
}

/// `hodei.v1.evt.job.<job_id>.>`: every event of one job.
pub fn job_events_of(job_id: &JobId) -> String {
    format!("{PREFIX}.evt.job.{job_id}.>")
}

/// `hodei.v1.evt.worker.<worker_id>.<event>`: a worker's domain event.
pub fn worker_event(worker_id: &WorkerId, event: &str) -> String {
    event_subject("worker", worker_id.as_str(), event)
}

/// `hodei.v1.evt.pipeline.<run_id>.<event>`: a pipeline run's domain event.
pub fn pipeline_event(run_id: &PipelineRunId, event: &str) -> String {
    event_subject("pipeline", run_id.encode(&mut Uuid::encode_buffer()), event)
}

/// `hodei.v1.evt.pipeline.<run_id>.>`: every event of one pipeline run.
pub fn pipeline_events_of(run_id: &PipelineRunId) -> String {
    format!("{PREFIX}.evt.pipeline.{run_id}.>")
}

/// `hodei.v1.evt.schedule.<schedule_id>.<event>`: a schedule's event (created, paused, resumed,
/// deleted, fired, skipped, missed).
pub fn schedule_event(schedule_id: &ScheduleId, event: &str) -> String {
    event_subject(
        "schedule",
        schedule_id.encode(&mut Uuid::encode_buffer()),
        event,
    )
}

/// `hodei.v1.evt.<family>.<id>.<event>`, in one allocation of its length: an event's subject
/// is built for every event published, and `format!` would grow its string on the way.
fn event_subject(family: &str, id: &str, event: &str) -> String {
    [PREFIX, ".evt.", family, ".", id, ".", event].concat()
}

/// `hodei.v1.evt.>`: every domain event.
pub fn all_events() -> String {
    format!("{PREFIX}.evt.>")
}

/// What a domain event's subject (`hodei.v1.evt.<kind>.<id>.<event>`) is about: its kind
/// (`job`, `worker`, `pipeline`, `schedule`) and the aggregate's id.
pub fn event_aggregate(subject: &str) -> Option<(&str, &str)> {
    let mut tokens = subject
        .strip_prefix(PREFIX)?
        .strip_prefix(".evt.")?
        .split('.');
    Some((tokens.next()?, tokens.next()?))
}

/// `hodei.v1.work.place.<job_id>`: a job that needs placing (work queue).
pub fn place_job(job_id: &JobId) -> String {
    format!("{PREFIX}.work.place.{job_id}")
}

/// `hodei.v1.work.place.>`: what the schedulers consume.
pub fn all_place_jobs() -> String {
    format!("{PREFIX}.work.place.>")
}

/// `hodei.v1.agent.<worker_id>.cmd`: assignments and cancels for one agent.
pub fn agent_commands(worker_id: &WorkerId) -> String {
    format!("{PREFIX}.agent.{worker_id}.cmd")
}

/// `hodei.v1.report.<worker_id>.<job_id>`: an agent's report on an attempt (started,
/// finished). The subject names the sending worker, so a credential can be bound to it.
pub fn report(worker_id: &WorkerId, job_id: &JobId) -> String {
    format!("{PREFIX}.report.{worker_id}.{job_id}")
}

/// The worker and job named by a report subject (`hodei.v1.report.<worker_id>.<job_id>`).
pub fn report_sender(subject: &str) -> Option<(&str, &str)> {
    let mut tokens = subject.split('.');
    match (
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
    ) {
        (Some("hodei"), Some("v1"), Some("report"), Some(worker), Some(job), None) => {
            Some((worker, job))
        }
        _ => None,
    }
}

/// `hodei.v1.report.>`: every report.
pub fn all_reports() -> String {
    format!("{PREFIX}.report.>")
}

/// `hodei.v1.hb.<worker_id>`: an agent's heartbeat (core NATS, not persisted).
pub fn heartbeat(worker_id: &WorkerId) -> String {
    format!("{PREFIX}.hb.{worker_id}")
}

/// `_INBOX_hodei-agent-<worker_id>.lease`: what agent `worker_id` publishes to itself after
/// each heartbeat; receiving it back proves the server has the beat (a flush only empties the
/// client's buffer into the socket). Under the agent's own inbox prefix, which no other
/// credential may subscribe to.
pub fn lease_echo(worker_id: &WorkerId) -> String {
    format!(
        "{}.lease",
        crate::permissions::inbox_prefix(&crate::permissions::agent_client_name(worker_id))
    )
}

/// `hodei.v1.registry.observation`: a registry could not observe its share of the fleet (its
/// start, a NATS reconnection, heartbeat writes failing or lagging), said to every registry
/// (core NATS): the beats are shared among them, so a silence seen by one may be another's
/// outage.
pub fn registry_observation() -> String {
    format!("{PREFIX}.registry.observation")
}

/// `hodei.v1.hb.*`: every heartbeat.
pub fn all_heartbeats() -> String {
    format!("{PREFIX}.hb.*")
}

/// `hodei.v1.log.<worker_id>.<job_id>`: a job's output, in batches of lines, from the worker
/// running it. The subject names the sender, so a credential can be bound to it.
pub fn log(worker_id: &WorkerId, job_id: &JobId) -> String {
    format!("{PREFIX}.log.{worker_id}.{job_id}")
}

/// `hodei.v1.log.*.<job_id>`: a job's output from whichever workers ran it.
pub fn logs_of(job_id: &JobId) -> String {
    format!("{PREFIX}.log.*.{job_id}")
}

/// `hodei.v1.log.<job_id>`: a job's output as agents named it before the subject named the
/// worker; read alongside [`logs_of`] until those messages age out of the log stream.
pub fn legacy_logs_of(job_id: &JobId) -> String {
    format!("{PREFIX}.log.{job_id}")
}

/// `hodei.v1.dlq.<kind>`: messages a service could not handle, kept for people to inspect.
pub fn dead_letter(kind: &str) -> String {
    format!("{PREFIX}.dlq.{kind}")
}

/// `subject` with its ids replaced by `*` (`hodei.v1.report.*.*`, `hodei.v1.evt.job.*.assigned`):
/// few distinct values, for span names and grouping.
pub fn template(subject: &str) -> String {
    let mut tokens: Vec<&str> = subject.split('.').collect();
    let id_at = match tokens.get(2).copied() {
        _ if tokens.len() < 4 || tokens[0] != "hodei" => None,
        Some("evt") | Some("work") => Some(4),
        Some("agent") | Some("report") | Some("hb") | Some("log") => Some(3),
        _ => None,
    };
    if let Some(token) = id_at.and_then(|i| tokens.get_mut(i)) {
        *token = "*";
    }
    // A report and a log batch name their worker and their job.
    if matches!(tokens.get(2), Some(&"report") | Some(&"log"))
        && let Some(token) = tokens.get_mut(4)
    {
        *token = "*";
    }
    tokens.join(".")
}

/// The token after `prefix.` in `subject`, e.g. the job id of a report subject.
pub fn token_after(subject: &str, prefix_tokens: usize) -> Option<&str> {
    subject.split('.').nth(prefix_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_versioned_and_tokenised() {
        let job = JobId::new();
        let worker: WorkerId = "w-1".parse().unwrap();
        assert_eq!(
            job_event(&job, "assigned"),
            format!("hodei.v1.evt.job.{job}.assigned")
        );
        assert_eq!(
            worker_event(&worker, "lost"),
            "hodei.v1.evt.worker.w-1.lost"
        );
        let run = PipelineRunId::new();
        assert_eq!(
            pipeline_event(&run, "finished"),
            format!("hodei.v1.evt.pipeline.{run}.finished")
        );
        let schedule = ScheduleId::new();
        assert_eq!(
            schedule_event(&schedule, "fired"),
            format!("hodei.v1.evt.schedule.{schedule}.fired")
        );
        assert_eq!(agent_commands(&worker), "hodei.v1.agent.w-1.cmd");
        let job_id = job.to_string();
        assert_eq!(
            event_aggregate(&job_event(&job, "assigned")),
            Some(("job", job_id.as_str()))
        );
        assert_eq!(event_aggregate(&place_job(&job)), None);
        assert_eq!(token_after(&heartbeat(&worker), 3), Some("w-1"));
        assert_eq!(
            template(&job_event(&job, "assigned")),
            "hodei.v1.evt.job.*.assigned"
        );
        assert_eq!(template(&place_job(&job)), "hodei.v1.work.place.*");
        assert_eq!(template(&agent_commands(&worker)), "hodei.v1.agent.*.cmd");
        assert_eq!(template(&report(&worker, &job)), "hodei.v1.report.*.*");
        assert_eq!(
            report_sender(&report(&worker, &job)),
            Some(("w-1", job.to_string().as_str()))
        );
        assert_eq!(report_sender("hodei.v1.report.w-1"), None);
        assert_eq!(report_sender("hodei.v1.report.a.b.c"), None);
        assert_eq!(template(&dead_letter("report")), "hodei.v1.dlq.report");
    }
}
