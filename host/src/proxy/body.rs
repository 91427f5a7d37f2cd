//! Bodies on both sides of the proxy, streamed frame by frame, never buffered.
//!
//! [`ReqBody`] is a client's request body: read by hyper (HTTP/2) or by the proxy's own
//! HTTP/1.1 server ([`super::h1::ClientBody`]).
//! [`ResBody`] carries what must live exactly as long as a response is being streamed: the
//! backend's in-flight guard, the client connection's activity mark (idle timeout) and
//! the request's access-log line.
//! [`BackendBody`] reads a backend's body straight off its connection, by the framing its
//! head declared ([`Framing`], RFC 9112 §6.3), and returns the connection to the worker's
//! pool the moment the body has been read to its end.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::access_log::Pending;
use super::client::{BackendConn, Checkin};
use super::h1::ClientBody;
use super::http::ActivityGuard;
use super::worker::LocalListener;
use crate::pool::InFlight;

/// Read size while streaming a body.
const BODY_CHUNK: usize = 16 * 1024;
/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

/// What is sent to a client: a backend's body, or the proxy's own one-line text.
pub(crate) struct ResBody {
    kind: Kind,
    tail: Tail,
}

enum Kind {
    Backend(BackendBody),
    Text(Option<Bytes>),
    /// A protocol switch: the backend connection, for the HTTP/1.1 server to relay to.
    Switch(Option<BackendConn>),
}

/// Released when the response ends (or is dropped).
#[derive(Default)]
struct Tail {
    in_flight: Option<InFlight>,
    activity: Option<ActivityGuard>,
    /// Boxed: a response is moved several times, and most listeners keep no log.
    log: Option<Box<Pending>>,
    blame: Option<Blame>,
}

impl Tail {
    fn release(&mut self) {
        self.in_flight = None;
        self.activity = None;
        self.log = None;
        self.blame = None;
    }

    /// A backend's body arrived whole.
    fn completed(&mut self) {
        if let (Some(guard), Some(_)) = (&mut self.in_flight, &self.blame) {
            guard.completed();
        }
    }

    /// The backend cut or stalled the body after its head: a failure of that backend
    /// for passive health, like one before the head.
    fn backend_failed(&mut self) {
        if let (Some(guard), Some(blame)) = (&mut self.in_flight, &self.blame)
            && guard.failed_late(blame.passive)
        {
            blame.local.shared.eject(guard.backend().clone());
        }
    }
}

/// Who hears of a backend body that fails: the worker's listener (which asks the control
/// plane for an ejection), with its passive-health threshold.
pub(crate) struct Blame {
    pub(crate) local: Rc<LocalListener>,
    pub(crate) passive: u32,
}

