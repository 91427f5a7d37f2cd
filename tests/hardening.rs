//! Regression tests for the data path under hostile clients and backends (issue 12): each
//! drives an in-process proxy over 127.0.0.1 with raw sockets and misbehaving test backends,
//! and asserts what clients receive and what counts against a backend.
//!
//! - a backend's unasked bytes never reach another client (pooled connections are peeked);
//! - a client's broken, aborted or stalled body is the client's error (400/408), never a
//!   backend failure, an ejection or a retry;
//! - an unasked `101`, and a body cut short after its head, count against the backend;
//! - chunked framing is strict (no bare LF, bounded sizes and extensions, field-shaped
//!   trailers): a pipelined request is never read as trailers;
//! - an absolute-form target's authority is the Host sent on;
//! - `Connection` options are bounded; `Via` is opt-in; refusals are in `/metrics`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::backends::{demo_backends, read_head, serve_each};
use common::config::{listener, weight_1, with_admin};
use common::http::{client, exchange_lenient, get_request, read_lenient, status_of};
use common::proxy::{backend_state, start_config};
use common::within;
use lbwasm::serve::Server;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

/// A proxy, one worker (so every request shares one pool of backend connections), with
/// listener "web" over `backends`; `extra`: more lines for the listener.
fn start(backends: &[SocketAddr], extra: &str) -> Server {
    let web = listener(
        "web",
        "round_robin",
        &weight_1(backends.iter().copied()),
        extra,
        "",
    );
    start_config(&with_admin(1, &web, None))
}

/// One GET on its own connection; the whole response.
async fn get(addr: SocketAddr, path: &str) -> String {
    exchange_lenient(addr, get_request(addr, path).as_bytes()).await
}

