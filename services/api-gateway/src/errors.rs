//! The one place errors become gRPC statuses. Handlers and their helpers fail with
//! [`ApiError`] (the domain's, storage's and encoding errors convert into it with `From`), and
//! [`ApiError`] becomes a [`Status`] in one `match`; [`IntoStatus`] converts a `Result` whose
//! error converts into [`ApiError`] in one step.

use hodei_domain::{AccessError, DomainError, ValidationErrors};
use hodei_storage::StorageError;
use tonic::Status;

/// Why a request failed, as the gateway answers it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field that is missing, malformed or too large for the transport.
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    /// A spec that failed validation: every field with its reason.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    /// What the request creates exists already (a schedule's name in its tenant).
    #[error("{0}")]
    AlreadyExists(String),
    /// What the request names does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// What the request names was moved to the archive by retention: only its history is
    /// left to read.
    #[error("{what} was archived at {at}; GetJob, GetJobHistory and GetPipelineRun still read it")]
    Archived { what: String, at: String },
    /// The gateway is not set up for what the request needs (a secret without a sealing key).
    #[error("{0}")]
    Unsupported(String),
    /// The call carries no credentials, or ones that are malformed, unknown, expired or
    /// revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role does not allow the call, or the tenant it names.
    #[error(transparent)]
    Denied(#[from] AccessError),
    /// Admission control refused the submission: the queue is full.
    #[error("{0}")]
    Exhausted(String),
    /// A NATS stream, subscription or the artifact store did not answer.
    #[error("{what} unavailable: {reason}")]
    Unavailable { what: &'static str, reason: String },
    /// Stored bytes could not be read back.
    #[error("{0}")]
    DataLoss(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A message that could not be encoded (a bug, not bad input).
    #[error("failed to encode a message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ApiError {
    /// Request field `field` is wrong for `reason`.
    pub fn field(field: impl Into<String>, reason: impl ToString) -> Self {
        ApiError::Field {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// `what` (e.g. `job 0193…`) does not exist.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound { what: what.into() }
    }

    /// `what` (e.g. `job 0193…`) was archived `at`.
    pub fn archived(what: impl Into<String>, at: chrono::DateTime<chrono::Utc>) -> Self {
        ApiError::Archived {
            what: what.into(),
            at: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    /// `what` (e.g. `log stream`) failed with `reason`.
    pub fn unavailable(what: &'static str, reason: impl ToString) -> Self {
        ApiError::Unavailable {
            what,
            reason: reason.to_string(),
        }
    }
}

impl From<crate::submissions::SubmitError> for ApiError {
    fn from(e: crate::submissions::SubmitError) -> Self {
        match e {
            crate::submissions::SubmitError::Storage(e) => ApiError::Storage(e),
            stopped @ crate::submissions::SubmitError::Stopped => {
                ApiError::unavailable("submissions", stopped)
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        bounded(status_of(e))
    }
}

/// Longest status message sent, in bytes. A message often repeats what the caller sent (an
/// id, a label key, a cron expression); it travels in the `grpc-message` trailer,
/// percent-encoded (up to three bytes each), and clients refuse header blocks past 16 KiB
/// (hyper's default) with a protocol error instead of the status. The field is named first, so
/// it survives the cut.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

/// `status` with its message cut to [`MAX_STATUS_MESSAGE_BYTES`], saying how much was cut.
fn bounded(status: Status) -> Status {
    let message = status.message();
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return status;
    }
    let keep = message.floor_char_boundary(MAX_STATUS_MESSAGE_BYTES - 64);
    let cut = format!(
        "{}… ({} more bytes not shown)",
        &message[..keep],
        message.len() - keep
    );
    Status::with_details_and_metadata(
        status.code(),
        cut,
        status.details().to_vec().into(),
        status.metadata().clone(),
    )
}

fn status_of(e: ApiError) -> Status {
    match e {
        ApiError::Field { .. } | ApiError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ApiError::NotFound { .. } => Status::not_found(e.to_string()),
        ApiError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        ApiError::Archived { .. } | ApiError::Unsupported(_) => {
            Status::failed_precondition(e.to_string())
        }
        ApiError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        ApiError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
        ApiError::Denied(_) => Status::permission_denied(e.to_string()),
        ApiError::Unavailable { .. } => Status::unavailable(e.to_string()),
        ApiError::DataLoss(_) => Status::data_loss(e.to_string()),
        ApiError::Storage(e) => storage(e),
        ApiError::Domain(e) => domain(e),
        ApiError::Encode(_) => Status::internal(e.to_string()),
    }
}

fn storage(e: StorageError) -> Status {
    if let StorageError::Refused(refused) = e {
        return domain(refused);
    }
    match &e {
        StorageError::Conflict { .. } => Status::aborted(e.to_string()),
        StorageError::Unavailable { .. } => Status::unavailable(e.to_string()),
        _ if e.is_unavailable() => Status::unavailable(format!("database unavailable: {e}")),
        _ => {
            tracing::error!(error = %e, "storage error");
            Status::internal(e.to_string())
        }
    }
}

fn domain(e: DomainError) -> Status {
    match e {
        DomainError::Invalid(v) => Status::invalid_argument(v.to_string()),
        other => Status::failed_precondition(other.to_string()),
    }
}

/// Converts a `Result` whose error converts into [`ApiError`] into one with a [`Status`].
pub trait IntoStatus<T> {
    fn into_status(self) -> Result<T, Status>;
}

impl<T, E: Into<ApiError>> IntoStatus<T> for Result<T, E> {
    fn into_status(self) -> Result<T, Status> {
        self.map_err(|e| Status::from(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_maps_to_its_code_with_its_message() {
        let cases: Vec<(ApiError, Code, &str)> = vec![
            (
                ApiError::field("job_id", "not a uuid"),
                Code::InvalidArgument,
                "job_id: not a uuid",
            ),
            (
                ApiError::not_found("job 1"),
                Code::NotFound,
                "job 1 not found",
            ),
            (
                ApiError::Unauthenticated("unknown token".into()),
                Code::Unauthenticated,
                "unknown token",
            ),
            (
                AccessError::Denied {
                    role: hodei_domain::Role::Viewer,
                    action: hodei_domain::Action::Cancel,
                    needs: hodei_domain::Role::Submitter,
                }
                .into(),
                Code::PermissionDenied,
                "role viewer may not cancel",
            ),
            (
                ApiError::Exhausted("queue is full".into()),
                Code::ResourceExhausted,
                "queue is full",
            ),
            (
                ApiError::unavailable("log stream", "timed out"),
                Code::Unavailable,
                "log stream unavailable: timed out",
            ),
            (
                StorageError::Conflict {
                    what: "job 1".into(),
                }
                .into(),
                Code::Aborted,
                "concurrent update of job 1",
            ),
            (
                StorageError::Unavailable {
                    reason: "circuit open".into(),
                    retry_in: std::time::Duration::from_secs(1),
                }
                .into(),
                Code::Unavailable,
                "database unavailable: circuit open",
            ),
            (
                DomainError::UnknownStep { step: "b".into() }.into(),
                Code::FailedPrecondition,
                "b",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(message), "{status:?}");
        }
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_keeping_its_code_and_its_start() {
        let status = Status::from(ApiError::field("labels.é", "é".repeat(10_000)));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE_BYTES);
        assert!(status.message().starts_with("labels.é: éé"), "{status:?}");
        assert!(status.message().ends_with("more bytes not shown)"));
        let short = Status::from(ApiError::field("job_id", "not a uuid"));
        assert_eq!(short.message(), "job_id: not a uuid");
    }

    #[test]
    fn a_refused_change_is_a_failed_precondition_and_invalid_input_an_invalid_argument() {
        let refused = StorageError::Refused(DomainError::UnknownStep { step: "b".into() });
        assert_eq!(
            Status::from(ApiError::from(refused)).code(),
            Code::FailedPrecondition
        );
        let errors = ValidationErrors(vec![hodei_domain::FieldError::new(
            "spec.name",
            "is required",
        )]);
        let invalid = StorageError::Refused(DomainError::Invalid(errors.clone()));
        assert_eq!(
            Status::from(ApiError::from(invalid)).code(),
            Code::InvalidArgument
        );
        let status = Status::from(ApiError::from(errors));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("spec.name: is required"),
            "{status:?}"
        );
    }
}
