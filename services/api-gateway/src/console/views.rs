//! The console's markup shared by every page: the layout, state badges, times, labels, the
//! error pages and the bundled assets.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::session::Caller;

/// The stylesheet and the script, compiled in: the console needs nothing from the internet.
const CSS: &str = include_str!("../../assets/console.css");
const JS: &str = include_str!("../../assets/console.js");

/// Which top-level page a page belongs to, for the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    Overview,
    Jobs,
    Runs,
    Workers,
}

const SECTIONS: [(Section, &str, &str); 4] = [
    (Section::Overview, "/", "Overview"),
    (Section::Jobs, "/jobs", "Jobs"),
    (Section::Runs, "/runs", "Pipelines"),
    (Section::Workers, "/workers", "Workers"),
];

/// The document every page is: its head (the bundled assets), a header holding `top`, and
/// `body` as the main content.
fn document(title: &str, top: Markup, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    meta name="color-scheme" content="light dark";
                    title { (title) " · Hodei" }
                    link rel="stylesheet" href="/assets/console.css";
                    script src="/assets/console.js" defer {}
                }
                body {
                    a.skip href="#main" { "Skip to content" }
                    header.top { (top) }
                    main #main tabindex="-1" { (body) }
                }
            }
        }
        .into_string(),
    )
}

/// A whole page for a signed-in caller.
pub(super) fn page(caller: &Caller, section: Section, title: &str, body: Markup) -> Html<String> {
    let who = &caller.principal;
    let top = html! {
        a.brand href="/" aria-label="Hodei overview" { "Hodei" }
        nav aria-label="Main" {
            ul {
                @for (s, href, name) in SECTIONS {
                    li {
                        @if s == section {
                            a href=(href) aria-current="page" { (name) }
                        } @else {
                            a href=(href) { (name) }
                        }
                    }
                }
            }
        }
        div.who {
            span title=(who.subject) {
                (who.tenant) " · " (who.role)
            }
            form method="post" action="/logout" {
                input type="hidden" name="csrf" value=(caller.csrf);
                button.link type="submit" { "Sign out" }
            }
        }
    };
    document(title, top, body)
}

/// A page without navigation: sign-in and errors before sign-in.
pub(super) fn bare_page(title: &str, body: Markup) -> Html<String> {
    document(title, html! { a.brand href="/" { "Hodei" } }, body)
}

/// A region that reloads itself from `fragment` whenever the server-sent events feed `feed`
/// says something changed.
pub(super) fn live_region(id: &str, fragment: &str, feed: &str, content: Markup) -> Markup {
    html! {
        div.live id=(id) data-fragment=(fragment) data-feed=(feed) {
            (content)
        }
    }
}

/// The small "live" indicator of a page.
pub(super) fn live_status() -> Markup {
    html! {
        span.live-status role="status" data-live-status { "connecting…" }
    }
}

/// A state as a coloured badge with its name (colour is never the only cue).
pub(super) fn badge(state: &str) -> Markup {
    html! { span class={ "badge s-" (state) } data-state=(state) { (state.replace('_', " ")) } }
}

pub(super) fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let t = t?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
}

/// A time as `2026-12-04 10:11:12` (UTC), or a dash.
pub(super) fn time(t: Option<&prost_types::Timestamp>) -> Markup {
    match timestamp(t) {
        Some(at) => html! {
            time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S")) }
        },
        None => html! { span.none { "–" } },
    }
}

/// How long ago `t` was, as `4 s ago`.
pub(super) fn ago(t: Option<&prost_types::Timestamp>) -> Markup {
    match timestamp(t) {
        Some(at) => {
            let secs = (Utc::now() - at).num_seconds().max(0);
            html! { time datetime=(at.to_rfc3339()) title=(at.format("%Y-%m-%d %H:%M:%S UTC")) { (duration_secs(secs)) " ago" } }
        }
        None => html! { span.none { "never" } },
    }
}

