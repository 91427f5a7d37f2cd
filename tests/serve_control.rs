//! The control plane of a running `lbwasm serve`: backends added, removed and drained
//! through the admin API, plugins swapped under load, `/metrics`, the admin token, reloads
//! of the configuration file, and managed backends. In-process proxies over demo backends on
//! 127.0.0.1, port 0; bounded, and asserting outcomes (counts, statuses, bodies).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::backends::demo_backends;
use common::config::{addrs, listener, with_admin};
use common::http::client;
use common::proxy::{admin, backend_state, id_of, load, spread, start, start_config, start_parsed};
use common::{bounded, eventually};
use hyper::{Method, StatusCode};
use lbwasm::config;
use serde_json::json;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_add_and_remove_change_the_distribution() {
    bounded(async {
        let bs = demo_backends(3).await;
        let server = start("round_robin", &addrs(&bs[..2]), "", "");
        let c = client();
        let addr = server.listen_addrs()[0];
        let seen = spread(&c, addr, 100).await;
        assert_eq!(seen.len(), 2, "{seen:?}");

        let (status, v) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/add",
            Some(json!({"listener": "web", "addresses": [bs[2].addr().to_string()]})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["added"][0]["address"], bs[2].addr().to_string());
        let seen = spread(&c, addr, 300).await;
        for b in &bs {
            assert_eq!(seen.get(&id_of(b)), Some(&100), "{seen:?}");
        }

        let (status, v) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/remove",
            Some(json!({"addresses": [bs[0].addr().to_string()]})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["removed"].as_array().map(Vec::len), Some(1), "{v}");
        let seen = spread(&c, addr, 100).await;
        assert_eq!(seen.get(&id_of(&bs[0])), None, "{seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 100);

        // Drain: still listed, no longer used.
        let (status, v) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/drain",
            Some(json!({"addresses": [bs[1].addr().to_string()]})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let seen = spread(&c, addr, 20).await;
        assert_eq!(seen.get(&id_of(&bs[2])), Some(&20), "{seen:?}");
        assert_eq!(
            backend_state(&c, &server, bs[1].addr()).await["draining"],
            true
        );

        // Lookaside pick, and errors as JSON.
        let (status, v) = admin(
            &c,
            &server,
            Method::GET,
            "/pick?listener=web&key=user-1",
            None,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["backend"], bs[2].addr().to_string());
        let (status, v) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/add",
            Some(json!({"listener": "nope", "addresses": ["127.0.0.1:1"]})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("nope")),
            "{v}"
        );
        let (status, _) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/add",
            Some(json!({"addresses": ["not an address"]})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_swap_under_load_fails_no_request() {
    bounded(async {
        let bs = demo_backends(3).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let c = client();
        let done = Arc::new(AtomicUsize::new(0));
        let traffic = tokio::spawn(load(server.listen_addrs()[0], 4, 200, done.clone()));
        for (at, plugin) in [
            (150, "least_connections"),
            (400, "random"),
            (600, "p2c_ewma"),
        ] {
            while done.load(Ordering::Relaxed) < at && !traffic.is_finished() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let (status, v) = admin(
                &c,
                &server,
                Method::POST,
                "/plugin",
                Some(json!({"listener": "web", "plugin": plugin})),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{v}");
            assert_eq!(v["plugin"], plugin);
        }
        let bad = traffic.await.expect("traffic");
        assert!(bad.is_empty(), "{} failed requests: {bad:?}", bad.len());
        assert_eq!(done.load(Ordering::Relaxed), 800);
        // A plugin that does not load is refused, and the running one stays.
        let (status, v) = admin(
            &c,
            &server,
            Method::POST,
            "/plugin",
            Some(json!({"plugin": "no_such_plugin"})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        let (_, report) = admin(&c, &server, Method::GET, "/backends", None, None).await;
        assert_eq!(report["listeners"][0]["plugin"], "p2c_ewma");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// Parses the exposition: every line a comment or `name{labels} value`; returns the samples.
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (
                n,
                rest.strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}")),
            ),
            None => (series, ""),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once("=\"")
                .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
            assert!(
                k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name in {line:?}"
            );
            let _ = v;
        }
        samples.push((name.to_string(), labels.to_string(), value));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_with_live_counters() {
    bounded(async {
        let bs = demo_backends(2).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let c = client();
        spread(&c, server.listen_addrs()[0], 20).await;
        let (status, text) = admin(&c, &server, Method::GET, "/metrics", None, None).await;
        assert_eq!(status, StatusCode::OK);
        let text = text.as_str().expect("text").to_string();
        let samples = parse_metrics(&text);
        let total = |name: &str| {
            samples
                .iter()
                .filter(|(n, _, _)| n == name)
                .map(|(_, _, v)| v)
                .sum::<f64>()
        };
        let present = |name: &str| samples.iter().any(|(n, _, _)| n == name);
        assert_eq!(total("lbwasm_requests_total"), 20.0, "{text}");
        assert!(
            samples.iter().any(|(n, l, v)| n == "lbwasm_requests_total"
                && l.contains("code=\"200\"")
                && *v == 10.0),
            "{text}"
        );
        assert_eq!(
            total("lbwasm_request_duration_seconds_count"),
            20.0,
            "{text}"
        );
        assert!(total("lbwasm_plugin_calls_total") >= 20.0, "{text}");
        assert_eq!(total("lbwasm_backend_healthy"), 2.0, "{text}");
        for name in [
            "lbwasm_request_duration_seconds_bucket",
            "lbwasm_backend_in_flight",
            "lbwasm_plugin_timeouts_total",
            "lbwasm_plugin_traps_total",
            "lbwasm_plugin_fallbacks_total",
            "lbwasm_retries_total",
        ] {
            assert!(present(name), "{name} missing:\n{text}");
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_required_for_mutations() {
    bounded(async {
        let bs = demo_backends(2).await;
        let text = with_admin(
            2,
            &listener("web", "round_robin", &addrs(&bs[..1]), "", ""),
            Some("s3cret"),
        );
        let server = start_config(&text);
        let c = client();
        let add = || Some(json!({"addresses": [bs[1].addr().to_string()]}));
        let (status, v) = admin(&c, &server, Method::POST, "/backends/add", add(), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("Bearer")),
            "{v}"
        );
        let (status, _) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/add",
            add(),
            Some("wrong"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = admin(
            &c,
            &server,
            Method::POST,
            "/plugin",
            Some(json!({"plugin": "random"})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, v) = admin(
            &c,
            &server,
            Method::POST,
            "/backends/add",
            add(),
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let (status, _) = admin(&c, &server, Method::GET, "/healthz", None, None).await;
        assert_eq!(status, StatusCode::OK, "liveness needs no token");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_backend_and_plugin_changes() {
    bounded(async {
        let bs = demo_backends(3).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lbwasm.toml");
        let write = |plugin: &str, backends: &[(SocketAddr, u32)]| {
            std::fs::write(
                &path,
                with_admin(2, &listener("web", plugin, backends, "", ""), None),
            )
            .expect("write config");
        };
        write("round_robin", &addrs(&bs[..1]));
        let text = std::fs::read_to_string(&path).expect("read");
        let server = start_parsed(config::parse_str(&text, &path).expect("config"));
        let c = client();
        let addr = server.listen_addrs()[0];
        assert_eq!(spread(&c, addr, 10).await.len(), 1);

        write("weighted_rr", &[(bs[0].addr(), 3), (bs[1].addr(), 1)]);
        let (status, v) = admin(&c, &server, Method::POST, "/reload", None, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let seen = spread(&c, addr, 400).await;
        assert_eq!(seen.get(&id_of(&bs[0])), Some(&300), "{seen:?}");
        assert_eq!(seen.get(&id_of(&bs[1])), Some(&100), "{seen:?}");

        // A reload applies what changed in the file: a backend taken out of it goes, one
        // added through the admin API stays.
        let add = json!({"listener": "web", "addresses": [bs[2].addr().to_string()]});
        let (status, v) = admin(&c, &server, Method::POST, "/backends/add", Some(add), None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        write("round_robin", &addrs(&bs[..1]));
        let (status, v) = admin(&c, &server, Method::POST, "/reload", None, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v["changes"].to_string().contains("removed"), "{v}");
        let seen = spread(&c, addr, 30).await;
        assert_eq!(seen.get(&id_of(&bs[0])), Some(&15), "{seen:?}");
        assert_eq!(seen.get(&id_of(&bs[2])), Some(&15), "{seen:?}");

        // A broken file is refused with its line, and nothing changes.
        std::fs::write(
            &path,
            "workers = 2\n[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = 7\n",
        )
        .expect("write");
        let (status, v) = admin(&c, &server, Method::POST, "/reload", None, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("lbwasm.toml:4")),
            "{v}"
        );
        assert_eq!(spread(&c, addr, 4).await.len(), 2);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// `n` consecutive free ports (best effort: probed by binding); returns the first.
fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = a.local_addr().expect("addr").port();
        if p.checked_add(n).is_some()
            && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
        {
            return p;
        }
    }
    panic!("no {n} free consecutive ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_backends_are_started_pooled_and_stopped() {
    bounded(async {
        let base = free_ports(3);
        let exe = env!("CARGO_BIN_EXE_lbwasm");
        let sections = format!(
            "[listener.managed]\ncommand = [\"{exe}\", \"backend\", \"--port\", \"{{port}}\"]\ncount = 2\nbase_port = {base}\nrestart_backoff = \"100ms\"\n"
        );
        let server = start("round_robin", &[], "", &sections);
        let c = client();
        let healthy = |n: u64| {
            let (c, server) = (&c, &server);
            async move {
                let (_, v) = admin(c, server, Method::GET, "/backends", None, None).await;
                v["listeners"][0]["healthy"] == n
            }
        };
        eventually("both managed backends join", || healthy(2)).await;
        let seen = spread(&c, server.listen_addrs()[0], 20).await;
        assert_eq!(seen.get(&format!("backend-{base}")), Some(&10), "{seen:?}");
        assert_eq!(seen.get(&format!("backend-{}", base + 1)), Some(&10), "{seen:?}");

        // One more process, on the next port.
        let (status, v) =
            admin(&c, &server, Method::POST, "/backends/add", Some(json!({"n": 1})), None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        eventually("the third managed backend joins", || healthy(3)).await;
        let seen = spread(&c, server.listen_addrs()[0], 30).await;
        assert_eq!(seen.get(&format!("backend-{}", base + 2)), Some(&10), "{seen:?}");

        server.shutdown(Duration::from_secs(5)).await;
        for port in [base, base + 1, base + 2] {
            assert!(
                TcpStream::connect(("127.0.0.1", port)).await.is_err(),
                "managed backend on {port} still running"
            );
        }
    })
    .await;
}
