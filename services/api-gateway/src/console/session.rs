//! Signing in: the caller's token lives in an HTTP-only, same-site cookie (or comes as
//! `authorization: Bearer …`, for scripts) and is checked by the gRPC API's own authenticator
//! on every request. Forms that change something carry a token derived from the credential,
//! and are refused when the browser says they come from another origin.

use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use hodei_domain::Principal;
use maud::html;
use serde::Deserialize;

use super::Console;
use super::views::{self, Failure};
use crate::auth::Credential;

/// The cookie that holds the caller's token.
const COOKIE: &str = "hodei_console";
/// The cookie over TLS: a `__Host-` cookie is set only by this host over TLS, for every path,
/// so a sibling site (another subdomain or port) cannot plant one the console would read
/// before its own.
const HOST_COOKIE: &str = "__Host-hodei_console";

/// The session cookie's name: [`HOST_COOKIE`] over TLS, [`COOKIE`] over plain HTTP (where a
/// browser refuses `__Host-` cookies).
fn cookie_name(secure: bool) -> &'static str {
    if secure { HOST_COOKIE } else { COOKIE }
}

/// The `Set-Cookie` value that holds `token`, or with an empty one ends the session.
fn session_cookie(secure: bool, token: &str) -> String {
    let name = cookie_name(secure);
    let ended = if token.is_empty() { "; Max-Age=0" } else { "" };
    let tls = if secure { "; Secure" } else { "" };
    format!("{name}={token}; Path=/; HttpOnly; SameSite=Strict{ended}{tls}")
}

/// Header a page's script sets when it asks for a live region's fragment only.
pub(super) const FRAGMENT_HEADER: &str = "x-hodei-fragment";

/// A signed-in caller.
pub(crate) struct Caller {
    pub principal: Principal,
    /// The session's token, checked again while a stream opened for the page lasts.
    pub credential: Credential,
    /// The anti-forgery token forms must carry.
    pub csrf: String,
    /// The request asks for a live region's fragment, not the whole page.
    pub fragment: bool,
    /// Why the browser says the request comes from another site, if it does.
    foreign: Option<String>,
}

/// Why the browser says a request comes from another site: `Sec-Fetch-Site` other than
/// `same-origin` or `none` (typed in), or an `Origin` that is not this console's host (the
/// `Host` header, or the URI's authority over HTTP/2). `None` when it says nothing of it.
fn foreign_origin(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return Some(format!("a {site} request"));
    }
    let origin = text(header::ORIGIN)?;
    let host = text(header::HOST).or_else(|| uri.authority().map(|a| a.as_str()));
    let origin_host = origin.split_once("://").map(|(_, h)| h);
    match (origin_host, host) {
        (Some(from), Some(host)) if from == host => None,
        _ => Some(format!("a request from {origin}")),
    }
}

fn cookie_token(headers: &HeaderMap, cookie: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// The anti-forgery token of a credential: a digest no page can turn back into it.
fn csrf_of(credential: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("hodei-console-csrf\0{credential}").as_bytes(),
    );
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FromRequestParts<Console> for Caller {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Failure> {
        let fragment = parts.headers.contains_key(FRAGMENT_HEADER);
        let (authorization, credential) = match parts.headers.get(header::AUTHORIZATION) {
            Some(value) => {
                let credential = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.split_once(' ').map(|(_, c)| c.trim().to_owned()))
                    .unwrap_or_default();
                (Some(value.clone()), credential)
            }
            None => match cookie_token(&parts.headers, cookie_name(console.secure)) {
                Some(token) => (
                    HeaderValue::from_str(&format!("Bearer {token}")).ok(),
                    token,
                ),
                None => (None, String::new()),
            },
        };
        let next = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let Some(authorization) = authorization else {
            return Err(Failure::SignIn { next, why: None });
        };
        match console
            .auth
            .authenticate(Some(authorization.clone()), None)
            .await
        {
            Ok(principal) => Ok(Caller {
                principal,
                credential: Credential::new(console.auth.clone(), Some(authorization), None),
                csrf: csrf_of(&credential),
                fragment,
                foreign: foreign_origin(&parts.headers, &parts.uri),
            }),
            Err(crate::errors::ApiError::Unauthenticated(why)) => Err(Failure::SignIn {
                next,
                why: Some(why),
            }),
            Err(e) => Err(Failure::from(e)),
        }
    }
}

/// A form that changes something: its anti-forgery token.
#[derive(Deserialize)]
pub(super) struct Guarded {
    #[serde(default)]
    pub csrf: String,
}

impl Caller {
    /// Refuses a state-changing form that lacks this caller's anti-forgery token or that the
    /// browser says was sent from another origin.
    pub fn check_form(&self, form: &Guarded) -> Result<(), Failure> {
        if form.csrf != self.csrf {
            return Err(Failure::Forbidden(
                "the form's anti-forgery token does not match your session: reload the page".into(),
            ));
        }
        match &self.foreign {
            Some(why) => Err(Failure::Forbidden(format!(
                "{why} may not act on this console"
            ))),
            None => Ok(()),
        }
    }
}

