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
    /// A job on a worker (assigned or running) holds a slot there and counts in its tenant's
    /// usage.
    pub fn is_on_worker(&self) -> bool {
        matches!(self, JobState::Assigned | JobState::Running)
    }

    /// Terminal states are final: no command changes them.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }
}
