//! [`ConnPool`]: one worker's keep-alive connections to the backends, on hyper's low-level
//! `client::conn::http1` (not hyper-util's legacy `Client`, whose pool is one global
//! mutex). Owned by a single thread, so a checkout is a `RefCell` borrow.
//!
//! A connection goes back to the pool only when its response body ended cleanly; one whose
//! exchange failed or was abandoned is dropped (hyper closes it).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ReqBody;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed (backends close theirs eventually too;
/// reusing one just as it closes costs a retry).
const IDLE_TTL: Duration = Duration::from_secs(30);

/// One worker's idle connections, by backend id.
#[derive(Default)]
pub(crate) struct ConnPool {
    idle: RefCell<HashMap<u32, Vec<Idle>>>,
}

struct Idle {
    sender: SendRequest<ReqBody>,
    since: Instant,
}

/// A connection ready for one request.
pub(crate) struct Conn {
    /// Send the request here.
    pub(crate) sender: SendRequest<ReqBody>,
    /// True if it came from the pool (it may have been closed by the backend meanwhile).
    pub(crate) reused: bool,
}

/// A connection on loan for one exchange; [`Checkin::release`] returns it.
pub(crate) struct Checkin {
    pool: Rc<ConnPool>,
    backend: u32,
    sender: SendRequest<ReqBody>,
}

impl Checkin {
    /// Returns the connection to the pool (its exchange ended cleanly).
    pub(crate) fn release(self) {
        self.pool.put(self.backend, self.sender);
    }
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The TCP connect failed (refused, unreachable...).
    Io(std::io::Error),
    /// The TCP connect took longer than the connect timeout.
    Timeout(Duration),
    /// The HTTP/1 handshake failed.
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Timeout(d) => write!(f, "no connection within {d:?}"),
            ConnectError::Handshake(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

impl ConnPool {
    /// A pooled connection to `backend` if one is usable, else a new one.
    pub(crate) async fn get(
        &self,
        backend: u32,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        loop {
            let idle = self.idle.borrow_mut().get_mut(&backend).and_then(Vec::pop);
            let Some(mut idle) = idle else { break };
            if idle.sender.is_closed() {
                continue;
            }
            if idle.sender.is_ready() {
                return Ok(Conn {
                    sender: idle.sender,
                    reused: true,
                });
            }
            // Its connection task has not yet noted the end of the previous exchange:
            // normally one poll away.
            if let Ok(Ok(())) = tokio::time::timeout(connect_timeout, idle.sender.ready()).await {
                return Ok(Conn {
                    sender: idle.sender,
                    reused: true,
                });
            }
        }
        self.connect(addr, connect_timeout).await
    }

    /// A new connection, bypassing the idle ones.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        connect(addr, connect_timeout).await.map(|sender| Conn {
            sender,
            reused: false,
        })
    }

    /// Lends `sender` for one exchange with `backend`.
    pub(crate) fn checkin(self: &Rc<Self>, backend: u32, sender: SendRequest<ReqBody>) -> Checkin {
        Checkin {
            pool: self.clone(),
            backend,
            sender,
        }
    }

    fn put(&self, backend: u32, sender: SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(backend).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops closed and stale idle connections (and the lists of backends that are gone).
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE_TTL);
            !list.is_empty()
        });
    }
}

/// Opens a connection (TCP_NODELAY) and runs its HTTP/1 task on this worker.
async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<SendRequest<ReqBody>, ConnectError> {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::Timeout(connect_timeout)),
    };
    let _ = stream.set_nodelay(true);
    // One buffer, one write per request head (see the server side in `worker`).
    let (sender, conn) = Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::task::spawn_local(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, %error, "backend connection ended with an error");
        }
    });
    Ok(sender)
}
