//! The backend side of the HTTP path: one worker's keep-alive HTTP/1.1 connections
//! ([`ConnPool`]), the exchange on one of them ([`BackendConn::send`]) and the response
//! body read off it ([`BackendBody`]). The bytes' meaning is the codec's
//! ([`lbwasm_http`]); the sockets, the pool and the timers are here.
//!
//! Pingora's design rather than hyper's client: the request's own task writes the head,
//! reads the response head and then streams the body straight off the socket
//! ([`BackendBody`]). hyper's client runs a task per connection and hands
//! requests, responses and every body chunk across channels, which cost several task
//! wake-ups per request; measured on this path, that was most of the proxy's user time.
//! The head is serialised from a borrowed [`ReqHead`], so a failed bodiless request can be sent
//! again without having been copied.
//!
//! The pool is owned by one worker thread: a checkout is a `RefCell` borrow. An idle
//! connection has no task. Whether the backend closed it is probed at checkout for requests
//! that could not be repeated, and found out by the exchange itself for the others (which
//! then go again on a fresh connection); the sweeper closes dead idle ones.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body as _, SizeHint};
use http_body_util::BodyExt as _;
use lbwasm_http::{
    BodyDecoder, CHUNK_END, Decoded, Framing, LAST_CHUNK, MAX_HEAD, ReqHead, ResponseHead,
    parse_response, push_size_line,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use super::body::{BoxError, ReqBody};
use super::h2c::H2Pool;
use super::headers;
use super::sock::{self, ConnectError, write_all};
use super::stream::Stream;
use crate::tls::Upstream;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed (backends close theirs eventually too;
/// reusing one just as it closes costs a retry).
const IDLE_TTL: Duration = Duration::from_secs(30);
/// Interim (1xx) responses accepted before the final one: a backend streaming them
/// forever would keep the request busy for nothing.
const MAX_INTERIM: usize = 16;
/// Read buffer growth step while a body streams.
const BODY_READ: usize = 16 * 1024;

/// One worker's connections to backends, by backend id: idle HTTP/1.1 ones, and the
/// HTTP/2 ones that carry many requests at once.
#[derive(Default)]
pub(crate) struct ConnPool {
    idle: RefCell<HashMap<u32, Vec<Idle>>>,
    pub(crate) h2: H2Pool,
}

struct Idle {
    conn: BackendConn,
    since: Instant,
}

/// A connection ready for one request.
pub(crate) struct Conn {
    /// The connection.
    pub(crate) conn: BackendConn,
    /// True if it came from the pool (it may have been closed by the backend meanwhile).
    pub(crate) reused: bool,
}

/// Returns a connection to its worker's pool once its response has been read to the end.
pub(crate) struct Checkin {
    pool: Rc<ConnPool>,
    backend: u32,
}

impl Checkin {
    /// Puts `conn` back for the next request to the same backend.
    pub(crate) fn release(self, conn: BackendConn) {
        self.pool.put(self.backend, conn);
    }
}

impl ConnPool {
    /// A pooled connection to `backend` if one is provably clean, else a new one. Every
    /// idle connection is peeked at first (one system call): one the backend closed is
    /// dropped, and one on which it sent bytes nobody asked for (a second response, a body
    /// after a HEAD answer) is dropped too and `unsolicited` is called, never handed to a
    /// request, whose client would read those bytes as its answer.
    pub(crate) async fn get(
        &self,
        backend: u32,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
        unsolicited: impl FnOnce(usize),
    ) -> Result<Conn, ConnectError> {
        let mut unsolicited = Some(unsolicited);
        loop {
            let idle = self.idle.borrow_mut().get_mut(&backend).and_then(Vec::pop);
            let Some(idle) = idle else { break };
            match idle.conn.idle_state() {
                IdleState::Clean => {
                    return Ok(Conn {
                        conn: idle.conn,
                        reused: true,
                    });
                }
                IdleState::Closed => {}
                IdleState::Unsolicited(n) => {
                    if let Some(report) = unsolicited.take() {
                        report(n);
                    }
                }
            }
        }
        self.connect(addr, connect_timeout, tls).await
    }

    /// A new connection, bypassing the idle ones.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
    ) -> Result<Conn, ConnectError> {
        // Boxed: a connect (TLS included) is ~1.6 KiB of future that a reused connection,
        // the common case, would otherwise carry in every exchange's future.
        let stream = Box::pin(sock::connect_stream(addr, connect_timeout, tls)).await?;
        Ok(Conn {
            conn: BackendConn {
                stream: Rc::new(stream),
                buf: BytesMut::new(),
                out: Vec::new(),
                upload: None,
                upload_task: None,
                answered_early: false,
                upload_state: Rc::new(Cell::new(Upload::Moving)),
            },
            reused: false,
        })
    }

    /// What returns a connection to `backend` here when its response is done.
    pub(crate) fn checkin(self: &Rc<Self>, backend: u32) -> Checkin {
        Checkin {
            pool: self.clone(),
            backend,
        }
    }

    fn put(&self, backend: u32, mut conn: BackendConn) {
        // Idle, a connection holds no read buffer: the next response takes one.
        conn.buf = BytesMut::new();
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(backend).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes idle connections that are stale, that their backend closed or that carry
    /// bytes nobody asked for, and forgets the lists of backends that are gone.
    pub(crate) fn sweep(&self) {
        self.h2.sweep();
        let now = Instant::now();
        self.idle.borrow_mut().retain(|backend, list| {
            list.retain(|c| {
                now.duration_since(c.since) < IDLE_TTL
                    && match c.conn.idle_state() {
                        IdleState::Clean => true,
                        IdleState::Closed => false,
                        IdleState::Unsolicited(bytes) => {
                            tracing::warn!(
                                backend,
                                bytes,
                                "backend sent bytes on an idle connection; closed it"
                            );
                            false
                        }
                    }
            });
            !list.is_empty()
        });
    }
}

/// An HTTP/1.1 connection to a backend, between exchanges or during one.
pub(crate) struct BackendConn {
    /// Shared with the task uploading a request body, while there is one.
    pub(crate) stream: Rc<Stream>,
    /// Bytes read and not yet consumed (the rest of a body, after its head).
    pub(crate) buf: BytesMut,
    /// The request head being written (kept: its capacity serves the next request).
    out: Vec<u8>,
    /// How the upload of a request body still going up alongside the response ends.
    upload: Option<oneshot::Receiver<Result<(), SendErrorKind>>>,
    /// The upload's task, stopped with the connection: a backend that answered early and
    /// stopped reading must not keep the client's body flowing into nowhere.
    upload_task: Option<AbortOnDrop>,
    /// The backend answered before all of the request body had gone up. What it does with
    /// the rest is unknown (a server that answers early may parse it as the next request),
    /// so the connection is not reused. Stricter than NGINX, which only checks that the
    /// body was all sent by the response's end (`request_body_sent`): a body that finishes
    /// going up during the response is just as unread by a server that answered early.
    answered_early: bool,
    /// Where the upload of a request body stands: waiting for the client's next bytes, or
    /// failed by the client, a backend that waits too is not at fault.
    upload_state: Rc<Cell<Upload>>,
}

/// Where the upload of a request body stands, as the response side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upload {
    /// No upload, or it is writing to the backend, or it is done.
    Moving,
    /// Waiting for the client to send more.
    WaitingOnClient,
    /// The client's body failed (bad framing, the client went away).
    ClientFailed,
}

/// What an idle connection holds when it is looked at.
enum IdleState {
    /// Nothing: it can carry a request.
    Clean,
    /// The backend closed it (or it failed).
    Closed,
    /// Bytes nobody asked for (at least this many).
    Unsolicited(usize),
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How an exchange failed, and whether the request may simply be sent again.
#[derive(Debug)]
pub(crate) struct SendError {
    /// What went wrong.
    pub(crate) kind: SendErrorKind,
    /// Some of the request was written: only a replayable request may go again.
    pub(crate) sent: bool,
    /// The request body was (partly) consumed: it cannot be sent again at all.
    pub(crate) body_used: bool,
    /// Not a byte of response came back: on a reused connection, the backend most likely
    /// closed it as the request went out.
    pub(crate) nothing_back: bool,
}

/// What went wrong in an exchange.
#[derive(Debug)]
pub(crate) enum SendErrorKind {
    /// Reading or writing the backend socket failed.
    Io(io::Error),
    /// The backend closed the connection before a complete response head.
    Closed,
    /// The response head is not valid HTTP/1.x.
    Invalid(String),
    /// The client's request body failed while it was being forwarded.
    ClientBody(BoxError),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            SendErrorKind::Io(e) => write!(f, "{e}"),
            SendErrorKind::Closed => write!(f, "connection closed before a response"),
            SendErrorKind::Invalid(why) => write!(f, "invalid response: {why}"),
            SendErrorKind::ClientBody(e) => write!(f, "client request body failed: {e}"),
        }
    }
}

