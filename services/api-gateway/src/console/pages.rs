//! The console's pages and the forms they post: the overview, jobs, a job, pipeline runs, a
//! run, workers. Each reads and acts through the gRPC handlers (see the module above), and
//! answers a script's fragment request with its live region only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Form;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use hodei_domain::{Action, JobState, Role, TenantId};
use hodei_proto::v1 as pb;
use hodei_proto::v1::job_service_server::JobService;
use hodei_proto::v1::pipeline_service_server::PipelineService;
use hodei_proto::v1::worker_service_server::WorkerService;
use hodei_storage::jobs;
use maud::{Markup, html};
use serde::Deserialize;

use super::Console;
use super::dag;
use super::session::{Caller, Guarded};
use super::views::{
    Failure, Section, ago, badge, encode_query, labels, live_region, live_status, page, short_id,
    time, took, wire_name,
};

/// How long the overview's figures are reused.
const OVERVIEW_TTL: Duration = Duration::from_secs(5);

/// Rows a list page shows.
const PAGE_SIZE: u32 = 50;

/// A gRPC request made by the signed-in caller.
pub(super) fn call<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(caller.principal.clone());
    request.extensions_mut().insert(caller.credential.clone());
    request
}

/// The live region alone for a script's fragment request, else the whole page.
fn respond(
    caller: &Caller,
    section: Section,
    title: &str,
    whole: Markup,
    live: Markup,
) -> Response {
    if caller.fragment {
        axum::response::Html(live.into_string()).into_response()
    } else {
        page(caller, section, title, whole).into_response()
    }
}

fn job_state_name(value: i32) -> String {
    pb::JobState::try_from(value)
        .map(|s| wire_name(s.as_str_name(), "JOB_STATE_"))
        .unwrap_or_else(|_| "unknown".into())
}

fn run_state_name(value: i32) -> String {
    pb::PipelineState::try_from(value)
        .map(|s| wire_name(s.as_str_name(), "PIPELINE_STATE_"))
        .unwrap_or_else(|_| "unknown".into())
}

fn step_state_name(value: i32) -> String {
    pb::StepState::try_from(value)
        .map(|s| wire_name(s.as_str_name(), "STEP_STATE_"))
        .unwrap_or_else(|_| "unknown".into())
}

fn worker_status_name(value: i32) -> String {
    pb::WorkerStatus::try_from(value)
        .map(|s| wire_name(s.as_str_name(), "WORKER_STATUS_"))
        .unwrap_or_else(|_| "unknown".into())
}

/// How an attempt ended, in words.
fn outcome(o: Option<&pb::AttemptOutcome>) -> String {
    use pb::attempt_outcome::Kind;
    match o.and_then(|o| o.kind.as_ref()) {
        None => "–".into(),
        Some(Kind::Exited(code)) => format!("exited {code}"),
        Some(Kind::Signalled(signal)) => format!("killed by signal {signal}"),
        Some(Kind::TimedOut(_)) => "timed out".into(),
        Some(Kind::Cancelled(_)) => "cancelled".into(),
        Some(Kind::SpawnFailed(why)) => format!("could not start: {why}"),
        Some(Kind::Lost(why)) => format!("lost: {why}"),
        Some(Kind::ArtifactsFailed(why)) => format!("artifacts not kept: {why}"),
        Some(Kind::Preempted(by)) => format!("preempted by job {by}"),
    }
}

/// A form field that must not be empty, as a filter.
fn filled(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// A filter on one enum value given by its short name (`timed_out`), as the wire's number.
fn enum_filter(
    field: &str,
    value: Option<&str>,
    prefix: &str,
    parse: impl Fn(&str) -> Option<i32>,
) -> Result<Vec<i32>, Failure> {
    let Some(value) = value else {
        return Ok(vec![]);
    };
    parse(&format!("{prefix}{}", value.to_ascii_uppercase()))
        .map(|v| vec![v])
        .ok_or_else(|| bad_request(format!("{field}: {value:?} is not one of the choices")))
}

fn bad_request(message: String) -> Failure {
    Failure::Answer {
        status: axum::http::StatusCode::BAD_REQUEST,
        message,
    }
}

/// `key=value` pairs separated by commas.
fn parse_labels(text: Option<&str>) -> Result<HashMap<String, String>, Failure> {
    let mut labels = HashMap::new();
    for pair in text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(bad_request(format!("labels: {pair:?} is not key=value")));
        };
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

/// A query string of the non-empty pairs.
fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let joined: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", encode_query(v)))
        })
        .collect();
    if joined.is_empty() {
        String::new()
    } else {
        format!("?{}", joined.join("&"))
    }
}

fn may(caller: &Caller, action: Action) -> bool {
    caller.principal.role.allows(action)
}

fn pager(
    next_token: &str,
    base: &str,
    pairs: &[(&str, Option<&str>)],
    on_later_page: bool,
) -> Markup {
    let mut next = pairs.to_vec();
    next.push(("page", Some(next_token)));
    html! {
        nav.pager aria-label="Pages" {
            @if on_later_page { a href={ (base) (query_string(pairs)) } { "← Newest" } }
            @if !next_token.is_empty() { a href={ (base) (query_string(&next)) } rel="next" { "Older →" } }
        }
    }
}

