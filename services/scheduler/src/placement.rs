//! Placement: filter the live workers with the job's specification (labels, slots, free
//! resources), rank them (most free slots, then most free CPU: spreading load), and commit
//! the reservation and the assignment in one transaction guarded by both aggregates'
//! versions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use chrono::Utc;
use futures::StreamExt;
use hodei_domain::specification::Specification;
use hodei_domain::worker::{can_take_job, can_take_sealed};
use hodei_domain::{
    AttemptId, Capacity, FairQueue, Job, JobEvent, JobId, JobSpec, JobState, Resources, Shares,
    TenantId, Worker, WorkerId,
};
use hodei_messaging::seal::{OpeningKey, SealError, SealingKey, is_sealed};
use hodei_messaging::settle::dead_letter;
use hodei_messaging::{AgentCommand, Outgoing, PlaceJob, streams, trace};
use hodei_storage::driver::Transition;
use hodei_storage::{StorageError, driver, jobs, outbox, tenants, workers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::worker_index::WorkerIndex;
use crate::{Context, SERVICE, SOURCE, SchedulerError};

/// How good a home `w` is for a job (greater is better): most free slots, then most free
/// CPU, then the smallest id, so equal workers are picked in a stable order (spread).
fn preference(w: &Worker) -> (u32, u64, std::cmp::Reverse<&str>) {
    (
        w.free_slots(),
        w.free_capacity().cpu_millis,
        std::cmp::Reverse(w.id().as_str()),
    )
}

/// Workers that can take `job`, best first.
pub fn rank<'a>(workers: &'a [Worker], job: &Job) -> Vec<&'a Worker> {
    let spec = can_take_job(job.spec());
    let mut fit: Vec<(_, &Worker)> = workers
        .iter()
        .filter(|w| spec.is_satisfied_by(w))
        .map(|w| (preference(w), w))
        .collect();
    fit.sort_by(|a, b| b.0.cmp(&a.0));
    fit.into_iter().map(|(_, w)| w).collect()
}

/// The worker [`rank`] puts first, found in one pass: what a placement needs.
pub fn best<'a>(workers: &'a [Worker], job: &Job) -> Option<&'a Worker> {
    let spec = can_take_job(job.spec());
    workers
        .iter()
        .filter(|w| spec.is_satisfied_by(w))
        .max_by_key(|w| preference(w))
}

/// Why no worker can take `job`, for a person: each worker with what it lacks.
pub fn explain(workers: &[Worker], job: &Job) -> String {
    if workers.is_empty() {
        return "no live workers".to_owned();
    }
    let spec = can_take_job(job.spec());
    let parts: Vec<String> = workers
        .iter()
        .take(10)
        .map(|w| format!("{}: needs {}", w.id(), spec.unmet(w).join(", ")))
        .collect();
    let more = workers.len().saturating_sub(10);
    let suffix = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    format!("waiting for a worker ({}{suffix})", parts.join("; "))
}

/// What became of a placement request.
#[derive(Debug, Clone, Copy)]
enum Placement {
    Placed,
    /// The job moved on since the request was queued.
    Stale,
    /// The job's retry backoff has not passed.
    NotYet(Duration),
    /// No worker can take it now.
    NoWorker,
}

/// Consumes placement requests until `shutdown`. Each round takes the requests that are
/// ready (up to 256) together with the blocked ones, by priority, and places them in one
/// transaction. A request no live worker can take now is held in memory (blocked, its
/// message kept in progress) rather than asked for again later: it is tried again as soon as
/// a report frees a slot on this scheduler, and every `placement_retry_ms` for capacity that
/// appears elsewhere (a new worker, another replica's reports). Nomad's blocked evaluations
/// work the same way.
pub(crate) async fn run(
    ctx: Context,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let messages = consumer
        .messages()
        .await
        .map_err(|e| SchedulerError::Consume {
            what: "placements",
            reason: e.to_string(),
        })?;
    let mut batches = messages.ready_chunks(256);
    let mut blocked = Blocked::default();
    let mut view = WorkerView::default();
    let mut refresh = Refresh::default();
    let mut tick = tokio::time::interval(Duration::from_millis(ctx.config.placement_retry_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    loop {
        let (requests, pass) = tokio::select! {
            () = shutdown.cancelled() => {
                blocked.release(&ctx).await;
                return Ok(());
            }
            batch = batches.next() => {
                let Some(batch) = batch else {
                    blocked.release(&ctx).await;
                    return Ok(());
                };
                (decode(&ctx, batch).await, Pass::Freed)
            }
            () = ctx.capacity.notified(), if !blocked.is_empty() => (Vec::new(), Pass::Freed),
            _ = tick.tick(), if !blocked.is_empty() => {
                blocked.keep_alive(&ctx).await;
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(FULL_PASS_EVERY) {
                    (Vec::new(), Pass::Full)
                } else {
                    (Vec::new(), Pass::Tick)
                }
            }
        };
        // The shared view of the live workers serves the whole round (see `WorkerView`);
        // the periodic retries read it afresh. Otherwise an old view is read again in the
        // background and the rounds go on with it meanwhile.
        if pass != Pass::Freed {
            view.forget();
        } else {
            refresh.tend(&ctx, &mut view).await;
        }
        for worker in ctx.take_freed() {
            view.saved(worker);
        }
        let requests = match blocked.with(&ctx, requests, pass, &mut view).await {
            Ok(requests) => requests,
            Err(e) => {
                tracing::warn!(error = %e, "failed to read the live workers for placement");
                continue;
            }
        };
        let (waiting, one_by_one) = place_batch(&ctx, requests, &mut view).await;
        blocked.hold(&ctx, waiting);
        for request in one_by_one {
            handle(&ctx, &request.item, &request.message, &mut view)
                .instrument(request.span.clone())
                .await;
        }
    }
}

/// Decodes a batch of placement requests; dead-letters those that do not decode.
async fn decode(
    ctx: &Context,
    batch: Vec<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>>,
) -> Vec<Request> {
    let mut decoded = Vec::with_capacity(batch.len());
    for message in batch {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                ctx.backends.metrics.nats_error("consume");
                tracing::warn!(error = %e, "failed to receive a placement request");
                continue;
            }
        };
        match hodei_messaging::decode::<PlaceJob>(&message.subject, &message.payload) {
            Ok(item) => decoded.push(Request {
                span: trace::process_span(
                    SERVICE,
                    &message.subject,
                    streams::PLACER,
                    message.headers.as_ref(),
                ),
                item,
                message,
                blocked: None,
                fit: None,
            }),
            Err(e) => {
                ctx.backends.metrics.message_dead_lettered("place");
                dead_letter(&ctx.backends.js, &message, "place", &e.to_string()).await;
            }
        }
    }
    decoded
}

/// A placement request with the span it is processed in.
struct Request {
    item: PlaceJob,
    message: Message,
    span: tracing::Span,
    /// Since when it waits for a worker, and when its message was last kept in progress.
    blocked: Option<(Instant, Instant)>,
    /// What it needs of a worker, as the round that found none read its job.
    fit: Option<Fit>,
}

impl Request {
    /// Its priority: as its job counts it once a round has read the job (see [`Fit`]), as
    /// the request says before.
    fn priority(&self) -> i32 {
        self.fit
            .as_ref()
            .map_or(self.item.priority, |fit| fit.priority)
    }
}

/// What a blocked request's job needs of a worker, kept from the round that found none, so
/// that later rounds read only the blocked jobs that a worker of the view could now take
/// (a saturated queue is not read again at each freed slot or retry).
#[derive(Debug, Clone)]
struct Fit {
    required_labels: BTreeMap<String, String>,
    resources: Resources,
    secrets: bool,
    /// When it waits for its tenant's quota rather than for a worker.
    quota: bool,
    /// When its queue timeout passes: it is then read, to be failed with its reason.
    deadline: chrono::DateTime<Utc>,
    /// The priority its job counts with (its own, or its tenant's `max_priority` if lower).
    priority: i32,
}

