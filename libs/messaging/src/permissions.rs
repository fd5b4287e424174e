//! Who may publish and subscribe to what on NATS: one credential (an nkey) per service and per
//! agent, with permissions that follow the subjects of [`crate::subjects`], and the
//! nats-server `authorization` block that enforces them.
//!
//! - An agent may publish only subjects that name itself (its heartbeat, its reports, its log
//!   batches), pull only from its own durable consumer on its own command subject, and receive
//!   replies only on its own inbox prefix. Its artifacts go to the artifact bucket.
//! - The scheduler, the registry and the gateway publish the control plane's subjects (events,
//!   work, agent commands, dead letters: the outbox relay of each of them relays rows that any
//!   of them wrote) and use the JetStream API. None of them may publish a heartbeat, a report
//!   or a log batch: only an agent speaks for an agent.
//! - `admin` (hodei-admin, operators' tools) may do anything.

use std::fmt;

use async_nats::jetstream::consumer::pull;
use hodei_domain::WorkerId;
use serde_json::{Value, json};

use crate::subjects::PREFIX;
use crate::{artifacts, streams};

/// What a NATS credential is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsRole {
    Scheduler,
    Registry,
    Gateway,
    Admin,
    Agent(WorkerId),
}

impl NatsRole {
    /// The client name (and so the inbox prefix) a connection with this credential uses.
    pub fn client_name(&self) -> String {
        match self {
            NatsRole::Scheduler => "hodei-scheduler".to_owned(),
            NatsRole::Registry => "hodei-registry".to_owned(),
            NatsRole::Gateway => "hodei-api-gateway".to_owned(),
            NatsRole::Admin => "hodei-admin".to_owned(),
            NatsRole::Agent(id) => agent_client_name(id),
        }
    }

    /// What this credential may publish and subscribe to.
    pub fn permissions(&self) -> Permissions {
        let inbox = format!("{}.>", inbox_prefix(&self.client_name()));
        match self {
            NatsRole::Admin => Permissions {
                publish: vec![">".to_owned()],
                subscribe: vec![">".to_owned()],
            },
            NatsRole::Agent(id) => agent_permissions(id, inbox),
            NatsRole::Scheduler | NatsRole::Registry | NatsRole::Gateway => {
                service_permissions(self, inbox)
            }
        }
    }
}

/// A service's permissions. Every service may publish what any outbox relay publishes (events,
/// placement requests, agents' commands, dead letters: the relay of each service publishes rows
/// that any of them wrote), and on JetStream only what it does itself: create, update and read
/// Hodei's streams (every service ensures them at start), read stored messages by subject, and
/// use its own consumers. It may not delete or purge a stream, touch any other stream, or use
/// the server's and account's administrative API.
fn service_permissions(role: &NatsRole, inbox: String) -> Permissions {
    let objects = artifacts::stream_name();
    let mut publish = vec![
        format!("{PREFIX}.evt.>"),
        format!("{PREFIX}.work.>"),
        format!("{PREFIX}.agent.*.cmd"),
        format!("{PREFIX}.dlq.>"),
        "$JS.API.INFO".to_owned(),
    ];
    for stream in [
        streams::EVENTS,
        streams::WORK,
        streams::AGENT,
        streams::REPORTS,
        streams::LOGS,
        streams::DLQ,
        objects.as_str(),
    ] {
        publish.extend([
            format!("$JS.API.STREAM.INFO.{stream}"),
            format!("$JS.API.STREAM.CREATE.{stream}"),
            format!("$JS.API.STREAM.UPDATE.{stream}"),
            format!("$JS.API.STREAM.MSG.GET.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}.>"),
        ]);
    }
    let mut subscribe = vec![inbox];
    match role {
        NatsRole::Scheduler => {
            for (stream, consumer) in [
                (streams::WORK, streams::PLACER),
                (streams::REPORTS, streams::REPORTER),
            ] {
                publish.extend(durable_consumer(stream, consumer));
            }
        }
        NatsRole::Registry => {
            subscribe.push(format!("{PREFIX}.hb.*"));
            let observation = crate::subjects::registry_observation();
            publish.push(observation.clone());
            subscribe.push(observation);
        }
        NatsRole::Gateway => {
            subscribe.push(format!("{PREFIX}.evt.>"));
            // Log follows and artifact listings and downloads: ordered consumers of its own
            // naming (a creator picks the subject a consumer delivers to, which nats-server
            // does not check: see docs/SECURITY.md).
            for stream in [streams::LOGS, objects.as_str()] {
                publish.extend(ephemeral_consumers(stream));
            }
        }
        NatsRole::Admin | NatsRole::Agent(_) => {}
    }
    Permissions { publish, subscribe }
}

