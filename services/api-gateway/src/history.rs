//! The event store read back: a job's history page by page, events across jobs by time, and
//! jobs and pipeline runs as they stood at an earlier event or moment, folded from their
//! events (the same fold the live projection was built by).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hodei_domain::{AttemptRecord, Job, JobId, JobState, PipelineRun, PipelineRunId};
use hodei_proto::v1 as pb;
use hodei_runtime::Backends;
use hodei_storage::EventRange;
use hodei_storage::jobs::{self, EventFilter};
use hodei_storage::pipelines;
use uuid::Uuid;

use crate::errors::ApiError;
use crate::request;

/// Longest `query` a ListJobs request may give.
pub const MAX_QUERY_CHARS: usize = 512;

/// A moment of an aggregate's history: after its event `Seq` (1-based), or after its last
/// event recorded at or before `Time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    Seq(u64),
    Time(DateTime<Utc>),
}

impl AsOf {
    fn range(self) -> EventRange {
        match self {
            AsOf::Seq(seq) => EventRange {
                from_seq: 1,
                to_seq: Some(seq),
                ..EventRange::default()
            },
            AsOf::Time(at) => EventRange {
                from_seq: 1,
                until: Some(at),
                ..EventRange::default()
            },
        }
    }

    /// What a history shorter than asked for means for `what` (e.g. `job 0193…`).
    fn missing(self, what: &str, recorded: usize) -> ApiError {
        match self {
            AsOf::Seq(0) => ApiError::field("as_of_seq", "must be 1 or more"),
            AsOf::Seq(seq) => ApiError::field(
                "as_of_seq",
                format!("{what} has {recorded} events, not {seq}"),
            ),
            AsOf::Time(at) => ApiError::not_found(format!("{what} as of {}", at.to_rfc3339())),
        }
    }
}

impl TryFrom<pb::get_job_request::AsOf> for AsOf {
    type Error = ApiError;
    fn try_from(wire: pb::get_job_request::AsOf) -> Result<Self, ApiError> {
        match wire {
            pb::get_job_request::AsOf::AsOfSeq(seq) => Ok(AsOf::Seq(seq)),
            pb::get_job_request::AsOf::AsOfTime(t) => {
                request::timestamp("as_of_time", &t).map(AsOf::Time)
            }
        }
    }
}

impl TryFrom<pb::get_pipeline_run_request::AsOf> for AsOf {
    type Error = ApiError;
    fn try_from(wire: pb::get_pipeline_run_request::AsOf) -> Result<Self, ApiError> {
        match wire {
            pb::get_pipeline_run_request::AsOf::AsOfSeq(seq) => Ok(AsOf::Seq(seq)),
            pb::get_pipeline_run_request::AsOf::AsOfTime(t) => {
                request::timestamp("as_of_time", &t).map(AsOf::Time)
            }
        }
    }
}

/// Job `id` as it stood at `as_of`, folded from its events. The caller has checked that the
/// job exists.
pub async fn job_as_of(backends: &Backends, id: JobId, as_of: AsOf) -> Result<Job, ApiError> {
    let what = format!("job {id}");
    let events = backends
        .db(|| jobs::history(&backends.pool, id, as_of.range()))
        .await?;
    if events.is_empty() || matches!(as_of, AsOf::Seq(seq) if events.len() as u64 != seq) {
        return Err(as_of.missing(&what, events.len()));
    }
    Job::from_events(&events).map_err(|e| unreadable(&what, e))
}

/// Run `id` as it stood at `as_of`, folded from its events, with its steps' jobs' attempts as
/// they stood at the same moment (the time of the run's last event folded, for `Seq`).
pub async fn run_as_of(
    backends: &Backends,
    id: PipelineRunId,
    as_of: AsOf,
) -> Result<(PipelineRun, HashMap<JobId, Vec<AttemptRecord>>), ApiError> {
    let what = format!("pipeline run {id}");
    let events = backends
        .db(|| pipelines::history(&backends.pool, id, as_of.range()))
        .await?;
    if events.is_empty() || matches!(as_of, AsOf::Seq(seq) if events.len() as u64 != seq) {
        return Err(as_of.missing(&what, events.len()));
    }
    let run = PipelineRun::from_events(&events).map_err(|e| unreadable(&what, e))?;
    let moment = match as_of {
        AsOf::Time(at) => at,
        AsOf::Seq(_) => events.last().map_or(run.updated_at(), |e| e.at),
    };
    let step_jobs: Vec<JobId> = run.steps().iter().filter_map(|s| s.job_id).collect();
    let histories = backends
        .db(|| jobs::histories(&backends.pool, &step_jobs, Some(moment)))
        .await?;
    let mut attempts = HashMap::with_capacity(histories.len());
    for (job, events) in histories {
        let folded = Job::from_events(&events).map_err(|e| unreadable(&format!("job {job}"), e))?;
        attempts.insert(job, folded.attempts().to_vec());
    }
    Ok((run, attempts))
}