impl Fit {
    fn of(job: &Job, quota: bool, queue_timeout: chrono::Duration, shares: &Shares) -> Fit {
        let spec = job.spec();
        Fit {
            required_labels: spec.required_labels.clone(),
            resources: spec.resources,
            secrets: spec.has_secrets(),
            quota,
            deadline: job.updated_at() + queue_timeout,
            priority: shares.priority_of(job),
        }
    }
}

/// Which blocked requests a round takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A slot was freed on this scheduler, or new requests came: those a worker of the view
    /// can take, no more than its free slots.
    Freed,
    /// The periodic retry, on a fresh view: as `Freed`, and also the first [`PREEMPT_LOOK`]
    /// by priority (which may preempt) and those past their queue timeout.
    Tick,
    /// Every [`FULL_PASS_EVERY`]th retry: every blocked request, so their reasons are
    /// written afresh and none waits on what `Fit` leaves out.
    Full,
}

/// Every how many periodic retries all blocked requests are read.
const FULL_PASS_EVERY: u32 = 10;
/// The blocked requests, by priority, that a periodic retry reads even when no worker has
/// room for them, for preemption to consider.
const PREEMPT_LOOK: usize = 8;

/// Requests no live worker could take when they were last tried, oldest first.
#[derive(Default)]
struct Blocked {
    requests: Vec<Request>,
}

impl Blocked {
    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The requests of a round: `new` ones and, by priority (then age), the blocked ones the
    /// `pass` takes (see [`Pass`]). Taking no more than the view's free slots for capacity
    /// (a placement takes at least one), and only requests that a worker of the view could
    /// take, a freed slot does not re-read every blocked job, nor do jobs no free worker can
    /// take stand in front of one that it can.
    async fn with(
        &mut self,
        ctx: &Context,
        new: Vec<Request>,
        pass: Pass,
        view: &mut WorkerView,
    ) -> Result<Vec<Request>, StorageError> {
        let mut round = Vec::with_capacity(new.len() + self.requests.len());
        if !self.requests.is_empty() {
            // Highest priority first, the longest blocked first among equals: a request
            // taken and held again keeps its place.
            self.requests.sort_by_key(|r| {
                (
                    std::cmp::Reverse(r.priority()),
                    r.blocked.map(|(since, _)| since),
                )
            });
            if pass == Pass::Full {
                round.append(&mut self.requests);
            } else {
                let read = ctx
                    .backends
                    .db(|| view.get(&ctx.backends.pool, live_since(ctx)))
                    .await;
                let read = match read {
                    Ok((_, read)) => read,
                    Err(e) => {
                        // The new requests wait with the others, kept in progress, rather
                        // than for their ack wait to pass.
                        self.hold(ctx, new);
                        return Err(e);
                    }
                };
                // The round's own first look at the view must still see it as fresh.
                view.unseen = read;
                let now = Utc::now();
                let taken = pick(
                    self.requests.iter().map(|r| r.fit.as_ref()),
                    free_slots(view.live()),
                    |fit| view.fits(fit),
                    (pass == Pass::Tick).then_some(now),
                );
                let mut kept = Vec::with_capacity(self.requests.len());
                for (request, take) in self.requests.drain(..).zip(taken) {
                    if take {
                        round.push(request);
                    } else {
                        kept.push(request);
                    }
                }
                self.requests = kept;
            }
        }
        round.extend(new);
        round.sort_by_key(|r| std::cmp::Reverse(r.priority()));
        Ok(round)
    }

    /// Holds requests that wait for a worker (those with a fit), or for PostgreSQL.
    fn hold(&mut self, ctx: &Context, waiting: Vec<Request>) {
        let now = Instant::now();
        for mut request in waiting {
            if request.blocked.is_none() {
                let why = if request.fit.is_some() {
                    "no_worker"
                } else {
                    "error"
                };
                ctx.backends.metrics.placement(why);
                request.blocked = Some((now, now));
            }
            self.requests.push(request);
        }
        ctx.backends
            .metrics
            .placements_blocked
            .set(i64::try_from(self.requests.len()).unwrap_or(i64::MAX));
    }

    /// Keeps the messages of long-blocked requests from being delivered again (to this or
    /// another replica) while they are held: progress is sent every third of the ack wait.
    async fn keep_alive(&mut self, ctx: &Context) {
        let every = Duration::from_millis(ctx.config.ack_wait_ms / 3);
        let now = Instant::now();
        for request in &mut self.requests {
            if let Some((_, progress)) = &mut request.blocked
                && now.duration_since(*progress) >= every
            {
                if let Err(e) = request.message.ack_with(AckKind::Progress).await {
                    ctx.backends.metrics.nats_error("ack");
                    tracing::warn!(job_id = %request.item.job_id, error = %e, "failed to keep a blocked placement request");
                }
                *progress = now;
            }
        }
    }

    /// Hands every held request back to the stream at once (shutdown): another replica
    /// takes them.
    async fn release(&mut self, ctx: &Context) {
        for request in self.requests.drain(..) {
            if let Err(e) = request.message.ack_with(AckKind::Nak(None)).await {
                ctx.backends.metrics.nats_error("ack");
                tracing::warn!(job_id = %request.item.job_id, error = %e, "failed to hand back a blocked placement request");
            }
        }
        ctx.backends.metrics.placements_blocked.set(0);
    }
}

/// Which of the blocked requests (their fits, in priority order) a round takes: while free
/// slots last, those that `fits` (one a worker could take now; without a fit, any), each
/// counted against one slot (those waiting for their tenant's quota against slots of their
/// own, so they never stand in front of the others); and on a periodic retry (`retry_at`, its
/// time) also the first [`PREEMPT_LOOK`] and those past their queue timeout (not those held
/// by their quota, which a queue timeout does not end). Those last held by their quota have
/// [`PREEMPT_LOOK`] places of their own (preemption does not act for one still held, so they
/// never take the others' places; one whose quota has freed since may then preempt).
fn pick<'a>(
    fits_of: impl Iterator<Item = Option<&'a Fit>>,
    free: usize,
    fits: impl Fn(&Fit) -> bool,
    retry_at: Option<chrono::DateTime<Utc>>,
) -> Vec<bool> {
    let (mut room, mut quota_room) = (free, free);
    let (mut looks, mut quota_looks) = (PREEMPT_LOOK, PREEMPT_LOOK);
    fits_of
        .map(|fit| {
            let held = fit.is_some_and(|f| f.quota);
            let (room, looks) = if held {
                (&mut quota_room, &mut quota_looks)
            } else {
                (&mut room, &mut looks)
            };
            let fits = *room > 0 && fit.is_none_or(&fits);
            if fits {
                *room -= 1;
            }
            let retried = retry_at.is_some_and(|now| {
                let look = *looks > 0;
                if look {
                    *looks -= 1;
                }
                look || fit.is_some_and(|f| !f.quota && f.deadline <= now)
            });
            fits || retried
        })
        .collect()
}

/// Workers that beat since this instant count as live.
fn live_since(ctx: &Context) -> chrono::DateTime<Utc> {
    Utc::now()
        - chrono::Duration::milliseconds(
            i64::try_from(ctx.config.worker_stale_ms).unwrap_or(i64::MAX),
        )
}

