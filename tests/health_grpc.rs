//! Active health checks in the pool's protocol (issue 14): with `backend_protocol = "h2c"`
//! the HTTP check goes over HTTP/2 with prior knowledge, and `type = "grpc"` calls the
//! standard `grpc.health.v1.Health/Check`; load reports are polled over h2c too. Real
//! hyper h2c servers on 127.0.0.1 port 0 play the backends (h2c only: an HTTP/1.1 check
//! would never reach them); the proxy is in-process and its admin API says which backend
//! is healthy. Every wait is bounded; the
//! assertions are about health states and the requests the servers received.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::config::{listener, weight_1, with_admin};
use common::h2::{AnyBody, empty, full, grpc_frame, grpc_messages, grpc_response, h2c_backend};
use common::http::client;
use common::proxy::{backend_state, start_config};
use common::{eventually, within};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Version};
use lbwasm::serve::Server;

/// The bound of one test.
const TEST: Duration = Duration::from_secs(60);

/// Checks fast enough for a test: every 100 ms, one result flips the state.
fn checks(kind: &str) -> String {
    format!(
        "[listener.health]\n{kind}\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n"
    )
}

/// A proxy whose listener speaks h2c to `backends`, checked by `health`.
fn start_h2c(backends: &[SocketAddr], health: &str) -> Server {
    start_config(&with_admin(
        1,
        &listener(
            "grpc",
            "round_robin",
            &weight_1(backends.iter().copied()),
            "backend_protocol = \"h2c\"",
            health,
        ),
        None,
    ))
}

async fn healthy(server: &Server, addr: SocketAddr) -> bool {
    backend_state(&client(), server, addr).await["healthy"] == true
}

/// What a gRPC health server answers: a `HealthCheckResponse` status, or a gRPC error.
const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;
/// Answer `SERVING` in a call that fails with `grpc-status` 14 (must count as down).
const SERVING_BUT_UNAVAILABLE: u8 = 100;
/// A Trailers-Only answer, `grpc-status` 12 (UNIMPLEMENTED), no message.
const UNIMPLEMENTED: u8 = 101;

/// The checks a gRPC health server received, as it saw them.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    /// Requests not shaped like a gRPC health check (method, path, headers, HTTP/2).
    malformed: Mutex<Vec<String>>,
    /// The `HealthCheckRequest.service` of the last call.
    service: Mutex<Option<String>>,
}

/// Decodes `HealthCheckRequest { string service = 1; }` (a test's own, short names).
fn service_of(message: &[u8]) -> Option<String> {
    match message {
        [] => Some(String::new()),
        [0x0a, len, rest @ ..] if usize::from(*len) == rest.len() => {
            Some(String::from_utf8_lossy(rest).into_owned())
        }
        _ => None,
    }
}