impl BackendConn {
    /// Looks at an idle connection without consuming anything: a non-blocking peek, so
    /// that bytes the reactor has not reported yet are seen too.
    fn idle_state(&self) -> IdleState {
        let mut probe = [MaybeUninit::<u8>::uninit(); 64];
        if self.stream.has_buffered() {
            return IdleState::Unsolicited(1);
        }
        match socket2::SockRef::from(self.stream.tcp()).peek(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => IdleState::Clean,
            Err(_) | Ok(0) => IdleState::Closed,
            Ok(n) if self.stream.is_tls() => {
                // TLS records: session tickets and the like are the session's own; only
                // plaintext (or the end) says something about the connection.
                let mut scratch = BytesMut::new();
                match self.stream.read_buf(&mut scratch) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => IdleState::Clean,
                    Err(_) | Ok(0) => IdleState::Closed,
                    Ok(_) => IdleState::Unsolicited(n),
                }
            }
            Ok(n) => IdleState::Unsolicited(n),
        }
    }

    /// Whether the backend's silence is the client's doing: the request body it waits for
    /// is stalled or broken on the client's side.
    pub(crate) fn waiting_on_client(&self) -> bool {
        self.upload_state.get() != Upload::Moving
    }

    /// Sends `head` (already prepared for the backend) from `client` (its `X-Forwarded-For`
    /// element) with `body`, and reads the response
    /// head. `head_only`: a HEAD request, whose response has no body whatever it says.
    /// `via`: add a `Via` field (a listener setting, off by default).
    ///
    /// A body goes up in its own task, full duplex: a backend may answer before it has read
    /// all of it (an early 413, or an echo that streams), and must not be left blocked
    /// writing while the proxy is blocked writing to it. The body is taken (it can be sent
    /// once); the upload's end decides, with the response's, whether the connection is
    /// reused.
    pub(crate) async fn send(
        &mut self,
        req: &ReqHead,
        client: &headers::Forwarded,
        body: &mut Option<ReqBody>,
        head_only: bool,
        via: bool,
    ) -> Result<(ResponseHead, Framing), SendError> {
        let fail = |kind, sent, body_used| SendError {
            kind,
            sent,
            body_used,
            nothing_back: true,
        };
        let bodyless = body.as_ref().is_none_or(ReqBody::is_end_stream);
        let length = body.as_ref().and_then(|b| b.size_hint().exact());
        let chunked = !bodyless && length.is_none();
        headers::encode_request(
            &mut self.out,
            req,
            client,
            via,
            if bodyless { None } else { length },
            chunked,
        );
        if let Err(e) = write_all(&self.stream, &self.out, None).await {
            return Err(fail(SendErrorKind::Io(e), true, false));
        }
        self.upload = None;
        self.upload_task = None;
        self.answered_early = false;
        let mut uploading = None;
        if !bodyless && let Some(mut body) = body.take() {
            body.start();
            self.upload_state.set(Upload::Moving);
            let (tx, rx) = oneshot::channel();
            let stream = self.stream.clone();
            let state = self.upload_state.clone();
            self.upload_task = Some(AbortOnDrop(tokio::task::spawn_local(async move {
                let _ = tx.send(upload(&stream, body, chunked, &state).await);
            })));
            uploading = Some(rx);
        }
        self.buf.clear();
        let mut interim = 0;
        loop {
            let head = match uploading.as_mut() {
                None => self.read_head(head_only).await,
                Some(rx) => {
                    let head = self.read_head(head_only);
                    tokio::pin!(head);
                    tokio::select! {
                        biased;
                        h = &mut head => h,
                        up = rx => match up {
                            Ok(Ok(())) => {
                                uploading = None;
                                head.await
                            }
                            Ok(Err(kind)) => return Err(fail(kind, true, true)),
                            Err(_) => return Err(fail(SendErrorKind::Closed, true, true)),
                        },
                    }
                }
            };
            let (head, framing) = head.map_err(|(kind, read)| {
                let mut e = fail(kind, true, !bodyless);
                e.nothing_back = read == 0;
                e
            })?;
            // A switch nobody asked for: the connection now speaks something else, and the
            // request got no answer. The backend's fault, and retried like one.
            if head.status == StatusCode::SWITCHING_PROTOCOLS && !req.upgrade {
                return Err(SendError {
                    kind: SendErrorKind::Invalid("switched protocols unasked".into()),
                    sent: true,
                    body_used: !bodyless,
                    nothing_back: false,
                });
            }
            // Interim answers (100 Continue, 103 Early Hints) are not forwarded: the final
            // one follows on the same connection.
            if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                interim += 1;
                if interim > MAX_INTERIM {
                    return Err(SendError {
                        kind: SendErrorKind::Invalid(format!(
                            "more than {MAX_INTERIM} interim responses"
                        )),
                        sent: true,
                        body_used: !bodyless,
                        nothing_back: false,
                    });
                }
                continue;
            }
            // Answered before all of the body went up: it goes on going up while the
            // response comes down, and the connection closes after it.
            self.answered_early = match uploading.as_mut().map(|rx| rx.try_recv()) {
                None => false,
                Some(Ok(Ok(()))) => {
                    uploading = None;
                    false
                }
                Some(_) => true,
            };
            self.upload = uploading;
            return Ok((head, framing));
        }
    }

    /// Whether the connection can carry another request: the response came after all of
    /// the request body, nothing unread, nobody else holding the socket.
    pub(crate) fn reusable(&mut self) -> bool {
        if self.answered_early {
            return false;
        }
        if let Some(rx) = self.upload.as_mut() {
            match rx.try_recv() {
                Ok(Ok(())) => {
                    self.upload = None;
                    self.upload_task = None;
                }
                _ => return false,
            }
        }
        self.buf.is_empty() && Rc::strong_count(&self.stream) == 1
    }

    /// Reads one response head; on error, also says how many bytes had come back.
    async fn read_head(
        &mut self,
        head_only: bool,
    ) -> Result<(ResponseHead, Framing), (SendErrorKind, usize)> {
        let mut read = 0;
        loop {
            if !self.buf.is_empty() {
                match parse_response(&mut self.buf, head_only) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) if self.buf.len() >= MAX_HEAD => {
                        return Err((
                            SendErrorKind::Invalid(format!(
                                "head larger than {} KiB",
                                MAX_HEAD / 1024
                            )),
                            read,
                        ));
                    }
                    Ok(None) => {}
                    Err(why) => return Err((SendErrorKind::Invalid(why), read)),
                }
            }
            self.stream
                .readable()
                .await
                .map_err(|e| (SendErrorKind::Io(e), read))?;
            // The buffer is taken only now that there is something to read: a request
            // waiting on its backend holds none.
            match self.stream.read_more(&mut self.buf) {
                Ok(0) => return Err((SendErrorKind::Closed, read)),
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((SendErrorKind::Io(e), read)),
            }
        }
    }
}

