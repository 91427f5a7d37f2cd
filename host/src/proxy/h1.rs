//! HTTP/1.1 from clients, served by the proxy itself (HTTP/2 stays with hyper).
//!
//! Pingora's and NGINX's shape rather than a general server library's: the connection's own
//! task reads a request head, asks [`ConnCtx::exchange`] for the response, writes it with
//! its body and reads the next head; no dispatcher, no channel, no timer per request (the
//! idle timeout is one sleep per connection, re-armed only when it fires). A request body
//! is read off the same socket by the upload to the backend ([`ClientBody`]), full duplex.
//!
//! Request framing is strict, because a proxy that reads a body differently from the
//! backend behind it lets one request hide inside another (request smuggling, RFC 9112
//! §11.2): `Transfer-Encoding` together with `Content-Length` is refused, a transfer coding
//! other than exactly `chunked` is refused (501), so is one in an HTTP/1.0 request, and so
//! are differing or malformed `Content-Length` values; HTTP/1.1 requests need exactly one
//! `Host`. The body goes to the backend re-framed by the proxy, never as the client framed it.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::net::TcpStream;

use super::body::{BoxError, ChunkDecoder, Decoded, ReqBody};
use super::date;
use super::headers::{self, MAX_HEADERS, ReqHead};
use super::http::{ConnCtx, Reply};
use super::sock::{self, write_all};
use super::tunnel;
use super::worker::Drain;
use crate::fields::{Fields, RawFields};

/// The largest request head accepted (request line and headers): 431 beyond.
const MAX_HEAD: usize = 64 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Response bytes gathered before a write (head and small bodies go out in one).
const WRITE_BATCH: usize = 64 * 1024;
/// How long a connection closed with an unread request body is drained first, so that
/// the client reads the response rather than a reset (NGINX's lingering close).
const LINGER: Duration = Duration::from_secs(2);

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A client connection as its requests and bodies share it.
pub(crate) struct ClientIo {
    stream: TcpStream,
    /// Bytes read and not yet consumed: the next head, body bytes, pipelined requests.
    buf: RefCell<BytesMut>,
    /// The current request's body has been read to its end (or it had none).
    body_done: Cell<bool>,
    /// The current request's final response head has been (or is being) written: too late
    /// for a `100 Continue`.
    responded: Cell<bool>,
    /// A response the client takes no byte of for this long is cut off.
    idle: Duration,
}

/// How a request's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyFraming {
    Length(u64),
    Chunked,
}

/// A parsed request head and what the connection needs to know about it.
struct Head {
    req: ReqHead,
    body: Option<BodyFraming>,
    /// The client keeps the connection open after this exchange.
    keep_alive: bool,
    /// The client waits for `100 Continue` before sending its body.
    expect_continue: bool,
}

/// Why a request is refused before it is forwarded.
#[derive(Debug, PartialEq, Eq)]
struct Reject(StatusCode, String);

fn reject(status: StatusCode, why: impl Into<String>) -> Reject {
    Reject(status, why.into())
}

/// Serves HTTP/1.1 on `stream` until the client closes, stays silent for `idle` between
/// requests, or the worker drains (the exchange in progress finishes first).
///
/// An idle keep-alive connection holds only its socket, two timers and this small future
/// (NGINX's approach): the read buffer is released while no request is in progress and
/// taken again when bytes arrive, and each exchange's state (forwarding, the response
/// being written) lives in an allocation of its own for the exchange's life.
pub(super) async fn serve(ctx: Rc<ConnCtx>, stream: TcpStream, drain: Rc<Drain>, idle: Duration) {
    let mut io = Rc::new(ClientIo {
        stream,
        buf: RefCell::new(BytesMut::new()),
        body_done: Cell::new(true),
        responded: Cell::new(false),
        idle,
    });
    // Two timers for the connection's life, re-armed only when they fire early: the idle
    // one, and the one for each exchange's request timeout (armed at its first use).
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let request_timer = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(request_timer);
    let mut last = tokio::time::Instant::now();
    loop {
        let head = match next_head(&io, &drain, timer.as_mut(), &mut last, idle).await {
            Next::Head(h) => h,
            Next::Closed => return,
            Next::Reject(Reject(status, why)) => {
                tracing::debug!(peer = %ctx.peer(), %status, %why, "refused a request");
                Box::pin(refuse(&ctx, &io, status, why)).await;
                return;
            }
        };
        let exchange = exchange(&ctx, io, head, &drain, request_timer.as_mut(), idle);
        io = match Box::pin(exchange).await {
            Some(io) => io,
            None => return,
        };
        last = tokio::time::Instant::now();
        io.release_if_idle();
    }
}