/// Boxed so that hyper can take any error.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ResBody {
    /// A backend's body; `in_flight` is released when it ends, and `blame` told if the
    /// backend fails it.
    pub(crate) fn backend(body: BackendBody, in_flight: InFlight, blame: Blame) -> Self {
        ResBody {
            kind: Kind::Backend(body),
            tail: Tail {
                in_flight: Some(in_flight),
                blame: Some(blame),
                ..Tail::default()
            },
        }
    }

    /// A text body.
    pub(crate) fn text(text: impl Into<Bytes>) -> Self {
        ResBody {
            kind: Kind::Text(Some(text.into())),
            tail: Tail::default(),
        }
    }

    /// A protocol switch to `conn`: no body, the connection itself is handed over.
    pub(crate) fn switch(conn: BackendConn, in_flight: InFlight) -> Self {
        ResBody {
            kind: Kind::Switch(Some(conn)),
            tail: Tail {
                in_flight: Some(in_flight),
                ..Tail::default()
            },
        }
    }

    /// The switched backend connection, and what keeps it counted in flight.
    pub(crate) fn take_switch(&mut self) -> Option<(BackendConn, Option<InFlight>)> {
        match &mut self.kind {
            Kind::Switch(conn) => Some((conn.take()?, self.tail.in_flight.take())),
            _ => None,
        }
    }

    /// Keeps the client connection marked busy until the body ends.
    pub(crate) fn attach(&mut self, activity: ActivityGuard) {
        self.tail.activity = Some(activity);
    }

    /// Writes the request's access-log line when the body ends, with the bytes it sent.
    pub(crate) fn log(&mut self, line: Pending) {
        self.tail.log = Some(Box::new(line));
    }

    fn ended(&self) -> bool {
        match &self.kind {
            Kind::Backend(b) => b.ended(),
            Kind::Text(t) => t.is_none(),
            Kind::Switch(_) => true,
        }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Backend(b) => {
                ready!(b.poll_next(cx)).map(|r| r.map(Frame::data).map_err(BoxError::from))
            }
            Kind::Text(t) => t.take().map(|b| Ok(Frame::data(b))),
            Kind::Switch(_) => None,
        };
        if let (Some(line), Some(Ok(frame))) = (&mut this.tail.log, &polled)
            && let Some(data) = frame.data_ref()
        {
            line.sent += data.len() as u64;
        }
        match &polled {
            Some(Err(_)) => {
                if !matches!(&this.kind, Kind::Backend(b) if b.client_fault) {
                    this.tail.backend_failed();
                }
                this.tail.release();
            }
            None => {
                this.tail.completed();
                this.tail.release();
            }
            Some(Ok(_)) if this.ended() => {
                this.tail.completed();
                this.tail.release();
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Backend(b) => b.size_hint(),
            Kind::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Switch(_) => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body, as the upload to a backend reads it.
pub(crate) enum ReqBody {
    /// From an HTTP/2 stream (hyper).
    H2(hyper::body::Incoming),
    /// From an HTTP/1.1 connection (the proxy's own server).
    H1(ClientBody),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ReqBody::H1(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::H2(b) => b.is_end_stream(),
            ReqBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::H2(b) => b.size_hint(),
            ReqBody::H1(b) => b.size_hint(),
        }
    }
}

impl ReqBody {
    /// The upload is starting: an HTTP/1.1 client that waits for `100 Continue` gets it.
    pub(crate) fn start(&mut self) {
        if let ReqBody::H1(b) = self {
            b.start();
        }
    }

    /// Nothing (more) to send.
    pub(crate) fn is_end_stream(&self) -> bool {
        Body::is_end_stream(self)
    }
}

/// How a backend's response body is delimited (RFC 9112 §6.3), and whether the
/// connection can carry another request after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes (0: no body: HEAD, 1xx, 204, 304); then reusable or not.
    Length(u64, bool),
    /// Chunked transfer coding; then reusable or not.
    Chunked(bool),
    /// Everything until the backend closes the connection.
    Close,
}

impl Framing {
    /// The framing a response head declares (its raw headers, as parsed). A malformed
    /// `Content-Length` is an error (a desynchronised connection must not be reused or
    /// trusted).
    pub(crate) fn of(
        status: StatusCode,
        version: Version,
        headers: &[httparse::Header<'_>],
        head_only: bool,
    ) -> Result<Framing, String> {
        let mut keep_alive = version == Version::HTTP_11;
        let (mut has_coding, mut codings, mut only_chunked) = (false, 0, true);
        let mut has_length = false;
        for h in headers {
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive")
                        && version == Version::HTTP_10
                    {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                for c in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if !c.is_empty() {
                        codings += 1;
                        only_chunked &= c.eq_ignore_ascii_case(b"chunked");
                    }
                }
                has_coding = true;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                has_length = true;
            }
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Framing::Length(0, false));
        }
        if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Length(0, keep_alive));
        }
        if has_coding {
            // Only `chunked` is undone here; another coding would reach the client
            // unlabelled once the hop's Transfer-Encoding is dropped (NGINX refuses these
            // too: "upstream sent unknown Transfer-Encoding").
            if codings != 1 || !only_chunked {
                return Err("transfer coding other than chunked".into());
            }
            // With both, Transfer-Encoding wins and the connection is not reused.
            return Ok(Framing::Chunked(keep_alive && !has_length));
        }
        let length = super::headers::content_length(
            headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| h.value),
        )?;
        Ok(match length {
            Some(n) => Framing::Length(n, keep_alive),
            None => Framing::Close,
        })
    }
}

/// A backend's response body, read from its connection.
pub(crate) struct BackendBody {
    conn: Option<BackendConn>,
    state: State,
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

enum State {
    Length(u64),
    Chunked(ChunkDecoder),
    Close,
    Done,
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
        let (state, keep_alive) = match framing {
            Framing::Length(n, ka) => (State::Length(n), ka),
            Framing::Chunked(ka) => (State::Chunked(ChunkDecoder::default()), ka),
            Framing::Close => (State::Close, false),
        };
        let mut body = BackendBody {
            conn: Some(conn),
            state,
            keep_alive,
            checkin: Some(checkin),
            idle,
            stall: None,
            waiting: false,
            client_fault: false,
        };
        if matches!(body.state, State::Length(0)) {
            body.finish();
        }
        body
    }