/// The time between two instants, as `1 min 4 s`, or a dash.
pub(super) fn took(
    from: Option<&prost_types::Timestamp>,
    to: Option<&prost_types::Timestamp>,
) -> Markup {
    match (timestamp(from), timestamp(to)) {
        (Some(a), Some(b)) => {
            let ms = (b - a).num_milliseconds().max(0);
            if ms < 10_000 {
                html! { (format!("{:.1} s", ms as f64 / 1000.0)) }
            } else {
                html! { (duration_secs(ms / 1000)) }
            }
        }
        _ => html! { span.none { "–" } },
    }
}

fn duration_secs(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        s => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Labels as `key=value` chips, in key order.
pub(super) fn labels(map: &std::collections::HashMap<String, String>) -> Markup {
    let mut sorted: Vec<_> = map.iter().collect();
    sorted.sort();
    html! {
        @if sorted.is_empty() { span.none { "–" } }
        ul.labels {
            @for (k, v) in sorted { li { code { (k) "=" (v) } } }
        }
    }
}

/// The last 12 characters of an id (a UUIDv7's random part), with the whole id as its title.
pub(super) fn short_id(id: &str) -> Markup {
    let short: String = id
        .chars()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    html! { code.id title=(id) { "…" (short) } }
}

/// A prost enum's name without its prefix, lowercase: `JOB_STATE_TIMED_OUT` → `timed_out`.
pub(super) fn wire_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// Why a console request failed, as a page (or, for a script's request, plain text).
#[derive(Debug)]
pub(crate) enum Failure {
    /// No credential, or one that no longer works: sign in again.
    SignIn {
        next: String,
        why: Option<String>,
    },
    Forbidden(String),
    Answer {
        status: StatusCode,
        message: String,
    },
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => {
                return Failure::SignIn {
                    next: "/".into(),
                    why: Some(status.message().to_owned()),
                };
            }
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::Answer {
            status: http,
            message: status.message().to_owned(),
        }
    }
}

impl From<crate::errors::ApiError> for Failure {
    fn from(e: crate::errors::ApiError) -> Self {
        Failure::from(tonic::Status::from(e))
    }
}

impl From<hodei_domain::AccessError> for Failure {
    fn from(e: hodei_domain::AccessError) -> Self {
        Failure::Forbidden(e.to_string())
    }
}

impl From<hodei_storage::StorageError> for Failure {
    fn from(e: hodei_storage::StorageError) -> Self {
        Failure::from(crate::errors::ApiError::from(e))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Failure::SignIn { next, why } => {
                tracing::debug!(why = ?why, "console request without a valid credential");
                let mut response =
                    Redirect::to(&format!("/login?next={}", encode_query(&next))).into_response();
                // A script's fetch or event stream cannot follow a redirect into a form: it
                // sees 401 and reloads the page, which signs in.
                response
                    .headers_mut()
                    .insert("x-hodei-sign-in", HeaderValue::from_static("required"));
                return response;
            }
            Failure::Forbidden(message) => (StatusCode::FORBIDDEN, message),
            Failure::Answer { status, message } => (status, message),
        };
        let title = status.canonical_reason().unwrap_or("Error");
        let body = html! {
            section.failure {
                h1 { (status.as_u16()) " " (title) }
                p role="alert" { (message) }
                p { a href="/" { "Back to the overview" } }
            }
        };
        (status, bare_page(title, body)).into_response()
    }
}

/// Percent-encodes a value for a query string.
pub(super) fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The bundled stylesheet and script.
pub(super) async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Headers every answer carries: nothing but this console's own assets may load or run, and
/// no other site may frame it.
pub(super) async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Pages hold a tenant's data and the form token: never kept by the browser or a proxy.
    // The assets say their own.
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    // A page and its live region's fragment share a URL.
    headers.insert(header::VARY, HeaderValue::from_static("x-hodei-fragment"));
    response
}