/// Answers a request refused before it was forwarded, and closes.
async fn refuse(ctx: &ConnCtx, io: &ClientIo, status: StatusCode, why: String) {
    let res = ctx.refusal(status, why);
    let mut out = Vec::new();
    let _ = write_response(io, &mut out, res, false, Version::HTTP_11, true).await;
    linger(io).await;
}

/// One request: forwarded, answered, and (for a protocol switch) tunnelled. Returns the
/// connection when it can carry the next request.
async fn exchange(
    ctx: &ConnCtx,
    io: Rc<ClientIo>,
    head: Head,
    drain: &Drain,
    request_timer: Pin<&mut tokio::time::Sleep>,
    idle: Duration,
) -> Option<Rc<ClientIo>> {
    let Head {
        req,
        body,
        keep_alive,
        expect_continue,
    } = head;
    let head_only = req.method == Method::HEAD;
    let version = req.version;
    io.responded.set(false);
    io.body_done.set(body.is_none());
    let body = body.map(|framing| {
        ReqBody::H1(ClientBody {
            io: io.clone(),
            state: match framing {
                BodyFraming::Length(n) => ClientState::Length(n),
                BodyFraming::Chunked => ClientState::Chunked(ChunkDecoder::default()),
            },
            continue_left: if expect_continue { CONTINUE.len() } else { 0 },
        })
    });
    let mut res = ctx.exchange(req, body, Some(request_timer)).await;
    io.responded.set(true);
    let mut out = Vec::with_capacity(READ_CHUNK);
    if let Some((conn, in_flight)) = res.body.take_switch() {
        // 101: the head goes out as the backend sent it, then bytes both ways.
        if write_response(&io, &mut out, res, true, version, false)
            .await
            .is_err()
        {
            return None;
        }
        let _in_flight = in_flight; // counted for the tunnel's life
        let early = io.buf.borrow_mut().split().freeze();
        let io = Rc::try_unwrap(io).ok()?;
        if let Err(error) = tunnel::switched(io.stream, early, conn, idle).await {
            tracing::debug!(peer = %ctx.peer(), %error, "upgraded connection ended with an error");
        }
        return None;
    }
    let close = !keep_alive || drain.is_draining();
    let clean = write_response(&io, &mut out, res, head_only, version, close).await;
    match clean {
        Ok(true) if !close && io.body_done.get() => Some(io),
        Ok(_) if !io.body_done.get() || !io.buf.borrow().is_empty() => {
            // Request bytes left unread (a body, or requests pipelined after the last
            // one, which may go on in the kernel's buffer): closing now would answer
            // them with a reset that can destroy the response unread. NGINX lingers
            // in the same cases.
            linger(&io).await;
            None
        }
        _ => None,
    }
}

impl ClientIo {
    /// Between requests, with nothing read ahead: the read buffer goes back to the
    /// allocator until the next bytes arrive.
    fn release_if_idle(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() && buf.capacity() > 0 {
            *buf = BytesMut::new();
        }
    }
}

// Not boxed: a head is moved once per request, and boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A request head, complete.
    Head(Head),
    /// Closed by the client, idle for too long, or the worker drains.
    Closed,
    Reject(Reject),
}

