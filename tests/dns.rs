//! DNS service discovery end to end: the real `lbwasm serve` with `dns://` and
//! `dns+srv://` backends, resolved through `--resolver` against an in-process DNS server
//! (tests/common/dns.rs) whose records the tests change while traffic flows. Backends are
//! on loopback (127.0.0.2, .3, .4 for A records on one port; 127.0.0.1 on several ports for
//! SRV). Bounded; every wait is for an outcome, never a fixed sleep; nothing touches the
//! real network.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use common::backends::{demo_backends, read_head};
use common::dns::{DnsServer, Mode};
use common::http::{HttpClient, client, get, send};
use common::process::{Serving, lbwasm, serving};
use common::{bounded, eventually, until};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// `lbwasm serve` on 127.0.0.1:0 with an admin endpoint, one worker, `plugin`, `backends`
/// (comma-separated) and `extra` flags, resolving through `dns`.
async fn serve(dns: &DnsServer, plugin: &str, backends: &str, extra: &[&str]) -> Serving {
    let mut cmd = lbwasm();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--workers", "1", "--plugin", plugin, "--backends", backends])
        .args(["--resolver", &dns.addr.to_string()])
        .args(extra)
        .stderr(Stdio::null());
    serving(cmd, 1, true).await
}

/// An admin call; its status and JSON.
async fn admin(
    c: &HttpClient,
    s: &Serving,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let addr = s.admin.expect("admin endpoint");
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let reply = send(
        c,
        method,
        addr,
        path,
        &[("content-type", "application/json")],
        body,
    )
    .await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::String(reply.text()));
    (reply.status, value)
}

/// The first listener's backends as `/backends` lists them, by address.
async fn members(c: &HttpClient, s: &Serving) -> HashMap<String, Value> {
    let (status, v) = admin(c, s, Method::GET, "/backends", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["listeners"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().expect("address").to_owned(),
                b.clone(),
            )
        })
        .collect()
}

