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

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, chosen at random outside the
/// kernel's range of ephemeral ports.
///
/// The port is not reserved: another test may take it before the caller binds it, so callers
/// that start servers should retry on a bind failure. Outside the ephemeral range, at least no
/// outgoing connection (the suite makes thousands, to PostgreSQL and NATS) gets the port as its
/// local one, which a port from `bind(0)` allows between this call and the server's bind, or
/// while a server that keeps its port across a restart is down.
pub fn free_port() -> Result<u16, TestSupportError> {
    let (below, above) = candidate_ports();
    let (below_count, above_count) = (below.len() as u128, above.len() as u128);
    if below_count + above_count > 0 {
        for _ in 0..PORT_TRIES {
            let pick = uuid::Uuid::new_v4().as_u128() % (below_count + above_count);
            let port = if pick < below_count {
                u128::from(below.start) + pick
            } else {
                u128::from(above.start) + pick - below_count
            };
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(TestSupportError::io("binding a free port on 127.0.0.1"))?;
    let addr = listener
        .local_addr()
        .map_err(TestSupportError::io("reading the address of a bound port"))?;
    Ok(addr.port())
}

/// The lowest port [`free_port`] picks: above the ports that well-known services register.
const FIRST_PORT: u16 = 10_000;

/// How many random ports [`free_port`] tries before it asks the kernel for one.
const PORT_TRIES: usize = 64;

/// The ports [`free_port`] picks from: from [`FIRST_PORT`] up to the kernel's ephemeral range,
/// and from its end up; either may be empty.
fn candidate_ports() -> (std::ops::Range<u32>, std::ops::Range<u32>) {
    let (low, high) = ephemeral_ports();
    let first = u32::from(FIRST_PORT);
    let below = first..u32::from(low).max(first);
    let above = (u32::from(high) + 1).max(first)..u32::from(u16::MAX) + 1;
    (below, above)
}

/// The kernel's range of ephemeral ports (Linux's default where it cannot be read).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut ends = range.split_whitespace().map(str::parse::<u16>);
            match (ends.next(), ends.next()) {
                (Some(Ok(low)), Some(Ok(high))) if low <= high => Some((low, high)),
                _ => None,
            }
        })
        .unwrap_or((32_768, 60_999))
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
        let (below, above) = candidate_ports();
        if !below.is_empty() || !above.is_empty() {
            let (low, high) = ephemeral_ports();
            assert!(
                below.contains(&u32::from(port)) || above.contains(&u32::from(port)),
                "{port} is not above {FIRST_PORT} and outside the ephemeral range {low}-{high}"
            );
        }
        let _listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        Ok(())
    }
}
