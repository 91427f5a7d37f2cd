//! The HTTP data path: one client connection (HTTP/1.1, or HTTP/2 prior knowledge), and
//! for each request: pick → forward → record, with failover.
//!
//! Failover: a connect failure, or a request that never left the proxy, is tried on another
//! backend whatever its method (nothing was sent); an error or timeout after sending is
//! retried only for idempotent methods with an empty body (the proxy keeps a copy of the
//! head, never of a body). Every retry needs the listener's retry budget, excludes the
//! backends already tried (`tried`, `RequestInfo.attempt`), and is bounded by
//! `retry.attempts`. When no backend can serve, the answer is a one-line text: 502
//! (connect or protocol error), 503 (no eligible backend, plugin refusal), 504 (timeout).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lbwasm_http::{Fields, Framing, ReqHead, ResponseHead as BackendHead};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::Settings;
use super::access_log::Pending;
use super::activity::Activity;
use super::body::{ClientIo, ReqBody};
use super::client::{BackendBody, BackendConn, SendError, SendErrorKind};
use super::drain::{Drain, Live};
use super::failover::{Attempt, AttemptError, Attempts, Exhausted, Retry};
use super::grpc::{self, GrpcCall};
use super::h1::{self, Exchange};
use super::h2c::{H2Error, StreamSlot, Tee, UpBody};
use super::headers;
use super::local::{LocalListener, NoBackend};
use super::orca;
use super::response::{Blame, Reply, ResBody};
use super::sock::ConnectError;
use super::stream::Stream;
use crate::config::BackendProtocol;
use crate::pool::InFlight;
use crate::tls::TlsConn;
use lbwasm_plugin_host::{Protocol, RequestInfo};

/// A TLS handshake longer than this fails (or the idle timeout, when shorter).
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves one client connection until it closes, goes idle for `timeouts.idle`, or the
/// worker drains (then in-flight requests finish and the connection closes gracefully).
/// HTTP/1.1 is the proxy's own server ([`super::h1`]); HTTP/2 is hyper's: by prior
/// knowledge in cleartext, by ALPN over TLS.
pub(super) fn serve(
    local: Rc<LocalListener>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: Rc<Drain>,
    live: Live,
) -> impl Future<Output = ()> {
    // The handshake and protocol detection, boxed: they hold more than an idle connection
    // needs and are over before it is idle. Boxed here, so that what they consume (the
    // socket, the peer's address) is not also kept in the task's future.
    let opening = Box::pin(opening(local.clone(), stream, peer, drain.clone()));
    // The task's future is an `async move` block rather than an `async fn`, which keeps
    // its arguments twice (as captured and as locals) for the connection's life: an idle
    // connection is sized by this future (issue 17).
    async move {
        let Some(Opened {
            stream,
            peer,
            h2,
            idle,
        }) = opening.await
        else {
            return; // closed, silent, or the worker drains
        };
        let (ctx, stream) = ConnCtx::new(local.clone(), peer, stream);
        // HTTP/1.1's state lives in the task itself (one allocation per connection);
        // HTTP/2's, larger, in an allocation of its own, so that an idle HTTP/1.1
        // connection carries no room for it.
        if h2 {
            Box::pin(serve_h2(local, Rc::new(ctx), stream, peer, drain, idle)).await;
        } else {
            let io = Rc::new(ClientIo::new(stream, idle));
            h1::serve(Rc::new(ctx), io, drain).await;
        }
        drop(live);
    }
}

/// A client connection handshaken and its protocol known.
struct Opened {
    stream: Stream,
    peer: SocketAddr,
    /// It speaks HTTP/2 (prior knowledge, or ALPN over TLS).
    h2: bool,
    /// The listener's idle timeout when the connection opened.
    idle: Duration,
}

