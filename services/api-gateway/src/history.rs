//! The event store read back: a job's history page by page, events across jobs by time, and
//! jobs and pipeline runs as they stood at an earlier event or moment, folded from their
//! events (the same fold the live projection was built by).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hodei_domain::{
    AttemptRecord, Job, JobEvent, JobId, JobState, PipelineRun, PipelineRunId, Principal, TenantId,
};
use hodei_proto::v1 as pb;
use hodei_runtime::Backends;
use hodei_storage::jobs::{self, EventFilter};
use hodei_storage::{EventRange, Tier, archive, pipelines};
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

/// Where a job or run named by a request is: in the hot tables (with its projection), or
/// moved by retention to the archive at a time.
pub enum Located<T> {
    Hot(T),
    Archived(DateTime<Utc>),
}

impl<T> Located<T> {
    pub fn tier(&self) -> Tier {
        match self {
            Located::Hot(_) => Tier::Hot,
            Located::Archived(_) => Tier::Archive,
        }
    }

    /// When it was archived, if it was.
    pub fn archived_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Located::Hot(_) => None,
            Located::Archived(at) => Some(*at),
        }
    }

    /// The live aggregate; an archived one only has its history left.
    pub fn live(self, what: &str) -> Result<T, ApiError> {
        match self {
            Located::Hot(found) => Ok(found),
            Located::Archived(at) => Err(ApiError::archived(what, at)),
        }
    }
}

/// Job `id` as `who` may see it: its projection, or when it was archived (NOT_FOUND if
/// neither, or if it belongs to a tenant `who` does not see).
pub async fn locate_job(
    backends: &Backends,
    who: &Principal,
    id: JobId,
) -> Result<Located<Job>, ApiError> {
    let pool = &backends.pool;
    let what = || format!("job {id}");
    if let Some(job) = backends.db(|| jobs::get(pool, id)).await? {
        return visible(who, job.tenant(), what).map(|()| Located::Hot(job));
    }
    match backends.db(|| archive::job_archived_at(pool, id)).await? {
        Some(archived) => {
            visible(who, &archived.tenant, what).map(|()| Located::Archived(archived.at))
        }
        None => Err(ApiError::not_found(what())),
    }
}

/// Run `id` as `who` may see it: its projection, or when it was archived (NOT_FOUND if
/// neither, or if it belongs to a tenant `who` does not see).
pub async fn locate_run(
    backends: &Backends,
    who: &Principal,
    id: PipelineRunId,
) -> Result<Located<PipelineRun>, ApiError> {
    let pool = &backends.pool;
    let what = || format!("pipeline run {id}");
    if let Some(run) = backends.db(|| pipelines::get(pool, id)).await? {
        return visible(who, run.tenant(), what).map(|()| Located::Hot(run));
    }
    match backends.db(|| archive::run_archived_at(pool, id)).await? {
        Some(archived) => {
            visible(who, &archived.tenant, what).map(|()| Located::Archived(archived.at))
        }
        None => Err(ApiError::not_found(what())),
    }
}

/// Another tenant's object is answered as if it did not exist: its existence is not told.
fn visible(
    who: &Principal,
    tenant: &TenantId,
    what: impl FnOnce() -> String,
) -> Result<(), ApiError> {
    if who.sees(tenant) {
        Ok(())
    } else {
        Err(ApiError::not_found(what()))
    }
}

async fn job_events(
    backends: &Backends,
    tier: Tier,
    id: JobId,
    range: EventRange,
) -> Result<Vec<JobEvent>, ApiError> {
    let pool = &backends.pool;
    Ok(match tier {
        Tier::Hot => backends.db(|| jobs::history(pool, id, range)).await?,
        Tier::Archive => {
            backends
                .db(|| archive::job_history(pool, id, range))
                .await?
        }
    })
}

