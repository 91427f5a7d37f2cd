//! HTTP/1.1 from clients, served by the proxy itself (HTTP/2 stays with hyper).
//!
//! Pingora's and NGINX's shape rather than a general server library's: the connection's own
//! task reads a request head, asks its [`Exchange`] for the response, writes it with
//! its body and reads the next head; no dispatcher, no channel, no timer per request (the
//! idle and request timeouts share one sleep per connection, re-armed only when it
//! fires). A request body is read off the same socket by the upload to the backend
//! ([`ClientBody`]), full duplex.
//!
//! What the bytes mean is the codec's ([`lbwasm_http`]): heads parsed strictly (request
//! framing that could be read two ways is refused: [`parse_request`]), responses written
//! with the proxy's own framing. Here: the socket, keep-alive, pipelining, `100 Continue`,
//! protocol switches, the drain and the lingering close.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use http::{Method, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt as _;
use lbwasm_http::{
    BodyFraming, CHUNK_END, ChunkDecoder, LAST_CHUNK, MAX_HEAD, ParsedRequest, Reject, ReqHead,
    ResponseFraming, parse_request, push_field, push_size_line, reject, write_response_head,
};
use tokio::time::Sleep;

use super::body::{ClientBody, ClientIo, ReqBody};
use super::date;
use super::drain::Drain;
use super::response::Reply;
use super::sock::write_all;
use super::tunnel;

/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Response bytes gathered before a write (head and small bodies go out in one).
const WRITE_BATCH: usize = 64 * 1024;
/// How long a connection closed with an unread request body is drained first, so that
/// the client reads the response rather than a reset (NGINX's lingering close).
const LINGER: Duration = Duration::from_secs(2);

/// What the server asks of the proxy for each request, as hyper's `serve_connection` takes
/// a service: the server owns the connection, the proxy owns what a request becomes.
pub(super) trait Exchange {
    /// The client's address (logs).
    fn peer(&self) -> SocketAddr;
    /// The answer to a request refused before its head was whole (400, 408, 431…).
    fn refusal(&self, status: StatusCode, cause: String) -> Reply;
    /// The response to `head` with `body`. `timer`: the connection's one timer (its idle
    /// timeout between requests), re-armed for the request timeout rather than a timer
    /// registered per request. Not an `async fn`, so that an implementation may be an
    /// `async move` block, which keeps `head` and `body` once (see [`serve`]).
    fn exchange<'a>(
        &'a self,
        head: ReqHead,
        body: Option<ReqBody>,
        timer: Option<Pin<&'a mut Sleep>>,
    ) -> impl Future<Output = Reply> + 'a;
}

/// Serves HTTP/1.1 on `io` until the client closes, stays silent for `io.idle` between
/// requests, or the worker drains (the exchange in progress finishes first).
///
/// An idle keep-alive connection holds only its socket, one timer and this small future,
/// laid out inside its task (NGINX's approach): the read buffer is released while no
/// request is in progress and taken again when bytes arrive, and each exchange's state
/// (forwarding, the response being written) lives in an allocation of its own for the
/// exchange's life. An `async move` block, not an `async fn`, so that the arguments are
/// not kept twice.
// Not an `async fn`: see above.
#[allow(clippy::manual_async_fn)]
pub(super) fn serve(
    ctx: Rc<impl Exchange>,
    mut io: Rc<ClientIo>,
    drain: Rc<Drain>,
) -> impl Future<Output = ()> {
    async move {
        // One timer for the connection's life, re-armed only when it fires early (as
        // NGINX's lazy timers): between requests it is the idle timeout, during an
        // exchange the request timeout (armed at its first use, see `http::within`).
        let timer = tokio::time::sleep(io.idle);
        tokio::pin!(timer);
        let mut last = tokio::time::Instant::now();
        let (status, why) = loop {
            let exchange = match next_head(&io, &drain, timer.as_mut(), &mut last).await {
                Next::Head(head) => exchange(&*ctx, io, head, &drain, timer.as_mut()),
                Next::Closed => return,
                // Answered below, outside the loop: the future keeps no room for a head
                // while the refusal is written.
                Next::Reject(Reject(status, why)) => break (status, why),
            };
            io = match Box::pin(exchange).await {
                Some(io) => io,
                None => return,
            };
            last = tokio::time::Instant::now();
            // A request timeout armed beyond the idle one must not keep an idle
            // connection open longer than `idle`.
            if timer.deadline() > last + io.idle {
                timer.as_mut().reset(last + io.idle);
            }
            io.release_if_idle();
        };
        tracing::debug!(peer = %ctx.peer(), %status, %why, "refused a request");
        Box::pin(refuse(&*ctx, &io, status, why)).await;
    }
}

/// Answers a request refused before it was forwarded, and closes.
async fn refuse(ctx: &impl Exchange, io: &ClientIo, status: StatusCode, why: String) {
    let res = ctx.refusal(status, why);
    let mut out = Vec::new();
    let _ = write_response(io, &mut out, res, false, Version::HTTP_11, true, false).await;
    linger(io).await;
}