/// The admin API's answer to `GET path`, as JSON or text.
async fn admin_get(server: &Server, path: &str) -> String {
    let addr = server.admin_addr().expect("admin");
    let raw = exchange_lenient(addr, get_request(addr, path).as_bytes()).await;
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A backend of listener "web" as `/backends` reports it.
async fn backend_report(server: &Server, addr: SocketAddr) -> Value {
    backend_state(&client(), server, addr).await
}

/// A backend that answers its very first request, then, `delay` later, writes `extra` on
/// the same connection unasked; every other request gets `ok`. (Once only: bytes that
/// arrive after the proxy has sent the next request on that connection are, to any
/// HTTP/1.1 client, that request's answer.)
async fn desync_backend(extra: &'static [u8], delay: Duration) -> SocketAddr {
    let once = Arc::new(std::sync::atomic::AtomicBool::new(true));
    serve_each(move |mut s| {
        let once = once.clone();
        async move {
            while let Some(head) = read_head(&mut s).await {
                if once.swap(false, Ordering::Relaxed) {
                    let answer: &[u8] = if head.starts_with("HEAD") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                    };
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(extra).await;
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_unasked_bytes_never_reach_another_client() {
    within(LIMIT, async {
        for (first, extra) in [
            (
                "GET",
                &b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON!"[..],
            ),
            // A body after a HEAD answer.
            ("HEAD", b"first"),
            // Even a lone byte.
            ("GET", b"X"),
        ] {
            let be = desync_backend(extra, Duration::from_millis(50)).await;
            let server = start(&[be], "");
            let proxy = server.listen_addrs()[0];
            // Keep-alive: the backend connection goes back to the pool.
            let r = exchange_lenient(
                proxy,
                format!("{first} /1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await;
            assert_eq!(status_of(&r), 200, "{r}");
            // The unasked bytes arrive while the connection is idle in the pool.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for i in 0..3 {
                let r = get(proxy, &format!("/next/{i}")).await;
                assert!(!r.contains("POISON"), "{first}: {r}");
                assert_eq!(status_of(&r), 200, "{first}: {r}");
                assert!(r.ends_with("\r\n\r\nok"), "{first}, request {i}: {r}");
            }
            // The backend is suspect: counted as failing.
            let report = backend_report(&server, be).await;
            assert!(report["failures"].as_u64() >= Some(1), "{first}: {report}");
            server.shutdown(Duration::from_secs(2)).await;
        }
    })
    .await;
}

/// A backend (hyper) that reads a request's whole body before it answers, naming itself
/// in `x-served-by`.
async fn slurp_backend(id: usize) -> SocketAddr {
    use http_body_util::{BodyExt as _, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    serve_each(move |stream| async move {
        let svc = service_fn(
            move |req: hyper::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                let res = hyper::Response::builder()
                    .header("x-served-by", id.to_string())
                    .body(Full::new(bytes::Bytes::from(format!(
                        "{} bytes",
                        body.len()
                    ))))
                    .expect("response");
                Ok::<_, hyper::Error>(res)
            },
        );
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
    .await
}

/// Requests whose bodies break by the client's doing: each must be answered 400/408 (or
/// closed) and cost the backends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_eject_healthy_backends() {
    within(LIMIT, async {
        let mut addrs = Vec::new();
        for id in 0..3 {
            addrs.push(slurp_backend(id).await);
        }
        let server = start(
            &addrs,
            "[listener.timeouts]\nrequest = \"500ms\"\n[listener.passive]\nconsecutive_failures = 2\n",
        );
        let proxy = server.listen_addrs()[0];
        let post = "POST /upload HTTP/1.1\r\nHost: t\r\n";
        for round in 0..3 {
            // Broken chunked framing with the head (refused before any backend).
            for bad in [
                "ffffffffffffffffff\r\nx\r\n0\r\n\r\n".to_string(),
                "8000000000000000\r\nx\r\n0\r\n\r\n".to_string(),
                format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100 * 1024)),
                "5\r\nhello\r\n0\r\nnot a field\r\n\r\n".to_string(),
            ] {
                let r = exchange_lenient(
                    proxy,
                    format!("{post}Transfer-Encoding: chunked\r\n\r\n{bad}").as_bytes(),
                )
                .await;
                assert_eq!(status_of(&r), 400, "round {round}: {r}");
            }
            // The same, found mid-body, after the head went to a backend.
            for bad in [
                "ffffffffffffffffff\r\nx\r\n0\r\n\r\n".to_string(),
                format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100 * 1024)),
            ] {
                let mut s = TcpStream::connect(proxy).await.expect("connect");
                s.write_all(format!("{post}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
                    .await
                    .expect("head");
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = s.write_all(bad.as_bytes()).await;
                let r = read_lenient(&mut s).await;
                assert_eq!(status_of(&r), 400, "round {round}: {r}");
            }
            // A body cut short by the client, which then goes away.
            let mut s = TcpStream::connect(proxy).await.expect("connect");
            s.write_all(format!("{post}Content-Length: 1000\r\n\r\n0123456789").as_bytes())
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(s);
            // A body that stalls past the request timeout.
            let mut s = TcpStream::connect(proxy).await.expect("connect");
            s.write_all(format!("{post}Content-Length: 1000\r\n\r\n0123456789").as_bytes())
                .await
                .expect("write");
            let r = read_lenient(&mut s).await;
            assert_eq!(status_of(&r), 408, "round {round}: {r}");
        }
        // A backend that streams its answer while the body still comes (the demo echo):
        // the client stalls its upload, the answer stalls with it: cut off at the idle
        // timeout, and not the backend's failure.
        let echo = demo_backends(1).await;
        let echo_server = start(
            &[echo[0].addr()],
            "[listener.timeouts]\nidle = \"500ms\"\n[listener.passive]\nconsecutive_failures = 1\n",
        );
        let mut s = TcpStream::connect(echo_server.listen_addrs()[0]).await.expect("connect");
        s.write_all(format!("{post}Content-Length: 1000\r\n\r\n0123456789").as_bytes())
            .await
            .expect("write");
        let r = read_lenient(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let report = backend_report(&echo_server, echo[0].addr()).await;
        assert_eq!(report["failures"], 0, "{report}");
        assert_eq!(report["healthy"], true, "{report}");
        echo_server.shutdown(Duration::from_secs(2)).await;

        for be in &addrs {
            let report = backend_report(&server, *be).await;
            assert_eq!(report["failures"], 0, "{report}");
            assert_eq!(report["healthy"], true, "{report}");
        }
        // Every backend still takes its share.
        let mut served = std::collections::HashSet::new();
        for i in 0..9 {
            let r = get(proxy, &format!("/after/{i}")).await;
            assert_eq!(status_of(&r), 200, "{r}");
            let by = r
                .lines()
                .find_map(|l| l.strip_prefix("x-served-by: "))
                .expect("x-served-by")
                .to_string();
            served.insert(by);
        }
        assert_eq!(served.len(), 3, "{served:?}");
        let metrics = admin_get(&server, "/metrics").await;
        for reason in ["bad_request", "timeout"] {
            let line = format!("lbwasm_requests_refused_total{{listener=\"web\",reason=\"{reason}\"}}");
            assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
        }
        server.shutdown(Duration::from_secs(2)).await;
    })
    .await;
}

/// A backend that misbehaves after a good head: `101` to a plain GET, or a body cut short.
async fn broken_backend(answer: &'static [u8], hits: Arc<AtomicUsize>) -> SocketAddr {
    serve_each(move |mut s| {
        let hits = hits.clone();
        async move {
            if read_head(&mut s).await.is_some() {
                hits.fetch_add(1, Ordering::Relaxed);
                let _ = s.write_all(answer).await;
            }
            // Closed here: the body (or the switched protocol) never comes.
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unasked_switches_and_cut_bodies_count_against_the_backend() {
    within(LIMIT, async {
        for (what, answer) in [
            (
                "unasked 101",
                &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"[..],
            ),
            (
                "cut body",
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
            ),
            (
                "cut chunked body",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            ),
        ] {
            let good = demo_backends(2).await;
            let hits = Arc::new(AtomicUsize::new(0));
            let bad = broken_backend(answer, hits.clone()).await;
            let mut addrs: Vec<SocketAddr> = good.iter().map(|b| b.addr()).collect();
            addrs.push(bad);
            let server = start(
                &addrs,
                "[listener.passive]\nconsecutive_failures = 2\nbase_ejection = \"1m\"\n",
            );
            let proxy = server.listen_addrs()[0];
            let mut failed = 0;
            for i in 0..30 {
                let r = get(proxy, &format!("/g/{i}")).await;
                if !(r.starts_with("HTTP/1.1 200") && r.contains("x-served-by")) {
                    failed += 1;
                }
            }
            let report = backend_report(&server, bad).await;
            assert_eq!(report["healthy"], false, "{what}: {report}");
            assert!(report["failures"].as_u64() >= Some(2), "{what}: {report}");
            if what == "unasked 101" {
                // Retried elsewhere before any byte reached the client: nothing failed.
                assert_eq!(failed, 0, "{what}");
            } else {
                // A body cut after its head cannot be retried, but the backend is out
                // after a few of them (every third request, without the count).
                assert!(failed < 10, "{what}: {failed} failed");
            }
            // Ejected: no request reaches it any more.
            let before = hits.load(Ordering::Relaxed);
            for i in 0..6 {
                let r = get(proxy, &format!("/h/{i}")).await;
                assert_eq!(status_of(&r), 200, "{what}: {r}");
            }
            assert_eq!(hits.load(Ordering::Relaxed), before, "{what}");
            server.shutdown(Duration::from_secs(2)).await;
        }
    })
    .await;
}

/// A backend that answers every request with the head it received, and counts them.
async fn echo_head_backend(count: Arc<AtomicUsize>) -> SocketAddr {
    serve_each(move |mut s| {
        let count = count.clone();
        async move {
            while let Some(head) = read_head(&mut s).await {
                count.fetch_add(1, Ordering::Relaxed);
                // Reads the body before answering, as a server that keeps the connection
                // must: one that answers early and leaves the body unread would take the
                // body for its next request.
                if head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked")
                    && !skip_chunked(&mut s).await
                {
                    return;
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                    head.len()
                );
                if s.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// Reads one line, through its LF; None when the peer closed first.
async fn read_line(s: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut byte).await {
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// Reads a chunked body through its trailers; false when it is cut or malformed.
async fn skip_chunked(s: &mut TcpStream) -> bool {
    loop {
        let Some(line) = read_line(s).await else {
            return false;
        };
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or(""), 16) else {
            return false;
        };
        if size == 0 {
            loop {
                match read_line(s).await {
                    Some(l) if l.is_empty() => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
        }
        let mut data = vec![0u8; size + 2];
        if s.read_exact(&mut data).await.is_err() {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_framing_is_strict_and_pipelined_requests_stay_requests() {
    within(LIMIT, async {
        let count = Arc::new(AtomicUsize::new(0));
        let be = echo_head_backend(count.clone()).await;
        let server = start(&[be], "");
        let proxy = server.listen_addrs()[0];
        let second = "GET /second HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        for last in [
            "0\r\n\n",
            "0\n\r\n",
            "0\r\nX: 1\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
        ] {
            let r = exchange_lenient(
                proxy,
                format!(
                    "POST /first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5\r\nhello\r\n{last}{second}"
                )
                .as_bytes(),
            )
            .await;
            assert_eq!(status_of(&r), 400, "{last:?}: {r}");
            assert!(!r.contains("/second"), "{last:?}: {r}");
            // One answer, and the connection closed: nothing more was read as a request.
            assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{last:?}: {r}");
            // Refused before any backend saw it.
            assert_eq!(count.load(Ordering::Relaxed), 0, "{last:?}: {r}");
        }
        // The same bare LF arriving after the head went on to a backend that reads the
        // whole body first: still a 400, still one answer.
        let slurp = slurp_backend(0).await;
        let other = start(&[slurp], "");
        let mut s = TcpStream::connect(other.listen_addrs()[0])
            .await
            .expect("connect");
        s.write_all(b"POST /first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .expect("head");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = s
            .write_all(format!("5\r\nhello\r\n0\r\n\n{second}").as_bytes())
            .await;
        let r = read_lenient(&mut s).await;
        assert_eq!(status_of(&r), 400, "{r}");
        assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
        let report = backend_report(&other, slurp).await;
        assert_eq!(report["failures"], 0, "{report}");
        other.shutdown(Duration::from_secs(2)).await;
        // Well-formed trailers and a pipelined request that follows are both served.
        let r = exchange_lenient(
            proxy,
            format!(
                "POST /first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n{second}"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
        assert!(r.contains("GET /second"), "{r}");
        server.shutdown(Duration::from_secs(2)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_targets_set_the_host_and_connection_options_are_bounded() {
    within(LIMIT, async {
        let count = Arc::new(AtomicUsize::new(0));
        let be = echo_head_backend(count).await;
        let server = start(&[be], "hash_key = \"header:host\"");
        let proxy = server.listen_addrs()[0];
        let r = exchange_lenient(
            proxy,
            b"GET http://good.example/abs HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status_of(&r), 200, "{r}");
        let sent = r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        assert!(sent.starts_with("GET /abs HTTP/1.1\r\n"), "{sent}");
        assert!(sent.to_ascii_lowercase().contains("host: good.example\r\n"), "{sent}");
        assert!(!sent.contains("evil"), "{sent}");
        // Thousands of Connection options: refused, not walked once per field.
        let tokens: Vec<String> = (0..29_000).map(|i| format!("x{i}")).collect();
        let mut fields = String::new();
        for i in 0..120 {
            fields.push_str(&format!("X-F{i}: v\r\n"));
        }
        let r = exchange_lenient(
            proxy,
            format!(
                "GET / HTTP/1.1\r\nHost: t\r\n{fields}Connection: {}\r\n\r\n",
                tokens.join(",")
            )
            .as_bytes(),
        )
        .await;
        // The head is over 64 KiB as well as over the option bound: refused either way.
        assert!(matches!(status_of(&r), 400 | 431), "{r}");
        let r = exchange_lenient(
            proxy,
            format!(
                "GET / HTTP/1.1\r\nHost: t\r\n{fields}Connection: close, {}\r\n\r\n",
                tokens[..40].join(",")
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&r), 400, "{r}");
        assert!(r.contains("Connection options"), "{r}");
        // A few options, as real clients send: served, and the named fields stripped.
        let r = exchange_lenient(
            proxy,
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close, x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
        )
        .await;
        assert_eq!(status_of(&r), 200, "{r}");
        assert!(!r.contains("X-A: 1") && r.contains("X-B: 2"), "{r}");
        server.shutdown(Duration::from_secs(2)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_is_opt_in() {
    within(LIMIT, async {
        let be = echo_head_backend(Arc::new(AtomicUsize::new(0))).await;
        for (extra, via) in [("", false), ("via = true", true)] {
            let server = start(&[be], extra);
            let r = get(server.listen_addrs()[0], "/").await;
            assert_eq!(status_of(&r), 200, "{r}");
            assert_eq!(r.contains("via: 1.1 lbwasm"), via, "{extra:?}: {r}");
            server.shutdown(Duration::from_secs(2)).await;
        }
    })
    .await;
}
