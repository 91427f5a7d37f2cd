//! HTTP/2 to backends (`backend_protocol = "h2c"`): each worker keeps a few multiplexed
//! connections per backend ([`H2Pool`]), and every request is a stream of its own, picked
//! by the plugin on its own (so one client connection carrying 50 calls spreads them over
//! the pool, and in-flight counts are streams). A connection carries streams up to the
//! peer's `MAX_CONCURRENT_STREAMS` (read from the connection as its settings arrive); when
//! every connection to a backend is full, another is opened.
//!
//! Replays are allowed only where HTTP/2 proves the backend never acted on the request: a
//! request hyper hands back unsent (the connection was closing), a stream the backend
//! refused (`REFUSED_STREAM`), or one above the last stream id of a graceful `GOAWAY`. A
//! request body is kept while it streams ([`Tee`]), up to [`REPLAY_LIMIT`], so that such
//! a request can go again even after its body started going up; past the limit it cannot.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::{Future as _, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use super::body::{BoxError, ReqBody};
use super::exec::LocalExec;
use super::sock::{self, ConnectError};
use crate::tls::Upstream;

/// How much of a request body is kept while it streams, so that a request the backend
/// provably did not process can go again: a gRPC unary call fits many times over.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// An idle connection (no stream) older than this is closed.
const IDLE_TTL: Duration = Duration::from_secs(30);

/// Connections per backend and worker: past it, streams wait for a free slot on the
/// least-loaded one (hyper queues them) rather than opening ever more.
const MAX_CONNS: usize = 16;

/// One worker's HTTP/2 connections, by backend id.
#[derive(Default)]
pub(crate) struct H2Pool {
    conns: RefCell<HashMap<u32, Vec<H2Conn>>>,
    /// Backends a connection is being made to: the streams that find every connection
    /// full wait for it instead of each making its own (50 calls arriving together would
    /// otherwise open 50 connections).
    connecting: RefCell<HashMap<u32, Rc<Notify>>>,
}

#[derive(Clone)]
struct H2Conn {
    send: SendRequest<UpBody>,
    state: Rc<ConnState>,
}

/// What the pool knows of a connection, kept current by its driver task.
struct ConnState {
    /// Streams open on it (requests sent whose response has not ended).
    streams: Cell<usize>,
    /// The peer's `MAX_CONCURRENT_STREAMS`, as last seen.
    max: Cell<usize>,
    /// The connection has ended.
    closed: Cell<bool>,
    /// When its last stream ended.
    idle_since: Cell<Instant>,
}

impl H2Conn {
    fn usable(&self) -> bool {
        !self.state.closed.get() && !self.send.is_closed()
    }

    fn has_room(&self) -> bool {
        self.state.streams.get() < self.state.max.get()
    }
}

/// A connect in progress to one backend, announced to the streams waiting for it when it
/// ends — or is dropped with its request (a timeout, a client gone).
struct Connecting<'a> {
    map: &'a RefCell<HashMap<u32, Rc<Notify>>>,
    id: u32,
    made: Rc<Notify>,
}

impl<'a> Connecting<'a> {
    fn start(map: &'a RefCell<HashMap<u32, Rc<Notify>>>, id: u32) -> Self {
        let made = Rc::new(Notify::new());
        map.borrow_mut().insert(id, made.clone());
        Connecting { map, id, made }
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut map = self.map.borrow_mut();
        if map.get(&self.id).is_some_and(|m| Rc::ptr_eq(m, &self.made)) {
            map.remove(&self.id);
        }
        self.made.notify_waiters();
    }
}

/// Holds a stream's slot on its connection until the response ends (or is dropped).
pub(crate) struct StreamSlot(Rc<ConnState>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let s = &self.0;
        s.streams.set(s.streams.get().saturating_sub(1));
        if s.streams.get() == 0 {
            s.idle_since.set(Instant::now());
        }
    }
}

/// Why a stream failed.
#[derive(Debug)]
pub(crate) enum H2Error {
    /// No connection could be made.
    Connect(ConnectError),
    /// The request never left the proxy (the connection was closing): it can go again as
    /// it is.
    NotSent(hyper::Error),
    /// The stream failed; `unprocessed`: HTTP/2 says the backend did not act on it.
    Stream {
        error: hyper::Error,
        unprocessed: bool,
    },
}

impl H2Error {
    /// Whether HTTP/2 says the backend never acted on the request.
    pub(crate) fn unprocessed(&self) -> bool {
        matches!(
            self,
            H2Error::NotSent(_)
                | H2Error::Stream {
                    unprocessed: true,
                    ..
                }
        )
    }
}

