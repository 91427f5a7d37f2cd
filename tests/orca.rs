//! In-band load reports (ORCA): backends report their CPU in `endpoint-load-metrics` on
//! their responses, and `least_loaded` steers by it with `/load` polling off. The header
//! never reaches the client; a malformed report is counted on `/metrics` and ignored. Three
//! hand-written hyper HTTP/1.1 backends on 127.0.0.1 port 0, an in-process proxy; counts
//! and statuses asserted, never durations.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::backends::serve_each;
use common::config::weight_1;
use common::http::{HttpClient, Reply, client, get};
use common::proxy::{admin, start};
use common::{bounded, until};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lbwasm::serve::Server;

/// A backend answering every request with its id (`x-served-by`) and, when set, the
/// `endpoint-load-metrics` value in `report` (changed by the test mid-run).
struct OrcaBackend {
    addr: SocketAddr,
    report: Arc<Mutex<Option<String>>>,
}

impl OrcaBackend {
    async fn start(id: &str, report: &str) -> Self {
        let report = Arc::new(Mutex::new(Some(report.to_string())));
        let (shared, id_owned) = (report.clone(), id.to_string());
        let addr = serve_each(move |stream| {
            let (report, id) = (shared.clone(), id_owned.clone());
            async move {
                let service = service_fn(move |_req| {
                    let (report, id) = (report.clone(), id.clone());
                    async move {
                        let mut res = Response::builder()
                            .header("x-served-by", id.as_str())
                            .header("content-type", "text/plain");
                        if let Some(r) = report.lock().unwrap().clone() {
                            res = res.header("endpoint-load-metrics", r);
                        }
                        Ok::<_, Infallible>(
                            res.body(Full::new(Bytes::from(format!("served by {id}\n"))))
                                .unwrap(),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await;
        OrcaBackend { addr, report }
    }

    fn set_report(&self, value: &str) {
        *self.report.lock().unwrap() = Some(value.to_string());
    }
}

/// `n` sequential GETs; counts by backend id. Every answer must be a 200 without a load
/// report: the proxy keeps those to itself.
async fn spread(c: &HttpClient, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let r: Reply = get(c, addr, &format!("/r/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        for name in ["endpoint-load-metrics", "endpoint-load-metrics-bin"] {
            assert!(
                r.headers.get(name).is_none(),
                "the client saw {name}: {:?}",
                r.headers
            );
        }
        *seen.entry(r.served_by()).or_default() += 1;
    }
    seen
}

/// The proxy's `lbwasm_load_reports_total` for listener "web", by result.
async fn reports(c: &HttpClient, server: &Server, result: &str) -> u64 {
    let (status, body) = admin(c, server, Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = body.as_str().expect("metrics text").to_string();
    let key = format!(
        "lbwasm_load_reports_total{{listener=\"web\",source=\"inband\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .unwrap_or_else(|| panic!("{key} missing:\n{text}"))
        .trim()
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_moves_traffic_off_a_backend_reporting_high_cpu_in_band() {
    bounded(async {
        let low = "TEXT cpu_utilization=0.1";
        let bs = [
            // Reports the least CPU at first, so that it gets at least its share whether
            // or not the first reports have been published yet (equal figures would leave
            // the pick to the smoothed trends' last digits).
            OrcaBackend::start("hot", "TEXT cpu_utilization=0.05").await,
            OrcaBackend::start("b", low).await,
            OrcaBackend::start("c", low).await,
        ];
        let addrs = weight_1(bs.iter().map(|b| b.addr));
        // No polling at all: whatever steers traffic arrives on the responses.
        let server = start(
            "least_loaded",
            &addrs,
            "",
            "[listener.load_report]\nenabled = false\n",
        );
        let addr = server.listen_addrs()[0];
        let c = client();

        // Until each backend's first report is published (every 50 ms), one without a
        // report is scored on its in-flight count alone: first, every one has reported.
        until(
            "every backend's report is published",
            Duration::from_secs(20),
            || {
                let c = c.clone();
                let server = &server;
                async move {
                    spread(&c, addr, 10).await;
                    let (_, state) = admin(&c, server, Method::GET, "/backends", None, None).await;
                    let backends = state["listeners"][0]["backends"].as_array().cloned();
                    backends
                        .filter(|all| all.iter().all(|b| !b["cpu_percent"].is_null()))
                        .map(|_| ())
                }
            },
        )
        .await;
        // "hot" reporting the least: it is not avoided.
        let before = spread(&c, addr, 60).await;
        assert!(before.get("hot").copied().unwrap_or(0) >= 10, "{before:?}");
        assert!(reports(&c, &server, "ok").await >= 60);

        // "hot" now reports 95% CPU on its next answers: traffic soon avoids it (bounded
        // wait, no timing asserted) ...
        bs[0].set_report("TEXT cpu_utilization=0.95, mem_utilization=0.5");
        until(
            "traffic moves off the backend reporting 95% CPU",
            Duration::from_secs(20),
            || {
                let c = c.clone();
                async move {
                    let seen = spread(&c, addr, 20).await;
                    (seen.get("hot").copied().unwrap_or(0) <= 2).then_some(())
                }
            },
        )
        .await;
        // ... and stays away: at least 80% of the next 200 requests go to the others.
        let after = spread(&c, addr, 200).await;
        let hot = after.get("hot").copied().unwrap_or(0);
        assert!(hot <= 40, "{after:?}");
        assert!(
            after.get("b").copied().unwrap_or(0) >= 50
                && after.get("c").copied().unwrap_or(0) >= 50,
            "{after:?}"
        );

        // A malformed report is counted as invalid, stripped and ignored: "b" keeps its
        // 10% and its share, and the answers are still whole 200s.
        let invalid_before = reports(&c, &server, "invalid").await;
        bs[1].set_report("TEXT cpu_utilization=NaN");
        let malformed = spread(&c, addr, 60).await;
        assert!(
            malformed.get("b").copied().unwrap_or(0) >= 15,
            "{malformed:?}"
        );
        let invalid = reports(&c, &server, "invalid").await;
        assert!(
            invalid >= invalid_before + 15,
            "{invalid} invalid reports counted"
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