    /// The body has been read to its end: the connection goes back to the pool if the
    /// backend keeps it open and sent nothing beyond the body.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(mut conn), Some(checkin)) = (self.conn.take(), self.checkin.take())
            && self.keep_alive
            && conn.reusable()
        {
            checkin.release(conn);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = conn
                            .buf
                            .len()
                            .min(usize::try_from(*left).unwrap_or(usize::MAX));
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                State::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Decoded::Done) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(why) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            why,
                        ))));
                    }
                },
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
            }
            // Nothing buffered: read more.
            let conn = self.conn.as_mut().expect("checked above");
            let filled = match poll_fill(conn, cx) {
                Poll::Ready(r) => {
                    self.waiting = false;
                    r
                }
                Poll::Pending => return self.poll_stall(cx),
            };
            match filled {
                Ok(0) if matches!(self.state, State::Close) => {
                    self.state = State::Done;
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

    fn ended(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Reads what the socket has into the connection's buffer (0: the backend closed it).
fn poll_fill(conn: &mut BackendConn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(BODY_CHUNK);
    }
    loop {
        ready!(conn.stream.poll_read_ready(cx))?;
        match super::sock::read_buf(&conn.stream, &mut conn.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return Poll::Ready(done),
        }
    }
}

/// The chunked transfer coding, decoded in place (RFC 9112 §7.1): data comes out as slices
/// of the read buffer; extensions and trailers are read and dropped (an HTTP/1.1 hop's
/// trailers are not forwarded).
#[derive(Clone, Default)]
pub(crate) struct ChunkDecoder {
    state: ChunkState,
}

#[derive(Clone, Default)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// One step of the decoder.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no complete next step: read more.
    More,
    /// The last chunk and the trailers have been read.
    Done,
}

impl ChunkDecoder {
    /// Consumes what it can from the front of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::Done),
                ChunkState::Size => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err("chunk size line too long".into())
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    if end >= MAX_CHUNK_LINE {
                        return Err("chunk size line too long".into());
                    }
                    let line = buf.split_to(end + 1);
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers(seen) => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        return if seen + buf.len() > MAX_TRAILERS {
                            Err("trailer section too large".into())
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    if seen + end >= MAX_TRAILERS {
                        return Err("trailer section too large".into());
                    }
                    let line = buf.split_to(end + 1);
                    // Strict, so that what follows a body (the next pipelined request) can
                    // never be taken for trailer lines: CRLF only, and a field line each.
                    let Some(field) = line.strip_suffix(b"\r\n") else {
                        return Err("trailer line not ended by CRLF".into());
                    };
                    if field.is_empty() {
                        self.state = ChunkState::Done;
                    } else {
                        trailer_field(field)?;
                        self.state = ChunkState::Trailers(seen + line.len());
                    }
                }
            }
        }
    }

    /// Checks the chunked bytes already at hand without consuming them: a request whose
    /// framing is broken in what arrived with its head is refused before anything goes
    /// to a backend.
    pub(crate) fn check(&self, bytes: &[u8]) -> Result<(), String> {
        let mut probe = ChunkDecoder {
            state: self.state.clone(),
        };
        let mut buf = BytesMut::from(bytes);
        loop {
            match probe.decode(&mut buf)? {
                Decoded::Data(_) => {}
                Decoded::More | Decoded::Done => return Ok(()),
            }
        }
    }
}

/// The size of a chunk from its size line (`1a;name=value\r\n`), RFC 9112 §7.1. Refused:
/// a bare LF, no digits, more than fits a signed 64-bit length (NGINX's bound too), and
/// control characters in the extensions.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err("chunk size line not ended by CRLF".into());
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("invalid chunk size".into());
    }
    let hex = &line[..digits];
    let significant = hex.iter().skip_while(|&&b| b == b'0').count();
    if significant > 16 {
        return Err("chunk size too large".into());
    }
    let size = hex.iter().fold(0u64, |n, &b| {
        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
        n.wrapping_shl(4) | d
    });
    if size > i64::MAX as u64 {
        return Err("chunk size too large".into());
    }
    let rest = &line[digits..];
    match rest.iter().find(|&&b| b != b' ' && b != b'\t') {
        None | Some(b';') => {}
        Some(_) => return Err("invalid chunk size".into()),
    }
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("control character in a chunk extension".into());
    }
    Ok(size)
}

