//! Integration tests of `lbwasm backend`: real servers on ephemeral ports of 127.0.0.1,
//! driven by a hyper client (and a raw socket for `--tcp`). Every test is bounded by a
//! timeout and asserts on the servers' own counters, never on wall-clock durations.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use common::http::{HttpClient, client, get, h2_client, try_send};
use common::within;
use hyper::{Method, StatusCode, Version};
use lbwasm::backend::{
    BackendArgs, BackendConfig, Fault, FaultWindow, LoadReport, Protocol, spawn,
};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Generous upper bound for any one test, only there to turn a hang into a failure.
const LIMIT: Duration = Duration::from_secs(60);

async fn load(client: &HttpClient, addr: SocketAddr) -> LoadReport {
    let reply = get(client, addr, "/load").await;
    assert_eq!(reply.status, StatusCode::OK);
    serde_json::from_slice(&reply.body).expect("load report JSON")
}

fn config() -> BackendConfig {
    BackendConfig {
        id: Some("b1".into()),
        ..BackendConfig::new(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_with_their_shapes_and_served_by() {
    within(LIMIT, async {
        let backend = spawn(config()).await.expect("spawn");
        let addr = backend.addr();
        assert_ne!(addr.port(), 0);
        assert_eq!(backend.id(), "b1");
        let c = client();

        let root = get(&c, addr, "/").await;
        assert_eq!(root.status, StatusCode::OK);
        assert_eq!(root.text(), "GET / served by b1\n");
        assert_eq!(root.served_by(), "b1");

        let random = get(&c, addr, "/some/random/path?x=1").await;
        assert_eq!(random.status, StatusCode::OK);
        assert_eq!(random.text(), "GET /some/random/path served by b1\n");

        let home = get(&c, addr, "/home").await;
        assert_eq!(home.status, StatusCode::OK);
        assert_eq!(home.served_by(), "b1");
        let json: serde_json::Value = serde_json::from_slice(&home.body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"message": "Hello from Server: b1", "status": "successful"})
        );

        let beat = get(&c, addr, "/heartbeat").await;
        assert_eq!(beat.status, StatusCode::OK);
        assert_eq!(beat.text(), "ok");
        assert_eq!(beat.served_by(), "b1");

        let report = load(&c, addr).await;
        assert_eq!(report.server, "b1");
        assert_eq!(
            report.requests, 3,
            "/, /some/random/path and /home are counted"
        );
        assert!(report.memory_percent > 0.0 && report.memory_percent <= 100.0);
        assert!(report.cpu_percent >= 0.0 && report.process_cpu_percent >= 0.0);

        let put = try_send(&c, Method::PUT, addr, "/", &[], Bytes::new())
            .await
            .expect("PUT");
        assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(put.served_by(), "b1");

        assert_eq!(backend.stats().requests, 3);
        backend.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_is_served() {
    within(LIMIT, async {
        let backend = spawn(config()).await.expect("spawn");
        let h2 = h2_client();
        let reply = get(&h2, backend.addr(), "/").await;
        assert_eq!(reply.version, Version::HTTP_2);
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "GET / served by b1\n");
        assert_eq!(reply.served_by(), "b1");
        let echo = try_send(
            &h2,
            Method::POST,
            backend.addr(),
            "/x",
            &[],
            Bytes::from_static(b"hi"),
        )
        .await
        .expect("POST");
        assert_eq!(echo.body, Bytes::from_static(b"hi"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_echoes_a_100kb_body() {
    within(LIMIT, async {
        let backend = spawn(config()).await.expect("spawn");
        let payload: Bytes = (0..100_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let reply = try_send(
            &client(),
            Method::POST,
            backend.addr(),
            "/upload",
            &[],
            payload.clone(),
        )
        .await
        .expect("POST");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.served_by(), "b1");
        assert_eq!(reply.body.len(), payload.len());
        assert!(reply.body == payload, "echoed body differs");
        assert_eq!(backend.stats().requests, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_one_answers_500() {
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            error_rate: 1.0,
            seed: Some(1),
            ..config()
        })
        .await
        .expect("spawn");
        let c = client();
        for path in ["/", "/home", "/anything"] {
            let reply = get(&c, backend.addr(), path).await;
            assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert_eq!(reply.served_by(), "b1");
        }
        // Knob-free endpoints keep working.
        assert_eq!(
            get(&c, backend.addr(), "/heartbeat").await.status,
            StatusCode::OK
        );
        assert_eq!(load(&c, backend.addr()).await.requests, 3);
        let stats = backend.stats();
        assert_eq!((stats.requests, stats.errors), (3, 3));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_half_fails_about_half() {
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            error_rate: 0.5,
            seed: Some(42),
            ..config()
        })
        .await
        .expect("spawn");
        let c = client();
        let mut errors = 0u64;
        for _ in 0..400 {
            let reply = get(&c, backend.addr(), "/").await;
            match reply.status {
                StatusCode::OK => {}
                StatusCode::INTERNAL_SERVER_ERROR => errors += 1,
                other => panic!("unexpected status {other}"),
            }
        }
        // Binomial(400, 0.5): sd = 10, so ±80 is eight standard deviations.
        assert!((120..=280).contains(&errors), "{errors} errors out of 400");
        let stats = backend.stats();
        assert_eq!(stats.requests, 400);
        assert_eq!(stats.errors, errors);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_one_serialises_concurrent_requests() {
    within(LIMIT, async {
        let mut overlapped = false;
        // A round where the four requests never overlapped (a very stalled machine)
        // proves nothing, so try a few rounds; every round must respect the capacity.
        for _ in 0..5 {
            let backend = spawn(BackendConfig {
                capacity: 1,
                latency: Duration::from_millis(50),
                ..config()
            })
            .await
            .expect("spawn");
            let addr = backend.addr();
            let c = client();
            let requests: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    tokio::spawn(async move { get(&c, addr, "/").await.status })
                })
                .collect();
            for r in requests {
                assert_eq!(r.await.expect("request task"), StatusCode::OK);
            }
            let stats = backend.stats();
            assert_eq!(stats.requests, 4);
            assert_eq!(
                stats.peak_processing, 1,
                "capacity 1 let requests overlap: {stats:?}"
            );
            assert_eq!((stats.processing, stats.queued), (0, 0));
            if stats.peak_active_connections >= 2 {
                assert!(
                    stats.peak_queued >= 1,
                    "overlapping requests must have queued: {stats:?}"
                );
                overlapped = true;
                break;
            }
        }
        assert!(overlapped, "the concurrent requests never overlapped");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_in_flight_requests() {
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            latency: Duration::from_millis(300),
            ..config()
        })
        .await
        .expect("spawn");
        let addr = backend.addr();
        let c = client();
        // Keep a request in flight at all times while /load is polled.
        let traffic = {
            let c = c.clone();
            tokio::spawn(async move {
                loop {
                    get(&c, addr, "/").await;
                }
            })
        };
        let report = loop {
            let report = load(&c, addr).await;
            if report.connections > 0 {
                break report;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(report.server, "b1");
        traffic.abort();
        assert!(backend.stats().peak_active_connections > 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_cpu_after_cpu_work() {
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            cpu_work: Duration::from_millis(20),
            ..config()
        })
        .await
        .expect("spawn");
        let addr = backend.addr();
        let c = client();
        let idle = load(&c, addr).await;
        assert!(
            idle.cpu_percent < 50.0,
            "an idle server reports {}",
            idle.cpu_percent
        );
        let mut busy = None;
        for _ in 0..20 {
            assert_eq!(get(&c, addr, "/").await.status, StatusCode::OK);
            let report = load(&c, addr).await;
            if report.cpu_percent > 0.0 {
                busy = Some(report);
                break;
            }
        }
        let busy = busy.expect("cpu_percent stayed 0 after CPU work");
        assert!(busy.cpu_percent > 0.0);
        assert!(busy.process_cpu_percent >= 0.0);
        assert!(backend.stats().cpu_percent >= 0.0);
    })
    .await;
}

/// True when nothing listens on `addr`.
async fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_down_window_refuses_then_recovers() {
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            faults: vec![FaultWindow {
                fault: Fault::Down,
                start: Duration::ZERO,
                end: Duration::from_millis(1500),
            }],
            ..config()
        })
        .await
        .expect("spawn");
        let addr = backend.addr();
        let before = backend.fault();
        let attempt = try_send(&client(), Method::GET, addr, "/", &[], Bytes::new()).await;
        let after = backend.fault();
        if before == Some(Fault::Down) && after == Some(Fault::Down) {
            let error = attempt.err().expect("a down server answered");
            assert!(
                error
                    .downcast_ref::<hyper_util::client::legacy::Error>()
                    .is_some_and(|e| e.is_connect()),
                "expected a refused connection, got {error:?}"
            );
        }
        // After the window the server listens again on the same port.
        let c = client();
        loop {
            if let Ok(reply) = try_send(&c, Method::GET, addr, "/", &[], Bytes::new()).await {
                assert_eq!(reply.status, StatusCode::OK);
                assert_eq!(reply.served_by(), "b1");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(backend.fault(), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_faults_are_seen_by_requests_and_health_checks() {
    within(LIMIT, async {
        let backend = spawn(config()).await.expect("spawn");
        let addr = backend.addr();
        let c = client();
        assert_eq!(get(&c, addr, "/").await.status, StatusCode::OK);

        backend.set_fault(Some(Fault::Error));
        assert_eq!(
            get(&c, addr, "/").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            get(&c, addr, "/heartbeat").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(load(&c, addr).await.server, "b1", "/load ignores faults");

        backend.set_fault(Some(Fault::Slow(Duration::from_millis(20))));
        assert_eq!(get(&c, addr, "/heartbeat").await.status, StatusCode::OK);

        backend.set_fault(Some(Fault::Down));
        assert_eq!(backend.fault(), Some(Fault::Down));
        match try_send(&client(), Method::GET, addr, "/", &[], Bytes::new()).await {
            Err(_) => {}
            Ok(reply) => assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE),
        }
        while !refused(addr).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        backend.set_fault(None);
        let c = client();
        loop {
            if let Ok(reply) =
                try_send(&c, Method::GET, addr, "/heartbeat", &[], Bytes::new()).await
            {
                assert_eq!(reply.status, StatusCode::OK);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_close_the_port() {
    within(LIMIT, async {
        let backend = spawn(config()).await.expect("spawn");
        let addr = backend.addr();
        assert_eq!(get(&client(), addr, "/").await.status, StatusCode::OK);
        backend.shutdown().await;
        assert!(refused(addr).await, "still accepting after shutdown");
        backend.shutdown().await; // idempotent
        assert_eq!(backend.stats().requests, 1);

        let dropped = spawn(config()).await.expect("spawn");
        let addr = dropped.addr();
        assert!(!refused(addr).await);
        drop(dropped);
        while !refused(addr).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_pings_and_echoes() {
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            protocol: Protocol::Tcp,
            ..config()
        })
        .await
        .expect("spawn");
        let stream = TcpStream::connect(backend.addr()).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"PING\nhello world\r\nPING\n")
            .await
            .expect("write");
        assert_eq!(
            lines.next_line().await.expect("read").as_deref(),
            Some("PONG b1")
        );
        assert_eq!(
            lines.next_line().await.expect("read").as_deref(),
            Some("b1 hello world")
        );
        assert_eq!(
            lines.next_line().await.expect("read").as_deref(),
            Some("PONG b1")
        );

        backend.set_fault(Some(Fault::Error));
        write.write_all(b"PING\n").await.expect("write");
        assert_eq!(
            lines.next_line().await.expect("read").as_deref(),
            Some("ERROR b1")
        );
        assert_eq!(
            backend.stats().requests,
            1,
            "only the echo line is a workload request"
        );
    })
    .await;
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: BackendArgs,
}

fn parse(args: &[&str]) -> Result<BackendArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("backend").chain(args.iter().copied())).map(|c| c.args)
}

#[test]
fn flags_become_configs() {
    let defaults = parse(&[]).expect("defaults parse");
    assert_eq!(defaults.port, 9101);
    assert_eq!(defaults.count, 1);
    let cfg = defaults.to_config().expect("default config");
    assert_eq!(cfg.host.to_string(), "127.0.0.1");
    assert_eq!(
        (cfg.port, cfg.id.clone(), cfg.protocol),
        (9101, None, Protocol::Http)
    );

    let args = parse(&[
        "--port",
        "9200",
        "--count",
        "3",
        "--id",
        "web",
        "--fault",
        "slow:1:2.5",
        "--fault-latency-ms",
        "100",
        "--seed",
        "7",
        "--capacity",
        "4",
        "--cpu-work-us",
        "250",
        "--error-rate",
        "0.25",
        "--tcp",
    ])
    .expect("parse");
    let cfgs = args.to_configs().expect("configs");
    assert_eq!(
        cfgs.iter().map(|c| c.port).collect::<Vec<_>>(),
        [9200, 9201, 9202]
    );
    assert_eq!(
        cfgs.iter()
            .map(|c| c.id.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["web-1", "web-2", "web-3"]
    );
    assert_eq!(
        cfgs.iter().map(|c| c.seed).collect::<Vec<_>>(),
        [Some(7), Some(8), Some(9)]
    );
    let first = args.to_config().expect("first config");
    assert_eq!(first.port, 9200);
    assert_eq!(first.cpu_work, Duration::from_micros(250));
    assert_eq!(first.capacity, 4);
    assert_eq!(first.protocol, Protocol::Tcp);
    assert_eq!(
        first.faults,
        [FaultWindow {
            fault: Fault::Slow(Duration::from_millis(100)),
            start: Duration::from_secs(1),
            end: Duration::from_millis(2500),
        }]
    );
}

#[test]
fn invalid_flags_are_errors_naming_the_flag() {
    let err = parse(&["--error-rate", "1.5"])
        .expect("parses")
        .to_config()
        .expect_err("1.5");
    assert!(err.to_string().contains("--error-rate"), "{err}");
    let err = parse(&["--error-rate", "nope"]).expect_err("not a number");
    assert!(err.to_string().contains("--error-rate"), "{err}");
    for bad in ["boom:1:2", "down:3:2", "slow:1", "error:-1:2", "down:a:b"] {
        let err = parse(&["--fault", bad]).expect_err(bad);
        assert!(err.to_string().contains("--fault"), "{bad}: {err}");
    }
    let err = parse(&["--port", "65535", "--count", "2"])
        .expect("parses")
        .to_config()
        .expect_err("past the last port");
    assert!(err.to_string().contains("--port"), "{err}");
    let err = parse(&["--count", "0"])
        .expect("parses")
        .to_config()
        .expect_err("count 0");
    assert!(err.to_string().contains("--count"), "{err}");
    let err = parse(&["--id", "has space"])
        .expect("parses")
        .to_config()
        .expect_err("space");
    assert!(err.to_string().contains("--id"), "{err}");
}

/// The figures of an ORCA `TEXT` report (the test's own reading of the format).
fn orca_text(value: &str) -> (f64, f64) {
    let rest = value.strip_prefix("TEXT ").expect("TEXT report");
    let mut cpu = None;
    let mut mem = None;
    for item in rest.split(", ") {
        let (name, v) = item.split_once('=').expect("name=value");
        let v: f64 = v.parse().expect("number");
        match name {
            "cpu_utilization" => cpu = Some(v),
            "mem_utilization" => mem = Some(v),
            other => panic!("unexpected metric {other}"),
        }
    }
    (cpu.expect("cpu"), mem.expect("mem"))
}

/// The figures of a base64 protobuf `OrcaLoadReport` (fields 1 and 2, doubles), as laid
/// out on the wire: tag 0x09 then 8 bytes, tag 0x11 then 8 bytes (a zero CPU is omitted).
fn orca_bin(b64: &str) -> (f64, f64) {
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).expect("base64");
    let (mut cpu, mut mem) = (0.0, 0.0);
    let mut rest = &bytes[..];
    while let [tag, tail @ ..] = rest {
        let (v, tail) = tail.split_first_chunk::<8>().expect("8-byte double");
        match tag {
            0x09 => cpu = f64::from_le_bytes(*v),
            0x11 => mem = f64::from_le_bytes(*v),
            other => panic!("unexpected tag {other:#x} in {bytes:?}"),
        }
        rest = tail;
    }
    (cpu, mem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orca_reports_ride_on_every_response_in_the_format_asked() {
    use lbwasm::backend::OrcaFormat;
    within(LIMIT, async {
        let c = client();
        for format in [OrcaFormat::Text, OrcaFormat::Json, OrcaFormat::Bin] {
            let backend = spawn(BackendConfig {
                orca: Some(format),
                memory_mb: 8,
                ..config()
            })
            .await
            .expect("spawn");
            let report = load(&c, backend.addr()).await;
            for path in ["/", "/home", "/heartbeat", "/load"] {
                let reply = get(&c, backend.addr(), path).await;
                assert_eq!(reply.status, StatusCode::OK);
                let value = reply
                    .headers
                    .get("endpoint-load-metrics")
                    .unwrap_or_else(|| panic!("{format:?} {path}: no report"))
                    .to_str()
                    .expect("ascii")
                    .to_string();
                let (cpu, mem) = match format {
                    OrcaFormat::Text => orca_text(&value),
                    OrcaFormat::Json => {
                        let json: serde_json::Value =
                            serde_json::from_str(value.strip_prefix("JSON ").expect("JSON"))
                                .expect("json");
                        let keys: Vec<&String> = json.as_object().expect("object").keys().collect();
                        assert_eq!(keys, ["cpu_utilization", "mem_utilization"], "{value}");
                        (
                            json["cpu_utilization"].as_f64().expect("cpu"),
                            json["mem_utilization"].as_f64().expect("mem"),
                        )
                    }
                    OrcaFormat::Bin => orca_bin(value.strip_prefix("BIN ").expect("BIN")),
                };
                // The /load figures as fractions (memory moves slowly; CPU is a fraction
                // of one core and may exceed 1 only under CPU work, none here).
                assert!(cpu >= 0.0 && cpu.is_finite(), "{value}");
                let expected_mem = f64::from(report.memory_percent) / 100.0;
                assert!(
                    mem > 0.0 && (mem - expected_mem).abs() < 0.05,
                    "{format:?}: mem {mem} vs /load {expected_mem}"
                );
            }
            backend.shutdown().await;
        }
        // Off by default.
        let plain = spawn(config()).await.expect("spawn");
        let reply = get(&c, plain.addr(), "/").await;
        assert!(reply.headers.get("endpoint-load-metrics").is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_over_h2c_echo_with_trailers_and_health() {
    use common::h2::{H2Conn, full, grpc_frame, grpc_frames, grpc_messages, grpc_request};
    within(LIMIT, async {
        let backend = spawn(BackendConfig {
            orca: Some(lbwasm::backend::OrcaFormat::Text),
            ..config()
        })
        .await
        .expect("spawn");
        let conn = H2Conn::connect(backend.addr()).await;

        // A unary and a two-message call: the messages come back, then grpc-status 0 and,
        // with --orca, the binary report as a trailer (never the text header).
        for messages in [vec![&b"hello"[..]], vec![&b"one"[..], &b"two!"[..]]] {
            let reply = conn
                .call(grpc_request(
                    &conn,
                    "/echo.Echo/Say",
                    full(grpc_frames(messages.iter().copied())),
                ))
                .await
                .expect("call");
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(
                reply.header("content-type").as_deref(),
                Some("application/grpc")
            );
            assert_eq!(reply.header("x-served-by").as_deref(), Some("b1"));
            assert_eq!(reply.header("endpoint-load-metrics"), None);
            let got = grpc_messages(&reply.body);
            assert_eq!(got.iter().map(|m| &m[..]).collect::<Vec<_>>(), messages);
            assert_eq!(reply.trailer("grpc-status").as_deref(), Some("0"));
            let (_, mem) = orca_bin(
                &reply
                    .trailer("endpoint-load-metrics-bin")
                    .expect("ORCA trailer"),
            );
            assert!(mem > 0.0);
        }

        // The health check: SERVING, NOT_SERVING during an `error` fault.
        let health = |conn: &H2Conn| {
            let req = grpc_request(conn, "/grpc.health.v1.Health/Check", full(grpc_frame(b"")));
            let conn = conn.clone();
            async move { conn.call(req).await.expect("health call") }
        };
        let reply = health(&conn).await;
        assert_eq!(reply.trailer("grpc-status").as_deref(), Some("0"));
        assert_eq!(grpc_messages(&reply.body), [Bytes::from_static(&[0x08, 1])]);
        backend.set_fault(Some(Fault::Error));
        let reply = health(&conn).await;
        assert_eq!(reply.trailer("grpc-status").as_deref(), Some("0"));
        assert_eq!(grpc_messages(&reply.body), [Bytes::from_static(&[0x08, 2])]);

        // A workload call during the fault: a Trailers-Only INTERNAL error.
        let reply = conn
            .call(grpc_request(
                &conn,
                "/echo.Echo/Say",
                full(grpc_frame(b"x")),
            ))
            .await
            .expect("call");
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.is_empty());
        assert_eq!(reply.grpc("grpc-status").as_deref(), Some("13"));
        backend.set_fault(None);

        // Health checks are not workload requests; the three calls are.
        assert_eq!(backend.stats().requests, 3);
        assert_eq!(backend.stats().errors, 1);

        // HTTP/1.1 still works on the same port.
        let reply = get(&client(), backend.addr(), "/").await;
        assert_eq!(reply.version, Version::HTTP_11);
        assert_eq!(reply.text(), "GET / served by b1\n");
    })
    .await;
}

#[test]
fn orca_flag() {
    let cfg = parse(&["--orca", "json"])
        .expect("parses")
        .to_config()
        .expect("config");
    assert_eq!(cfg.orca, Some(lbwasm::backend::OrcaFormat::Json));
    assert_eq!(
        parse(&[])
            .expect("parses")
            .to_config()
            .expect("config")
            .orca,
        None
    );
    assert!(parse(&["--orca", "xml"]).is_err());
    let err = parse(&["--orca", "bin", "--tcp"])
        .expect("parses")
        .to_config()
        .expect_err("orca with tcp");
    assert!(err.to_string().contains("--orca"), "{err}");
}
