//! HTTP/2 and gRPC to backends (issue 14) through an in-process proxy with
//! `backend_protocol = "h2c"`: per-stream balancing over multiplexed backend connections,
//! trailers and gRPC statuses end to end, streaming calls both ways, a cancelled call reset
//! on the backend, gRPC deadlines and errors in gRPC terms, GOAWAY and REFUSED_STREAM
//! handled without a failed call, and an `Upgrade: h2c` from an HTTP/1.1 client refused by
//! not forwarding it. Real hyper clients and servers (and `h2` crate servers where a test
//! needs frame-level control) on 127.0.0.1 port 0; every wait is bounded, every assertion
//! is about counts, statuses, headers and bytes, never durations.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::h2::Reason;
use bytes::Bytes;
use common::backends::{closed_port, read_head, serve_each};
use common::config::{listener, weight_1, with_admin};
use common::h2::{
    AnyBody, GrpcReader, H2Backend, H2Conn, channel_body, empty, full, grpc_frame, grpc_frames,
    grpc_messages, grpc_request, grpc_response, h2_raw_backend, h2c_backend, header_map,
};
use common::http::{client, exchange};
use common::proxy::{backend_state, start_config};
use common::{until, within};
use http_body_util::BodyExt as _;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use lbwasm::serve::Server;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

/// The bound of one test: a hang becomes a failure well before the harness notices.
const TEST: Duration = Duration::from_secs(60);

/// The longest wait for one event (a message, a reset, an answer) inside a test.
const STEP: Duration = Duration::from_secs(10);

/// A proxy (2 workers, admin endpoint) with one listener "grpc" speaking `protocol` to
/// `backends`; `keys` and `sections` as [`listener`] takes them.
fn start_h2(
    plugin: &str,
    protocol: &str,
    backends: &[SocketAddr],
    keys: &str,
    sections: &str,
) -> Server {
    let keys = format!("backend_protocol = \"{protocol}\"\n{keys}");
    start_config(&with_admin(
        2,
        &listener(
            "grpc",
            plugin,
            &weight_1(backends.iter().copied()),
            &keys,
            sections,
        ),
        None,
    ))
}

/// The proxy's HTTP listener.
fn front(server: &Server) -> SocketAddr {
    server.listen_addrs()[0]
}

/// A backend answering every request with its `id` (header `x-served-by: b{id}`, body) and
/// trailers `x-id: {id}`, `grpc-status: 0`, after `delay`; counts the requests in `hits`.
async fn id_backend(id: usize, delay: Duration, hits: Arc<AtomicUsize>) -> H2Backend {
    h2c_backend(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            let _ = req.into_body().collect().await;
            hits.fetch_add(1, Ordering::SeqCst);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let trailers = header_map(&[("x-id", &id.to_string()), ("grpc-status", "0")]);
            Response::builder()
                .header("x-served-by", format!("b{id}"))
                .body(
                    full(format!("served by b{id}"))
                        .with_trailers(async move { Some(Ok(trailers)) })
                        .boxed(),
                )
                .expect("response")
        }
    })
    .await
}

/// Base64 (unpadded, as gRPC sends it) of bytes 0..=9: binary metadata must pass untouched.
const BIN: &str = "AAECAwQFBgcICQ";