/// The subjects that create, read from and acknowledge the durable consumer `consumer` of
/// `stream`.
fn durable_consumer(stream: &str, consumer: &str) -> [String; 6] {
    [
        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        format!("$JS.ACK.{stream}.{consumer}.>"),
    ]
}

/// The subjects that create, use and delete short-lived consumers of `stream`.
fn ephemeral_consumers(stream: &str) -> [String; 7] {
    [
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.INFO.{stream}.>"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>"),
        format!("$JS.ACK.{stream}.>"),
        format!("$JS.FC.{stream}.>"),
    ]
}

impl fmt::Display for NatsRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsRole::Agent(id) => write!(f, "agent {id}"),
            other => f.write_str(other.client_name().trim_start_matches("hodei-")),
        }
    }
}

/// The client name of agent `id`'s connection.
pub fn agent_client_name(id: &WorkerId) -> String {
    format!("hodei-agent-{id}")
}

/// The inbox prefix of a connection named `client_name`: replies to its requests (JetStream
/// acks, pulled messages) arrive under it, and only it may subscribe there.
pub fn inbox_prefix(client_name: &str) -> String {
    format!("_INBOX_{client_name}")
}

/// The dead-letter kind of the commands agent `id` could not decode: its dead letters go to
/// `hodei.v1.dlq.agent-command.<id>`.
pub fn agent_dead_letter_kind(id: &WorkerId) -> String {
    format!("agent-command.{id}")
}

/// The name of agent `id`'s durable consumer on its command subject.
pub fn agent_consumer_name(id: &WorkerId) -> String {
    format!("agent-{id}")
}

/// Agent `id`'s durable consumer on its command subject.
pub fn agent_consumer(id: &WorkerId) -> pull::Config {
    streams::durable(
        &agent_consumer_name(id),
        crate::subjects::agent_commands(id),
    )
}

fn agent_permissions(id: &WorkerId, inbox: String) -> Permissions {
    let agent = streams::AGENT;
    let consumer = agent_consumer_name(id);
    let objects = artifacts::stream_name();
    Permissions {
        publish: vec![
            format!("{PREFIX}.hb.{id}"),
            crate::subjects::lease_echo(id),
            format!("{PREFIX}.report.{id}.*"),
            format!("{PREFIX}.log.{id}.*"),
            crate::subjects::dead_letter(&agent_dead_letter_kind(id)),
            "$JS.API.INFO".to_owned(),
            format!("$JS.API.STREAM.INFO.{agent}"),
            format!("$JS.API.STREAM.INFO.{}", streams::REPORTS),
            format!("$JS.API.STREAM.INFO.{}", streams::LOGS),
            format!("$JS.API.CONSUMER.INFO.{agent}.{consumer}"),
            format!(
                "$JS.API.CONSUMER.CREATE.{agent}.{consumer}.{}",
                crate::subjects::agent_commands(id)
            ),
            format!("$JS.API.CONSUMER.MSG.NEXT.{agent}.{consumer}"),
            format!("$JS.ACK.{agent}.{consumer}.>"),
            // The artifact bucket: writing objects, and reading them with direct gets. No
            // consumer: its creator picks the subject the server delivers stored bytes to,
            // which nats-server does not check against the creator's permissions.
            format!("$JS.API.STREAM.INFO.{objects}"),
            format!("$JS.API.STREAM.MSG.GET.{objects}"),
            format!("$JS.API.DIRECT.GET.{objects}"),
            format!("$JS.API.DIRECT.GET.{objects}.>"),
            format!("$O.{}.>", artifacts::BUCKET),
        ],
        subscribe: vec![inbox],
    }
}

