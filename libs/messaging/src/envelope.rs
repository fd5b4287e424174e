//! The CloudEvents-style JSON envelope around every domain event on `hodei.v1.evt.>`, so a
//! person watching with a NATS subscriber reads what happened, to what, when and from where.
//!
//! An event is serialised straight from the domain type into its envelope
//! (`OutgoingEnvelope`), with no `serde_json::Value` in between; a reader decodes `Envelope`
//! (any data) or `Envelope<E>` (typed).

use chrono::{DateTime, Utc};
use hodei_domain::{
    JobEvent, JobId, PipelineEvent, PipelineRunId, ScheduleEvent, ScheduleId, WorkerEvent, WorkerId,
};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

/// The CloudEvents version every envelope carries.
const SPECVERSION: &str = "1.0";
/// The content type of every envelope's data.
const DATACONTENTTYPE: &str = "application/json";

/// A domain event as read, its data of type `D` (an event is written through
/// [`OutgoingEnvelope`], into the same JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D = Value> {
    pub specversion: String,
    /// The event id; also the JetStream de-duplication id.
    pub id: Uuid,
    /// `hodei.job.<event>`, `hodei.worker.<event>`, `hodei.pipeline.<event>` or
    /// `hodei.schedule.<event>`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The service that recorded the event, e.g. `hodei/scheduler`.
    pub source: String,
    /// The aggregate the event is about (job, worker, pipeline run or schedule id).
    pub subject: String,
    #[serde(with = "hodei_domain::time::rfc3339")]
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// The domain event itself.
    pub data: D,
}

/// An event's envelope as it is published: the JSON of [`Envelope`], written from parts
/// borrowed from the event and the caller. The type, `hodei.<family>.<event>`, and the
/// subject's id are written straight into the output, so that with `serde_json` serialising
/// it allocates nothing but its output.
#[derive(Debug, Serialize)]
pub struct OutgoingEnvelope<'a, Subject, D> {
    specversion: &'static str,
    id: Uuid,
    #[serde(rename = "type")]
    event_type: EventType,
    source: &'a str,
    subject: &'a Subject,
    #[serde(with = "hodei_domain::time::rfc3339")]
    time: DateTime<Utc>,
    datacontenttype: &'static str,
    data: &'a D,
}

/// An envelope's `type`: `hodei.<family>.<event>`.
#[derive(Debug, Clone, Copy)]
struct EventType {
    family: &'static str,
    name: &'static str,
}

impl EventType {
    fn new(family: &'static str, name: &'static str) -> Self {
        Self { family, name }
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("hodei.{}.{}", self.family, self.name))
    }
}

impl<'a, Subject, D> OutgoingEnvelope<'a, Subject, D> {
    fn new(
        id: Uuid,
        time: DateTime<Utc>,
        event_type: EventType,
        source: &'a str,
        subject: &'a Subject,
        data: &'a D,
    ) -> Self {
        Self {
            specversion: SPECVERSION,
            id,
            event_type,
            source,
            subject,
            time,
            datacontenttype: DATACONTENTTYPE,
            data,
        }
    }
}

impl<'a> OutgoingEnvelope<'a, JobId, JobEvent> {
    pub fn job(event: &'a JobEvent, source: &'a str) -> Self {
        let event_type = EventType::new("job", event.kind.name());
        Self::new(
            event.event_id,
            event.at,
            event_type,
            source,
            &event.job_id,
            event,
        )
    }
}

impl<'a> OutgoingEnvelope<'a, WorkerId, WorkerEvent> {
    pub fn worker(event: &'a WorkerEvent, source: &'a str) -> Self {
        let event_type = EventType::new("worker", event.kind.name());
        Self::new(
            event.event_id,
            event.at,
            event_type,
            source,
            &event.worker_id,
            event,
        )
    }
}

impl<'a> OutgoingEnvelope<'a, PipelineRunId, PipelineEvent> {
    pub fn pipeline(event: &'a PipelineEvent, source: &'a str) -> Self {
        let event_type = EventType::new("pipeline", event.kind.name());
        Self::new(
            event.event_id,
            event.at,
            event_type,
            source,
            &event.run_id,
            event,
        )
    }
}