/// Places a round of requests (in priority order) in one transaction: the jobs are read
/// together, each goes to the best worker of the view (which keeps the reservations made so
/// far), and every job, worker and message is written with set-based statements. Settles
/// the requests it decided (placed, stale, not yet due); returns those that wait for a worker
/// (none in the view, read this round, can take them; each with its reason recorded on the
/// job), and those left for [`handle`]: past their queue timeout, or all of them when the
/// round could not be written as a whole (a job or worker moved, PostgreSQL away).
async fn place_batch(
    ctx: &Context,
    requests: Vec<Request>,
    view: &mut WorkerView,
) -> (Vec<Request>, Vec<Request>) {
    let started = Instant::now();
    // Recorded reports free slots all the time, so a round often finds a worker it reserved
    // on moved: it is decided again against a fresh read before falling back.
    let mut tries = 0;
    let decided = loop {
        tries += 1;
        match decide_batch(ctx, &requests, view).await {
            Err(e) if e.is_conflict() && tries < ROUND_TRIES => view.forget(),
            decided => break decided,
        }
    };
    match decided {
        Ok(decided) => {
            let mut outcome: Vec<Option<Decision>> = vec![None; requests.len()];
            for (i, decision) in decided {
                outcome[i] = Some(decision);
            }
            let (mut waiting, mut rest) = (Vec::new(), Vec::new());
            for (request, decision) in requests.into_iter().zip(outcome) {
                match decision {
                    Some(Decision::Settled(placement)) => {
                        settle(ctx, &request, &Ok(placement), Some(started)).await;
                    }
                    Some(Decision::Waits(fit)) => {
                        let mut request = request;
                        request.fit = Some(fit);
                        waiting.push(request);
                    }
                    None => rest.push(request),
                }
            }
            (waiting, rest)
        }
        // PostgreSQL away (the breaker has opened: a round that failed or timed out alone is
        // placed one by one): the requests are held, kept in progress, and tried again at the
        // next retry (as requests waiting for a worker are), not handed back to be delivered
        // again and again while it lasts.
        Err(e) if e.is_unavailable() && ctx.backends.postgres_away() => {
            view.forget();
            (requests, Vec::new())
        }
        Err(e) => {
            view.forget();
            if requests.len() > 1 {
                tracing::debug!(error = %e, count = requests.len(), "placement batch not written together, placing one by one");
            }
            (Vec::new(), requests)
        }
    }
}

/// How many times a round is decided before its requests are placed one by one.
const ROUND_TRIES: u32 = 4;

/// What a round decided for one request.
#[derive(Debug, Clone)]
enum Decision {
    /// Placed, stale or not yet due: settled now.
    Settled(Placement),
    /// No worker (or its tenant's quota) lets it run now: what it needs.
    Waits(Fit),
}

/// Jobs read from the head of each tenant's queue in a round with free slots.
const HEADS_PER_TENANT: usize = 16;

/// A job a round may place: from one of its requests (its index), or from the head of its
/// tenant's queue, whose request another replica holds or has not reached this one yet.
struct Candidate {
    request: Option<usize>,
    job: Job,
}

async fn decide_batch(
    ctx: &Context,
    requests: &[Request],
    view: &mut WorkerView,
) -> Result<Vec<(usize, Decision)>, StorageError> {
    let round_started = Instant::now();
    let mut laps = crate::Laps::start();
    let pool = &ctx.backends.pool;
    // The workers are read before the clock: a slot this round takes was freed (and the
    // freeing attempt's end stamped) before its `assigned_at`, so a worker's recorded
    // attempts never overlap beyond its slots.
    let (live, view_fresh) = ctx.backends.db(|| view.get(pool, live_since(ctx))).await?;
    let workers_ms = laps.lap();
    let free = free_slots(live);
    let now = Utc::now();
    let queue_timeout = chrono::Duration::milliseconds(
        i64::try_from(ctx.config.queue_timeout_ms).unwrap_or(i64::MAX),
    );
    let ids: Vec<JobId> = requests.iter().map(|r| r.item.job_id).collect();
    let mut jobs = ctx.backends.db(|| jobs::get_many(pool, &ids)).await?;
    let jobs_ms = laps.lap();
    // Global priority: with a slot free, the head of every tenant's queue joins the round, so
    // the highest-priority job anywhere in the queue is considered first, whichever replica
    // holds its request and however many requests are ahead of it.
    let heads = if free > 0 {
        let per_tenant = i64::try_from(free.min(HEADS_PER_TENANT)).unwrap_or(1);
        ctx.backends
            .db(|| jobs::queued_heads(pool, per_tenant, now))
            .await?
    } else {
        Vec::new()
    };
    let heads_ms = laps.lap();
    let (mut shares, fresh) = ctx.backends.db(|| view.shares(pool)).await?;
    let mut decided = Vec::with_capacity(requests.len());
    let mut candidates = Vec::with_capacity(requests.len() + heads.len());
    for (i, request) in requests.iter().enumerate() {
        let item = &request.item;
        let Some(job) = jobs.remove(&item.job_id) else {
            tracing::warn!(parent: &request.span, job_id = %item.job_id, "placement request for an unknown job dropped");
            decided.push((i, Decision::Settled(Placement::Stale)));
            continue;
        };
        if job.state() != JobState::Queued || job.current_attempt() != item.attempt {
            decided.push((i, Decision::Settled(Placement::Stale)));
            continue;
        }
        if let Some(wait) = job.not_before().and_then(|t| (t - now).to_std().ok()) {
            decided.push((i, Decision::Settled(Placement::NotYet(wait))));
            continue;
        }
        candidates.push(Candidate {
            request: Some(i),
            job,
        });
    }
    // A head joins when this round's own jobs would not decide its place the same way: it
    // has a higher priority than all of them, its tenant has none of them, or they cannot
    // fill the free slots. (Otherwise every busy replica would add the same heads and lose
    // rounds to each other's conflicts.)
    let in_round: std::collections::HashSet<JobId> = ids.iter().copied().collect();
    let own_top = candidates.iter().map(|c| shares.priority_of(&c.job)).max();
    let own_tenants: std::collections::HashSet<TenantId> =
        candidates.iter().map(|c| c.job.tenant().clone()).collect();
    let room = candidates.len() < free;
    for job in heads {
        let joins = room
            || own_top.is_none_or(|top| shares.priority_of(&job) > top)
            || !own_tenants.contains(job.tenant());
        if joins && !in_round.contains(&job.id()) {
            candidates.push(Candidate { request: None, job });
        }
    }
    if fresh {
        let queued: Vec<TenantId> = candidates.iter().map(|c| c.job.tenant().clone()).collect();
        for line in shares.view(&queued) {
            ctx.backends.metrics.set_tenant_share(
                line.tenant.as_str(),
                line.share,
                line.entitled,
                i64::try_from(line.usage.running_jobs).unwrap_or(i64::MAX),
            );
        }
    }
    let mut queue = FairQueue::new(candidates.into_iter().map(|c| {
        (
            shares.priority_of(&c.job),
            c.job.tenant().clone(),
            c.job.id(),
            c,
        )
    }));
    let mut transitions = Vec::new();
    let mut reasons: Vec<(JobId, String)> = Vec::new();
    // Each reserved worker, the version it was read at and the attempts reserved on it, in
    // the order first reserved.
    let mut reserved: Vec<(WorkerId, u64, Vec<AttemptId>)> = Vec::new();
    // Each assignment's transition and when its job became placeable.
    let mut waits: Vec<(usize, chrono::DateTime<Utc>)> = Vec::new();
    let mut charged: Vec<(TenantId, Resources)> = Vec::new();
    // This scheduler's requests that no worker can take now: candidates for preemption.
    let mut unplaced: Vec<Job> = Vec::new();
    // Jobs placed from the head of their tenant's queue (their requests are settled by whoever
    // holds them, as stale): counted here once committed.
    let mut bare_placed = 0;
    while let Some((tenant, Candidate { request, mut job })) = queue.next(&shares) {
        let span = request.map_or_else(tracing::Span::current, |i| requests[i].span.clone());
        if let Some(hold) = shares.hold(&tenant, &job.spec().resources) {
            let reason = hold.reason(&tenant);
            if job.reason() != Some(reason.as_str()) {
                reasons.push((job.id(), reason));
            }
            if let Some(i) = request {
                decided.push((
                    i,
                    Decision::Waits(Fit::of(&job, true, queue_timeout, &shares)),
                ));
            }
            continue;
        }
        ctx.backends.db(|| view.get(pool, live_since(ctx))).await?;
        let Some(worker_id) = view.best(&job).map(|w| w.id().clone()) else {
            // The view was read above: this takes no query.
            let (live, _) = ctx.backends.db(|| view.get(pool, live_since(ctx))).await?;
            // Past its queue timeout, the one-by-one path fails it with the reason; a job
            // from the head of the queue is left to whoever holds its request.
            if let Some(i) = request
                && now - job.updated_at() <= queue_timeout
            {
                let reason = explain(live, &job);
                if job.reason() != Some(reason.as_str()) {
                    reasons.push((job.id(), reason));
                }
                decided.push((
                    i,
                    Decision::Waits(Fit::of(&job, false, queue_timeout, &shares)),
                ));
                unplaced.push(job);
            }
            continue;
        };
        let job_version = job.version();
        let placeable_since = placeable_since(&job);
        let _entered = span.enter();
        let Some(reserved_on) = view.update_worker(&worker_id, |worker| {
            let read_version = worker.version();
            reserve(&mut job, worker, now, ctx.secrets.as_ref()).map(|r| (r, read_version))
        }) else {
            continue;
        };
        let ((event, command), read_version) = reserved_on?;
        let placed = command.is_some();
        // Only a worker given an attempt is saved (and locked) with the batch.
        if placed {
            let attempt = AttemptId::new(job.id(), job.current_attempt());
            match reserved.iter_mut().find(|(id, _, _)| id == &worker_id) {
                Some((_, _, added)) => added.push(attempt),
                None => reserved.push((worker_id.clone(), read_version, vec![attempt])),
            }
        }
        let extra = match command {
            Some(command) => vec![Outgoing::agent_command(&worker_id, &command)?],
            None => Vec::new(),
        };
        if placed {
            shares.charge(&tenant, &job.spec().resources);
            charged.push((tenant, job.spec().resources));
            waits.push((transitions.len(), placeable_since));
        }
        transitions.push(Transition {
            extra,
            job,
            expected_version: job_version,
            events: vec![event],
            span: span.clone(),
        });
        match (request, placed) {
            (Some(i), true) => decided.push((i, Decision::Settled(Placement::Placed))),
            (Some(i), false) => decided.push((i, Decision::Settled(Placement::Stale))),
            (None, true) => bare_placed += 1,
            (None, false) => {}
        }
    }
    // Preemptions are decided on workers read for this round only (a view kept from earlier
    // rounds may miss slots other replicas freed), after its own placements.
    let preemptions = if view_fresh && !unplaced.is_empty() {
        preempt(ctx, &unplaced, view, &shares, now).await?
    } else {
        Preemptions::default()
    };
    view.keep_shares(shares);
    if !transitions.is_empty() || !reasons.is_empty() {
        let saves: Vec<(&Worker, u64, &[AttemptId])> = reserved
            .iter()
            .filter_map(|(id, version, added)| {
                view.worker(id).map(|w| (w, *version, added.as_slice()))
            })
            .collect();
        let decide_ms = laps.lap();
        let mut tx = pool.begin().await?;
        let begin_ms = laps.lap();
        verify_quotas(&mut tx, &charged).await?;
        let quotas_ms = laps.lap();
        let saved = driver::reserve_slots(&mut tx, &saves).await?;
        let reserve_ms = laps.lap();
        let committed = driver::commit_transitions(&mut tx, &transitions, &[], SOURCE).await?;
        let save_ms = laps.lap();
        jobs::set_pending_reasons(&mut tx, &reasons).await?;
        let reasons_ms = laps.lap();
        tx.commit().await?;
        // Where a round's time goes, step by step (BENCHMARKS.md, "Where a placement round's
        // and a report batch's time goes").
        tracing::debug!(
            requests = requests.len(),
            transitions = transitions.len(),
            workers_ms,
            jobs_ms,
            heads_ms,
            decide_ms,
            begin_ms,
            quotas_ms,
            reserve_ms,
            save_ms,
            reasons_ms,
            commit_ms = laps.lap(),
            "placement round written"
        );
        ctx.committed(committed);
        // Those rebased on slots freed meanwhile are newer than the view's copies.
        for worker in saved {
            view.saved(worker);
        }
        for (i, since) in &waits {
            observe_assigned(ctx, &transitions[*i].job, *since, now);
        }
        for t in &transitions {
            if t.job.state().is_terminal() {
                ctx.backends.metrics.job_finished(t.job.state().as_str());
            }
        }
        for _ in 0..bare_placed {
            ctx.backends.metrics.placement("placed");
            ctx.backends
                .metrics
                .placement_duration
                .observe(round_started.elapsed().as_secs_f64());
        }
    }
    if !preemptions.transitions.is_empty() {
        record_preemptions(ctx, preemptions).await;
    }
    Ok(decided)
}