/// One request: forwarded, answered, and (for a protocol switch) tunnelled. Returns the
/// connection when it can carry the next request. Its future is each request's own
/// allocation, built on the stack and copied there: an `async move` block keeps the head
/// once, where an `async fn` would keep it twice (see [`serve`]).
// Not an `async fn`: see above.
#[allow(clippy::manual_async_fn)]
fn exchange<'a>(
    ctx: &'a impl Exchange,
    io: Rc<ClientIo>,
    head: ParsedRequest,
    drain: &'a Drain,
    timer: Pin<&'a mut tokio::time::Sleep>,
) -> impl Future<Output = Option<Rc<ClientIo>>> + 'a {
    async move {
        // Fields moved out of `head` one by one: destructuring it would lay them out again.
        let head_only = head.req.method == Method::HEAD;
        let version = head.req.version;
        let trailers = head.req.trailers;
        let keep_alive = head.keep_alive;
        io.responded.set(false);
        io.body_done.set(head.body.is_none());
        let body = head
            .body
            .map(|framing| ReqBody::H1(ClientBody::new(io.clone(), framing, head.expect_continue)));
        let mut res = ctx.exchange(head.req, body, Some(timer)).await;
        io.responded.set(true);
        let mut out = Vec::with_capacity(READ_CHUNK);
        if let Some((conn, in_flight)) = res.body.take_switch() {
            // 101: the head goes out as the backend sent it, then bytes both ways.
            if write_response(&io, &mut out, res, true, version, false, false)
                .await
                .is_err()
            {
                return None;
            }
            let _in_flight = in_flight; // counted for the tunnel's life
            let early = io.buf.borrow_mut().split().freeze();
            let io = Rc::try_unwrap(io).ok()?;
            if let Err(error) = tunnel::switched(io.stream, early, conn, io.idle).await {
                tracing::debug!(peer = %ctx.peer(), %error, "upgraded connection ended with an error");
            }
            return None;
        }
        let close = !keep_alive || drain.is_draining();
        let clean = write_response(&io, &mut out, res, head_only, version, close, trailers).await;
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
}

// Not boxed: a head is moved once per request, and boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A request head, complete.
    Head(ParsedRequest),
    /// Closed by the client, idle for too long, or the worker drains.
    Closed,
    Reject(Reject),
}

/// Reads the next request head. Between requests, gives up at the idle timeout or when the
/// worker drains; a head begun must be complete within the idle timeout (408). Its future
/// is part of every idle connection's: an `async move` block keeps each argument once.
// Not an `async fn`: see above.
#[allow(clippy::manual_async_fn)]
fn next_head<'a>(
    io: &'a ClientIo,
    drain: &'a Drain,
    mut timer: Pin<&'a mut tokio::time::Sleep>,
    last: &'a mut tokio::time::Instant,
) -> impl Future<Output = Next> + 'a {
    async move {
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
                    let due = *last + io.idle;
                    if due <= tokio::time::Instant::now() {
                        if !between {
                            return Next::Reject(reject(
                                StatusCode::REQUEST_TIMEOUT,
                                format!("request head not complete within {:?}", io.idle),
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
            match io.stream.read_more(&mut buf) {
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
    trailers: bool,
) -> io::Result<bool> {
    let Reply {
        status,
        fields,
        mut body,
    } = res;
    // A client that takes trailers gets a body that may carry them chunked, whatever its
    // length: trailers have no place after a Content-Length body.
    let exact = body.size_hint().exact();
    let length = exact.filter(|_| !(trailers && body.may_have_trailers()));
    let framing = ResponseFraming::new(status, head_only, version, length);
    close |= framing.until_close;
    write_response_head(out, status, &fields, framing, version, close, |field| {
        date::with(field)
    });
    if framing.bodiless {
        write_all(&io.stream, out, Some(io.idle)).await?;
        return Ok(!close);
    }

    let mut trailed = false;
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
                Err(frame) => {
                    // Trailers (an HTTP/2 backend's): in the chunked body's trailer
                    // section, to a client that said it takes them; dropped otherwise.
                    if let Ok(fields) = frame.into_trailers()
                        && framing.chunked
                        && trailers
                        && !trailed
                    {
                        out.extend_from_slice(b"0\r\n");
                        for (name, value) in &fields {
                            if !TRAILER_FORBIDDEN.contains(name) {
                                push_field(out, name.as_str().as_bytes(), value.as_bytes());
                            }
                        }
                        out.extend_from_slice(b"\r\n");
                        trailed = true;
                    }
                    continue;
                }
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
        if framing.chunked {
            push_size_line(out, data.len());
        }
        if out.len() + data.len() <= WRITE_BATCH {
            out.extend_from_slice(&data);
        } else {
            write_all(&io.stream, out, Some(io.idle)).await?;
            out.clear();
            write_all(&io.stream, &data, Some(io.idle)).await?;
        }
        if framing.chunked {
            // Goes out with whatever follows.
            out.extend_from_slice(CHUNK_END);
        }
        if out.len() >= WRITE_BATCH {
            write_all(&io.stream, out, Some(io.idle)).await?;
            out.clear();
        }
    }
    if framing.chunked && !trailed {
        out.extend_from_slice(LAST_CHUNK);
    }
    if !out.is_empty() {
        write_all(&io.stream, out, Some(io.idle)).await?;
        out.clear();
    }
    Ok(!close)
}

/// Fields a trailer section must not carry (RFC 9110 §6.5.1): framing, routing and
/// control fields.
const TRAILER_FORBIDDEN: [http::HeaderName; 5] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::HOST,
    http::header::TRAILER,
    http::header::CONNECTION,
];

/// Closes the connection after a response that left request bytes unread: the write side
/// first, then what the client still sends is read and dropped for a while, so that its
/// kernel does not answer our close with a reset that destroys the response unread.
async fn linger(io: &ClientIo) {
    io.stream.shutdown_write();
    let _ = tokio::time::timeout(LINGER, async {
        // On the heap: inline, these 16 KiB would be in every exchange's future, copied
        // into its allocation on every request (`Box::pin` in `serve`).
        let mut sink = vec![0u8; 16 * 1024];
        loop {
            if io.stream.tcp().readable().await.is_err() {
                return;
            }
            match io.stream.tcp().try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}
