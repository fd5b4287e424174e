//! The outbox relay against a real PostgreSQL database (a fresh one per test) and a private
//! nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{Job, JobId, JobSpec, TenantId};
use hodei_messaging::{AgentCommand, Outgoing, streams};
use hodei_runtime::relay;
use hodei_storage::{driver, outbox};
use hodei_test_support::{TestDatabase, TestNats};

async fn database() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await.unwrap();
    let pool = db.connect().await.unwrap();
    hodei_storage::migrate(&pool).await.unwrap();
    (db, pool)
}

fn new_job() -> (Job, hodei_domain::JobEvent) {
    let d = JobSpecDraft::exec("relayed", &["true"]);
    Job::submit(
        JobId::new(),
        TenantId::default(),
        JobSpec::try_from(d).unwrap(),
        Utc::now(),
    )
}

/// A private nats-server (kept running while the returned handle lives), a client and its
/// JetStream context with Hodei's streams.
async fn bus() -> (TestNats, async_nats::Client, async_nats::jetstream::Context) {
    let nats = TestNats::start().await.unwrap();
    let (client, js) = hodei_messaging::connect(&nats.url(), "test", Duration::from_secs(10))
        .await
        .unwrap();
    streams::ensure_all(&js).await.unwrap();
    (nats, client, js)
}

#[tokio::test]
async fn the_outbox_relay_publishes_committed_messages_once() {
    let (db, pool) = database().await;
    let (_nats, client, js) = bus().await;
    let mut sub = client.subscribe("hodei.v1.evt.>").await.unwrap();

    let (job, first) = new_job();
    let message = Outgoing::job_event(&first, "test").unwrap();
    driver::submit_job(&pool, &job, &first, std::slice::from_ref(&message))
        .await
        .unwrap();
    assert_eq!(outbox::pending(&pool).await.unwrap(), 1);

    assert_eq!(
        relay::relay_batch(&pool, &js, 100, "test")
            .await
            .unwrap()
            .published,
        1
    );
    assert_eq!(outbox::pending(&pool).await.unwrap(), 0);
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), message.subject);
    let envelope: hodei_messaging::Envelope = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(envelope.id, first.event_id);
    assert_eq!(envelope.job_event().unwrap(), first);

    // A crash between publish and delete relays the row again: the server keeps one copy.
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    outbox::append(&mut tx, std::slice::from_ref(&message))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        relay::relay_batch(&pool, &js, 100, "test")
            .await
            .unwrap()
            .published,
        1
    );
    let mut stream = js.get_stream(streams::EVENTS).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    db.cleanup().await.unwrap();
}

/// An assignment of `job` to worker `w-1`, and a cancel of the same attempt.
fn commands(job: &Job) -> (Outgoing, Outgoing) {
    let worker: hodei_domain::WorkerId = "w-1".parse().unwrap();
    let assign = AgentCommand::Assign {
        job_id: job.id(),
        attempt: job.current_attempt(),
        spec: Box::new(job.spec().clone()),
        assigned_at: Utc::now(),
        incarnation: None,
    };
    let cancel = AgentCommand::Cancel {
        job_id: job.id(),
        attempt: job.current_attempt(),
        reason: "test".to_owned(),
    };
    (
        Outgoing::agent_command(&worker, &assign).unwrap(),
        Outgoing::agent_command(&worker, &cancel).unwrap(),
    )
}

