//! A TLS session on a socket that several tasks use at once by shared reference, as the
//! proxy's HTTP/1.1 paths use a plain socket: the request's task reads while its body's
//! upload writes (full duplex), each waiting on the socket's readiness.
//!
//! rustls is sans-I/O, so this is a small pump: reads pull records off the socket into
//! the session until it yields plaintext; writes hand plaintext to the session and push
//! its records out. Records the socket could not take yet stay in the session, and a
//! writer that wants them gone waits in [`TlsConn::poll_flush`]; a write refuses more
//! plaintext while earlier records wait, so a slow reader pushes back as on a socket.

use std::cell::RefCell;
use std::io::{self, Read as _, Write as _};
use std::task::{Context, Poll, ready};

use tokio::net::TcpStream;

/// A socket and the TLS session on it (client or server side).
pub struct TlsConn {
    tcp: TcpStream,
    tls: RefCell<rustls::Connection>,
}

impl TlsConn {
    /// Wraps a handshaken session; whatever it still has to send (TLS 1.3 session
    /// tickets) goes as soon as the socket takes it.
    pub fn new(tcp: TcpStream, tls: impl Into<rustls::Connection>) -> TlsConn {
        let conn = TlsConn {
            tcp,
            tls: RefCell::new(tls.into()),
        };
        let _ = conn.flush(&mut conn.tls.borrow_mut());
        conn
    }

    /// The socket (addresses, options, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The negotiated version and ALPN protocol, for logs.
    pub fn negotiated(&self) -> (Option<rustls::ProtocolVersion>, Option<Vec<u8>>) {
        let tls = self.tls.borrow();
        (
            tls.protocol_version(),
            tls.alpn_protocol().map(<[u8]>::to_vec),
        )
    }

    /// Whether plaintext (or the peer's close_notify) waits in the session.
    pub fn has_buffered(&self) -> bool {
        !self.tls.borrow().wants_read()
    }

    /// Ready when plaintext is waiting or the socket has bytes (which may turn out to be
    /// only part of a record: a read then says `WouldBlock`).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.tls.borrow().wants_read() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Reads plaintext into `out` (0: the peer closed); `WouldBlock` when no whole record
    /// has arrived.
    pub fn try_read(&self, out: &mut [u8]) -> io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        loop {
            match tls.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket closed without close_notify: an end all the same (HTTP's
                // framing says whether anything was cut short).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            tls.read_tls(&mut SockIo(&self.tcp))?;
            if let Err(e) = tls.process_new_packets() {
                // The alert rustls queued tells the peer why.
                let _ = self.flush(&mut tls);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // A key update or alert to answer goes out with the next flush at the latest.
            let _ = self.flush(&mut tls);
        }
    }

    /// Takes plaintext (part of `data`, as a socket write); `WouldBlock` while records
    /// from earlier writes are still waiting for the socket.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        self.flush(&mut tls)?;
        let n = tls.writer().write(data)?;
        match self.flush(&mut tls) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    /// Ready when a write may be tried: no records waiting, or the socket may take some.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.tls.borrow().wants_write() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_write_ready(cx)
    }

    /// Ready when every record written so far is on the socket.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.flush(&mut self.tls.borrow_mut()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// Queues close_notify (the clean end of a TLS stream) and sends what the socket
    /// takes now.
    pub fn close_notify(&self) {
        let mut tls = self.tls.borrow_mut();
        tls.send_close_notify();
        let _ = self.flush(&mut tls);
    }

    fn flush(&self, tls: &mut rustls::Connection) -> io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut SockIo(&self.tcp))?;
        }
        Ok(())
    }
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        // Best effort, never waiting: a peer that reads to the end sees a clean close.
        self.close_notify();
    }
}

/// The socket as rustls reads and writes it: non-blocking, `WouldBlock` when it has
/// nothing or takes nothing (tokio then forgets the readiness it had).
struct SockIo<'a>(&'a TcpStream);

impl io::Read for SockIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for SockIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;

    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A handshaken pair over loopback: the server side as a [`TlsConn`], the client as
    /// tokio-rustls' stream.
    async fn pair() -> (TlsConn, tokio_rustls::client::TlsStream<TcpStream>) {
        let c = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![c.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("a.test").unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            connector.connect(name, tcp).await.unwrap()
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let (tcp, session) = acceptor.accept(tcp).await.unwrap().into_inner();
            TlsConn::new(tcp, session)
        };
        let (client, server) = tokio::join!(connect, accept);
        (server, client)
    }

    async fn read_some(conn: &TlsConn, out: &mut Vec<u8>) -> usize {
        let mut buf = [0u8; 8192];
        loop {
            poll_fn(|cx| conn.poll_read_ready(cx)).await.unwrap();
            match conn.try_read(&mut buf) {
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    return n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn write_all(conn: &TlsConn, mut data: &[u8]) {
        while !data.is_empty() {
            match conn.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_fn(|cx| conn.poll_write_ready(cx)).await.unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        poll_fn(|cx| conn.poll_flush(cx)).await.unwrap();
    }

    /// Both directions at once on one shared session, as a request's task and its body's
    /// upload use it: 4 MiB each way, more than the socket buffers hold, so that writes
    /// wait on readiness and records wait in the session; everything arrives in order, and
    /// the end is a clean close_notify.
    #[tokio::test(flavor = "current_thread")]
    async fn full_duplex_on_a_shared_session_moves_everything_and_ends_cleanly() {
        let (server, client) = pair().await;
        let up: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..4 << 20).map(|i| (i % 241) as u8).collect();
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let server_reads = async {
            let mut got = Vec::new();
            while got.len() < up.len() {
                assert!(read_some(&server, &mut got).await > 0, "closed early");
            }
            got
        };
        let server_writes = async {
            write_all(&server, &down).await;
            server.close_notify();
        };
        let client_writes = async { client_w.write_all(&up).await.unwrap() };
        let client_reads = async {
            let mut got = Vec::new();
            client_r.read_to_end(&mut got).await.unwrap();
            got
        };
        let (got_up, (), (), got_down) =
            tokio::join!(server_reads, server_writes, client_writes, client_reads);
        assert!(got_up == up, "upload corrupted ({} bytes)", got_up.len());
        assert!(
            got_down == down,
            "download corrupted ({} bytes)",
            got_down.len()
        );
        // The client closes too: the server reads the end.
        let mut client = client_r.unsplit(client_w);
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(read_some(&server, &mut rest).await, 0);
    }
}
