//! Everything that crosses NATS: the one module that names subjects and headers, the
//! JetStream streams and consumers, the JSON payloads and event envelope, and connecting to
//! a server that is new enough, and trace context in message headers ([`trace`]).

pub mod artifacts;
pub mod connect;
pub mod envelope;
pub mod payloads;
pub mod permissions;
pub mod seal;
pub mod settle;
pub mod streams;
pub mod subjects;
pub mod trace;

pub use connect::{MessagingError, NatsAuth, NatsCredentialArgs, connect, connect_with};
pub use envelope::{Envelope, OutgoingEnvelope};
pub use payloads::{
    AgentCommand, AgentReport, Heartbeat, HeartbeatRefused, LogBatch, LogEntry, LogStreamKind,
    Outgoing, PlaceJob, ReportKind,
};
pub use trace::TraceHeaders;

/// Decodes a JSON payload, naming the subject in the error.
pub fn decode<T: serde::de::DeserializeOwned>(
    subject: &str,
    payload: &[u8],
) -> Result<T, MessagingError> {
    serde_json::from_slice(payload).map_err(|source| MessagingError::Malformed {
        subject: subject.to_owned(),
        source,
    })
}