/// Commits `messages` to the outbox in one transaction.
async fn append(pool: &sqlx::PgPool, messages: &[Outgoing]) {
    let mut tx = pool.begin().await.unwrap();
    outbox::append(&mut tx, messages).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn an_assignment_whose_delete_was_lost_is_never_published_again_past_half_the_duplicate_window()
 {
    let (db, pool) = database().await;
    let (_nats, _client, js) = bus().await;
    let (job, _) = new_job();
    let (assign, cancel) = commands(&job);
    assert!(
        assign.at_most_once,
        "an assignment must not be delivered twice"
    );
    assert!(!cancel.at_most_once, "a cancel may be: it is idempotent");
    let stored = || async {
        let mut stream = js.get_stream(streams::AGENT).await.unwrap();
        stream.info().await.unwrap().state.messages
    };

    append(&pool, std::slice::from_ref(&assign)).await;
    assert_eq!(
        relay::relay_batch(&pool, &js, 100, "test")
            .await
            .unwrap()
            .published,
        1
    );
    assert_eq!(stored().await, 1);

    // The relay's delete was lost (PostgreSQL went away after the publication): the row is
    // back. While it is young, publishing it again is harmless: the server keeps one copy.
    append(&pool, std::slice::from_ref(&assign)).await;
    let relayed = relay::relay_batch(&pool, &js, 100, "test").await.unwrap();
    assert_eq!((relayed.published, relayed.expired), (1, 0));
    assert_eq!(stored().await, 1);

    // Older than half the duplicate window (PostgreSQL stayed away that long), the server
    // may no longer recognise it (here it is made to forget, with a new stream): it is
    // deleted unpublished. A cancel as old is still published: delivered twice, it does
    // nothing more.
    js.delete_stream(streams::AGENT).await.unwrap();
    streams::ensure_all(&js).await.unwrap();
    append(&pool, &[assign.clone(), cancel.clone()]).await;
    let age = streams::AT_MOST_ONCE_WITHIN.as_secs_f64() + 1.0;
    sqlx::query("UPDATE outbox SET created_at = now() - make_interval(secs => $1)")
        .bind(age)
        .execute(&pool)
        .await
        .unwrap();
    let relayed = relay::relay_batch(&pool, &js, 100, "test").await.unwrap();
    assert_eq!((relayed.published, relayed.expired), (1, 1));
    assert!(relayed.stopped.is_none(), "{:?}", relayed.stopped);
    assert_eq!(outbox::pending(&pool).await.unwrap(), 0);
    assert_eq!(stored().await, 1, "only the cancel");
    let stream = js.get_stream(streams::AGENT).await.unwrap();
    let last = stream
        .get_last_raw_message_by_subject(&assign.subject)
        .await
        .unwrap();
    let last: AgentCommand = serde_json::from_slice(&last.payload).unwrap();
    assert!(matches!(last, AgentCommand::Cancel { .. }), "{last:?}");
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_message_too_large_for_nats_is_dead_lettered_and_the_rows_behind_it_flow() {
    let (db, pool) = database().await;
    let (_nats, client, js) = bus().await;
    let max_payload = client.server_info().max_payload;

    let (before, first) = new_job();
    let before_message = Outgoing::job_event(&first, "test").unwrap();
    driver::submit_job(
        &pool,
        &before,
        &first,
        std::slice::from_ref(&before_message),
    )
    .await
    .unwrap();
    // A row written before the edge checked sizes: larger than the server takes.
    let mut poison = before_message.clone();
    poison.id = uuid::Uuid::now_v7();
    poison.payload = vec![b' '; max_payload + 1];
    let (after, second) = new_job();
    let after_message = Outgoing::job_event(&second, "test").unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    outbox::append(&mut tx, std::slice::from_ref(&poison))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    driver::submit_job(&pool, &after, &second, std::slice::from_ref(&after_message))
        .await
        .unwrap();
    assert_eq!(outbox::pending(&pool).await.unwrap(), 3);

    let relayed = relay::relay_batch(&pool, &js, 100, "test").await.unwrap();
    assert_eq!((relayed.published, relayed.dead_lettered), (2, 1));
    assert!(relayed.stopped.is_none(), "{:?}", relayed.stopped);
    assert_eq!(outbox::pending(&pool).await.unwrap(), 0);
    let dead: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT id, reason, length(payload)::bigint FROM outbox_dead WHERE handled_at IS NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, poison.id);
    assert!(dead[0].1.contains("max payload"), "{}", dead[0].1);
    assert_eq!(dead[0].2, i64::try_from(max_payload + 1).unwrap());
    let mut stream = js.get_stream(streams::EVENTS).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    db.cleanup().await.unwrap();
}

/// A relay with a handoff, polling only once an hour: what it publishes after its first
/// claim came through the handoff or a wake-up.
fn start_relay(
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
) -> (
    relay::Handoff,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let (handoff, handed) = relay::handoff(wake);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay::run_relay(
        pool.clone(),
        js.clone(),
        handed,
        Duration::from_secs(3600),
        hodei_telemetry::Metrics::new("test"),
        shutdown.clone(),
    ));
    (handoff, shutdown, running)
}

