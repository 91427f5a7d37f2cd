//! Backend health and load, decided on the control plane (never on the workers):
//!
//! - active checks: `GET path` expecting a status (HTTP/1.1, or HTTP/2 with prior knowledge
//!   when the pool speaks h2c), the gRPC health check (`grpc.health.v1.Health/Check`, over
//!   h2c), or a TCP connect, every `interval`, with rise/fall thresholds (HAProxy's model; a
//!   backend starts up);
//! - passive ejection (Envoy outlier detection): after `consecutive_failures` failed attempts
//!   in a row (reported by the workers) a backend is ejected for `base × 2^k`, capped at
//!   `max`, then re-admitted — never the last healthy one, which would only turn errors into
//!   certain 503s; `k` is forgotten after a quiet period as long as `max`;
//! - slow start: a re-admitted backend's warmup ramps up over `slow_start`;
//! - the load poller: `GET /load` every `interval` (over h2c when the pool speaks it), only while the listener's plugin reads
//!   load figures (or the configuration says always); a backend without it has no figures,
//!   and one that answers 404 is logged once and polled ever less often (30 s doubling to
//!   5 min) instead of every second.
//!
//! Every state change publishes a new pool snapshot (one per round, not one per backend).

mod inband;

pub use inband::inband_reports;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, header};
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::config::{BackendProtocol, HealthCheck, HealthKind, LoadReport, Passive};
use crate::pool::{Backend, BackendState, LoadFigures, Pool};
use crate::proxy::ListenerShared;
use crate::tls::Upstream;
use lbwasm_plugin_host::clock_ms;

/// Largest load report read.
const MAX_REPORT: usize = 64 * 1024;

/// What a plugin's `describe()` text contains to say it reads the backends' load figures
/// (CPU, memory, connections), so that the host polls `/load` for it; the built-in
/// `least_loaded` does. A mark in the description rather than a new export: the world
/// `lbwasm:balancer/balancer@0.2.0` stays as it is, every existing component still loads,
/// and one that says nothing costs its backends no polling.
pub const READS_LOAD: &str = "[reads-load]";

/// Wait before polling again a backend whose load endpoint answered 404.
const NO_ENDPOINT_FIRST: Duration = Duration::from_secs(30);

/// Longest wait between polls of a backend without a load endpoint (doubling up to it).
const NO_ENDPOINT_MAX: Duration = Duration::from_secs(300);

/// Runs the active checks of a listener's pool until aborted. Follows reloads: the health
/// settings are re-read every round, and no `[listener.health]` means no checks.
pub async fn active_checks(listener: Arc<ListenerShared>) {
    loop {
        let Some(hc) = listener.settings.load().health.clone() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let members: Vec<Arc<Backend>> = listener
            .pool
            .members()
            .into_iter()
            .filter(|b| !b.current_state().draining)
            .collect();
        let tls = listener.upstream.as_deref();
        let results = join_all(
            members
                .iter()
                .map(|b| probe(b.addr, tls, &hc.kind, hc.timeout)),
        )
        .await;
        listener.pool.update(|changes| {
            for (b, ok) in members.iter().zip(results) {
                changes.state(b, |st| apply_check(&listener, b, st, ok, &hc));
            }
        });
        tokio::time::sleep(hc.interval).await;
    }
}

/// Counts one check result of `b` in its state `st`.
fn apply_check(
    listener: &ListenerShared,
    b: &Backend,
    st: &mut BackendState,
    ok: bool,
    hc: &HealthCheck,
) {
    if ok {
        st.fall = 0;
        if !st.active_up {
            st.rise += 1;
            if st.rise >= hc.rise {
                st.active_up = true;
                st.rise = 0;
                st.warming_since = Some(Instant::now());
                tracing::info!(listener = %listener.name, backend = %b.addr, id = b.id, "backend up (active check)");
            }
        }
    } else {
        st.rise = 0;
        if st.active_up {
            st.fall += 1;
            if st.fall >= hc.fall {
                st.active_up = false;
                st.fall = 0;
                tracing::warn!(listener = %listener.name, backend = %b.addr, id = b.id, "backend down (active check)");
            }
        }
    }
}

