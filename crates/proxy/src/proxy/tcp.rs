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
use super::failover::{Attempts, Exhausted};
use super::local::LocalListener;
use super::proxy_header;
use super::sock::ConnectError;
use super::tunnel::{Relayed, relay};
use crate::config::{HashKey, ProxyProtocol};
use crate::metrics::TCP_OK;
use lbwasm_plugin_host::{Protocol, RequestInfo};

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
    // Nothing goes to a backend before it accepted the connection: always replayable.
    let mut attempts = Attempts::new(&local, view, &settings, start, true);
    let mut failed = None;
    loop {
        let mut attempt = match attempts.next(&mut info) {
            Ok(a) => a,
            Err(Exhausted::NoBackend(why)) => {
                tracing::debug!(listener = %shared.name, %peer, cause = %why.message(&local), "connection refused: no backend");
                local
                    .metrics
                    .record(shared.index, None, 503, start.elapsed());
                log(&local, peer, start, 503, None, 0, Relayed::default());
                return;
            }
            Err(Exhausted::Failed) => break,
        };
        let addr = attempt.backend().addr;
        let connect = connect(addr, settings.proxy_protocol, &client, peer);
        let error = match tokio::time::timeout(settings.timeouts.connect, connect).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                attempts.answered(&mut attempt, true, Instant::now());
                local
                    .metrics
                    .record(shared.index, Some(addr), TCP_OK, start.elapsed());
                let mut relayed = Relayed::default();
                let idle = settings.timeouts.idle;
                if let Err(error) = relay(client, upstream, idle, &mut relayed).await {
                    tracing::debug!(%peer, %error, "tcp relay ended with an error");
                }
                drop(attempt);
                log(
                    &local,
                    peer,
                    start,
                    200,
                    Some(addr),
                    attempts.tries(),
                    relayed,
                );
                return;
            }
            Ok(Err(e)) => ConnectError::Io(e),
            Err(_) => ConnectError::Timeout(settings.timeouts.connect),
        };
        attempts.failed(attempt, &error);
        failed = Some(addr);
    }
    local
        .metrics
        .record(shared.index, failed, 502, start.elapsed());
    let tries = attempts.tries();
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