/// Records a round's preemptions in a transaction of their own, after the round's: it locks
/// running jobs, which the reports' batches lock before workers, while a round locks workers
/// first. One that cannot be recorded (a victim moved) is left to a later round.
async fn record_preemptions(ctx: &Context, preemptions: Preemptions) {
    let recorded = async {
        let mut tx = ctx.backends.pool.begin().await?;
        let committed =
            driver::commit_transitions(&mut tx, &preemptions.transitions, &[], SOURCE).await?;
        jobs::set_pending_reasons(&mut tx, &preemptions.waiting).await?;
        tx.commit().await?;
        Ok::<_, StorageError>(committed)
    }
    .await;
    match recorded {
        Ok(committed) => {
            ctx.committed(committed);
            for t in &preemptions.transitions {
                ctx.backends.metrics.placement("preempted");
                tracing::info!(job_id = %t.job.id(), by = ?t.job.preempted_by(), "job preempted");
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, count = preemptions.transitions.len(), "preemptions not recorded, a later round decides again");
        }
    }
}

/// A job with the priority it counts with (see [`Shares::priority`]).
type Counted = (i32, Job);

/// Preemptible jobs read per round in which some job of this scheduler found no worker.
const VICTIMS_READ: i64 = 1000;

/// What a round's preemptions change: the victims' transitions (their agents are told to stop
/// them), and the reason each waiting job they make room for shows.
#[derive(Default)]
struct Preemptions {
    transitions: Vec<Transition>,
    waiting: Vec<(JobId, String)>,
}

/// For each job of `unplaced` (highest priority first) that no worker can take now, looks for
/// the worker where stopping the fewest preemptible jobs of a lower priority (the lowest
/// priorities, then the youngest) would make room, and asks for those preemptions. Every job
/// counts with the priority its tenant's policy allows it (see [`Shares::priority`]). The room
/// is taken when the victims' attempts end and free their slots: the waiting job, of a higher
/// priority, then comes first. Kubernetes' scheduler preempts the same way (victims of the
/// lowest priority on the node needing the fewest).
async fn preempt(
    ctx: &Context,
    unplaced: &[Job],
    view: &mut WorkerView,
    shares: &Shares,
    now: chrono::DateTime<Utc>,
) -> Result<Preemptions, StorageError> {
    let pool = &ctx.backends.pool;
    // A job some running job is already being stopped for waits for that one (whichever
    // replica asked): it is not preempted for again until those victims have ended.
    let ids: Vec<JobId> = unplaced.iter().map(Job::id).collect();
    let under_way = ctx.backends.db(|| jobs::preempting_for(pool, &ids)).await?;
    let mut waiting: Vec<&Job> = unplaced
        .iter()
        .filter(|j| !under_way.contains(&j.id()))
        .collect();
    waiting.sort_by_key(|j| (std::cmp::Reverse(shares.priority_of(j)), j.id()));
    let Some(top) = waiting.first().map(|j| shares.priority_of(j)) else {
        return Ok(Preemptions::default());
    };
    // In the read's order (lowest priority, then youngest, first), each with the priority it
    // counts with as the view's policies say.
    let mut victims: Vec<Counted> = ctx
        .backends
        .db(|| jobs::preemptible_on_workers(pool, top, VICTIMS_READ))
        .await?
        .into_iter()
        .map(|v| (shares.priority_of(&v), v))
        .collect();
    let mut done = Preemptions::default();
    if victims.is_empty() {
        return Ok(done);
    }
    let (live, _) = ctx.backends.db(|| view.get(pool, live_since(ctx))).await?;
    for job in waiting {
        let Some((worker_id, chosen)) = room_for(live, &victims, job, shares.priority_of(job))
        else {
            continue;
        };
        // Taken out of the list in its order (lowest priority, then youngest, first).
        let (taken, rest): (Vec<Counted>, Vec<Counted>) = victims
            .into_iter()
            .partition(|(_, v)| chosen.contains(&v.id()));
        victims = rest;
        for (_, mut victim) in taken {
            let version = victim.version();
            let Some(attempt) = victim.current_attempt_record().map(|a| a.attempt) else {
                continue;
            };
            let event =
                victim
                    .request_preemption(job.id(), now)
                    .map_err(|e| StorageError::Conflict {
                        what: e.to_string(),
                    })?;
            let command = AgentCommand::Cancel {
                job_id: victim.id(),
                attempt,
                reason: format!("preempted by job {} of a higher priority", job.id()),
            };
            done.transitions.push(Transition {
                extra: vec![Outgoing::agent_command(&worker_id, &command)?],
                job: victim,
                expected_version: version,
                events: vec![event],
                span: tracing::Span::current(),
            });
        }
        done.waiting.push((
            job.id(),
            format!(
                "waiting for {} preempted job(s) to stop on worker {worker_id}",
                chosen.len()
            ),
        ));
    }
    Ok(done)
}