/// Streams the client's body to the backend, chunk-encoded when its length is unknown.
async fn upload(
    stream: &Stream,
    mut body: ReqBody,
    chunked: bool,
    state: &Cell<Upload>,
) -> Result<(), SendErrorKind> {
    let mut framed = Vec::new();
    loop {
        state.set(Upload::WaitingOnClient);
        let frame = body.frame().await;
        let Some(frame) = frame else {
            state.set(Upload::Moving);
            break;
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                state.set(Upload::ClientFailed);
                return Err(SendErrorKind::ClientBody(e));
            }
        };
        state.set(Upload::Moving);
        let Ok(data) = frame.into_data() else {
            continue; // trailers: an HTTP/1.1 backend gets none
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            // One write per chunk: size line, data and CRLF together.
            framed.clear();
            push_size_line(&mut framed, data.len());
            framed.extend_from_slice(&data);
            framed.extend_from_slice(CHUNK_END);
            write_all(stream, &framed, None)
                .await
                .map_err(SendErrorKind::Io)?;
        } else {
            write_all(stream, &data, None)
                .await
                .map_err(SendErrorKind::Io)?;
        }
    }
    if chunked {
        write_all(stream, LAST_CHUNK, None)
            .await
            .map_err(SendErrorKind::Io)?;
    }
    Ok(())
}

