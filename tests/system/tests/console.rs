//! The web console in a real headless Chromium against a real system: a submitted job appears
//! in the list without a reload, its log lines stream in, cancel works, a pipeline's DAG shows
//! each step changing state, and the workers page shows a drained worker. It takes a
//! screenshot of every page (laptop and phone widths) into `target/console-screenshots`, or
//! into `docs/console` with `HODEI_UPDATE_SCREENSHOTS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use hodei_proto::v1 as pb;
use hodei_system_tests::browser::{Browser, Page};
use hodei_system_tests::{AgentSpec, SystemOptions, TestSystem, shell_job};

const AGENTS: &[AgentSpec] = &[
    AgentSpec {
        id: "console-agent-1",
        labels: "os=linux,disk=ssd",
        slots: 3,
    },
    AgentSpec {
        id: "console-agent-2",
        labels: "os=linux",
        slots: 2,
    },
];

/// Long enough for a loaded CI machine; every wait ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(30);

fn screenshots() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    if std::env::var("HODEI_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        root.join("docs/console")
    } else {
        root.join("target/console-screenshots")
    }
}

async fn shoot(page: &Page, name: &str) {
    page.set_viewport(1280, 860, false).await.unwrap();
    page.screenshot(&screenshots().join(format!("{name}.png")))
        .await
        .unwrap();
}

async fn shoot_phone(page: &Page, name: &str) {
    page.set_viewport(390, 844, true).await.unwrap();
    page.screenshot(&screenshots().join(format!("{name}-phone.png")))
        .await
        .unwrap();
    page.set_viewport(1280, 860, false).await.unwrap();
}

/// Marks the document: the mark is gone if the page was reloaded.
async fn mark(page: &Page) {
    page.eval("window.__hodeiMark = 'still-here'")
        .await
        .unwrap();
}

async fn not_reloaded(page: &Page) {
    assert_eq!(
        page.eval("window.__hodeiMark").await.unwrap(),
        serde_json::json!("still-here"),
        "the page was reloaded"
    );
}

async fn wait_live(page: &Page) {
    page.wait_for(
        "document.querySelector('[data-live-status]')?.dataset.liveState === 'live'",
        "the page's live feed to connect",
        WAIT,
    )
    .await
    .unwrap();
}