/// A trailer line must be a field line (`name: value`): a token, a colon, no control
/// characters but HTAB, and no obsolete line folding.
fn trailer_field(line: &[u8]) -> Result<(), String> {
    let colon = line.iter().position(|&b| b == b':');
    let name = colon.map_or(line, |c| &line[..c]);
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if colon.is_none() || name.is_empty() || !name.iter().all(token) {
        return Err("invalid trailer field".into());
    }
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("control character in a trailer field".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), String> {
        let mut d = ChunkDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::Done => return Ok((out, buf)),
                Decoded::More if fed >= input.len() => return Err("incomplete".into()),
                Decoded::More => {
                    let n = step.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let input =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (out, rest) = decode_all(input, step).unwrap();
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            // What follows the body is left for whoever reads next.
            assert_eq!(&rest[..], &b"NEXT"[..rest.len()], "step {step}");
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
        ] {
            assert!(
                decode_all(bad, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&'static str, &'static str)]| -> Vec<httparse::Header<'static>> {
            pairs
                .iter()
                .map(|(k, v)| httparse::Header {
                    name: k,
                    value: v.as_bytes(),
                })
                .collect()
        };
        let ok = StatusCode::OK;
        let v11 = Version::HTTP_11;
        assert_eq!(
            Framing::of(ok, v11, &h(&[("content-length", "7")]), false),
            Ok(Framing::Length(7, true))
        );
        assert_eq!(
            Framing::of(ok, v11, &h(&[("content-length", "7")]), true),
            Ok(Framing::Length(0, true))
        );
        assert_eq!(
            Framing::of(StatusCode::NO_CONTENT, v11, &h(&[]), false),
            Ok(Framing::Length(0, true))
        );
        assert_eq!(
            Framing::of(ok, v11, &h(&[("transfer-encoding", "Chunked")]), false),
            Ok(Framing::Chunked(true))
        );
        for refused in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "gzip")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        ] {
            assert_eq!(
                Framing::of(ok, v11, &h(refused), false),
                Err("transfer coding other than chunked".into()),
                "{refused:?}"
            );
        }
        assert_eq!(
            Framing::of(
                ok,
                v11,
                &h(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
                false
            ),
            Ok(Framing::Chunked(false))
        );
        assert_eq!(Framing::of(ok, v11, &h(&[]), false), Ok(Framing::Close));
        assert_eq!(
            Framing::of(
                ok,
                v11,
                &h(&[("connection", "close"), ("content-length", "1")]),
                false
            ),
            Ok(Framing::Length(1, false))
        );
        assert_eq!(
            Framing::of(ok, Version::HTTP_10, &h(&[("content-length", "1")]), false),
            Ok(Framing::Length(1, false))
        );
        assert_eq!(
            Framing::of(
                ok,
                Version::HTTP_10,
                &h(&[("connection", "keep-alive"), ("content-length", "1")]),
                false
            ),
            Ok(Framing::Length(1, true))
        );
        assert_eq!(
            Framing::of(ok, v11, &h(&[("content-length", "3, 3")]), false),
            Ok(Framing::Length(3, true))
        );
        assert!(
            Framing::of(
                ok,
                v11,
                &h(&[("content-length", "3"), ("content-length", "4")]),
                false
            )
            .is_err()
        );
        assert!(Framing::of(ok, v11, &h(&[("content-length", "+3")]), false).is_err());
    }
}

/// Generated inputs for the parsers' property tests (request heads, response heads,
/// chunked bodies): random valid messages, random ways to split them, random mutations.
#[cfg(test)]
pub(crate) mod generated {
    use rand::rngs::SmallRng;
    use rand::{Rng as _, SeedableRng as _};