/// One check: true when the backend answered as expected within `timeout`.
/// With `tls`, the check speaks TLS as the pool does (a TCP check completes the
/// handshake too: a backend whose certificate fails is not ready for traffic).
pub async fn probe(
    addr: SocketAddr,
    tls: Option<&Upstream>,
    kind: &HealthKind,
    timeout: Duration,
) -> bool {
    match kind {
        HealthKind::Tcp => matches!(
            tokio::time::timeout(timeout, dial(addr, tls)).await,
            Ok(Ok(_))
        ),
        HealthKind::Http {
            path,
            expect_status,
            http2,
        } => {
            let call = get_in(addr, tls, path, 0, *http2);
            matches!(tokio::time::timeout(timeout, call).await, Ok(Ok((status, _))) if status == *expect_status)
        }
        HealthKind::Grpc { service } => {
            match tokio::time::timeout(timeout, grpc_check(addr, tls, service)).await {
                Ok(Ok(serving)) => serving,
                Ok(Err(error)) => {
                    tracing::debug!(backend = %addr, %error, "gRPC health check failed");
                    false
                }
                Err(_) => false,
            }
        }
    }
}

/// The `user-agent` of every check, so that backends can tell checks from traffic.
const USER_AGENT: &str = "lbwasm-health";

/// The gRPC health-checking method (grpc.health.v1).
const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Largest answer a check reads: a health answer is a few bytes.
const MAX_CHECK_ANSWER: usize = 16 * 1024;

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// One request on a fresh HTTP/2 prior-knowledge connection: status, headers, body (up to
/// `limit` bytes; 0 = not read) and trailers.
async fn h2c_call(
    addr: SocketAddr,
    tls: Option<&Upstream>,
    req: Request<Full<Bytes>>,
    limit: usize,
) -> anyhow::Result<(u16, http::HeaderMap, Bytes, Option<http::HeaderMap>)> {
    let stream = dial(addr, tls).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let task = AbortOnDrop(tokio::spawn(conn));
    let res = sender.send_request(req).await?;
    let (parts, body) = res.into_parts();
    if limit == 0 {
        // The status is the answer; the body is not read (the stream is reset on drop).
        return Ok((parts.status.as_u16(), parts.headers, Bytes::new(), None));
    }
    let collected = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let trailers = collected.trailers().cloned();
    drop(task);
    Ok((
        parts.status.as_u16(),
        parts.headers,
        collected.to_bytes(),
        trailers,
    ))
}

/// The gRPC health check: true when the call answers HTTP 200, `grpc-status` 0 and a
/// `HealthCheckResponse` saying `SERVING`; an error says what else came.
async fn grpc_check(
    addr: SocketAddr,
    tls: Option<&Upstream>,
    service: &str,
) -> anyhow::Result<bool> {
    let req = Request::post(format!("http://{addr}{GRPC_HEALTH_CHECK}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, USER_AGENT)
        .body(Full::new(grpc_health_request(service)))?;
    let (status, headers, body, trailers) = h2c_call(addr, tls, req, MAX_CHECK_ANSWER).await?;
    anyhow::ensure!(status == 200, "HTTP status {status}");
    // In the trailers, or in the headers of a Trailers-Only answer.
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    anyhow::ensure!(
        grpc_status.as_deref() == Some("0"),
        "grpc-status {grpc_status:?}"
    );
    let serving = grpc_health_status(&body)?;
    Ok(serving == SERVING)
}

/// The gRPC frame of `HealthCheckRequest { string service = 1; }`: flag 0, big-endian
/// length, then the protobuf (an empty service is an empty message, as proto3 writes it).
fn grpc_health_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a); // field 1, wire type 2 (length-delimited)
        let mut n = service.len() as u64;
        while n >= 0x80 {
            message.push((n as u8) | 0x80);
            n >>= 7;
        }
        message.push(n as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame.into()
}

/// The `status` of the one `HealthCheckResponse { ServingStatus status = 1; }` in a gRPC
/// body (0, UNKNOWN, when the field is absent, as proto3 reads it); unknown fields skipped.
fn grpc_health_status(body: &[u8]) -> anyhow::Result<u64> {
    anyhow::ensure!(body.len() >= 5, "no gRPC message in the answer");
    anyhow::ensure!(body[0] == 0, "compressed gRPC message (none was offered)");
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let mut msg = body
        .get(5..5 + len)
        .ok_or_else(|| anyhow::anyhow!("truncated gRPC message"))?;
    let mut status = 0;
    while !msg.is_empty() {
        let key;
        (key, msg) = varint(msg)?;
        match key & 7 {
            0 => {
                let v;
                (v, msg) = varint(msg)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => {
                msg = msg
                    .get(8..)
                    .ok_or_else(|| anyhow::anyhow!("truncated field"))?
            }
            2 => {
                let n;
                (n, msg) = varint(msg)?;
                msg = usize::try_from(n)
                    .ok()
                    .and_then(|n| msg.get(n..))
                    .ok_or_else(|| anyhow::anyhow!("truncated field"))?;
            }
            5 => {
                msg = msg
                    .get(4..)
                    .ok_or_else(|| anyhow::anyhow!("truncated field"))?
            }
            w => anyhow::bail!("protobuf wire type {w} in HealthCheckResponse"),
        }
    }
    Ok(status)
}

/// A protobuf varint and what follows it.
fn varint(buf: &[u8]) -> anyhow::Result<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, &buf[i + 1..]));
        }
    }
    anyhow::bail!("bad protobuf varint")
}