/// Handshakes and detects the protocol. None: closed first, silent for the idle timeout,
/// a failed handshake, or the worker drains.
async fn opening(
    local: Rc<LocalListener>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: Rc<Drain>,
) -> Option<Opened> {
    let idle = local.state().1.timeouts.idle;
    let (stream, h2) = tokio::select! {
        detected = open(&local, stream, peer, idle) => detected?,
        () = drain.started() => return None,
    };
    Some(Opened {
        stream,
        peer,
        h2,
        idle,
    })
}

/// The connection's stream (handshaken, on a TLS listener) and whether it speaks HTTP/2.
async fn open(
    local: &LocalListener,
    stream: TcpStream,
    peer: SocketAddr,
    idle: Duration,
) -> Option<(Stream, bool)> {
    let Some(tls) = &local.shared.tls else {
        let h2 = tokio::time::timeout(idle, speaks_h2(&stream))
            .await
            .ok()??;
        return Some((Stream::Plain(stream), h2));
    };
    match tls.accept(stream, idle.min(HANDSHAKE)).await {
        Ok(accepted) => {
            let h2 = accepted.conn.alpn_protocol() == Some(b"h2");
            let conn = TlsConn::new(accepted.tcp, accepted.conn);
            Some((Stream::Tls(Box::new(conn)), h2))
        }
        Err((failure, error)) => {
            tracing::debug!(listener = %local.shared.name, %peer, reason = failure.label(), %error, "TLS handshake failed");
            None
        }
    }
}

/// Serves HTTP/2 on `stream` with hyper.
async fn serve_h2(
    local: Rc<LocalListener>,
    ctx: Rc<ConnCtx>,
    stream: Stream,
    peer: SocketAddr,
    drain: Rc<Drain>,
    idle: Duration,
) {
    let activity = Rc::new(Activity::new());
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let busy = activity.begin();
            async move {
                let (parts, body) = req.into_parts();
                // Streams run concurrently: each gets its own timer.
                let mut reply = ctx
                    .exchange(ReqHead::from_parts(parts), Some(ReqBody::H2(body)), None)
                    .await;
                reply.body.attach(busy);
                Ok::<_, Infallible>(reply.into_response())
            }
        })
    };
    let conn = local.h2.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let expired = activity.expired(idle);
    tokio::pin!(expired);
    let draining = drain.started();
    tokio::pin!(draining);
    let mut closing = false;
    let done = loop {
        tokio::select! {
            biased;
            done = conn.as_mut() => break done,
            () = &mut expired, if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut draining, if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    };
    if let Err(error) = done {
        tracing::debug!(listener = %local.shared.name, %peer, %error, "client connection ended with an error");
    }
}

/// The HTTP/2 connection preface starts with `PRI`, a method no HTTP/1 request uses
/// (RFC 9113 §3.4): the first two bytes tell h2 prior knowledge from HTTP/1.1. Peeked
/// once per connection (hyper-util's `auto` builder would wrap every read instead).
/// None: the client closed first.
async fn speaks_h2(stream: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; 2];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) if buf[0] != b'P' => return Some(false),
            Ok(2) => return Some(buf[1] == b'R'),
            // Only "P" so far: wait for the next byte.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// One client connection, as its requests are forwarded.
pub(super) struct ConnCtx {
    local: Rc<LocalListener>,
    peer: SocketAddr,
    /// The client as the forwarding fields name it.
    client: headers::Forwarded,
    /// TLS version and ALPN protocol, for the access log; none in cleartext.
    tls: Option<(&'static str, &'static str)>,
}

/// Why an attempt failed.
enum Failure {
    Connect(SocketAddr, ConnectError),
    Exchange(SocketAddr, SendError),
    /// An HTTP/2 stream failed; `replay`: the request's body (if any) is still whole here.
    Stream(SocketAddr, H2Error, bool),
    Timeout(SocketAddr, Duration),
    /// The client's request body failed (bad framing found mid-body, the client went
    /// away): the client's fault, never the backend's.
    ClientBody(String),
    /// The request timed out while the proxy was waiting for the client's body.
    ClientStall(Duration),
    /// The request cannot be sent as it is (a field HTTP/2 refuses).
    ClientRequest(String),
    /// The client's own deadline (`grpc-timeout`, shorter than the listener's request
    /// timeout) passed: a client asking for 1 ns must not get healthy backends ejected.
    ClientDeadline(Duration),
}

