//! Streams of an aggregate's events (WatchJob, WatchPipelineRun): the history from a sequence
//! number read from PostgreSQL, then live, until the aggregate ends. PostgreSQL is the truth:
//! the NATS subscription only says when to read again (and a poll catches a lost wake-up).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use hodei_storage::StorageError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::errors::ApiError;

/// How long a stream waits for news before reading PostgreSQL again.
pub(crate) const STREAM_POLL: Duration = Duration::from_secs(1);

/// What one stored event becomes on the stream.
pub(crate) struct Streamed<W> {
    pub wire: W,
    /// The event's sequence number: the next read starts after it.
    pub seq: u64,
    /// Whether the aggregate ended with it: the stream closes after sending it.
    pub last: bool,
}

/// Streams events read by `read(next_seq)` from `from_seq` on, each turned into wire form by
/// `convert`, waking on `live` (subscribed before this is called, so nothing falls between
/// history and live), until the aggregate ends, the client leaves or `shutdown`.
pub(crate) fn spawn<E, W, R, Fut>(
    mut live: async_nats::Subscriber,
    shutdown: CancellationToken,
    from_seq: u64,
    mut read: R,
    mut convert: impl FnMut(&E) -> Streamed<W> + Send + 'static,
) -> ReceiverStream<Result<W, Status>>
where
    E: Send + Sync + 'static,
    W: Send + 'static,
    R: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<E>, StorageError>> + Send,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut next = from_seq.max(1);
        loop {
            let events = match read(next).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(ApiError::from(e).into())).await;
                    return;
                }
            };
            for event in &events {
                let Streamed { wire, seq, last } = convert(event);
                next = seq + 1;
                if tx.send(Ok(wire)).await.is_err() || last {
                    return;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                _ = live.next() => {}
                () = tokio::time::sleep(STREAM_POLL) => {}
            }
        }
    });
    ReceiverStream::new(rx)
}