impl std::fmt::Display for H2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H2Error::Connect(e) => write!(f, "{e}"),
            H2Error::NotSent(e) => write!(f, "request not sent: {e}"),
            H2Error::Stream { error, .. } => match h2_error(error) {
                Some(h2) => write!(f, "{h2}"),
                None => write!(f, "{error}"),
            },
        }
    }
}

/// The HTTP/2 error under a hyper error, if that is what it is.
fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = s.source();
    }
    None
}

/// Whether the backend provably did not act on the stream (RFC 9113 §8.7): it refused it
/// (`REFUSED_STREAM`), or it went away gracefully (`GOAWAY` with `NO_ERROR`) and the
/// stream was above its last stream id (only those fail with a graceful GOAWAY; under a
/// GOAWAY with an error code every stream fails alike, processed or not).
fn unprocessed(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(|h2| {
        h2.is_remote()
            && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR)))
    })
}

impl H2Pool {
    /// Sends `req` to the backend `id` at `addr` on a connection with room for a stream
    /// (`fresh`: on a new one); the response head, and the stream's slot, which the
    /// response body keeps until it ends.
    pub(crate) async fn send(
        &self,
        id: u32,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
        req: Request<UpBody>,
        fresh: bool,
    ) -> Result<(Response<Incoming>, StreamSlot), H2Error> {
        let conn = loop {
            if let Some(c) = self.pick(id, fresh) {
                break c;
            }
            let pending = self.connecting.borrow().get(&id).cloned();
            if let Some(made) = pending
                && !fresh
            {
                // Registered at once: the connect's end cannot be missed.
                made.notified().await;
                continue;
            }
            let made = Connecting::start(&self.connecting, id);
            let connected = connect(addr, connect_timeout, tls).await;
            drop(made);
            let c = connected.map_err(H2Error::Connect)?;
            let mut all = self.conns.borrow_mut();
            let list = all.entry(id).or_default();
            list.retain(H2Conn::usable);
            list.push(c.clone());
            break c;
        };
        conn.state.streams.set(conn.state.streams.get() + 1);
        let slot = StreamSlot(conn.state.clone());
        let mut send = conn.send;
        match send.try_send_request(req).await {
            Ok(res) => Ok((res, slot)),
            Err(e) => {
                let sent = e.message().is_none();
                let error = e.into_error();
                if sent {
                    let unprocessed = unprocessed(&error);
                    Err(H2Error::Stream { error, unprocessed })
                } else {
                    Err(H2Error::NotSent(error))
                }
            }
        }
    }

    /// A live connection to `id` with room for a stream; none (a new one is wanted) when
    /// every one is full and there are fewer than [`MAX_CONNS`], or when `fresh`.
    fn pick(&self, id: u32, fresh: bool) -> Option<H2Conn> {
        let mut all = self.conns.borrow_mut();
        let Entry::Occupied(mut entry) = all.entry(id) else {
            return None;
        };
        let list = entry.get_mut();
        list.retain(H2Conn::usable);
        if fresh || list.is_empty() {
            return None;
        }
        if let Some(c) = list.iter().find(|c| c.has_room()) {
            return Some(c.clone());
        }
        if list.len() < MAX_CONNS {
            return None;
        }
        list.iter().min_by_key(|c| c.state.streams.get()).cloned()
    }

    /// Closes connections idle for [`IDLE_TTL`] and forgets ended ones.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.conns.borrow_mut().retain(|_, list| {
            list.retain(|c| {
                c.usable()
                    && (c.state.streams.get() > 0
                        || now.duration_since(c.state.idle_since.get()) < IDLE_TTL)
            });
            !list.is_empty()
        });
    }
}

/// A new HTTP/2 connection (prior knowledge) to `addr`, its driver spawned on this worker.
async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&Upstream>,
) -> Result<H2Conn, ConnectError> {
    let stream = sock::connect_stream(addr, connect_timeout, tls).await?;
    let (send, conn) = Builder::new(LocalExec)
        .handshake::<_, UpBody>(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Io(std::io::Error::other(e)))?;
    let state = Rc::new(ConnState {
        streams: Cell::new(0),
        // hyper's assumption until the peer's SETTINGS arrive (RFC 9113 §6.5.2: 100 is
        // the least a peer should allow).
        max: Cell::new(conn.current_max_send_streams()),
        closed: Cell::new(false),
        idle_since: Cell::new(Instant::now()),
    });
    let driven = state.clone();
    tokio::task::spawn_local(async move {
        let mut conn = pin!(conn);
        let done = poll_fn(|cx| {
            let polled = conn.as_mut().poll(cx);
            driven.max.set(conn.current_max_send_streams().max(1));
            polled
        })
        .await;
        driven.closed.set(true);
        if let Err(error) = done {
            tracing::debug!(backend = %addr, %error, "HTTP/2 backend connection ended with an error");
        }
    });
    Ok(H2Conn { send, state })
}