impl Failure {
    /// The backend at fault; none when the client is.
    fn backend(&self) -> Option<SocketAddr> {
        match self {
            Failure::Connect(a, _)
            | Failure::Exchange(a, _)
            | Failure::Stream(a, ..)
            | Failure::Timeout(a, _) => Some(*a),
            Failure::ClientBody(_)
            | Failure::ClientStall(_)
            | Failure::ClientRequest(_)
            | Failure::ClientDeadline(_) => None,
        }
    }

    /// A timeout under a deadline shorter than the listener's `request` timeout was the
    /// client's deadline, not the backend's failure.
    fn under(self, request_timeout: Duration) -> Self {
        match self {
            Failure::Timeout(_, d) if d < request_timeout => Failure::ClientDeadline(d),
            f => f,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Failure::Connect(_, ConnectError::Timeout(_))
            | Failure::Timeout(..)
            | Failure::ClientDeadline(_) => StatusCode::GATEWAY_TIMEOUT,
            Failure::Connect(..) | Failure::Exchange(..) | Failure::Stream(..) => {
                StatusCode::BAD_GATEWAY
            }
            Failure::ClientBody(_) | Failure::ClientRequest(_) => StatusCode::BAD_REQUEST,
            Failure::ClientStall(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn response(&self) -> Reply {
        Reply::text(self.status(), self.to_string())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(a, ConnectError::Timeout(d)) => {
                write!(f, "backend {a} did not accept a connection within {d:?}")
            }
            Failure::Connect(a, e) => write!(f, "cannot connect to backend {a}: {e}"),
            Failure::Exchange(a, e) => write!(f, "backend {a} failed before answering: {e}"),
            Failure::Stream(a, e, _) => write!(f, "backend {a} failed the stream: {e}"),
            Failure::ClientRequest(why) => write!(f, "request: {why}"),
            Failure::Timeout(a, d) => write!(f, "backend {a} did not answer within {d:?}"),
            Failure::ClientBody(why) => write!(f, "request body: {why}"),
            Failure::ClientStall(d) => {
                write!(f, "request body not received within {d:?}")
            }
            Failure::ClientDeadline(d) => write!(f, "the call's deadline ({d:?}) passed"),
        }
    }
}

impl AttemptError for Failure {
    fn retry(&self, replayable: bool) -> Retry {
        match self {
            Failure::Connect(..) => Retry::Elsewhere,
            // Some of it went out: only a request that can go again as it is may.
            Failure::Exchange(_, e) if e.sent && !replayable => Retry::Never,
            // Nothing came back and no body bytes were used: nothing was acted on.
            Failure::Exchange(_, e) if e.nothing_back && !e.body_used => Retry::Fresh,
            Failure::Exchange(..) => Retry::Elsewhere,
            // HTTP/2 proves it never reached the application (refused, above a graceful
            // GOAWAY's last stream, never sent): again, if its body is still whole here.
            Failure::Stream(_, e, true) if e.unprocessed() => Retry::Elsewhere,
            Failure::Stream(..) if replayable => Retry::Elsewhere,
            Failure::Stream(..) => Retry::Never,
            Failure::Timeout(..) if replayable => Retry::Elsewhere,
            // The client's own failures are never retried (nor counted against backends).
            Failure::Timeout(..)
            | Failure::ClientBody(_)
            | Failure::ClientStall(_)
            | Failure::ClientRequest(_)
            | Failure::ClientDeadline(_) => Retry::Never,
        }
    }
}

/// A backend's answer: an HTTP/1.1 head on its connection, or an HTTP/2 stream's.
enum Answer {
    H1(BackendHead, Framing, BackendConn),
    H2(Response<Incoming>, StreamSlot),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::H1(res, ..) => res.status,
            Answer::H2(res, _) => res.status(),
        }
    }