/// The worker of `live` where stopping the fewest of `victims` (each with the priority it
/// counts with, lower than `counted`, what `job` counts with) lets `job` fit, and those
/// victims; among equals, the one whose victims have the lowest priority.
fn room_for(
    live: &[Worker],
    victims: &[Counted],
    job: &Job,
    counted: i32,
) -> Option<(WorkerId, Vec<JobId>)> {
    let spec = can_take_job(job.spec());
    let mut best: Option<(usize, i32, WorkerId, Vec<JobId>)> = None;
    for worker in live {
        // Victims on this worker, lowest priority (then youngest) first, as given.
        let here: Vec<&Counted> = victims
            .iter()
            .filter(|(priority, v)| {
                *priority < counted
                    && v.current_attempt_record()
                        .is_some_and(|a| &a.worker_id == worker.id())
            })
            .collect();
        if here.is_empty() {
            continue;
        }
        let mut freed = worker.clone();
        let mut chosen = Vec::new();
        let mut highest = i32::MIN;
        for (priority, victim) in here {
            let Some(attempt) = victim.current_attempt_id() else {
                continue;
            };
            if freed.release(&attempt).is_err() {
                continue;
            }
            chosen.push(victim.id());
            highest = highest.max(*priority);
            if spec.is_satisfied_by(&freed) {
                break;
            }
        }
        if !spec.is_satisfied_by(&freed) {
            continue;
        }
        let better = best
            .as_ref()
            .is_none_or(|(count, prio, _, _)| (chosen.len(), highest) < (*count, *prio));
        if better {
            best = Some((chosen.len(), highest, worker.id().clone(), chosen));
        }
    }
    best.map(|(_, _, worker, chosen)| (worker, chosen))
}

/// The free slots of `workers` in all.
fn free_slots(workers: &[Worker]) -> usize {
    workers
        .iter()
        .map(|w| usize::try_from(w.free_slots()).unwrap_or(usize::MAX))
        .sum()
}

/// Checks, inside the transaction that records them, that the jobs `placed` (each with its
/// tenant and request) keep every tenant within its running quotas, counted afresh: the
/// tenants' policies are locked first, so two schedulers placing for one tenant at once are
/// counted one after the other. A tenant past a quota is a `Conflict`: the round is decided
/// again on a fresh read.
async fn verify_quotas(
    tx: &mut sqlx::PgConnection,
    placed: &[(TenantId, Resources)],
) -> Result<(), StorageError> {
    if placed.is_empty() {
        return Ok(());
    }
    let mut tenants: Vec<&TenantId> = placed.iter().map(|(t, _)| t).collect();
    tenants.sort();
    tenants.dedup();
    let policies = tenants::lock_policies(tx, &tenants, tenants::Limits::Running).await?;
    if policies.is_empty() {
        return Ok(());
    }
    let limited: Vec<&TenantId> = policies.keys().collect();
    let mut usage = tenants::usage(&mut *tx, Some(&limited)).await?;
    for (tenant, resources) in placed {
        let Some(policy) = policies.get(tenant) else {
            continue;
        };
        let used = usage.entry(tenant.clone()).or_default();
        if let Some(hold) = policy.running_hold(used, resources) {
            return Err(StorageError::Conflict {
                what: hold.reason(tenant),
            });
        }
        used.add(resources);
    }
    Ok(())
}

/// The live workers as this scheduler last read them, kept by its placement rounds and
/// current with its own writes: the reservations it commits and the slots its recorded
/// reports free (handed over through [`Context::freed`]). Other writers make it stale. A
/// worker that only freed slots meanwhile (a report recorded between a round's read and its
/// commit) has the round's reservations made again on it as it stands (see
/// [`driver::reserve_slots`]); one changed otherwise (another replica's reservation, a
/// heartbeat changing its status) fails the round, which drops the view. It is read
/// again in the background once it is half [`VIEW_MAX_AGE`] old (see [`Refresh`]), at the
/// next round once older than that, and at each periodic retry of the blocked requests, so a
/// worker that appeared is seen within that time. So the view saves reads, never decides.
#[derive(Default)]
struct WorkerView {
    workers: Option<WorkerIndex>,
    read_at: Option<Instant>,
    /// The tenants' policies and usage, read with the workers and charged with this
    /// scheduler's placements since; `None` while a round holds them, or once forgotten.
    shares: Option<Shares>,
    /// Whether `shares` came from a background read no round has taken yet (the rounds
    /// publish the tenants' shares of each fresh read).
    shares_read: bool,
    /// The workers were read to pick the blocked requests of a round, which has not been told
    /// yet that they are fresh (it considers preemption only on a fresh read).
    unseen: bool,
}

/// Oldest a view may be at the start of a placement round.
const VIEW_MAX_AGE: Duration = Duration::from_secs(1);

impl WorkerView {
    async fn get(
        &mut self,
        pool: &sqlx::PgPool,
        live_since: chrono::DateTime<Utc>,
    ) -> Result<(&[Worker], bool), StorageError> {
        let read = self.workers.is_none();
        if read {
            self.workers = Some(WorkerIndex::new(
                workers::placeable(pool, live_since).await?,
            ));
            self.read_at = Some(Instant::now());
        }
        let fresh = read || std::mem::take(&mut self.unseen);
        Ok((self.live(), fresh))
    }

    /// The workers of the view as last read (none before the first read).
    fn live(&self) -> &[Worker] {
        self.workers
            .as_ref()
            .map(WorkerIndex::workers)
            .unwrap_or_default()
    }

    /// Whether a worker of the view could take a job that needs `fit` now.
    fn fits(&self, fit: &Fit) -> bool {
        self.workers.as_ref().is_some_and(|index| {
            let spec = can_take_sealed(&fit.required_labels, fit.resources, fit.secrets);
            index.best_for(&fit.required_labels, &spec).is_some()
        })
    }

    /// The worker of the view that can take `job` and comes first in preference (see
    /// [`best`]), found through the index.
    fn best(&self, job: &Job) -> Option<&Worker> {
        self.workers.as_ref()?.best(job)
    }

    fn forget(&mut self) {
        self.workers = None;
        self.unseen = false;
        self.read_at = None;
        self.shares = None;
        self.shares_read = false;
    }

    /// The tenants' shares against the live workers, and whether they were just read: taken
    /// out of the view (see [`WorkerView::keep_shares`]), or read afresh.
    async fn shares(&mut self, pool: &sqlx::PgPool) -> Result<(Shares, bool), StorageError> {
        if let Some(shares) = self.shares.take() {
            return Ok((shares, std::mem::take(&mut self.shares_read)));
        }
        let capacity = Capacity::of(
            self.workers
                .as_ref()
                .map(WorkerIndex::workers)
                .unwrap_or_default(),
        );
        let policies = tenants::policies(pool).await?;
        let usage = tenants::usage(pool, None).await?;
        Ok((
            Shares {
                capacity,
                policies,
                usage,
            },
            true,
        ))
    }

    /// Keeps `shares` (charged with a round's placements) for the next round.
    fn keep_shares(&mut self, shares: Shares) {
        if self.workers.is_some() {
            self.shares = Some(shares);
        }
    }

