//! The web console's access rules over plain HTTP, as a script or a forger would call it:
//! sign-in, tenant scoping, roles, the anti-forgery token, the origin check, masked secrets
//! and the security headers. (tests/system/tests/console.rs drives it in a real browser.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use hodei_domain::Role;
use hodei_proto::v1 as pb;
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem, shell_job};
use hodei_test_support::{HttpResponse, http_request};

const AGENT: &[AgentSpec] = &[AgentSpec {
    id: "console-access-agent",
    labels: "os=linux",
    slots: 2,
}];

fn addr(system: &TestSystem) -> SocketAddr {
    let url = system.console_url().expect("the console is on");
    url.trim_start_matches("http://").parse().unwrap()
}

async fn get(addr: SocketAddr, path: &str, cookie: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[("cookie", cookie)], "")
        .await
        .unwrap()
}

async fn post(
    addr: SocketAddr,
    path: &str,
    cookie: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut headers = vec![
        ("cookie", cookie),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    headers.extend_from_slice(extra);
    http_request(addr, "POST", path, &headers, body)
        .await
        .unwrap()
}

/// Signs in with `token` and returns the cookie to send.
async fn sign_in(addr: SocketAddr, token: &str) -> String {
    let response = post(
        addr,
        "/login",
        "",
        &[],
        &format!("token={token}&next=%2Fjobs"),
    )
    .await;
    assert_eq!(response.status, 303, "sign-in answered {}", response.body);
    assert_eq!(response.header("location"), Some("/jobs"));
    let cookie = response.header("set-cookie").expect("a cookie").to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    cookie.split(';').next().unwrap().to_owned()
}

/// The anti-forgery token on a page.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf token")
        + 19;
    page[at..at + 32].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_asks_for_a_token_and_follows_the_api_s_roles_and_tenants() {
    let system = TestSystem::start_with(
        AGENT,
        SystemOptions {
            console: true,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let console = addr(&system);

    // Without a credential every page sends the browser to sign in, and a feed does too.
    let page = get(console, "/jobs?state=queued", "").await;
    assert_eq!(page.status, 303);
    assert_eq!(
        page.header("location"),
        Some("/login?next=/jobs%3Fstate%3Dqueued")
    );
    assert_eq!(get(console, "/events/jobs", "").await.status, 303);
    let login = get(console, "/login", "").await;
    assert_eq!(login.status, 200);
    assert!(login.body.contains("name=\"token\""));
    // Every answer forbids framing and foreign scripts.
    let csp = login.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(login.header("x-content-type-options"), Some("nosniff"));

    // A wrong token is refused with the authenticator's reason.
    let refused = post(console, "/login", "", &[], "token=hodei_nosuchtoken").await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("unknown token"), "{}", refused.body);
    // Nor may another site sign a browser in, to its own tenant say.
    let admin = system.admin_token.clone();
    for header in [("sec-fetch-site", "cross-site"), ("origin", "null")] {
        let forged = post(console, "/login", "", &[header], &format!("token={admin}")).await;
        assert_eq!(forged.status, 403, "{header:?}");
        assert!(forged.header("set-cookie").is_none());
    }
    // A sign-in may only lead back into the console.
    let elsewhere = post(
        console,
        "/login",
        "",
        &[],
        &format!("token={admin}&next=https://evil.example/"),
    )
    .await;
    assert_eq!(elsewhere.header("location"), Some("/"));

    // A job of tenant default with a secret value.
    let mut spec = shell_job("console-secret", "sleep 60");
    spec.env.insert("API_KEY".into(), "s3cr3t-value".into());
    spec.secret_env.push("API_KEY".into());
    let job = system.submit(spec).await.unwrap();

    let admin_cookie = sign_in(console, &admin).await;
    let list = get(console, "/jobs", &admin_cookie).await;
    assert_eq!(list.status, 200);
    assert!(list.body.contains(&job.id), "the admin sees the job");
    let page = get(console, &format!("/jobs/{}", job.id), &admin_cookie).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.body.contains("API_KEY="), "the secret's name is shown");
    assert!(
        !page.body.contains("s3cr3t-value"),
        "the secret's value never is"
    );
    // A fragment request answers the live region only.
    let fragment = http_request(
        console,
        "GET",
        &format!("/jobs/{}", job.id),
        &[("cookie", &admin_cookie), ("x-hodei-fragment", "1")],
        "",
    )
    .await
    .unwrap();
    assert!(fragment.body.contains("data-job-state") && !fragment.body.contains("<html"));

    // Another tenant's viewer does not see it at all.
    let other = system.token("team-b", Role::Viewer).await.unwrap();
    let other_cookie = sign_in(console, &other).await;
    assert!(
        !get(console, "/jobs", &other_cookie)
            .await
            .body
            .contains(&job.id)
    );
    assert_eq!(
        get(console, &format!("/jobs/{}", job.id), &other_cookie)
            .await
            .status,
        404
    );

    // A viewer of its tenant reads it, gets no cancel button, and may not cancel by hand.
    let viewer = system.token("default", Role::Viewer).await.unwrap();
    let viewer_cookie = sign_in(console, &viewer).await;
    let page = get(console, &format!("/jobs/{}", job.id), &viewer_cookie).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("Cancel job"));
    let token = csrf(&page.body);
    let denied = post(
        console,
        &format!("/jobs/{}/cancel", job.id),
        &viewer_cookie,
        &[],
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.contains("may not cancel"), "{}", denied.body);

    // A submitter may, but only with its own anti-forgery token and from this origin.
    let submitter = system.token("default", Role::Submitter).await.unwrap();
    let submitter_cookie = sign_in(console, &submitter).await;
    let page = get(console, &format!("/jobs/{}", job.id), &submitter_cookie).await;
    assert!(page.body.contains("Cancel job"));
    let token = csrf(&page.body);
    assert_ne!(
        token,
        csrf(&get(console, "/jobs", &viewer_cookie).await.body)
    );
    let path = format!("/jobs/{}/cancel", job.id);
    let forged = post(
        console,
        &path,
        &submitter_cookie,
        &[],
        "csrf=0123456789abcdef0123456789abcdef",
    )
    .await;
    assert_eq!(forged.status, 403);
    let cross = post(
        console,
        &path,
        &submitter_cookie,
        &[("origin", "https://evil.example")],
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(cross.status, 403);
    assert!(!system.get_job(&job.id).await.unwrap().cancel_requested);
    let origin = format!("http://{console}");
    let cancelled = post(
        console,
        &path,
        &submitter_cookie,
        &[("origin", &origin)],
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(cancelled.status, 303, "{}", cancelled.body);
    assert_eq!(
        cancelled.header("location"),
        Some(format!("/jobs/{}", job.id).as_str())
    );
    let ended = system
        .wait_terminal(&job.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ended.state, pb::JobState::Cancelled as i32);

    // Draining takes an operator: the submitter's form is refused by the API's own check.
    let workers = get(console, "/workers", &submitter_cookie).await;
    assert!(workers.body.contains("console-access-agent"));
    assert!(!workers.body.contains(">Drain<"));
    let denied = post(
        console,
        "/workers/console-access-agent/drain",
        &submitter_cookie,
        &[],
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.body);

    // Signing out forgets the cookie.
    let out = post(
        console,
        "/logout",
        &submitter_cookie,
        &[],
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    system.stop().await;
}
