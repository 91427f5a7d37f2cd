//! `lbwasm serve` with TCP listeners: connections balanced over TCP backends, half-closes
//! passed on, and the client's address told to backends by the PROXY protocol (v1 and v2).
//! On 127.0.0.1, port 0 everywhere; bounded, and asserting what crosses the proxy.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::backends::{serve_each, tcp_backends};
use common::bounded;
use common::config::{addrs, listener, with_admin};
use common::proxy::{id_of, start, start_config};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_balance_connections() {
    bounded(async {
        let bs = tcp_backends(2).await;
        let server = start("round_robin", &addrs(&bs), "protocol = \"tcp\"", "");
        let addr = server.listen_addrs()[0];
        let mut seen = HashMap::new();
        for _ in 0..6 {
            let s = TcpStream::connect(addr).await.expect("connect");
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"PING\n").await.expect("write");
            let mut line = String::new();
            s.read_line(&mut line).await.expect("read");
            let id = line
                .trim()
                .strip_prefix("PONG ")
                .unwrap_or_else(|| panic!("{line:?}"))
                .to_string();
            *seen.entry(id).or_insert(0) += 1;
        }
        assert_eq!(seen.get(&id_of(&bs[0])), Some(&3), "{seen:?}");
        assert_eq!(seen.get(&id_of(&bs[1])), Some(&3), "{seen:?}");
        // A half-close reaches the backend, which answers and closes its side too.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"hello\n").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut all = String::new();
        s.read_to_string(&mut all).await.expect("read to end");
        assert!(all.ends_with(" hello\n"), "{all:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// A TCP backend that reads a PROXY header (v1 or v2), answers one line naming the
/// addresses it carried (`TCP4 src dst`), then echoes what follows.
async fn proxy_protocol_backend() -> SocketAddr {
    serve_each(|s| async move {
        let mut s = BufReader::new(s);
        let mut first = [0u8; 16];
        s.read_exact(&mut first[..6]).await.expect("header start");
        let line = if &first[..6] == b"PROXY " {
            let mut rest = String::new();
            s.read_line(&mut rest).await.expect("v1 line");
            let f: Vec<&str> = rest.split_whitespace().collect();
            format!("{} {}:{} {}:{}", f[0], f[1], f[3], f[2], f[4])
        } else {
            s.read_exact(&mut first[6..]).await.expect("v2 header");
            assert_eq!(&first[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
            assert_eq!(
                (first[12], first[13]),
                (0x21, 0x11),
                "v2 PROXY, TCP over IPv4"
            );
            let len = usize::from(u16::from_be_bytes([first[14], first[15]]));
            let mut a = vec![0u8; len];
            s.read_exact(&mut a).await.expect("v2 addresses");
            let ip = |o: usize| std::net::Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            format!("TCP4 {}:{} {}:{}", ip(0), port(8), ip(4), port(10))
        };
        // The client's first bytes may have come with the header: echo them too.
        let early = s.buffer().to_vec();
        let mut s = s.into_inner();
        s.write_all(format!("{line}\n").as_bytes())
            .await
            .expect("answer");
        s.write_all(&early).await.expect("echo");
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_tell_backends_the_client_by_the_proxy_protocol() {
    bounded(async {
        let (b1, b2) = (
            proxy_protocol_backend().await,
            proxy_protocol_backend().await,
        );
        let tcp = |name: &str, backend: SocketAddr, version: &str| {
            let keys = format!("protocol = \"tcp\"\nproxy_protocol = \"{version}\"");
            listener(name, "round_robin", &[(backend, 1)], &keys, "")
        };
        let text = format!("{}{}", tcp("v1", b1, "v1"), tcp("v2", b2, "v2"));
        let server = start_config(&with_admin(2, &text, None));
        for addr in server.listen_addrs() {
            let s = TcpStream::connect(addr).await.expect("connect");
            let client = s.local_addr().expect("client address");
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"hello\n").await.expect("write");
            let mut got = String::new();
            s.read_line(&mut got).await.expect("header line");
            assert_eq!(
                got,
                format!("TCP4 {client} {addr}\n"),
                "header seen through {addr}"
            );
            let mut echo = String::new();
            s.read_line(&mut echo).await.expect("echo");
            assert_eq!(echo, "hello\n", "the client's bytes follow the header");
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