/// A one-off `GET path` on a fresh connection (`Connection: close`): status and up to
/// `limit` bytes of body.
pub async fn get(
    addr: SocketAddr,
    tls: Option<&Upstream>,
    path: &str,
    limit: usize,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = dial(addr, tls).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let task = AbortOnDrop(tokio::spawn(conn));
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, USER_AGENT)
        .body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = if limit == 0 {
        Bytes::new()
    } else {
        Limited::new(res.into_body(), limit)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_bytes()
    };
    drop(task);
    Ok((status, body))
}

/// [`get`] over HTTP/2 with prior knowledge when `http2` (the pool speaks h2c).
async fn get_in(
    addr: SocketAddr,
    tls: Option<&Upstream>,
    path: &str,
    limit: usize,
    http2: bool,
) -> anyhow::Result<(u16, Bytes)> {
    if !http2 {
        return get(addr, tls, path, limit).await;
    }
    let req = Request::get(format!("http://{addr}{path}"))
        .header(header::USER_AGENT, USER_AGENT)
        .body(Full::new(Bytes::new()))?;
    let (status, _, body, _) = h2c_call(addr, tls, req, limit).await?;
    Ok((status, body))
}

/// A check's connection: TCP, or TLS over it as the pool speaks to its backends.
trait CheckIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> CheckIo for T {}