/// Waits until the outbox is empty.
async fn outbox_emptied(pool: &sqlx::PgPool, what: &str, deadline: Duration) {
    hodei_test_support::wait_for(what, deadline, || {
        let pool = pool.clone();
        async move { (outbox::pending(&pool).await.ok()? == 0).then_some(()) }
    })
    .await
    .unwrap();
}

/// Stops the relay of [`start_relay`] and returns how many events the stream stores.
async fn stop_relay(
    js: &async_nats::jetstream::Context,
    shutdown: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<()>,
) -> u64 {
    let mut stream = js.get_stream(streams::EVENTS).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    shutdown.cancel();
    running.await.unwrap();
    stored
}

/// Commits one job's submitted event and returns its message.
async fn committed_event(pool: &sqlx::PgPool) -> Outgoing {
    let (job, event) = new_job();
    let message = Outgoing::job_event(&event, "test").unwrap();
    driver::submit_job(pool, &job, &event, std::slice::from_ref(&message))
        .await
        .unwrap();
    message
}

#[tokio::test]
async fn handed_over_messages_are_published_from_memory_and_their_rows_deleted() {
    let (db, pool) = database().await;
    let (_nats, client, js) = bus().await;
    let mut sub = client.subscribe("hodei.v1.evt.>").await.unwrap();
    let message = committed_event(&pool).await;

    // The claiming path leaves alone the rows its process is publishing, and on its periodic
    // poll the rows younger than the grace, which their committing process publishes.
    let except = [message.id];
    let mine = outbox::Claim {
        limit: 100,
        older_than: None,
        direct_older_than: relay::HANDOFF_GRACE,
        at_most_once_within: streams::AT_MOST_ONCE_WITHIN,
        except: &except,
    };
    let young = outbox::Claim {
        limit: 100,
        older_than: Some(relay::HANDOFF_GRACE),
        direct_older_than: relay::HANDOFF_GRACE,
        at_most_once_within: streams::AT_MOST_ONCE_WITHIN,
        except: &[],
    };
    for which in [mine, young] {
        let relayed = relay::relay_claimed(&pool, &js, which, "test")
            .await
            .unwrap();
        assert_eq!(relayed.published, 0, "{which:?}");
    }
    assert_eq!(outbox::pending(&pool).await.unwrap(), 1);

    // The handoff publishes it with no wake-up and no claim, then deletes its row.
    let (handoff, shutdown, running) = start_relay(&pool, &js);
    // The first claim of a starting relay takes what is left at once: wait until it looked.
    outbox_emptied(&pool, "the relay's first claim", Duration::from_secs(10)).await;
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), message.subject);

    let handed_message = committed_event(&pool).await;
    handoff.hand_over(vec![handed_message.clone()]);
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), handed_message.subject);
    assert_eq!(
        got.headers
            .as_ref()
            .and_then(|h| h.get(hodei_messaging::subjects::HEADER_MSG_ID))
            .map(|v| v.as_str().to_owned()),
        Some(handed_message.id.to_string())
    );
    outbox_emptied(
        &pool,
        "the handed-over row deleted",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(stop_relay(&js, shutdown, running).await, 2);
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_message_handed_over_while_nats_is_away_is_published_once_it_is_back() {
    let (db, pool) = database().await;
    let (mut nats, _client, js) = bus().await;
    let (handoff, shutdown, running) = start_relay(&pool, &js);

    // NATS is away when the message is handed over: its row stays.
    nats.stop().await;
    let message = committed_event(&pool).await;
    handoff.hand_over(vec![message.clone()]);
    assert_eq!(outbox::pending(&pool).await.unwrap(), 1);

    // Once NATS is back it is published (by the direct path once the client reconnects, or
    // by the claiming path after a failed ack) and its row deleted.
    nats.restart().await.unwrap();
    outbox_emptied(
        &pool,
        "the row published after all",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(stop_relay(&js, shutdown, running).await, 1, "stored once");
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_handed_over_message_refused_for_good_goes_back_to_the_claiming_relay() {
    let (db, pool) = database().await;
    let (_nats, client, js) = bus().await;
    let max_payload = client.server_info().max_payload;
    // A row the relay's first claim (which takes what is left at start) publishes: once it is
    // gone, only the handoff and what it gives back to the claiming path publish anything.
    let sentinel = committed_event(&pool).await;
    let (handoff, shutdown, running) = start_relay(&pool, &js);
    outbox_emptied(&pool, "the relay's first claim", Duration::from_secs(10)).await;

    // A row larger than the server takes, handed over with a good one behind it: the client
    // refuses the first, both go back to the claiming path (woken at once, no poll needed),
    // which dead-letters the first and publishes the second.
    let good = committed_event(&pool).await;
    let mut poison = good.clone();
    poison.id = uuid::Uuid::now_v7();
    poison.payload = vec![b' '; max_payload + 1];
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    outbox::append(&mut tx, std::slice::from_ref(&poison))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    handoff.hand_over(vec![poison.clone(), good.clone()]);
    outbox_emptied(&pool, "the outbox emptied", Duration::from_secs(30)).await;
    let dead: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM outbox_dead")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(dead, vec![poison.id]);
    let stored = stop_relay(&js, shutdown, running).await;
    assert_eq!(stored, 2, "the sentinel {} and the good one", sentinel.id);
    db.cleanup().await.unwrap();
}

/// A row the committing process hands to its own relay is left alone by any other relay's
/// claim while it is young, even a claim that takes every age: only the committing process
/// publishes it, so a plain subscriber never sees it twice.
#[tokio::test]
async fn young_handed_over_rows_are_left_to_their_committing_process() {
    let (db, pool) = database().await;
    let (_nats, client, js) = bus().await;
    let mut sub = client.subscribe("hodei.v1.evt.>").await.unwrap();
    let (_, event) = new_job();
    let message = Outgoing::job_event(&event, "test").unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox::append_direct(&mut tx, std::slice::from_ref(&message))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // Another process woken for rows of its own: takes every age, knows nothing in flight.
    let other = outbox::Claim {
        limit: 100,
        older_than: None,
        direct_older_than: relay::HANDOFF_GRACE,
        at_most_once_within: streams::AT_MOST_ONCE_WITHIN,
        except: &[],
    };
    let relayed = relay::relay_claimed(&pool, &js, other, "test")
        .await
        .unwrap();
    assert_eq!(relayed.published, 0);
    assert_eq!(outbox::pending(&pool).await.unwrap(), 1);

    // Past the grace (here none) the row is anyone's: its process may be gone.
    let late = outbox::Claim {
        direct_older_than: Duration::ZERO,
        ..other
    };
    let relayed = relay::relay_claimed(&pool, &js, late, "test")
        .await
        .unwrap();
    assert_eq!(relayed.published, 1);
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), message.subject);
    assert_eq!(outbox::pending(&pool).await.unwrap(), 0);
    pool.close().await;
    db.cleanup().await.unwrap();
}
