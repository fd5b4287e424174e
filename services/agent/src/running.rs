//! The attempts running on this agent, each with the tokens that stop it: `cancel` (a
//! `Cancel` command: the attempt ends cancelled) and `lose` (the agent's lease expired: the
//! attempt ends lost). Shared by the command loop (which adds and cancels), the attempts
//! (which remove themselves when done), the lease watch (which loses them all) and the
//! heartbeats (which list them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hodei_domain::AttemptId;
use tokio_util::sync::CancellationToken;

/// What stops one attempt.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stoppers {
    /// Cancelled by a `Cancel` command or a forced stop.
    pub cancel: CancellationToken,
    /// Cancelled when the agent's lease on its work expires.
    pub lose: CancellationToken,
}

/// The running attempts; cheap to clone, every clone sees the same set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Running(Arc<Mutex<HashMap<AttemptId, Stoppers>>>);

impl Running {
    fn lock(&self) -> MutexGuard<'_, HashMap<AttemptId, Stoppers>> {
        // Nothing panics while holding the lock, and the map stays consistent if it did.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `attempt` and returns what stops it; `None` if it is already running.
    pub fn start(&self, attempt: AttemptId) -> Option<Stoppers> {
        let mut map = self.lock();
        if map.contains_key(&attempt) {
            return None;
        }
        let stoppers = Stoppers::default();
        map.insert(attempt, stoppers.clone());
        Some(stoppers)
    }

    /// Removes `attempt` once it is over.
    pub fn finish(&self, attempt: &AttemptId) {
        self.lock().remove(attempt);
    }

    /// Cancels `attempt`; returns whether it was running.
    pub fn cancel(&self, attempt: &AttemptId) -> bool {
        match self.lock().get(attempt) {
            Some(stoppers) => {
                stoppers.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every running attempt; returns how many there were.
    pub fn cancel_all(&self) -> usize {
        let map = self.lock();
        for stoppers in map.values() {
            stoppers.cancel.cancel();
        }
        map.len()
    }

    /// Stops every running attempt as lost (the lease expired); returns how many there were.
    pub fn lose_all(&self) -> usize {
        let map = self.lock();
        for stoppers in map.values() {
            stoppers.lose.cancel();
        }
        map.len()
    }

    /// The running attempts, sorted.
    pub fn list(&self) -> Vec<AttemptId> {
        let mut list: Vec<AttemptId> = self.lock().keys().copied().collect();
        list.sort();
        list
    }

    /// How many attempts are running.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use hodei_domain::{AttemptNumber, JobId};

    use super::*;

    #[test]
    fn attempts_start_once_cancel_lose_and_finish() {
        let running = Running::default();
        let a = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        let b = AttemptId::new(a.job_id, AttemptNumber::new(2));
        let stoppers = running.start(a).unwrap();
        assert!(running.start(a).is_none());
        let other = running.start(b).unwrap();
        assert_eq!(running.list(), vec![a, b]);
        assert!(running.cancel(&a));
        assert!(stoppers.cancel.is_cancelled());
        assert!(!stoppers.lose.is_cancelled());
        running.finish(&a);
        assert!(!running.cancel(&a));
        assert_eq!(running.len(), 1);
        assert_eq!(running.lose_all(), 1);
        assert!(other.lose.is_cancelled() && !other.cancel.is_cancelled());
        let c = running.start(a).unwrap();
        assert_eq!(running.cancel_all(), 2);
        assert!(c.cancel.is_cancelled());
    }
}