/// Reads the next request head. Between requests, gives up at the idle timeout or when the
/// worker drains; a head begun must be complete within the idle timeout (408).
async fn next_head(
    io: &ClientIo,
    drain: &Drain,
    mut timer: Pin<&mut tokio::time::Sleep>,
    last: &mut tokio::time::Instant,
    idle: Duration,
) -> Next {
    loop {
        let between = {
            let mut buf = io.buf.borrow_mut();
            if !buf.is_empty() {
                match parse_request(&mut buf) {
                    // Broken chunked framing in what came with the head is refused before
                    // anything goes to a backend (and so can never count against one).
                    Ok(Some(head)) if head.body == Some(BodyFraming::Chunked) => {
                        return match ChunkDecoder::default().check(&buf) {
                            Ok(()) => Next::Head(head),
                            Err(why) => Next::Reject(reject(
                                StatusCode::BAD_REQUEST,
                                format!("invalid chunked request body: {why}"),
                            )),
                        };
                    }
                    Ok(Some(head)) => return Next::Head(head),
                    Ok(None) if buf.len() >= MAX_HEAD => {
                        return Next::Reject(reject(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            format!("request head larger than {} KiB", MAX_HEAD / 1024),
                        ));
                    }
                    Ok(None) => {}
                    Err(r) => return Next::Reject(r),
                }
            }
            buf.is_empty()
        };
        if between && drain.is_draining() {
            return Next::Closed;
        }
        tokio::select! {
            biased;
            ready = io.stream.readable() => {
                if ready.is_err() {
                    return Next::Closed;
                }
            }
            () = drain.started(), if between => return Next::Closed,
            () = &mut timer => {
                let due = *last + idle;
                if due <= tokio::time::Instant::now() {
                    if !between {
                        return Next::Reject(reject(
                            StatusCode::REQUEST_TIMEOUT,
                            format!("request head not complete within {idle:?}"),
                        ));
                    }
                    return Next::Closed;
                }
                timer.as_mut().reset(due);
                continue;
            }
        }
        // The buffer is taken only now that there is something to read.
        let mut buf = io.buf.borrow_mut();
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match sock::read_buf(&io.stream, &mut buf) {
            Ok(0) => return Next::Closed,
            // A head has the idle timeout to arrive whole, from its first byte: a client
            // trickling one byte at a time cannot hold the connection forever.
            Ok(_) if between => *last = tokio::time::Instant::now(),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Next::Closed,
        }
    }
}

/// Parses a request head off the front of `buf` (None: incomplete). Header values share
/// the head's buffer; what follows (body, next requests) stays in `buf`.
fn parse_request(buf: &mut BytesMut) -> Result<Option<Head>, Reject> {
    // Uninitialised: a 4 KiB memset per request would show in profiles.
    let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut parsed,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} request headers"),
            ));
        }
        Err(httparse::Error::Version) => {
            return Err(reject(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "only HTTP/1.0 and HTTP/1.1 are served in this form",
            ));
        }
        Err(e) => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                format!("invalid request: {e}"),
            ));
        }
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| reject(StatusCode::BAD_REQUEST, "invalid method"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let path = req.path.unwrap_or("");
    let base = buf.as_ptr() as usize;
    let path_span = (path.as_ptr() as usize - base, path.len());
    if method == Method::CONNECT {
        return Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served by a reverse proxy",
        ));
    }
    // Everything is decided on the raw fields; only what goes on is kept, unparsed.
    let fields = req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let all = |name: &'static str| {
        fields
            .clone()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    };
    let body = framing(
        version,
        all("transfer-encoding"),
        all("content-length").peekable(),
    )?;
    if version == Version::HTTP_11 {
        let mut hosts = all("host");
        match (hosts.next(), hosts.next()) {
            (Some(_), None) => {}
            (None, _) => return Err(reject(StatusCode::BAD_REQUEST, "missing Host header")),
            (Some(_), Some(_)) => {
                return Err(reject(StatusCode::BAD_REQUEST, "more than one Host header"));
            }
        }
    }
    let keep_alive = if version == Version::HTTP_11 {
        !headers::connection_has(all("connection"), "close")
    } else {
        headers::connection_has(all("connection"), "keep-alive")
    };
    let expect_continue = version == Version::HTTP_11
        && body.is_some()
        && all("expect")
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    // A switch needs the connection free of a body.
    let upgrade = body.is_none() && headers::wants_upgrade(version, fields);
    let mut hop = headers::HopByHop::of(req.headers, upgrade)
        .map_err(|why| reject(StatusCode::BAD_REQUEST, why))?;
    // Absolute form (`GET http://a.example/x`): the target's authority is the request's
    // host, whatever `Host` says (RFC 9112 §3.2.2); it becomes the `Host` sent on.
    let absolute = !path.starts_with('/') && path != "*";
    if absolute {
        for (i, h) in req.headers.iter().enumerate() {
            if h.name.eq_ignore_ascii_case("host") {
                hop.skip(i);
            }
        }
    }
    let mut store = headers::span_store();
    let spans = headers::spans(buf.as_ptr(), req.headers, &mut store);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_span.0..path_span.0 + path_span.1))
        .ok()
        .filter(|uri| !absolute || uri.authority().is_some_and(|a| !a.host().is_empty()))
        .ok_or_else(|| reject(StatusCode::BAD_REQUEST, "invalid request target"))?;
    Ok(Some(Head {
        req: ReqHead {
            method,
            uri,
            version,
            fields: Fields::Raw(RawFields::new(head, hop.keep(spans))),
            upgrade,
        },
        body,
        keep_alive,
        expect_continue,
    }))
}

