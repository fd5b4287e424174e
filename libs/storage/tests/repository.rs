//! Repository tests against a real PostgreSQL database (a fresh one per test) and, for the
//! outbox relay, a private nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use futures::StreamExt;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptId, AttemptNumber, AttemptOutcome, Job, JobId, JobSpec, JobState, Resources, TenantId,
    Worker,
};
use hodei_messaging::{Outgoing, streams};
use hodei_storage::{StorageError, jobs, outbox, workers};
use hodei_test_support::{TestDatabase, TestNats};

async fn database() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await.unwrap();
    let pool = db.connect().await.unwrap();
    hodei_storage::migrate(&pool).await.unwrap();
    (db, pool)
}

fn new_job(key: Option<&str>) -> (Job, hodei_domain::JobEvent) {
    let mut d = JobSpecDraft::exec("round-trip", &["sh", "-c", "exit 3"]);
    d.max_attempts = 2;
    d.labels.insert("team".into(), "infra".into());
    d.idempotency_key = key.map(str::to_owned);
    // Postgres keeps microseconds: round the clock so the round trip compares equal.
    let now = Utc::now().trunc_subsecs(6);
    Job::submit(
        JobId::new(),
        TenantId::default(),
        JobSpec::try_from(d).unwrap(),
        now,
    )
}

