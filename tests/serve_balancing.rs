//! `lbwasm serve` balancing HTTP requests: every built-in plugin through in-process proxies
//! over demo backends, exact shares for the deterministic ones, and the request fields a
//! hash key or a plugin reads. On 127.0.0.1, port 0 everywhere; bounded, and asserting
//! counts and statuses, never durations.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::backends::demo_backends;
use common::bounded;
use common::config::addrs;
use common::http::{client, exchange, get, send};
use common::proxy::{id_of, spread, start};
use hyper::{Method, StatusCode};
use lbwasm_fixtures::wasm as fixture;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_requests_exactly() {
    bounded(async {
        let bs = demo_backends(3).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let c = client();
        let seen = spread(&c, server.listen_addrs()[0], 300).await;
        for b in &bs {
            assert_eq!(seen.get(&id_of(b)), Some(&100), "{seen:?}");
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_rr_keeps_5_1_1_shares() {
    bounded(async {
        let bs = demo_backends(3).await;
        let weighted = vec![(bs[0].addr(), 5), (bs[1].addr(), 1), (bs[2].addr(), 1)];
        let server = start("weighted_rr", &weighted, "", "");
        let c = client();
        let seen = spread(&c, server.listen_addrs()[0], 700).await;
        assert_eq!(seen.get(&id_of(&bs[0])), Some(&500), "{seen:?}");
        assert_eq!(seen.get(&id_of(&bs[1])), Some(&100), "{seen:?}");
        assert_eq!(seen.get(&id_of(&bs[2])), Some(&100), "{seen:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_plugin_serves_through_the_proxy() {
    bounded(async {
        let bs = demo_backends(3).await;
        let c = client();
        let names: Vec<&str> = lbwasm::plugin::builtin::names().collect();
        assert!(names.len() >= 10, "{names:?}");
        for name in names {
            let server = start(name, &addrs(&bs), "", "");
            for i in 0..20 {
                let r = get(&c, server.listen_addrs()[0], &format!("/p/{i}")).await;
                assert_eq!(r.status, StatusCode::OK, "plugin {name}: {}", r.text());
                assert!(
                    r.text().contains("served by"),
                    "plugin {name}: {}",
                    r.text()
                );
            }
            server.shutdown(Duration::from_secs(5)).await;
        }
    })
    .await;
}

/// The balancing reads request fields as the client sent them (the proxy forwards HTTP/1.1
/// fields unparsed): the listener's hash key and a plugin's `header()` call find them
/// whatever the case of their names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_fields_steer_the_hash_key_and_plugins() {
    bounded(async {
        let bs = demo_backends(3).await;
        let c = client();
        let server = start(
            "consistent_hash",
            &addrs(&bs),
            "hash_key = \"header:x-user\"",
            "",
        );
        let addr = server.listen_addrs()[0];
        let mut owner: HashMap<String, String> = HashMap::new();
        for round in 0..3 {
            for u in 0..30 {
                let user = format!("u{u}");
                let r = send(
                    &c,
                    Method::GET,
                    addr,
                    "/h",
                    &[("x-user", &user)],
                    Bytes::new(),
                )
                .await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                let by = r.served_by();
                let first = owner.entry(user.clone()).or_insert_with(|| by.clone());
                assert_eq!(
                    *first, by,
                    "{user} moved to another backend in round {round}"
                );
            }
        }
        let used: std::collections::HashSet<&String> = owner.values().collect();
        assert_eq!(used.len(), 3, "30 users over 3 backends: {owner:?}");
        let reply = exchange(
            addr,
            b"GET /h HTTP/1.1\r\nHost: t\r\nX-USER: u7\r\nConnection: close\r\n\r\n",
        )
        .await
        .to_ascii_lowercase();
        let expected = format!("x-served-by: {}\r\n", owner["u7"].to_ascii_lowercase());
        assert!(
            reply.contains(&expected),
            "u7 belongs on {}: {reply}",
            owner["u7"]
        );
        server.shutdown(Duration::from_secs(5)).await;

        // The example plugin sends `x-canary: always` to its canary, whoever asks.
        let plugin = fixture("sticky_canary");
        let server = start(
            plugin.to_str().expect("utf-8 path"),
            &addrs(&bs),
            "",
            &format!(
                "[listener.plugin_options]\ncanary = \"{}\"\npercent = \"0\"\n",
                bs[2].addr()
            ),
        );
        let addr = server.listen_addrs()[0];
        for i in 0..6 {
            let forced = i % 2 == 0;
            let raw = format!(
                "GET /c/{i} HTTP/1.1\r\nHost: t\r\nX-User: u{i}\r\n{}Connection: close\r\n\r\n",
                if forced { "X-Canary: Always\r\n" } else { "" }
            );
            let reply = exchange(addr, raw.as_bytes()).await;
            assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
            let on_canary = reply.to_ascii_lowercase().contains(&format!(
                "x-served-by: {}\r\n",
                bs[2].id().to_ascii_lowercase()
            ));
            assert_eq!(on_canary, forced, "request {i}: {reply}");
        }
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