/// How a request's body is delimited (RFC 9112 §6.3) by its `Transfer-Encoding` and
/// `Content-Length` values; refuses what could be read two ways.
fn framing<'a>(
    version: Version,
    codings: impl Iterator<Item = &'a [u8]>,
    mut lengths: std::iter::Peekable<impl Iterator<Item = &'a [u8]>>,
) -> Result<Option<BodyFraming>, Reject> {
    let mut codings = codings.peekable();
    if codings.peek().is_some() {
        if version == Version::HTTP_10 {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if lengths.peek().is_some() {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "both Transfer-Encoding and Content-Length",
            ));
        }
        let mut list = codings
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty());
        return match (list.next(), list.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Some(BodyFraming::Chunked)),
            _ => Err(reject(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            )),
        };
    }
    let length =
        headers::content_length(lengths).map_err(|why| reject(StatusCode::BAD_REQUEST, why))?;
    Ok(match length {
        None | Some(0) => None,
        Some(n) => Some(BodyFraming::Length(n)),
    })
}

/// Writes `res` (head, then its body as it comes) for a request of `version`. `close`: the
/// connection closes after it (said in the head). Ok(true): the whole response went out
/// and the connection may carry another request.
async fn write_response(
    io: &ClientIo,
    out: &mut Vec<u8>,
    res: Reply,
    head_only: bool,
    version: Version,
    mut close: bool,
) -> io::Result<bool> {
    let Reply {
        status,
        fields,
        mut body,
    } = res;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = if bodiless {
        None
    } else {
        body.size_hint().exact()
    };
    let chunked = !bodiless && length.is_none() && version == Version::HTTP_11;
    // Neither a length nor chunks (an HTTP/1.0 client): the end of the body is the close.
    close |= !bodiless && length.is_none() && !chunked;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in fields.iter() {
        // The framing is the proxy's own, except where there is no body to frame (a HEAD
        // answer keeps the length the GET would have).
        if !bodiless && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        push_header(out, name, value);
    }
    if !dated {
        date::with(|d| push_header(out, b"date", d));
    }
    if let Some(n) = length {
        push_header(out, b"content-length", itoa_buf(n).as_bytes());
    } else if chunked {
        push_header(out, b"transfer-encoding", b"chunked");
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        push_header(out, b"connection", b"upgrade");
    } else if close {
        push_header(out, b"connection", b"close");
    } else if version == Version::HTTP_10 {
        push_header(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        write_all(&io.stream, out, Some(io.idle)).await?;
        return Ok(!close);
    }

    loop {
        // Whatever the body has ready joins the head in one write; wait only once it is out.
        let ready = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(Some(f)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        let frame = match ready {
            Some(f) => f,
            None => {
                write_all(&io.stream, out, Some(io.idle)).await?;
                out.clear();
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers: not sent on HTTP/1.1
            },
            Some(Err(error)) => {
                // Cut short: the client must not take it for the whole body.
                tracing::debug!(%error, "response body failed; closing the client connection");
                if !out.is_empty() {
                    write_all(&io.stream, out, Some(io.idle)).await?;
                    out.clear();
                }
                return Ok(false);
            }
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let mut line = [0u8; 18];
            let n = super::client::hex_line(&mut line, data.len());
            out.extend_from_slice(&line[..n]);
        }
        if out.len() + data.len() <= WRITE_BATCH {
            out.extend_from_slice(&data);
        } else {
            write_all(&io.stream, out, Some(io.idle)).await?;
            out.clear();
            write_all(&io.stream, &data, Some(io.idle)).await?;
        }
        if chunked {
            // Goes out with whatever follows.
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_BATCH {
            write_all(&io.stream, out, Some(io.idle)).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        write_all(&io.stream, out, Some(io.idle)).await?;
        out.clear();
    }
    Ok(!close)
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Decimal digits of `n` without a heap allocation.
fn itoa_buf(n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    let mut n = n;
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break d;
        }
    }
}

struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Closes the connection after a response that left request bytes unread: the write side
/// first, then what the client still sends is read and dropped for a while, so that its
/// kernel does not answer our close with a reset that destroys the response unread.
async fn linger(io: &ClientIo) {
    let _ = socket2::SockRef::from(&io.stream).shutdown(std::net::Shutdown::Write);
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 16 * 1024];
        loop {
            if io.stream.readable().await.is_err() {
                return;
            }
            match io.stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// A request body on an HTTP/1.1 client connection, read by the upload to the backend.
/// Sends `100 Continue` first when the client waits for it.
pub(crate) struct ClientBody {
    io: Rc<ClientIo>,
    state: ClientState,
    /// Bytes of `100 Continue` still to write before reading.
    continue_left: usize,
}

enum ClientState {
    Length(u64),
    Chunked(ChunkDecoder),
    Done,
}

impl ClientBody {
    fn done(&mut self) {
        self.state = ClientState::Done;
        self.io.body_done.set(true);
    }

    /// The body is about to be read: a client waiting for `100 Continue` is told now, before
    /// anything of the response can be written (what does not fit goes in the first poll).
    pub(crate) fn start(&mut self) {
        if self.continue_left > 0
            && !self.io.responded.get()
            && let Ok(n) = self.io.stream.try_write(CONTINUE)
        {
            self.continue_left -= n;
        }
    }

    /// Sends what is left of `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.continue_left > 0 {
            if self.io.responded.get() {
                // The final answer went out first: the client may never send this body.
                return Poll::Ready(Err(io::Error::other(
                    "answered before the request body was asked for",
                )));
            }
            let from = CONTINUE.len() - self.continue_left;
            match self.io.stream.try_write(&CONTINUE[from..]) {
                Ok(n) => self.continue_left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.stream.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            {
                let mut buf = this.io.buf.borrow_mut();
                match &mut this.state {
                    ClientState::Done => return Poll::Ready(None),
                    ClientState::Length(left) => {
                        if !buf.is_empty() {
                            let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                            let data = buf.split_to(n).freeze();
                            *left -= n as u64;
                            drop(buf);
                            if matches!(this.state, ClientState::Length(0)) {
                                this.done();
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    ClientState::Chunked(decoder) => match decoder.decode(&mut buf) {
                        Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Decoded::Done) => {
                            drop(buf);
                            this.done();
                            return Poll::Ready(None);
                        }
                        Ok(Decoded::More) => {}
                        Err(why) => {
                            return Poll::Ready(Some(Err(format!(
                                "invalid chunked request body: {why}"
                            )
                            .into())));
                        }
                    },
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_CHUNK * 2);
                }
            }
            ready!(this.poll_continue(cx))?;
            ready!(this.io.stream.poll_read_ready(cx))?;
            match sock::read_buf(&this.io.stream, &mut this.io.buf.borrow_mut()) {
                Ok(0) => {
                    return Poll::Ready(Some(Err(
                        "client closed the connection before the end of its body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, ClientState::Done | ClientState::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            ClientState::Length(n) => SizeHint::with_exact(n),
            ClientState::Done => SizeHint::with_exact(0),
            ClientState::Chunked(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head>, Reject> {
        parse_request(&mut BytesMut::from(raw.as_bytes()))
    }

    #[test]
    fn raw_fields_go_on_as_sent_less_hop_by_hop_ones() {
        let head = parse(
            "GET http://example.test:81/a?b HTTP/1.0\r\nX-Kept: 1\r\nConnection: keep-alive, X-Gone\r\n\
             X-Gone: 2\r\nKeep-Alive: timeout=5\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(head.keep_alive);
        let mut req = head.req;
        assert!(matches!(req.fields, Fields::Raw(_)));
        // Absolute form without a Host: the target's authority becomes one.
        headers::prepare_request(&mut req);
        let mut out = Vec::new();
        let client = headers::client_value("10.0.0.1".parse().unwrap());
        headers::encode_request(&mut out, &req, &client, true, None, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a?b HTTP/1.1\r\nx-kept: 1\r\nhost: example.test:81\r\n\
             x-forwarded-for: 10.0.0.1\r\nx-forwarded-proto: http\r\nvia: 1.0 lbwasm\r\n\r\n"
        );
    }

    fn refused(raw: &str) -> (u16, String) {
        match parse(raw) {
            Err(Reject(s, why)) => (s.as_u16(), why),
            Ok(_) => panic!("accepted: {raw:?}"),
        }
    }

    #[test]
    fn requests_parse_with_their_framing() {
        let mut buf = BytesMut::from(
            &b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhelloGET"[..],
        );
        let head = parse_request(&mut buf).unwrap().unwrap();
        assert_eq!(head.req.method, Method::POST);
        assert_eq!(head.req.uri, "/a?b=1");
        assert_eq!(head.body, Some(BodyFraming::Length(5)));
        assert!(head.keep_alive && head.expect_continue && !head.req.upgrade);
        assert_eq!(&buf[..], b"helloGET");

        let head = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive && head.body.is_none());
        let head = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.keep_alive);
        let head = parse(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(head.req.upgrade);
        let head = parse("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Some(BodyFraming::Chunked));
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for (raw, status, why) in [
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                400,
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
                "chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
                "chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
                501,
                "chunked",
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "HTTP/1.0",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
                "conflicting",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n",
                400,
                "Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
                400,
                "Content-Length",
            ),
            ("GET / HTTP/1.1\r\n\r\n", 400, "missing Host"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                400,
                "more than one Host",
            ),
            ("GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "invalid"),
            (
                "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
                400,
                "invalid",
            ),
            (
                "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
                405,
                "CONNECT",
            ),
            ("GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "HTTP/1"),
        ] {
            let (s, w) = refused(raw);
            assert_eq!(s, status, "{raw:?}: {w}");
            assert!(w.contains(why), "{raw:?}: {w}");
        }
        let same = parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(same.body, Some(BodyFraming::Length(3)));
    }

    /// A request as the tests see it after parsing: method, target, fields, body.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        method: String,
        target: String,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        body: Vec<u8>,
    }

    /// Parses `input` as a client's pipelined requests, arriving in the pieces that `cuts`
    /// make, the way the connection does: heads by [`parse_request`] (and the chunked check
    /// of what came with them), bodies by their framing.
    fn decode_stream(input: &[u8], cuts: &[usize]) -> Result<Vec<Seen>, String> {
        let mut feed = crate::proxy::body::generated::Feed::new(input, cuts);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        loop {
            let head = loop {
                if !buf.is_empty() {
                    match parse_request(&mut buf) {
                        Ok(Some(h)) => break h,
                        Ok(None) if buf.len() >= MAX_HEAD => return Err("head too large".into()),
                        Ok(None) => {}
                        Err(Reject(_, why)) => return Err(why),
                    }
                }
                if !feed.more(&mut buf) {
                    return if buf.is_empty() {
                        Ok(out)
                    } else {
                        Err("incomplete head".into())
                    };
                }
            };
            let body = match head.body {
                None => Vec::new(),
                Some(BodyFraming::Length(n)) => feed.length(&mut buf, n)?,
                Some(BodyFraming::Chunked) => {
                    let mut decoder = ChunkDecoder::default();
                    decoder.check(&buf)?;
                    feed.chunked(&mut buf, &mut decoder)?
                }
            };
            let Fields::Raw(raw) = &head.req.fields else {
                return Err("fields not raw".into());
            };
            out.push(Seen {
                method: head.req.method.to_string(),
                target: head.req.uri.to_string(),
                fields: raw.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                body,
            });
        }
    }

    /// A random valid request and how it must parse.
    fn random_request(rng: &mut rand::rngs::SmallRng, chunked_body: bool) -> (Vec<u8>, Seen) {
        use crate::proxy::body::generated::{body, chunked, word};
        use rand::Rng as _;
        let method = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"][rng.random_range(0..6)];
        let target = format!("/{}?{}={}", word(rng, 12), word(rng, 4), word(rng, 8));
        let mut fields = vec![(b"Host".to_vec(), word(rng, 10).into_bytes())];
        for _ in 0..rng.random_range(0..6) {
            fields.push((
                format!("X-{}", word(rng, 8)).into_bytes(),
                word(rng, 20).into_bytes(),
            ));
        }
        let mut raw = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
        let data = body(rng);
        let framing = if chunked_body || (method != "GET" && rng.random_bool(0.5)) {
            Some(true)
        } else if method != "GET" {
            Some(false)
        } else {
            None
        };
        if framing == Some(false) {
            fields.push((
                b"Content-Length".to_vec(),
                data.len().to_string().into_bytes(),
            ));
        }
        for (n, v) in &fields {
            raw.extend_from_slice(n);
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v);
            raw.extend_from_slice(b"\r\n");
        }
        if framing == Some(true) {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        match framing {
            Some(true) => raw.extend_from_slice(&chunked(rng, &data)),
            Some(false) => raw.extend_from_slice(&data),
            None => {}
        }
        let seen = Seen {
            method: method.into(),
            target,
            fields,
            body: if framing.is_some() { data } else { Vec::new() },
        };
        (raw, seen)
    }

    #[test]
    fn requests_parse_the_same_however_they_are_split() {
        for case in 0..300 {
            let mut rng = crate::proxy::body::generated::rng(case);
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..3 {
                let (raw, seen) = random_request(&mut rng, false);
                input.extend_from_slice(&raw);
                expected.push(seen);
            }
            let whole = decode_stream(&input, &[]);
            assert_eq!(whole, Ok(expected), "case {case}");
            crate::proxy::body::generated::same_however_split(
                &mut rng,
                &input,
                &whole,
                decode_stream,
            );
        }
    }

    #[test]
    fn mutated_requests_fail_cleanly_and_never_swallow_the_next_one() {
        use crate::proxy::body::generated::{mutate, rng, splits};
        let canary = b"GET /canary HTTP/1.1\r\nHost: c\r\n\r\n";
        for case in 0..3000 {
            let mut rng = rng(case);
            let (raw, _) = random_request(&mut rng, true);
            let body_at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut input = raw.clone();
            input.extend_from_slice(canary);
            // Half the mutations anywhere in the first request, half in its chunked body.
            let within = if case % 2 == 0 {
                0..raw.len()
            } else {
                body_at..raw.len()
            };
            let (input, at) = mutate(&mut rng, &input, within);
            let whole = decode_stream(&input, &[]);
            let cuts = splits(&mut rng, input.len());
            assert_eq!(decode_stream(&input, &cuts), whole, "case {case}: {cuts:?}");
            if at >= body_at
                && let Ok(seen) = &whole
            {
                // The framing decided where the body ends: the canary is still a request
                // of its own, never trailer lines or body bytes.
                assert_eq!(
                    seen.len(),
                    2,
                    "case {case}: {:?}",
                    String::from_utf8_lossy(&input)
                );
                assert_eq!(seen[1].target, "/canary", "case {case}");
            }
        }
    }

    #[test]
    fn digits_without_allocation() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(itoa_buf(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
