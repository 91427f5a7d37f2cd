//! The TCP data path: one pick per client connection through the same plugin
//! (`RequestInfo` protocol TCP, client IP set), a connect that fails over to other backends,
//! then bytes copied both ways until both sides are done (a half-close is passed on) or the
//! connection is silent for the idle timeout. The backend's in-flight guard lives as long as
//! the connection. With `proxy_protocol`, the backend first gets a PROXY header naming the
//! client.
//!
//! TLS: a listener with `[listener.tls]` terminates it and relays the plaintext; one with
//! `server_names` was handed the connection by [`route`], which read the ClientHello
//! without terminating and picked the listener by its server name — the bytes read go to
//! the backend first, untouched. Either way the server name is the plugin's request field
//! `sni` (and the hash key with `hash_key = "sni"`); with `[listener.backend_tls]`, the
//! backend connection is TLS too.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::access_log;
use super::failover::{Attempts, Exhausted};
use super::local::LocalListener;
use super::proxy_header;
use super::sock::{self, ConnectError};
use super::stream::Stream;
use super::tunnel::{Relayed, relay};
use crate::config::{HashKey, ProxyProtocol};
use crate::metrics::TCP_OK;
use crate::tls::TlsConn;
use crate::tls::certs::name_matches;
use crate::tls::hello::{self, Hello};
use lbwasm_plugin_host::{Protocol, RequestInfo};

/// How long a client has to send its whole ClientHello (SNI routing) or finish the
/// handshake (termination), at most (the idle timeout, when shorter).
const HELLO: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection on an address that several listeners share by server name: reads the
/// ClientHello (without answering it) and hands the connection, with the bytes read, to
/// the listener whose `server_names` match — the first that does, in configuration order,
/// else the one without names. Anything else is closed.
pub(super) async fn route(routes: Rc<[Rc<LocalListener>]>, client: TcpStream, peer: SocketAddr) {
    let idle = routes[0].state().1.timeouts.idle;
    let read = tokio::time::timeout(idle.min(HELLO), read_hello(&client)).await;
    let (early, sni) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(why)) => {
            tracing::debug!(%peer, %why, "not routed: no usable ClientHello");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "not routed: no whole ClientHello in time");
            return;
        }
    };
    let pick = |named: bool| {
        routes.iter().find(|l| {
            let names = &l.shared.server_names;
            match &sni {
                _ if !named => names.is_empty(),
                Some(name) => name_matches(names, name) || names.iter().any(|n| n == "*"),
                None => names.iter().any(|n| n == "*"),
            }
        })
    };
    match pick(true).or_else(|| pick(false)) {
        Some(local) => serve(local.clone(), Stream::Plain(client), peer, early, sni).await,
        None => {
            tracing::debug!(%peer, sni = ?sni, "not routed: no listener takes this server name")
        }
    }
}

/// Reads until a whole ClientHello is in: the bytes (to relay as they are) and its server
/// name.
async fn read_hello(client: &TcpStream) -> Result<(Bytes, Option<String>), String> {
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        match hello::parse(&buf) {
            Hello::Complete { server_name, .. } => return Ok((buf.freeze(), server_name)),
            Hello::NotTls(why) => return Err(why.to_owned()),
            Hello::Partial => {}
        }
        if buf.len() >= hello::MAX_HELLO {
            return Err("ClientHello too long".to_owned());
        }
        client.readable().await.map_err(|e| e.to_string())?;
        buf.reserve(2048.min(hello::MAX_HELLO - buf.len()).max(1));
        match client.try_read_buf(&mut buf) {
            Ok(0) => return Err("closed before its ClientHello was whole".to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Terminates TLS on a listener that has it, then balances and relays.
pub(super) async fn accept(local: Rc<LocalListener>, client: TcpStream, peer: SocketAddr) {
    let Some(tls) = &local.shared.tls else {
        return serve(local, Stream::Plain(client), peer, Bytes::new(), None).await;
    };
    let idle = local.state().1.timeouts.idle;
    match tls.accept(client, idle.min(HELLO)).await {
        Ok(accepted) => {
            let sni = accepted.conn.server_name().map(str::to_owned);
            let stream = Stream::Tls(Box::new(TlsConn::new(accepted.tcp, accepted.conn)));
            serve(local, stream, peer, Bytes::new(), sni).await;
        }
        Err((failure, error)) => {
            tracing::debug!(listener = %local.shared.name, %peer, reason = failure.label(), %error, "TLS handshake failed");
        }
    }
}

/// Balances and relays one client connection; `early`: bytes already read from it, which
/// the backend gets first; `sni`: the server name its ClientHello asked for.
async fn serve(
    local: Rc<LocalListener>,
    client: Stream,
    peer: SocketAddr,
    early: Bytes,
    sni: Option<String>,
) {
    let start = Instant::now();
    let shared = &local.shared;
    let (view, settings) = local.state();
    let hash_key = match settings.hash_key {
        Some(HashKey::ClientIp) => Some(peer.ip().to_string()),
        Some(HashKey::Sni) => sni.clone(),
        _ => None,
    };
    let mut headers = HeaderMap::new();
    if let Some(name) = sni.as_deref()
        && let Ok(v) = http::HeaderValue::from_str(name)
    {
        headers.insert("sni", v);
    }
    let mut info = RequestInfo {
        protocol: Protocol::Tcp,
        client_ip: peer.ip(),
        hash_key,
        headers: headers.into(),
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
        let timeout = settings.timeouts.connect;
        let connect = connect(addr, settings.proxy_protocol, &client, peer, &local, &early);
        let error = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(upstream)) => {
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
            Ok(Err(e)) => e,
            Err(_) => ConnectError::Timeout(timeout),
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
/// first, then TLS if the pool has it, then the bytes already read from the client
/// (`early`); all of it counts as connecting: a backend that takes no bytes is tried like
/// one that takes no connection.
async fn connect(
    backend: SocketAddr,
    proxy: Option<ProxyProtocol>,
    client: &Stream,
    peer: SocketAddr,
    local: &LocalListener,
    early: &[u8],
) -> Result<Stream, ConnectError> {
    let timeout = local.state().1.timeouts.connect;
    let mut tcp = sock::connect(backend, timeout).await?;
    if let Some(version) = proxy {
        let mut header = Vec::with_capacity(64);
        let ours = client.tcp().local_addr().map_err(ConnectError::Io)?;
        proxy_header::encode(version, peer, ours, &mut header);
        tcp.write_all(&header).await.map_err(ConnectError::Io)?;
    }
    let mut upstream = sock::secure(tcp, backend, timeout, local.shared.upstream()).await?;
    if !early.is_empty() {
        upstream.write_all(early).await.map_err(ConnectError::Io)?;
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