#[tokio::test]
async fn a_job_survives_a_save_load_round_trip_with_its_history() {
    let (db, pool) = database().await;
    let (mut job, first) = new_job(None);
    let created = jobs::insert_submitted(&pool, &job, &first, &[])
        .await
        .unwrap();
    assert!(matches!(created, jobs::Submitted::Created(_)));
    assert_eq!(jobs::get(&pool, job.id()).await.unwrap().unwrap(), job);

    let now = Utc::now().trunc_subsecs(6);
    let v = job.version();
    let mut events = vec![job.assign("w1".parse().unwrap(), now).unwrap()];
    events.push(job.start(AttemptNumber::new(1), now).unwrap());
    events.push(
        job.finish(
            AttemptNumber::new(1),
            AttemptOutcome::Exited { code: 3 },
            now,
            0.0,
        )
        .unwrap(),
    );
    let mut tx = pool.begin().await.unwrap();
    jobs::save(&mut tx, &job, v, &events).await.unwrap();
    tx.commit().await.unwrap();

    let loaded = jobs::get(&pool, job.id()).await.unwrap().unwrap();
    assert_eq!(loaded, job);
    assert_eq!(loaded.state(), JobState::Queued);
    let history = jobs::events(&pool, job.id(), 1).await.unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(Job::from_events(&history).unwrap(), job);

    // A second writer at the old version loses.
    let mut tx = pool.begin().await.unwrap();
    let err = jobs::save(&mut tx, &job, v, &[]).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job() {
    let (db, pool) = database().await;
    let (a, ea) = new_job(Some("key-1"));
    let (b, eb) = new_job(Some("key-1"));
    jobs::insert_submitted(&pool, &a, &ea, &[]).await.unwrap();
    match jobs::insert_submitted(&pool, &b, &eb, &[]).await.unwrap() {
        jobs::Submitted::Existing(existing) => assert_eq!(existing.id(), a.id()),
        other => panic!("expected the existing job, got {other:?}"),
    }
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_worker_survives_a_round_trip_with_its_held_attempts() {
    let (db, pool) = database().await;
    let now = Utc::now().trunc_subsecs(6);
    let labels = BTreeMap::from([("gpu".to_owned(), "true".to_owned())]);
    let (mut w, _) = Worker::register(
        "w-rt".parse().unwrap(),
        labels,
        Resources::new(4000, 8192),
        3,
        now,
    );
    w.reserve(
        AttemptId::new(JobId::new(), AttemptNumber::new(1)),
        Resources::new(1000, 512),
        now,
    )
    .unwrap();
    w.reserve(
        AttemptId::new(JobId::new(), AttemptNumber::new(2)),
        Resources::new(500, 0),
        now,
    )
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    workers::upsert(&mut conn, &w).await.unwrap();
    let loaded = workers::get(&pool, w.id()).await.unwrap().unwrap();
    assert_eq!(loaded, w);
    assert_eq!(loaded.held().len(), 2);

    // Reservations are optimistic: a stale version is refused.
    let mut stale = loaded.clone();
    let mut fresh = loaded.clone();
    fresh.release(&loaded.held()[0].attempt).unwrap();
    workers::save_reservation(&mut conn, &fresh, loaded.version())
        .await
        .unwrap();
    stale.release(&loaded.held()[1].attempt).unwrap();
    assert!(
        workers::save_reservation(&mut conn, &stale, loaded.version())
            .await
            .unwrap_err()
            .is_conflict()
    );
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn corrupt_rows_give_errors_naming_the_column() {
    let (db, pool) = database().await;
    let (job, first) = new_job(None);
    jobs::insert_submitted(&pool, &job, &first, &[])
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET attempts = '{\"not\": \"a list\"}' WHERE id = $1")
        .bind(job.id().as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    match jobs::get(&pool, job.id()).await {
        Err(StorageError::Corrupt {
            table: "jobs",
            column: "attempts",
            ..
        }) => {}
        other => panic!("expected a corrupt attempts column, got {other:?}"),
    }
    let now = Utc::now();
    let (w, _) = Worker::register(
        "w-bad".parse().unwrap(),
        BTreeMap::new(),
        Resources::new(1, 1),
        1,
        now,
    );
    let mut conn = pool.acquire().await.unwrap();
    workers::upsert(&mut conn, &w).await.unwrap();
    sqlx::query("UPDATE workers SET held = '[{\"attempt\": 7}]' WHERE id = 'w-bad'")
        .execute(&pool)
        .await
        .unwrap();
    let err = workers::get(&pool, w.id()).await.unwrap_err();
    assert!(err.to_string().contains("column held"), "{err}");
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn the_outbox_relay_publishes_committed_messages_once() {
    let (db, pool) = database().await;
    let nats = TestNats::start().await.unwrap();
    let (client, js) = hodei_messaging::connect(&nats.url(), "test", Duration::from_secs(10))
        .await
        .unwrap();
    streams::ensure_all(&js).await.unwrap();
    let mut sub = client.subscribe("hodei.v1.evt.>").await.unwrap();

    let (job, first) = new_job(None);
    let message = Outgoing::job_event(&first, "test").unwrap();
    jobs::insert_submitted(&pool, &job, &first, std::slice::from_ref(&message))
        .await
        .unwrap();
    assert_eq!(outbox::pending(&pool).await.unwrap(), 1);

    assert_eq!(
        outbox::relay_batch(&pool, &js, 100, "test")
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
        outbox::relay_batch(&pool, &js, 100, "test")
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
    let nats = TestNats::start().await.unwrap();
    let (client, js) = hodei_messaging::connect(&nats.url(), "test", Duration::from_secs(10))
        .await
        .unwrap();
    streams::ensure_all(&js).await.unwrap();
    let max_payload = client.server_info().max_payload;

    let (before, first) = new_job(None);
    let before_message = Outgoing::job_event(&first, "test").unwrap();
    jobs::insert_submitted(
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
    let (after, second) = new_job(None);
    let after_message = Outgoing::job_event(&second, "test").unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    outbox::append(&mut tx, std::slice::from_ref(&poison))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    jobs::insert_submitted(&pool, &after, &second, std::slice::from_ref(&after_message))
        .await
        .unwrap();
    assert_eq!(outbox::pending(&pool).await.unwrap(), 3);

    let relayed = outbox::relay_batch(&pool, &js, 100, "test").await.unwrap();
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

fn beat(
    worker: &str,
    draining: bool,
    leaving: bool,
) -> (hodei_messaging::Heartbeat, chrono::DateTime<Utc>) {
    beat_of(worker, INCARNATION.with(|i| *i), draining, leaving)
}

thread_local! {
    static INCARNATION: hodei_domain::IncarnationId = hodei_domain::IncarnationId::new();
}

fn beat_of(
    worker: &str,
    incarnation: hodei_domain::IncarnationId,
    draining: bool,
    leaving: bool,
) -> (hodei_messaging::Heartbeat, chrono::DateTime<Utc>) {
    let now = Utc::now();
    let hb = hodei_messaging::Heartbeat {
        worker_id: worker.parse().unwrap(),
        incarnation,
        lease_ms: 3000,
        kill_grace_ms: 1000,
        labels: BTreeMap::new(),
        capacity: Resources::new(1000, 1024),
        max_concurrent_jobs: 2,
        usage: hodei_domain::ResourceUsage::default(),
        running: Vec::new(),
        draining,
        leaving,
        sent_at: now,
    };
    (hb, now)
}

#[tokio::test]
async fn heartbeats_register_once_then_refresh_drain_and_go_offline() {
    use hodei_storage::workers::HeartbeatEffect;
    let (db, pool) = database().await;
    let none = std::collections::HashSet::new();
    let mut effects = Vec::new();
    for b in [
        beat("hb-1", false, false),
        beat("hb-1", false, false),
        beat("hb-1", true, false),
        beat("hb-1", true, true),
        beat("hb-1", false, false),
    ] {
        let mut tx = pool.begin().await.unwrap();
        let out = workers::apply_heartbeats(&mut tx, &[b], &none)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        effects.push(out[0].effect.clone());
        assert_eq!(out[0].replaced_incarnation, None);
    }
    assert_eq!(
        effects,
        [
            HeartbeatEffect::Registered,
            HeartbeatEffect::Refreshed,
            HeartbeatEffect::Draining,
            HeartbeatEffect::Offline,
            HeartbeatEffect::Returned,
        ]
    );
    // The agent restarts: the beat says which incarnation it replaced, and the row keeps the
    // lease terms the agent announced.
    let first = workers::get(&pool, &"hb-1".parse().unwrap())
        .await
        .unwrap()
        .unwrap()
        .incarnation();
    let next = hodei_domain::IncarnationId::new();
    let mut tx = pool.begin().await.unwrap();
    let out = workers::apply_heartbeats(&mut tx, &[beat_of("hb-1", next, false, false)], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(out[0].replaced_incarnation, Some(first));
    let worker = workers::get(&pool, &"hb-1".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker.incarnation(), Some(next));
    assert_eq!(
        worker.lease(),
        hodei_domain::LeaseTerms::new(3000, 1000).unwrap()
    );
    pool.close().await;
    db.cleanup().await.unwrap();
}
