//! The attempts running on this agent, each with the token that cancels it. Shared by the
//! command loop (which adds and cancels), the attempts (which remove themselves when done)
//! and the heartbeats (which list them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hodei_domain::AttemptId;
use tokio_util::sync::CancellationToken;

/// The running attempts; cheap to clone, every clone sees the same set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Running(Arc<Mutex<HashMap<AttemptId, CancellationToken>>>);

impl Running {
    fn lock(&self) -> MutexGuard<'_, HashMap<AttemptId, CancellationToken>> {
        // Nothing panics while holding the lock, and the map stays consistent if it did.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `attempt` and returns its cancel token; `None` if it is already running.
    pub fn start(&self, attempt: AttemptId) -> Option<CancellationToken> {
        let mut map = self.lock();
        if map.contains_key(&attempt) {
            return None;
        }
        let token = CancellationToken::new();
        map.insert(attempt, token.clone());
        Some(token)
    }

    /// Removes `attempt` once it is over.
    pub fn finish(&self, attempt: &AttemptId) {
        self.lock().remove(attempt);
    }

    /// Cancels `attempt`; returns whether it was running.
    pub fn cancel(&self, attempt: &AttemptId) -> bool {
        match self.lock().get(attempt) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every running attempt; returns how many there were.
    pub fn cancel_all(&self) -> usize {
        let map = self.lock();
        for token in map.values() {
            token.cancel();
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
    fn attempts_start_once_cancel_and_finish() {
        let running = Running::default();
        let a = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        let b = AttemptId::new(a.job_id, AttemptNumber::new(2));
        let token = running.start(a).unwrap();
        assert!(running.start(a).is_none());
        assert!(running.start(b).is_some());
        assert_eq!(running.list(), vec![a, b]);
        assert!(running.cancel(&a));
        assert!(token.is_cancelled());
        running.finish(&a);
        assert!(!running.cancel(&a));
        assert_eq!(running.len(), 1);
        let c = running.start(a).unwrap();
        assert_eq!(running.cancel_all(), 2);
        assert!(c.is_cancelled());
    }
}
