//! Capped exponential backoff with full jitter, for loops that retry a dependency (the outbox
//! relay, placement NAKs): the wait after attempt `n` is uniform in
//! `[0, min(max_delay, initial * 2^(n-1))]`, so that many callers failing together do not come
//! back together.

use std::time::Duration;

/// How a retry loop spaces and bounds its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (0 behaves as 1).
    pub max_attempts: u32,
    /// Upper bound of the wait after the first failed attempt.
    pub initial: Duration,
    /// Upper bound of any single wait.
    pub max_delay: Duration,
    /// Time limit of each attempt; an attempt that exceeds it is dropped and counts as a
    /// breaker failure.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts, waits of at most 100 ms then 200 ms (never more than 2 s), 5 s per attempt.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The largest wait after failed attempt `attempt` (1-based; 0 behaves as 1):
    /// `min(max_delay, initial * 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1);
        1u32.checked_shl(doublings)
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max_delay, |delay| delay.min(self.max_delay))
    }

    /// The wait after failed attempt `attempt` for a `jitter` drawn uniformly from
    /// `[0, 1]` (clamped to it; NaN counts as 0): `ceiling(attempt) * jitter`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let ceiling = self.ceiling(attempt);
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * jitter)
            .map_or(ceiling, |delay| delay.min(ceiling))
    }
}

/// A number drawn uniformly from `[0, 1)`, from the 48 leading bits of a random v4 UUID
/// (all random; the version and variant bits come later).
pub fn random_unit() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() >> 80;
    // Exact: 48-bit integers and their quotient by 2^48 are representable in an f64.
    bits as f64 / (1u64 << 48) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial: ms(100),
            max_delay: ms(1_000),
            attempt_timeout: ms(300),
        }
    }

    #[test]
    fn the_ceiling_doubles_from_initial_up_to_max_delay() {
        let p = policy(10);
        let ceilings: Vec<_> = (1..=6).map(|n| p.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [ms(100), ms(200), ms(400), ms(800), ms(1_000), ms(1_000)]
        );
        assert_eq!(p.ceiling(0), ms(100));
        assert_eq!(p.ceiling(u32::MAX), ms(1_000));
    }

    #[test]
    fn the_delay_is_the_ceiling_scaled_by_the_clamped_jitter() {
        let p = policy(10);
        assert_eq!(p.delay(3, 0.5), ms(200));
        assert_eq!(p.delay(3, 1.0), ms(400));
        assert_eq!(p.delay(3, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, 7.0), ms(400));
        assert_eq!(p.delay(3, -1.0), Duration::ZERO);
        assert_eq!(p.delay(3, f64::NAN), Duration::ZERO);
        let huge = RetryPolicy {
            initial: Duration::MAX,
            max_delay: Duration::MAX,
            ..p
        };
        assert!(huge.delay(64, 1.0) <= Duration::MAX);
    }

    #[test]
    fn random_jitter_lies_in_the_unit_interval() {
        let draws: Vec<f64> = (0..1_000).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|j| (0.0..1.0).contains(j)));
        // Not constant: full jitter spreads callers out.
        assert!(draws.iter().any(|j| *j < 0.5) && draws.iter().any(|j| *j >= 0.5));
    }

    #[test]
    fn default_policy_matches_the_documented_values() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 3);
        assert_eq!((p.ceiling(1), p.ceiling(2)), (ms(100), ms(200)));
        assert_eq!(p.max_delay, Duration::from_secs(2));
        assert_eq!(p.attempt_timeout, Duration::from_secs(5));
    }
}
