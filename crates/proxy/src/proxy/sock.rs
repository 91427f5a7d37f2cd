//! Backend connects ([`connect`], with TLS when the pool has it: [`connect_stream`]), and
//! writes on a stream shared by reference (a request's task and its body upload use one
//! at once), waiting on readiness only when the socket is full.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::stream::Stream;
use crate::tls::{TlsConn, Upstream};

/// Writes all of `data`, and over TLS sees it onto the socket. With `stall`, gives up
/// when the peer takes no byte for that long (a client that stops reading would otherwise
/// hold the response, and its backend connection, forever); the timer is armed only when
/// the socket buffer is full, never on the usual path. Without, the caller's own deadline
/// bounds it (a backend upload runs within the request timeout).
pub(crate) async fn write_all(
    stream: &Stream,
    mut data: &[u8],
    stall: Option<Duration>,
) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                within_stall(stall, poll_fn(|cx| stream.poll_write_ready(cx))).await?;
            }
            Err(e) => return Err(e),
        }
    }
    if stream.is_tls() {
        within_stall(stall, poll_fn(|cx| stream.poll_flush(cx))).await?;
    }
    Ok(())
}

/// `wait` for the socket to take bytes, bounded by `stall` when given.
async fn within_stall(
    stall: Option<Duration>,
    wait: impl Future<Output = io::Result<()>>,
) -> io::Result<()> {
    let Some(stall) = stall else {
        return wait.await;
    };
    tokio::time::timeout(stall, wait).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took no byte for {stall:?}"),
        )
    })?
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The TCP connect failed (refused, unreachable...).
    Io(io::Error),
    /// The TCP connect took longer than the connect timeout.
    Timeout(Duration),
    /// The TLS handshake failed (the message says why: a certificate not trusted, say).
    Tls(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) | ConnectError::Tls(e) => write!(f, "{e}"),
            ConnectError::Timeout(d) => write!(f, "no connection within {d:?}"),
        }
    }
}

/// A new connection to a backend at `addr` within `connect_timeout`, with Nagle off (the
/// proxy writes whole messages).
pub(crate) async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::Timeout(connect_timeout)),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A new connection to a backend, with TLS when the pool has it (the handshake gets a
/// connect timeout of its own).
pub(crate) async fn connect_stream(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&Upstream>,
) -> Result<Stream, ConnectError> {
    secure(
        connect(addr, connect_timeout).await?,
        addr,
        connect_timeout,
        tls,
    )
    .await
}

/// `tcp` to the backend at `addr` as the pool speaks to it: with a TLS handshake first
/// when it has TLS.
pub(crate) async fn secure(
    tcp: TcpStream,
    addr: SocketAddr,
    handshake_timeout: Duration,
    tls: Option<&Upstream>,
) -> Result<Stream, ConnectError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let (tcp, session) = tls
        .connect(tcp, addr, handshake_timeout)
        .await
        .map_err(ConnectError::Tls)?
        .into_inner();
    Ok(Stream::Tls(Box::new(TlsConn::new(tcp, session))))
}
