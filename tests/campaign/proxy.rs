//! A TCP proxy the campaign controls: it passes bytes, cuts (drops every
//! open connection and refuses new ones), stalls (accepts, but holds the
//! bytes of every connection until told otherwise), or adds latency to each
//! chunk it forwards. Its upstream can be switched (a restarted server on a
//! new port, a promoted standby), and it can be left with none (refusing).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// What the proxy does to the bytes of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forward at once.
    Pass,
    /// Accept and read, but forward nothing until the mode changes.
    Stall,
    /// Forward each chunk this much later (each direction).
    Latency(Duration),
}

struct State {
    /// Where new connections go; `None` refuses them (a cut).
    upstream: Mutex<Option<SocketAddr>>,
    /// The upstream to go back to when a cut ends.
    target: Mutex<SocketAddr>,
    link: watch::Sender<Link>,
    connections: Mutex<Vec<AbortHandle>>,
    /// Connections are dropped once they have sent this many bytes upstream.
    upstream_limit: Mutex<Option<usize>>,
    /// How many connections that limit dropped.
    limited: AtomicUsize,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: Mutex::new(Some(upstream)),
            target: Mutex::new(upstream),
            link: watch::channel(Link::Pass).0,
            connections: Mutex::default(),
            upstream_limit: Mutex::default(),
            limited: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        *self.state.upstream.lock().unwrap() = None;
        self.drop_connections();
    }

    /// Passes bytes again, to the current target.
    pub fn restore(&self) {
        let target = *self.state.target.lock().unwrap();
        *self.state.upstream.lock().unwrap() = Some(target);
        self.state.link.send_replace(Link::Pass);
    }

    pub fn set_link(&self, link: Link) {
        self.state.link.send_replace(link);
    }

    /// New connections go to `upstream` (unless cut); open ones stay where they are.
    pub fn redirect(&self, upstream: SocketAddr) {
        *self.state.target.lock().unwrap() = upstream;
        let mut current = self.state.upstream.lock().unwrap();
        if current.is_some() {
            *current = Some(upstream);
        }
    }

    /// Drops each new connection once it has sent `limit` bytes upstream
    /// (`None`: no limit): a link that fails in the middle of a conversation.
    pub fn limit_upstream(&self, limit: Option<usize>) {
        *self.state.upstream_limit.lock().unwrap() = limit;
    }

    /// How many connections the upstream limit has dropped.
    pub fn limited(&self) -> usize {
        self.state.limited.load(Ordering::SeqCst)
    }

    /// Closes every open connection (as HAProxy's `on-marked-down
    /// shutdown-sessions` does); new ones are still accepted.
    pub fn drop_connections(&self) {
        for connection in self.state.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((client, _)) = listener.accept().await {
        let Some(upstream) = *state.upstream.lock().unwrap() else {
            drop(client);
            continue;
        };
        let link = state.link.subscribe();
        let limit = *state.upstream_limit.lock().unwrap();
        let counted = state.clone();
        let task = tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(client_read, server_write, link.clone(), limit);
            let down = pump(server_read, client_write, link, None);
            tokio::pin!(up, down);
            tokio::select! {
                limited = &mut up => {
                    if limited {
                        // Dropped mid-conversation: both directions go now.
                        counted.limited.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    down.await;
                }
                _ = &mut down => {
                    up.await;
                }
            }
        });
        let mut connections = state.connections.lock().unwrap();
        connections.retain(|c| !c.is_finished());
        connections.push(task.abort_handle());
    }
}

/// Forwards one direction, as the link says, until either side closes or
/// `limit` bytes have gone through (then returns true, without forwarding
/// the chunk that crossed it).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    limit: Option<usize>,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        sent += n;
        if limit.is_some_and(|limit| sent > limit) {
            return true;
        }
        loop {
            let now = *link.borrow_and_update();
            match now {
                Link::Pass => break,
                Link::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Link::Stall => {
                    if link.changed().await.is_err() {
                        return false;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    false
}