// ----- overview -----

/// The overview's figures for one tenant scope.
pub(crate) struct Overview {
    counts: Vec<(JobState, i64)>,
    ended: Vec<(DateTime<Utc>, i64)>,
    at: DateTime<Utc>,
}

async fn overview_figures(
    console: &Console,
    scope: Option<TenantId>,
) -> Result<Arc<Overview>, Failure> {
    if let Ok(cache) = console.overview.lock()
        && let Some((at, figures)) = cache.get(&scope)
        && at.elapsed() < OVERVIEW_TTL
    {
        return Ok(Arc::clone(figures));
    }
    let pool = &console.backends.pool;
    let now = Utc::now();
    let since = now - chrono::Duration::hours(1);
    let counts = console
        .backends
        .db(|| jobs::count_by_state(pool, scope.as_ref()))
        .await?;
    let ended = console
        .backends
        .db(|| jobs::ended_per_minute(pool, scope.as_ref(), since))
        .await?;
    let figures = Arc::new(Overview {
        counts,
        ended,
        at: now,
    });
    if let Ok(mut cache) = console.overview.lock() {
        cache.retain(|_, (at, _)| at.elapsed() < OVERVIEW_TTL);
        cache.insert(scope, (Instant::now(), Arc::clone(&figures)));
    }
    Ok(figures)
}

fn throughput_chart(figures: &Overview) -> Markup {
    const BAR: i32 = 10;
    const HEIGHT: i32 = 120;
    let start = figures.at - chrono::Duration::minutes(59);
    let minute = |t: DateTime<Utc>| t.timestamp().div_euclid(60);
    let first = minute(start);
    let mut bins = [0i64; 60];
    for (at, count) in &figures.ended {
        if let Ok(i) = usize::try_from(minute(*at) - first)
            && let Some(bin) = bins.get_mut(i)
        {
            *bin += count;
        }
    }
    let max = bins.iter().copied().max().unwrap_or(0).max(1);
    let total: i64 = bins.iter().sum();
    let peak = bins.iter().copied().max().unwrap_or(0);
    html! {
        figure.chart {
            svg role="img" width=(60 * BAR) height=(HEIGHT + 20) viewBox=(format!("0 0 {} {}", 60 * BAR, HEIGHT + 20))
                aria-label=(format!("jobs ended per minute over the last hour: {total} in all, at most {peak} in a minute")) {
                @for (i, count) in bins.iter().enumerate() {
                    @let h = if *count == 0 { 0 } else { ((*count * i64::from(HEIGHT)) / max).max(2) as i32 };
                    rect.bar x=(i as i32 * BAR + 1) y=(HEIGHT - h) width=(BAR - 2) height=(h) {
                        title { (count) " jobs ended at " ((start + chrono::Duration::minutes(i as i64)).format("%H:%M")) }
                    }
                }
                line.axis x1="0" y1=(HEIGHT) x2=(60 * BAR) y2=(HEIGHT) {}
                text.tick x="0" y=(HEIGHT + 15) { (start.format("%H:%M")) }
                text.tick x=(60 * BAR) y=(HEIGHT + 15) text-anchor="end" { (figures.at.format("%H:%M")) " UTC" }
            }
            figcaption {
                strong { (total) } " jobs ended in the last hour (" (format!("{:.1}", total as f64 / 60.0)) " a minute, at most " (peak) ")"
            }
        }
    }
}

