//! The HTTP data path of `lbwasm serve`: HTTP/2, bodies both ways, upgrades, forwarding
//! headers, every framing a backend may answer with and a client may send (strictly
//! parsed, pipelined, `100-continue`), and the request and idle timeouts. In-process
//! proxies, demo backends and hand-written ones that misbehave on purpose, over 127.0.0.1
//! with port 0; bounded, and asserting what clients receive.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::backends::{demo_backends, read_head, serve_each};
use common::bounded;
use common::config::{addrs, listener, with_admin};
use common::http::{client, exchange, get, h2_client, send};
use common::proxy::{start, start_config};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_requests_are_proxied() {
    bounded(async {
        let bs = demo_backends(2).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let h2 = h2_client();
        let mut seen = HashMap::new();
        for i in 0..10 {
            let r = get(&h2, server.listen_addrs()[0], &format!("/h2/{i}")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(r.version, Version::HTTP_2);
            assert!(
                r.text().starts_with(&format!("GET /h2/{i} served by")),
                "{}",
                r.text()
            );
            *seen.entry(r.served_by()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        // A body both ways over h2 as well.
        let body = Bytes::from(vec![b'x'; 100_000]);
        let r = send(
            &h2,
            Method::POST,
            server.listen_addrs()[0],
            "/echo",
            &[],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, body);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_both_ways() {
    bounded(async {
        let bs = demo_backends(1).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let c = client();
        let body: Bytes = (0..2_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let addr = server.listen_addrs()[0];
        let r = send(&c, Method::POST, addr, "/upload", &[], body.clone()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.len(), body.len());
        assert!(r.body == body, "echoed body differs");
        // HEAD has no body and keeps the connection usable.
        let r = send(&c, Method::HEAD, addr, "/head", &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.is_empty());
        assert_eq!(
            get(&c, server.listen_addrs()[0], "/after-head")
                .await
                .status,
            StatusCode::OK
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// A tiny backend that switches to an echo protocol on `Upgrade: echo`, and otherwise
/// answers with the request headers it received (one `name: value` per line).
async fn upgrade_backend() -> SocketAddr {
    use hyper::service::service_fn;
    serve_each(|stream| async move {
        let svc = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
            let mut res = Response::new(Full::new(Bytes::new()));
            if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(up) = on.await else { return };
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                res.headers_mut()
                    .insert("upgrade", "echo".parse().expect("value"));
                res.headers_mut()
                    .insert("connection", "upgrade".parse().expect("value"));
            } else {
                let dump: String = req
                    .headers()
                    .iter()
                    .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
                    .collect();
                *res.body_mut() = Full::new(Bytes::from(dump));
                res.headers_mut()
                    .insert("x-served-by", "upgrade-backend".parse().expect("value"));
                res.headers_mut()
                    .insert("keep-alive", "timeout=5".parse().expect("value"));
            }
            Ok::<_, std::convert::Infallible>(res)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades()
            .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_pass_bytes_both_ways() {
    bounded(async {
        let be = upgrade_backend().await;
        let server = start("round_robin", &[(be, 1)], "", "");
        let mut s = TcpStream::connect(server.listen_addrs()[0])
            .await
            .expect("connect");
        s.write_all(
            b"GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(
                s.read(&mut byte).await.expect("read head"),
                1,
                "closed during the head: {head:?}"
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: echo"), "{head}");
        for msg in [&b"hello through the tunnel"[..], &b"and back again"[..]] {
            s.write_all(msg).await.expect("write");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.expect("echo");
            assert_eq!(back, msg);
        }
        s.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("read to end");
        assert!(rest.is_empty(), "{rest:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added_and_hop_by_hop_ones_stripped() {
    bounded(async {
        let be = upgrade_backend().await;
        let server = start("round_robin", &[(be, 1)], "via = true", "");
        let c = client();
        let r = send(
            &c,
            Method::GET,
            server.listen_addrs()[0],
            "/headers",
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("x-forwarded-for", "10.1.2.3"),
                ("proxy-authorization", "x"),
                ("x-kept", "yes"),
            ],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let seen = r.text();
        assert!(
            seen.contains("x-forwarded-for: 10.1.2.3, 127.0.0.1\n"),
            "{seen}"
        );
        assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
        assert!(seen.contains("via: 1.1 lbwasm\n"), "{seen}");
        assert!(seen.contains("x-kept: yes\n"), "{seen}");
        assert!(!seen.contains("x-secret"), "{seen}");
        assert!(!seen.contains("proxy-authorization"), "{seen}");
        assert!(
            r.headers.get("keep-alive").is_none(),
            "hop-by-hop response header passed: {:?}",
            r.headers
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// A backend that answers by path with hand-written HTTP/1.1, to drive every framing the
/// proxy's backend client must handle: chunked (with extensions and trailers), delimited by
/// close, an interim `100 Continue`, a malformed length, a chunked request body, and a
/// keep-alive connection closed just as the next request arrives, and one that answers late.
async fn scripted_backend() -> SocketAddr {
    serve_each(|stream| async move {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut answered = 0;
        while let Some(head) = read_head(&mut r).await {
            let head: Vec<&str> = head.lines().collect();
            let path = head[0].split(' ').nth(1).unwrap_or("").to_string();
            if path == "/stale" && answered > 0 {
                // Closed as the second request arrives: nothing comes back.
                return;
            }
            answered += 1;
            let reply: String = match path.as_str() {
                "/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                               5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
                    .into(),
                "/close" => {
                    let _ = w
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
                        )
                        .await;
                    let _ = w.shutdown().await;
                    return;
                }
                "/continue" => "HTTP/1.1 100 Continue\r\n\r\n\
                                HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                    .into(),
                "/early" => {
                    // Refuses the body without reading it, as a size limit would.
                    let _ = w
                        .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n")
                        .await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return;
                }
                "/echo" => {
                    // Full duplex: each piece of the body is answered as it comes.
                    let length: usize = head
                        .iter()
                        .find_map(|h| {
                            h.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(str::to_string)
                        })
                        .and_then(|v| v.trim().parse().ok())
                        .expect("content-length");
                    if w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut left = length;
                    let mut piece = vec![0u8; 64 * 1024];
                    while left > 0 {
                        let n = piece.len().min(left);
                        if r.read_exact(&mut piece[..n]).await.is_err() {
                            return;
                        }
                        left -= n;
                        let chunk = [format!("{n:x}\r\n").as_bytes(), &piece[..n], b"\r\n"]
                            .concat();
                        if w.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    "0\r\n\r\n".into()
                }
                "/slow" => {
                    // Answers long after any request timeout in these tests.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate".into()
                }
                "/gzip-chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                                    3\r\nabc\r\n0\r\n\r\n"
                    .into(),
                "/bad-length" => {
                    "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello".into()
                }
                "/upload" => {
                    // A chunked request body, decoded by hand.
                    let chunked = head
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case("transfer-encoding: chunked"));
                    let mut body = Vec::new();
                    loop {
                        let mut size = String::new();
                        r.read_line(&mut size).await.expect("chunk size");
                        let n = usize::from_str_radix(size.trim(), 16).expect("hex");
                        let mut chunk = vec![0; n + 2];
                        r.read_exact(&mut chunk).await.expect("chunk");
                        if n == 0 {
                            break;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                    let text =
                        format!("chunked={chunked} {}", String::from_utf8_lossy(&body));
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    )
                }
                _ => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce".into(),
            };
            if w.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_framing_is_relayed_and_stale_connections_retried() {
    bounded(async {
        let backend = scripted_backend().await;
        // One proxy worker serves it all and reuses its pooled backend connections (the
        // test client may open a second connection, which two workers could split).
        let server = start_config(&with_admin(
            1,
            &listener("web", "round_robin", &[(backend, 1)], "", ""),
            None,
        ));
        let addr = server.listen_addrs()[0];
        let c = client();

        let r = get(&c, addr, "/chunked").await;
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello world"));
        let r = get(&c, addr, "/close").await;
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "until close"));
        let r = get(&c, addr, "/continue").await;
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "final"));
        let r = get(&c, addr, "/bad-length").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert!(r.text().contains("invalid Content-Length"), "{}", r.text());
        // A coding the proxy would not undo is refused, not passed on unlabelled.
        let r = get(&c, addr, "/gzip-chunked").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert!(r.text().contains("transfer coding other than chunked"), "{}", r.text());

        // The backend drops a pooled connection as the next GET arrives: the GET goes again
        // on a fresh connection, and the client never sees it.
        for _ in 0..3 {
            let r = get(&c, addr, "/stale").await;
            assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "once"));
        }
        // A POST that met the same fate is not sent twice: it may have been acted on.
        let posted = send(&c, Method::POST, addr, "/stale", &[], Bytes::from_static(b"x")).await;
        assert_eq!(posted.status, StatusCode::BAD_GATEWAY, "{}", posted.text());
        assert!(posted.text().contains("failed before answering"), "{}", posted.text());

        // Bodies go up full duplex: an early refusal is relayed (not a 502), and an echo
        // that answers as it reads, with far more than the socket buffers hold, finishes.
        let big: Bytes = vec![7u8; 16 << 20].into();
        let r = send(&c, Method::POST, addr, "/early", &[], big.clone()).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
        let c = client(); // the refused upload closed that connection
        let r = send(&c, Method::POST, addr, "/echo", &[], big.clone()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == big, "echo differs: {} bytes back", r.body.len());

        // A chunked request body of unknown length reaches the backend chunk-encoded.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        .await
        .expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(raw.ends_with("chunked=true abcdefg"), "{raw}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// The data of a complete chunked body with no trailers; None if it is anything else.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size, 16).ok()?;
        if n == 0 {
            return (rest == "\r\n").then_some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n..)?.strip_prefix("\r\n")?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_requests_are_framed_strictly_pipelined_and_continued() {
    bounded(async {
        let backend = scripted_backend().await;
        let server = start("round_robin", &[(backend, 1)], "", "");
        let addr = server.listen_addrs()[0];

        // A request whose body could be read two ways is refused before any backend sees
        // it, and the connection closes: what was smuggled behind it is never read.
        for (raw, status, why) in [
            (
                &b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                   0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"[..],
                "400",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "501",
                "other than chunked",
            ),
            (
                b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                "400",
                "conflicting Content-Length",
            ),
            (b"GET / HTTP/1.1\r\n\r\n", "400", "missing Host"),
        ] {
            let reply = exchange(addr, raw).await;
            assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
            assert!(reply.contains(why), "{reply}");
            assert!(reply.contains("connection: close\r\n"), "{reply}");
            assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
        }

        // A head past 64 KiB is refused whole, not buffered without end.
        let mut huge = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
        huge.resize(huge.len() + 70 * 1024, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let reply = exchange(addr, &huge).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        assert!(reply.contains("larger than 64 KiB"), "{reply}");

        // Pipelined requests are answered in order on one connection; a chunked answer
        // goes out chunked again (its trailers are a hop's and stay behind).
        let reply = exchange(
            addr,
            b"GET /chunked HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n\
              GET /chunked HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        let answers: Vec<&str> = reply.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
        assert_eq!(answers.len(), 3, "{reply}");
        for chunked in [answers[0], answers[2]] {
            assert!(chunked.contains("transfer-encoding: chunked\r\n"), "{reply}");
            let body = chunked.split_once("\r\n\r\n").expect("head").1;
            assert_eq!(dechunk(body).as_deref(), Some("hello world"), "{reply}");
        }
        assert!(answers[1].ends_with("\r\n\r\nonce"), "{reply}");
        assert!(!answers[1].contains("connection: close"), "{reply}");
        assert!(answers[2].contains("connection: close\r\n"), "{reply}");

        // A request that closes the connection, with far more pipelined behind it than
        // the proxy reads at once: one answer, then a clean close, not a reset (which the
        // unread bytes would cause, and which fails the read here).
        let mut raw = b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..4096 {
            raw.extend_from_slice(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: 0123456789abcdef\r\n\r\n");
        }
        let reply = exchange(addr, &raw).await;
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
        assert!(reply.ends_with("\r\n\r\nonce"), "{reply}");

        // HTTP/1.0 knows no chunks: the body ends with the connection.
        let reply = exchange(addr, b"GET /chunked HTTP/1.0\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(!reply.contains("transfer-encoding"), "{reply}");
        assert!(reply.contains("connection: close\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nhello world"), "{reply}");

        // A HEAD answer keeps the length the GET would have, and has no body.
        let reply = exchange(addr, b"HEAD /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        // (The backend's field names go on as it wrote them.)
        assert!(
            reply.to_ascii_lowercase().contains("content-length: 4\r\n"),
            "{reply}"
        );
        assert!(reply.ends_with("\r\n\r\n"), "{reply}");

        // `Expect: 100-continue`: the client hears `100 Continue` once the request is on its
        // way to a backend, then sends the body, which comes back through the echo.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write head");
        let mut interim = [0u8; 25];
        s.read_exact(&mut interim).await.expect("interim answer");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"hello").await.expect("write body");
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.expect("read");
        assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
        let body = rest.split_once("\r\n\r\n").expect("head").1;
        assert_eq!(dechunk(body).as_deref(), Some("hello"), "{rest}");

        // A body that comes in the same read as its head, more than half of the worker's
        // scratch buffer (handed to the connection whole) or a little of it (copied),
        // with a request pipelined behind: each byte goes where it belongs.
        for len in [6000usize, 100] {
            let body: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            let mut raw =
                format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n{body}")
                    .into_bytes();
            raw.extend_from_slice(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            let reply = exchange(addr, &raw).await;
            let answers: Vec<&str> = reply.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
            assert_eq!(answers.len(), 2, "{len}: {reply}");
            let echoed = answers[0].split_once("\r\n\r\n").expect("head").1;
            assert_eq!(dechunk(echoed).as_deref(), Some(body.as_str()), "{len}");
            assert!(answers[1].ends_with("\r\n\r\nonce"), "{len}: {reply}");
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_answer_in_time_gives_a_504() {
    bounded(async {
        let backend = scripted_backend().await;
        let server = start(
            "round_robin",
            &[(backend, 1)],
            "",
            "[listener.timeouts]\nrequest = \"300ms\"\n",
        );
        let addr = server.listen_addrs()[0];
        let c = client();
        // Twice on the same client connection, with an answered request between: the
        // connection's request timer must fire each time, and not early.
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let r = get(&c, addr, "/slow").await;
            assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
            assert!(
                r.text().contains("did not answer within 300ms"),
                "{}",
                r.text()
            );
            assert!(started.elapsed() >= Duration::from_millis(300));
            let r = get(&c, addr, "/x").await;
            assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "once"));
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed() {
    bounded(async {
        let bs = demo_backends(1).await;
        let keys = "[listener.timeouts]\nidle = \"300ms\"\n";
        let server = start("round_robin", &addrs(&bs), "", keys);
        let addr = server.listen_addrs()[0];
        // Silent from the start: closed without a byte.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        silent.read_to_end(&mut buf).await.expect("read");
        assert!(buf.is_empty());
        // Idle after a request: the response, then the close.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /once HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("read");
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("GET /once served by"), "{text}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_after_a_slow_answer_closes_at_the_idle_timeout() {
    // One timer serves both timeouts of a connection: a request that outlives the idle
    // timeout re-arms it for the request timeout (20 s here), and the connection, idle
    // again after the answer, must still close 1 s later, not at the request's deadline.
    bounded(async {
        let backend = scripted_backend().await;
        let keys = "[listener.timeouts]\nidle = \"1s\"\nrequest = \"20s\"\n";
        let server = start("round_robin", &[(backend, 1)], "", keys);
        let addr = server.listen_addrs()[0];
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut head = vec![0u8; 4096];
        let mut got = 0;
        while !String::from_utf8_lossy(&head[..got]).ends_with("late") {
            let n = s.read(&mut head[got..]).await.expect("read the answer");
            assert!(n > 0, "closed before the answer");
            got += n;
        }
        let text = String::from_utf8_lossy(&head[..got]).to_string();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // Idle now: closed within the idle timeout (a few seconds of slack), long before
        // the 20 s the request timer was armed for.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "an idle connection stayed open past the idle timeout: {closed:?}"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_longer_than_the_idle_one_is_kept_whole() {
    // The connection's one timer is set for the idle timeout (1 s) when the request
    // starts: the request must still get its full 2 s before the 504, not be cut at the
    // idle deadline, and not wait for the backend's late answer (5 s).
    bounded(async {
        let backend = scripted_backend().await;
        let keys = "[listener.timeouts]\nidle = \"1s\"\nrequest = \"2s\"\n";
        let server = start("round_robin", &[(backend, 1)], "", keys);
        let addr = server.listen_addrs()[0];
        let c = client();
        let started = std::time::Instant::now();
        let r = get(&c, addr, "/slow").await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
        assert!(
            r.text().contains("did not answer within 2s"),
            "{}",
            r.text()
        );
        assert!(
            took >= Duration::from_secs(2),
            "cut off early, after {took:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "waited for the late answer: {took:?}"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// The length of `/big`'s body: more than loopback sockets buffer, so a client that reads
/// none of it makes the proxy wait.
const BIG: usize = 256 << 20;

/// A backend with a body that never ends in time (`/stall`: 10 bytes of 100, then silence)
/// and one too big to be buffered (`/big`).
async fn slow_backend() -> SocketAddr {
    serve_each(|stream| async move {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let Some(head) = read_head(&mut r).await else {
            return;
        };
        if head.starts_with("GET /stall ") {
            let _ = w
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
            // Keeps the connection open, silent, until the test's runtime ends.
            std::future::pending::<()>().await;
        } else {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
            if w.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..BIG / chunk.len() {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_backends_and_clients_are_cut_off_after_the_idle_timeout() {
    bounded(async {
        let backend = slow_backend().await;
        let server = start(
            "round_robin",
            &[(backend, 1)],
            "",
            "[listener.timeouts]\nidle = \"1s\"\n[listener.load_report]\nenabled = false",
        );
        let addr = server.listen_addrs()[0];

        // The backend stops mid-body: the client's connection is closed short of the
        // declared length (not left waiting for the rest forever).
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            exchange(addr, b"GET /stall HTTP/1.1\r\nHost: lb\r\n\r\n"),
        )
        .await
        .expect("a stalled body must end");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(
            got.ends_with("\r\n\r\n0123456789"),
            "10 bytes, then the close: {got}"
        );

        // The client takes the head and stops reading: the proxy gives the response up
        // once it can write nothing for the idle timeout, instead of holding it (and the
        // backend connection) for as long as the client stays connected.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /big HTTP/1.1\r\nHost: lb\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 16];
        s.read_exact(&mut first).await.expect("response starts");
        // Silent well past the idle timeout, then read what is left.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest))
            .await
            .expect("the response must end");
        assert!(
            read.is_err() || rest.len() + 16 < BIG,
            "the whole body arrived"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
