//! The TCP data path: one pick per client connection through the same plugin
//! (`RequestInfo` protocol TCP, client IP set), a connect that fails over to other backends,
//! then bytes copied both ways until both sides are done (a half-close is passed on) or the
//! connection is silent for the idle timeout. The backend's in-flight guard lives as long as
//! the connection. With `proxy_protocol`, the backend first gets a PROXY header naming the
//! client.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::access_log;
use super::proxy_header;
use super::tunnel::{Relayed, relay};
use super::worker::{LocalListener, Tried};
use crate::config::{HashKey, ProxyProtocol};
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
                log(&local, peer, start, 503, None, 0, Relayed::default());
                return;
            }
            Err(_) => break,
        };
        let Some(backend) = view.snapshot.backend(index) else {
            break;
        };
        tried.push(index);
        let mut guard = InFlight::start(backend.clone());
        let connect = connect(backend.addr, settings.proxy_protocol, &client, peer);
        let error = match tokio::time::timeout(settings.timeouts.connect, connect).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                guard.answered(true, Instant::now(), passive);
                local
                    .metrics
                    .record(shared.index, Some(backend.addr), TCP_OK, start.elapsed());
                let mut relayed = Relayed::default();
                let idle = settings.timeouts.idle;
                if let Err(error) = relay(client, upstream, idle, &mut relayed).await {
                    tracing::debug!(%peer, %error, "tcp relay ended with an error");
                }
                drop(guard);
                let tries = tried.as_slice().len();
                log(&local, peer, start, 200, Some(backend.addr), tries, relayed);
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
    let tries = tried.as_slice().len();
    log(&local, peer, start, 502, failed, tries, Relayed::default());
}

/// Connects to `backend`; with `proxy`, sends the PROXY header for `client` (from `peer`)
/// first, which counts as part of connecting: a backend that takes no bytes is tried like
/// one that takes no connection.
async fn connect(
    backend: SocketAddr,
    proxy: Option<ProxyProtocol>,
    client: &TcpStream,
    peer: SocketAddr,
) -> std::io::Result<TcpStream> {
    let mut upstream = TcpStream::connect(backend).await?;
    if let Some(version) = proxy {
        let mut header = Vec::with_capacity(64);
        proxy_header::encode(version, peer, client.local_addr()?, &mut header);
        upstream.write_all(&header).await?;
    }
    Ok(upstream)
}

/// The connection's access-log line, if the listener keeps one.
fn log(
    local: &LocalListener,
    peer: SocketAddr,
    start: Instant,
    status: u16,
    backend: Option<SocketAddr>,
    tries: usize,
    relayed: Relayed,
) {
    if local.log.enabled() {
        // The client is the relay's first side.
        let bytes = (relayed.from_b, relayed.from_a);
        access_log::tcp_line(&local.log, peer.ip(), start, status, backend, tries, bytes);
    }
}