pub(super) async fn overview(
    State(console): State<Console>,
    caller: Caller,
) -> Result<Response, Failure> {
    let who = &caller.principal;
    who.authorize(Action::Read)?;
    let scope = who.listing_scope(None)?;
    let figures = overview_figures(&console, scope.clone()).await?;
    let fleet = console
        .services
        .workers
        .list_workers(call(
            &caller,
            pb::ListWorkersRequest {
                statuses: vec![],
                page_size: 1000,
                page_token: String::new(),
            },
        ))
        .await?
        .into_inner();
    let count = |s: JobState| {
        figures
            .counts
            .iter()
            .find(|(c, _)| *c == s)
            .map_or(0, |(_, n)| *n)
    };
    let mut statuses: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let (mut used, mut slots) = (0usize, 0u64);
    for w in &fleet.workers {
        *statuses.entry(worker_status_name(w.status)).or_default() += 1;
        if w.status == pb::WorkerStatus::Ready as i32
            || w.status == pb::WorkerStatus::Draining as i32
        {
            used += w.held.len();
            slots += u64::from(w.max_concurrent_jobs);
        }
    }
    let lost: Vec<&pb::Worker> = fleet
        .workers
        .iter()
        .filter(|w| {
            w.status == pb::WorkerStatus::Lost as i32
                || w.status == pb::WorkerStatus::Unreachable as i32
        })
        .collect();
    let scope_name = scope
        .as_ref()
        .map_or("every tenant".to_owned(), |t| format!("tenant {t}"));
    let live = html! {
        section aria-labelledby="counts-title" {
            h2 #counts-title { "Jobs by state " small { "(" (scope_name) ")" } }
            ul.cards {
                @for state in JobState::ALL {
                    li.card {
                        a href={ "/jobs?state=" (state.as_str()) } {
                            span.count data-count=(state.as_str()) { (count(state)) }
                            (badge(state.as_str()))
                        }
                    }
                }
            }
            p.queue { "Queue depth: " strong data-queue-depth { (count(JobState::Queued)) } " jobs waiting for a worker" }
        }
        section aria-labelledby="throughput-title" {
            h2 #throughput-title { "Throughput" }
            (throughput_chart(&figures))
        }
        section aria-labelledby="fleet-title" {
            h2 #fleet-title { "Fleet" }
            p {
                (fleet.workers.len()) " workers"
                @for (status, n) in &statuses { " · " (n) " " (status) }
                " · " (used) " of " (slots) " slots in use"
                @if !fleet.next_page_token.is_empty() { " (first 1,000 workers)" }
            }
            h3 { "Lost and unreachable workers" }
            @if lost.is_empty() {
                p.none data-lost-workers="0" { "None." }
            } @else {
                div.table-wrap tabindex="0" {
                    table data-lost-workers=(lost.len()) {
                        thead { tr { th scope="col" { "Worker" } th scope="col" { "Status" } th scope="col" { "Last beat" } th scope="col" { "Attempts held" } } }
                        tbody {
                            @for w in &lost {
                                tr {
                                    td { a href={ "/workers#w-" (w.id) } { (w.id) } }
                                    td { (badge(&worker_status_name(w.status))) }
                                    td { (ago(w.last_heartbeat_at.as_ref())) }
                                    td { (w.held.len()) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    let whole = html! {
        div.heading { h1 { "Overview" } (live_status()) }
        (live_region("overview", "/", "/events/jobs", live.clone()))
    };
    Ok(respond(&caller, Section::Overview, "Overview", whole, live))
}

// ----- jobs -----

#[derive(Deserialize, Default)]
pub(super) struct JobsQuery {
    state: Option<String>,
    name: Option<String>,
    labels: Option<String>,
    tenant: Option<String>,
    q: Option<String>,
    page: Option<String>,
}

pub(super) async fn jobs(
    State(console): State<Console>,
    caller: Caller,
    Query(query): Query<JobsQuery>,
) -> Result<Response, Failure> {
    let states = enum_filter("state", filled(&query.state), "JOB_STATE_", |n| {
        pb::JobState::from_str_name(n).map(|v| v as i32)
    })?;
    let request = pb::ListJobsRequest {
        states,
        name_prefix: filled(&query.name).unwrap_or("").to_owned(),
        labels: parse_labels(filled(&query.labels))?,
        page_size: PAGE_SIZE,
        page_token: filled(&query.page).unwrap_or("").to_owned(),
        query: filled(&query.q).unwrap_or("").to_owned(),
        tenant: filled(&query.tenant).unwrap_or("").to_owned(),
    };
    let found = console
        .services
        .jobs
        .list_jobs(call(&caller, request))
        .await?
        .into_inner();
    let pairs = [
        ("state", filled(&query.state)),
        ("name", filled(&query.name)),
        ("labels", filled(&query.labels)),
        ("tenant", filled(&query.tenant)),
        ("q", filled(&query.q)),
    ];
    let mut here = pairs.to_vec();
    here.push(("page", filled(&query.page)));
    let live = html! {
        @if found.jobs.is_empty() {
            p.none data-empty { "No job matches." }
        } @else {
            div.table-wrap tabindex="0" {
                table.jobs {
                    caption.visually-hidden { "Jobs, newest first" }
                    thead { tr {
                        th scope="col" { "Job" } th scope="col" { "State" } th scope="col" { "Tenant" }
                        th scope="col" { "Labels" } th scope="col" { "Attempts" } th scope="col" { "Created" }
                        th scope="col" { "Took" }
                    } }
                    tbody {
                        @for job in &found.jobs {
                            @let state = job_state_name(job.state);
                            @let name = job.spec.as_ref().map_or("", |s| s.name.as_str());
                            @let last = job.attempts.last();
                            tr data-job=(job.id) {
                                td { a href={ "/jobs/" (job.id) } { (name) } br; (short_id(&job.id)) }
                                td { (badge(&state)) }
                                td { (job.tenant) }
                                td { (labels(&job.spec.as_ref().map(|s| s.labels.clone()).unwrap_or_default())) }
                                td {
                                    (job.attempts.len())
                                    @if let Some(a) = last { @if !a.worker_id.is_empty() { " on " a href={ "/workers#w-" (a.worker_id) } { (a.worker_id) } } }
                                }
                                td { (time(job.created_at.as_ref())) }
                                td {
                                    @if state_is_final(job.state) { (took(job.created_at.as_ref(), job.updated_at.as_ref())) }
                                    @else { span.none { "–" } }
                                }
                            }
                        }
                    }
                }
            }
        }
        (pager(&found.next_page_token, "/jobs", &pairs, filled(&query.page).is_some()))
    };
    let admin = caller.principal.role == Role::Admin;
    let whole = html! {
        div.heading { h1 { "Jobs" } (live_status()) }
        form.filters method="get" action="/jobs" role="search" aria-label="Filter jobs" {
            div.field {
                label for="f-state" { "State" }
                select #f-state name="state" {
                    option value="" { "any" }
                    @for s in JobState::ALL {
                        option value=(s.as_str()) selected[filled(&query.state) == Some(s.as_str())] { (s.as_str().replace('_', " ")) }
                    }
                }
            }
            div.field {
                label for="f-name" { "Name starts with" }
                input #f-name type="text" name="name" value=(filled(&query.name).unwrap_or(""));
            }
            div.field {
                label for="f-labels" { "Labels" }
                input #f-labels type="text" name="labels" placeholder="team=data, env=prod" value=(filled(&query.labels).unwrap_or(""));
            }
            div.field {
                label for="f-q" { "Words" }
                input #f-q type="search" name="q" placeholder="report.py -flaky" value=(filled(&query.q).unwrap_or(""));
            }
            @if admin {
                div.field {
                    label for="f-tenant" { "Tenant" }
                    input #f-tenant type="text" name="tenant" placeholder="all" value=(filled(&query.tenant).unwrap_or(""));
                }
            }
            button type="submit" { "Filter" }
        }
        (live_region("jobs", &format!("/jobs{}", query_string(&here)), "/events/jobs", live.clone()))
    };
    Ok(respond(&caller, Section::Jobs, "Jobs", whole, live))
}

fn state_is_final(state: i32) -> bool {
    hodei_proto::state_from_wire(state).is_some_and(|s| s.is_terminal())
}

fn command(spec: &pb::JobSpec) -> Markup {
    use pb::job_spec::Command;
    match &spec.command {
        Some(Command::Exec(exec)) => html! { code { (exec.argv.join(" ")) } },
        Some(Command::Script(script)) => html! {
            div { "Interpreter: " code { (script.interpreter.join(" ")) } }
            pre.script { (script.script) }
        },
        None => html! { span.none { "–" } },
    }
}

fn spec_table(spec: &pb::JobSpec) -> Markup {
    let mut env: Vec<_> = spec.env.iter().collect();
    env.sort();
    let resources = spec.resources.unwrap_or_default();
    html! {
        dl.spec {
            dt { "Command" } dd { (command(spec)) }
            dt { "Environment" }
            dd {
                @if env.is_empty() { span.none { "–" } }
                ul.env {
                    @for (k, v) in env {
                        li { code { (k) "=" @if spec.secret_env.contains(k) { span.secret title="secret" { "********" } } @else { (v) } } }
                    }
                }
            }
            @if !spec.working_dir.is_empty() { dt { "Working directory" } dd { code { (spec.working_dir) } } }
            dt { "Timeout" } dd { (if spec.timeout_secs == 0 { 3600 } else { spec.timeout_secs }) " s" }
            dt { "Resources" } dd { (resources.cpu_millis) " millicores, " (resources.memory_mb) " MiB" }
            dt { "Required labels" } dd { (labels(&spec.required_labels)) }
            dt { "Priority" } dd { (spec.priority) @if spec.preemptible { " · preemptible" } }
            dt { "Attempts" } dd { "at most " (spec.max_attempts.max(1)) @if spec.requeue_when_unreachable { " · requeued at once when its worker goes silent" } }
            dt { "Labels" } dd { (labels(&spec.labels)) }
            @if !spec.idempotency_key.is_empty() { dt { "Idempotency key" } dd { code { (spec.idempotency_key) } } }
        }
    }
}

fn attempts_table(attempts: &[pb::Attempt]) -> Markup {
    html! {
        @if attempts.is_empty() {
            p.none { "No attempt yet." }
        } @else {
            div.table-wrap tabindex="0" {
                table.attempts {
                    thead { tr {
                        th scope="col" { "#" } th scope="col" { "Worker" } th scope="col" { "Assigned" }
                        th scope="col" { "Started" } th scope="col" { "Finished" } th scope="col" { "Took" }
                        th scope="col" { "Outcome" }
                    } }
                    tbody {
                        @for a in attempts {
                            tr {
                                td { (a.attempt) }
                                td { a href={ "/workers#w-" (a.worker_id) } { (a.worker_id) } }
                                td { (time(a.assigned_at.as_ref())) }
                                td { (time(a.started_at.as_ref())) }
                                td { (time(a.finished_at.as_ref())) }
                                td { (took(a.started_at.as_ref(), a.finished_at.as_ref())) }
                                td data-outcome { (outcome(a.outcome.as_ref())) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn events_table(events: &[pb::JobEvent]) -> Markup {
    html! {
        div.table-wrap tabindex="0" {
            table.events {
                thead { tr {
                    th scope="col" { "#" } th scope="col" { "At" } th scope="col" { "Event" }
                    th scope="col" { "State after" } th scope="col" { "Attempt" } th scope="col" { "Worker" }
                    th scope="col" { "Reason" }
                } }
                tbody {
                    @for e in events {
                        tr data-event=(e.r#type) {
                            td { (e.seq) }
                            td { (time(e.at.as_ref())) }
                            td { (e.r#type.replace('_', " ")) }
                            td { (badge(&job_state_name(e.state))) }
                            td { @if e.attempt > 0 { (e.attempt) } }
                            td { (e.worker_id) }
                            td { (e.reason) }
                        }
                    }
                }
            }
        }
    }
}

pub(super) async fn job(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let job = console
        .services
        .jobs
        .get_job(call(
            &caller,
            pb::GetJobRequest {
                job_id: id.clone(),
                as_of: None,
            },
        ))
        .await?
        .into_inner()
        .job
        .ok_or_else(|| Failure::Answer {
            status: axum::http::StatusCode::NOT_FOUND,
            message: format!("job {id} not found"),
        })?;
    let history = console
        .services
        .jobs
        .get_job_history(call(
            &caller,
            pb::GetJobHistoryRequest {
                job_id: id.clone(),
                page_size: 1000,
                page_token: String::new(),
            },
        ))
        .await?
        .into_inner();
    let spec = job.spec.clone().unwrap_or_default();
    let state = job_state_name(job.state);
    let ended = state_is_final(job.state);
    let live = html! {
        dl.summary {
            dt { "State" } dd data-job-state=(state) { (badge(&state)) @if job.cancel_requested && !ended { " · cancel requested" } }
            @if !job.reason.is_empty() { dt { "Reason" } dd { (job.reason) } }
            @if let Some(code) = job.exit_code { dt { "Exit code" } dd { (code) } }
            dt { "Created" } dd { (time(job.created_at.as_ref())) }
            dt { "Updated" } dd { (time(job.updated_at.as_ref())) }
            @if job.not_before.is_some() { dt { "Not before" } dd { (time(job.not_before.as_ref())) } }
        }
        @if !ended && may(&caller, Action::Cancel) {
            form.inline method="post" action={ "/jobs/" (job.id) "/cancel" } {
                input type="hidden" name="csrf" value=(caller.csrf);
                button.danger #cancel type="submit" disabled[job.cancel_requested] { "Cancel job" }
            }
        }
        h2 { "Attempts" }
        (attempts_table(&job.attempts))
        @if job.attempts_omitted > 0 {
            p.muted { (job.attempts_omitted) " earlier attempts left out: the job would pass what an answer carries (4 MiB). The events below list them." }
        }
        details.events open[history.events.len() <= 20] {
            summary { "Events (" (history.events.len()) @if !history.next_page_token.is_empty() { "+" } ")" }
            (events_table(&history.events))
            @if !history.next_page_token.is_empty() {
                p.muted { "The first 1,000 events; " code { "hodei history " (job.id) } " lists them all." }
            }
        }
    };
    let title = if spec.name.is_empty() {
        id.clone()
    } else {
        spec.name.clone()
    };
    let whole = html! {
        div.heading {
            h1 { (title) }
            (live_status())
        }
        p.subtitle { "Job " code { (job.id) } " · tenant " (job.tenant) }
        (live_region("job", &format!("/jobs/{}", job.id), &format!("/jobs/{}/events?from={}", job.id, job.version + 1), live.clone()))
        section aria-labelledby="log-title" {
            div.heading {
                h2 #log-title { "Output" }
                label.follow { input type="checkbox" checked data-follow; " Follow" }
            }
            pre.log #log tabindex="0" aria-label="The job's output" data-log={ "/jobs/" (job.id) "/log" } {}
            p.log-status role="status" data-log-status { "waiting for output…" }
        }
        section aria-labelledby="spec-title" {
            h2 #spec-title { "Spec" }
            (spec_table(&spec))
        }
    };
    Ok(respond(&caller, Section::Jobs, &title, whole, live))
}

pub(super) async fn cancel_job(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
    Form(form): Form<Guarded>,
) -> Result<Response, Failure> {
    caller.check_form(&form)?;
    console
        .services
        .jobs
        .cancel_job(call(
            &caller,
            pb::CancelJobRequest {
                job_id: id.clone(),
                reason: "cancelled from the web console".into(),
            },
        ))
        .await?;
    Ok(Redirect::to(&format!("/jobs/{}", encode_query(&id))).into_response())
}

// ----- pipeline runs -----

#[derive(Deserialize, Default)]
pub(super) struct RunsQuery {
    state: Option<String>,
    name: Option<String>,
    tenant: Option<String>,
    page: Option<String>,
}

pub(super) async fn runs(
    State(console): State<Console>,
    caller: Caller,
    Query(query): Query<RunsQuery>,
) -> Result<Response, Failure> {
    let states = enum_filter("state", filled(&query.state), "PIPELINE_STATE_", |n| {
        pb::PipelineState::from_str_name(n).map(|v| v as i32)
    })?;
    let found = console
        .services
        .pipelines
        .list_pipeline_runs(call(
            &caller,
            pb::ListPipelineRunsRequest {
                states,
                name_prefix: filled(&query.name).unwrap_or("").to_owned(),
                page_size: PAGE_SIZE,
                page_token: filled(&query.page).unwrap_or("").to_owned(),
                tenant: filled(&query.tenant).unwrap_or("").to_owned(),
            },
        ))
        .await?
        .into_inner();
    let pairs = [
        ("state", filled(&query.state)),
        ("name", filled(&query.name)),
        ("tenant", filled(&query.tenant)),
    ];
    let mut here = pairs.to_vec();
    here.push(("page", filled(&query.page)));
    let live = html! {
        @if found.runs.is_empty() {
            p.none data-empty { "No pipeline run matches." }
        } @else {
            div.table-wrap tabindex="0" {
                table.runs {
                    thead { tr {
                        th scope="col" { "Run" } th scope="col" { "State" } th scope="col" { "Steps" }
                        th scope="col" { "Tenant" } th scope="col" { "Created" } th scope="col" { "Took" }
                    } }
                    tbody {
                        @for run in &found.runs {
                            @let state = run_state_name(run.state);
                            @let done = run.steps.iter().filter(|s| matches!(step_state_name(s.state).as_str(), "succeeded" | "failed" | "skipped" | "cancelled")).count();
                            tr data-run=(run.id) {
                                td { a href={ "/runs/" (run.id) } { (run.spec.as_ref().map_or("", |s| s.name.as_str())) } br; (short_id(&run.id)) }
                                td { (badge(&state)) }
                                td { (done) " of " (run.steps.len()) " ended" }
                                td { (run.tenant) }
                                td { (time(run.created_at.as_ref())) }
                                td { @if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") { (took(run.created_at.as_ref(), run.updated_at.as_ref())) } @else { span.none { "–" } } }
                            }
                        }
                    }
                }
            }
        }
        (pager(&found.next_page_token, "/runs", &pairs, filled(&query.page).is_some()))
    };
    let admin = caller.principal.role == Role::Admin;
    let whole = html! {
        div.heading { h1 { "Pipeline runs" } (live_status()) }
        form.filters method="get" action="/runs" role="search" aria-label="Filter pipeline runs" {
            div.field {
                label for="f-state" { "State" }
                select #f-state name="state" {
                    option value="" { "any" }
                    @for s in ["queued", "running", "succeeded", "failed", "cancelled"] {
                        option value=(s) selected[filled(&query.state) == Some(s)] { (s) }
                    }
                }
            }
            div.field {
                label for="f-name" { "Name starts with" }
                input #f-name type="text" name="name" value=(filled(&query.name).unwrap_or(""));
            }
            @if admin {
                div.field {
                    label for="f-tenant" { "Tenant" }
                    input #f-tenant type="text" name="tenant" placeholder="all" value=(filled(&query.tenant).unwrap_or(""));
                }
            }
            button type="submit" { "Filter" }
        }
        (live_region("runs", &format!("/runs{}", query_string(&here)), "/events/runs", live.clone()))
    };
    Ok(respond(
        &caller,
        Section::Runs,
        "Pipeline runs",
        whole,
        live,
    ))
}

pub(super) async fn run(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let run = console
        .services
        .pipelines
        .get_pipeline_run(call(
            &caller,
            pb::GetPipelineRunRequest {
                run_id: id.clone(),
                as_of: None,
            },
        ))
        .await?
        .into_inner()
        .run
        .ok_or_else(|| Failure::Answer {
            status: axum::http::StatusCode::NOT_FOUND,
            message: format!("pipeline run {id} not found"),
        })?;
    let artifacts = if run.archived_at.is_some() {
        vec![]
    } else {
        console
            .services
            .pipelines
            .list_artifacts(call(
                &caller,
                pb::ListArtifactsRequest {
                    run_id: id.clone(),
                    step: String::new(),
                },
            ))
            .await?
            .into_inner()
            .artifacts
    };
    let state = run_state_name(run.state);
    let ended = matches!(state.as_str(), "succeeded" | "failed" | "cancelled");
    let nodes: Vec<dag::Node<'_>> = run
        .steps
        .iter()
        .map(|s| dag::Node {
            name: &s.name,
            base: if s.base.is_empty() { &s.name } else { &s.base },
            needs: &s.needs,
            state: step_state_name(s.state),
            job_id: &s.job_id,
        })
        .collect();
    let live = html! {
        dl.summary {
            dt { "State" } dd data-run-state=(state) { (badge(&state)) @if run.cancel_requested && !ended { " · cancel requested" } }
            dt { "Created" } dd { (time(run.created_at.as_ref())) }
            dt { "Updated" } dd { (time(run.updated_at.as_ref())) }
        }
        @if !ended && may(&caller, Action::Cancel) {
            form.inline method="post" action={ "/runs/" (run.id) "/cancel" } {
                input type="hidden" name="csrf" value=(caller.csrf);
                button.danger type="submit" disabled[run.cancel_requested] { "Cancel run" }
            }
        }
        div.dag-wrap { (dag::render(&nodes)) }
        h2 { "Steps" }
        div.table-wrap tabindex="0" {
            table.steps {
                thead { tr {
                    th scope="col" { "Step" } th scope="col" { "State" } th scope="col" { "Needs" }
                    th scope="col" { "Job" } th scope="col" { "Started" } th scope="col" { "Took" }
                    th scope="col" { "Reason" }
                } }
                tbody {
                    @for s in &run.steps {
                        tr data-step-row=(s.name) {
                            td { (s.name) }
                            td { (badge(&step_state_name(s.state))) }
                            td { (s.needs.join(", ")) }
                            td { (dag::job_link(&s.job_id)) }
                            td { (time(s.started_at.as_ref())) }
                            td { (took(s.started_at.as_ref(), s.finished_at.as_ref())) }
                            td { (s.reason) }
                        }
                    }
                }
            }
        }
        h2 { "Artifacts" }
        @if artifacts.is_empty() {
            p.none { @if ended { "None." } @else { "None yet." } }
        } @else {
            div.table-wrap tabindex="0" {
                table.artifacts {
                    thead { tr { th scope="col" { "Step" } th scope="col" { "File" } th scope="col" { "Size" } th scope="col" { "Digest" } } }
                    tbody {
                        @for a in &artifacts {
                            tr {
                                td { (a.step) }
                                td { a href={ "/runs/" (run.id) "/artifacts/" (encode_query(&a.step)) "/" (encode_query(&a.path)) } download { (a.path) } }
                                td { (bytes(a.size)) }
                                td { code.digest { (a.digest) } }
                            }
                        }
                    }
                }
            }
        }
    };
    let name = run.spec.as_ref().map_or(id.clone(), |s| s.name.clone());
    let whole = html! {
        div.heading { h1 { (name) } (live_status()) }
        p.subtitle { "Pipeline run " code { (run.id) } " · tenant " (run.tenant) }
        (live_region("run", &format!("/runs/{}", run.id), &format!("/runs/{}/events?from={}", run.id, run.version + 1), live.clone()))
    };
    Ok(respond(&caller, Section::Runs, &name, whole, live))
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

pub(super) async fn cancel_run(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
    Form(form): Form<Guarded>,
) -> Result<Response, Failure> {
    caller.check_form(&form)?;
    console
        .services
        .pipelines
        .cancel_pipeline_run(call(
            &caller,
            pb::CancelPipelineRunRequest {
                run_id: id.clone(),
                reason: "cancelled from the web console".into(),
            },
        ))
        .await?;
    Ok(Redirect::to(&format!("/runs/{}", encode_query(&id))).into_response())
}

pub(super) async fn download_artifact(
    State(console): State<Console>,
    caller: Caller,
    Path((id, step, path)): Path<(String, String, String)>,
) -> Result<Response, Failure> {
    let stream = console
        .services
        .pipelines
        .download_artifact(call(
            &caller,
            pb::DownloadArtifactRequest {
                run_id: id,
                step,
                path: path.clone(),
            },
        ))
        .await?
        .into_inner();
    let disposition = attachment(path.rsplit('/').next().unwrap_or("artifact"));
    let body = Body::from_stream(stream.map(|chunk| chunk.map(|c| c.data)));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// `Content-Disposition` of a download named `file`: an ASCII stand-in for old clients, the
/// name itself UTF-8 and percent-encoded (RFC 6266).
fn attachment(file: &str) -> String {
    let plain: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "attachment; filename=\"{plain}\"; filename*=UTF-8''{}",
        encode_query(file).replace('/', "%2F")
    )
}

// ----- workers -----

#[derive(Deserialize, Default)]
pub(super) struct WorkersQuery {
    status: Option<String>,
    page: Option<String>,
}

pub(super) async fn workers(
    State(console): State<Console>,
    caller: Caller,
    Query(query): Query<WorkersQuery>,
) -> Result<Response, Failure> {
    let statuses = enum_filter("status", filled(&query.status), "WORKER_STATUS_", |n| {
        pb::WorkerStatus::from_str_name(n).map(|v| v as i32)
    })?;
    let found = console
        .services
        .workers
        .list_workers(call(
            &caller,
            pb::ListWorkersRequest {
                statuses,
                page_size: PAGE_SIZE,
                page_token: filled(&query.page).unwrap_or("").to_owned(),
            },
        ))
        .await?
        .into_inner();
    let pairs = [("status", filled(&query.status))];
    let mut here = pairs.to_vec();
    here.push(("page", filled(&query.page)));
    let drain = may(&caller, Action::Drain);
    let live = html! {
        @if found.workers.is_empty() {
            p.none data-empty { "No worker matches." }
        } @else {
            div.table-wrap tabindex="0" {
                table.workers {
                    thead { tr {
                        th scope="col" { "Worker" } th scope="col" { "Status" } th scope="col" { "Labels" }
                        th scope="col" { "Slots" } th scope="col" title="The host's, 100% for each busy core" { "Host CPU" } th scope="col" { "Host memory" }
                        th scope="col" { "Last beat" } th scope="col" { "Attempts held" }
                        @if drain { th scope="col" { span.visually-hidden { "Actions" } } }
                    } }
                    tbody {
                        @for w in &found.workers {
                            @let status = worker_status_name(w.status);
                            @let usage = w.usage.unwrap_or_default();
                            @let capacity = w.capacity.unwrap_or_default();
                            @let used = w.held.len();
                            @let slots = w.max_concurrent_jobs as usize;
                            tr id={ "w-" (w.id) } data-worker=(w.id) data-status=(status) {
                                th scope="row" { (w.id) }
                                td { (badge(&status)) }
                                td { (labels(&w.labels)) }
                                td {
                                    meter min="0" max=(slots) value=(used) aria-label={ (used) " of " (slots) " slots in use" } {}
                                    " " (used) " used, " (slots.saturating_sub(used)) " free"
                                }
                                td { (format!("{:.0}%", usage.cpu_percent)) br; span.muted { "load " (format!("{:.2}", usage.load_1m)) ", offers " (format!("{:.1}", capacity.cpu_millis as f64 / 1000.0)) " cores" } }
                                td { (usage.memory_used_mb) " of " (usage.memory_total_mb) " MiB" }
                                td { (ago(w.last_heartbeat_at.as_ref())) }
                                td {
                                    @if w.held.is_empty() { span.none { "–" } }
                                    ul.held {
                                        @for h in &w.held {
                                            li { a href={ "/jobs/" (h.job_id) } { (short_id(&h.job_id)) } " #" (h.attempt) }
                                        }
                                    }
                                }
                                @if drain {
                                    td {
                                        @if matches!(status.as_str(), "ready" | "unreachable") {
                                            form.inline method="post" action={ "/workers/" (encode_query(&w.id)) "/drain" } {
                                                input type="hidden" name="csrf" value=(caller.csrf);
                                                button.danger type="submit" aria-label={ "Drain worker " (w.id) } { "Drain" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (pager(&found.next_page_token, "/workers", &pairs, filled(&query.page).is_some()))
    };
    let whole = html! {
        div.heading { h1 { "Workers" } (live_status()) }
        form.filters method="get" action="/workers" aria-label="Filter workers" {
            div.field {
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "any" }
                    @for s in ["ready", "draining", "unreachable", "lost", "offline"] {
                        option value=(s) selected[filled(&query.status) == Some(s)] { (s) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        (live_region("workers", &format!("/workers{}", query_string(&here)), "/events/workers", live.clone()))
    };
    Ok(respond(&caller, Section::Workers, "Workers", whole, live))
}

pub(super) async fn drain_worker(
    State(console): State<Console>,
    caller: Caller,
    Path(id): Path<String>,
    Form(form): Form<Guarded>,
) -> Result<Response, Failure> {
    caller.check_form(&form)?;
    console
        .services
        .workers
        .drain_worker(call(
            &caller,
            pb::DrainWorkerRequest {
                worker_id: id.clone(),
                reason: "drained from the web console".into(),
            },
        ))
        .await?;
    Ok(Redirect::to(&format!("/workers#w-{}", encode_query(&id))).into_response())
}

pub(super) async fn not_found() -> Failure {
    Failure::Answer {
        status: axum::http::StatusCode::NOT_FOUND,
        message: "no such page".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_as_pairs_and_a_bad_one_is_named() {
        let labels = parse_labels(Some("team=data, env = prod")).unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("data"));
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        match parse_labels(Some("team")) {
            Err(Failure::Answer { message, .. }) => assert!(message.starts_with("labels:")),
            _ => panic!("a pair without = is refused"),
        }
    }

    #[test]
    fn query_strings_keep_only_filled_values_encoded() {
        assert_eq!(
            query_string(&[("a", Some("x y")), ("b", None), ("c", Some(""))]),
            "?a=x%20y"
        );
        assert_eq!(query_string(&[("a", None)]), "");
    }

    #[test]
    fn download_names_survive_any_characters() {
        assert_eq!(
            attachment("r\u{e9}sum\u{e9} \"1\".pdf"),
            "attachment; filename=\"r_sum_ _1_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.pdf"
        );
        assert!(axum::http::HeaderValue::from_str(&attachment("a\u{e9}\n")).is_ok());
    }

    #[test]
    fn wire_names_read_as_words() {
        assert_eq!(job_state_name(pb::JobState::TimedOut as i32), "timed_out");
        assert_eq!(
            worker_status_name(pb::WorkerStatus::Unreachable as i32),
            "unreachable"
        );
        assert_eq!(step_state_name(pb::StepState::Skipped as i32), "skipped");
    }
}
