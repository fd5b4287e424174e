//! What can stop an agent from starting: bad configuration, an unusable work folder, NATS.

use std::path::PathBuf;

use hodei_domain::IdError;
use hodei_messaging::MessagingError;

/// Why an agent could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The worker id given (or made from the hostname) is not a valid id.
    #[error("invalid worker id: {0}")]
    WorkerId(#[source] IdError),
    /// One `key=value` pair of the labels is invalid.
    #[error("invalid label '{label}': {reason}")]
    InvalidLabel { label: String, reason: &'static str },
    /// Another setting is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        field: &'static str,
        reason: &'static str,
    },
    /// `HODEI_JOB_USER` names no usable identity.
    #[error("invalid job_user: {0}")]
    JobUser(#[from] crate::identity::JobUserError),
    /// `HODEI_JOB_CGROUPS=required`, and jobs cannot have cgroups here.
    #[error("job_cgroups: {0}")]
    Cgroups(#[from] crate::cgroup::CgroupError),
    /// This host cannot start jobs as the agent does (see `launch::check_host`).
    #[error("this host cannot run jobs: {0}")]
    Host(#[source] std::io::Error),
    /// The folder holding the workspaces cannot be created.
    #[error("failed to create the work folder {}: {source}", path.display())]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another agent holds the work folder, or its lock file cannot be used.
    #[error(transparent)]
    WorkLock(#[from] crate::work_lock::WorkLockError),
    /// Connecting to NATS or setting up streams and consumers failed.
    #[error(transparent)]
    Messaging(#[from] MessagingError),
    /// The metrics and health server could not be started.
    #[error(transparent)]
    Telemetry(#[from] hodei_telemetry::TelemetryError),
}