/// Job `id` folded from its events in `tier`: as it stood at `as_of`, or as it ended (for an
/// archived job, which has no projection). The caller has located the job.
pub async fn job_as_of(
    backends: &Backends,
    id: JobId,
    tier: Tier,
    as_of: Option<AsOf>,
) -> Result<Job, ApiError> {
    let what = format!("job {id}");
    let range = as_of.map_or(EventRange::from(1), AsOf::range);
    let events = job_events(backends, tier, id, range).await?;
    check_recorded(as_of, &what, events.len())?;
    Job::from_events(&events).map_err(|e| unreadable(&what, e))
}

/// Run `id` folded from its events in `tier` (as it stood at `as_of`, or as it ended), with
/// its steps' jobs' attempts as they stood at the same moment (the time of the run's last
/// event folded, for `Seq`). The caller has located the run.
pub async fn run_as_of(
    backends: &Backends,
    id: PipelineRunId,
    tier: Tier,
    as_of: Option<AsOf>,
) -> Result<(PipelineRun, HashMap<JobId, Vec<AttemptRecord>>), ApiError> {
    let what = format!("pipeline run {id}");
    let range = as_of.map_or(EventRange::from(1), AsOf::range);
    let pool = &backends.pool;
    let events = match tier {
        Tier::Hot => backends.db(|| pipelines::history(pool, id, range)).await?,
        Tier::Archive => {
            backends
                .db(|| archive::run_history(pool, id, range))
                .await?
        }
    };
    check_recorded(as_of, &what, events.len())?;
    let run = PipelineRun::from_events(&events).map_err(|e| unreadable(&what, e))?;
    let moment = match as_of {
        Some(AsOf::Time(at)) => Some(at),
        Some(AsOf::Seq(_)) => Some(events.last().map_or(run.updated_at(), |e| e.at)),
        None => None,
    };
    let step_jobs: Vec<JobId> = run.steps().iter().filter_map(|s| s.job_id).collect();
    let histories = match tier {
        Tier::Hot => {
            backends
                .db(|| jobs::histories(pool, &step_jobs, moment))
                .await?
        }
        Tier::Archive => {
            backends
                .db(|| archive::job_histories(pool, &step_jobs, moment))
                .await?
        }
    };
    let mut attempts = HashMap::with_capacity(histories.len());
    for (job, events) in histories {
        let folded = Job::from_events(&events).map_err(|e| unreadable(&format!("job {job}"), e))?;
        attempts.insert(job, folded.attempts().to_vec());
    }
    Ok((run, attempts))
}

/// Whether the `recorded` events read for `what` are the history `as_of` asked for.
fn check_recorded(as_of: Option<AsOf>, what: &str, recorded: usize) -> Result<(), ApiError> {
    match as_of {
        Some(as_of)
            if recorded == 0 || matches!(as_of, AsOf::Seq(seq) if recorded as u64 != seq) =>
        {
            Err(as_of.missing(what, recorded))
        }
        None if recorded == 0 => Err(ApiError::DataLoss(format!("{what} has no events"))),
        _ => Ok(()),
    }
}

/// A page of job `id`'s events in `tier` after `page_token` (a sequence number), each with
/// the job's state after it. The caller has located the job.
pub async fn job_history(
    backends: &Backends,
    id: JobId,
    tier: Tier,
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
    let events = job_events(backends, tier, id, range).await?;
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
    who: &Principal,
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
    let tenant = who.listing_scope(request::optional_tenant(&req.tenant)?)?;
    let filter = EventFilter {
        from,
        to,
        types: req.types,
        tenant,
        labels: request::label_filters(req.labels)?,
        after: event_token(&req.page_token)?,
        limit,
    };
    let found = backends
        .db(|| jobs::list_events(&backends.pool, &filter))
        .await?;
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
    let (events, next_page_token) = request::fit_page(&found, events, limit, |e| {
        format!("{}_{}", e.event.at.timestamp_micros(), e.event.event_id)
    });
    Ok(pb::ListEventsResponse {
        events,
        next_page_token,
    })
}

/// The names a job event's `type` takes.
const EVENT_TYPES: [&str; 10] = [
    "submitted",
    "assigned",
    "started",
    "requeued",
    "succeeded",
    "failed",
    "timed_out",
    "cancel_requested",
    "preempt_requested",
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
        .filter(request::storable_time)
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
