//! The TCP data path: one pick per client connection through the same plugin
//! (`RequestInfo` protocol TCP, client IP set), a connect that fails over to other backends,
//! then bytes copied both ways until both sides are done (a half-close is passed on) or the
//! connection is silent for the idle timeout. The backend's in-flight guard lives as long as
//! the connection.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::worker::{LocalListener, Tried};
use crate::config::HashKey;
use crate::metrics::TCP_OK;
use crate::plugin::{Protocol, RequestInfo};
use crate::pool::InFlight;

/// Balances and relays one client connection.
pub(super) async fn serve(local: Rc<LocalListener>, client: TcpStream, peer: SocketAddr) {
    let start = Instant::now();
    let shared = &local.shared;
    let (view, settings) = local.state();
    let hash_key =
        matches!(settings.hash_key, Some(HashKey::ClientIp)).then(|| peer.ip().to_string());
    let mut info = RequestInfo {
        protocol: Protocol::Tcp,
        client_ip: peer.ip(),
        hash_key,
        ..RequestInfo::default()
    };
    local.budget.deposit(settings.retry.budget_percent);
    let passive = settings.passive.consecutive_failures;
    let mut tried = Tried::default();
    let mut failed = None;
    for attempt in 0..settings.retry.attempts.max(1) {
        if attempt > 0 {
            if !local.budget.withdraw() {
                break;
            }
            local.metrics.retry(shared.index);
        }
        info.attempt = attempt;
        let index = match local.choose(&view, &mut info, tried.as_slice()) {
            Ok(i) => i,
            Err(why) if attempt == 0 => {
                tracing::debug!(listener = %shared.name, %peer, cause = %why.message(&local), "connection refused: no backend");
                local
                    .metrics
                    .record(shared.index, None, 503, start.elapsed());
                return;
            }
            Err(_) => break,
        };
        let Some(backend) = view.snapshot.backend(index) else {
            break;
        };
        tried.push(index);
        let mut guard = InFlight::start(backend.clone());
        let error =
            match tokio::time::timeout(settings.timeouts.connect, TcpStream::connect(backend.addr))
                .await
            {
                Ok(Ok(upstream)) => {
                    let _ = upstream.set_nodelay(true);
                    guard.answered(true, Instant::now(), passive);
                    local
                        .metrics
                        .record(shared.index, Some(backend.addr), TCP_OK, start.elapsed());
                    relay(client, upstream, settings.timeouts.idle).await;
                    drop(guard);
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {:?}", settings.timeouts.connect),
            };
        if guard.finish(false, None, passive) {
            shared.eject(backend.clone());
        }
        tracing::debug!(listener = %shared.name, backend = %backend.addr, attempt, %error, "connect failed");
        failed = Some(backend.addr);
    }
    local
        .metrics
        .record(shared.index, failed, 502, start.elapsed());
}

/// Copies both ways until both directions are closed, or nothing moved for `idle`.
async fn relay(client: TcpStream, upstream: TcpStream, idle: Duration) {
    let last = Rc::new(Cell::new(tokio::time::Instant::now()));
    let mut a = Touch {
        io: client,
        last: last.clone(),
    };
    let mut b = Touch {
        io: upstream,
        last: last.clone(),
    };
    let quiet = async {
        loop {
            let due = last.get() + idle;
            if due <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    tokio::select! {
        done = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(error) = done {
                tracing::debug!(%error, "tcp relay ended with an error");
            }
        }
        () = quiet => tracing::debug!("tcp connection idle; closing"),
    }
}

/// A stream that notes when bytes last arrived on it.
struct Touch {
    io: TcpStream,
    last: Rc<Cell<tokio::time::Instant>>,
}

impl AsyncRead for Touch {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.set(tokio::time::Instant::now());
        }
        polled
    }
}

impl AsyncWrite for Touch {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
