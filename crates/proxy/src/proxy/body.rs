//! Request bodies, as the upload to a backend reads them ([`ReqBody`]): from hyper
//! (HTTP/2), or read off a client's HTTP/1.1 connection ([`ClientBody`]) through the
//! [`ClientIo`] that the connection's server loop ([`super::h1`]) shares with it, full
//! duplex, framed by the codec's [`BodyDecoder`]. A backend's response body is read by
//! [`super::client::BackendBody`].

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use super::stream::Stream;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use lbwasm_http::{BodyDecoder, BodyFraming, Decoded};

/// Read buffer growth step while a request body streams.
const BODY_READ: usize = 16 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Boxed so that hyper can take any error.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's HTTP/1.1 connection as its requests and bodies share it.
pub(crate) struct ClientIo {
    pub(super) stream: Stream,
    /// Bytes read and not yet consumed: the next head, body bytes, pipelined requests.
    pub(super) buf: RefCell<BytesMut>,
    /// The current request's body has been read to its end (or it had none).
    pub(super) body_done: Cell<bool>,
    /// The current request's final response head has been (or is being) written: too late
    /// for a `100 Continue`.
    pub(super) responded: Cell<bool>,
    /// A response the client takes no byte of for this long is cut off.
    pub(super) idle: Duration,
}

impl ClientIo {
    /// A connection with nothing read yet; `idle`: how long a response may wait for the
    /// client to take a byte.
    pub(super) fn new(stream: Stream, idle: Duration) -> Self {
        ClientIo {
            stream,
            buf: RefCell::new(BytesMut::new()),
            body_done: Cell::new(true),
            responded: Cell::new(false),
            idle,
        }
    }

    /// Between requests, with nothing read ahead: the read buffer goes back to the
    /// allocator until the next bytes arrive.
    pub(super) fn release_if_idle(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() && buf.capacity() > 0 {
            *buf = BytesMut::new();
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

/// A request body on an HTTP/1.1 client connection, read by the upload to the backend.
/// Sends `100 Continue` first when the client waits for it.
pub(crate) struct ClientBody {
    io: Rc<ClientIo>,
    decoder: BodyDecoder,
    /// Bytes of `100 Continue` still to write before reading.
    continue_left: usize,
}

impl ClientBody {
    /// The body of the request just parsed on `io`, delimited by `framing`;
    /// `expect_continue`: the client waits for `100 Continue` before sending it.
    pub(super) fn new(io: Rc<ClientIo>, framing: BodyFraming, expect_continue: bool) -> Self {
        ClientBody {
            io,
            decoder: framing.into(),
            continue_left: if expect_continue { CONTINUE.len() } else { 0 },
        }
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
                Ok(n) => {
                    self.continue_left -= n;
                    if self.continue_left == 0 {
                        // Over TLS the records may still be in the session: out they go.
                        ready!(self.io.stream.poll_flush(cx))?;
                    }
                }
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
                match this.decoder.decode(&mut buf) {
                    Ok(Decoded::Data(data)) => {
                        if this.decoder.is_done() {
                            this.io.body_done.set(true);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Decoded::Done) => {
                        this.io.body_done.set(true);
                        // Trailers go on where the next hop has room for them (HTTP/2).
                        return Poll::Ready(
                            this.decoder.take_trailers().map(Frame::trailers).map(Ok),
                        );
                    }
                    Ok(Decoded::More) => {}
                    Err(why) => {
                        return Poll::Ready(Some(Err(format!(
                            "invalid chunked request body: {why}"
                        )
                        .into())));
                    }
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(BODY_READ);
                }
            }
            ready!(this.poll_continue(cx))?;
            ready!(this.io.stream.poll_read_ready(cx))?;
            match this.io.stream.read_buf(&mut this.io.buf.borrow_mut()) {
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
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use lbwasm_http::testing::{body, chunked, rng, splits};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// The codec's decoder driven off a real socket: a request body comes out whole however
    /// the client's writes split it, marks the connection's body done, and leaves what
    /// follows it for the next head. A client waiting for `100 Continue` gets it first.
    #[tokio::test(flavor = "current_thread")]
    async fn request_bodies_are_read_off_the_socket_however_split() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for case in 0..40 {
            let mut rng = rng(case);
            let data = body(&mut rng);
            let (framing, mut input) = if case % 2 == 0 || data.is_empty() {
                (BodyFraming::Chunked, chunked(&mut rng, &data))
            } else {
                (BodyFraming::Length(data.len() as u64), data.clone())
            };
            let next = b"GET /next HTTP/1.1\r\n";
            input.extend_from_slice(next);
            let cuts = splits(&mut rng, input.len());
            let expect_continue = case % 3 == 0;

            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let io = Rc::new(ClientIo::new(Stream::Plain(server), Duration::from_secs(5)));
            io.body_done.set(false);
            let mut request = ClientBody::new(io.clone(), framing, expect_continue);
            request.start();
            let send = async {
                if expect_continue {
                    let mut interim = [0; CONTINUE.len()];
                    client.read_exact(&mut interim).await.unwrap();
                    assert_eq!(interim, CONTINUE, "case {case}");
                }
                let mut from = 0;
                for cut in cuts.iter().copied().chain([input.len()]) {
                    client.write_all(&input[from..cut]).await.unwrap();
                    from = cut;
                    tokio::task::yield_now().await;
                }
            };
            let (_, received) = tokio::join!(send, request.collect());
            assert_eq!(received.unwrap().to_bytes(), data, "case {case}: {cuts:?}");
            assert!(io.body_done.get(), "case {case}");
            let rest = io.buf.borrow();
            assert!(next.starts_with(&rest), "case {case}: {rest:?}");
        }
    }
}
