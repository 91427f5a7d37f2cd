//! Byte relays: a TCP-mode connection, or an HTTP connection after a protocol switch
//! (WebSocket and the like). Both directions are copied until both are closed (a half-close
//! is passed on), or until nothing has moved either way for the idle timeout.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::client::BackendConn;
use super::stream::Stream;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// Relays between a client connection that switched protocols and the backend connection
/// that switched: first what each side sent beyond the switch (`early`, the client's bytes
/// after its request head; the backend's after its `101` head).
pub(super) async fn switched(
    mut client: Stream,
    early: Bytes,
    conn: BackendConn,
    idle: Duration,
) -> io::Result<()> {
    if !conn.buf.is_empty() {
        client.write_all(&conn.buf).await?;
    }
    // A request that switches protocols has no body, so no upload task shares the socket.
    let mut stream = std::rc::Rc::try_unwrap(conn.stream)
        .map_err(|_| io::Error::other("the request body is still being sent"))?;
    if !early.is_empty() {
        stream.write_all(&early).await?;
    }
    relay(client, stream, idle, &mut Relayed::default()).await
}

/// Bytes relayed: read from the first side, and from the second.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Relayed {
    pub(super) from_a: u64,
    pub(super) from_b: u64,
}

/// Copies both ways until both directions are closed, or nothing moved for `idle` (then
/// both sides are dropped, which closes them). `relayed` counts what was read, however it
/// ended.
pub(super) async fn relay<A, B>(a: A, b: B, idle: Duration, relayed: &mut Relayed) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Rc::new(Cell::new(tokio::time::Instant::now()));
    let mut a = Touch {
        io: a,
        last: last.clone(),
        read: 0,
    };
    let mut b = Touch {
        io: b,
        last: last.clone(),
        read: 0,
    };
    let quiet = async {
        loop {
            let due = last.get() + idle;
            if due <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let done = tokio::select! {
        done = tokio::io::copy_bidirectional(&mut a, &mut b) => done.map(drop),
        () = quiet => {
            tracing::debug!(idle = ?idle, "relayed connection idle; closing");
            Ok(())
        }
    };
    *relayed = Relayed {
        from_a: a.read,
        from_b: b.read,
    };
    done
}

/// A stream that notes when bytes last arrived on it, and how many.
struct Touch<T> {
    io: T,
    last: Rc<Cell<tokio::time::Instant>>,
    read: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Touch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        if got > 0 {
            this.last.set(tokio::time::Instant::now());
            this.read += got as u64;
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