    /// How long ago the view was read; `None` when there is none.
    fn age(&self) -> Option<Duration> {
        self.workers.as_ref()?;
        self.read_at.map(|at| at.elapsed())
    }

    /// Takes a read made while the rounds went on: its workers, but each worker this view
    /// holds at a newer version (saved by a round or a recorded report since the read began)
    /// as this view holds it, and its tenants' shares, against the merged workers. This
    /// scheduler's placements committed after the read of the usage are missing from those
    /// shares until the next read; the running quotas are checked in each round's own
    /// transaction anyway. Nothing is taken into a forgotten view (the next round reads it
    /// afresh) nor into one read since.
    fn merge(&mut self, read: ViewRead) {
        let Some(current) = &self.workers else {
            return;
        };
        // A view read since (after a failed round) is newer in every way.
        if self.read_at.is_some_and(|at| at > read.started) {
            return;
        }
        let mut workers = read.workers;
        for mine in current.workers() {
            workers.update(mine.id(), |theirs| {
                if mine.version() > theirs.version() {
                    *theirs = mine.clone();
                }
            });
        }
        self.shares = Some(Shares {
            capacity: Capacity::of(workers.workers()),
            policies: read.policies,
            usage: read.usage,
        });
        self.shares_read = true;
        self.workers = Some(workers);
        self.read_at = Some(read.started);
    }

    fn worker(&self, id: &WorkerId) -> Option<&Worker> {
        self.workers.as_ref()?.get(id)
    }

    /// Changes the view's copy of worker `id` with `change` (keeping the index in order).
    fn update_worker<R>(
        &mut self,
        id: &WorkerId,
        change: impl FnOnce(&mut Worker) -> R,
    ) -> Option<R> {
        self.workers.as_mut()?.update(id, change)
    }

    /// Replaces the view's copy of `worker` with the one just saved, if it is newer.
    fn saved(&mut self, worker: Worker) {
        let id = worker.id().clone();
        self.update_worker(&id, |w| {
            if worker.version() > w.version() {
                *w = worker;
            }
        });
    }
}

/// The live workers and the tenants' policies and usage, read apart from the rounds.
struct ViewRead {
    /// When the read began: it holds every write committed before then.
    started: Instant,
    workers: WorkerIndex,
    policies: std::collections::HashMap<TenantId, hodei_domain::TenantPolicy>,
    usage: std::collections::HashMap<TenantId, hodei_domain::Usage>,
}

impl ViewRead {
    async fn read(
        backends: hodei_runtime::Backends,
        live_since: chrono::DateTime<Utc>,
    ) -> Result<ViewRead, StorageError> {
        let started = Instant::now();
        let pool = &backends.pool;
        let workers = backends.db(|| workers::placeable(pool, live_since)).await?;
        let workers = WorkerIndex::new(workers);
        let policies = backends.db(|| tenants::policies(pool)).await?;
        let usage = backends.db(|| tenants::usage(pool, None)).await?;
        Ok(ViewRead {
            started,
            workers,
            policies,
            usage,
        })
    }
}

/// Reads the view again in the background once it is half [`VIEW_MAX_AGE`] old: reading
/// 1,000 workers and the tenants' usage takes 10-20 ms, which every round waiting on it would
/// add to its jobs' placement. A view older than [`VIEW_MAX_AGE`] (rounds far apart, or its
/// read failed or hangs) is forgotten, with its read, so the next round reads it itself.
#[derive(Default)]
struct Refresh {
    reading: Option<tokio::task::JoinHandle<Result<ViewRead, StorageError>>>,
}

impl Drop for Refresh {
    fn drop(&mut self) {
        if let Some(reading) = &self.reading {
            reading.abort();
        }
    }
}

impl Refresh {
    async fn tend(&mut self, ctx: &Context, view: &mut WorkerView) {
        if let Some(reading) = self.reading.take_if(|r| r.is_finished()) {
            match reading.await {
                Ok(Ok(read)) => view.merge(read),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "failed to read the live workers for placement")
                }
                Err(e) => tracing::warn!(error = %e, "the read of the live workers failed"),
            }
        }
        let Some(age) = view.age() else {
            return;
        };
        if age > VIEW_MAX_AGE {
            view.forget();
            if let Some(reading) = self.reading.take() {
                reading.abort();
            }
        } else if age > VIEW_MAX_AGE / 2 && self.reading.is_none() {
            let backends = ctx.backends.clone();
            let live_since = live_since(ctx);
            self.reading = Some(tokio::spawn(ViewRead::read(backends, live_since)));
        }
    }
}

async fn handle(ctx: &Context, item: &PlaceJob, message: &Message, view: &mut WorkerView) {
    let started = std::time::Instant::now();
    // The view is the handler's own; the lock only lets each try borrow it.
    let shared = tokio::sync::Mutex::new(&mut *view);
    let placed = ctx
        .backends
        .db_until_no_conflict(|| async {
            let mut view = shared.lock().await;
            place(ctx, item, &mut view).await
        })
        .await;
    if placed.is_err() {
        view.forget();
    }
    settle_request(ctx, item, message, &placed, Some(started)).await;
}

/// [`settle_request`] for a request of a batch.
async fn settle(
    ctx: &Context,
    request: &Request,
    placed: &Result<Placement, StorageError>,
    started: Option<std::time::Instant>,
) {
    settle_request(ctx, &request.item, &request.message, placed, started)
        .instrument(request.span.clone())
        .await;
}

/// Counts what became of a placement request and acknowledges it, or asks for it again
/// later.
async fn settle_request(
    ctx: &Context,
    item: &PlaceJob,
    message: &Message,
    placed: &Result<Placement, StorageError>,
    started: Option<std::time::Instant>,
) {
    let retry = Duration::from_millis(ctx.config.placement_retry_ms);
    let metrics = &ctx.backends.metrics;
    metrics.placement(match placed {
        Ok(Placement::Placed) => "placed",
        Ok(Placement::Stale) => "stale",
        Ok(Placement::NotYet(_)) => "not_yet",
        Ok(Placement::NoWorker) => "no_worker",
        Err(_) => "error",
    });
    if let (Ok(Placement::Placed), Some(started)) = (placed, started) {
        metrics
            .placement_duration
            .observe(started.elapsed().as_secs_f64());
    }
    let ack = match placed {
        Ok(Placement::Placed | Placement::Stale) => AckKind::Ack,
        Ok(Placement::NotYet(delay)) => AckKind::Nak(Some(*delay)),
        Ok(Placement::NoWorker) => AckKind::Nak(Some(retry)),
        Err(StorageError::Unavailable { retry_in, .. }) => {
            AckKind::Nak(Some((*retry_in).max(retry)))
        }
        Err(e) => {
            tracing::warn!(job_id = %item.job_id, error = %e, "placement failed, will retry");
            AckKind::Nak(Some(retry))
        }
    };
    if let Err(e) = message.ack_with(ack).await {
        metrics.nats_error("ack");
        tracing::warn!(job_id = %item.job_id, error = %e, "failed to settle placement request");
    }
}