/// An h2c gRPC health server answering whatever `answer` holds.
async fn grpc_health_server(answer: Arc<AtomicU8>, seen: Arc<Seen>) -> SocketAddr {
    h2c_backend(move |req: Request<Incoming>| {
        let answer = answer.clone();
        let seen = seen.clone();
        async move {
            let shape = format!(
                "{} {} {:?} ct={:?} te={:?}",
                req.method(),
                req.uri().path(),
                req.version(),
                req.headers().get("content-type"),
                req.headers().get("te"),
            );
            let ok_shape = req.method() == hyper::Method::POST
                && req.uri().path() == "/grpc.health.v1.Health/Check"
                && req.version() == Version::HTTP_2
                && req
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "application/grpc")
                && req.headers().get("te").is_some_and(|v| v == "trailers");
            let body = req.into_body().collect().await.map(|c| c.to_bytes());
            let messages = body.as_deref().map(grpc_messages).unwrap_or_default();
            match (ok_shape, &messages[..]) {
                (true, [one]) => *seen.service.lock().unwrap() = service_of(one),
                _ => seen
                    .malformed
                    .lock()
                    .unwrap()
                    .push(format!("{shape} {body:?}")),
            }
            seen.calls.fetch_add(1, Ordering::SeqCst);
            let status = answer.load(Ordering::SeqCst);
            let trailers = |grpc_status: &str| {
                let mut t = hyper::HeaderMap::new();
                t.insert("grpc-status", grpc_status.parse().unwrap());
                t
            };
            match status {
                UNIMPLEMENTED => {
                    let mut res = grpc_response(empty());
                    res.headers_mut().extend(trailers("12"));
                    res
                }
                _ => {
                    let (serving, grpc_status) = match status {
                        SERVING_BUT_UNAVAILABLE => (SERVING, "14"),
                        s => (s, "0"),
                    };
                    let message = grpc_frame(&[0x08, serving]);
                    let end = trailers(grpc_status);
                    let body: AnyBody = full(message)
                        .with_trailers(async move { Some(Ok(end)) })
                        .boxed();
                    grpc_response(body)
                }
            }
        }
    })
    .await
    .addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_check_follows_the_serving_status() {
    within(TEST, async {
        let answers: Vec<Arc<AtomicU8>> =
            (0..2).map(|_| Arc::new(AtomicU8::new(SERVING))).collect();
        let seen: Vec<Arc<Seen>> = (0..2).map(|_| Arc::new(Seen::default())).collect();
        let mut addrs = Vec::new();
        for (a, s) in answers.iter().zip(&seen) {
            addrs.push(grpc_health_server(a.clone(), s.clone()).await);
        }
        let server = start_h2c(
            &addrs,
            &checks("type = \"grpc\"\ngrpc_service = \"echo.Echo\""),
        );
        let (victim, other) = (addrs[0], addrs[1]);

        eventually("the first checks reach the servers", || async {
            seen.iter().all(|s| s.calls.load(Ordering::SeqCst) >= 2)
        })
        .await;
        assert!(healthy(&server, victim).await && healthy(&server, other).await);

        answers[0].store(NOT_SERVING, Ordering::SeqCst);
        eventually("NOT_SERVING marks the backend down", || {
            healthy_is(&server, victim, false)
        })
        .await;
        answers[0].store(SERVING, Ordering::SeqCst);
        eventually("SERVING brings it back up", || {
            healthy_is(&server, victim, true)
        })
        .await;

        // A call that fails is not SERVING, whatever its message says; nor is a
        // Trailers-Only error.
        answers[0].store(SERVING_BUT_UNAVAILABLE, Ordering::SeqCst);
        eventually("grpc-status 14 marks it down", || {
            healthy_is(&server, victim, false)
        })
        .await;
        answers[0].store(SERVING, Ordering::SeqCst);
        eventually("up again", || healthy_is(&server, victim, true)).await;
        answers[0].store(UNIMPLEMENTED, Ordering::SeqCst);
        eventually("a Trailers-Only grpc-status 12 marks it down", || {
            healthy_is(&server, victim, false)
        })
        .await;

        assert!(healthy(&server, other).await, "the other backend stayed up");
        for s in &seen {
            let malformed = s.malformed.lock().unwrap();
            assert!(
                malformed.is_empty(),
                "not gRPC health checks: {malformed:?}"
            );
            assert_eq!(s.service.lock().unwrap().as_deref(), Some("echo.Echo"));
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

async fn healthy_is(server: &Server, addr: SocketAddr, want: bool) -> bool {
    healthy(server, addr).await == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_goes_over_h2c_to_an_h2c_only_server() {
    within(TEST, async {
        let status = Arc::new(AtomicU8::new(0)); // 0: 503, 1: 200
        let checks_seen = Arc::new(AtomicUsize::new(0));
        let backend = {
            let status = status.clone();
            let checks_seen = checks_seen.clone();
            h2c_backend(move |req: Request<Incoming>| {
                let status = status.clone();
                let checks_seen = checks_seen.clone();
                async move {
                    if req.uri().path() == "/healthz" && req.version() == Version::HTTP_2 {
                        checks_seen.fetch_add(1, Ordering::SeqCst);
                    }
                    let code = if status.load(Ordering::SeqCst) == 1 {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let mut res = Response::new(full("health\n"));
                    *res.status_mut() = code;
                    res
                }
            })
            .await
        };
        // A second backend keeps the pool non-empty while the first is down.
        let spare =
            h2c_backend(|_req: Request<Incoming>| async { Response::new(full("ok\n")) }).await;
        let server = start_h2c(&[backend.addr, spare.addr], &checks("path = \"/healthz\""));

        eventually("503 over h2c marks the backend down", || {
            healthy_is(&server, backend.addr, false)
        })
        .await;
        status.store(1, Ordering::SeqCst);
        eventually("200 over h2c brings it up", || {
            healthy_is(&server, backend.addr, true)
        })
        .await;
        assert!(
            checks_seen.load(Ordering::SeqCst) >= 2,
            "the checks reached the h2c-only server as HTTP/2 GET /healthz"
        );
        assert!(healthy(&server, spare.addr).await);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_check_against_the_demo_backend() {
    within(TEST, async {
        let demo = lbwasm::backend::spawn(lbwasm::backend::BackendConfig::new(0))
            .await
            .expect("demo backend");
        let spare = lbwasm::backend::spawn(lbwasm::backend::BackendConfig::new(0))
            .await
            .expect("demo backend");
        let server = start_h2c(&[demo.addr(), spare.addr()], &checks("type = \"grpc\""));
        // The demo backend says NOT_SERVING during an `error` fault.
        demo.set_fault(Some(lbwasm::backend::Fault::Error));
        eventually("NOT_SERVING from the demo backend marks it down", || {
            healthy_is(&server, demo.addr(), false)
        })
        .await;
        demo.set_fault(None);
        eventually("SERVING brings it back", || {
            healthy_is(&server, demo.addr(), true)
        })
        .await;
        assert!(healthy(&server, spare.addr()).await);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_are_polled_over_h2c() {
    within(TEST, async {
        let polls = Arc::new(AtomicUsize::new(0));
        let backend = {
            let polls = polls.clone();
            h2c_backend(move |req: Request<Incoming>| {
                let polls = polls.clone();
                async move {
                    if req.uri().path() == "/load" {
                        polls.fetch_add(1, Ordering::SeqCst);
                        Response::new(full(
                            r#"{"cpu_percent":37.5,"memory_percent":12.5,"connections":3}"#,
                        ))
                    } else {
                        Response::new(full("ok\n"))
                    }
                }
            })
            .await
        };
        let server = start_h2c(
            &[backend.addr],
            "[listener.load_report]\nenabled = true\ninterval = \"100ms\"\n",
        );
        let admin = client();
        let state = common::until("a load report over h2c", TEST / 2, || async {
            let b = backend_state(&admin, &server, backend.addr).await;
            (b["load_samples"].as_u64() >= Some(1)).then_some(b)
        })
        .await;
        assert_eq!(state["cpu_percent"], 37.5, "{state}");
        assert_eq!(state["memory_percent"], 12.5, "{state}");
        assert_eq!(state["connections"], 3, "{state}");
        assert!(polls.load(Ordering::SeqCst) >= 1);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
