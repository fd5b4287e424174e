//! The outbox relay against a real PostgreSQL database (a fresh one per test) and a private
//! nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{Job, JobId, JobSpec, TenantId};
use hodei_messaging::{Outgoing, streams};
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
