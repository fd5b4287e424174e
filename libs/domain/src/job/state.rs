//! Where a job is in its life.

use crate::ids::named_enum;

named_enum! {
    /// Where a job is in its life.
    pub enum JobState("job state") {
        Queued = "queued",
        Assigned = "assigned",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        TimedOut = "timed_out",
    }
}

impl JobState {
    /// Terminal states are final: no command changes them.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }
}