fn js(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_jobs_logs_pipelines_and_workers_live() {
    let system = TestSystem::start_with(
        AGENTS,
        // As scripts/up.sh serves it: over TLS (HTTP/2), the gRPC API too.
        SystemOptions {
            console: true,
            tls: true,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let url = system.console_url().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let browser = Browser::launch().await.unwrap();
    let page = browser.new_page().await.unwrap();
    page.set_viewport(1280, 860, false).await.unwrap();

    // Sign in: the jobs page sends the browser to the sign-in form and back.
    page.goto(&format!("{url}/jobs")).await.unwrap();
    page.wait_for(
        "location.pathname === '/login' && !!document.querySelector('#token')",
        "the sign-in form",
        WAIT,
    )
    .await
    .unwrap();
    shoot(&page, "sign-in").await;
    page.eval(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('.signin form').submit()",
        js(&system.admin_token)
    ))
    .await
    .unwrap();
    if let Err(e) = page
        .wait_for(
            "location.pathname === '/jobs'",
            "the jobs page after sign-in",
            WAIT,
        )
        .await
    {
        let body = page.eval("document.body.innerText").await.unwrap();
        panic!("{e}: the page says {body}");
    }
    wait_live(&page).await;

    // 1. A submitted job appears in the list without a reload.
    mark(&page).await;
    let mut spec = shell_job(
        "console-follow-me",
        "for i in 1 2 3 4 5 6; do echo \"line $i of the console job\"; sleep 0.4; done; \
         echo 'to stderr' >&2; sleep 120",
    );
    spec.labels.insert("team".into(), "console".into());
    let job = system.submit(spec).await.unwrap();
    page.wait_for(
        &format!("!!document.querySelector('tr[data-job=\"{}\"]')", job.id),
        "the new job in the list",
        WAIT,
    )
    .await
    .unwrap();
    not_reloaded(&page).await;
    // A few finished jobs around it, for the lists and the overview.
    for (name, script) in [
        ("console-ok", "echo fine"),
        ("console-fails", "echo broken >&2; exit 3"),
    ] {
        let done = system.submit(shell_job(name, script)).await.unwrap();
        system.wait_terminal(&done.id, WAIT).await.unwrap();
    }
    page.wait_for(
        "document.querySelectorAll('tr[data-job]').length >= 3",
        "three jobs in the list",
        WAIT,
    )
    .await
    .unwrap();
    shoot(&page, "jobs").await;
    shoot_phone(&page, "jobs").await;

    // 2. Its log lines stream in.
    page.click(&format!("tr[data-job=\"{}\"] a", job.id))
        .await
        .unwrap();
    page.wait_for(
        &format!("location.pathname === '/jobs/{}'", job.id),
        "the job's page",
        WAIT,
    )
    .await
    .unwrap();
    page.wait_for(
        "document.querySelectorAll('#log .line').length >= 1",
        "the first log line",
        WAIT,
    )
    .await
    .unwrap();
    mark(&page).await;
    let lines = page
        .wait_for(
            "(() => { const t = document.querySelector('#log').textContent; \
               return t.includes('line 6 of the console job') && t.includes('to stderr') ? t : null })()",
            "every log line, streamed",
            WAIT,
        )
        .await
        .unwrap();
    not_reloaded(&page).await;
    let text = lines.as_str().unwrap();
    for i in 1..=6 {
        assert!(
            text.contains(&format!("line {i} of the console job")),
            "{text}"
        );
    }
    assert_eq!(
        page.eval("document.querySelectorAll('#log .stderr').length")
            .await
            .unwrap(),
        serde_json::json!(1)
    );
    page.wait_for(
        "document.querySelector('[data-job-state]')?.dataset.jobState === 'running'",
        "the job shown running",
        WAIT,
    )
    .await
    .unwrap();
    shoot(&page, "job").await;
    shoot_phone(&page, "job").await;

    // 3. Cancel works: the job ends cancelled, and the page says so.
    page.click("#cancel").await.unwrap();
    page.wait_for(
        "document.querySelector('[data-job-state]')?.dataset.jobState === 'cancelled'",
        "the job shown cancelled",
        WAIT,
    )
    .await
    .unwrap();
    let ended = system.wait_terminal(&job.id, WAIT).await.unwrap();
    assert_eq!(ended.state, pb::JobState::Cancelled as i32);
    page.wait_for(
        "document.querySelector('[data-outcome]')?.textContent === 'cancelled'",
        "the attempt's outcome",
        WAIT,
    )
    .await
    .unwrap();

    // 4. A pipeline's DAG shows each step changing state, live.
    let step = |name: &str, needs: &[&str], script: &str| pb::PipelineStep {
        name: name.to_owned(),
        needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        job: Some(pb::JobSpec {
            name: String::new(),
            ..shell_job("step", script)
        }),
        ..Default::default()
    };
    let mut test = step("test", &["build"], "echo testing $MATRIX_OS; sleep 2");
    test.matrix.insert(
        "os".into(),
        pb::MatrixValues {
            values: vec!["linux".into(), "mac".into()],
        },
    );
    let pipeline = pb::PipelineSpec {
        name: "console-build-test-deploy".into(),
        steps: vec![
            pb::PipelineStep {
                artifacts: Some(pb::StepArtifacts {
                    produce: vec!["out/build.txt".into()],
                    consume: vec![],
                }),
                ..step(
                    "build",
                    &[],
                    "echo building; mkdir -p out; echo 'built by the console test' > out/build.txt; sleep 2",
                )
            },
            step("lint", &[], "echo linting; sleep 1"),
            test,
            step("deploy", &["test", "lint"], "echo deploying; sleep 1"),
        ],
        ..Default::default()
    };
    let run = system.submit_pipeline(pipeline).await.unwrap();
    page.goto(&format!("{url}/runs/{}", run.id)).await.unwrap();
    wait_live(&page).await;
    mark(&page).await;
    // Every state each step is drawn in, as the page changes.
    page.eval(
        "window.__seen = {}; \
         const note = () => document.querySelectorAll('svg.dag [data-step]').forEach(n => { \
           (window.__seen[n.dataset.step] ||= new Set()).add(n.dataset.state) }); \
         note(); new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true})",
    )
    .await
    .unwrap();
    page.wait_for(
        "document.querySelector('[data-run-state]')?.dataset.runState === 'succeeded'",
        "the run shown succeeded",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    not_reloaded(&page).await;
    let seen = page
        .eval("Object.fromEntries(Object.entries(window.__seen).map(([k, v]) => [k, [...v]]))")
        .await
        .unwrap();
    for step in ["build", "test[os=linux]", "test[os=mac]", "deploy"] {
        let states: Vec<&str> = seen[step]
            .as_array()
            .unwrap_or_else(|| panic!("step {step} never drawn: {seen}"))
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(states.contains(&"succeeded"), "{step}: {states:?}");
        assert!(
            states
                .iter()
                .any(|s| matches!(*s, "waiting" | "queued" | "running")),
            "{step} was drawn only ended: {states:?}"
        );
    }
    assert_eq!(
        page.eval("document.querySelectorAll('svg.dag .matrix').length")
            .await
            .unwrap(),
        serde_json::json!(1),
        "the matrix is one group"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('svg.dag .edge').length")
            .await
            .unwrap(),
        serde_json::json!(3),
        "build→test, test→deploy, lint→deploy"
    );
    // Its artifact downloads from the link the page shows.
    let artifact = page
        .eval(
            "(async () => { const a = document.querySelector('table.artifacts a[download]'); \
               return a.textContent + ':' + (await (await fetch(a.href)).text()) })()",
        )
        .await
        .unwrap();
    assert_eq!(
        artifact,
        serde_json::json!("out/build.txt:built by the console test\n")
    );
    shoot(&page, "pipeline-run").await;
    shoot_phone(&page, "pipeline-run").await;
    // Clicking a step opens its job.
    page.click("svg.dag [data-step=\"deploy\"]").await.unwrap();
    page.wait_for(
        "location.pathname.startsWith('/jobs/') && document.querySelector('h1')?.textContent === 'deploy'",
        "the deploy step's job",
        WAIT,
    )
    .await
    .unwrap();
    page.goto(&format!("{url}/runs")).await.unwrap();
    page.wait_for(
        &format!("!!document.querySelector('tr[data-run=\"{}\"]')", run.id),
        "the run in the list",
        WAIT,
    )
    .await
    .unwrap();
    shoot(&page, "pipeline-runs").await;

    // 5. The workers page shows a drained worker.
    page.goto(&format!("{url}/workers")).await.unwrap();
    wait_live(&page).await;
    mark(&page).await;
    shoot(&page, "workers").await;
    shoot_phone(&page, "workers").await;
    page.click("tr[data-worker=\"console-agent-2\"] button")
        .await
        .unwrap();
    page.wait_for(
        "['draining', 'offline'].includes(document.querySelector('tr[data-worker=\"console-agent-2\"]')?.dataset.status)",
        "the drained worker",
        WAIT,
    )
    .await
    .unwrap();
    let drained = system
        .workers
        .clone()
        .get_worker(pb::GetWorkerRequest {
            worker_id: "console-agent-2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert!(
        [
            pb::WorkerStatus::Draining as i32,
            pb::WorkerStatus::Offline as i32
        ]
        .contains(&drained.status)
    );
    // The drain form reloaded the page; once its agent has gone, the page shows the worker
    // offline by itself.
    mark(&page).await;
    page.wait_for(
        "document.querySelector('tr[data-worker=\"console-agent-2\"]')?.dataset.status === 'offline'",
        "the drained worker offline",
        WAIT,
    )
    .await
    .unwrap();
    not_reloaded(&page).await;

    // The overview counts what happened.
    page.goto(&format!("{url}/")).await.unwrap();
    wait_live(&page).await;
    let succeeded = page
        .eval("Number(document.querySelector('[data-count=\"succeeded\"]').textContent)")
        .await
        .unwrap();
    assert!(succeeded.as_f64().unwrap() >= 6.0, "{succeeded}");
    assert_eq!(
        page.eval("Number(document.querySelector('[data-count=\"cancelled\"]').textContent)")
            .await
            .unwrap(),
        serde_json::json!(1)
    );
    shoot(&page, "overview").await;
    shoot_phone(&page, "overview").await;
    system.stop().await;
}
