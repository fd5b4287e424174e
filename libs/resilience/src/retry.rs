//! Retrying a call through a [`CircuitBreaker`] with capped exponential backoff and full
//! jitter: the wait after attempt `n` is uniform in `[0, min(max_delay, initial * 2^(n-1))]`,
//! so that many callers failing together do not come back together.

use std::future::Future;
use std::time::Duration;

use tracing::debug;

use crate::{BreakerError, CircuitBreaker};

/// How [`retry`] spaces and bounds its attempts.
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

/// Runs `op` (a fresh future per attempt) through `breaker`, each attempt limited to
/// `policy.attempt_timeout`, retrying after a jittered backoff while attempts remain.
///
/// - `Ok` is returned at once.
/// - An error for which `is_retryable` is false is returned at once. The same predicate
///   tells the breaker what counts as a failure: a retryable error is a transient fault
///   of the dependency, anything else is an answer from it.
/// - A retryable error or a timeout is retried.
/// - When the breaker is open, `retry` waits for it (at least the backoff) if its
///   `retry_in` is no longer than `policy.max_delay`, and otherwise returns the
///   [`BreakerError::Open`] at once. A refused attempt counts towards `max_attempts`.
///
/// After the last attempt its error is returned.
pub async fn retry<T, E, F, Fut>(
    breaker: &CircuitBreaker,
    policy: &RetryPolicy,
    is_retryable: impl Fn(&E) -> bool,
    op: F,
) -> Result<T, BreakerError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_with_jitter(breaker, policy, is_retryable, op, random_unit).await
}