/// The gRPC test service, on raw gRPC framing (no protobuf):
/// - `Unary`: echoes the request's messages; echoes `x-bin-bin` as a header; reports the
///   request's `x-client-trailer` trailer (`none` without one) in `x-request-trailer`;
///   trailers `grpc-status: 0`, `x-trace-bin: BIN`;
/// - `ServerStream`: 5 messages (`msg 0`..`msg 4`) 30 ms apart, then `grpc-status: 0`;
/// - `Missing`: no message, trailers `grpc-status: 5`, `grpc-message: not%20found`;
/// - `MissingTrailersOnly`: the same status in a Trailers-Only answer (one HEADERS frame);
/// - `ClientStream`: one message after the request ends: `got N: m1,m2,...`;
/// - `Bidi`: `echo: m` for each message as it arrives, then `grpc-status: 0`.
async fn grpc_service(req: Request<Incoming>) -> Response<AnyBody> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/test.Echo/Unary" => {
            let bin = req.headers().get("x-bin-bin").cloned();
            let collected = req.into_body().collect().await.expect("request body");
            let client_trailer = collected
                .trailers()
                .and_then(|t| t.get("x-client-trailer"))
                .map(|v| v.to_str().unwrap_or("?").to_string())
                .unwrap_or_else(|| "none".into());
            let body = collected.to_bytes();
            let trailers = header_map(&[("grpc-status", "0"), ("x-trace-bin", BIN)]);
            let mut res = grpc_response(
                full(body)
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed(),
            );
            if let Some(bin) = bin {
                res.headers_mut().insert("x-bin-bin", bin);
            }
            res.headers_mut().insert(
                "x-request-trailer",
                client_trailer.parse().expect("header value"),
            );
            res
        }
        "/test.Echo/ServerStream" => {
            let _ = req.into_body().collect().await;
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                for i in 0..5 {
                    let m = grpc_frame(format!("msg {i}").as_bytes());
                    if tx.send(Frame::data(m)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                let _ = tx
                    .send(Frame::trailers(header_map(&[("grpc-status", "0")])))
                    .await;
            });
            grpc_response(body)
        }
        "/test.Echo/Missing" => {
            let _ = req.into_body().collect().await;
            let trailers = header_map(&[("grpc-status", "5"), ("grpc-message", "not%20found")]);
            grpc_response(
                empty()
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed(),
            )
        }
        "/test.Echo/MissingTrailersOnly" => {
            let _ = req.into_body().collect().await;
            let mut res = grpc_response(empty());
            res.headers_mut()
                .insert("grpc-status", "5".parse().expect("value"));
            res.headers_mut()
                .insert("grpc-message", "not%20found".parse().expect("value"));
            res
        }
        "/test.Echo/ClientStream" => {
            let mut reader = GrpcReader::new(req.into_body());
            let mut got = Vec::new();
            while let Ok(Some(m)) = reader.next().await {
                got.push(String::from_utf8_lossy(&m).into_owned());
            }
            let reply = format!("got {}: {}", got.len(), got.join(","));
            let trailers = header_map(&[("grpc-status", "0")]);
            grpc_response(
                full(grpc_frame(reply.as_bytes()))
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed(),
            )
        }
        "/test.Echo/Bidi" => {
            let mut reader = GrpcReader::new(req.into_body());
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                while let Ok(Some(m)) = reader.next().await {
                    let mut echo = b"echo: ".to_vec();
                    echo.extend_from_slice(&m);
                    if tx.send(Frame::data(grpc_frame(&echo))).await.is_err() {
                        return;
                    }
                }
                let _ = tx
                    .send(Frame::trailers(header_map(&[("grpc-status", "0")])))
                    .await;
            });
            grpc_response(body)
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(empty())
            .expect("response"),
    }
}

/// A proxy over one gRPC test service, and one client HTTP/2 connection to it.
async fn grpc_setup() -> (Server, H2Conn) {
    let backend = h2c_backend(grpc_service).await;
    let server = start_h2("round_robin", "h2c", &[backend.addr], "", "");
    let conn = H2Conn::connect(front(&server)).await;
    (server, conn)
}