/// One try at placing the job. A conflict (the job or the worker moved meanwhile, or the
/// view of the workers turned out stale) is tried again by the caller.
async fn place(
    ctx: &Context,
    item: &PlaceJob,
    view: &mut WorkerView,
) -> Result<Placement, StorageError> {
    let pool = &ctx.backends.pool;
    let stale_after = chrono::Duration::milliseconds(
        i64::try_from(ctx.config.worker_stale_ms).unwrap_or(i64::MAX),
    );
    let now = Utc::now();
    let Some(mut job) = jobs::get(pool, item.job_id).await? else {
        tracing::warn!(job_id = %item.job_id, "placement request for an unknown job dropped");
        return Ok(Placement::Stale);
    };
    if job.state() != JobState::Queued || job.current_attempt() != item.attempt {
        return Ok(Placement::Stale);
    }
    if let Some(wait) = job.not_before().and_then(|t| (t - now).to_std().ok()) {
        return Ok(Placement::NotYet(wait));
    }
    // Whether the workers were read just now, for this try (see below).
    let (_, fresh) = view.get(pool, now - stale_after).await?;
    let (shares, _) = view.shares(pool).await?;
    let hold = shares.hold(job.tenant(), &job.spec().resources);
    view.keep_shares(shares);
    if let Some(hold) = hold {
        jobs::set_pending_reason(pool, job.id(), &hold.reason(job.tenant())).await?;
        return Ok(Placement::NoWorker);
    }
    let Some(worker) = view.best(&job).cloned() else {
        let (live, _) = view.get(pool, now - stale_after).await?;
        if !fresh {
            // Slots may have been freed since the view was read.
            view.forget();
            return Err(StorageError::Conflict {
                what: format!("the worker view used to place job {}", item.job_id),
            });
        }
        let reason = explain(live, &job);
        let queue_timeout = chrono::Duration::milliseconds(
            i64::try_from(ctx.config.queue_timeout_ms).unwrap_or(i64::MAX),
        );
        if now - job.updated_at() > queue_timeout {
            fail_unplaceable(ctx, &mut job, &reason).await?;
            return Ok(Placement::Stale);
        }
        tracing::debug!(job_id = %job.id(), reason, "no worker can take the job yet");
        jobs::set_pending_reason(pool, job.id(), &reason).await?;
        return Ok(Placement::NoWorker);
    };
    match assign(ctx, &mut job, worker).await {
        Ok(Some(worker)) => {
            view.saved(worker);
            Ok(Placement::Placed)
        }
        // The job failed instead (its secrets cannot be handed to any worker).
        Ok(None) => Ok(Placement::Stale),
        Err(e) => {
            if e.is_conflict() {
                view.forget();
            }
            Err(e)
        }
    }
}

/// Fails a job that waited longer than the queue timeout, saying what did not match.
async fn fail_unplaceable(ctx: &Context, job: &mut Job, reason: &str) -> Result<(), StorageError> {
    let version = job.version();
    let why = format!("no worker could take the job within the queue timeout; {reason}");
    let event = job
        .fail_unplaceable(&why, Utc::now())
        .map_err(|e| StorageError::Conflict {
            what: e.to_string(),
        })?;
    let mut tx = ctx.backends.pool.begin().await?;
    driver::commit_transition(&mut tx, job, version, &event, None, Vec::new(), SOURCE).await?;
    tx.commit().await?;
    ctx.backends.relay_wake.notify_one();
    ctx.backends.metrics.job_finished(job.state().as_str());
    tracing::warn!(job_id = %job.id(), reason, "job failed: no worker within the queue timeout");
    Ok(())
}

/// When `job` became placeable: when it was queued (or requeued), or when its retry backoff
/// ended.
fn placeable_since(job: &Job) -> chrono::DateTime<Utc> {
    job.not_before()
        .map_or(job.updated_at(), |t| t.max(job.updated_at()))
}

/// Assigns `job` to `worker` in memory, reserving the slot: returns the job's event and the
/// agent's command, its secret values sealed to the worker's agent. A job whose secret values
/// cannot be opened with `secrets` (no key, another key, altered) can run nowhere: it fails
/// instead, and there is no command.
fn reserve(
    job: &mut Job,
    worker: &mut Worker,
    now: chrono::DateTime<Utc>,
    secrets: Option<&OpeningKey>,
) -> Result<(JobEvent, Option<AgentCommand>), StorageError> {
    let spec = match seal_for(job.spec(), secrets, worker.seal_key()) {
        Ok(spec) => spec,
        Err(e) => {
            let why = format!("secret_env cannot be handed to a worker: {e}");
            tracing::warn!(job_id = %job.id(), reason = %why, "job failed");
            let event = job
                .fail_unplaceable(&why, now)
                .map_err(|e| StorageError::Conflict {
                    what: e.to_string(),
                })?;
            return Ok((event, None));
        }
    };
    let event = job
        .assign(worker.id().clone(), now)
        .map_err(|e| StorageError::Conflict {
            what: e.to_string(),
        })?;
    let attempt = job.current_attempt();
    worker
        .reserve_for(AttemptId::new(job.id(), attempt), job.spec(), now)
        .map_err(|e| StorageError::Conflict {
            what: e.to_string(),
        })?;
    let command = AgentCommand::Assign {
        job_id: job.id(),
        attempt,
        spec: Box::new(spec),
        assigned_at: now,
        incarnation: worker.incarnation(),
    };
    Ok((event, Some(command)))
}

/// `spec` with its secret values sealed to `agent_key`: each is opened with the control
/// plane's key first (a value stored in clear, before sealing existed, is sealed as it is).
fn seal_for(
    spec: &JobSpec,
    secrets: Option<&OpeningKey>,
    agent_key: Option<&str>,
) -> Result<JobSpec, SealError> {
    if !spec.has_secrets() {
        return Ok(spec.clone());
    }
    let agent = SealingKey::parse(
        agent_key.ok_or_else(|| SealError::Key("the worker announced no sealing key".into()))?,
    )?;
    spec.map_secrets(|value| {
        let plain = if is_sealed(value) {
            secrets
                .ok_or_else(|| {
                    SealError::Key("this scheduler has no HODEI_SECRETS_KEY_FILE".into())
                })?
                .open(value)?
        } else {
            value.to_owned()
        };
        agent.seal(&plain)
    })
}

/// Counts and logs an assignment that was committed.
fn observe_assigned(
    ctx: &Context,
    job: &Job,
    placeable_since: chrono::DateTime<Utc>,
    now: chrono::DateTime<Utc>,
) {
    if let Ok(waited) = (now - placeable_since).to_std() {
        ctx.backends
            .metrics
            .queue_wait
            .observe(waited.as_secs_f64());
    }
    if let Some(attempt) = job.current_attempt_record() {
        tracing::info!(job_id = %job.id(), attempt = %attempt.attempt, worker_id = %attempt.worker_id, "job assigned");
    }
}

