//! Two registries share the beats (a queue group): a silence one of them sees may be the
//! other's outage. A registry whose heartbeat writes fail says so to the others, whose clocks
//! restart with its own, so no healthy worker is taken for unreachable while its beats are
//! lost in the other registry.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt;
use hodei_domain::WorkerId;
use hodei_messaging::{Heartbeat, subjects};
use hodei_system_tests::{HEARTBEAT_MS, SystemOptions, TestSystem, heartbeat};
use hodei_test_support::{http_get, metric_sample};
use sqlx::Connection;

/// Simulated workers: with three missed beats making a worker unreachable and each beat
/// taken by either registry, some worker sends three in a row to the failing one within a
/// few rounds.
const FLEET: usize = 12;
/// Rounds of beats while the second registry cannot write.
const ROUNDS: usize = 40;

async fn peer_resets(addr: std::net::SocketAddr) -> f64 {
    let metrics = http_get(addr, "/metrics").await.unwrap().body;
    metric_sample(&metrics, "hodei_liveness_resets_total{cause=\"peer\"}").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_registry_failing_to_write_makes_no_worker_unreachable_in_the_other() {
    let mut system = TestSystem::start_with(
        &[],
        SystemOptions {
            missed_beats: 3,
            ..SystemOptions::default()
        },
    )
    .await
    .unwrap();
    let pool = system.database.connect().await.unwrap();
    // The second registry's own database role: a member of the owner's, so it starts as the
    // first did (migrations included).
    let role = format!("r2_{}", system.database.name());
    let owner: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{role}\" LOGIN; GRANT \"{owner}\" TO \"{role}\""
    )))
    .execute(&pool)
    .await
    .unwrap();
    let url = system.database.url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    system
        .start_registry(format!("{scheme}://{role}@{host}"))
        .await
        .unwrap();
    let first = system.metrics_addr("registry").unwrap();

    let (client, _) = system.admin_nats().await.unwrap();
    let mut unreachable = client
        .subscribe(format!("{}.evt.worker.*.unreachable", subjects::PREFIX))
        .await
        .unwrap();
    // One incarnation a worker, beating throughout.
    let fleet: Vec<Heartbeat> = (0..FLEET)
        .map(|i| heartbeat(&format!("shared-{i:02}").parse::<WorkerId>().unwrap()))
        .collect();
    let beat_all = || async {
        for worker in &fleet {
            let beat = Heartbeat {
                sent_at: chrono::Utc::now(),
                ..worker.clone()
            };
            client
                .publish(
                    subjects::heartbeat(&beat.worker_id),
                    serde_json::to_vec(&beat).unwrap().into(),
                )
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
    };
    let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_MS));
    // Every worker is registered (by either registry) before the second one fails.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tick.tick().await;
        beat_all().await;
        let ready: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workers WHERE id LIKE 'shared-%' AND status = 'ready'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if ready == FLEET as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {ready} of {FLEET} workers ready"
        );
    }

    // From now on the second registry's sessions are read-only: each of its heartbeat writes
    // fails, and the beats it took are lost.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE \"{role}\" SET default_transaction_read_only = on; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let before = peer_resets(first).await;
    for _ in 0..ROUNDS {
        tick.tick().await;
        beat_all().await;
    }
    if let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(1), unreachable.next()).await
    {
        panic!(
            "a healthy worker was taken for unreachable: {}",
            message.subject
        );
    }
    assert!(
        peer_resets(first).await > before,
        "the first registry heard of the second's failing writes"
    );
    pool.close().await;
    system.stop().await;
    // The role is the cluster's, not the (dropped) database's.
    let mut admin = sqlx::PgConnection::connect(&std::env::var("HODEI_TEST_DATABASE_URL").unwrap())
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE \"{role}\"")))
        .execute(&mut admin)
        .await
        .unwrap();
}
