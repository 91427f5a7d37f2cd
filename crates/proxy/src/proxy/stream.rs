//! A connection's byte stream, plain or TLS: what the HTTP/1.1 paths read and write by
//! shared reference (a request's task and its body's upload at once), and what hyper,
//! tunnels and TCP relays own ([`AsyncRead`], [`AsyncWrite`]). Plain sockets stay on
//! tokio's own calls; TLS goes through [`TlsConn`].
//!
//! tokio keeps a socket marked readable until a read fails with `EAGAIN`, so a plain
//! read loop pays one failing `recv` per message. A read that returns less than the
//! buffer had room for has drained the socket (it is edge-triggered: the next arrival
//! raises a new event), so a plain read forgets the readiness there, as NGINX does
//! (`rev->ready = 0` after a short `recv`). Measured: 3.8 → 2 `recvfrom` per proxied request.
//! This is sound on the workers' current-thread runtimes only: there, no readiness event can
//! be processed between the read and the forgetting, so a newer event is never the one
//! forgotten (tokio also forgets only the readiness it saw, by its tick).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::TlsConn;

/// Read buffer room taken when a read finds none.
const READ_ROOM: usize = 8 * 1024;

/// A client's or backend's connection.
pub(crate) enum Stream {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS (boxed: a plain connection stays small).
    Tls(Box<TlsConn>),
}

impl Stream {
    /// The socket under it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.tcp(),
        }
    }

    /// Whether this is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The negotiated TLS version and ALPN protocol (`-`: none), for the access log;
    /// none for plain.
    pub(crate) fn tls_info(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => {
                let (version, alpn) = t.negotiated();
                let version = match version {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                    _ => "TLS",
                };
                let alpn = match alpn.as_deref() {
                    Some(b"h2") => "h2",
                    Some(b"http/1.1") => "http/1.1",
                    Some(_) => "other",
                    None => "-",
                };
                Some((version, alpn))
            }
        }
    }

    /// Whether a TLS session holds plaintext not read yet (or the peer's close_notify),
    /// which a peek at the socket cannot see.
    pub(crate) fn has_buffered(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.has_buffered(),
        }
    }

    /// Ready when a read may find bytes.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(t) => t.poll_read_ready(cx),
        }
    }

    /// Waits until a read may find bytes.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// Reads what there is into `buf`'s spare room (taking some when it has none); 0:
    /// the peer closed. `WouldBlock`: nothing after all (the caller waits again).
    pub(crate) fn read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(READ_ROOM);
        }
        match self {
            Stream::Plain(s) => read_plain(s, buf),
            Stream::Tls(t) => {
                let start = buf.len();
                buf.resize(buf.capacity(), 0);
                let r = t.try_read(&mut buf[start..]);
                buf.truncate(start + *r.as_ref().unwrap_or(&0));
                r
            }
        }
    }

    /// Reads what is there into `buf`, the one read of the HTTP/1.1 paths (client heads and
    /// bodies, backend responses). At the start of a message (`buf` empty) the read goes
    /// into the worker's scratch buffer and `buf` gets only what came: a request waiting on
    /// its backend then holds its head's few hundred bytes, not an 8 KiB buffer that the
    /// head, split off it, keeps alive, and a small message costs no 8 KiB allocation. A
    /// read of half the buffer or more (a body came with the head) hands the scratch buffer
    /// over instead of copying it, and the worker takes a new one. Otherwise `buf` grows
    /// by [`READ_ROOM`] when it has under 1 KiB of room.
    pub(crate) fn read_more(&self, buf: &mut BytesMut) -> io::Result<usize> {
        thread_local! {
            static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(READ_ROOM));
        }
        if !buf.is_empty() {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_ROOM);
            }
            return self.read_buf(buf);
        }
        SCRATCH.with_borrow_mut(|scratch| {
            // Never shared (only copied from or handed over whole), and cleared before each
            // read: a connection gets only the bytes its own read brought.
            scratch.clear();
            let read = self.read_buf(scratch);
            match read {
                Ok(n) if n >= READ_ROOM / 2 => {
                    *buf = std::mem::replace(scratch, BytesMut::with_capacity(READ_ROOM));
                }
                Ok(n) if n > 0 => buf.extend_from_slice(&scratch[..n]),
                _ => {}
            }
            read
        })
    }

    /// Writes part of `data` without waiting.
    pub(crate) fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(data),
            Stream::Tls(t) => t.try_write(data),
        }
    }

    /// Ready when a write may be tried.
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_write_ready(cx),
            Stream::Tls(t) => t.poll_write_ready(cx),
        }
    }

    /// Ready when everything written is on the socket (at once for plain sockets).
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(t) => t.poll_flush(cx),
        }
    }

    /// Ends the sending side: close_notify first on TLS, then the socket's FIN.
    pub(crate) fn shutdown_write(&self) {
        if let Stream::Tls(t) = self {
            t.close_notify();
        }
        let _ = socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => loop {
                ready!(t.poll_read_ready(cx))?;
                match t.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(t) => loop {
                ready!(t.poll_write_ready(cx))?;
                match t.try_write(data) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => return Poll::Ready(other),
                }
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => t.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => {
                t.close_notify();
                ready!(t.poll_flush(cx))?;
                let _ = socket2::SockRef::from(t.tcp()).shutdown(std::net::Shutdown::Write);
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// Reads what the socket has into `buf`'s spare capacity (0: the peer closed). The caller
/// waited for readiness; `WouldBlock` means it was stale.
fn read_plain(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    if n > 0 && n < room {
        // Drained: the next read waits for the next event instead of failing first. A
        // closed peer stays visible (tokio keeps the read-closed bit).
        let _ = stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
    Ok(n)
}
