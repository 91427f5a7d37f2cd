//! HTTP/2 and gRPC plumbing for the tests of HTTP/2 to backends: h2c backends (hyper, or the
//! `h2` crate when a test needs frame-level control: GOAWAY, RST_STREAM), a client that
//! multiplexes every request on ONE HTTP/2 connection (so that "one client connection, 50
//! concurrent calls" is exactly that), a request body fed from a channel (streaming calls),
//! and gRPC's 5-byte message framing. Every server is a task of the test's runtime, so it
//! stops with the test.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Any body error, boxed: the client and the servers mix several body kinds.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type of these tests' requests and responses, so that a handler can answer
/// with a whole body or a stream from the same function.
pub type AnyBody = BoxBody<Bytes, BoxError>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> AnyBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body (a request or a Trailers-Only answer).
pub fn empty() -> AnyBody {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// The frames of a body sent from another task: data as it becomes available, then
/// optionally trailers; the sender sees an error once the body is dropped (a reset stream,
/// a closed connection), which is how a hyper server tells its handler that its peer left.
pub struct ChanBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A streaming body and its sender: send `Frame::data`, then `Frame::trailers`, then drop
/// the sender to end the body.
pub fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, AnyBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChanBody { rx }.boxed())
}

/// Trailers (or headers) from `(name, value)` pairs.
pub fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    m
}

/// A hyper h2c backend: its address and how many TCP connections it accepted (a proxy
/// that multiplexes opens few; one that does not opens one per request).
pub struct H2Backend {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
}

impl H2Backend {
    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Starts a hyper HTTP/2 (prior knowledge, h2c) server on 127.0.0.1 port 0 answering every
/// request with `handle`.
pub async fn h2c_backend<F, Fut>(handle: F) -> H2Backend
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<AnyBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    H2Backend { addr, accepts }
}

/// Starts an `h2` crate server on 127.0.0.1 port 0: `conn` gets each accepted TCP
/// connection (and its ordinal, from 0) and drives it as the test needs.
pub async fn h2_raw_backend<F, Fut>(conn: F) -> H2Backend
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(conn(stream, n));
        }
    });
    H2Backend { addr, accepts }
}

/// One client HTTP/2 connection (prior knowledge), shared by every request sent through
/// it: clones multiplex streams on the same TCP connection.
#[derive(Clone)]
pub struct H2Conn {
    addr: SocketAddr,
    send: SendRequest<AnyBody>,
}

impl H2Conn {
    /// Connects to `addr` and completes the HTTP/2 handshake; the connection task ends when
    /// the last clone is dropped or the peer closes.
    pub async fn connect(addr: SocketAddr) -> H2Conn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Conn { addr, send }
    }

    /// A request builder for `path` on this connection's peer.
    pub fn builder(&self, method: hyper::Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
    }

    /// Sends `req`; the response head (its body still to read), or why none came.
    pub async fn request(&self, req: Request<AnyBody>) -> Result<Response<Incoming>, hyper::Error> {
        let mut send = self.send.clone();
        send.ready().await?;
        send.send_request(req).await
    }

    /// Sends `req` and reads the whole answer, trailers included.
    pub async fn call(&self, req: Request<AnyBody>) -> Result<H2Reply, BoxError> {
        let res = self.request(req).await?;
        let (parts, body) = res.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(H2Reply {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }
}

/// A whole HTTP/2 answer, trailers kept apart from headers.
#[derive(Debug)]
pub struct H2Reply {
    pub status: hyper::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl H2Reply {
    /// A header's value as text; None when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// A trailer's value as text; None when absent (or no trailers).
    pub fn trailer(&self, name: &str) -> Option<String> {
        self.trailers
            .as_ref()?
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// A gRPC status field where gRPC puts it: in the trailers, or in the headers of a
    /// Trailers-Only answer (no body, HEADERS with END_STREAM).
    pub fn grpc(&self, name: &str) -> Option<String> {
        self.trailer(name).or_else(|| {
            if self.body.is_empty() {
                self.header(name)
            } else {
                None
            }
        })
    }
}

/// One gRPC message in its wire framing: flag 0 (uncompressed), length (u32, big endian),
/// the message.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).expect("message size"));
    b.put_slice(message);
    b.freeze()
}

/// Several gRPC messages, framed back to back.
pub fn grpc_frames<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut b = BytesMut::new();
    for m in messages {
        b.put_slice(&grpc_frame(m));
    }
    b.freeze()
}

/// Splits a whole body into its gRPC messages; panics on a partial or compressed one (a
/// test's own backends send neither).
pub fn grpc_messages(body: &[u8]) -> Vec<Bytes> {
    let mut buf = Bytes::copy_from_slice(body);
    let mut out = Vec::new();
    while !buf.is_empty() {
        assert!(buf.len() >= 5, "truncated gRPC prefix: {buf:?}");
        let flag = buf.get_u8();
        assert_eq!(flag, 0, "compressed gRPC message");
        let len = buf.get_u32() as usize;
        assert!(buf.len() >= len, "truncated gRPC message");
        out.push(buf.split_to(len));
    }
    out
}

/// Reads gRPC messages from a streaming body one at a time (however DATA frames cut or join
/// them), then its trailers.
pub struct GrpcReader<B> {
    body: B,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> GrpcReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads from `body`.
    pub fn new(body: B) -> Self {
        GrpcReader {
            body,
            buf: BytesMut::new(),
            trailers: None,
            done: false,
        }
    }

    /// The next whole message; None once the body ended (see [`GrpcReader::trailers`]).
    pub async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if self.buf.len() >= 5 + len {
                    assert_eq!(self.buf[0], 0, "compressed gRPC message");
                    let mut m = self.buf.split_to(5 + len);
                    m.advance(5);
                    return Ok(Some(m.freeze()));
                }
            }
            if self.done {
                assert!(
                    self.buf.is_empty(),
                    "body ended inside a message: {:?}",
                    self.buf
                );
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buf.put_slice(&data),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    /// The trailers, once [`GrpcReader::next`] returned None.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }
}

/// A gRPC answer head: 200, `content-type: application/grpc`.
pub fn grpc_response(body: AnyBody) -> Response<AnyBody> {
    Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .expect("response")
}

/// A gRPC request head: POST, `content-type: application/grpc`, `te: trailers`.
pub fn grpc_request(conn: &H2Conn, path: &str, body: AnyBody) -> Request<AnyBody> {
    conn.builder(hyper::Method::POST, path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request")
}
