//! The one place errors become gRPC statuses.

use hodei_domain::{DomainError, IdError, ValidationErrors};
use hodei_storage::StorageError;
use tonic::Status;

/// Invalid input: every field with its reason.
pub fn invalid(errors: &ValidationErrors) -> Status {
    Status::invalid_argument(errors.to_string())
}

/// An unparseable id in request field `field`.
pub fn invalid_id(field: &str, e: &IdError) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

pub fn storage(e: StorageError) -> Status {
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

pub fn domain(e: DomainError) -> Status {
    match e {
        DomainError::Invalid(v) => invalid(&v),
        other => Status::failed_precondition(other.to_string()),
    }
}

/// Input larger than the transport carries: `field` names what to shrink.
pub fn too_large(field: &str, reason: &str) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// A message that could not be encoded (a bug, not bad input).
pub fn serialization(e: serde_json::Error) -> Status {
    Status::internal(format!("failed to encode a message: {e}"))
}