/// A request body as it goes up to an HTTP/2 backend, kept (up to [`REPLAY_LIMIT`]) so
/// that the request can be sent again ([`Tee::replay`]).
pub(crate) struct Tee {
    state: Rc<RefCell<TeeState>>,
}

struct TeeState {
    /// The client's body; none once it ended.
    inner: Option<ReqBody>,
    /// The frames pulled from it so far, while they fit the limit.
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// Frames pulled from `inner` so far.
    pulled: usize,
    /// More than the limit went up: no replay.
    overflow: bool,
    /// The client's body failed: the client's fault, not the backend's.
    client_failed: bool,
    /// The last read of the client's body found nothing yet.
    waiting: bool,
    /// The body's exact length, when known (its `content-length`).
    exact: Option<u64>,
}

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Tee {
    /// Keeps `body` for the attempts of one request; an HTTP/1.1 client waiting for
    /// `100 Continue` gets it now, as the upload starts.
    pub(crate) fn new(mut body: ReqBody) -> Self {
        body.start();
        let exact = body.size_hint().exact();
        Tee {
            state: Rc::new(RefCell::new(TeeState {
                inner: Some(body),
                kept: Vec::new(),
                kept_bytes: 0,
                pulled: 0,
                overflow: false,
                client_failed: false,
                waiting: false,
                exact,
            })),
        }
    }

    /// The body from its start, for the next attempt. Once more than the limit has gone
    /// up it fails where the copy ends (the failover loop does not get that far: such a
    /// request is not sent again, see [`Tee::whole`]).
    pub(crate) fn replay(&self) -> UpBody {
        UpBody {
            tee: Some(self.state.clone()),
            pos: 0,
        }
    }

    /// Whether the body can still be sent again from its start.
    pub(crate) fn whole(&self) -> bool {
        !self.state.borrow().overflow
    }

    /// Whether the client's body failed (bad framing, the client went away).
    pub(crate) fn client_failed(&self) -> bool {
        self.state.borrow().client_failed
    }

    /// Whether the upload waits for the client's next bytes: a backend that waits too is
    /// not at fault.
    pub(crate) fn waiting_on_client(&self) -> bool {
        let st = self.state.borrow();
        st.waiting && st.inner.is_some()
    }
}

/// One attempt's request body: the kept frames first, then the rest of the client's.
pub(crate) struct UpBody {
    tee: Option<Rc<RefCell<TeeState>>>,
    pos: usize,
}

impl UpBody {
    /// No body.
    pub(crate) fn empty() -> Self {
        UpBody { tee: None, pos: 0 }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(tee) = &this.tee else {
            return Poll::Ready(None);
        };
        let mut st = tee.borrow_mut();
        if this.pos < st.pulled {
            // A replay: what went up before, from the copy.
            let frame = match st.kept.get(this.pos) {
                Some(Kept::Data(d)) => Frame::data(d.clone()),
                Some(Kept::Trailers(t)) => Frame::trailers(t.clone()),
                None => return Poll::Ready(Some(Err("request body no longer kept".into()))),
            };
            this.pos += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(inner) = st.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let Poll::Ready(polled) = Pin::new(inner).poll_frame(cx) else {
            st.waiting = true;
            return Poll::Pending;
        };
        st.waiting = false;
        match &polled {
            None => st.inner = None,
            Some(Err(_)) => {
                st.client_failed = true;
                st.overflow = true;
                st.inner = None;
            }
            Some(Ok(frame)) => {
                st.pulled += 1;
                this.pos += 1;
                if !st.overflow {
                    let size = frame.data_ref().map_or(0, Bytes::len);
                    if st.kept_bytes + size > REPLAY_LIMIT {
                        st.overflow = true;
                        st.kept = Vec::new();
                    } else if let Some(d) = frame.data_ref() {
                        st.kept_bytes += size;
                        st.kept.push(Kept::Data(d.clone()));
                    } else if let Some(t) = frame.trailers_ref() {
                        st.kept.push(Kept::Trailers(t.clone()));
                    }
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        let Some(tee) = &self.tee else {
            return true;
        };
        let st = tee.borrow();
        self.pos >= st.pulled && st.inner.as_ref().is_none_or(ReqBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.tee {
            None => SizeHint::with_exact(0),
            Some(tee) if self.pos == 0 => match tee.borrow().exact {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Some(_) => SizeHint::default(),
        }
    }
}
