//! Live updates as server-sent events. A page's live region listens to a feed that says
//! `change` when something it shows may have changed, then reloads its fragment through the
//! same authorized handlers that drew it; a log listens to its job's lines.
//!
//! - Lists (jobs, runs, workers, the overview) hear of changes from one NATS subscription to
//!   every domain event per gateway, fanned out in memory; a ping says only that some job,
//!   run or worker changed, never which or how. The subscription lasts while a page listens:
//!   with no console page open, NATS sends the gateway no event at all.
//! - A job's and a run's page follow WatchJob and WatchPipelineRun from the version the page
//!   was drawn at, and a log follows StreamLogs from its next line: the same streams a gRPC
//!   client gets, with their authorization and the tenant's stream quota.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use futures::StreamExt;
use hodei_messaging::subjects;
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_server::JobService;
use hodei_proto::v1::pipeline_service_server::PipelineService;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};
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
    /// How many pages listen: the subscription is made at the first and dropped after the
    /// last.
    listeners: Arc<watch::Sender<usize>>,
}

/// A page listening to the feed; the feed stays subscribed while one is held.
pub(super) struct Listening {
    changes: broadcast::Receiver<Kind>,
    listeners: Arc<watch::Sender<usize>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.listeners.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Feed {
    pub(super) fn start(nats: async_nats::Client, shutdown: CancellationToken) -> Feed {
        let (tx, _) = broadcast::channel(FEED_BUFFER);
        let listeners = Arc::new(watch::Sender::new(0));
        tokio::spawn(relay(nats, tx.clone(), listeners.subscribe(), shutdown));
        Feed { tx, listeners }
    }

    /// Starts listening: the changes from now on (and one of each kind once the feed has
    /// subscribed, for what it may have missed before).
    pub(super) fn listen(&self) -> Listening {
        let changes = self.tx.subscribe();
        self.listeners.send_modify(|n| *n += 1);
        Listening {
            changes,
            listeners: self.listeners.clone(),
        }
    }
}

/// Subscribes to every domain event while a page listens and sends each one's kind to the
/// pages; drops the subscription when the last page has gone.
async fn relay(
    nats: async_nats::Client,
    tx: broadcast::Sender<Kind>,
    mut listeners: watch::Receiver<usize>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            listening = listeners.wait_for(|n| *n > 0) => if listening.is_err() { return },
        }
        let mut events = match nats.subscribe(subjects::all_events()).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "console could not subscribe to events");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RESUBSCRIBE_AFTER) => continue,
                }
            }
        };
        // What changed while the feed was not subscribed went unheard: every page reloads once
        // (after the feed's coalescing wait, by when the server has long had the subscription).
        for kind in [Kind::Job, Kind::Pipeline, Kind::Worker] {
            let _ = tx.send(kind);
        }
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                changed = listeners.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *listeners.borrow_and_update() == 0 {
                        break;
                    }
                    continue;
                }
                m = events.next() => m,
            };
            let Some(message) = message else {
                // NATS dropped the subscription: subscribe again shortly.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RESUBSCRIBE_AFTER) => break,
                }
            };
            let kind = match subjects::event_aggregate(&message.subject) {
                Some(("job", _)) => Kind::Job,
                Some(("pipeline", _)) => Kind::Pipeline,
                Some(("worker", _)) => Kind::Worker,
                _ => continue,
            };
            // Every page may have gone meanwhile.
            let _ = tx.send(kind);
        }
        if let Err(e) = events.unsubscribe().await {
            tracing::debug!(error = %e, "console could not unsubscribe from events");
        }
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
    let mut listening = console.live.listen();
    let shutdown = console.shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let events = &mut listening.changes;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use async_nats::RequestErrorKind;
    use async_nats::client::Request;
    use hodei_test_support::{TestNats, wait_for};

    const DEADLINE: Duration = Duration::from_secs(10);
    const EVENT: &str = "hodei.v1.evt.job.0193a1b2-0000-7000-8000-000000000000.started";

    /// Whether NATS has a subscriber for a job event (a request nobody subscribes to is
    /// answered at once with "no responders").
    async fn heard(probe: &async_nats::Client) -> bool {
        let request = Request::new()
            .payload("{}".into())
            .timeout(Some(Duration::from_millis(200)));
        match probe.send_request(EVENT, request).await {
            Err(e) => e.kind() != RequestErrorKind::NoResponders,
            Ok(_) => true,
        }
    }

    #[tokio::test]
    async fn the_feed_is_subscribed_only_while_a_page_listens() {
        let nats = TestNats::start().await.unwrap();
        let gateway = async_nats::connect(nats.url()).await.unwrap();
        let probe = async_nats::connect(nats.url()).await.unwrap();
        let shutdown = CancellationToken::new();
        let feed = Feed::start(gateway.clone(), shutdown.clone());

        // No page: nothing subscribes, so no event reaches this gateway.
        assert!(!heard(&probe).await);
        assert_eq!(gateway.statistics().in_messages.load(Ordering::Relaxed), 0);

        // A page listens: first a change of each kind, then the events' kinds.
        let mut page = feed.listen();
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(
                tokio::time::timeout(DEADLINE, page.changes.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        assert_eq!(first, [Kind::Job, Kind::Pipeline, Kind::Worker]);
        // Once the server has the subscription (its client only writes it to the socket), an
        // event's kind reaches the page. The probe's requests are job events.
        wait_for(
            "the server to have the feed's subscription",
            DEADLINE,
            || async { heard(&probe).await.then_some(()) },
        )
        .await
        .unwrap();
        probe
            .publish("hodei.v1.evt.worker.w-1.lost", "{}".into())
            .await
            .unwrap();
        probe.flush().await.unwrap();
        tokio::time::timeout(DEADLINE, async {
            while page.changes.recv().await.unwrap() != Kind::Worker {}
        })
        .await
        .unwrap();

        // Two pages, one leaves: still subscribed.
        let other = feed.listen();
        drop(page);
        assert!(heard(&probe).await);

        // The last page leaves: the subscription goes.
        drop(other);
        wait_for("the feed to unsubscribe", DEADLINE, || async {
            (!heard(&probe).await).then_some(())
        })
        .await
        .unwrap();
        shutdown.cancel();
    }
}
