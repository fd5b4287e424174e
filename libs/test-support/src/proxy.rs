//! A TCP proxy on loopback that a test can cut and heal: a network partition between one
//! process and a server, with both sides still running.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::TestSupportError;

/// Forwards every connection made to [`TcpProxy::addr`] to `upstream`.
///
/// [`TcpProxy::cut`] drops every forwarded connection and closes new ones at once, as a
/// partition does to a client that retries; [`TcpProxy::stall`] keeps every connection open
/// but passes no byte either way, as a partition that drops packets silently does (no reset:
/// each side's writes still succeed until its socket buffers fill); [`TcpProxy::heal`] lets
/// connections through again (a stalled one passes what it held). The proxy stops when
/// dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    stalled: Arc<watch::Sender<bool>>,
    accepting: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<TcpProxy, TestSupportError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(TestSupportError::io("binding the tcp proxy"))?;
        let addr = listener
            .local_addr()
            .map_err(TestSupportError::io("reading the tcp proxy's address"))?;
        let (cut, _) = watch::channel(false);
        let cut = Arc::new(cut);
        let (stalled, _) = watch::channel(false);
        let stalled = Arc::new(stalled);
        let accepting = tokio::spawn(accept(
            listener,
            upstream,
            Arc::clone(&cut),
            Arc::clone(&stalled),
        ));
        Ok(TcpProxy {
            addr,
            cut,
            stalled,
            accepting,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every forwarded connection and refuses new ones until [`TcpProxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Passes no byte either way until [`TcpProxy::heal`], closing nothing.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Forwards connections again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
        self.stalled.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.accepting.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    stalled: Arc<watch::Sender<bool>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            drop(client);
            continue;
        }
        tokio::spawn(forward(
            client,
            upstream,
            cut.subscribe(),
            stalled.subscribe(),
        ));
    }
}

/// Copies both ways, holding the bytes while stalled, until either side closes or the proxy
/// is cut.
async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    stalled: watch::Receiver<bool>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        ended = pump(client_read, server_write, stalled.clone()) => {
            if let Err(err) = ended {
                tracing::debug!(error = %err, "tcp proxy connection ended");
            }
        }
        ended = pump(server_read, client_write, stalled) => {
            if let Err(err) = ended {
                tracing::debug!(error = %err, "tcp proxy connection ended");
            }
        }
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

/// Copies `from` to `to` until `from` ends; reads nothing while stalled, and writes what it
/// read before the stall only once it is over.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let _ = stalled.wait_for(|stalled| !*stalled).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let _ = stalled.wait_for(|stalled| !*stalled).await;
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    /// An echo server; returns its address.
    async fn echo() -> TestResult<SocketAddr> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Ok(addr)
    }

    async fn round_trip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_until_cut_and_again_once_healed() -> TestResult {
        let proxy = TcpProxy::start(echo().await?).await?;
        assert_eq!(round_trip(proxy.addr()).await?, b"ping");

        let mut open = TcpStream::connect(proxy.addr()).await?;
        open.write_all(b"a").await?;
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await?;
        proxy.cut();
        // The open connection is dropped: the next read sees its end, not an echo.
        let read = tokio::time::timeout(Duration::from_secs(5), open.read(&mut one)).await?;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(round_trip(proxy.addr()).await.is_err());

        proxy.heal();
        assert_eq!(round_trip(proxy.addr()).await?, b"ping");
        Ok(())
    }

    #[tokio::test]
    async fn a_stalled_connection_stays_open_passes_nothing_then_everything_once_healed()
    -> TestResult {
        let proxy = TcpProxy::start(echo().await?).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        proxy.stall();
        // Accepted by the socket, as a silent partition lets a writer believe.
        open.write_all(b"held").await?;
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_millis(300), open.read(&mut buf)).await;
        assert!(read.is_err(), "nothing passes while stalled: {read:?}");

        proxy.heal();
        tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut buf)).await??;
        assert_eq!(&buf, b"held");
        Ok(())
    }
}