/// Subjects a credential may publish to and subscribe to (allow lists; everything else is
/// refused by the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// One credential the server accepts: an nkey's public key and what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUser {
    /// The nkey's public key (`U…`).
    pub nkey: String,
    pub role: NatsRole,
}

/// The nats-server `authorization` block (JSON, which nats-server's configuration format
/// accepts) that admits exactly `users`, each with its role's permissions.
pub fn authorization(users: &[NatsUser]) -> Value {
    let users: Vec<Value> = users
        .iter()
        .map(|user| {
            let p = user.role.permissions();
            json!({
                "nkey": user.nkey,
                "permissions": {
                    "publish": { "allow": p.publish },
                    "subscribe": { "allow": p.subscribe },
                },
            })
        })
        .collect();
    json!({ "users": users })
}

/// A nats-server configuration fragment: the `authorization` block for `users` and, with
/// `tls`, the server certificate and key every client must connect with.
pub fn server_config(users: &[NatsUser], tls: Option<(&str, &str)>) -> String {
    let mut config = format!("authorization: {}\n", authorization(users));
    if let Some((cert, key)) = tls {
        config.push_str(&format!(
            "tls: {}\n",
            json!({ "cert_file": cert, "key_file": key, "timeout": 5 })
        ));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_may_speak_only_for_itself() {
        let id: WorkerId = "w-1".parse().unwrap();
        let p = NatsRole::Agent(id.clone()).permissions();
        assert!(p.publish.contains(&"hodei.v1.hb.w-1".to_owned()));
        assert!(p.publish.contains(&"hodei.v1.report.w-1.*".to_owned()));
        assert!(p.publish.contains(&"hodei.v1.log.w-1.*".to_owned()));
        assert!(
            p.publish
                .contains(&"hodei.v1.dlq.agent-command.w-1".to_owned())
        );
        assert!(
            p.publish
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.HODEI_AGENT.agent-w-1".to_owned())
        );
        assert!(!p.publish.iter().any(|s| s.contains("agent.*")));
        // No consumer but its own command consumer: a consumer's creator picks where the
        // server delivers, unchecked.
        assert_eq!(
            p.publish
                .iter()
                .filter(|s| s.starts_with("$JS.API.CONSUMER.CREATE."))
                .count(),
            1
        );
        assert_eq!(p.subscribe, vec!["_INBOX_hodei-agent-w-1.>".to_owned()]);
        for service in [NatsRole::Scheduler, NatsRole::Registry, NatsRole::Gateway] {
            let p = service.permissions();
            assert!(
                !p.publish
                    .iter()
                    .any(|s| s.contains(".hb.") || s.contains(".report.") || s.contains(".log.")),
                "{service} may not speak for agents"
            );
        }
        for service in [NatsRole::Scheduler, NatsRole::Registry, NatsRole::Gateway] {
            let p = service.permissions();
            assert!(
                !p.publish.iter().any(|s| s == "$JS.API.>"
                    || s.contains("STREAM.DELETE")
                    || s.contains("STREAM.PURGE")
                    || s.starts_with("$O.")),
                "{service} may not delete, purge or write objects: {:?}",
                p.publish
            );
        }
        let scheduler = NatsRole::Scheduler.permissions();
        assert!(
            scheduler
                .publish
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.HODEI_WORK.scheduler-placer".to_owned())
        );
        assert!(
            !NatsRole::Registry
                .permissions()
                .publish
                .iter()
                .any(|s| s.starts_with("$JS.API.CONSUMER.")),
            "the registry uses no consumer"
        );
        let config = server_config(
            &[NatsUser {
                nkey: "UABC".into(),
                role: NatsRole::Agent(id),
            }],
            Some(("/c.pem", "/k.pem")),
        );
        assert!(config.starts_with("authorization: {\"users\":[{\"nkey\":\"UABC\""));
        assert!(config.contains("tls: {\"cert_file\":\"/c.pem\""));
    }
}
