//! Accepted connections, bounded: at most `--max-connections` open at once
//! (one beyond it is closed at once, before it costs more than its
//! descriptor for a moment), and each must send its first bytes within
//! `--handshake-timeout` or be closed. Idle sockets that never send a byte
//! can then never hold the process's descriptors, and a server under a
//! 1,024-descriptor limit keeps serving new clients.
//!
//! [`incoming`] is the stream `startup` hands to tonic. TLS, when added, wraps
//! each [`Guarded`] connection: its handshake runs inside the connection's
//! slot and after the first-bytes timer started (the timer is cancelled by
//! the first read that returns bytes, a ClientHello included).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// How accepted connections are bounded and set up.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// TCP keepalive on accepted sockets.
    pub tcp_keepalive: Duration,
}

/// Raises this process's soft descriptor limit to its hard limit, so that
/// `--max-connections` is not cut short by a low default (1,024 on most
/// systems). Returns the (soft, hard) limit now in force.
pub fn raise_descriptor_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::increase_nofile_limit(hard)?;
    }
    rlimit::Resource::NOFILE.get()
}

/// The accept loop: yields each connection that got a slot, set up
/// (TCP_NODELAY, keepalive) and guarded by its first-bytes deadline. Accept
/// errors (EMFILE and the like) are logged and retried after a short pause,
/// never passed on: they must not end the server.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refused = Arc::new(AtomicU64::new(0));
    futures::stream::unfold(
        (listener, slots, refused),
        move |(listener, slots, refused)| async move {
            let mut failures = 0u64;
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Logged on the 1st, 2nd, 4th, ... in a row: EMFILE
                        // repeats every pause until a descriptor frees.
                        failures += 1;
                        if failures.is_power_of_two() {
                            tracing::warn!(%error, failures, "accept failed, pausing");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Closed at once: a full server must not let the backlog
                    // (and so its descriptors) fill up.
                    drop(stream);
                    let n = refused.fetch_add(1, Ordering::Relaxed);
                    if (n + 1).is_power_of_two() {
                        tracing::warn!(
                            %peer,
                            refused = n + 1,
                            max_connections = limits.max_connections,
                            "connection limit reached, closing new connections"
                        );
                    }
                    continue;
                };
                setup(&stream, peer, limits.tcp_keepalive);
                let guarded = Guarded::new(stream, permit, limits.handshake_timeout);
                return Some((Ok(guarded), (listener, slots, refused)));
            }
        },
    )
}

fn setup(stream: &TcpStream, peer: SocketAddr, keepalive: Duration) {
    // Without TCP_NODELAY, Nagle holds a response's last frame until the
    // client's delayed ACK.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(keepalive);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%peer, %error, "cannot set TCP keepalive");
    }
}

/// A connection holding its slot (freed when it closes) and, until its first
/// bytes arrive, a deadline: a read past it fails with `TimedOut`, which
/// ends the connection.
pub struct Guarded<IO> {
    io: IO,
    deadline: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Guarded<IO> {
    pub fn new(io: IO, slot: OwnedSemaphorePermit, first_bytes_within: Duration) -> Self {
        Guarded {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(
                Instant::now() + first_bytes_within,
            ))),
            _slot: slot,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no bytes within the handshake timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_connections: usize, handshake_timeout: Duration) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            handshake_timeout,
            tcp_keepalive: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_a_talking_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener, limits(8, Duration::from_millis(200))));

        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut silent_side = accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 4];
        let err = silent_side.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let mut talking = TcpStream::connect(addr).await.unwrap();
        let mut talking_side = accepted.next().await.unwrap().unwrap();
        talking.write_all(b"hi").await.unwrap();
        assert_eq!(talking_side.read(&mut buf).await.unwrap(), 2);
        // Past the deadline, a quiet moment is no longer a reason to close.
        let quiet = tokio::time::timeout(Duration::from_millis(400), talking_side.read(&mut buf));
        assert!(quiet.await.is_err(), "still waiting for data, not closed");
    }

    #[tokio::test]
    async fn beyond_the_cap_a_connection_is_closed_at_once_until_a_slot_frees() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener, limits(1, Duration::from_secs(10))));
        let _first = TcpStream::connect(addr).await.unwrap();
        let held = accepted.next().await.unwrap().unwrap();

        let mut second = TcpStream::connect(addr).await.unwrap();
        let next = tokio::spawn(async move { accepted.next().await.map(|c| c.is_ok()) });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed by the server: {read:?}"
        );

        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), next).await;
        assert_eq!(got.unwrap().unwrap(), Some(true), "a freed slot is used");
    }
}