    /// Whether a body follows the head (whose end then tells success or failure).
    fn body_follows(&self) -> bool {
        match self {
            Answer::H1(res, framing, _) => {
                res.status != StatusCode::SWITCHING_PROTOCOLS
                    && !matches!(framing, Framing::Length(0, _))
            }
            Answer::H2(res, _) => !http_body::Body::is_end_stream(res.body()),
        }
    }
}

/// Runs `fut` for at most `limit` (None: it took longer). With `timer`, the timer of a
/// connection that carries one request at a time, no timer is registered per request:
/// the connection's is re-armed only when it fires early, as NGINX's lazy timers are (a
/// registration and a removal per request measured ~1% of the proxy's CPU).
async fn within<F: Future>(
    limit: Duration,
    fut: F,
    timer: Option<Pin<&mut Sleep>>,
) -> Option<F::Output> {
    let Some(mut timer) = timer else {
        return tokio::time::timeout(limit, fut).await.ok();
    };
    let due = tokio::time::Instant::now() + limit;
    if timer.deadline() > due {
        timer.as_mut().reset(due); // set for later: the idle timeout, or a longer limit
    }
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            () = timer.as_mut() => {
                if tokio::time::Instant::now() >= due {
                    return None;
                }
                timer.as_mut().reset(due);
            }
        }
    }
}

/// Swaps the request's method, URI and fields with the plugin's view of them: called before
/// and after a pick, it lends them without a copy.
fn lend(head: &mut ReqHead, info: &mut RequestInfo) {
    std::mem::swap(&mut head.method, &mut info.method);
    std::mem::swap(&mut head.uri, &mut info.uri);
    std::mem::swap(&mut head.fields, &mut info.headers);
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Exchange for ConnCtx {
    fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Access-logged and counted like any other request.
    fn refusal(&self, status: StatusCode, cause: String) -> Reply {
        let mut res = Reply::text(status, cause);
        let local = &self.local;
        local
            .metrics
            .record(local.shared.index, None, status.as_u16(), Duration::ZERO);
        local
            .metrics
            .refused(local.shared.index, refusal_reason(status));
        let log = &local.log;
        if log.enabled() {
            let mut line = Pending::without_request(log, self.peer.ip(), Instant::now());
            line.answered(status.as_u16(), None, 0);
            line.tls = self.tls;
            res.body.log(line);
        }
        res
    }

    /// One request, forwarded, and recorded in the metrics (and the access log, when the
    /// response ends). `upgrade`: the client asks to
    /// switch protocols (HTTP/1.1 only); a `101` answer then carries the backend
    /// connection in its body ([`ResBody::take_switch`]). `timer`: the connection's own
    /// timer, when it carries one request at a time (see [`within`]).
    // Not an `async fn`: its arguments would be kept twice (see `h1::serve`).
    #[allow(clippy::manual_async_fn)]
    fn exchange<'a>(
        &'a self,
        head: ReqHead,
        body: Option<ReqBody>,
        timer: Option<Pin<&'a mut Sleep>>,
    ) -> impl Future<Output = Reply> + 'a {
        async move {
            let start = Instant::now();
            let local = &self.local;
            let pending = local
                .log
                .enabled()
                .then(|| Pending::begin(&local.log, self.peer.ip(), &head, start, self.tls));
            let call = GrpcCall::of(&head);
            let mut tries = 0;
            let (mut res, backend, answered) = self
                .forward(head, body, start, timer, call.as_ref(), &mut tries)
                .await;
            let done = answered.unwrap_or_else(Instant::now);
            local.metrics.record(
                local.shared.index,
                backend,
                res.status.as_u16(),
                done.saturating_duration_since(start),
            );
            if let Some(mut line) = pending {
                line.answered(res.status.as_u16(), backend, tries);
                res.body.log(line);
            }
            // The proxy's own answer to a gRPC call, in gRPC's terms: a client cannot read
            // a bare 502 (the metrics and the log keep the HTTP status).
            if call.is_some() && answered.is_none() {
                res = grpc::error_reply(res);
                if let Fields::Map(map) = &res.fields
                    && let Some(code) = map.get("grpc-status")
                {
                    local
                        .metrics
                        .grpc_status(local.shared.index, code.as_bytes());
                }
            }
            res
        }
    }
}

