//! NATS with least privilege, on a real nats-server with the authorization block that
//! `hodei-admin nats` writes: the server itself refuses an agent that speaks for another
//! worker, a service that speaks for an agent, an agent that sends commands, an anonymous or
//! unknown client, and an agent whose key was revoked. (forged.rs shows the scheduler's own
//! checks behind it, for messages the server lets through.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use hodei_domain::{JobId, WorkerId};
use hodei_messaging::permissions::{NatsRole, inbox_prefix};
use hodei_messaging::{NatsAuth, streams, subjects};
use hodei_system_tests::{AgentSpec, TestSystem};
use hodei_test_support::wait_for;
use tokio::sync::mpsc;

const AGENTS: &[AgentSpec] = &[
    AgentSpec {
        id: "agent-a",
        labels: "",
        slots: 1,
    },
    AgentSpec {
        id: "agent-b",
        labels: "",
        slots: 1,
    },
];

const DEADLINE: Duration = Duration::from_secs(10);

/// A connection with `role`'s own key that reports every error the server sends it.
struct Watched {
    client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
}

impl Watched {
    async fn connect(system: &mut TestSystem, role: &NatsRole) -> Watched {
        let env = system.nats_env(role).await.unwrap();
        let seed_file = env
            .iter()
            .find(|(k, _)| k == "HODEI_NATS_NKEY_FILE")
            .map(|(_, v)| v.clone())
            .unwrap();
        let seed = std::fs::read_to_string(seed_file).unwrap();
        let (tx, errors) = mpsc::unbounded_channel();
        let client = ConnectOptions::new()
            .nkey(seed.trim().to_owned())
            .custom_inbox_prefix(inbox_prefix(&role.client_name()))
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(system.nats.url())
            .await
            .unwrap();
        Watched { client, errors }
    }

    /// Publishes to `subject` and waits for the server to refuse it.
    async fn publish_refused(&mut self, subject: &str) {
        self.client
            .publish(subject.to_owned(), "{}".into())
            .await
            .unwrap();
        self.refused("publish", subject).await;
    }