    /// The generator for test case `case`: every run sees the same inputs.
    pub(crate) fn rng(case: u64) -> SmallRng {
        SmallRng::seed_from_u64(0x6c62_7761_736d ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Printable bytes for names and values.
    pub(crate) fn word(rng: &mut SmallRng, max: usize) -> String {
        let n = rng.random_range(1..=max);
        (0..n)
            .map(|_| b"abcdefghijklmnopqrstuvwxyz0123456789-"[rng.random_range(0..37)] as char)
            .collect()
    }

    /// `data` in the chunked coding: random chunk sizes (hex in either case, leading
    /// zeros), extensions and trailers.
    pub(crate) fn chunked(rng: &mut SmallRng, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len());
            let size = if rng.random_bool(0.5) {
                format!("{n:x}")
            } else {
                format!("0{n:X}")
            };
            out.extend_from_slice(size.as_bytes());
            if rng.random_bool(0.3) {
                out.extend_from_slice(format!(";{}={}", word(rng, 5), word(rng, 5)).as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0\r\n");
        for _ in 0..rng.random_range(0..3) {
            out.extend_from_slice(format!("x-{}: {}\r\n", word(rng, 6), word(rng, 8)).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// A random body.
    pub(crate) fn body(rng: &mut SmallRng) -> Vec<u8> {
        let n = rng.random_range(0..200);
        (0..n).map(|_| rng.random()).collect()
    }

    /// Input arriving in the pieces that `cuts` make, as a socket would deliver it.
    pub(crate) struct Feed<'a> {
        pieces: std::vec::IntoIter<&'a [u8]>,
    }

    impl<'a> Feed<'a> {
        pub(crate) fn new(input: &'a [u8], cuts: &[usize]) -> Self {
            let mut pieces = Vec::new();
            let mut from = 0;
            for &cut in cuts {
                pieces.push(&input[from..cut]);
                from = cut;
            }
            pieces.push(&input[from..]);
            Feed {
                pieces: pieces.into_iter(),
            }
        }

        /// Appends the next piece to `buf`; false when there is none left.
        pub(crate) fn more(&mut self, buf: &mut bytes::BytesMut) -> bool {
            match self.pieces.next() {
                Some(p) => {
                    buf.extend_from_slice(p);
                    true
                }
                None => false,
            }
        }

        /// A body of `n` bytes, from `buf` and the pieces after it.
        pub(crate) fn length(
            &mut self,
            buf: &mut bytes::BytesMut,
            n: u64,
        ) -> Result<Vec<u8>, String> {
            let mut body = Vec::new();
            let mut left = n as usize;
            while left > 0 {
                if buf.is_empty() && !self.more(buf) {
                    return Err("incomplete body".into());
                }
                let k = left.min(buf.len());
                body.extend_from_slice(&buf.split_to(k));
                left -= k;
            }
            Ok(body)
        }

        /// A chunked body, decoded by `decoder` from `buf` and the pieces after it.
        pub(crate) fn chunked(
            &mut self,
            buf: &mut bytes::BytesMut,
            decoder: &mut super::ChunkDecoder,
        ) -> Result<Vec<u8>, String> {
            let mut body = Vec::new();
            loop {
                match decoder.decode(buf)? {
                    super::Decoded::Data(b) => body.extend_from_slice(&b),
                    super::Decoded::Done => return Ok(body),
                    super::Decoded::More if self.more(buf) => {}
                    super::Decoded::More => return Err("incomplete chunked body".into()),
                }
            }
        }
    }

    /// Asserts that `decode` gives `whole` for `input` cut at every byte boundary and in
    /// 20 random multi-way splits: a parser must not depend on how bytes arrive.
    pub(crate) fn same_however_split<T: PartialEq + std::fmt::Debug>(
        rng: &mut SmallRng,
        input: &[u8],
        whole: &T,
        decode: impl Fn(&[u8], &[usize]) -> T,
    ) {
        for cut in 0..=input.len() {
            assert_eq!(&decode(input, &[cut]), whole, "cut at {cut}");
        }
        for _ in 0..20 {
            let cuts = splits(rng, input.len());
            assert_eq!(&decode(input, &cuts), whole, "cuts {cuts:?}");
        }
    }

    /// Cut points for `len` bytes: sorted, inside the input.
    pub(crate) fn splits(rng: &mut SmallRng, len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (0..rng.random_range(1..8))
            .map(|_| rng.random_range(0..=len))
            .collect();
        cuts.sort_unstable();
        cuts
    }

    /// `input` with one random mutation: a byte changed, dropped, doubled, or a CR, LF,
    /// NUL, space, colon or semicolon put in. Returns the position mutated too.
    pub(crate) fn mutate(
        rng: &mut SmallRng,
        input: &[u8],
        within: std::ops::Range<usize>,
    ) -> (Vec<u8>, usize) {
        let mut out = input.to_vec();
        let at = rng.random_range(within);
        match rng.random_range(0..4) {
            0 => out[at] = rng.random(),
            1 => {
                out.remove(at);
            }
            2 => out.insert(at, out[at]),
            _ => out.insert(at, b"\r\n\0 :;"[rng.random_range(0..6)]),
        }
        (out, at)
    }
}
