//! Waiting on conditions with a deadline, and picking free ports.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use tokio::time::Instant;

use crate::TestSupportError;

/// How often [`wait_for`] polls its condition.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `f` every 20 ms until it returns `Some(value)`, and returns that value.
///
/// Fails with [`TestSupportError::Timeout`] (naming `what`) once `deadline` has
/// passed, including when a single call of `f` is still running at the
/// deadline. This waits on a condition; it is not a sleep for synchronisation.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut f: F,
) -> Result<T, TestSupportError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let until = start
        .checked_add(deadline)
        .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600));
    let timeout = || TestSupportError::Timeout {
        what: what.to_owned(),
    };
    loop {
        match tokio::time::timeout_at(until, f()).await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(_) => return Err(timeout()),
        }
        let now = Instant::now();
        if now >= until {
            return Err(timeout());
        }
        tokio::time::sleep(POLL_INTERVAL.min(until - now)).await;
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is not reserved: another process may take it before the caller
/// binds it, so callers that start servers should retry on a bind failure.
pub fn free_port() -> Result<u16, TestSupportError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(TestSupportError::io("binding a free port on 127.0.0.1"))?;
    let addr = listener
        .local_addr()
        .map_err(TestSupportError::io("reading the address of a bound port"))?;
    Ok(addr.port())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn wait_for_returns_the_value_once_the_condition_holds() {
        let calls = Arc::new(AtomicU32::new(0));
        let value = wait_for("three calls", Duration::from_secs(5), || {
            let calls = Arc::clone(&calls);
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                (n >= 3).then_some(n)
            }
        })
        .await;
        assert!(matches!(value, Ok(3)), "{value:?}");
    }

    #[tokio::test]
    async fn wait_for_times_out_naming_what_it_waited_for() {
        let started = Instant::now();
        let result: Result<(), _> =
            wait_for("the impossible", Duration::from_millis(100), || async {
                None
            })
            .await;
        match result {
            Err(TestSupportError::Timeout { what }) => assert_eq!(what, "the impossible"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn wait_for_does_not_outlive_its_deadline_when_the_condition_hangs() {
        let started = Instant::now();
        let result: Result<(), _> = wait_for("a hung call", Duration::from_millis(100), || {
            std::future::pending::<Option<()>>()
        })
        .await;
        assert!(matches!(result, Err(TestSupportError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn free_port_gives_a_bindable_port() -> Result<(), Box<dyn std::error::Error>> {
        let port = free_port()?;
        assert_ne!(port, 0);
        let _listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        Ok(())
    }
}
