//! Reading wire values for display: enum names, timestamps and attempt outcomes, shared by
//! the human and the JSON output.

use chrono::{DateTime, SecondsFormat, Utc};
use hodei_proto::v1 as pb;
use hodei_proto::v1::attempt_outcome::Kind;

/// The lowercase name of a job state ("succeeded", "timed_out"); "unspecified" for 0 or
/// values this client does not know.
pub fn state_name(value: i32) -> &'static str {
    hodei_proto::state_from_wire(value).map_or("unspecified", |s| s.as_str())
}

/// Whether a job in this state is finished for good.
pub fn is_terminal(value: i32) -> bool {
    hodei_proto::state_from_wire(value).is_some_and(|s| s.is_terminal())
}

/// The lowercase name of a pipeline run state ("running"); "unspecified" for 0 or unknown
/// values.
pub fn run_state_name(value: i32) -> &'static str {
    hodei_proto::pipeline_state_from_wire(value).map_or("unspecified", |s| s.as_str())
}

/// Whether a run in this state is finished for good.
pub fn run_is_terminal(value: i32) -> bool {
    hodei_proto::pipeline_state_from_wire(value).is_some_and(|s| s.is_terminal())
}

/// The lowercase name of a step state ("waiting", "skipped"); "unspecified" for 0 or unknown
/// values.
pub fn step_state_name(value: i32) -> &'static str {
    match pb::StepState::try_from(value) {
        Ok(pb::StepState::Waiting) => "waiting",
        Ok(pb::StepState::Queued) => "queued",
        Ok(pb::StepState::Running) => "running",
        Ok(pb::StepState::Succeeded) => "succeeded",
        Ok(pb::StepState::Failed) => "failed",
        Ok(pb::StepState::Skipped) => "skipped",
        Ok(pb::StepState::Cancelled) => "cancelled",
        Ok(pb::StepState::Unspecified) | Err(_) => "unspecified",
    }
}

/// Whether a step in this state has ended for good (succeeded, failed, skipped, cancelled).
pub fn step_is_terminal(value: i32) -> bool {
    matches!(
        pb::StepState::try_from(value),
        Ok(pb::StepState::Succeeded
            | pb::StepState::Failed
            | pb::StepState::Skipped
            | pb::StepState::Cancelled)
    )
}

/// "on_success", "on_failure" or "always" (the wire's unspecified means on_success).
pub fn when_name(value: i32) -> &'static str {
    match pb::When::try_from(value) {
        Ok(pb::When::OnFailure) => "on_failure",
        Ok(pb::When::Always) => "always",
        Ok(pb::When::OnSuccess | pb::When::Unspecified) | Err(_) => "on_success",
    }
}

/// The lowercase name of a worker status ("ready"); "unspecified" for unknown values.
pub fn status_name(value: i32) -> &'static str {
    hodei_proto::status_from_wire(value).map_or("unspecified", |s| s.as_str())
}

/// "stdout", "stderr" or "unspecified".
pub fn stream_name(value: i32) -> &'static str {
    match pb::LogStream::try_from(value) {
        Ok(pb::LogStream::Stdout) => "stdout",
        Ok(pb::LogStream::Stderr) => "stderr",
        Ok(pb::LogStream::Unspecified) | Err(_) => "unspecified",
    }
}

/// A wire timestamp as a chrono time; `None` when unset or out of range.
pub fn time(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// RFC 3339 with as many fraction digits as needed, for JSON.
pub fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    time(ts).map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// RFC 3339 to the second, for people; "-" when unset.
pub fn rfc3339_secs(ts: Option<&prost_types::Timestamp>) -> String {
    time(ts).map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

/// How an attempt ended, in words ("exited with code 3"); `None` when it has not ended.
pub fn outcome_text(outcome: Option<&pb::AttemptOutcome>) -> Option<String> {
    Some(match outcome?.kind.as_ref()? {
        Kind::Exited(code) => format!("exited with code {code}"),
        Kind::Signalled(signal) => format!("killed by signal {signal}"),
        Kind::TimedOut(_) => "timed out".to_owned(),
        Kind::Cancelled(_) => "cancelled".to_owned(),
        Kind::SpawnFailed(reason) => format!("failed to start: {reason}"),
        Kind::Lost(reason) => format!("worker lost: {reason}"),
        Kind::ArtifactsFailed(reason) => format!("failed to keep artifacts: {reason}"),
        Kind::Preempted(by) => format!("preempted by job {by}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_are_lowercase() {
        assert_eq!(state_name(pb::JobState::Succeeded.into()), "succeeded");
        assert_eq!(state_name(pb::JobState::TimedOut.into()), "timed_out");
        assert_eq!(state_name(0), "unspecified");
        assert_eq!(state_name(99), "unspecified");
        assert_eq!(status_name(pb::WorkerStatus::Draining.into()), "draining");
        assert_eq!(stream_name(pb::LogStream::Stderr.into()), "stderr");
        assert!(is_terminal(pb::JobState::Cancelled.into()));
        assert!(!is_terminal(pb::JobState::Running.into()));
        assert_eq!(
            run_state_name(pb::PipelineState::Cancelled.into()),
            "cancelled"
        );
        assert_eq!(run_state_name(0), "unspecified");
        assert!(run_is_terminal(pb::PipelineState::Failed.into()));
        assert!(!run_is_terminal(pb::PipelineState::Running.into()));
        assert_eq!(step_state_name(pb::StepState::Skipped.into()), "skipped");
        assert_eq!(step_state_name(42), "unspecified");
        assert_eq!(when_name(0), "on_success");
        assert_eq!(when_name(pb::When::Always.into()), "always");
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        let ts = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 250_000_000,
        };
        assert_eq!(
            rfc3339(Some(&ts)).as_deref(),
            Some("2023-11-14T22:13:20.250Z")
        );
        assert_eq!(rfc3339_secs(Some(&ts)), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(None), None);
        assert_eq!(rfc3339_secs(None), "-");
    }

    #[test]
    fn outcomes_in_words() {
        let o = |kind| pb::AttemptOutcome { kind: Some(kind) };
        assert_eq!(
            outcome_text(Some(&o(Kind::Exited(3)))).as_deref(),
            Some("exited with code 3")
        );
        assert_eq!(
            outcome_text(Some(&o(Kind::Lost("no heartbeat".into())))).as_deref(),
            Some("worker lost: no heartbeat")
        );
        assert_eq!(outcome_text(None), None);
    }
}
