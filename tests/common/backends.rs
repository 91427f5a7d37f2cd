//! Backends for the proxy to balance: the demo backends of `lbwasm backend` (in-process, on
//! port 0), and the plumbing of hand-written test servers that misbehave on purpose (each
//! test keeps its own server's behaviour; what they share is here).

use std::future::Future;
use std::net::SocketAddr;

use lbwasm::backend::{self, BackendConfig, BackendHandle, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::{TcpListener, TcpStream};

/// `n` demo HTTP backends with default settings.
pub async fn demo_backends(n: usize) -> Vec<BackendHandle> {
    spawn_each(n, Protocol::Http).await
}

/// `n` demo TCP backends (`PING` → `PONG id`, other lines echoed).
pub async fn tcp_backends(n: usize) -> Vec<BackendHandle> {
    spawn_each(n, Protocol::Tcp).await
}

async fn spawn_each(n: usize, protocol: Protocol) -> Vec<BackendHandle> {
    let mut v = Vec::new();
    for _ in 0..n {
        let mut cfg = BackendConfig::new(0);
        cfg.protocol = protocol;
        v.push(backend::spawn(cfg).await.expect("backend"));
    }
    v
}

/// A test server on 127.0.0.1 (port 0): `handle` runs in its own task for each connection.
pub async fn serve_each<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
    addr
}

/// Reads one request head, through its blank line, byte by byte (so that nothing after it,
/// a body or the next request, is consumed); None when the peer closed first.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match r.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An address nothing listens on: bound, then closed.
pub fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}