impl ConnCtx {
    /// The context of a connection from `peer` on `stream` (handshaken), and the stream
    /// back: a borrow of the stream inside the connection's future would keep a second
    /// copy of it there for the connection's life.
    fn new(local: Rc<LocalListener>, peer: SocketAddr, stream: Stream) -> (Self, Stream) {
        let mut client = headers::client_value(peer.ip());
        client.https = stream.is_tls();
        let ctx = ConnCtx {
            tls: stream.tls_info(),
            local,
            peer,
            client,
        };
        (ctx, stream)
    }

    /// Forwards with failover; returns the response, the backend that answered or failed
    /// last, and when the response head arrived (none for the proxy's own answers).
    // Not an `async fn`: its arguments would be kept twice (see `h1::serve`).
    #[allow(clippy::manual_async_fn)]
    fn forward<'a>(
        &'a self,
        mut head: ReqHead,
        mut body: Option<ReqBody>,
        arrived: Instant,
        mut timer: Option<Pin<&'a mut Sleep>>,
        call: Option<&'a GrpcCall>,
        tries: &'a mut usize,
    ) -> impl Future<Output = (Reply, Option<SocketAddr>, Option<Instant>)> + 'a {
        async move {
            let local = &self.local;
            let (view, settings) = local.state();
            // A gRPC deadline shorter than the listener's request timeout is the request's.
            let limit = call
                .and_then(|c| c.deadline)
                .map_or(settings.timeouts.request, |d| {
                    d.min(settings.timeouts.request)
                });
            // `te: trailers` goes on to an HTTP/2 backend (before the hop-by-hop fields go).
            let trailers = call.is_some() || head.trailers;
            let h2 = matches!(
                settings.backend_protocol,
                BackendProtocol::H2c | BackendProtocol::H2
            );
            let mut tee: Option<Tee> = None;
            // First: the key and the plugin see the request as the backend will (an
            // absolute-form target's authority as its Host).
            headers::prepare_request(&mut head);
            let hash_key = headers::hash_key(settings.hash_key.as_ref(), &head, self.peer.ip());
            // `body` is taken by the first exchange that sends it. Sent and failed, the request
            // may go again: the head is still here (the client only borrows it), and there is
            // no body to have lost.
            let replayable = !head.upgrade
                && idempotent(&head.method)
                && body.as_ref().is_none_or(ReqBody::is_end_stream);
            let mut info = RequestInfo {
                protocol: Protocol::Http,
                client_ip: self.peer.ip(),
                hash_key,
                ..RequestInfo::default()
            };
            let mut attempts = Attempts::new(local, view, &settings, arrived, replayable);
            let mut last: Option<Failure> = None;
            loop {
                // The plugin reads the request's method, URI and headers: lent, not copied.
                lend(&mut head, &mut info);
                let next = attempts.next(&mut info);
                lend(&mut head, &mut info);
                let mut attempt = match next {
                    Ok(a) => a,
                    Err(Exhausted::NoBackend(why)) => {
                        let reply =
                            Reply::text(StatusCode::SERVICE_UNAVAILABLE, why.message(local));
                        return (reply, None, None);
                    }
                    Err(Exhausted::Failed) => break,
                };
                *tries = attempts.tries();
                let addr = attempt.backend().addr;
                let sent = if h2 {
                    // Boxed: HTTP/2's future is ~5 KiB, and inline it would be in every
                    // HTTP/1.1 exchange's future too (copied into its box per request).
                    Box::pin(self.attempt_h2(
                        &head, &mut body, &mut tee, trailers, &attempt, &settings, limit,
                    ))
                    .await
                    .map(|(res, slot)| Answer::H2(res, slot))
                } else {
                    self.attempt(
                        &head,
                        &mut body,
                        &attempts,
                        &attempt,
                        &settings,
                        limit,
                        timer.as_mut(),
                    )
                    .await
                    .map(|(res, framing, conn)| Answer::H1(res, framing, conn))
                };
                let sent = sent.map_err(|f| f.under(settings.timeouts.request));
                match sent {
                    Ok(answer) => {
                        let at = Instant::now();
                        let ok = !answer.status().is_server_error();
                        if ok && answer.body_follows() {
                            // Success or failure is the body's to tell.
                            attempt.guard.answered_head(at);
                        } else {
                            attempts.answered(&mut attempt, ok, at);
                        }
                        let reply = match answer {
                            Answer::H1(res, framing, conn) => {
                                self.respond(res, framing, conn, attempt.guard, &settings)
                            }
                            Answer::H2(res, slot) => {
                                self.respond_h2(res, slot, attempt.guard, &settings)
                            }
                        };
                        return (reply, Some(addr), Some(at));
                    }
                    Err(failure) if failure.backend().is_none() => {
                        return self.client_failed(failure);
                    }
                    Err(failure) => {
                        attempts.failed(attempt, &failure);
                        last = Some(failure);
                    }
                }
            }
            match last {
                Some(f) => (f.response(), f.backend(), None),
                None => {
                    let why = NoBackend::NoneHealthy.message(local);
                    let reply = Reply::text(StatusCode::SERVICE_UNAVAILABLE, why);
                    (reply, None, None)
                }
            }
        }
    }

    /// The client's doing: no retry, and nothing against the backend (the attempt's guard
    /// goes without an outcome), its health, the budget or its latency.
    fn client_failed(&self, failure: Failure) -> (Reply, Option<SocketAddr>, Option<Instant>) {
        let local = &self.local;
        tracing::debug!(listener = %local.shared.name, peer = %self.peer, error = %failure, "client error");
        local
            .metrics
            .refused(local.shared.index, refusal_reason(failure.status()));
        (failure.response(), None, None)
    }

    /// One attempt on an HTTP/2 backend: a stream on one of the worker's connections to
    /// it. A request the connection handed back unsent goes once more on a new connection
    /// to the same backend; the body goes up through `tee` (made on the first attempt),
    /// which keeps it for another attempt while it is small enough.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_h2(
        &self,
        head: &ReqHead,
        body: &mut Option<ReqBody>,
        tee: &mut Option<Tee>,
        trailers: bool,
        attempt: &Attempt,
        settings: &Settings,
        limit: Duration,
    ) -> Result<(Response<Incoming>, StreamSlot), Failure> {
        let backend = attempt.backend();
        if tee.is_none()
            && let Some(b) = body.take()
            && !b.is_end_stream()
        {
            *tee = Some(Tee::new(b));
        }
        let mut fresh = false;
        loop {
            let up = tee.as_ref().map_or_else(UpBody::empty, Tee::replay);
            let req = headers::h2_request(
                head,
                &self.client,
                settings.via,
                trailers,
                backend.address(),
                up,
            )
            .map_err(Failure::ClientRequest)?;
            let conns = &self.local.conns.h2;
            let sent = within(
                limit,
                conns.send(
                    backend.id,
                    backend.addr,
                    settings.timeouts.connect,
                    self.local.shared.upstream(),
                    req,
                    fresh,
                ),
                None,
            )
            .await;
            let client_failed = tee.as_ref().is_some_and(Tee::client_failed);
            return match sent {
                Some(Ok(res)) => Ok(res),
                Some(Err(_)) if client_failed => {
                    Err(Failure::ClientBody("the client's body failed".into()))
                }
                Some(Err(H2Error::Connect(e))) => Err(Failure::Connect(backend.addr, e)),
                Some(Err(H2Error::NotSent(_))) if !fresh => {
                    fresh = true;
                    continue;
                }
                Some(Err(e)) => {
                    let whole = tee.as_ref().is_none_or(Tee::whole);
                    Err(Failure::Stream(backend.addr, e, whole))
                }
                None if tee.as_ref().is_some_and(Tee::waiting_on_client) => {
                    Err(Failure::ClientStall(limit))
                }
                None => Err(Failure::Timeout(backend.addr, limit)),
            };
        }
    }

    /// An HTTP/2 backend's response, fit for the client (HTTP/2 has no hop-by-hop fields
    /// to take out); its body holds the stream's slot.
    fn respond_h2(
        &self,
        res: Response<Incoming>,
        slot: StreamSlot,
        guard: InFlight,
        settings: &Settings,
    ) -> Reply {
        let (mut parts, body) = res.into_parts();
        orca::take_map(&mut parts.headers, guard.backend(), &self.local);
        if let Some(code) = parts.headers.get("grpc-status") {
            // Trailers-Only: the call ended with its head.
            let local = &self.local;
            local
                .metrics
                .grpc_status(local.shared.index, code.as_bytes());
        }
        let blame = Blame {
            local: self.local.clone(),
            passive: settings.passive.consecutive_failures,
        };
        Reply {
            status: parts.status,
            fields: Fields::Map(parts.headers),
            body: ResBody::h2(body, slot, guard, blame),
        }
    }

    /// One attempt's exchange with its backend, on a pooled connection if a clean one is
    /// there. One the backend closed as the request went out ([`Retry::Fresh`]) answers
    /// nothing: the request goes again on a new connection to the same backend.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        head: &ReqHead,
        body: &mut Option<ReqBody>,
        attempts: &Attempts<'_>,
        attempt: &Attempt,
        settings: &Settings,
        limit: Duration,
        mut timer: Option<&mut Pin<&mut Sleep>>,
    ) -> Result<(BackendHead, Framing, BackendConn), Failure> {
        let backend = attempt.backend();
        let timeouts = &settings.timeouts;
        let head_only = head.method == Method::HEAD;
        let mut fresh = false;
        loop {
            let conn = if fresh {
                self.local
                    .conns
                    .connect(backend.addr, timeouts.connect, self.local.shared.upstream())
                    .await
            } else {
                let unasked = |bytes| attempts.unasked(backend, bytes);
                let conns = &self.local.conns;
                conns
                    .get(
                        backend.id,
                        backend.addr,
                        timeouts.connect,
                        self.local.shared.upstream(),
                        unasked,
                    )
                    .await
            };
            let mut conn = conn.map_err(|e| Failure::Connect(backend.addr, e))?;
            let sent = within(
                limit,
                conn.conn
                    .send(head, &self.client, body, head_only, settings.via),
                timer.as_mut().map(|t| t.as_mut()),
            )
            .await;
            return match sent {
                Some(Ok((res, framing))) => Ok((res, framing, conn.conn)),
                Some(Err(SendError {
                    kind: SendErrorKind::ClientBody(why),
                    ..
                })) => Err(Failure::ClientBody(why.to_string())),
                None if conn.conn.waiting_on_client() => Err(Failure::ClientStall(limit)),
                Some(Err(e)) => {
                    let failure = Failure::Exchange(backend.addr, e);
                    if conn.reused && !fresh && failure.retry(attempts.replayable()) == Retry::Fresh
                    {
                        fresh = true;
                        continue;
                    }
                    Err(failure)
                }
                None => Err(Failure::Timeout(backend.addr, limit)),
            };
        }
    }

    /// The backend's response, fit for the client; a protocol switch the client asked for
    /// (an unasked one never gets here) hands the backend connection over in the body.
    fn respond(
        &self,
        head: BackendHead,
        framing: Framing,
        conn: BackendConn,
        guard: InFlight,
        settings: &Settings,
    ) -> Reply {
        // Hop-by-hop headers were left out as the head was parsed (Upgrade kept for a
        // switch, whose `Connection: upgrade` the HTTP/1.1 server writes).
        let fields: Fields = super::orca::take_raw(head.fields, guard.backend(), &self.local);
        let body = if head.status == StatusCode::SWITCHING_PROTOCOLS {
            ResBody::switch(conn, guard)
        } else {
            let checkin = self.local.conns.checkin(guard.backend().id);
            let body = BackendBody::new(conn, framing, checkin, settings.timeouts.idle);
            // A body the backend cuts or stalls counts against it, as a failed head would.
            let blame = Blame {
                local: self.local.clone(),
                passive: settings.passive.consecutive_failures,
            };
            ResBody::backend(body, guard, blame)
        };
        Reply {
            status: head.status,
            fields,
            body,
        }
    }
}

