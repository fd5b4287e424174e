//! Live updates as server-sent events. A page's live region listens to a feed that says
//! `change` when something it shows may have changed, then reloads its fragment through the
//! same authorized handlers that drew it; a log listens to its job's lines.
//!
//! - Lists (jobs, runs, workers, the overview) hear of changes from one NATS subscription to
//!   every domain event per gateway, fanned out in memory; a ping says only that some job,
//!   run or worker changed, never which or how.
//! - A job's and a run's page follow WatchJob and WatchPipelineRun from the version the page
//!   was drawn at, and a log follows StreamLogs from its next line: the same streams a gRPC
//!   client gets, with their authorization and the tenant's stream quota.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use futures::StreamExt;
use hodei_messaging::subjects;
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_server::JobService;
use hodei_proto::v1::pipeline_service_server::PipelineService;
use hodei_runtime::Backends;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::Console;
use super::pages::call;
use super::session::Caller;
use super::views::Failure;
use crate::quotas::StreamPermit;

/// What a domain event was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Job,
    Pipeline,
    Worker,
}

/// How long a feed gathers changes before it says `change` once for all of them: a busy
/// system makes a page reload a few times a second, not once per event.
const COALESCE: Duration = Duration::from_millis(400);

/// How long the subscription waits before subscribing again after NATS dropped it.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Changes one slow page may fall behind by before it is told to reload anyway.
const FEED_BUFFER: usize = 1024;

type Events = Sse<KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>;

/// Every domain event's kind, fanned out to the pages that listen.
#[derive(Clone)]
pub(super) struct Feed {
    tx: broadcast::Sender<Kind>,
}