/// The value of the metric line starting with `series` (name and labels) in `/metrics`.
async fn metric(c: &HttpClient, s: &Serving, series: &str) -> f64 {
    let (status, v) = admin(c, s, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = v.as_str().expect("metrics text").to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// `n` sequential GETs through the proxy, every one 200; counts by `x-served-by`.
async fn spread(c: &HttpClient, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let r = get(c, addr, &format!("/r/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        *seen.entry(r.served_by()).or_default() += 1;
    }
    seen
}

/// Listeners on one port of each of `ips` (ports are tried until one is free on all).
async fn same_port(ips: &[IpAddr]) -> (u16, Vec<TcpListener>) {
    'again: loop {
        let first = TcpListener::bind((ips[0], 0)).await.expect("bind");
        let port = first.local_addr().expect("addr").port();
        let mut all = vec![first];
        for ip in &ips[1..] {
            match TcpListener::bind((*ip, port)).await {
                Ok(l) => all.push(l),
                Err(_) => continue 'again,
            }
        }
        return (port, all);
    }
}

/// A keep-alive HTTP/1.1 backend answering `x-served-by: NAME` (the body too). With
/// `slow`, a `GET /slow…` is announced on `arrived` and answered only once `release` has
/// a permit.
struct Named {
    arrived: Arc<Semaphore>,
    release: Arc<Semaphore>,
}

fn named(listener: TcpListener, name: String, slow: bool) -> Named {
    let (arrived, release) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let (a, r) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (name, a, r) = (name.clone(), a.clone(), r.clone());
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut stream).await {
                    if slow && head.starts_with("GET /slow") {
                        a.add_permits(1);
                        r.acquire().await.expect("open").forget();
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-served-by: {name}\r\n\r\n{name}",
                        name.len()
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Named { arrived, release }
}

const WEB: &str = "web.lbwasm.test.";
const SRV: &str = "_http._tcp.web.lbwasm.test.";

/// 1. `dns://` over three A records: round robin spreads over the three; when DNS drops
///    one, it gets no new request and leaves `/backends`, while the request it was serving
///    completes (drained, not cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_followed_and_a_removed_address_drains() {
    bounded(async {
        let ips = [
            Ipv4Addr::new(127, 0, 0, 2),
            Ipv4Addr::new(127, 0, 0, 3),
            Ipv4Addr::new(127, 0, 0, 4),
        ];
        let (port, listeners) = same_port(&ips.map(IpAddr::V4)).await;
        let mut backends: Vec<Named> = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            backends.push(named(l, ips[i].to_string(), i == 2));
        }
        let dns = DnsServer::start().await;
        dns.set_addresses(WEB, &ips.map(IpAddr::V4));
        let s = serve(&dns, "round_robin", &format!("dns://{WEB}:{port}"), &[]).await;
        let c = client();
        let addr = s.listen[0];
        let gone = SocketAddr::new(IpAddr::V4(ips[2]), port).to_string();

        // Resolved before the listener was announced: all three are there at once, each
        // saying where it came from.
        let listed = members(&c, &s).await;
        assert_eq!(listed.len(), 3, "{listed:?}");
        let source = format!("dns://{WEB}:{port}");
        assert!(
            listed.values().all(|b| b["dns"] == source.as_str()),
            "{listed:?}"
        );
        let seen = spread(&c, addr, 30).await;
        for ip in &ips {
            assert_eq!(seen.get(&ip.to_string()), Some(&10), "{seen:?}");
        }

        // A slow request in flight on 127.0.0.4 (the others answer /slow at once).
        let slow = loop {
            let c2 = c.clone();
            let mut task = tokio::spawn(async move { get(&c2, addr, "/slow").await });
            tokio::select! {
                permit = backends[2].arrived.acquire() => {
                    permit.expect("open").forget();
                    break task;
                }
                done = &mut task => {
                    let r = done.expect("task");
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                }
            }
        };

        dns.set_addresses(
            WEB,
            &ips[..2]
                .iter()
                .map(|ip| IpAddr::V4(*ip))
                .collect::<Vec<_>>(),
        );
        eventually("127.0.0.4 drains once DNS drops it", || async {
            members(&c, &s)
                .await
                .get(&gone)
                .is_some_and(|b| b["draining"] == true)
        })
        .await;
        // Draining: no new request, but it stays while its request is in flight, also
        // after another whole resolution (the loop looks at draining members between two).
        let seen = spread(&c, addr, 20).await;
        assert_eq!(seen.get(&ips[2].to_string()), None, "{seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 20);
        let asked = dns.queries();
        until(
            "another resolution (A and AAAA)",
            common::EVENTUALLY,
            || async { (dns.queries() >= asked + 2).then_some(()) },
        )
        .await;
        let listed = members(&c, &s).await;
        let leaving = listed
            .get(&gone)
            .unwrap_or_else(|| panic!("cut while a request was in flight: {listed:?}"));
        assert_eq!(
            (&leaving["in_flight"], &leaving["draining"]),
            (&json!(1), &json!(true)),
            "{leaving}"
        );

        backends[2].release.add_permits(1);
        let r = slow.await.expect("slow request");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.served_by(),
            ips[2].to_string(),
            "completed where it started"
        );
        eventually("127.0.0.4 leaves the pool once idle", || async {
            !members(&c, &s).await.contains_key(&gone)
        })
        .await;
        assert_eq!(members(&c, &s).await.len(), 2);
        let series =
            format!("lbwasm_dns_backends{{listener=\"listener0\",source=\"dns://{WEB}:{port}\"}}");
        assert_eq!(metric(&c, &s, &series).await, 2.0);
    })
    .await;
}

/// 2. `dns+srv://`: SRV weights 1 and 3 become the backends' weights (`weighted_rr`
///    splits 1:3); the target of a lower priority (a higher number) is not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_weights_become_backend_weights_and_only_the_best_priority_serves() {
    bounded(async {
        let bs = demo_backends(3).await;
        let dns = DnsServer::start().await;
        dns.set_addresses("a.lbwasm.test.", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let port = |i: usize| bs[i].addr().port();
        dns.set_srv(
            SRV,
            &[
                (10, 1, port(0), "a.lbwasm.test."),
                (10, 3, port(1), "a.lbwasm.test."),
                (20, 5, port(2), "a.lbwasm.test."),
            ],
        );
        let s = serve(&dns, "weighted_rr", &format!("dns+srv://{SRV}"), &[]).await;
        let c = client();
        let listed = members(&c, &s).await;
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed[&bs[0].addr().to_string()]["weight"], 1);
        assert_eq!(listed[&bs[1].addr().to_string()]["weight"], 3);

        let seen = spread(&c, s.listen[0], 400).await;
        let (one, three) = (
            seen.get(bs[0].id()).copied().unwrap_or(0),
            seen.get(bs[1].id()).copied().unwrap_or(0),
        );
        assert_eq!(seen.get(bs[2].id()), None, "priority 20 unused: {seen:?}");
        assert_eq!(one + three, 400);
        assert!(
            (80..=120).contains(&one) && (280..=320).contains(&three),
            "1:3 expected: {seen:?}"
        );

        // A weight changed in DNS follows.
        dns.set_srv(
            SRV,
            &[
                (10, 1, port(0), "a.lbwasm.test."),
                (10, 1, port(1), "a.lbwasm.test."),
            ],
        );
        eventually("the SRV weight change reaches the pool", || async {
            members(&c, &s).await[&bs[1].addr().to_string()]["weight"] == 1
        })
        .await;
    })
    .await;
}