impl<'a> OutgoingEnvelope<'a, ScheduleId, ScheduleEvent> {
    pub fn schedule(event: &'a ScheduleEvent, source: &'a str) -> Self {
        let event_type = EventType::new("schedule", event.kind.name());
        Self::new(
            event.event_id,
            event.at,
            event_type,
            source,
            &event.schedule_id,
            event,
        )
    }
}

impl Envelope {
    /// The job event inside, if this envelope carries one.
    pub fn job_event(&self) -> Result<JobEvent, serde_json::Error> {
        JobEvent::deserialize(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use hodei_domain::spec::JobSpecDraft;
    use hodei_domain::{
        AttemptNumber, Job, JobSpec, PipelineEventKind, ScheduleEventKind, TenantId,
        WorkerEventKind,
    };

    use super::*;

    const SOURCE: &str = "hodei/scheduler";

    /// What the envelope's JSON was before it was written from borrowed parts: `Envelope`
    /// with its fields owned.
    fn owned<D>(
        id: Uuid,
        event_type: String,
        subject: String,
        time: DateTime<Utc>,
        data: D,
    ) -> Envelope<D> {
        Envelope {
            specversion: "1.0".to_owned(),
            id,
            event_type,
            source: SOURCE.to_owned(),
            subject,
            time,
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }

    /// Every family's outgoing envelope writes the very JSON of an `Envelope` built from owned
    /// parts, and reads back as the event.
    #[test]
    fn outgoing_envelopes_write_the_envelope_json() {
        let spec = JobSpec::try_from(JobSpecDraft::exec("build", &["make", "test"])).unwrap();
        let now = Utc::now();
        let (mut job, submitted) = Job::submit(JobId::new(), TenantId::default(), spec, now);
        let worker: WorkerId = "worker-1".parse().unwrap();
        let assigned = job.assign(worker.clone(), now).unwrap();
        let started = job.start(AttemptNumber::new(1), now).unwrap();
        for event in [submitted, assigned, started] {
            let fast = serde_json::to_string(&OutgoingEnvelope::job(&event, SOURCE)).unwrap();
            let type_ = format!("hodei.job.{}", event.kind.name());
            let reference = owned(
                event.event_id,
                type_,
                event.job_id.to_string(),
                event.at,
                &event,
            );
            assert_eq!(fast, serde_json::to_string(&reference).unwrap());
            let read: Envelope = serde_json::from_str(&fast).unwrap();
            assert_eq!(read.job_event().unwrap(), event);
        }

        let event = WorkerEvent {
            event_id: Uuid::now_v7(),
            worker_id: worker,
            at: now,
            kind: WorkerEventKind::Returned,
        };
        let fast = serde_json::to_string(&OutgoingEnvelope::worker(&event, SOURCE)).unwrap();
        let type_ = "hodei.worker.returned".to_owned();
        let reference = owned(
            event.event_id,
            type_,
            event.worker_id.to_string(),
            now,
            &event,
        );
        assert_eq!(fast, serde_json::to_string(&reference).unwrap());

        let event = PipelineEvent {
            event_id: Uuid::now_v7(),
            run_id: PipelineRunId::new(),
            seq: 2,
            at: now,
            kind: PipelineEventKind::StepStarted {
                step: "build".to_owned(),
            },
        };
        let fast = serde_json::to_string(&OutgoingEnvelope::pipeline(&event, SOURCE)).unwrap();
        let type_ = "hodei.pipeline.step_started".to_owned();
        let reference = owned(event.event_id, type_, event.run_id.to_string(), now, &event);
        assert_eq!(fast, serde_json::to_string(&reference).unwrap());

        let event = ScheduleEvent {
            event_id: Uuid::now_v7(),
            schedule_id: ScheduleId::new(),
            at: now,
            kind: ScheduleEventKind::Paused,
        };
        let fast = serde_json::to_string(&OutgoingEnvelope::schedule(&event, SOURCE)).unwrap();
        let type_ = "hodei.schedule.paused".to_owned();
        let reference = owned(
            event.event_id,
            type_,
            event.schedule_id.to_string(),
            now,
            &event,
        );
        assert_eq!(fast, serde_json::to_string(&reference).unwrap());
    }
}