impl Feed {
    pub(super) fn start(backends: Backends, shutdown: CancellationToken) -> Feed {
        let (tx, _) = broadcast::channel(FEED_BUFFER);
        let feed = Feed { tx: tx.clone() };
        tokio::spawn(async move {
            loop {
                match backends.nats.subscribe(subjects::all_events()).await {
                    Ok(mut events) => loop {
                        let message = tokio::select! {
                            () = shutdown.cancelled() => return,
                            m = events.next() => m,
                        };
                        let Some(message) = message else { break };
                        let kind = match subjects::event_aggregate(&message.subject) {
                            Some(("job", _)) => Kind::Job,
                            Some(("pipeline", _)) => Kind::Pipeline,
                            Some(("worker", _)) => Kind::Worker,
                            _ => continue,
                        };
                        // Nobody listening is fine.
                        let _ = tx.send(kind);
                    },
                    Err(e) => tracing::warn!(error = %e, "console could not subscribe to events"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
                }
            }
        });
        feed
    }
}

/// Says `change` when an event of one of `kinds` arrives, and every `every` regardless (for
/// what no event announces, such as a worker's last heartbeat).
fn changes(
    console: &Console,
    caller: &Caller,
    kinds: &'static [Kind],
    every: Duration,
) -> Result<Events, Failure> {
    let permit = permit(console, caller)?;
    let (tx, rx) = mpsc::channel(4);
    let mut events = console.live.tx.subscribe();
    let shutdown = console.shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut timer = tokio::time::interval(every);
        timer.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                _ = timer.tick() => {}
                received = events.recv() => match received {
                    Ok(kind) if kinds.contains(&kind) => {}
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
            tokio::time::sleep(COALESCE).await;
            while events.try_recv().is_ok() {}
            timer.reset();
            if tx
                .send(Ok(Event::default().event("change").data("changed")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()))
}

fn permit(console: &Console, caller: &Caller) -> Result<StreamPermit, Failure> {
    caller.principal.authorize(hodei_domain::Action::Read)?;
    Ok(console
        .services
        .quotas
        .open_stream(&caller.principal.tenant)?)
}

pub(super) async fn jobs_feed(
    State(console): State<Console>,
    caller: Caller,
) -> Result<Events, Failure> {
    changes(
        &console,
        &caller,
        &[Kind::Job, Kind::Worker],
        Duration::from_secs(5),
    )
}

pub(super) async fn runs_feed(
    State(console): State<Console>,
    caller: Caller,
) -> Result<Events, Failure> {
    changes(&console, &caller, &[Kind::Pipeline], Duration::from_secs(5))
}

pub(super) async fn workers_feed(
    State(console): State<Console>,
    caller: Caller,
) -> Result<Events, Failure> {
    changes(&console, &caller, &[Kind::Worker], Duration::from_secs(2))
}

#[derive(Deserialize)]
pub(super) struct From {
    #[serde(default)]
    from: u64,
}

/// The sequence number after the one the browser last saw, when it reconnects.
fn resume_after(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|seen| seen + 1)
}

/// Forwards `stream`'s items as events made by `event`, then says `end` (the browser closes
/// instead of reconnecting) when it ends without an error.
fn forward<T, S>(
    shutdown: CancellationToken,
    mut stream: S,
    event: impl Fn(T) -> Event + Send + 'static,
) -> Events
where
    T: Send + 'static,
    S: futures::Stream<Item = Result<T, tonic::Status>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(item)) => {
                    if tx.send(Ok(event(item))).await.is_err() {
                        return;
                    }
                }
                Some(Err(status)) => {
                    // Without `end` the browser reconnects, resuming after its last event.
                    tracing::debug!(error = %status, "console stream ended with an error");
                    return;
                }
                None => {
                    let _ = tx.send(Ok(Event::default().event("end").data("end"))).await;
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

pub(super) async fn job_events(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
    Query(from): Query<From>,
    headers: HeaderMap,
) -> Result<Events, Failure> {
    let from_seq = resume_after(&headers).unwrap_or(from.from);
    let stream = console
        .services
        .jobs
        .watch_job(call(
            &caller,
            pb::WatchJobRequest {
                job_id: id,
                from_seq,
            },
        ))
        .await?
        .into_inner();
    Ok(forward(
        console.shutdown.clone(),
        stream,
        |e: pb::JobEvent| changed(e.seq, e.r#type),
    ))
}

pub(super) async fn run_events(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
    Query(from): Query<From>,
    headers: HeaderMap,
) -> Result<Events, Failure> {
    let from_seq = resume_after(&headers).unwrap_or(from.from);
    let stream = console
        .services
        .pipelines
        .watch_pipeline_run(call(
            &caller,
            pb::WatchPipelineRunRequest {
                run_id: id,
                from_seq,
            },
        ))
        .await?
        .into_inner();
    Ok(forward(
        console.shutdown.clone(),
        stream,
        |e: pb::PipelineEvent| changed(e.seq, e.r#type),
    ))
}

/// A `change` that names the event it came from: its id is where a reconnect resumes.
fn changed(seq: u64, kind: String) -> Event {
    Event::default()
        .event("change")
        .id(seq.to_string())
        .data(kind)
}

/// One log line as the page's script reads it.
#[derive(serde::Serialize)]
struct Line<'a> {
    seq: u64,
    attempt: u32,
    stderr: bool,
    text: &'a str,
}

pub(super) async fn job_log(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
    Query(from): Query<From>,
    headers: HeaderMap,
) -> Result<Events, Failure> {
    let from_sequence = resume_after(&headers).unwrap_or(from.from);
    let stream = console
        .services
        .jobs
        .stream_logs(call(
            &caller,
            pb::StreamLogsRequest {
                job_id: id,
                from_sequence,
                follow: true,
            },
        ))
        .await?
        .into_inner();
    Ok(forward(
        console.shutdown.clone(),
        stream,
        |l: pb::LogLine| {
            let line = Line {
                seq: l.sequence,
                attempt: l.attempt,
                stderr: l.stream == pb::LogStream::Stderr as i32,
                text: &l.text,
            };
            let data = serde_json::to_string(&line).unwrap_or_default();
            Event::default()
                .event("line")
                .id(l.sequence.to_string())
                .data(data)
        },
    ))
}