/// A connection for one check.
async fn dial(addr: SocketAddr, tls: Option<&Upstream>) -> anyhow::Result<Box<dyn CheckIo>> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    Ok(match tls {
        None => Box::new(tcp),
        // The caller's timeout bounds the whole check; this one is only a backstop.
        Some(tls) => Box::new(tls.connect(tcp, addr, Duration::from_secs(30)).await?),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The figures of a load report; other fields (`server`, `requests`...) are ignored.
#[derive(Deserialize)]
struct Report {
    cpu_percent: Option<f32>,
    memory_percent: Option<f32>,
    connections: Option<u32>,
}

/// The load-report settings while `listener` should poll: the configuration allows it and
/// either says always or the current plugin declares [`READS_LOAD`].
fn polling(listener: &ListenerShared) -> Option<LoadReport> {
    let lr = listener.settings.load().load_report.clone()?;
    (lr.always || listener.plugin.load().description().contains(READS_LOAD)).then_some(lr)
}

/// Polls the backends' load endpoint until aborted, following reloads and plugin swaps
/// (see [`polling`]). One snapshot is published per round in which a report arrived.
pub async fn load_reports(listener: Arc<ListenerShared>) {
    // Backends whose endpoint answered 404, by id: when to ask again, and the wait after.
    let mut no_endpoint: HashMap<u32, (Instant, Duration)> = HashMap::new();
    loop {
        let Some(lr) = polling(&listener) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let now = Instant::now();
        let members: Vec<Arc<Backend>> = {
            let all = listener.pool.members();
            no_endpoint.retain(|id, _| all.iter().any(|b| b.id == *id));
            all.into_iter()
                .filter(|b| b.current_state().process_up)
                .filter(|b| no_endpoint.get(&b.id).is_none_or(|(at, _)| *at <= now))
                .collect()
        };
        // In the pool's protocol: an h2c-only backend (a gRPC server) answers nothing else.
        let http2 = matches!(
            listener.settings.load().backend_protocol,
            BackendProtocol::H2c | BackendProtocol::H2
        );
        let tls = listener.upstream.as_deref();
        let wait = lr
            .interval
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        let results =
            join_all(members.iter().map(|b| {
                tokio::time::timeout(wait, get_in(b.addr, tls, &lr.path, MAX_REPORT, http2))
            }))
            .await;
        let mut reports = Vec::with_capacity(members.len());
        for (b, res) in members.iter().zip(results) {
            let body = match res {
                Ok(Ok((200, body))) => body,
                Ok(Ok((404, _))) => {
                    let backoff = match no_endpoint.get(&b.id) {
                        Some((_, last)) => (*last * 2).min(NO_ENDPOINT_MAX),
                        None => {
                            tracing::warn!(listener = %listener.name, backend = %b.addr, path = %lr.path, "the backend has no load endpoint (404): asking again in 30 s, then ever less often (up to every 5 min); set [listener.load_report] path, or enabled = false");
                            NO_ENDPOINT_FIRST
                        }
                    };
                    no_endpoint.insert(b.id, (Instant::now() + backoff, backoff));
                    continue;
                }
                _ => continue,
            };
            if no_endpoint.remove(&b.id).is_some() {
                tracing::info!(listener = %listener.name, backend = %b.addr, "the backend's load endpoint answers again");
            }
            let Ok(r) = serde_json::from_slice::<Report>(&body) else {
                tracing::debug!(listener = %listener.name, backend = %b.addr, "load report is not the expected JSON");
                continue;
            };
            reports.push((
                b,
                LoadFigures {
                    cpu_percent: r.cpu_percent.map(|v| v.clamp(0.0, 100.0)),
                    memory_percent: r.memory_percent.map(|v| v.clamp(0.0, 100.0)),
                    connections: r.connections,
                    sampled_at_ms: clock_ms(),
                },
            ));
        }
        listener.pool.update(|changes| {
            for (b, figures) in reports {
                changes.state(b, |st| {
                    st.report = Some(figures);
                    st.report_samples += 1;
                });
            }
        });
        tokio::time::sleep(lr.interval).await;
    }
}

/// Ejects `backend` after a failure streak; returns how long for, or none when it stays
/// (already ejected, no longer a member, or the last healthy one).
pub fn eject(
    listener: &ListenerShared,
    backend: &Arc<Backend>,
    passive: &Passive,
) -> Option<Duration> {
    let pool: &Pool = &listener.pool;
    let others = pool
        .snapshot()
        .infos()
        .iter()
        .filter(|i| i.healthy && i.id != backend.id)
        .count();
    if others == 0 || pool.find_id(backend.id).is_none() {
        backend.clear_eject_request();
        tracing::debug!(listener = %listener.name, backend = %backend.addr, "not ejecting: last healthy backend, or gone");
        return None;
    }
    let now = Instant::now();
    let length = pool.update_one(backend, |st| {
        if st.ejected_until.is_some() {
            return None;
        }
        if st
            .readmitted_at
            .is_some_and(|t| now.duration_since(t) > passive.max_ejection)
        {
            st.ejections = 0;
        }
        let length = passive
            .base_ejection
            .saturating_mul(1 << st.ejections.min(20))
            .min(passive.max_ejection);
        st.ejections += 1;
        st.ejected_until = Some(now + length);
        Some(length)
    })?;
    tracing::warn!(listener = %listener.name, backend = %backend.addr, id = backend.id, ejection_s = length.as_secs_f64(), "backend ejected after consecutive failures");
    Some(length)
}

/// Ends an ejection (slow start, if configured, begins).
pub fn readmit(listener: &ListenerShared, backend: &Arc<Backend>) {
    listener.pool.update_one(backend, |st| {
        let now = Instant::now();
        st.ejected_until = None;
        st.readmitted_at = Some(now);
        st.warming_since = Some(now);
    });
    backend.clear_eject_request();
    tracing::info!(listener = %listener.name, backend = %backend.addr, id = backend.id, "backend re-admitted after ejection");
}

/// Republishes the pool while a backend ramps up (slow start), until aborted.
pub async fn slow_start(listener: Arc<ListenerShared>) {
    loop {
        let ramp = listener.pool.slow_start();
        let step = (ramp / 20).clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::time::sleep(step).await;
        listener.pool.republish_warming();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_request_frames_the_service_name() {
        assert_eq!(&grpc_health_request("")[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &grpc_health_request("ab")[..],
            [0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        let long = "s".repeat(200);
        let frame = grpc_health_request(&long);
        assert_eq!(&frame[..8], [0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
        assert_eq!(frame.len(), 5 + 203);
    }

    #[test]
    fn grpc_health_status_reads_the_serving_status() {
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 1]).unwrap(), 1);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 2]).unwrap(), 2);
        // proto3: an absent status is UNKNOWN (0); unknown fields are skipped.
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 0]).unwrap(), 0);
        assert_eq!(
            grpc_health_status(&[0, 0, 0, 0, 6, 0x12, 2, b'x', b'y', 0x08, 1]).unwrap(),
            1
        );
        assert!(grpc_health_status(&[]).is_err());
        assert!(
            grpc_health_status(&[1, 0, 0, 0, 2, 0x08, 1]).is_err(),
            "compressed"
        );
        assert!(
            grpc_health_status(&[0, 0, 0, 0, 3, 0x08, 1]).is_err(),
            "truncated"
        );
        assert!(
            grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 0x80]).is_err(),
            "bad varint"
        );
    }
}