/// 3. SERVFAIL, then no answer at all: the members stay and traffic flows with no
///    failure; the errors are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_and_silence_keep_the_last_good_answer() {
    bounded(async {
        let bs = demo_backends(2).await;
        let dns = DnsServer::start().await;
        dns.set_addresses("a.lbwasm.test.", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        dns.set_srv(
            SRV,
            &[
                (10, 1, bs[0].addr().port(), "a.lbwasm.test."),
                (10, 1, bs[1].addr().port(), "a.lbwasm.test."),
            ],
        );
        let s = serve(&dns, "round_robin", &format!("dns+srv://{SRV}"), &[]).await;
        let c = client();
        let addr = s.listen[0];
        assert_eq!(members(&c, &s).await.len(), 2);
        let errors = format!(
            "lbwasm_dns_resolutions_total{{listener=\"listener0\",source=\"dns+srv://{SRV}\",result=\"error\"}}"
        );
        assert_eq!(metric(&c, &s, &errors).await, 0.0);

        for (mode, what) in [(Mode::ServFail, "SERVFAIL"), (Mode::Silent, "no answer")] {
            let before = metric(&c, &s, &errors).await;
            dns.set_mode(mode);
            until(&format!("{what} is counted as an error"), common::EVENTUALLY, || async {
                (metric(&c, &s, &errors).await > before).then_some(())
            })
            .await;
            let seen = spread(&c, addr, 200).await;
            assert_eq!(seen.len(), 2, "both members serve on after {what}: {seen:?}");
            let listed = members(&c, &s).await;
            assert_eq!(listed.len(), 2, "{listed:?}");
            assert!(listed.values().all(|b| b["draining"] == false), "{listed:?}");
        }
        let backends = format!("lbwasm_dns_backends{{listener=\"listener0\",source=\"dns+srv://{SRV}\"}}");
        assert_eq!(metric(&c, &s, &backends).await, 2.0);
    })
    .await;
}

