//! Repository tests against a real PostgreSQL database (a fresh one per test).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::{SubsecRound, Utc};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptId, AttemptNumber, AttemptOutcome, Job, JobId, JobSpec, JobState, Resources, TenantId,
    Worker,
};
use hodei_storage::{StorageError, driver, jobs, workers};
use hodei_test_support::TestDatabase;

mod common;

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
    let created = driver::submit_job(&pool, &job, &first, &[]).await.unwrap();
    assert!(matches!(created, driver::JobSubmitted::Created(_)));
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
    driver::save_job(&mut tx, &job, v, &events).await.unwrap();
    tx.commit().await.unwrap();

    let loaded = jobs::get(&pool, job.id()).await.unwrap().unwrap();
    assert_eq!(loaded, job);
    assert_eq!(loaded.state(), JobState::Queued);
    let history = jobs::events(&pool, job.id(), 1).await.unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(Job::from_events(&history).unwrap(), job);

    // A second writer at the old version loses.
    let mut tx = pool.begin().await.unwrap();
    let err = driver::save_job(&mut tx, &job, v, &[]).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job() {
    let (db, pool) = database().await;
    let (a, ea) = new_job(Some("key-1"));
    let (b, eb) = new_job(Some("key-1"));
    driver::submit_job(&pool, &a, &ea, &[]).await.unwrap();
    match driver::submit_job(&pool, &b, &eb, &[]).await.unwrap() {
        driver::JobSubmitted::Existing(existing) => assert_eq!(existing.id(), a.id()),
        other => panic!("expected the existing job, got {other:?}"),
    }
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_batch_of_submissions_writes_only_its_new_jobs_with_their_events_messages_and_audit() {
    let (db, pool) = database().await;
    let (earlier, earlier_event) = new_job(Some("key-1"));
    driver::submit_job(&pool, &earlier, &earlier_event, &[])
        .await
        .unwrap();
    let submission = |(job, event): (Job, hodei_domain::JobEvent)| {
        let messages = hodei_messaging::Outgoing::job_submitted(&job, &event, "test")
            .unwrap()
            .to_vec();
        let audit = hodei_storage::access::AuditEntry {
            at: Utc::now().trunc_subsecs(6),
            subject: "alice".into(),
            tenant: TenantId::default(),
            role: hodei_domain::Role::Submitter,
            action: "SubmitJob".into(),
            target: job.id().to_string(),
            outcome: "ok".into(),
            detail: String::new(),
        };
        driver::Submission {
            job,
            event,
            messages,
            trace: Default::default(),
            audit: Some(audit),
        }
    };
    // A key used before, a new job, a key used earlier in the same batch, and a job without
    // a key.
    let batch = vec![
        submission(new_job(Some("key-1"))),
        submission(new_job(Some("key-2"))),
        submission(new_job(Some("key-2"))),
        submission(new_job(None)),
    ];
    let recorded = driver::submit_jobs(&pool, &batch).await.unwrap();
    assert!(
        matches!(&recorded[0], driver::Recorded::Existing(j) if j.id() == earlier.id()),
        "{recorded:?}"
    );
    assert!(matches!(recorded[1], driver::Recorded::New), "{recorded:?}");
    assert!(
        matches!(&recorded[2], driver::Recorded::Existing(j) if j.id() == batch[1].job.id()),
        "{recorded:?}"
    );
    assert!(matches!(recorded[3], driver::Recorded::New), "{recorded:?}");
    for (i, s) in batch.iter().enumerate() {
        let new = i == 1 || i == 3;
        let id = s.job.id();
        assert_eq!(
            jobs::get(&pool, id).await.unwrap().is_some(),
            new,
            "job {i}"
        );
        let events = jobs::events(&pool, id, 1).await.unwrap();
        assert_eq!(events.len(), usize::from(new), "events of job {i}");
        let ids: Vec<uuid::Uuid> = s.messages.iter().map(|m| m.id).collect();
        let (queued, direct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE direct) FROM outbox WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(queued, if new { 2 } else { 0 }, "messages of job {i}");
        assert_eq!(direct, queued, "handed to the submitter's relay");
        let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE target = $1")
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(audited, i64::from(new), "audit entry of job {i}");
    }
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_batch_submitted_again_after_it_committed_finds_its_jobs_as_stored() {
    let (db, pool) = database().await;
    let submission = |(job, event): (Job, hodei_domain::JobEvent)| driver::Submission {
        job,
        event,
        messages: Vec::new(),
        trace: Default::default(),
        audit: None,
    };
    let batch = vec![
        submission(new_job(None)),
        submission(new_job(Some("key-again"))),
    ];
    let first = driver::submit_jobs(&pool, &batch).await.unwrap();
    assert!(
        first.iter().all(|r| matches!(r, driver::Recorded::New)),
        "{first:?}"
    );
    // As the gateway does when it stopped waiting for a batch that committed meanwhile.
    for s in &batch {
        let again = driver::submit_jobs(&pool, std::slice::from_ref(s))
            .await
            .unwrap();
        assert!(
            matches!(&again[..], [driver::Recorded::Existing(j)] if j.id() == s.job.id()),
            "{again:?}"
        );
        assert_eq!(jobs::events(&pool, s.job.id(), 1).await.unwrap().len(), 1);
    }
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_batch_with_a_tenant_at_its_queue_quota_lets_in_the_others() {
    let (db, pool) = database().await;
    let limited: TenantId = "limited".parse().unwrap();
    let policy = hodei_domain::TenantPolicy {
        max_queued_jobs: Some(1),
        ..Default::default()
    };
    hodei_storage::tenants::set_policy(&pool, &limited, &policy, Utc::now())
        .await
        .unwrap();
    let of = |tenant: &TenantId| {
        let (job, event) = Job::submit(
            JobId::new(),
            tenant.clone(),
            JobSpec::try_from(JobSpecDraft::exec("q", &["true"])).unwrap(),
            Utc::now().trunc_subsecs(6),
        );
        let messages = hodei_messaging::Outgoing::job_submitted(&job, &event, "test")
            .unwrap()
            .to_vec();
        driver::Submission {
            job,
            event,
            messages,
            trace: Default::default(),
            audit: None,
        }
    };
    // Without a quota among its tenants a batch is one statement; with one, the quota holds.
    let free = vec![of(&TenantId::default()), of(&TenantId::default())];
    let recorded = driver::submit_jobs(&pool, &free).await.unwrap();
    assert!(
        recorded.iter().all(|r| matches!(r, driver::Recorded::New)),
        "{recorded:?}"
    );
    let batch = vec![of(&limited), of(&TenantId::default()), of(&limited)];
    let recorded = driver::submit_jobs(&pool, &batch).await.unwrap();
    assert!(matches!(recorded[0], driver::Recorded::New), "{recorded:?}");
    assert!(matches!(recorded[1], driver::Recorded::New), "{recorded:?}");
    assert!(
        matches!(&recorded[2], driver::Recorded::OverQuota(reason) if reason.contains("limited")),
        "{recorded:?}"
    );
    assert!(jobs::get(&pool, batch[2].job.id()).await.unwrap().is_none());
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 8, "two messages for each of the four jobs let in");
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
    driver::submit_job(&pool, &job, &first, &[]).await.unwrap();
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
        seal_key: None,
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

/// Two registries share the beats: an agent's beat written late by one, after its goodbye
/// (written by the other), does not undo the goodbye: the agent is gone, and nothing must be
/// placed on it nor its attempts kept waiting for its lease.
#[tokio::test]
async fn a_late_beat_does_not_undo_a_goodbye() {
    let (db, pool) = database().await;
    let none = std::collections::HashSet::new();
    let incarnation = hodei_domain::IncarnationId::new();
    let (beat, at) = beat_of("hb-bye", incarnation, false, false);
    let (goodbye, _) = beat_of("hb-bye", incarnation, false, true);
    for (hb, seen) in [
        (beat.clone(), at),
        (goodbye, at + chrono::Duration::seconds(2)),
        (beat, at + chrono::Duration::seconds(1)),
    ] {
        let mut tx = pool.begin().await.unwrap();
        workers::apply_heartbeats(&mut tx, &[(hb, seen)], &none)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let worker = workers::get(&pool, &"hb-bye".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker.status(), hodei_domain::WorkerStatus::Offline);
    pool.close().await;
    db.cleanup().await.unwrap();
}

/// Two registries share the beats: the last beat of an agent's old incarnation, written late
/// by one, after the new incarnation's first beat written by the other, does not bring the
/// old incarnation back (which would hand back the new one's attempts as lost).
#[tokio::test]
async fn a_late_beat_of_an_old_incarnation_does_not_bring_it_back() {
    let (db, pool) = database().await;
    let none = std::collections::HashSet::new();
    let (old, new) = (
        hodei_domain::IncarnationId::new(),
        hodei_domain::IncarnationId::new(),
    );
    let (old_beat, old_at) = beat_of("hb-late", old, false, false);
    let mut tx = pool.begin().await.unwrap();
    workers::apply_heartbeats(&mut tx, &[(old_beat.clone(), old_at)], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The new incarnation's first beat, written first.
    let (new_beat, _) = beat_of("hb-late", new, false, false);
    let new_at = old_at + chrono::Duration::seconds(2);
    let mut tx = pool.begin().await.unwrap();
    let out = workers::apply_heartbeats(&mut tx, &[(new_beat, new_at)], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(out[0].replaced_incarnation, Some(Some(old)));
    // The old incarnation's last beat, a second older, written late.
    let late_at = old_at + chrono::Duration::seconds(1);
    let mut tx = pool.begin().await.unwrap();
    let out = workers::apply_heartbeats(&mut tx, &[(old_beat, late_at)], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(out[0].replaced_incarnation, None, "{out:?}");
    let worker = workers::get(&pool, &"hb-late".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker.incarnation(), Some(new));
    assert_eq!(
        worker.last_heartbeat_at().timestamp_micros(),
        new_at.timestamp_micros()
    );
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_beat_that_changes_nothing_else_waits_for_no_lock_on_the_worker() {
    use hodei_storage::workers::HeartbeatEffect;
    let (db, pool) = database().await;
    let none = std::collections::HashSet::new();
    let id: hodei_domain::WorkerId = "hb-lock".parse().unwrap();
    let mut tx = pool.begin().await.unwrap();
    workers::apply_heartbeats(&mut tx, &[beat("hb-lock", false, false)], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // A placement holds the worker's row, as while it reserves a slot.
    let mut placement = pool.begin().await.unwrap();
    let locked = workers::lock_many(&mut placement, &[&id]).await.unwrap();
    assert_eq!(locked.len(), 1);

    // The next beat (new usage, later time) is written without waiting for it.
    let (mut hb, _) = beat("hb-lock", false, false);
    hb.usage.memory_used_mb = 77;
    let at = Utc::now() + chrono::Duration::seconds(1);
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let out = workers::apply_heartbeats(&mut tx, &[(hb.clone(), at)], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(out[0].effect, HeartbeatEffect::Refreshed);
    placement.commit().await.unwrap();
    let worker = workers::get(&pool, &id).await.unwrap().unwrap();
    assert_eq!(worker.usage().memory_used_mb, 77);
    assert_eq!(
        worker.last_heartbeat_at().timestamp_micros(),
        at.timestamp_micros()
    );
    // An older beat delivered late does not move the time back.
    let mut tx = pool.begin().await.unwrap();
    workers::apply_heartbeats(
        &mut tx,
        &[(hb.clone(), at - chrono::Duration::seconds(5))],
        &none,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let worker = workers::get(&pool, &id).await.unwrap().unwrap();
    assert_eq!(
        worker.last_heartbeat_at().timestamp_micros(),
        at.timestamp_micros()
    );

    // A beat that changes the worker itself (its labels) writes the row.
    hb.labels.insert("gpu".to_owned(), "yes".to_owned());
    let mut tx = pool.begin().await.unwrap();
    let out = workers::apply_heartbeats(&mut tx, &[(hb, Utc::now())], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(out[0].effect, HeartbeatEffect::Refreshed);
    let worker = workers::get(&pool, &id).await.unwrap().unwrap();
    assert_eq!(worker.labels().get("gpu").map(String::as_str), Some("yes"));
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn beats_written_by_the_previous_release_still_count() {
    let (db, pool) = database().await;
    let none = std::collections::HashSet::new();
    let id: hodei_domain::WorkerId = "hb-old".parse().unwrap();
    let long_ago = Utc::now() - chrono::Duration::minutes(10);
    // A registry of the previous release registers a worker the way it did: the trigger gives
    // it its beat row, so the sweep can find it silent.
    sqlx::query(
        "INSERT INTO workers (id, labels, cpu_millis, memory_mb, max_concurrent_jobs, status, held,
                              usage, registered_at, last_heartbeat_at, version)
         VALUES ($1, '{}', 1000, 1024, 2, 'ready', '[]',
                 '{\"cpu_percent\": 0, \"memory_used_mb\": 5, \"memory_total_mb\": 0, \"load_1m\": 0}',
                 $2, $2, 0)",
    )
    .bind(id.as_str())
    .bind(long_ago)
    .execute(&pool)
    .await
    .unwrap();
    let silent = workers::silent(&pool, Utc::now() - chrono::Duration::minutes(1))
        .await
        .unwrap();
    assert_eq!(silent.len(), 1);
    assert_eq!(silent[0].usage().memory_used_mb, 5);

    // This release writes a beat; then the previous release's registry takes a later one
    // from the queue group into `workers`: the later of the two counts, with its usage.
    let (hb, _) = beat("hb-old", false, false);
    let mut tx = pool.begin().await.unwrap();
    workers::apply_heartbeats(&mut tx, &[(hb, Utc::now())], &none)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let later = Utc::now() + chrono::Duration::seconds(5);
    sqlx::query(
        "UPDATE workers SET last_heartbeat_at = $2,
             usage = '{\"cpu_percent\": 0, \"memory_used_mb\": 9, \"memory_total_mb\": 0, \"load_1m\": 0}'
         WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(later)
    .execute(&pool)
    .await
    .unwrap();
    let worker = workers::get(&pool, &id).await.unwrap().unwrap();
    assert_eq!(
        worker.last_heartbeat_at().timestamp_micros(),
        later.timestamp_micros()
    );
    assert_eq!(worker.usage().memory_used_mb, 9);
    assert!(
        workers::silent(&pool, later - chrono::Duration::seconds(1))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        workers::placeable(&pool, later - chrono::Duration::seconds(1))
            .await
            .unwrap()
            .len(),
        1
    );
    let mut tx = pool.begin().await.unwrap();
    let heard = workers::lock_last_beat(&mut tx, &id).await.unwrap();
    assert_eq!(
        heard.map(|t| t.timestamp_micros()),
        Some(later.timestamp_micros())
    );
    let unknown = workers::lock_last_beat(&mut tx, &"hb-none".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(unknown, None);
    tx.rollback().await.unwrap();
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_batch_of_transitions_commits_whole_or_not_at_all() {
    let (db, pool) = database().await;
    let now = Utc::now().trunc_subsecs(6);
    let (mut worker, _) = Worker::register(
        "w-batch".parse().unwrap(),
        BTreeMap::new(),
        Resources::new(4000, 8192),
        4,
        now,
    );
    let mut submitted = Vec::new();
    for _ in 0..3 {
        let (job, event) = new_job(None);
        driver::submit_job(&pool, &job, &event, &[]).await.unwrap();
        submitted.push(job);
    }
    let ids: Vec<JobId> = submitted.iter().map(Job::id).collect();
    let mut loaded = jobs::get_many(&pool, &[ids[0], ids[1], ids[2], JobId::new()])
        .await
        .unwrap();
    assert_eq!(loaded.len(), 3, "unknown ids are absent");
    // Every job is assigned to the worker, which reserves a slot for each.
    let mut transitions = Vec::new();
    for id in &ids {
        let mut job = loaded.remove(id).unwrap();
        let version = job.version();
        let event = job.assign(worker.id().clone(), now).unwrap();
        worker
            .reserve(
                AttemptId::new(*id, job.current_attempt()),
                Resources::default(),
                now,
            )
            .unwrap();
        transitions.push(driver::Transition {
            job,
            expected_version: version,
            events: vec![event],
            extra: Vec::new(),
            span: tracing::Span::none(),
        });
    }
    let mut conn = pool.acquire().await.unwrap();
    let (registered, _) = Worker::register(
        "w-batch".parse().unwrap(),
        BTreeMap::new(),
        Resources::new(4000, 8192),
        4,
        now,
    );
    workers::upsert(&mut conn, &registered).await.unwrap();
    drop(conn);
    let mut tx = pool.begin().await.unwrap();
    workers::save_reservations(&mut tx, &[(&worker, registered.version())])
        .await
        .unwrap();
    driver::commit_transitions(&mut tx, &transitions, &[], "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for t in &transitions {
        let saved = jobs::get(&pool, t.job.id()).await.unwrap().unwrap();
        assert_eq!(saved, t.job);
        assert_eq!(jobs::events(&pool, t.job.id(), 1).await.unwrap().len(), 2);
    }
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 3, "one event per transition");

    // Two start, and the third one's report comes against a stale version: nothing is saved.
    let mut stale = Vec::new();
    for (i, t) in transitions.iter().enumerate() {
        let mut job = t.job.clone();
        let version = if i == 2 {
            t.expected_version
        } else {
            job.version()
        };
        let event = job.start(job.current_attempt(), now).unwrap();
        stale.push(driver::Transition {
            job,
            expected_version: version,
            events: vec![event],
            extra: Vec::new(),
            span: tracing::Span::none(),
        });
    }
    let mut tx = pool.begin().await.unwrap();
    let err = driver::commit_transitions(&mut tx, &stale, &[], "test")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Conflict { .. }),
        "a job that moved is a conflict, not a failed write: {err}"
    );
    tx.rollback().await.unwrap();
    for t in &transitions {
        let job = jobs::get(&pool, t.job.id()).await.unwrap().unwrap();
        assert_eq!(
            job.state(),
            JobState::Assigned,
            "nothing of the batch stayed"
        );
    }

    // Finishing frees each slot once, with one read and one save of the worker.
    let mut finished = Vec::new();
    let mut releases = Vec::new();
    for t in &transitions {
        let mut job = t.job.clone();
        let version = job.version();
        let attempt = job.current_attempt();
        let mut events = vec![job.start(attempt, now).unwrap()];
        events.push(
            job.finish(attempt, AttemptOutcome::Exited { code: 0 }, now, 0.0)
                .unwrap(),
        );
        releases.push((worker.id().clone(), AttemptId::new(job.id(), attempt)));
        finished.push(driver::Transition {
            job,
            expected_version: version,
            events,
            extra: Vec::new(),
            span: tracing::Span::none(),
        });
    }
    // A slot the worker no longer holds is skipped.
    releases.push((
        worker.id().clone(),
        AttemptId::new(JobId::new(), AttemptNumber::new(1)),
    ));
    let mut tx = pool.begin().await.unwrap();
    let saved = driver::commit_transitions(&mut tx, &finished, &releases, "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        saved.messages.len(),
        finished.iter().map(|t| t.events.len()).sum::<usize>(),
        "one message per event is returned to hand to the relay"
    );
    assert!(!saved.more);
    let freed = workers::get(&pool, worker.id()).await.unwrap().unwrap();
    assert!(freed.held().is_empty(), "{:?}", freed.held());
    assert_eq!(
        saved.freed,
        vec![freed.clone()],
        "the worker is returned as saved"
    );
    for t in &finished {
        let job = jobs::get(&pool, t.job.id()).await.unwrap().unwrap();
        assert_eq!(job.state(), JobState::Succeeded);
    }
    // A stale worker version in a batch of reservations is a conflict.
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        workers::save_reservations(&mut conn, &[(&freed, freed.version() - 1)])
            .await
            .unwrap_err()
            .is_conflict()
    );
    db.cleanup().await.unwrap();
}

/// Deleting published messages commits without waiting for the disk, for that transaction
/// only: the setting never outlives the deletion on the pooled connection, so whatever the
/// connection commits next (a submission, a placement) is synchronous again.
#[tokio::test]
async fn deleting_published_messages_leaves_later_commits_synchronous() {
    let (db, pool) = database().await;
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url())
        .await
        .unwrap();
    let messages: Vec<hodei_messaging::Outgoing> = (0..4)
        .map(|i| hodei_messaging::Outgoing {
            id: uuid::Uuid::now_v7(),
            subject: format!("hodei.v1.evt.test.{i}"),
            payload: b"{}".to_vec(),
            headers: BTreeMap::new(),
            at_most_once: false,
        })
        .collect();
    let mut tx = single.begin().await.unwrap();
    hodei_storage::outbox::append_direct(&mut tx, &messages)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let setting = || async {
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(&single)
            .await
            .unwrap()
    };
    assert_eq!(setting().await, "on");

    let ids: Vec<uuid::Uuid> = messages[..2].iter().map(|m| m.id).collect();
    let deleted = hodei_storage::outbox::delete_ids(&single, &ids)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(setting().await, "on", "the deletion's setting leaked");

    // The claiming relay's path: claimed and deleted in its own transaction.
    let mut tx = single.begin().await.unwrap();
    let claimed = hodei_storage::outbox::claim(
        &mut tx,
        hodei_storage::outbox::Claim {
            limit: 10,
            older_than: None,
            direct_older_than: std::time::Duration::ZERO,
            except: &[],
            at_most_once_within: std::time::Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), 2);
    let positions: Vec<i64> = claimed.iter().map(|p| p.position).collect();
    hodei_storage::outbox::delete(&mut tx, &positions)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        setting().await,
        "on",
        "the claimed deletion's setting leaked"
    );
    assert_eq!(hodei_storage::outbox::pending(&pool).await.unwrap(), 0);

    single.close().await;
    pool.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn preemption_reads_running_jobs_by_the_priority_their_tenant_lets_them_count_with() {
    let (db, pool) = database().await;
    let capped: TenantId = "capped".parse().unwrap();
    let policy = hodei_domain::TenantPolicy {
        max_priority: Some(-1000),
        ..Default::default()
    };
    hodei_storage::tenants::set_policy(&pool, &capped, &policy, Utc::now())
        .await
        .unwrap();
    // Each tenant runs a preemptible job that asked for 1000, and one of priority 4.
    let mut ids = BTreeMap::new();
    for (tenant, priority) in [
        (capped.clone(), 1000),
        (TenantId::default(), 1000),
        (TenantId::default(), 4),
    ] {
        let mut d = JobSpecDraft::exec("victim", &["true"]);
        d.priority = priority;
        d.preemptible = true;
        let now = Utc::now().trunc_subsecs(6);
        let (mut job, first) = Job::submit(
            JobId::new(),
            tenant.clone(),
            JobSpec::try_from(d).unwrap(),
            now,
        );
        driver::submit_job(&pool, &job, &first, &[]).await.unwrap();
        let v = job.version();
        let events = vec![
            job.assign("w1".parse().unwrap(), now).unwrap(),
            job.start(AttemptNumber::new(1), now).unwrap(),
        ];
        let mut tx = pool.begin().await.unwrap();
        driver::save_job(&mut tx, &job, v, &events).await.unwrap();
        tx.commit().await.unwrap();
        ids.insert(job.id(), format!("{tenant}/{priority}"));
    }
    let read = |above| {
        let pool = pool.clone();
        let ids = ids.clone();
        async move {
            jobs::preemptible_on_workers(&pool, above, 10)
                .await
                .unwrap()
                .iter()
                .map(|j| ids[&j.id()].clone())
                .collect::<Vec<_>>()
        }
    };
    // For a job of priority 5: the capped tenant's (counted -1000) first, then the 4; never
    // the other tenant's 1000.
    assert_eq!(read(5).await, ["capped/1000", "default/4"]);
    assert_eq!(read(-1000).await, Vec::<String>::new());
    assert_eq!(
        read(1001).await,
        ["capped/1000", "default/4", "default/1000"]
    );
    db.cleanup().await.unwrap();
}

/// A schedule every second, created `ago` before `now` (so its first tick is due), whose
/// ticks start a job.
fn due_schedule(name: &str, now: chrono::DateTime<Utc>, ago: i64) -> hodei_domain::Schedule {
    use hodei_domain::{
        Cadence, OverlapPolicy, Schedule, ScheduleId, ScheduleSpec, ScheduleTarget,
    };
    let d = JobSpecDraft::exec(name, &["true"]);
    let spec = ScheduleSpec {
        name: name.to_owned(),
        cron: "* * * * * *".to_owned(),
        time_zone: "UTC".to_owned(),
        target: ScheduleTarget::Job {
            spec: Box::new(JobSpec::try_from(d).unwrap()),
        },
        overlap: OverlapPolicy::Allow,
        catch_up_window_ms: 60_000,
        jitter_ms: 0,
        history_limit: 10,
    };
    let cadence = Cadence::parse(&spec.cron, &spec.time_zone).unwrap();
    let created = now - chrono::Duration::seconds(ago);
    let (schedule, _) = Schedule::create(
        ScheduleId::new(),
        TenantId::default(),
        spec,
        &cadence,
        false,
        created,
        0.0,
    );
    schedule
}

#[tokio::test]
async fn a_schedule_whose_firing_keeps_conflicting_holds_up_no_other_due_schedule() {
    let (db, pool) = database().await;
    let now = Utc::now().trunc_subsecs(6);
    // The stuck one is due first, so each poll claims it first.
    let stuck = due_schedule("stuck", now, 5);
    let other = due_schedule("other", now, 3);
    for schedule in [&stuck, &other] {
        let mut tx = pool.begin().await.unwrap();
        assert!(
            hodei_storage::schedules::insert(&mut tx, schedule)
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
    }
    // Each tick of `stuck` meets a unique violation, as a key or a row taken by another
    // transaction would make it, however often it is tried.
    let inject = [
        "CREATE FUNCTION conflict_always() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'injected conflict' USING ERRCODE = 'unique_violation'; END $$"
            .to_owned(),
        format!(
            "CREATE TRIGGER stuck_conflicts BEFORE INSERT ON schedule_ticks FOR EACH ROW \
             WHEN (NEW.schedule_id = '{}') EXECUTE FUNCTION conflict_always()",
            stuck.id()
        ),
    ];
    for statement in inject {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    let grace = chrono::Duration::seconds(2);

    let first = driver::fire_due_schedule(&pool, now, grace, "test", 0.0)
        .await
        .unwrap()
        .expect("a schedule is due");
    assert_eq!(first.schedule.id(), stuck.id());
    assert!(first.events.is_empty(), "{:?}", first.events);
    let put_off = first.failed.expect("the conflict is reported");
    assert_eq!(put_off.retry_in, driver::RETRY_CONFLICT);
    assert!(
        put_off.reason.contains("injected conflict"),
        "{}",
        put_off.reason
    );
    // Put off, with its next tick where it was: nothing of the tick was recorded.
    let stored = hodei_storage::schedules::get(&pool, stuck.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.next_tick(), stuck.next_tick());
    assert_eq!(stored.fire_at(), Some(now + driver::RETRY_CONFLICT));

    // The same poll goes on to the schedule due after it.
    let second = driver::fire_due_schedule(&pool, now, grace, "test", 0.0)
        .await
        .unwrap()
        .expect("the other schedule is due");
    assert_eq!(second.schedule.id(), other.id());
    assert!(second.failed.is_none());
    assert!(
        second
            .events
            .iter()
            .any(|e| matches!(e.kind, hodei_domain::ScheduleEventKind::Fired { .. })),
        "{:?}",
        second.events
    );
    assert!(
        driver::fire_due_schedule(&pool, now, grace, "test", 0.0)
            .await
            .unwrap()
            .is_none(),
        "nothing else is due until the stuck one's retry"
    );
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_pipeline_step_never_gets_a_second_job() {
    use hodei_domain::pipeline::StepDraft;
    let (db, pool) = database().await;
    let run = common::submitted_run(&pool, "run", vec![StepDraft::exec("build", &["true"])]).await;
    let jobs_of_step = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM jobs WHERE pipeline_run_id = $1 AND pipeline_step = 'build'",
        )
        .bind(run.id().as_uuid())
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(jobs_of_step().await, 1, "the run started its step");

    let (again, again_event) = new_job(None);
    let mut tx = pool.begin().await.unwrap();
    let err = jobs::insert(&mut tx, &again, &again_event, Some((run.id(), "build")))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    drop(tx);
    assert_eq!(jobs_of_step().await, 1);
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn cancelling_a_run_whose_cancel_is_under_way_changes_nothing_and_says_so() {
    use hodei_domain::PipelineState;
    use hodei_domain::pipeline::{StepDraft, When};
    let (db, pool) = database().await;
    let mut cleanup = StepDraft::exec("cleanup", &["true"]).needing(&["build"]);
    cleanup.when = When::Always;
    let run = common::submitted_run(
        &pool,
        "run",
        vec![StepDraft::exec("build", &["true"]), cleanup],
    )
    .await;
    let cancel = || async {
        let mut tx = pool.begin().await.unwrap();
        let done = driver::cancel_run_in(&mut tx, run.id(), "replaced", "test")
            .await
            .unwrap()
            .unwrap();
        tx.commit().await.unwrap();
        done
    };
    let (first, changed) = cancel().await;
    assert!(changed);
    // Its `always` step still runs: the run has not ended.
    assert_eq!(first.state(), PipelineState::Running, "{first:?}");
    let (again, changed) = cancel().await;
    assert!(!changed, "the second cancel changed nothing");
    assert_eq!(again.version(), first.version());
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_tick_due_before_a_pause_is_recorded_skipped_when_the_schedule_resumes() {
    let (db, pool) = database().await;
    let now = Utc::now().trunc_subsecs(6);
    let mut schedule = due_schedule("paused", now, 5);
    let unfired = schedule.next_tick().unwrap();
    assert!(unfired <= now);
    // Paused before any replica fired its due tick.
    schedule.pause(now).unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(
        hodei_storage::schedules::insert(&mut tx, &schedule)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

    let later = now + chrono::Duration::seconds(30);
    let mut tx = pool.begin().await.unwrap();
    let mut locked = hodei_storage::schedules::lock(&mut tx, schedule.id())
        .await
        .unwrap()
        .unwrap();
    let events = driver::resume_schedule(&mut tx, &mut locked, later, 0.0, "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind.clone()).collect();
    assert!(
        matches!(kinds[0], hodei_domain::ScheduleEventKind::Resumed { .. }),
        "{kinds:?}"
    );
    assert!(
        matches!(&kinds[1], hodei_domain::ScheduleEventKind::Skipped { tick, reason } if *tick == unfired && reason.contains("paused")),
        "{kinds:?}"
    );
    assert!(locked.next_tick().unwrap() > later);
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM schedule_ticks WHERE schedule_id = $1 AND tick = $2",
    )
    .bind(schedule.id().as_uuid())
    .bind(unfired)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(outcome, "skipped");
    // Resuming a running schedule does nothing.
    let mut tx = pool.begin().await.unwrap();
    let mut locked = hodei_storage::schedules::lock(&mut tx, schedule.id())
        .await
        .unwrap()
        .unwrap();
    assert!(
        driver::resume_schedule(&mut tx, &mut locked, later, 0.0, "test")
            .await
            .unwrap()
            .is_empty()
    );
    db.cleanup().await.unwrap();
}
