//! Requests to what a test started: through a hyper client (HTTP/1.1, or HTTP/2 with prior
//! knowledge), or written byte for byte on a socket when the test must control every byte
//! (framing, smuggling, `Host`, `Origin`) or read every byte back.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Method, Request, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The client the tests use: keeps connections alive, as real clients do.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client (upgrading to nothing).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that speaks HTTP/2 with prior knowledge (h2c), as gRPC clients do.
pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response, its body collected.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub version: Version,
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossy: a test about bytes compares [`Reply::body`]).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-served-by` the demo backends set: which backend answered.
    pub fn served_by(&self) -> String {
        self.headers
            .get("x-served-by")
            .unwrap_or_else(|| {
                panic!(
                    "no x-served-by; status {} body {:?}",
                    self.status,
                    self.text()
                )
            })
            .to_str()
            .expect("ascii x-served-by")
            .to_string()
    }
}

/// Why [`try_send`] got no whole response: the request failed (a refused connection, a
/// closed one: an answer some tests wait for) or the body broke off.
pub type Failed = Box<dyn std::error::Error + Send + Sync>;

/// One request to `http://{addr}{path}`; the error when no whole response came.
pub async fn try_send(
    client: &HttpClient,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, Failed> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(Full::new(body)).expect("request"))
        .await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    })
}

/// One request that must be answered (with any status).
pub async fn send(
    client: &HttpClient,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    try_send(client, method, addr, path, headers, body)
        .await
        .expect("request failed")
}

/// One GET that must be answered.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Reply {
    send(client, Method::GET, addr, path, &[], Bytes::new()).await
}

/// Writes `raw` on a new connection to `addr` and reads until the peer closes it; a reset
/// fails the test (a clean close is part of what is tested).
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `raw` on a new connection to `addr`; what comes back, as [`read_lenient`] reads it.
pub async fn exchange_lenient(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    read_lenient(&mut s).await
}

/// What `s` sends until it closes, resets, or 5 s have passed: a refusal may be followed by
/// a reset (the request's unread bytes), and an event stream never ends, so the test judges
/// what arrived.
pub async fn read_lenient(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.x response.
pub fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5)?.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response:?}"))
}

/// A `GET path` written byte for byte, `Host` the address it goes to, closing the connection.
pub fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}
