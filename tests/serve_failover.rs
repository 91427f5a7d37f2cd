//! `lbwasm serve` when backends fail: retries under load, active health checks taking a
//! backend out and back, the 503 and 502 a client gets when nothing can answer, and a
//! shutdown that lets requests in flight finish. In-process proxies over demo backends on
//! 127.0.0.1, port 0; bounded, and asserting outcomes (counts, statuses, bodies).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::backends::{closed_port, demo_backends};
use common::config::addrs;
use common::http::{client, get};
use common::proxy::{backend_state, id_of, load, spread, start};
use common::{bounded, eventually};
use hyper::StatusCode;
use lbwasm::backend::{self, BackendConfig};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_shut_down_during_load_fails_no_get() {
    bounded(async {
        let bs = demo_backends(3).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let done = Arc::new(AtomicUsize::new(0));
        let traffic = tokio::spawn(load(server.listen_addrs()[0], 4, 300, done.clone()));
        while done.load(Ordering::Relaxed) < 300 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bs[1].shutdown().await;
        let bad = traffic.await.expect("traffic");
        assert!(bad.is_empty(), "{} failed requests: {bad:?}", bad.len());
        let c = client();
        let state = backend_state(&c, &server, bs[1].addr()).await;
        assert!(state["failures"].as_u64().unwrap_or(0) > 0, "{state}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

const FAST_CHECKS: &str = "[listener.health]\npath = \"/heartbeat\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_mark_a_backend_down_and_up_again() {
    bounded(async {
        let bs = demo_backends(2).await;
        let victim = bs[1].addr();
        let server = start("round_robin", &addrs(&bs), "", FAST_CHECKS);
        let c = client();
        let addr = server.listen_addrs()[0];
        bs[1].shutdown().await;
        eventually("the victim is marked down", || async {
            backend_state(&c, &server, victim).await["healthy"] == false
        })
        .await;
        let seen = spread(&c, addr, 30).await;
        assert_eq!(seen.get(&id_of(&bs[0])), Some(&30), "{seen:?}");

        let again = backend::spawn(BackendConfig::new(victim.port()))
            .await
            .expect("backend on the same port");
        eventually("the victim is marked up", || async {
            backend_state(&c, &server, victim).await["healthy"] == true
        })
        .await;
        let seen = spread(&c, addr, 40).await;
        assert_eq!(seen.get(&id_of(&again)), Some(&20), "{seen:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_down_gives_a_503_naming_the_pool() {
    bounded(async {
        let bs = demo_backends(2).await;
        let server = start("least_connections", &addrs(&bs), "", FAST_CHECKS);
        let c = client();
        for b in &bs {
            b.shutdown().await;
        }
        let addr = server.listen_addrs()[0];
        eventually("a 503", || async {
            get(&c, addr, "/").await.status == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        let r = get(&c, addr, "/x").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.text(), "503 no healthy backend in pool \"web\"\n");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backends_give_a_502_naming_the_backend() {
    bounded(async {
        // Bound then closed: nothing listens there.
        let dead = closed_port();
        let server = start("round_robin", &[(dead, 1)], "", "");
        let c = client();
        let r = get(&c, server.listen_addrs()[0], "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert!(
            r.text()
                .starts_with(&format!("502 cannot connect to backend {dead}")),
            "{}",
            r.text()
        );
        assert_eq!(r.text().lines().count(), 1);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    bounded(async {
        let mut cfg = BackendConfig::new(0);
        cfg.latency = Duration::from_millis(400);
        let slow = backend::spawn(cfg).await.expect("backend");
        let server = start("round_robin", &[(slow.addr(), 1)], "", "");
        let addr = server.listen_addrs()[0];
        let in_flight = tokio::spawn(async move {
            let c = client();
            get(&c, addr, "/slow").await
        });
        // Let the request reach the backend, then stop the proxy under it.
        eventually("the request is in flight", || async {
            slow.stats().processing == 1
        })
        .await;
        server.shutdown(Duration::from_secs(10)).await;
        let r = in_flight.await.expect("client task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    })
    .await;
}
