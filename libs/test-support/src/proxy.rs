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
/// partition does to a client that retries; [`TcpProxy::heal`] lets connections through
/// again. The proxy stops when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
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
        let accepting = tokio::spawn(accept(listener, upstream, Arc::clone(&cut)));
        Ok(TcpProxy {
            addr,
            cut,
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

    /// Forwards connections again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.accepting.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, cut: Arc<watch::Sender<bool>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            drop(client);
            continue;
        }
        tokio::spawn(forward(client, upstream, cut.subscribe()));
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn forward(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(err) = copied {
                tracing::debug!(error = %err, "tcp proxy connection ended");
            }
        }
        _ = cut.wait_for(|cut| *cut) => {}
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
}