    /// Waits for the server to refuse `what` on `subject`.
    async fn refused(&mut self, what: &str, subject: &str) {
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some(error) = self.errors.recv().await {
                let error = error.to_lowercase();
                if error.contains(&format!("permissions violation for {what}"))
                    && error.contains(&subject.to_lowercase())
                {
                    return true;
                }
                eprintln!("other server error: {error}");
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "the server never refused {what} to {subject}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_lets_each_credential_speak_only_for_itself() {
    let mut system = TestSystem::start(AGENTS).await.unwrap();
    let a: WorkerId = "agent-a".parse().unwrap();
    let b: WorkerId = "agent-b".parse().unwrap();
    let job = JobId::new();

    // Agent A speaking as agent B: report, heartbeat, log batch, B's commands and consumer.
    let mut agent_a = Watched::connect(&mut system, &NatsRole::Agent(a.clone())).await;
    for subject in [
        subjects::report(&b, &job),
        subjects::heartbeat(&b),
        subjects::log(&b, &job),
    ] {
        agent_a.publish_refused(&subject).await;
    }
    // An agent sends no commands, not even to itself.
    for subject in [subjects::agent_commands(&b), subjects::agent_commands(&a)] {
        agent_a.publish_refused(&subject).await;
    }
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{}.agent-{b}", streams::AGENT);
    agent_a.publish_refused(&next).await;
    // Nor create a consumer on the artifact bucket: its creator would pick where the server
    // delivers stored bytes (a heartbeat or report subject of another worker).
    let objects = format!(
        "$JS.API.CONSUMER.CREATE.{}",
        hodei_messaging::artifacts::stream_name()
    );
    agent_a.publish_refused(&objects).await;
    let _sub = agent_a
        .client
        .subscribe(subjects::agent_commands(&b))
        .await
        .unwrap();
    agent_a
        .refused("subscription", &subjects::agent_commands(&b))
        .await;
    // Nor another connection's replies.
    let foreign_inbox = format!("{}.>", inbox_prefix(&NatsRole::Scheduler.client_name()));
    let _sub = agent_a
        .client
        .subscribe(foreign_inbox.clone())
        .await
        .unwrap();
    agent_a.refused("subscription", &foreign_inbox).await;

    // The services speak for no agent.
    for service in [NatsRole::Scheduler, NatsRole::Registry, NatsRole::Gateway] {
        let mut watched = Watched::connect(&mut system, &service).await;
        for subject in [
            subjects::report(&a, &job),
            subjects::heartbeat(&a),
            subjects::log(&a, &job),
        ] {
            watched.publish_refused(&subject).await;
        }
        // Nor delete or purge a stream, touch another one, or use the server's admin API.
        for subject in [
            format!("$JS.API.STREAM.DELETE.{}", streams::WORK),
            format!("$JS.API.STREAM.PURGE.{}", streams::EVENTS),
            "$JS.API.STREAM.CREATE.SOMEONE_ELSES".to_owned(),
            "$JS.API.SERVER.REMOVE".to_owned(),
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.agent-{a}", streams::AGENT),
        ] {
            watched.publish_refused(&subject).await;
        }
    }

    // Nothing forged reached the reports or the logs.
    let (_, js) = system.admin_nats().await.unwrap();
    for (stream, subject) in [
        (streams::REPORTS, subjects::report(&b, &job)),
        (streams::REPORTS, subjects::report(&a, &job)),
        (streams::LOGS, subjects::log(&b, &job)),
    ] {
        let stream = js.get_stream(stream).await.unwrap();
        assert!(
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_err(),
            "{subject} was stored"
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_unknown_and_revoked_keys_are_refused() {
    let mut system = TestSystem::start(AGENTS).await.unwrap();
    let url = system.nats.url();
    let refused = |options: ConnectOptions| {
        let url = url.clone();
        async move {
            tokio::time::timeout(DEADLINE, options.connect(url))
                .await
                .unwrap()
                .is_err()
        }
    };
    assert!(refused(ConnectOptions::new()).await, "anonymous admitted");
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    assert!(
        refused(ConnectOptions::new().nkey(stranger)).await,
        "an unknown key admitted"
    );

    // Agent B works, is revoked, and is refused from then on.
    let b: WorkerId = "agent-b".parse().unwrap();
    let env = system.nats_env(&NatsRole::Agent(b.clone())).await.unwrap();
    let seed_file = env
        .iter()
        .find(|(k, _)| k == "HODEI_NATS_NKEY_FILE")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .unwrap();
    let auth = NatsAuth::load(Some(&seed_file), None).unwrap();
    let name = hodei_messaging::permissions::agent_client_name(&b);
    let connected = hodei_messaging::connect_with(&url, &name, DEADLINE, &auth)
        .await
        .unwrap();
    drop(connected);
    assert!(system.revoke_agent(&b).await.unwrap());
    wait_for("nats-server to refuse the revoked key", DEADLINE, || {
        let (url, name, auth) = (url.clone(), name.clone(), auth.clone());
        async move {
            hodei_messaging::connect_with(&url, &name, Duration::from_millis(500), &auth)
                .await
                .is_err()
                .then_some(())
        }
    })
    .await
    .unwrap();
    // The running agent B was cut off: the registry stops hearing it.
    let workers = system.workers.clone();
    wait_for(
        "agent-b to be marked unreachable",
        Duration::from_secs(30),
        || {
            let mut workers = workers.clone();
            async move {
                let list = workers
                    .list_workers(hodei_proto::v1::ListWorkersRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                list.workers
                    .iter()
                    .any(|w| {
                        w.id == "agent-b" && w.status != hodei_proto::v1::WorkerStatus::Ready as i32
                    })
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    system.stop().await;
}