/// Assigns `job` to `worker` and returns the worker as saved, its slot reserved; `None` when
/// the job failed instead (see [`reserve`]).
async fn assign(
    ctx: &Context,
    job: &mut Job,
    mut worker: Worker,
) -> Result<Option<Worker>, StorageError> {
    let now = Utc::now();
    let (job_version, worker_version) = (job.version(), worker.version());
    let since = placeable_since(job);
    let (event, command) = reserve(job, &mut worker, now, ctx.secrets.as_ref())?;
    let mut messages = vec![Outgoing::job_event(&event, SOURCE)?];
    if let Some(command) = &command {
        messages.push(Outgoing::agent_command(worker.id(), command)?);
    }
    let mut tx = ctx.backends.pool.begin().await?;
    if command.is_some() {
        verify_quotas(&mut tx, &[(job.tenant().clone(), job.spec().resources)]).await?;
        workers::save_reservation(&mut tx, &worker, worker_version).await?;
    }
    driver::save_job(&mut tx, job, job_version, std::slice::from_ref(&event)).await?;
    outbox::append(&mut tx, &messages).await?;
    tx.commit().await?;
    ctx.backends.relay_wake.notify_one();
    if command.is_some() {
        observe_assigned(ctx, job, since, now);
        Ok(Some(worker))
    } else {
        ctx.backends.metrics.job_finished(job.state().as_str());
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hodei_domain::spec::JobSpecDraft;
    use hodei_domain::{JobId, JobSpec, Resources, TenantId};

    use super::*;

    fn worker(id: &str, labels: &[(&str, &str)], max: u32) -> Worker {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Worker::register(
            id.parse().unwrap(),
            labels,
            Resources::new(2000, 2048),
            max,
            Utc::now(),
        )
        .0
    }

    fn job(required: &[(&str, &str)]) -> Job {
        let mut d = JobSpecDraft::exec("j", &["true"]);
        d.required_labels = required
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Job::submit(
            JobId::new(),
            TenantId::default(),
            JobSpec::try_from(d).unwrap(),
            Utc::now(),
        )
        .0
    }

    #[test]
    fn only_workers_with_the_labels_rank_and_the_emptiest_comes_first() {
        let mut busy = worker("a", &[("gpu", "true")], 2);
        busy.reserve(
            AttemptId::new(JobId::new(), hodei_domain::AttemptNumber::new(1)),
            Resources::default(),
            Utc::now(),
        )
        .unwrap();
        let workers = vec![
            busy,
            worker("b", &[("gpu", "true")], 2),
            worker("c", &[], 4),
        ];
        let ranked: Vec<&str> = rank(&workers, &job(&[("gpu", "true")]))
            .iter()
            .map(|w| w.id().as_str())
            .collect();
        assert_eq!(ranked, vec!["b", "a"]);
        let any: Vec<&str> = rank(&workers, &job(&[]))
            .iter()
            .map(|w| w.id().as_str())
            .collect();
        assert_eq!(any, vec!["c", "b", "a"]);
        assert_eq!(
            best(&workers, &job(&[])).map(|w| w.id().as_str()),
            Some("c")
        );
        assert_eq!(
            best(&workers, &job(&[("gpu", "true")])).map(|w| w.id().as_str()),
            Some("b")
        );
        assert!(best(&workers, &job(&[("gpu", "false")])).is_none());
    }

    #[test]
    fn explain_names_what_each_worker_lacks() {
        let workers = vec![worker("c", &[], 4)];
        let reason = explain(&workers, &job(&[("gpu", "true")]));
        assert!(reason.contains("c: needs label gpu=true"), "{reason}");
        assert_eq!(explain(&[], &job(&[])), "no live workers");
    }

    fn read_of(workers: Vec<Worker>, started: Instant) -> ViewRead {
        ViewRead {
            started,
            workers: WorkerIndex::new(workers),
            policies: Default::default(),
            usage: Default::default(),
        }
    }

    #[test]
    fn a_background_read_keeps_what_the_view_saved_since_and_brings_new_workers() {
        let before = Instant::now()
            .checked_sub(Duration::from_millis(5))
            .unwrap();
        let mut reserved = worker("a", &[], 2);
        let attempt = AttemptId::new(JobId::new(), hodei_domain::AttemptNumber::new(1));
        reserved
            .reserve(attempt, Resources::default(), Utc::now())
            .unwrap();
        let mut view = WorkerView {
            workers: Some(WorkerIndex::new(vec![
                reserved.clone(),
                worker("gone", &[], 2),
            ])),
            read_at: Some(before),
            shares: None,
            shares_read: false,
            unseen: false,
        };
        // Read before the reservation was committed, after `gone` stopped beating and `b`
        // registered.
        let started = Instant::now();
        view.merge(read_of(
            vec![worker("a", &[], 2), worker("b", &[], 3)],
            started,
        ));
        let a = view.worker(&"a".parse().unwrap()).unwrap();
        assert_eq!(a.version(), reserved.version());
        assert!(a.holds(&attempt));
        assert!(view.worker(&"b".parse().unwrap()).is_some());
        assert!(view.worker(&"gone".parse().unwrap()).is_none());
        assert_eq!(view.read_at, Some(started));
        let shares = view.shares.as_ref().unwrap();
        assert_eq!(shares.capacity.slots, 5);
        assert!(view.shares_read);

        // A read older than the view is dropped; a forgotten view takes none.
        view.merge(read_of(Vec::new(), before));
        assert!(view.worker(&"b".parse().unwrap()).is_some());
        view.forget();
        view.merge(read_of(vec![worker("c", &[], 1)], Instant::now()));
        assert!(view.workers.is_none());
    }

    fn fit(label: &str, quota: bool, deadline: chrono::DateTime<Utc>) -> Fit {
        Fit {
            required_labels: BTreeMap::from([("pool".to_owned(), label.to_owned())]),
            resources: Resources::default(),
            secrets: false,
            quota,
            deadline,
            priority: 0,
        }
    }

    #[test]
    fn a_round_takes_the_blocked_requests_a_free_worker_can_take_up_to_its_free_slots() {
        let later = Utc::now() + chrono::Duration::hours(1);
        let gpu = fit("gpu", false, later);
        let cpu = fit("cpu", false, later);
        // Only `cpu` workers have room.
        let fits = |f: &Fit| f.required_labels["pool"] == "cpu";
        let blocked = [Some(&gpu), Some(&cpu), Some(&gpu), Some(&cpu), Some(&cpu)];
        assert_eq!(
            pick(blocked.iter().copied(), 2, fits, None),
            [false, true, false, true, false],
            "the gpu jobs in front do not hold back the ones a worker can take"
        );
        assert_eq!(
            pick(blocked.iter().copied(), 0, fits, None),
            [false; 5],
            "a saturated fleet reads none of them"
        );
        // A request never tried has no fit: it counts as one that may fit.
        assert_eq!(
            pick([None, Some(&cpu)].into_iter(), 1, fits, None),
            [true, false]
        );
    }

    #[test]
    fn requests_held_by_their_quota_do_not_use_up_the_room_of_the_others() {
        let later = Utc::now() + chrono::Duration::hours(1);
        let held = fit("cpu", true, later);
        let cpu = fit("cpu", false, later);
        let fits = |_: &Fit| true;
        let blocked = [Some(&held), Some(&held), Some(&cpu), Some(&cpu)];
        assert_eq!(
            pick(blocked.iter().copied(), 1, fits, None),
            [true, false, true, false]
        );
    }

    #[test]
    fn a_periodic_retry_also_reads_the_most_urgent_and_those_past_their_queue_timeout() {
        let now = Utc::now();
        let later = now + chrono::Duration::hours(1);
        let gpu = fit("gpu", false, later);
        let overdue = fit("gpu", false, now - chrono::Duration::seconds(1));
        let none = |_: &Fit| false;
        let mut blocked = vec![Some(&gpu); PREEMPT_LOOK + 2];
        blocked.push(Some(&overdue));
        let picked = pick(blocked.iter().copied(), 4, none, Some(now));
        let mut expected = vec![true; PREEMPT_LOOK];
        expected.extend([false, false, true]);
        assert_eq!(picked, expected);
        assert!(
            !pick(blocked.iter().copied(), 4, none, None).contains(&true),
            "a freed slot reads only what fits"
        );
        // A job held by its tenant's quota never times out in the queue: it is not read at
        // every retry once its queue timeout has passed.
        let held = fit("gpu", true, now - chrono::Duration::seconds(1));
        let mut blocked = vec![Some(&held); PREEMPT_LOOK];
        blocked.push(Some(&held));
        assert!(!pick(blocked.iter().copied(), 4, none, Some(now))[PREEMPT_LOOK]);
    }

    #[test]
    fn requests_held_by_their_quota_do_not_take_the_places_preemption_looks_at() {
        let now = Utc::now();
        let later = now + chrono::Duration::hours(1);
        let held = fit("gpu", true, later);
        let gpu = fit("gpu", false, later);
        let none = |_: &Fit| false;
        // A tenant's many quota-held jobs of a higher priority stand in front of another's job.
        let mut blocked = vec![Some(&held); PREEMPT_LOOK + 2];
        blocked.extend(vec![Some(&gpu); PREEMPT_LOOK + 1]);
        let picked = pick(blocked.iter().copied(), 0, none, Some(now));
        let mut expected = vec![true; PREEMPT_LOOK];
        expected.extend([false, false]);
        expected.extend(vec![true; PREEMPT_LOOK]);
        expected.push(false);
        assert_eq!(picked, expected);
    }

    #[tokio::test]
    async fn a_view_read_to_pick_the_blocked_requests_is_fresh_for_the_round() {
        // Never connected: a view that holds its workers makes no query.
        let pool = sqlx::PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let mut view = WorkerView {
            workers: Some(WorkerIndex::new(vec![worker("a", &[], 1)])),
            unseen: true,
            ..WorkerView::default()
        };
        let since = Utc::now();
        assert!(
            view.get(&pool, since).await.unwrap().1,
            "the round sees the read as fresh"
        );
        assert!(!view.get(&pool, since).await.unwrap().1, "once");
        view.unseen = true;
        view.forget();
        assert!(!view.unseen);
    }
}
