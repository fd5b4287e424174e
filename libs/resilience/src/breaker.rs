//! The circuit breaker: stops calling a dependency that keeps failing, then lets a few
//! probe calls through once `open_for` has passed to find out whether it is back.
//!
//! Every state change bumps a generation number. A call remembers the generation it was
//! admitted in and its outcome is only recorded if the breaker is still in that
//! generation: a slow call started before the circuit opened cannot close it again, and
//! a late half-open probe cannot override the one that already decided.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::BreakerError;

/// Upper bound for how far ahead an open circuit schedules its half-open transition, so
/// that an absurd `open_for` cannot overflow the clock.
const MAX_OPEN_FOR: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit (0 behaves as 1).
    pub failure_threshold: u32,
    /// How long the circuit stays open before admitting probe calls.
    pub open_for: Duration,
    /// How many calls may run at once while half-open (0 behaves as 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// 5 consecutive failures open the circuit for 1 s, then 1 probe call decides: a probe a
    /// second costs the backend nothing, and work resumes within a second of its return.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
            half_open_probes: 1,
        }
    }
}

/// Where a [`CircuitBreaker`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls run; consecutive failures are counted.
    Closed,
    /// Calls are refused without running until `until`.
    Open {
        /// When the circuit becomes half-open.
        until: Instant,
    },
    /// A limited number of probe calls run; the first outcome closes or re-opens it.
    HalfOpen,
}

/// Whether a finished call tells the breaker the dependency is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// Consecutive failures since the last success.
    failures: u32,
    /// Probe calls admitted in the current half-open generation and not yet finished.
    probes_in_flight: u32,
    /// Bumped on every state change.
    generation: u64,
}

/// A circuit breaker guarding one outside dependency. Clones share the same state, so
/// create one per dependency and hand clones to every caller.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    name: &'static str,
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
}