/// [`retry`] with the jitter source injected, so that tests can pin the waits.
async fn retry_with_jitter<T, E, F, Fut>(
    breaker: &CircuitBreaker,
    policy: &RetryPolicy,
    is_retryable: impl Fn(&E) -> bool,
    mut op: F,
    mut jitter: impl FnMut() -> f64,
) -> Result<T, BreakerError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let max_attempts = policy.max_attempts.max(1);
    let mut attempt: u32 = 1;
    loop {
        let err = match breaker
            .call_with_timeout(policy.attempt_timeout, &is_retryable, &mut op)
            .await
        {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let (reason, wait) = match &err {
            BreakerError::Inner(e) if !is_retryable(e) => return Err(err),
            BreakerError::Inner(_) => ("failed", policy.delay(attempt, jitter())),
            BreakerError::Timeout { .. } => ("timed out", policy.delay(attempt, jitter())),
            BreakerError::Open { retry_in, .. } => {
                if *retry_in > policy.max_delay {
                    return Err(err);
                }
                let wait = (*retry_in).max(policy.delay(attempt, jitter()));
                ("circuit open", wait)
            }
        };
        if attempt >= max_attempts {
            return Err(err);
        }
        debug!(
            breaker = breaker.name(),
            attempt,
            delay = ?wait,
            reason,
            "retrying"
        );
        tokio::time::sleep(wait).await;
        attempt += 1;
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
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::time::Instant;

    use super::*;
    use crate::BreakerConfig;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum TestError {
        Down,
        NotFound,
    }

    fn is_down(e: &TestError) -> bool {
        *e == TestError::Down
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A breaker that never opens, for tests about the retry loop alone.
    fn patient_breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "nats",
            BreakerConfig {
                failure_threshold: u32::MAX,
                ..BreakerConfig::default()
            },
        )
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial: ms(100),
            max_delay: ms(1_000),
            attempt_timeout: ms(300),
        }
    }

    /// An op that fails with `Down` for its first `failures` runs, then returns the run
    /// number; it records the instant of every run.
    struct Flaky {
        failures: u32,
        runs: AtomicU32,
        at: Mutex<Vec<Instant>>,
    }

    impl Flaky {
        fn new(failures: u32) -> Self {
            Self {
                failures,
                runs: AtomicU32::new(0),
                at: Mutex::new(Vec::new()),
            }
        }

        async fn run(&self) -> Result<u32, TestError> {
            self.at.lock().unwrap().push(Instant::now());
            let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            if run <= self.failures {
                Err(TestError::Down)
            } else {
                Ok(run)
            }
        }

        fn runs(&self) -> u32 {
            self.runs.load(Ordering::SeqCst)
        }

        /// The time between consecutive runs.
        fn gaps(&self) -> Vec<Duration> {
            let at = self.at.lock().unwrap();
            at.windows(2).map(|w| w[1] - w[0]).collect()
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

    #[tokio::test(start_paused = true)]
    async fn succeeds_after_transient_failures_with_growing_delays() {
        let b = patient_breaker();
        let flaky = Flaky::new(3);
        let start = Instant::now();
        let result = retry_with_jitter(&b, &policy(5), is_down, || flaky.run(), || 1.0).await;
        assert_eq!(result.unwrap(), 4);
        assert_eq!(flaky.gaps(), [ms(100), ms(200), ms(400)]);
        assert_eq!(start.elapsed(), ms(700));
    }

    #[tokio::test(start_paused = true)]
    async fn random_delays_stay_within_the_policy_bounds() {
        let p = policy(5);
        for _ in 0..20 {
            let flaky = Flaky::new(3);
            let start = Instant::now();
            let result = retry(&patient_breaker(), &p, is_down, || flaky.run()).await;
            assert_eq!(result.unwrap(), 4);
            for (n, gap) in (1..).zip(flaky.gaps()) {
                assert!(gap <= p.ceiling(n), "gap {n} was {gap:?}");
            }
            assert!(start.elapsed() <= p.ceiling(1) + p.ceiling(2) + p.ceiling(3));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_after_max_attempts_with_the_last_error() {
        let b = patient_breaker();
        let flaky = Flaky::new(u32::MAX);
        let start = Instant::now();
        let result = retry_with_jitter(&b, &policy(4), is_down, || flaky.run(), || 1.0).await;
        assert!(
            matches!(result, Err(BreakerError::Inner(TestError::Down))),
            "{result:?}"
        );
        assert_eq!(flaky.runs(), 4);
        // No wait after the last attempt.
        assert_eq!(start.elapsed(), ms(100 + 200 + 400));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_max_attempts_still_makes_one_attempt() {
        let flaky = Flaky::new(u32::MAX);
        let result = retry(&patient_breaker(), &policy(0), is_down, || flaky.run()).await;
        assert!(result.is_err());
        assert_eq!(flaky.runs(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_retryable_error_returns_at_once_and_does_not_trip_the_breaker() {
        let b = CircuitBreaker::new(
            "postgres",
            BreakerConfig {
                failure_threshold: 1,
                ..BreakerConfig::default()
            },
        );
        let runs = AtomicU32::new(0);
        let start = Instant::now();
        let result = retry(&b, &policy(5), is_down, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(TestError::NotFound)
        })
        .await;
        assert!(
            matches!(result, Err(BreakerError::Inner(TestError::NotFound))),
            "{result:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(b.state(), crate::BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_that_time_out_are_retried_then_reported() {
        let b = patient_breaker();
        let runs = AtomicU32::new(0);
        let start = Instant::now();
        let result = retry_with_jitter(
            &b,
            &policy(3),
            is_down,
            || {
                runs.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), TestError>>()
            },
            || 1.0,
        )
        .await;
        assert!(
            matches!(result, Err(BreakerError::Timeout { name: "nats", after }) if after == ms(300)),
            "{result:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(start.elapsed(), ms(3 * 300 + 100 + 200));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_an_open_breaker_when_within_budget() {
        let b = CircuitBreaker::new(
            "postgres",
            BreakerConfig {
                failure_threshold: 2,
                open_for: ms(900),
                half_open_probes: 1,
            },
        );
        let flaky = Flaky::new(2);
        let start = Instant::now();
        let result = retry_with_jitter(&b, &policy(5), is_down, || flaky.run(), || 1.0).await;
        // Run 1 at 0 ms fails; run 2 at 100 ms fails and opens the circuit until
        // 1000 ms; attempt 3 at 300 ms is refused, waits the 700 ms left (more than its
        // 400 ms backoff); attempt 4 at 1000 ms is the half-open probe and succeeds.
        assert_eq!(result.unwrap(), 3);
        assert_eq!(flaky.runs(), 3);
        assert_eq!(start.elapsed(), ms(1_000));
        assert_eq!(b.state(), crate::BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn returns_open_at_once_when_the_breaker_reopens_beyond_max_delay() {
        let b = CircuitBreaker::new(
            "postgres",
            BreakerConfig {
                failure_threshold: 1,
                open_for: Duration::from_secs(10),
                half_open_probes: 1,
            },
        );
        let _ = b.call(|| async { Err::<(), _>(TestError::Down) }).await;
        let flaky = Flaky::new(0);
        let start = Instant::now();
        let result = retry(&b, &policy(5), is_down, || flaky.run()).await;
        assert!(
            matches!(result, Err(BreakerError::Open { name: "postgres", retry_in }) if retry_in == Duration::from_secs(10)),
            "{result:?}"
        );
        assert_eq!(flaky.runs(), 0);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