#[derive(Deserialize, Default)]
pub(super) struct Next {
    #[serde(default)]
    next: Option<String>,
}

/// Where to go after signing in: a path on this console only (printable ASCII, so nothing a
/// browser strips can turn it into `//elsewhere`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n.into()
        }
        _ => "/".into(),
    }
}

/// Cookies past about 4 KB are dropped by browsers: a longer credential could never sign in.
const MAX_CREDENTIAL: usize = 3_800;

pub(super) async fn login_page(Query(next): Query<Next>) -> Response {
    sign_in_form(&safe_next(next.next.as_deref()), None, StatusCode::OK)
}

fn sign_in_form(next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        section.signin aria-labelledby="signin-title" {
            h1 #signin-title { "Sign in to Hodei" }
            p { "Paste an API token (" code { "hodei token create" } " or "
                code { "hodei-admin token create" } ") or an OIDC access token. It is kept in a
                cookie this browser sends only to this console." }
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                textarea #token name="token" rows="3" required autocomplete="off"
                    spellcheck="false" autofocus {}
                button type="submit" { "Sign in" }
            }
        }
    };
    (status, views::bare_page("Sign in", body)).into_response()
}

#[derive(Deserialize)]
pub(super) struct Login {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

pub(super) async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Form(login): Form<Login>,
) -> Response {
    if let Some(why) = foreign_origin(&headers, &uri) {
        return Failure::Forbidden(format!("{why} may not sign in to this console"))
            .into_response();
    }
    let next = safe_next(login.next.as_deref());
    let token = login.token.trim();
    let header = HeaderValue::from_str(&format!("Bearer {token}"));
    let refused = |why: String| sign_in_form(&next, Some(&why), StatusCode::UNAUTHORIZED);
    let Ok(header) = header else {
        return refused("the token has characters no token has".into());
    };
    if token.is_empty() || token.contains(';') || token.contains(char::is_whitespace) {
        return refused("the token has characters no token has".into());
    }
    if token.len() > MAX_CREDENTIAL {
        return refused(format!(
            "the token is {} bytes long; the console keeps at most {MAX_CREDENTIAL} in its cookie: \
             use a hodei API token",
            token.len()
        ));
    }
    match console.auth.authenticate(Some(header), None).await {
        Ok(principal) => {
            tracing::info!(subject = %principal.subject, tenant = %principal.tenant, "console sign-in");
            let cookie = session_cookie(console.secure, token);
            ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
        }
        Err(crate::errors::ApiError::Unauthenticated(why)) => {
            tracing::info!(error = %why, "console sign-in refused");
            refused(why)
        }
        Err(e) => Failure::from(e).into_response(),
    }
}

pub(super) async fn logout(
    State(console): State<Console>,
    caller: Caller,
    Form(form): Form<Guarded>,
) -> Response {
    if let Err(e) = caller.check_form(&form) {
        return e.into_response();
    }
    let cookie = session_cookie(console.secure, "");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; hodei_console=hodei_abc; b=2"),
        );
        assert_eq!(
            cookie_token(&headers, cookie_name(false)).as_deref(),
            Some("hodei_abc")
        );
        // Over TLS only the `__Host-` cookie counts: one planted under the plain name does not.
        assert_eq!(cookie_token(&headers, cookie_name(true)), None);
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("hodei_console=planted; __Host-hodei_console=hodei_own"),
        );
        assert_eq!(
            cookie_token(&headers, cookie_name(true)).as_deref(),
            Some("hodei_own")
        );
        headers.insert(header::COOKIE, HeaderValue::from_static("hodei_console="));
        assert_eq!(cookie_token(&headers, cookie_name(false)), None);
    }

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert_eq!(safe_next(Some("/jobs?state=queued")), "/jobs?state=queued");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/caf\u{e9}")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn requests_from_another_site_are_told_apart() {
        let uri: Uri = "https://console.example:8080/jobs".parse().unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(*k, HeaderValue::from_static(v));
            }
            map
        };
        let local: Uri = "/jobs".parse().unwrap();
        assert_eq!(foreign_origin(&headers(&[]), &local), None);
        let same = headers(&[("origin", "http://h:1"), ("host", "h:1")]);
        assert_eq!(foreign_origin(&same, &local), None);
        // HTTP/2 sends no Host: the URI's authority stands in.
        let h2 = headers(&[("origin", "https://console.example:8080")]);
        assert_eq!(foreign_origin(&h2, &uri), None);
        let other = headers(&[("origin", "https://evil.example"), ("host", "h:1")]);
        assert!(foreign_origin(&other, &local).is_some());
        let null = headers(&[("origin", "null"), ("host", "h:1")]);
        assert!(foreign_origin(&null, &local).is_some());
        let cross = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(foreign_origin(&cross, &local).is_some());
        let typed = headers(&[("sec-fetch-site", "none")]);
        assert_eq!(foreign_origin(&typed, &local), None);
    }

    #[test]
    fn the_anti_forgery_token_depends_on_the_credential() {
        assert_eq!(csrf_of("a"), csrf_of("a"));
        assert_ne!(csrf_of("a"), csrf_of("b"));
        assert_eq!(csrf_of("a").len(), 32);
    }
}
