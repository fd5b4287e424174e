//! The CloudEvents-style JSON envelope around every domain event on `hodei.v1.evt.>`, so a
//! person watching with a NATS subscriber reads what happened, to what, when and from where.
//!
//! An event is serialised straight from the domain type into its envelope (`Envelope<&E>`),
//! with no `serde_json::Value` in between; a reader decodes `Envelope` (any data) or
//! `Envelope<E>` (typed).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use hodei_domain::{JobEvent, PipelineEvent, WorkerEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A domain event as published, its data of type `D`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D = Value> {
    pub specversion: Cow<'static, str>,
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
    pub datacontenttype: Cow<'static, str>,
    /// The domain event itself.
    pub data: D,
}

impl<D> Envelope<D> {
    fn new(
        id: Uuid,
        event_type: String,
        source: &str,
        subject: String,
        time: DateTime<Utc>,
        data: D,
    ) -> Self {
        Self {
            specversion: Cow::Borrowed("1.0"),
            id,
            event_type,
            source: source.to_owned(),
            subject,
            time,
            datacontenttype: Cow::Borrowed("application/json"),
            data,
        }
    }
}

impl<'a> Envelope<&'a JobEvent> {
    pub fn for_job(event: &'a JobEvent, source: &str) -> Self {
        Self::new(
            event.event_id,
            format!("hodei.job.{}", event.kind.name()),
            source,
            event.job_id.to_string(),
            event.at,
            event,
        )
    }
}

impl<'a> Envelope<&'a WorkerEvent> {
    pub fn for_worker(event: &'a WorkerEvent, source: &str) -> Self {
        Self::new(
            event.event_id,
            format!("hodei.worker.{}", event.kind.name()),
            source,
            event.worker_id.to_string(),
            event.at,
            event,
        )
    }
}

impl<'a> Envelope<&'a PipelineEvent> {
    pub fn for_pipeline(event: &'a PipelineEvent, source: &str) -> Self {
        Self::new(
            event.event_id,
            format!("hodei.pipeline.{}", event.kind.name()),
            source,
            event.run_id.to_string(),
            event.at,
            event,
        )
    }
}

impl<'a> Envelope<&'a hodei_domain::ScheduleEvent> {
    pub fn for_schedule(event: &'a hodei_domain::ScheduleEvent, source: &str) -> Self {
        Self::new(
            event.event_id,
            format!("hodei.schedule.{}", event.kind.name()),
            source,
            event.schedule_id.to_string(),
            event.at,
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
