//! The attempts running on this agent, each with the tokens that stop it: `cancel` (a
//! `Cancel` command: the attempt ends cancelled) and `lose` (the agent's lease expired: the
//! attempt ends lost). Shared by the command loop (which adds and cancels), the attempts
//! (which remove themselves when done), the lease watch (which loses them all) and the
//! heartbeats (which list them). An attempt that ended is remembered for as long as its
//! assignment could still be redelivered, so that it never runs twice here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hodei_domain::AttemptId;
use hodei_messaging::streams::{ACK_WAIT, MAX_DELIVER};
use tokio_util::sync::CancellationToken;

/// What stops one attempt.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stoppers {
    /// Cancelled by a `Cancel` command or a forced stop.
    pub cancel: CancellationToken,
    /// Cancelled when the agent's lease on its work expires.
    pub lose: CancellationToken,
}

/// One running attempt.
#[derive(Debug)]
struct Entry {
    stoppers: Stoppers,
    /// Until its `Finished` report is sent: once the report is stored the scheduler counts
    /// its slot as free and may assign it again, while the attempt still waits for the
    /// report's ack and cleans up (its workspace).
    holds_slot: bool,
}

/// How long an ended attempt is remembered: an assignment whose ack was lost is delivered
/// again every [`ACK_WAIT`], up to [`MAX_DELIVER`] times; and a minute more.
const REMEMBER_ENDED: Duration =
    Duration::from_secs(ACK_WAIT.as_secs() * MAX_DELIVER.unsigned_abs() + 60);

/// The attempts running, and those that ended lately.
#[derive(Debug, Default)]
struct Attempts {
    running: HashMap<AttemptId, Entry>,
    ended: HashSet<AttemptId>,
    /// `ended`, oldest first, with when each ended.
    ended_at: VecDeque<(Instant, AttemptId)>,
    /// Those of `ended` that were cancelled before they came: their assignment, should it
    /// come after its cancel, is reported cancelled.
    cancelled_early: HashSet<AttemptId>,
}

impl Attempts {
    /// Forgets the attempts that ended before `now - REMEMBER_ENDED`.
    fn forget_ended(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.ended_at.front() {
            if now.duration_since(at) < REMEMBER_ENDED {
                break;
            }
            self.ended_at.pop_front();
            self.ended.remove(&id);
            self.cancelled_early.remove(&id);
        }
    }
}

/// The running attempts; cheap to clone, every clone sees the same set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Running(Arc<Mutex<Attempts>>);

impl Running {
    fn lock(&self) -> MutexGuard<'_, Attempts> {
        // Nothing panics while holding the lock, and the map stays consistent if it did.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `attempt` and returns what stops it; `None` if it is already running, or ran
    /// here lately (its assignment delivered again).
    pub fn start(&self, attempt: AttemptId) -> Option<Stoppers> {
        let mut map = self.lock();
        map.forget_ended(Instant::now());
        if map.running.contains_key(&attempt) || map.ended.contains(&attempt) {
            return None;
        }
        let stoppers = Stoppers::default();
        map.running.insert(
            attempt,
            Entry {
                stoppers: stoppers.clone(),
                holds_slot: true,
            },
        );
        Some(stoppers)
    }

    /// `attempt`'s end is being reported: it no longer holds one of the agent's slots,
    /// though it runs (reports, cleans up) until [`Running::finish`].
    pub fn release_slot(&self, attempt: &AttemptId) {
        if let Some(entry) = self.lock().running.get_mut(attempt) {
            entry.holds_slot = false;
        }
    }

    /// How many attempts hold a slot: running, their end not yet being reported.
    pub fn slots_held(&self) -> usize {
        self.lock()
            .running
            .values()
            .filter(|e| e.holds_slot)
            .count()
    }

    /// Removes `attempt` once it is over, remembering that it ran.
    pub fn finish(&self, attempt: &AttemptId) {
        self.finish_at(attempt, Instant::now());
    }

    fn finish_at(&self, attempt: &AttemptId, now: Instant) {
        let mut map = self.lock();
        if map.running.remove(attempt).is_some() && map.ended.insert(*attempt) {
            map.ended_at.push_back((now, *attempt));
        }
        map.forget_ended(now);
    }

    /// Cancels `attempt`; returns whether it was running. One that never came is remembered
    /// as ended, cancelled: a cancel can overtake its assignment (stored later, by a relay
    /// that took over the row, or by a client that held it), which then must not run.
    pub fn cancel(&self, attempt: &AttemptId) -> bool {
        let mut map = self.lock();
        if let Some(entry) = map.running.get(attempt) {
            entry.stoppers.cancel.cancel();
            return true;
        }
        let now = Instant::now();
        map.forget_ended(now);
        if map.ended.insert(*attempt) {
            map.ended_at.push_back((now, *attempt));
            map.cancelled_early.insert(*attempt);
        }
        false
    }

    /// Whether `attempt` was cancelled before its assignment came; says so once (the
    /// assignment delivered again is ignored as ended).
    pub fn take_cancelled_before_start(&self, attempt: &AttemptId) -> bool {
        self.lock().cancelled_early.remove(attempt)
    }

    /// Cancels every running attempt; returns how many there were.
    pub fn cancel_all(&self) -> usize {
        let map = self.lock();
        for entry in map.running.values() {
            entry.stoppers.cancel.cancel();
        }
        map.running.len()
    }

    /// Stops every running attempt as lost (the lease expired); returns how many there were.
    pub fn lose_all(&self) -> usize {
        let map = self.lock();
        for entry in map.running.values() {
            entry.stoppers.lose.cancel();
        }
        map.running.len()
    }

    /// The running attempts, sorted.
    pub fn list(&self) -> Vec<AttemptId> {
        let mut list: Vec<AttemptId> = self.lock().running.keys().copied().collect();
        list.sort();
        list
    }

    /// How many attempts are running.
    pub fn len(&self) -> usize {
        self.lock().running.len()
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
        assert!(running.start(a).is_none(), "ran here lately");
        let c = running
            .start(AttemptId::new(a.job_id, AttemptNumber::new(3)))
            .unwrap();
        assert_eq!(running.cancel_all(), 2);
        assert!(c.cancel.is_cancelled());
    }

    #[test]
    fn an_ended_attempt_is_refused_until_its_assignment_can_no_longer_be_redelivered() {
        let running = Running::default();
        let a = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        let b = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        let t0 = Instant::now();
        running.start(a).unwrap();
        running.finish_at(&a, t0);
        running.start(b).unwrap();
        running.finish_at(&b, t0 + REMEMBER_ENDED / 2);
        assert!(running.start(a).is_none());
        running.lock().forget_ended(t0 + REMEMBER_ENDED);
        assert!(
            running.start(b).is_none(),
            "b ended later: still remembered"
        );
        assert!(running.start(a).is_some(), "a is forgotten");
        assert!(REMEMBER_ENDED >= ACK_WAIT * 10);
    }

    #[test]
    fn a_reported_attempt_gives_its_slot_back_before_it_is_done() {
        let running = Running::default();
        let a = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        let b = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        running.start(a).unwrap();
        running.start(b).unwrap();
        assert_eq!(running.slots_held(), 2);
        running.release_slot(&a);
        assert_eq!((running.slots_held(), running.len()), (1, 2));
        // Still running (cleaning up): listed, cancellable, not started twice.
        assert_eq!(running.list().len(), 2);
        assert!(running.start(a).is_none());
        assert!(running.cancel(&a));
        running.finish(&a);
        assert_eq!((running.slots_held(), running.len()), (1, 1));
    }
}