/// The `reason` label of a request the proxy refused itself, by the status it answered.
pub(super) fn refusal_reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        405 => "method_not_allowed",
        408 => "timeout",
        504 => "deadline",
        413 => "too_large",
        431 => "head_too_large",
        501 => "not_implemented",
        505 => "version_not_supported",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(sent: bool, body_used: bool, nothing_back: bool) -> Failure {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e = SendError {
            kind: SendErrorKind::Closed,
            sent,
            body_used,
            nothing_back,
        };
        Failure::Exchange(addr, e)
    }

    /// The retry table the failover loop obeys: a request goes again only where nothing
    /// of it can have been acted on, or it can be sent again as it is.
    #[test]
    fn errors_decide_their_own_retry() {
        // A pooled connection closed as the request went out: again, on a new connection.
        assert_eq!(exchange(true, false, true).retry(true), Retry::Fresh);
        assert_eq!(exchange(false, false, true).retry(false), Retry::Fresh);
        // A POST that went out is never repeated, whatever came back.
        assert_eq!(exchange(true, false, true).retry(false), Retry::Never);
        assert_eq!(exchange(true, false, false).retry(false), Retry::Never);
        // Something came back, or the body is gone: another backend, if replayable.
        assert_eq!(exchange(true, false, false).retry(true), Retry::Elsewhere);
        assert_eq!(exchange(true, true, true).retry(true), Retry::Elsewhere);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let timeout = Failure::Timeout(addr, Duration::from_secs(1));
        assert_eq!(timeout.retry(true), Retry::Elsewhere);
        assert_eq!(timeout.retry(false), Retry::Never);
        let refused = ConnectError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(
            Failure::Connect(addr, refused).retry(false),
            Retry::Elsewhere
        );
        // The client's own failures are never retried.
        assert_eq!(Failure::ClientBody("cut".into()).retry(true), Retry::Never);
        // A timeout under the client's shorter deadline is the client's, not a backend's.
        let deadline =
            Failure::Timeout(addr, Duration::from_millis(200)).under(Duration::from_secs(30));
        assert!(deadline.backend().is_none());
        assert_eq!(deadline.retry(true), Retry::Never);
        assert_eq!(deadline.status(), StatusCode::GATEWAY_TIMEOUT);
        let own = Failure::Timeout(addr, Duration::from_secs(30)).under(Duration::from_secs(30));
        assert_eq!(own.backend(), Some(addr));
        assert_eq!(
            Failure::ClientStall(Duration::ZERO).retry(true),
            Retry::Never
        );
    }
}