/// A backend's response body, read straight off its connection by the framing its head
/// declared; the connection goes back to the worker's pool the moment the body has been
/// read to its end.
pub(crate) struct BackendBody {
    conn: Option<BackendConn>,
    decoder: BodyDecoder,
    keep_alive: bool,
    checkin: Option<Checkin>,
    /// A backend that sends no byte of the body for this long, while the proxy waits for
    /// one, is cut off (a stalled backend would otherwise hold the client forever).
    idle: Duration,
    /// Armed when a wait for the backend begins; boxed and made only for bodies that wait.
    stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    /// The body failed by the client's doing (its request body stalled or broke).
    client_fault: bool,
}

impl BackendBody {
    /// The body framed by `framing` on `conn`; `checkin` takes the connection back after it;
    /// `idle`: the longest wait for a byte of it.
    pub(crate) fn new(
        conn: BackendConn,
        framing: Framing,
        checkin: Checkin,
        idle: Duration,
    ) -> Self {
        let mut body = BackendBody {
            conn: Some(conn),
            decoder: framing.into(),
            keep_alive: framing.keep_alive(),
            checkin: Some(checkin),
            idle,
            stall: None,
            waiting: false,
            client_fault: false,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// The body has been read to its end: the connection goes back to the pool if the
    /// backend keeps it open and sent nothing beyond the body.
    fn finish(&mut self) {
        if let (Some(mut conn), Some(checkin)) = (self.conn.take(), self.checkin.take())
            && self.keep_alive
            && conn.reusable()
        {
            checkin.release(conn);
        }
    }

    /// The next bytes of the body; None at its end.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Decoded::Done) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(why) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, why))));
                }
            }
            // Nothing buffered: read more.
            let filled = match poll_fill(conn, cx) {
                Poll::Ready(r) => {
                    self.waiting = false;
                    r
                }
                Poll::Pending => return self.poll_stall(cx),
            };
            match filled {
                Ok(0) if self.decoder.closed() => {
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection before the end of the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// Waiting for the backend: from the first poll of this wait, `idle` at most. Time
    /// spent not polling (the client being slow to take the last bytes) does not count.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let idle = self.idle;
        let stall = match &mut self.stall {
            Some(s) if self.waiting => s,
            Some(s) => {
                s.as_mut().reset(tokio::time::Instant::now() + idle);
                s
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep(idle))),
        };
        self.waiting = true;
        ready!(stall.as_mut().poll(cx));
        // A backend that waits for a request body the client does not send is not at fault.
        self.client_fault = self
            .conn
            .take()
            .is_some_and(|conn| conn.waiting_on_client());
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("backend sent no byte of the body for {:?}", self.idle),
        ))))
    }

    /// The whole body has been read.
    pub(super) fn ended(&self) -> bool {
        self.decoder.is_done()
    }

    /// Failed by the client's doing (its request body stalled or broke), not the backend's.
    pub(super) fn client_fault(&self) -> bool {
        self.client_fault
    }

    /// What is left of the body, when known.
    pub(super) fn size_hint(&self) -> SizeHint {
        self.decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Reads what the socket has into the connection's buffer (0: the backend closed it).
fn poll_fill(conn: &mut BackendConn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(BODY_READ);
    }
    loop {
        ready!(conn.stream.poll_read_ready(cx))?;
        match conn.stream.read_buf(&mut conn.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return Poll::Ready(done),
        }
    }
}