/// 4. Discovery only touches what it added: a static backend (even when DNS names its
///    address too) and one added through the admin API stay when DNS empties (NXDOMAIN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_admin_backends_are_never_removed_by_discovery() {
    bounded(async {
        let bs = demo_backends(3).await;
        let (fixed, found, added) = (bs[0].addr(), bs[1].addr(), bs[2].addr());
        let dns = DnsServer::start().await;
        dns.set_addresses("a.lbwasm.test.", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        dns.set_srv(
            SRV,
            &[
                (10, 1, fixed.port(), "a.lbwasm.test."),
                (10, 1, found.port(), "a.lbwasm.test."),
            ],
        );
        let s = serve(&dns, "round_robin", &format!("{fixed},dns+srv://{SRV}"), &[]).await;
        let c = client();
        let listed = members(&c, &s).await;
        assert_eq!(listed.len(), 2, "the static one is not listed twice: {listed:?}");
        assert_eq!(listed[&fixed.to_string()].get("dns"), None, "{listed:?}");
        assert_eq!(listed[&found.to_string()]["dns"], format!("dns+srv://{SRV}"));
        let (status, v) = admin(
            &c,
            &s,
            Method::POST,
            "/backends/add",
            Some(json!({"addresses": [added.to_string()]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");

        dns.set_srv(SRV, &[]);
        eventually("the discovered backend leaves on NXDOMAIN", || async {
            !members(&c, &s).await.contains_key(&found.to_string())
        })
        .await;
        let nxdomain = format!(
            "lbwasm_dns_resolutions_total{{listener=\"listener0\",source=\"dns+srv://{SRV}\",result=\"nxdomain\"}}"
        );
        assert!(metric(&c, &s, &nxdomain).await >= 1.0);
        let listed = members(&c, &s).await;
        assert_eq!(listed.len(), 2, "{listed:?}");
        for kept in [fixed, added] {
            let b = &listed[&kept.to_string()];
            assert_eq!(b["draining"], false, "{b}");
        }
        let seen = spread(&c, s.listen[0], 20).await;
        assert_eq!(seen.get(bs[0].id()), Some(&10), "{seen:?}");
        assert_eq!(seen.get(bs[2].id()), Some(&10), "{seen:?}");
    })
    .await;
}

/// 5. A malformed DNS URL in the file is refused at start, naming file, line and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_dns_url_is_refused_with_its_place() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lbwasm.toml");
        for (address, message) in [
            ("dns://web.example", "listener[0].backend[0].address: expected dns://NAME:PORT"),
            ("dns+srv://_http._tcp.web.example:80", "listener[0].backend[0].address: a dns+srv:// URL takes no port"),
            ("dns://:80", "listener[0].backend[0].address: the DNS name is empty"),
        ] {
            let text = format!(
                "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n[[listener.backend]]\naddress = \"{address}\"\n"
            );
            std::fs::write(&file, text).expect("write");
            let out = tokio::task::spawn_blocking({
                let file = file.clone();
                move || lbwasm().args(["serve", "--config"]).arg(file).output()
            })
            .await
            .expect("join")
            .expect("run lbwasm");
            assert!(!out.status.success(), "{address} accepted");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let place = format!("{}:5: {message}", file.display());
            assert!(stderr.contains(&place), "{address}: expected {place:?} in {stderr}");
        }
    })
    .await;
}

/// 6. A reload (POST /reload) that takes a DNS source out of the file drains its
///    members and leaves the static ones; putting it back brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_starts_and_stops_dns_sources() {
    bounded(async {
        let bs = demo_backends(2).await;
        let (fixed, found) = (bs[0].addr(), bs[1].addr());
        let dns = DnsServer::start().await;
        dns.set_addresses("a.lbwasm.test.", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        dns.set_srv(SRV, &[(10, 1, found.port(), "a.lbwasm.test.")]);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lbwasm.toml");
        let config = |with_dns: bool| {
            let mut text = format!(
                "[discovery]\nresolver = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n[[listener.backend]]\naddress = \"{fixed}\"\n",
                dns.addr
            );
            if with_dns {
                text.push_str(&format!("[[listener.backend]]\naddress = \"dns+srv://{SRV}\"\n"));
            }
            text
        };
        std::fs::write(&file, config(true)).expect("write");
        let mut cmd = lbwasm();
        cmd.args(["serve", "--admin", "127.0.0.1:0", "--workers", "1", "--config"])
            .arg(&file)
            .stderr(Stdio::null());
        let s = serving(cmd, 1, true).await;
        let c = client();
        assert_eq!(members(&c, &s).await.len(), 2);

        std::fs::write(&file, config(false)).expect("write");
        let (status, v) = admin(&c, &s, Method::POST, "/reload", None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v.to_string().contains("DNS source dns+srv://"), "{v}");
        eventually("the source's member leaves after the reload", || async {
            !members(&c, &s).await.contains_key(&found.to_string())
        })
        .await;
        assert!(members(&c, &s).await.contains_key(&fixed.to_string()));

        std::fs::write(&file, config(true)).expect("write");
        let (status, v) = admin(&c, &s, Method::POST, "/reload", None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        eventually("the source's member is back after the reload", || async {
            members(&c, &s).await.contains_key(&found.to_string())
        })
        .await;
        assert_eq!(members(&c, &s).await.len(), 2);
    })
    .await;
}

/// 7. DNS silent at start: the server starts anyway (after the query timeout) with its
///    static backend and keeps asking; once DNS answers, the discovered backend joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_while_dns_is_down_and_catches_up() {
    bounded(async {
        let bs = demo_backends(2).await;
        let (fixed, found) = (bs[0].addr(), bs[1].addr());
        let dns = DnsServer::start().await;
        dns.set_addresses("a.lbwasm.test.", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        dns.set_srv(SRV, &[(10, 1, found.port(), "a.lbwasm.test.")]);
        dns.set_mode(Mode::Silent);
        let s = serve(
            &dns,
            "round_robin",
            &format!("{fixed},dns+srv://{SRV}"),
            &[],
        )
        .await;
        let c = client();
        assert!(dns.queries() > 0, "DNS was asked before the server started");
        let listed = members(&c, &s).await;
        assert_eq!(listed.keys().collect::<Vec<_>>(), [&fixed.to_string()]);
        let seen = spread(&c, s.listen[0], 10).await;
        assert_eq!(seen.get(bs[0].id()), Some(&10), "{seen:?}");

        dns.set_mode(Mode::Answer);
        eventually("the discovered backend joins once DNS answers", || async {
            members(&c, &s).await.contains_key(&found.to_string())
        })
        .await;
        let seen = spread(&c, s.listen[0], 10).await;
        assert_eq!(seen.get(bs[1].id()), Some(&5), "{seen:?}");
    })
    .await;
}

/// 8. `dns://` takes AAAA records as well as A: an IPv6 and an IPv4 address of one name
///    both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_and_a_records_both_become_backends() {
    bounded(async {
        let ips = [
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        ];
        let (port, listeners) = same_port(&ips).await;
        for (ip, l) in ips.iter().zip(listeners) {
            named(l, ip.to_string(), false);
        }
        let dns = DnsServer::start().await;
        dns.set_addresses(WEB, &ips);
        let s = serve(&dns, "round_robin", &format!("dns://{WEB}:{port}"), &[]).await;
        let c = client();
        let listed = members(&c, &s).await;
        let mut want: Vec<String> = ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port).to_string())
            .collect();
        let mut got: Vec<String> = listed.keys().cloned().collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        let seen = spread(&c, s.listen[0], 10).await;
        for ip in &ips {
            assert_eq!(seen.get(&ip.to_string()), Some(&5), "{seen:?}");
        }
    })
    .await;
}
