//! JetStream streams and consumers: their names and configurations, created idempotently by
//! every service at start-up.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, consumer};

use crate::connect::MessagingError;
use crate::subjects::PREFIX;

/// Domain events, kept 7 days for people and services to replay.
pub const EVENTS: &str = "HODEI_EVENTS";
/// Jobs that need placing (work queue: each message is taken by one scheduler).
pub const WORK: &str = "HODEI_WORK";
/// Commands for agents (work queue, one durable consumer per agent).
pub const AGENT: &str = "HODEI_AGENT";
/// Agents' reports on attempts (work queue, consumed by the schedulers).
pub const REPORTS: &str = "HODEI_REPORTS";
/// Job output, kept 7 days so logs replay from the start.
pub const LOGS: &str = "HODEI_LOGS";
/// Messages no service could handle, kept 30 days.
pub const DLQ: &str = "HODEI_DLQ";

/// Durable consumer shared by every scheduler replica on `WORK`.
pub const PLACER: &str = "scheduler-placer";
/// Durable consumer shared by every scheduler replica on `REPORTS`.
pub const REPORTER: &str = "scheduler-reports";

/// How long a consumer waits for an ack before redelivering.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries before a message is given up (and dead-lettered by the handler's last try).
pub const MAX_DELIVER: i64 = 10;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// How long every stream remembers a message id, dropping a second message with that id
/// (`Nats-Msg-Id`): what makes a publication retried after a lost ack or a crash stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The latest a message that must not be delivered twice is published after its commit
/// (half the duplicate window: the time between the commit and its first publication, and
/// the publication itself, stay well inside the window in which a second copy is dropped).
pub const AT_MOST_ONCE_WITHIN: Duration = Duration::from_secs(DUPLICATE_WINDOW.as_secs() / 2);

fn stream(name: &str, subjects: &str, retention: RetentionPolicy, max_age: Duration) -> Config {
    Config {
        name: name.to_owned(),
        subjects: vec![format!("{PREFIX}.{subjects}")],
        retention,
        storage: StorageType::File,
        max_age,
        discard: DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// Every stream Hodei uses.
pub fn all() -> Vec<Config> {
    vec![
        stream(EVENTS, "evt.>", RetentionPolicy::Limits, 7 * DAY),
        stream(WORK, "work.>", RetentionPolicy::WorkQueue, 7 * DAY),
        stream(AGENT, "agent.>", RetentionPolicy::WorkQueue, 7 * DAY),
        stream(REPORTS, "report.>", RetentionPolicy::WorkQueue, 7 * DAY),
        stream(LOGS, "log.>", RetentionPolicy::Limits, 7 * DAY),
        stream(DLQ, "dlq.>", RetentionPolicy::Limits, 30 * DAY),
    ]
}

/// Creates every stream that does not exist yet (or updates its configuration).
pub async fn ensure_all(js: &jetstream::Context) -> Result<(), MessagingError> {
    for config in all() {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| MessagingError::Setup {
                what: format!("stream {name}"),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// Waits until every stream in `names` exists, for up to `timeout`: for a process that may
/// only use streams (an agent), not create them. Fails naming the first stream still missing.
pub async fn wait_for(
    js: &jetstream::Context,
    names: &[&str],
    timeout: Duration,
) -> Result<(), MessagingError> {
    let deadline = tokio::time::Instant::now() + timeout;
    for name in names {
        loop {
            let reason = match js.get_stream(*name).await {
                Ok(_) => break,
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(MessagingError::Setup {
                    what: format!("stream {name}"),
                    reason: format!(
                        "{reason}: it is created by the scheduler, the registry or the gateway; \
                         start one of them first"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// A durable pull consumer with explicit acks, the shared ack wait and delivery limit.
pub fn durable(name: &str, filter_subject: String) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: MAX_DELIVER,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Gets or creates the durable consumer `config` on `stream`.
pub async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> Result<consumer::PullConsumer, MessagingError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let what = || format!("consumer {name} on {stream}");
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| MessagingError::Setup {
            what: what(),
            reason: e.to_string(),
        })?;
    s.get_or_create_consumer(&name, config)
        .await
        .map_err(|e| MessagingError::Setup {
            what: what(),
            reason: e.to_string(),
        })
}
