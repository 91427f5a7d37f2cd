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

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::Settings;
use super::access_log::Pending;
use super::body::{BackendBody, Blame, Framing, ReqBody, ResBody};
use super::client::{BackendConn, BackendHead, ConnectError, SendError, SendErrorKind};
use super::h1;
use super::headers::{self, ReqHead};
use super::worker::{Drain, LocalListener, NoBackend, Tried};
use crate::fields::Fields;
use crate::plugin::{Protocol, RequestInfo};
use crate::pool::InFlight;

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Serves one client connection until it closes, goes idle for `timeouts.idle`, or the
/// worker drains (then in-flight requests finish and the connection closes gracefully).
/// HTTP/1.1 is the proxy's own server ([`super::h1`]); HTTP/2 (prior knowledge) is hyper's.
pub(super) async fn serve(
    local: Rc<LocalListener>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: Rc<Drain>,
) {
    let idle = local.state().1.timeouts.idle;
    // Boxed, as both protocols' states below: the task's own future stays a few words.
    let detect = async {
        tokio::select! {
            // None: closed first, or silent for the idle timeout.
            detected = tokio::time::timeout(idle, speaks_h2(&stream)) => detected.ok().flatten(),
            () = drain.started() => None,
        }
    };
    let Some(h2) = Box::pin(detect).await else {
        return; // closed, silent, or the worker drains
    };
    let client = headers::client_value(peer.ip());
    let ctx = Rc::new(ConnCtx {
        local: local.clone(),
        peer,
        client,
    });
    // Each protocol's state in its own allocation, sized for that protocol: an idle
    // HTTP/1.1 connection carries no room for an HTTP/2 one.
    if h2 {
        Box::pin(serve_h2(local, ctx, stream, peer, drain, idle)).await;
    } else {
        Box::pin(h1::serve(ctx, stream, drain, idle)).await;
    }
}

/// Serves HTTP/2 (prior knowledge) on `stream` with hyper.
async fn serve_h2(
    local: Rc<LocalListener>,
    ctx: Rc<ConnCtx>,
    stream: TcpStream,
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

/// Requests in progress on an HTTP/2 client connection, and when the last one ended: what
/// the idle timeout looks at.
pub(super) struct Activity {
    active: Cell<u32>,
    last: Cell<tokio::time::Instant>,
}

/// Marks its connection busy until dropped (with the response body).
pub(crate) struct ActivityGuard(Rc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.active.set(a.active.get().saturating_sub(1));
        a.last.set(tokio::time::Instant::now());
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            active: Cell::new(0),
            last: Cell::new(tokio::time::Instant::now()),
        }
    }

    fn begin(self: &Rc<Self>) -> ActivityGuard {
        self.active.set(self.active.get() + 1);
        ActivityGuard(self.clone())
    }

    /// Resolves once nothing has been in progress for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            if self.active.get() > 0 {
                tokio::time::sleep(idle).await;
                continue;
            }
            let due = self.last.get() + idle;
            if due <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One client connection, as its requests are forwarded.
pub(super) struct ConnCtx {
    local: Rc<LocalListener>,
    peer: SocketAddr,
    /// The client's address as an `X-Forwarded-For` element.
    client: HeaderValue,
}

/// Why an attempt failed.
enum Failure {
    Connect(SocketAddr, ConnectError),
    Exchange(SocketAddr, SendError),
    Timeout(SocketAddr, Duration),
    /// The client's request body failed (bad framing found mid-body, the client went
    /// away): the client's fault, never the backend's.
    ClientBody(String),
    /// The request timed out while the proxy was waiting for the client's body.
    ClientStall(Duration),
}

