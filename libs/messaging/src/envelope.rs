//! The CloudEvents-style JSON envelope around every domain event on `hodei.v1.evt.>`, so a
//! person watching with a NATS subscriber reads what happened, to what, when and from where.

use chrono::{DateTime, Utc};
use hodei_domain::{JobEvent, PipelineEvent, WorkerEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A domain event as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
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
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// The domain event itself.
    pub data: Value,
}

impl Envelope {
    fn new(
        id: Uuid,
        event_type: String,
        source: &str,
        subject: String,
        time: DateTime<Utc>,
        data: Value,
    ) -> Self {
        Self {
            specversion: "1.0".to_owned(),
            id,
            event_type,
            source: source.to_owned(),
            subject,
            time,
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }

    pub fn for_job(event: &JobEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self::new(
            event.event_id,
            format!("hodei.job.{}", event.kind.name()),
            source,
            event.job_id.to_string(),
            event.at,
            serde_json::to_value(event)?,
        ))
    }

    pub fn for_worker(event: &WorkerEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self::new(
            event.event_id,
            format!("hodei.worker.{}", event.kind.name()),
            source,
            event.worker_id.to_string(),
            event.at,
            serde_json::to_value(event)?,
        ))
    }

    pub fn for_pipeline(event: &PipelineEvent, source: &str) -> Result<Self, serde_json::Error> {
        Ok(Self::new(
            event.event_id,
            format!("hodei.pipeline.{}", event.kind.name()),
            source,
            event.run_id.to_string(),
            event.at,
            serde_json::to_value(event)?,
        ))
    }

    pub fn for_schedule(
        event: &hodei_domain::ScheduleEvent,
        source: &str,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(
            event.event_id,
            format!("hodei.schedule.{}", event.kind.name()),
            source,
            event.schedule_id.to_string(),
            event.at,
            serde_json::to_value(event)?,
        ))
    }

    /// The job event inside, if this envelope carries one.
    pub fn job_event(&self) -> Result<JobEvent, serde_json::Error> {
        serde_json::from_value(self.data.clone())
    }
}
