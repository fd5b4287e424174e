//! A fleet's heartbeats that arrive together: the registry writes them in several transactions
//! (a few hundred workers are more than one chunk), and every worker is written, ready and
//! announced once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use hodei_domain::WorkerId;
use hodei_messaging::{Heartbeat, subjects};
use hodei_system_tests::{AgentSpec, TestSystem, heartbeat};
use hodei_test_support::wait_for;
use sqlx::postgres::PgPoolOptions;

const AGENTS: &[AgentSpec] = &[AgentSpec {
    id: "real",
    labels: "",
    slots: 1,
}];

/// Simulated workers beating at once: more than two of the registry's write chunks (when the
/// beats fall into one flush, as they usually do: they are published within milliseconds).
const FLEET: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_beating_at_once_is_written_whole_and_each_worker_announced_once() {
    let system = TestSystem::start(AGENTS).await.unwrap();
    let (client, _) = system.admin_nats().await.unwrap();
    let mut registered = client
        .subscribe(format!("{}.evt.worker.*.registered", subjects::PREFIX))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let ids: Vec<WorkerId> = (0..FLEET)
        .map(|i| format!("fleet-{i:04}").parse().unwrap())
        .collect();
    for id in &ids {
        let beat = Heartbeat {
            labels: BTreeMap::from([("fleet".to_owned(), "yes".to_owned())]),
            ..heartbeat(id)
        };
        client
            .publish(
                subjects::heartbeat(id),
                serde_json::to_vec(&beat).unwrap().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();

    let mut announced = HashSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while announced.len() < FLEET {
            let message = registered.next().await.unwrap();
            let (_, id) = subjects::event_aggregate(&message.subject).unwrap();
            if id.starts_with("fleet-") {
                assert!(announced.insert(id.to_owned()), "{id} announced twice");
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {FLEET} announced", announced.len()));

    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&system.database.url())
        .await
        .unwrap();
    let ready: i64 = wait_for(
        "every worker of the fleet ready",
        Duration::from_secs(10),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM workers WHERE id LIKE 'fleet-%' AND status = 'ready' \
             AND labels = '{\"fleet\": \"yes\"}'::jsonb AND max_concurrent_jobs = 2",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (n == i64::try_from(FLEET).unwrap()).then_some(n)
        },
    )
    .await
    .unwrap();
    assert_eq!(ready, i64::try_from(FLEET).unwrap());
    system.stop().await;
}