/// 1. One client HTTP/2 connection, 300 requests 50 at a time, `round_robin` over three h2c
/// backends: exactly 100 each, every response's trailers intact, and the backends see a
/// handful of TCP connections (streams are multiplexed), not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_streams_of_one_connection_exactly() {
    within(TEST, async {
        let hits: Vec<_> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut backends = Vec::new();
        for (id, h) in hits.iter().enumerate() {
            backends.push(id_backend(id, Duration::ZERO, h.clone()).await);
        }
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let server = start_h2("round_robin", "h2c", &addrs, "", "");
        let conn = H2Conn::connect(front(&server)).await;
        let gate = Arc::new(Semaphore::new(50));
        let mut calls = Vec::new();
        for i in 0..300 {
            let conn = conn.clone();
            let gate = gate.clone();
            calls.push(tokio::spawn(async move {
                let _slot = gate.acquire_owned().await.expect("semaphore");
                let req = conn
                    .builder(Method::GET, &format!("/rr/{i}"))
                    .body(empty())
                    .expect("request");
                conn.call(req).await
            }));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, call) in calls.into_iter().enumerate() {
            let r = call
                .await
                .expect("task")
                .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
            assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
            let by = r
                .header("x-served-by")
                .unwrap_or_else(|| panic!("request {i}: no x-served-by: {r:?}"));
            assert_eq!(r.body, Bytes::from(format!("served by {by}")), "{i}");
            let id = by.trim_start_matches('b').to_string();
            assert_eq!(r.trailer("x-id"), Some(id), "request {i}: trailers {r:?}");
            assert_eq!(
                r.trailer("grpc-status").as_deref(),
                Some("0"),
                "request {i}: {r:?}"
            );
            *seen.entry(by).or_default() += 1;
        }
        let accepts: Vec<usize> = backends.iter().map(H2Backend::accepted).collect();
        for (id, h) in hits.iter().enumerate() {
            assert_eq!(seen.get(&format!("b{id}")), Some(&100), "{seen:?}");
            assert_eq!(h.load(Ordering::SeqCst), 100, "backend b{id} hits");
        }
        assert!(
            accepts.iter().all(|n| (1..=3).contains(n)),
            "TCP connections per backend for 100 streams each: {accepts:?}"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 2a. A unary call: the message echoed byte for byte, `grpc-status: 0` in the trailers,
/// binary metadata (`-bin`) untouched both ways (request header, response header, trailer),
/// and `te: trailers` reaching the backend (else it could not send trailers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_keeps_body_trailers_and_binary_metadata() {
    within(TEST, async {
        let (server, conn) = grpc_setup().await;
        let message: Vec<u8> = (0u8..=255).collect();
        let mut req = grpc_request(&conn, "/test.Echo/Unary", full(grpc_frame(&message)));
        req.headers_mut()
            .insert("x-bin-bin", BIN.parse().expect("value"));
        let r = within(STEP, conn.call(req)).await.expect("unary call");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(grpc_messages(&r.body), vec![Bytes::from(message)], "{r:?}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/grpc")
        );
        assert_eq!(r.header("x-bin-bin").as_deref(), Some(BIN), "{r:?}");
        assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"), "{r:?}");
        assert_eq!(r.trailer("x-trace-bin").as_deref(), Some(BIN), "{r:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 2b. Request trailers reach an h2c backend (issue 14: trailers pass in both directions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_an_h2c_backend() {
    within(TEST, async {
        let (server, conn) = grpc_setup().await;
        let (tx, body) = channel_body();
        let call = tokio::spawn({
            let conn = conn.clone();
            async move {
                conn.call(grpc_request(&conn, "/test.Echo/Unary", body))
                    .await
            }
        });
        tx.send(Frame::data(grpc_frame(b"with a trailer")))
            .await
            .expect("send");
        tx.send(Frame::trailers(header_map(&[("x-client-trailer", "done")])))
            .await
            .expect("send trailers");
        drop(tx);
        let r = within(STEP, call).await.expect("task").expect("call");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(
            grpc_messages(&r.body),
            vec![Bytes::from_static(b"with a trailer")]
        );
        assert_eq!(
            r.header("x-request-trailer").as_deref(),
            Some("done"),
            "the backend did not get the request's trailer: {r:?}"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 2c. Server streaming: five messages sent over time arrive as five messages, then the
/// trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_delivers_every_message_then_trailers() {
    within(TEST, async {
        let (server, conn) = grpc_setup().await;
        let req = grpc_request(&conn, "/test.Echo/ServerStream", full(grpc_frame(b"go")));
        let res = within(STEP, conn.request(req))
            .await
            .expect("response head");
        assert_eq!(res.status(), StatusCode::OK);
        let mut reader = GrpcReader::new(res.into_body());
        let mut got = Vec::new();
        while let Some(m) = within(STEP, reader.next()).await.expect("stream") {
            got.push(String::from_utf8_lossy(&m).into_owned());
        }
        assert_eq!(got, ["msg 0", "msg 1", "msg 2", "msg 3", "msg 4"]);
        let status = reader.trailers().and_then(|t| t.get("grpc-status"));
        assert_eq!(
            status.map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "{:?}",
            reader.trailers()
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 2d. An error status from the backend arrives intact, in trailers after headers and as a
/// Trailers-Only answer (what grpc-go sends for an error without a message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_status_and_message_arrive_intact() {
    within(TEST, async {
        let (server, conn) = grpc_setup().await;
        let r = within(
            STEP,
            conn.call(grpc_request(
                &conn,
                "/test.Echo/Missing",
                full(grpc_frame(b"x")),
            )),
        )
        .await
        .expect("call");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert!(r.body.is_empty(), "{r:?}");
        assert_eq!(r.trailer("grpc-status").as_deref(), Some("5"), "{r:?}");
        assert_eq!(
            r.trailer("grpc-message").as_deref(),
            Some("not%20found"),
            "{r:?}"
        );
        let r = within(
            STEP,
            conn.call(grpc_request(
                &conn,
                "/test.Echo/MissingTrailersOnly",
                full(grpc_frame(b"x")),
            )),
        )
        .await
        .expect("call");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.grpc("grpc-status").as_deref(), Some("5"), "{r:?}");
        assert_eq!(
            r.grpc("grpc-message").as_deref(),
            Some("not%20found"),
            "{r:?}"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 2e. Client streaming: messages sent one by one on a streaming request body all reach
/// the backend, which answers once the request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_delivers_every_message() {
    within(TEST, async {
        let (server, conn) = grpc_setup().await;
        let (tx, body) = channel_body();
        let call = tokio::spawn({
            let conn = conn.clone();
            async move {
                conn.call(grpc_request(&conn, "/test.Echo/ClientStream", body))
                    .await
            }
        });
        for m in ["a", "bb", "ccc", "dddd"] {
            tx.send(Frame::data(grpc_frame(m.as_bytes())))
                .await
                .expect("send");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(tx);
        let r = within(STEP, call).await.expect("task").expect("call");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(
            grpc_messages(&r.body),
            vec![Bytes::from_static(b"got 4: a,bb,ccc,dddd")],
            "{r:?}"
        );
        assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"), "{r:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 2f. Bidirectional streaming, full duplex: the client reads the echo of each message
/// before it sends the next one (a proxy that buffers either direction deadlocks here, and
/// the bounded wait turns that into a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_streaming_is_full_duplex() {
    within(TEST, async {
        let (server, conn) = grpc_setup().await;
        let (tx, body) = channel_body();
        tx.send(Frame::data(grpc_frame(b"m0"))).await.expect("send");
        let res = within(
            STEP,
            conn.request(grpc_request(&conn, "/test.Echo/Bidi", body)),
        )
        .await
        .expect("response head before the request ends");
        assert_eq!(res.status(), StatusCode::OK);
        let mut reader = GrpcReader::new(res.into_body());
        for i in 0..5 {
            if i > 0 {
                tx.send(Frame::data(grpc_frame(format!("m{i}").as_bytes())))
                    .await
                    .expect("send");
            }
            let echo = within(STEP, reader.next())
                .await
                .expect("echo")
                .unwrap_or_else(|| panic!("stream ended before echo {i}"));
            assert_eq!(echo, Bytes::from(format!("echo: m{i}")));
        }
        drop(tx);
        assert_eq!(within(STEP, reader.next()).await.expect("end"), None);
        let status = reader.trailers().and_then(|t| t.get("grpc-status"));
        assert_eq!(status.map(|v| v.as_bytes()), Some(&b"0"[..]));
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// What an `h2` crate stream handler saw at its end.
#[derive(Debug, PartialEq)]
enum StreamEnd {
    /// The peer reset the stream with this reason.
    Reset(Reason),
    /// The connection failed (the proxy closed it rather than resetting the stream).
    ConnectionError(String),
    /// The handler finished sending without a reset.
    Finished,
}

/// A server-streaming backend (`h2` crate): a message every 50 ms on every stream, for up
/// to 10 s, reporting how each stream ended on `ends`.
async fn endless_stream_backend(ends: mpsc::UnboundedSender<StreamEnd>) -> H2Backend {
    h2_raw_backend(move |tcp, _| {
        let ends = ends.clone();
        async move {
            let Ok(mut conn) = ::h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let ends = ends.clone();
                tokio::spawn(async move {
                    let head = Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .expect("head");
                    let Ok(mut stream) = respond.send_response(head, false) else {
                        return;
                    };
                    for i in 0..200 {
                        let _ = stream.send_data(grpc_frame(format!("tick {i}").as_bytes()), false);
                        tokio::select! {
                            reset = std::future::poll_fn(|cx| stream.poll_reset(cx)) => {
                                let _ = ends.send(match reset {
                                    Ok(reason) => StreamEnd::Reset(reason),
                                    Err(e) => StreamEnd::ConnectionError(e.to_string()),
                                });
                                return;
                            }
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    let _ = stream.send_trailers(header_map(&[("grpc-status", "0")]));
                    let _ = ends.send(StreamEnd::Finished);
                });
            }
        }
    })
    .await
}

/// 3. A call the client cancels after the first message: the backend's stream is reset
/// with CANCEL (not its connection closed), and the backend's in-flight count, 1 while the
/// call ran, returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_call_resets_the_backend_stream_and_releases_in_flight() {
    within(TEST, async {
        let (ends_tx, mut ends) = mpsc::unbounded_channel();
        let backend = endless_stream_backend(ends_tx).await;
        let server = start_h2("round_robin", "h2c", &[backend.addr], "", "");
        let conn = H2Conn::connect(front(&server)).await;
        let admin = client();
        let res = within(
            STEP,
            conn.request(grpc_request(
                &conn,
                "/test.Echo/Forever",
                full(grpc_frame(b"go")),
            )),
        )
        .await
        .expect("response head");
        assert_eq!(res.status(), StatusCode::OK);
        let mut reader = GrpcReader::new(res.into_body());
        let first = within(STEP, reader.next()).await.expect("first message");
        assert_eq!(first, Some(Bytes::from_static(b"tick 0")));
        let during = backend_state(&admin, &server, backend.addr).await;
        assert_eq!(during["in_flight"], 1, "while the call runs: {during}");
        drop(reader);
        let end = within(STEP, ends.recv()).await;
        assert_eq!(end, Some(StreamEnd::Reset(Reason::CANCEL)));
        let addr = backend.addr;
        until("in_flight back to 0", STEP, || {
            let admin = admin.clone();
            let server = &server;
            async move {
                let b = backend_state(&admin, server, addr).await;
                (b["in_flight"] == 0).then_some(())
            }
        })
        .await;
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 4. `grpc-timeout: 200m` on a call to a backend that never answers, with the listener's
/// own request timeout at 30 s: the client gets HTTP 200 with `grpc-status: 4`
/// (DEADLINE_EXCEEDED) and a `grpc-message`, within the test's 10 s bound (so the deadline
/// came from the call, not from the listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_the_deadline_and_is_answered_in_grpc_terms() {
    within(TEST, async {
        let asked = Arc::new(AtomicUsize::new(0));
        let backend = h2c_backend({
            let asked = asked.clone();
            move |_req: Request<Incoming>| {
                let asked = asked.clone();
                async move {
                    asked.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Response<AnyBody>>().await
                }
            }
        })
        .await;
        let server = start_h2(
            "round_robin",
            "h2c",
            &[backend.addr],
            "",
            "[listener.timeouts]\nrequest = \"30s\"\n",
        );
        let conn = H2Conn::connect(front(&server)).await;
        let mut req = grpc_request(&conn, "/test.Echo/Slow", full(grpc_frame(b"slow")));
        req.headers_mut()
            .insert("grpc-timeout", "200m".parse().expect("value"));
        let r = within(STEP, conn.call(req))
            .await
            .expect("an answer, not a reset");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.grpc("grpc-status").as_deref(), Some("4"), "{r:?}");
        assert!(
            r.grpc("grpc-message").is_some_and(|m| !m.is_empty()),
            "{r:?}"
        );
        assert_eq!(asked.load(Ordering::SeqCst), 1, "the backend got the call");
        // The client's deadline is the client's: nothing against the backend.
        let state = backend_state(&client(), &server, backend.addr).await;
        assert_eq!(state["failures"], 0, "{state}");
        assert_eq!(state["ejected"], false, "{state}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 5. No backend to serve a gRPC call (every backend on a closed port): HTTP 200,
/// `grpc-status: 14` (UNAVAILABLE) and a `grpc-message`; the same request without
/// `content-type: application/grpc` gets a plain 502 or 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_is_unavailable_for_grpc_and_a_plain_error_otherwise() {
    within(TEST, async {
        let server = start_h2(
            "round_robin",
            "h2c",
            &[closed_port(), closed_port()],
            "",
            "",
        );
        let conn = H2Conn::connect(front(&server)).await;
        let r = within(
            STEP,
            conn.call(grpc_request(
                &conn,
                "/test.Echo/Unary",
                full(grpc_frame(b"x")),
            )),
        )
        .await
        .expect("an answer");
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.grpc("grpc-status").as_deref(), Some("14"), "{r:?}");
        assert!(
            r.grpc("grpc-message").is_some_and(|m| !m.is_empty()),
            "{r:?}"
        );
        let plain = conn
            .builder(Method::POST, "/test.Echo/Unary")
            .body(full(grpc_frame(b"x")))
            .expect("request");
        let r = within(STEP, conn.call(plain)).await.expect("an answer");
        assert!(
            r.status == StatusCode::BAD_GATEWAY || r.status == StatusCode::SERVICE_UNAVAILABLE,
            "{r:?}"
        );
        assert_eq!(r.grpc("grpc-status"), None, "{r:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// Reads an `h2` request body to its end, releasing flow-control capacity as it goes.
async fn drain_h2_body(mut body: ::h2::RecvStream) -> Result<Bytes, ::h2::Error> {
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    Ok(all.into())
}

/// A backend (`h2` crate) that answers `ok` to each stream after 10 ms, and after `per_conn`
/// streams on a connection sends GOAWAY (graceful: the streams in flight finish) and closes
/// it once they have; counts the GOAWAYs in `goaways`, the streams answered in `served`.
async fn goaway_backend(
    per_conn: usize,
    goaways: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
) -> H2Backend {
    h2_raw_backend(move |tcp, _| {
        let goaways = goaways.clone();
        let served = served.clone();
        async move {
            let Ok(mut conn) = ::h2::server::handshake(tcp).await else {
                return;
            };
            let mut streams = 0;
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                streams += 1;
                let served = served.clone();
                tokio::spawn(async move {
                    if drain_h2_body(req.into_body()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if let Ok(mut s) = respond.send_response(Response::new(()), false)
                        && s.send_data(Bytes::from_static(b"ok"), true).is_ok()
                    {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                });
                if streams == per_conn {
                    conn.graceful_shutdown();
                    goaways.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
    .await
}

/// 6. A backend that sends GOAWAY every 10 streams (graceful) and accepts new connections,
/// while 200 POSTs flow 20 at a time: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_goaway_drains_without_a_failed_call() {
    within(TEST, async {
        let goaways = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let backend = goaway_backend(10, goaways.clone(), served.clone()).await;
        let server = start_h2("round_robin", "h2c", &[backend.addr], "", "");
        let conn = H2Conn::connect(front(&server)).await;
        let gate = Arc::new(Semaphore::new(20));
        let mut calls = Vec::new();
        for i in 0..200 {
            let conn = conn.clone();
            let gate = gate.clone();
            calls.push(tokio::spawn(async move {
                let _slot = gate.acquire_owned().await.expect("semaphore");
                let req = conn
                    .builder(Method::POST, &format!("/goaway/{i}"))
                    .body(full(format!("call {i}")))
                    .expect("request");
                match conn.call(req).await {
                    Ok(r) if r.status == StatusCode::OK && r.body == "ok" => None,
                    Ok(r) => Some(format!(
                        "call {i}: {} {:?} {:?}",
                        r.status, r.headers, r.body
                    )),
                    Err(e) => Some(format!("call {i}: {e}")),
                }
            }));
        }
        let mut failed = Vec::new();
        for call in calls {
            failed.extend(within(STEP, call).await.expect("task"));
        }
        assert!(
            failed.is_empty(),
            "{} of 200 failed (backend: {} connections, {} GOAWAYs, {} answered): {failed:#?}",
            failed.len(),
            backend.accepted(),
            goaways.load(Ordering::SeqCst),
            served.load(Ordering::SeqCst)
        );
        assert!(
            goaways.load(Ordering::SeqCst) >= 2,
            "the backend sent {} GOAWAYs: the test did not test GOAWAY",
            goaways.load(Ordering::SeqCst)
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// A backend (`h2` crate) that resets every stream with REFUSED_STREAM, counting them.
async fn refusing_backend(refused: Arc<AtomicUsize>) -> H2Backend {
    h2_raw_backend(move |tcp, _| {
        let refused = refused.clone();
        async move {
            let Ok(mut conn) = ::h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                refused.fetch_add(1, Ordering::SeqCst);
                respond.send_reset(Reason::REFUSED_STREAM);
            }
        }
    })
    .await
}

/// An h2c backend echoing each request's body, `x-served-by: good`; counts its requests.
async fn echo_backend(hits: Arc<AtomicUsize>) -> H2Backend {
    h2c_backend(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Response::builder()
                .header("x-served-by", "good")
                .body(full(body))
                .expect("response")
        }
    })
    .await
}

/// 7. A backend that refuses every stream (REFUSED_STREAM: the request provably never
/// reached its application): POSTs, not idempotent, are retried on the other backend and
/// succeed with their body intact; the refusing backend did get streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_is_retried_elsewhere_even_for_a_post() {
    within(TEST, async {
        let refused = Arc::new(AtomicUsize::new(0));
        let good = Arc::new(AtomicUsize::new(0));
        let refuser = refusing_backend(refused.clone()).await;
        let other = echo_backend(good.clone()).await;
        let server = start_h2("round_robin", "h2c", &[refuser.addr, other.addr], "", "");
        let conn = H2Conn::connect(front(&server)).await;
        for i in 0..6 {
            let body = format!("payload {i}");
            let req = conn
                .builder(Method::POST, &format!("/post/{i}"))
                .body(full(body.clone()))
                .expect("request");
            let r = within(STEP, conn.call(req))
                .await
                .unwrap_or_else(|e| panic!("POST {i} failed: {e}"));
            assert_eq!(
                r.status,
                StatusCode::OK,
                "POST {i}: {r:?} (refused so far: {})",
                refused.load(Ordering::SeqCst)
            );
            assert_eq!(r.header("x-served-by").as_deref(), Some("good"), "{r:?}");
            assert_eq!(r.body, body, "POST {i}");
        }
        assert!(
            refused.load(Ordering::SeqCst) >= 1,
            "never asked the refuser"
        );
        assert_eq!(
            good.load(Ordering::SeqCst),
            6,
            "the good backend's requests"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// Reads one HTTP/1.1 response (head, then a `Content-Length` body) from `s`.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(s).await.expect("a response head");
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.expect("body");
    (head, body)
}

/// 8. An HTTP/1.1 client asks to upgrade to h2c: the proxy does not forward the upgrade
/// (the backend sees neither `Upgrade` nor `HTTP2-Settings`), and the client gets a normal
/// HTTP/1.1 200 answer, not a 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_refused_by_not_forwarding_it() {
    within(TEST, async {
        let heads = Arc::new(Mutex::new(Vec::<String>::new()));
        let backend = serve_each({
            let heads = heads.clone();
            move |mut s| {
                let heads = heads.clone();
                async move {
                    while let Some(head) = read_head(&mut s).await {
                        heads.lock().expect("lock").push(head);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        let server = start_h2("round_robin", "http1", &[backend], "", "");
        let mut s = TcpStream::connect(front(&server)).await.expect("connect");
        s.write_all(
            b"GET /up HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .await
        .expect("write");
        let (head, body) = within(STEP, read_response(&mut s)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"ok", "{head}");
        let seen = heads.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        for line in seen[0].lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            assert!(
                name != "upgrade" && name != "http2-settings",
                "forwarded: {line:?} in {:?}",
                seen[0]
            );
            if name == "connection" {
                assert!(
                    !value.to_ascii_lowercase().contains("upgrade")
                        && !value.to_ascii_lowercase().contains("http2-settings"),
                    "forwarded: {line:?}"
                );
            }
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// 9. In-flight counts streams: `least_connections` over two h2c backends, 40 concurrent
/// slow requests (300 ms) on one client connection: each backend gets at least 15 (a proxy
/// counting connections, of which there may be one per backend, would not spread them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_counts_streams() {
    within(TEST, async {
        let hits: Vec<_> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut backends = Vec::new();
        for (id, h) in hits.iter().enumerate() {
            backends.push(id_backend(id, Duration::from_millis(300), h.clone()).await);
        }
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let server = start_h2("least_connections", "h2c", &addrs, "", "");
        let conn = H2Conn::connect(front(&server)).await;
        let mut calls = Vec::new();
        for i in 0..40 {
            let conn = conn.clone();
            calls.push(tokio::spawn(async move {
                let req = conn
                    .builder(Method::GET, &format!("/slow/{i}"))
                    .body(empty())
                    .expect("request");
                conn.call(req).await
            }));
        }
        for (i, call) in calls.into_iter().enumerate() {
            let r = within(STEP, call)
                .await
                .expect("task")
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        }
        let counts: Vec<usize> = hits.iter().map(|h| h.load(Ordering::SeqCst)).collect();
        assert_eq!(counts.iter().sum::<usize>(), 40, "{counts:?}");
        assert!(counts.iter().all(|&n| n >= 15), "{counts:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// The test backends themselves, called directly (no proxy): what each test above relies
/// on them doing, so that a failure above is the proxy's, not a fixture's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_behave_when_called_directly() {
    within(TEST, async {
        // id backend: header, body, trailers.
        let hits = Arc::new(AtomicUsize::new(0));
        let b = id_backend(7, Duration::ZERO, hits.clone()).await;
        let conn = H2Conn::connect(b.addr).await;
        let r = conn
            .call(conn.builder(Method::GET, "/").body(empty()).expect("req"))
            .await
            .expect("call");
        assert_eq!(r.header("x-served-by").as_deref(), Some("b7"));
        assert_eq!(r.trailer("x-id").as_deref(), Some("7"));
        assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"));
        assert_eq!((hits.load(Ordering::SeqCst), b.accepted()), (1, 1));

        // The chunked decoder the HTTP/1.1 tests read trailers with.
        assert_eq!(
            dechunk("5\r\nhello\r\n3;x=y\r\n, b\r\n0\r\nX-Id: 0\r\nA: b\r\n\r\n"),
            (
                "hello, b".to_string(),
                vec!["x-id: 0".to_string(), "a: b".to_string()]
            )
        );

        // gRPC service: unary, stream, errors, bidi.
        let g = h2c_backend(grpc_service).await;
        let conn = H2Conn::connect(g.addr).await;
        let mut req = grpc_request(
            &conn,
            "/test.Echo/Unary",
            full(grpc_frames([&b"a"[..], b"b"])),
        );
        req.headers_mut()
            .insert("x-bin-bin", BIN.parse().expect("value"));
        let r = conn.call(req).await.expect("unary");
        assert_eq!(grpc_messages(&r.body), [&b"a"[..], b"b"]);
        assert_eq!(r.header("x-bin-bin").as_deref(), Some(BIN));
        assert_eq!(r.header("x-request-trailer").as_deref(), Some("none"));
        assert_eq!(r.trailer("x-trace-bin").as_deref(), Some(BIN));
        let r = conn
            .call(grpc_request(&conn, "/test.Echo/ServerStream", empty()))
            .await
            .expect("stream");
        assert_eq!(grpc_messages(&r.body).len(), 5);
        assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"));
        let r = conn
            .call(grpc_request(&conn, "/test.Echo/Missing", empty()))
            .await
            .expect("missing");
        assert_eq!(r.trailer("grpc-status").as_deref(), Some("5"));
        let r = conn
            .call(grpc_request(
                &conn,
                "/test.Echo/MissingTrailersOnly",
                empty(),
            ))
            .await
            .expect("trailers-only");
        assert_eq!(
            (r.trailers.is_none(), r.grpc("grpc-status").as_deref()),
            (true, Some("5"))
        );
        let (tx, body) = channel_body();
        tx.send(Frame::data(grpc_frame(b"m0"))).await.expect("send");
        let res = conn
            .request(grpc_request(&conn, "/test.Echo/Bidi", body))
            .await
            .expect("bidi");
        let mut reader = GrpcReader::new(res.into_body());
        assert_eq!(
            reader.next().await.expect("echo"),
            Some(Bytes::from_static(b"echo: m0"))
        );
        drop(tx);
        assert_eq!(reader.next().await.expect("end"), None);

        // The endless stream: a client dropping it resets the stream with CANCEL.
        let (ends_tx, mut ends) = mpsc::unbounded_channel();
        let e = endless_stream_backend(ends_tx).await;
        let conn = H2Conn::connect(e.addr).await;
        let res = conn
            .request(grpc_request(&conn, "/x", empty()))
            .await
            .expect("head");
        let mut reader = GrpcReader::new(res.into_body());
        assert_eq!(
            reader.next().await.expect("tick"),
            Some(Bytes::from_static(b"tick 0"))
        );
        drop(reader);
        assert_eq!(
            within(STEP, ends.recv()).await,
            Some(StreamEnd::Reset(Reason::CANCEL))
        );

        // GOAWAY after 3 streams: those 3 answered, then the connection is gone.
        let goaways = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let ga = goaway_backend(3, goaways.clone(), served.clone()).await;
        let conn = H2Conn::connect(ga.addr).await;
        for i in 0..3 {
            let r = conn
                .call(
                    conn.builder(Method::POST, "/")
                        .body(full("x"))
                        .expect("req"),
                )
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e}"));
            assert_eq!(r.body, "ok");
        }
        assert_eq!(goaways.load(Ordering::SeqCst), 1);
        let after = within(
            STEP,
            conn.call(
                conn.builder(Method::POST, "/")
                    .body(full("x"))
                    .expect("req"),
            ),
        )
        .await;
        assert!(after.is_err(), "a stream after GOAWAY: {after:?}");

        // The refuser: every stream reset with REFUSED_STREAM.
        let refused = Arc::new(AtomicUsize::new(0));
        let rf = refusing_backend(refused.clone()).await;
        let conn = H2Conn::connect(rf.addr).await;
        let err = conn
            .call(
                conn.builder(Method::POST, "/")
                    .body(full("x"))
                    .expect("req"),
            )
            .await
            .expect_err("refused");
        let reason = std::error::Error::source(&*err)
            .and_then(|s| s.downcast_ref::<::h2::Error>())
            .and_then(::h2::Error::reason);
        assert_eq!(reason, Some(Reason::REFUSED_STREAM), "{err:?}");
        assert_eq!(refused.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Decodes a chunked body: its data and the trailer section's lines (lower-cased names).
fn dechunk(mut body: &str) -> (String, Vec<String>) {
    let mut data = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if size == 0 {
            let trailers = rest
                .split("\r\n")
                .take_while(|l| !l.is_empty())
                .map(|l| l.to_ascii_lowercase())
                .collect();
            return (data, trailers);
        }
        data.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("CRLF after chunk");
    }
}

/// HTTP/1.1 clients and h2c backends: response trailers reach a client that declared
/// `TE: trailers` (as a chunked trailer section), and the body reaches one that did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_gets_h2c_trailers_when_it_asks() {
    within(TEST, async {
        let hits = Arc::new(AtomicUsize::new(0));
        let b = id_backend(0, Duration::ZERO, hits.clone()).await;
        let server = start_h2("round_robin", "h2c", &[b.addr], "", "");
        let raw = within(
            STEP,
            exchange(
                front(&server),
                b"GET /t HTTP/1.1\r\nHost: t\r\nTE: trailers\r\nConnection: TE, close\r\n\r\n",
            ),
        )
        .await;
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "trailers need chunked coding: {raw}"
        );
        let (data, trailers) = dechunk(body);
        assert_eq!(data, "served by b0", "{raw}");
        assert!(
            trailers.contains(&"x-id: 0".to_string())
                && trailers.contains(&"grpc-status: 0".to_string()),
            "{trailers:?} in {raw}"
        );
        let raw = within(
            STEP,
            exchange(
                front(&server),
                b"GET /t HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            ),
        )
        .await;
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
        let data = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body).0
        } else {
            body.to_string()
        };
        assert_eq!(data, "served by b0", "{raw}");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// A chunked HTTP/1.1 request's trailer section reaches an h2c backend as HTTP/2 trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_chunked_request_trailers_reach_an_h2c_backend() {
    within(TEST, async {
        let backend = h2c_backend(grpc_service).await;
        let server = start_h2("round_robin", "h2c", &[backend.addr], "", "");
        let message = grpc_frame(b"hi");
        let mut raw = format!(
            "POST /test.Echo/Unary HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\n\
             TE: trailers\r\nConnection: TE, close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            message.len()
        )
        .into_bytes();
        raw.extend_from_slice(&message);
        raw.extend_from_slice(b"\r\n0\r\nx-client-trailer: done\r\n\r\n");
        let reply = within(STEP, exchange(front(&server), &raw)).await;
        let (head, _) = reply.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-request-trailer: done"),
            "the backend did not get the request's trailer: {reply}"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