impl CircuitBreaker {
    /// Creates a closed breaker; `name` identifies the dependency in logs and errors.
    pub fn new(name: &'static str, config: BreakerConfig) -> Self {
        Self {
            name,
            config,
            inner: Arc::new(Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                probes_in_flight: 0,
                generation: 0,
            })),
        }
    }

    /// The dependency name given to [`CircuitBreaker::new`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The settings given to [`CircuitBreaker::new`].
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The current state; an open circuit whose time is up reports (and becomes) half-open.
    pub fn state(&self) -> BreakerState {
        let now = Instant::now();
        let mut inner = self.lock();
        self.refresh(&mut inner, now);
        inner.state
    }

    /// Runs `op` unless the circuit is open, counting every error as a failure.
    ///
    /// See [`CircuitBreaker::call_filtered`] for the rules.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.guarded(None, |_: &E| true, op).await
    }

    /// Runs `op` unless the circuit is open, in which case it returns
    /// [`BreakerError::Open`] without running it.
    ///
    /// Only errors for which `is_failure` is true (connection lost, server unavailable)
    /// count as failures. Any other error (not found, constraint violated) proves that
    /// the dependency answered, so it counts as a success just like `Ok`. A success
    /// resets the failure count, and while half-open closes the circuit; a failure while
    /// half-open re-opens it.
    pub async fn call_filtered<T, E, F, Fut>(
        &self,
        is_failure: impl Fn(&E) -> bool,
        op: F,
    ) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.guarded(None, is_failure, op).await
    }

    /// Like [`CircuitBreaker::call_filtered`], but gives up on `op` after `after` and
    /// returns [`BreakerError::Timeout`], which always counts as a failure.
    pub async fn call_with_timeout<T, E, F, Fut>(
        &self,
        after: Duration,
        is_failure: impl Fn(&E) -> bool,
        op: F,
    ) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.guarded(Some(after), is_failure, op).await
    }

    async fn guarded<T, E, F, Fut>(
        &self,
        limit: Option<Duration>,
        is_failure: impl Fn(&E) -> bool,
        op: F,
    ) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.admit().map_err(|retry_in| BreakerError::Open {
            name: self.name,
            retry_in,
        })?;
        let finished = match limit {
            None => op().await,
            Some(after) => match tokio::time::timeout(after, op()).await {
                Ok(finished) => finished,
                Err(_elapsed) => {
                    permit.settle(Outcome::Failure);
                    return Err(BreakerError::Timeout {
                        name: self.name,
                        after,
                    });
                }
            },
        };
        match finished {
            Ok(value) => {
                permit.settle(Outcome::Success);
                Ok(value)
            }
            Err(e) => {
                let outcome = if is_failure(&e) {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                permit.settle(outcome);
                Err(BreakerError::Inner(e))
            }
        }
    }

    /// Lets a call in, or says how long until calls are let in again.
    fn admit(&self) -> Result<Permit<'_>, Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.refresh(&mut inner, now);
        let probe = match inner.state {
            BreakerState::Closed => false,
            BreakerState::Open { until } => return Err(until.saturating_duration_since(now)),
            BreakerState::HalfOpen => {
                if inner.probes_in_flight >= self.config.half_open_probes.max(1) {
                    // The probes in flight decide when calls are let in again.
                    return Err(Duration::ZERO);
                }
                inner.probes_in_flight += 1;
                true
            }
        };
        Ok(Permit {
            breaker: self,
            generation: inner.generation,
            probe,
            settled: false,
        })
    }

    /// Records the outcome of a call admitted in `generation`.
    fn record(&self, generation: u64, probe: bool, outcome: Option<Outcome>) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if probe {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
        match (outcome, inner.state) {
            (None, _) | (Some(_), BreakerState::Open { .. }) => {}
            (Some(Outcome::Success), BreakerState::Closed) => inner.failures = 0,
            (Some(Outcome::Success), BreakerState::HalfOpen) => {
                inner.failures = 0;
                self.transition(&mut inner, BreakerState::Closed);
                info!(breaker = self.name, "circuit closed");
            }
            (Some(Outcome::Failure), state) => {
                inner.failures = inner.failures.saturating_add(1);
                let half_open = state == BreakerState::HalfOpen;
                if half_open || inner.failures >= self.config.failure_threshold.max(1) {
                    let now = Instant::now();
                    let open_for = self.config.open_for.min(MAX_OPEN_FOR);
                    let until = now.checked_add(open_for).unwrap_or(now);
                    self.transition(&mut inner, BreakerState::Open { until });
                    warn!(
                        breaker = self.name,
                        failures = inner.failures,
                        open_for = ?open_for,
                        "circuit opened"
                    );
                }
            }
        }
    }

    /// Moves an open circuit whose time is up to half-open.
    fn refresh(&self, inner: &mut Inner, now: Instant) {
        if let BreakerState::Open { until } = inner.state
            && now >= until
        {
            self.transition(inner, BreakerState::HalfOpen);
            info!(breaker = self.name, "circuit half-open");
        }
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        inner.state = to;
        inner.generation = inner.generation.wrapping_add(1);
        inner.probes_in_flight = 0;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections cannot panic half-way, so a poisoned lock still holds a
        // consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An admitted call. Settling it records the outcome; dropping it unsettled (the caller's
/// future was cancelled) only frees its half-open probe slot.
struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.breaker
            .record(self.generation, self.probe, Some(outcome));
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.record(self.generation, self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use proptest::prelude::*;
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum TestError {
        /// The dependency is unreachable: counts as a failure.
        Down,
        /// The dependency answered "no such row": does not count.
        NotFound,
    }

    fn is_down(e: &TestError) -> bool {
        *e == TestError::Down
    }

    fn breaker(failure_threshold: u32, open_for_ms: u64, half_open_probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            "postgres",
            BreakerConfig {
                failure_threshold,
                open_for: Duration::from_millis(open_for_ms),
                half_open_probes,
            },
        )
    }

    async fn outcome(
        b: &CircuitBreaker,
        result: Result<(), TestError>,
    ) -> Result<(), BreakerError<TestError>> {
        b.call_filtered(is_down, || async move { result }).await
    }

    async fn fail(b: &CircuitBreaker) {
        let result = outcome(b, Err(TestError::Down)).await;
        assert!(
            matches!(result, Err(BreakerError::Inner(TestError::Down))),
            "{result:?}"
        );
    }

    async fn succeed(b: &CircuitBreaker) {
        let result = outcome(b, Ok(())).await;
        assert!(result.is_ok(), "{result:?}");
    }

    /// Makes a call that counts how often `op` ran; returns the error if any.
    async fn counted_call(
        b: &CircuitBreaker,
        runs: &AtomicU32,
    ) -> Result<(), BreakerError<TestError>> {
        b.call(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .await
    }

    #[test]
    fn default_config_matches_the_documented_values() {
        let config = BreakerConfig::default();
        assert_eq!(config.failure_threshold, 5);
        assert_eq!(config.open_for, Duration::from_secs(1));
        assert_eq!(config.half_open_probes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_failures_and_refuses_without_running() {
        let b = breaker(3, 5_000, 1);
        let start = Instant::now();
        fail(&b).await;
        fail(&b).await;
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b).await;
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: start + Duration::from_secs(5)
            }
        );

        let runs = AtomicU32::new(0);
        let refused = counted_call(&b, &runs).await;
        assert!(
            matches!(refused, Err(BreakerError::Open { name: "postgres", retry_in }) if retry_in == Duration::from_secs(5)),
            "{refused:?}"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let refused = counted_call(&b, &runs).await;
        assert!(
            matches!(refused, Err(BreakerError::Open { retry_in, .. }) if retry_in == Duration::from_secs(3)),
            "{refused:?}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "op ran while the circuit was open"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn becomes_half_open_after_open_for_and_a_probe_success_closes_it() {
        let b = breaker(2, 1_000, 1);
        fail(&b).await;
        fail(&b).await;
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);

        succeed(&b).await;
        assert_eq!(b.state(), BreakerState::Closed);
        // The failure count starts afresh: one failure does not re-open it.
        fail(&b).await;
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_failure_reopens_for_another_open_for() {
        let b = breaker(2, 1_000, 1);
        fail(&b).await;
        fail(&b).await;
        tokio::time::advance(Duration::from_millis(1_500)).await;
        fail(&b).await;
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: Instant::now() + Duration::from_millis(1_000)
            }
        );
        let runs = AtomicU32::new(0);
        assert!(counted_call(&b, &runs).await.is_err_and(|e| e.is_open()));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_that_are_not_failures_do_not_count() {
        let b = breaker(2, 1_000, 1);
        for _ in 0..10 {
            let result = outcome(&b, Err(TestError::NotFound)).await;
            assert!(
                matches!(result, Err(BreakerError::Inner(TestError::NotFound))),
                "{result:?}"
            );
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b).await;
        fail(&b).await;
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let b = breaker(3, 1_000, 1);
        fail(&b).await;
        fail(&b).await;
        succeed(&b).await;
        fail(&b).await;
        fail(&b).await;
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b).await;
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn call_counts_every_error() {
        let b = breaker(1, 1_000, 1);
        let result = b.call(|| async { Err::<(), _>(TestError::NotFound) }).await;
        assert!(matches!(
            result,
            Err(BreakerError::Inner(TestError::NotFound))
        ));
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_state() {
        let b = breaker(2, 1_000, 1);
        let other = b.clone();
        fail(&b).await;
        fail(&other).await;
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        let runs = AtomicU32::new(0);
        assert!(
            counted_call(&other, &runs)
                .await
                .is_err_and(|e| e.is_open())
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    /// Sends the result a gated call's op returns.
    type Release = oneshot::Sender<Result<(), TestError>>;
    /// The task running a gated call.
    type GatedCall = tokio::task::JoinHandle<Result<(), BreakerError<TestError>>>;

    /// Starts a call on its own task whose op reports on `started` and then waits for
    /// its result on the returned sender.
    fn spawn_gated_call(b: &CircuitBreaker, started: &mpsc::Sender<()>) -> (Release, GatedCall) {
        let (release, gate) = oneshot::channel::<Result<(), TestError>>();
        let b = b.clone();
        let started = started.clone();
        let handle = tokio::spawn(async move {
            b.call_filtered(is_down, || async move {
                started.send(()).await.unwrap();
                gate.await.unwrap()
            })
            .await
        });
        (release, handle)
    }

    async fn open_then_half_open(b: &CircuitBreaker) {
        for _ in 0..b.config().failure_threshold {
            fail(b).await;
        }
        tokio::time::advance(b.config().open_for).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_at_most_the_configured_number_of_probes() {
        let b = breaker(1, 1_000, 2);
        open_then_half_open(&b).await;

        let (started, mut started_rx) = mpsc::channel(4);
        let (release_a, probe_a) = spawn_gated_call(&b, &started);
        let (release_b, probe_b) = spawn_gated_call(&b, &started);
        started_rx.recv().await.unwrap();
        started_rx.recv().await.unwrap();

        // Both slots are taken: a third call is refused without running.
        let runs = AtomicU32::new(0);
        let refused = counted_call(&b, &runs).await;
        assert!(
            matches!(
                refused,
                Err(BreakerError::Open {
                    retry_in: Duration::ZERO,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);

        // The first probe to finish decides: it failed, so the circuit re-opens.
        release_a.send(Err(TestError::Down)).unwrap();
        assert!(matches!(
            probe_a.await.unwrap(),
            Err(BreakerError::Inner(TestError::Down))
        ));
        let reopened = b.state();
        assert!(matches!(reopened, BreakerState::Open { .. }));

        // The late success of the other probe belongs to an older generation: ignored.
        release_b.send(Ok(())).unwrap();
        assert!(probe_b.await.unwrap().is_ok());
        assert_eq!(b.state(), reopened);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_from_before_the_circuit_opened_does_not_close_it() {
        let b = breaker(1, 1_000, 1);
        let (started, mut started_rx) = mpsc::channel(1);
        let (release, slow) = spawn_gated_call(&b, &started);
        started_rx.recv().await.unwrap();
        fail(&b).await;
        let opened = b.state();
        assert!(matches!(opened, BreakerState::Open { .. }));

        release.send(Ok(())).unwrap();
        assert!(slow.await.unwrap().is_ok());
        assert_eq!(b.state(), opened);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot() {
        let b = breaker(1, 1_000, 1);
        open_then_half_open(&b).await;

        let (started, mut started_rx) = mpsc::channel(1);
        let (_release, probe) = spawn_gated_call(&b, &started);
        started_rx.recv().await.unwrap();
        let runs = AtomicU32::new(0);
        assert!(counted_call(&b, &runs).await.is_err_and(|e| e.is_open()));

        probe.abort();
        assert!(probe.await.unwrap_err().is_cancelled());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(counted_call(&b, &runs).await.is_ok());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_reported_and_counts_as_a_failure() {
        let b = breaker(1, 1_000, 1);
        let start = Instant::now();
        let result = b
            .call_with_timeout(Duration::from_millis(250), is_down, || {
                std::future::pending::<Result<(), TestError>>()
            })
            .await;
        assert!(
            matches!(result, Err(BreakerError::Timeout { name: "postgres", after }) if after == Duration::from_millis(250)),
            "{result:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_finishing_in_time_is_not_a_timeout() {
        let b = breaker(1, 1_000, 1);
        let result = b
            .call_with_timeout(Duration::from_millis(250), is_down, || async {
                tokio::time::sleep(Duration::from_millis(249)).await;
                Ok::<_, TestError>(7)
            })
            .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn errors_display_lowercase_messages() {
        let open: BreakerError<std::io::Error> = BreakerError::Open {
            name: "nats",
            retry_in: Duration::from_secs(2),
        };
        assert_eq!(
            open.to_string(),
            "nats is unavailable (circuit open), retry in 2s"
        );
        let timeout: BreakerError<std::io::Error> = BreakerError::Timeout {
            name: "nats",
            after: Duration::from_millis(500),
        };
        assert_eq!(timeout.to_string(), "nats did not answer within 500ms");
        let inner = BreakerError::Inner(std::io::Error::other("connection refused"));
        assert_eq!(inner.to_string(), "connection refused");
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Advance(u64),
        /// While open, moves the clock to this many microseconds around the reopen
        /// instant, where off-by-one mistakes would show.
        AdvanceNearUntil(i64),
        Call(Result<(), TestError>),
        /// A call that never answers, cut off by a 50 ms timeout.
        Hang,
    }

    /// The expected behaviour, written independently of the implementation.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Model {
        Closed(u32),
        Open(Instant),
        HalfOpen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..1_500).prop_map(Step::Advance),
            (-2_000i64..2_000).prop_map(Step::AdvanceNearUntil),
            Just(Step::Call(Ok(()))),
            Just(Step::Call(Err(TestError::Down))),
            Just(Step::Call(Err(TestError::NotFound))),
            Just(Step::Hang),
        ]
    }

    proptest! {
        #[test]
        fn no_call_runs_while_open_and_the_state_follows_the_model(
            threshold in 1u32..5,
            open_for_ms in 1u64..1_000,
            steps in proptest::collection::vec(step(), 0..80),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let b = breaker(threshold, open_for_ms, 1);
                let open_for = Duration::from_millis(open_for_ms);
                let mut model = Model::Closed(0);
                for step in steps {
                    if let Model::Open(until) = model
                        && Instant::now() >= until
                    {
                        model = Model::HalfOpen;
                    }
                    let failed = match step {
                        Step::Advance(ms) => {
                            tokio::time::advance(Duration::from_millis(ms)).await;
                            continue;
                        }
                        Step::AdvanceNearUntil(micros) => {
                            if let Model::Open(until) = model {
                                let offset = Duration::from_micros(micros.unsigned_abs());
                                let target = if micros < 0 { until - offset } else { until + offset };
                                let now = Instant::now();
                                if target > now {
                                    tokio::time::advance(target - now).await;
                                }
                            }
                            continue;
                        }
                        Step::Call(result) => {
                            let ran = AtomicU32::new(0);
                            let got = b
                                .call_filtered(is_down, || async {
                                    ran.fetch_add(1, Ordering::SeqCst);
                                    result
                                })
                                .await;
                            if let Model::Open(until) = model {
                                assert_eq!(ran.load(Ordering::SeqCst), 0, "op ran while open");
                                let retry_in = until - Instant::now();
                                assert!(
                                    matches!(got, Err(BreakerError::Open { retry_in: r, .. }) if r == retry_in),
                                    "{got:?}"
                                );
                                continue;
                            }
                            assert_eq!(ran.load(Ordering::SeqCst), 1);
                            assert_eq!(got.err().and_then(BreakerError::into_inner), result.err());
                            result == Err(TestError::Down)
                        }
                        Step::Hang => {
                            let got = b
                                .call_with_timeout(Duration::from_millis(50), is_down, || {
                                    std::future::pending::<Result<(), TestError>>()
                                })
                                .await;
                            if matches!(model, Model::Open(_)) {
                                assert!(got.is_err_and(|e| e.is_open()));
                                continue;
                            }
                            assert!(got.is_err_and(|e| e.is_timeout()));
                            true
                        }
                    };
                    let opened = Model::Open(Instant::now() + open_for);
                    model = match (model, failed) {
                        (_, false) => Model::Closed(0),
                        (Model::Closed(n), true) if n + 1 < threshold => Model::Closed(n + 1),
                        (_, true) => opened,
                    };
                    let expected = match model {
                        Model::Closed(_) => BreakerState::Closed,
                        Model::Open(until) => BreakerState::Open { until },
                        Model::HalfOpen => BreakerState::HalfOpen,
                    };
                    assert_eq!(b.state(), expected);
                }
            });
        }
    }
}