impl Failure {
    /// The backend at fault; none when the client is.
    fn backend(&self) -> Option<SocketAddr> {
        match self {
            Failure::Connect(a, _) | Failure::Exchange(a, _) | Failure::Timeout(a, _) => Some(*a),
            Failure::ClientBody(_) | Failure::ClientStall(_) => None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Failure::Connect(_, ConnectError::Timeout(_)) | Failure::Timeout(..) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Failure::Connect(..) | Failure::Exchange(..) => StatusCode::BAD_GATEWAY,
            Failure::ClientBody(_) => StatusCode::BAD_REQUEST,
            Failure::ClientStall(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn response(&self) -> Reply {
        ConnCtx::text(self.status(), self.to_string())
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
            Failure::Timeout(a, d) => write!(f, "backend {a} did not answer within {d:?}"),
            Failure::ClientBody(why) => write!(f, "request body: {why}"),
            Failure::ClientStall(d) => {
                write!(f, "request body not received within {d:?}")
            }
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
        timer.as_mut().reset(due); // first use, or a shorter limit since a reload
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

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl ConnCtx {
    /// The proxy's own answer: `<code> <cause>` on one line.
    pub(super) fn text(status: StatusCode, cause: String) -> Reply {
        let mut fields = HeaderMap::with_capacity(1);
        fields.insert(header::CONTENT_TYPE, TEXT);
        Reply {
            status,
            fields: Fields::Map(fields),
            body: ResBody::text(format!("{} {cause}\n", status.as_u16())),
        }
    }

    /// The client's address.
    pub(super) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The proxy's answer to a request refused before its head was whole (400, 408, 431…),
    /// access-logged like any other.
    pub(super) fn refusal(&self, status: StatusCode, cause: String) -> Reply {
        let mut res = ConnCtx::text(status, cause);
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
            res.body.log(line);
        }
        res
    }

    /// One request, forwarded, and recorded in the metrics (and the access log, when the
    /// response ends). `upgrade`: the client asks to
    /// switch protocols (HTTP/1.1 only); a `101` answer then carries the backend
    /// connection in its body ([`ResBody::take_switch`]). `timer`: the connection's own
    /// request timer, when it carries one request at a time (see [`within`]).
    pub(super) async fn exchange(
        &self,
        head: ReqHead,
        body: Option<ReqBody>,
        timer: Option<Pin<&mut Sleep>>,
    ) -> Reply {
        let start = Instant::now();
        let local = &self.local;
        let pending = local
            .log
            .enabled()
            .then(|| Pending::begin(&local.log, self.peer.ip(), &head, start));
        let mut tries = 0;
        let (mut res, backend, answered) = self.forward(head, body, start, timer, &mut tries).await;
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
        res
    }

    /// Forwards with failover; returns the response, the backend that answered or failed
    /// last, and when the response head arrived (none for the proxy's own answers).
    async fn forward(
        &self,
        mut head: ReqHead,
        mut body: Option<ReqBody>,
        arrived: Instant,
        mut timer: Option<Pin<&mut Sleep>>,
        tries: &mut usize,
    ) -> (Reply, Option<SocketAddr>, Option<Instant>) {
        let local = &self.local;
        let shared = &local.shared;
        let (view, settings) = local.state();
        // First: the key and the plugin see the request as the backend will (an
        // absolute-form target's authority as its Host).
        headers::prepare_request(&mut head);
        let hash_key = headers::hash_key(settings.hash_key.as_ref(), &head, self.peer.ip());
        let upgrade = head.upgrade;
        let head_only = head.method == Method::HEAD;
        // `body` is taken by the first exchange that sends it. Sent and failed, the request
        // may go again: the head is still here (the client only borrows it), and there is
        // no body to have lost.
        let replayable = !upgrade
            && idempotent(&head.method)
            && body.as_ref().is_none_or(ReqBody::is_end_stream);
        let attempts = settings.retry.attempts.max(1);
        local.budget.deposit(settings.retry.budget_percent);
        let passive = settings.passive.consecutive_failures;

        let mut info = RequestInfo {
            protocol: Protocol::Http,
            client_ip: self.peer.ip(),
            hash_key,
            ..RequestInfo::default()
        };
        let mut tried = Tried::default();
        let mut last: Option<Failure> = None;
        // Whether the request can still go to another backend.
        let mut can_retry = true;
        for attempt in 0..attempts {
            if !can_retry {
                break;
            }
            if attempt > 0 {
                if !local.budget.withdraw() {
                    tracing::debug!(listener = %shared.name, "retry budget exhausted");
                    break;
                }
                local.metrics.retry(shared.index);
            }
            // The plugin reads the request's method, URI and headers: lent, not copied.
            info.attempt = attempt;
            info.method = std::mem::take(&mut head.method);
            info.uri = std::mem::take(&mut head.uri);
            std::mem::swap(&mut info.headers, &mut head.fields);
            let pick = local.choose(&view, &mut info, tried.as_slice());
            head.method = std::mem::take(&mut info.method);
            head.uri = std::mem::take(&mut info.uri);
            std::mem::swap(&mut info.headers, &mut head.fields);
            let index = match pick {
                Ok(i) => i,
                Err(why) if attempt == 0 => {
                    return (
                        ConnCtx::text(StatusCode::SERVICE_UNAVAILABLE, why.message(local)),
                        None,
                        None,
                    );
                }
                Err(_) => break,
            };
            let Some(backend) = view.snapshot.backend(index) else {
                break;
            };
            tried.push(index);
            *tries = tried.as_slice().len();
            // The first attempt starts with the request (one clock read less).
            let mut guard = if attempt == 0 {
                InFlight::start_at(backend.clone(), arrived)
            } else {
                InFlight::start(backend.clone())
            };

            // A pooled connection the backend closed as the request went out answers
            // nothing: the request goes again on a fresh connection to the same backend,
            // if nothing of it can have been acted on (or it may be repeated anyway).
            let mut fresh = false;
            let failure = loop {
                let conn = if fresh {
                    local
                        .conns
                        .connect(backend.addr, settings.timeouts.connect)
                        .await
                } else {
                    let unsolicited = |bytes| {
                        tracing::warn!(listener = %shared.name, backend = %backend.addr, bytes,
                            "backend sent bytes nobody asked for on an idle connection; closed it");
                        if backend.failed_unasked(passive) {
                            shared.eject(backend.clone());
                        }
                    };
                    local
                        .conns
                        .get(
                            backend.id,
                            backend.addr,
                            settings.timeouts.connect,
                            unsolicited,
                        )
                        .await
                };
                let mut conn = match conn {
                    Ok(c) => c,
                    Err(e) => break Failure::Connect(backend.addr, e),
                };
                let sent = within(
                    settings.timeouts.request,
                    conn.conn
                        .send(&head, &self.client, &mut body, head_only, settings.via),
                    timer.as_mut().map(|t| t.as_mut()),
                )
                .await;
                match sent {
                    Some(Ok((head, framing))) => {
                        let at = Instant::now();
                        let ok = !head.status.is_server_error();
                        let body_follows = ok
                            && head.status != StatusCode::SWITCHING_PROTOCOLS
                            && !matches!(framing, Framing::Length(0, _));
                        if body_follows {
                            guard.answered_head(at);
                        } else if guard.answered(ok, at, passive) {
                            shared.eject(backend.clone());
                        }
                        let res = self.respond(head, framing, conn.conn, guard, &settings);
                        return (res, Some(backend.addr), Some(at));
                    }
                    Some(Err(SendError {
                        kind: SendErrorKind::ClientBody(why),
                        ..
                    })) => break Failure::ClientBody(why.to_string()),
                    None if conn.conn.waiting_on_client() => {
                        break Failure::ClientStall(settings.timeouts.request);
                    }
                    Some(Err(e)) => {
                        can_retry &= replayable || !e.sent;
                        if e.nothing_back
                            && conn.reused
                            && !fresh
                            && !e.body_used
                            && (replayable || !e.sent)
                        {
                            fresh = true;
                            continue;
                        }
                        break Failure::Exchange(backend.addr, e);
                    }
                    None => {
                        can_retry &= replayable;
                        break Failure::Timeout(backend.addr, settings.timeouts.request);
                    }
                }
            };
            if failure.backend().is_none() {
                // The client's doing: no retry, and nothing against the backend (the guard
                // goes without an outcome), its health, the budget or its latency.
                tracing::debug!(listener = %shared.name, peer = %self.peer, error = %failure, "client error");
                local
                    .metrics
                    .refused(shared.index, refusal_reason(failure.status()));
                return (failure.response(), None, None);
            }
            if guard.finish(false, None, passive) {
                shared.eject(backend.clone());
            }
            tracing::debug!(listener = %shared.name, backend = %backend.addr, attempt, error = %failure, "attempt failed");
            last = Some(failure);
        }
        match last {
            Some(f) => (f.response(), f.backend(), None),
            None => (
                ConnCtx::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    NoBackend::Healthy.message(local),
                ),
                None,
                None,
            ),
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
            fields: Fields::Raw(head.fields),
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
        413 => "too_large",
        431 => "head_too_large",
        501 => "not_implemented",
        505 => "version_not_supported",
        _ => "other",
    }
}

/// A response as the proxy sends it to its client: a backend's head and body, or the
/// proxy's own answer. HTTP/1.1 clients get the backend's fields copied as they came;
/// HTTP/2 ones get them as a map ([`Reply::into_response`]).
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) fields: Fields,
    pub(crate) body: ResBody,
}

impl Reply {
    /// The response for hyper (HTTP/2 clients). A field the `http` crate refuses (httparse
    /// is a little more lenient with values) makes it a 502.
    pub(crate) fn into_response(self) -> Response<ResBody> {
        match self.fields.into_map() {
            Ok(headers) => {
                let mut res = Response::new(self.body);
                *res.status_mut() = self.status;
                *res.headers_mut() = headers;
                res
            }
            Err(why) => ConnCtx::text(
                StatusCode::BAD_GATEWAY,
                format!("backend sent an unusable head: {why}"),
            )
            .into_response(),
        }
    }
}