/// A page of job `id`'s events after `page_token` (a sequence number), each with the job's
/// state after it. The caller has checked that the job exists.
pub async fn job_history(
    backends: &Backends,
    id: JobId,
    page_size: u32,
    page_token: &str,
) -> Result<pb::GetJobHistoryResponse, ApiError> {
    let limit = request::page_size(page_size)?;
    let after: u64 = if page_token.is_empty() {
        0
    } else {
        page_token
            .parse()
            .map_err(|_| ApiError::field("page_token", "is not a token this call gave"))?
    };
    // The state after an event depends on the events before it (`cancel_requested` keeps
    // the state it found), so the page is read with the history before it: a job's history
    // is short (a few events per attempt).
    let range = EventRange {
        from_seq: 1,
        to_seq: Some(after.saturating_add(u64::from(limit)).saturating_add(1)),
        ..EventRange::default()
    };
    let events = backends
        .db(|| jobs::history(&backends.pool, id, range))
        .await?;
    let mut state = JobState::Queued;
    let mut page = Vec::with_capacity(limit as usize);
    let mut more = false;
    for event in &events {
        let wire = hodei_proto::job_event_to_wire(event, state);
        state = hodei_proto::state_from_wire(wire.state).unwrap_or(state);
        if event.seq <= after {
            continue;
        }
        if page.len() == limit as usize {
            more = true;
            break;
        }
        page.push(wire);
    }
    let next_page_token = match page.last() {
        Some(last) if more => last.seq.to_string(),
        _ => String::new(),
    };
    Ok(pb::GetJobHistoryResponse {
        events: page,
        next_page_token,
    })
}

/// A page of events across jobs, oldest first.
pub async fn list_events(
    backends: &Backends,
    req: pb::ListEventsRequest,
) -> Result<pb::ListEventsResponse, ApiError> {
    let limit = request::page_size(req.page_size)?;
    let from = req
        .start_time
        .as_ref()
        .map(|t| request::timestamp("start_time", t))
        .transpose()?;
    let to = req
        .end_time
        .as_ref()
        .map(|t| request::timestamp("end_time", t))
        .transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && to < from
    {
        return Err(ApiError::field("end_time", "is before start_time"));
    }
    for (i, kind) in req.types.iter().enumerate() {
        if !EVENT_TYPES.contains(&kind.as_str()) {
            return Err(ApiError::field(
                format!("types[{i}]"),
                format!(
                    "unknown event type '{kind}' (one of {})",
                    EVENT_TYPES.join(", ")
                ),
            ));
        }
    }
    let tenant = Some(req.tenant.as_str())
        .filter(|t| !t.is_empty())
        .map(request::tenant)
        .transpose()?;
    let filter = EventFilter {
        from,
        to,
        types: req.types,
        tenant,
        labels: req.labels.into_iter().collect(),
        after: event_token(&req.page_token)?,
        limit,
    };
    let found = backends
        .db(|| jobs::list_events(&backends.pool, &filter))
        .await?;
    let next_page_token = request::page_token_after(&found, limit, |e| {
        format!("{}_{}", e.event.at.timestamp_micros(), e.event.event_id)
    });
    let events = found
        .iter()
        .map(|listed| {
            let before = if listed.attempt_started {
                JobState::Running
            } else {
                JobState::Assigned
            };
            hodei_proto::job_event_to_wire(&listed.event, before)
        })
        .collect();
    Ok(pb::ListEventsResponse {
        events,
        next_page_token,
    })
}

/// The names a job event's `type` takes.
const EVENT_TYPES: [&str; 9] = [
    "submitted",
    "assigned",
    "started",
    "requeued",
    "succeeded",
    "failed",
    "timed_out",
    "cancel_requested",
    "cancelled",
];

/// A ListEvents page token: the time (microseconds) and id of the last event of a page.
fn event_token(token: &str) -> Result<Option<(DateTime<Utc>, Uuid)>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::field("page_token", "is not a token this call gave");
    let (micros, id) = token.split_once('_').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id = id.parse::<Uuid>().map_err(|_| bad())?;
    Ok(Some((at, id)))
}

fn unreadable(what: &str, e: hodei_domain::DomainError) -> ApiError {
    ApiError::DataLoss(format!("the history of {what} does not replay: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_tokens_round_trip_and_bad_ones_name_the_field() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        let token = format!("{}_{id}", at.timestamp_micros());
        assert_eq!(event_token(&token).unwrap(), Some((at, id)));
        assert_eq!(event_token("").unwrap(), None);
        for bad in ["x", "12_nope", "nope_0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f"] {
            let err = event_token(bad).unwrap_err().to_string();
            assert!(err.starts_with("page_token: "), "{err}");
        }
    }

    #[test]
    fn a_short_history_names_the_field_or_the_moment() {
        assert_eq!(
            AsOf::Seq(0).missing("job j", 3).to_string(),
            "as_of_seq: must be 1 or more"
        );
        assert_eq!(
            AsOf::Seq(9).missing("job j", 3).to_string(),
            "as_of_seq: job j has 3 events, not 9"
        );
        let at = DateTime::from_timestamp(0, 0).unwrap();
        assert!(matches!(
            AsOf::Time(at).missing("job j", 0),
            ApiError::NotFound { .. }
        ));
    }
}
