//! End-to-end tests of `lbwasm serve`: real proxies (in-process [`Server`]s and the real
//! binary), real demo backends and real plugins, over 127.0.0.1 with port 0 everywhere.
//! Every test is bounded by a timeout and asserts outcomes (counts, statuses, bodies),
//! never wall-clock durations; every child process is killed by its PID.

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead as _, BufReader as StdBufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbwasm::backend::{self, BackendConfig, BackendHandle};
use lbwasm::config::{self, Config};
use lbwasm::serve::Server;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Generous bound for any one test, only there to turn a hang into a failure.
const LIMIT: Duration = Duration::from_secs(120);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test timed out");
}

/// Polls `check` every 50 ms until it holds (bounded by the test's own limit).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    version: Version,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn served_by(&self) -> String {
        self.headers
            .get("x-served-by")
            .unwrap_or_else(|| {
                panic!(
                    "no x-served-by; status {} body {:?}",
                    self.status,
                    self.text()
                )
            })
            .to_str()
            .expect("ascii")
            .to_string()
    }
}

async fn send(
    client: &HttpClient,
    method: Method,
    url: String,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(Full::new(body)).expect("request"))
        .await
        .expect("request failed");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    }
}

async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Reply {
    send(
        client,
        Method::GET,
        format!("http://{addr}{path}"),
        &[],
        Bytes::new(),
    )
    .await
}

async fn spawn_backends(n: usize) -> Vec<BackendHandle> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(
            backend::spawn(BackendConfig::new(0))
                .await
                .expect("backend"),
        );
    }
    v
}

/// A `[[listener]]` table: `keys` are extra `key = value` lines, `sections` extra tables
/// (`[listener.health]` ...), then one `[[listener.backend]]` per backend.
fn listener(
    name: &str,
    plugin: &str,
    backends: &[(SocketAddr, u32)],
    keys: &str,
    sections: &str,
) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nplugin = \"{plugin}\"\n{keys}\n{sections}\n"
    );
    for (addr, weight) in backends {
        s.push_str(&format!(
            "[[listener.backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    s
}

/// A whole configuration: 2 workers, an admin endpoint (with `token` if given), listeners.
fn config_text(listeners: &str, token: Option<&str>) -> String {
    let token = token
        .map(|t| format!("token = \"{t}\"\n"))
        .unwrap_or_default();
    format!("workers = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n{token}\n{listeners}")
}

fn parse(text: &str) -> Config {
    config::parse_str(text, Path::new("serve-test.toml"))
        .unwrap_or_else(|e| panic!("bad test config: {e}\n{text}"))
}

fn addrs(bs: &[BackendHandle]) -> Vec<(SocketAddr, u32)> {
    bs.iter().map(|b| (b.addr(), 1)).collect()
}

/// A proxy with one listener "web" over `backends`.
fn start(plugin: &str, backends: &[(SocketAddr, u32)], keys: &str, sections: &str) -> Server {
    Server::start(parse(&config_text(
        &listener("web", plugin, backends, keys, sections),
        None,
    )))
    .expect("server starts")
}

async fn admin(
    client: &HttpClient,
    server: &Server,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let addr = server.admin_addr().expect("admin endpoint");
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let reply = send(
        client,
        method,
        format!("http://{addr}{path}"),
        &headers,
        body,
    )
    .await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::String(reply.text()));
    (reply.status, value)
}

async fn backend_state(client: &HttpClient, server: &Server, addr: SocketAddr) -> Value {
    let (status, v) = admin(client, server, Method::GET, "/backends", None, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["listeners"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}

/// `n` sequential GETs; counts by `x-served-by`. Every one must be 200.
async fn spread(client: &HttpClient, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let r = get(client, addr, &format!("/req/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        *seen.entry(r.served_by()).or_default() += 1;
    }
    seen
}

fn id_of(b: &BackendHandle) -> String {
    b.id().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_requests_exactly() {
    bounded(async {
        let bs = spawn_backends(3).await;
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
        let bs = spawn_backends(3).await;
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
        let bs = spawn_backends(3).await;
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
        let bs = spawn_backends(3).await;
        let c = client();
        let server = start(
            "consistent_hash",
            &addrs(&bs),
            "hash_key = \"header:x-user\"",
            "",
        );
        let addr = server.listen_addrs()[0];
        let url = format!("http://{addr}/h");
        let mut owner: HashMap<String, String> = HashMap::new();
        for round in 0..3 {
            for u in 0..30 {
                let user = format!("u{u}");
                let r = send(
                    &c,
                    Method::GET,
                    url.clone(),
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
        let reply = raw_exchange(
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
        let plugin = Path::new(env!("LBWASM_WASM_DIR")).join("sticky_canary.wasm");
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
            let reply = raw_exchange(addr, raw.as_bytes()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_requests_are_proxied() {
    bounded(async {
        let bs = spawn_backends(2).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let h2: HttpClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
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
        let url = format!("http://{}/echo", server.listen_addrs()[0]);
        let r = send(&h2, Method::POST, url, &[], body.clone()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, body);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_both_ways() {
    bounded(async {
        let bs = spawn_backends(1).await;
        let server = start("round_robin", &addrs(&bs), "", "");
        let c = client();
        let body: Bytes = (0..2_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let url = format!("http://{}/upload", server.listen_addrs()[0]);
        let r = send(&c, Method::POST, url, &[], body.clone()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.len(), body.len());
        assert!(r.body == body, "echoed body differs");
        // HEAD has no body and keeps the connection usable.
        let url = format!("http://{}/head", server.listen_addrs()[0]);
        let r = send(&c, Method::HEAD, url, &[], Bytes::new()).await;
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

/// A test server on 127.0.0.1 (port 0): `handle` runs in its own task for each connection.
async fn serve_each<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
    addr
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
        let url = format!("http://{}/headers", server.listen_addrs()[0]);
        let r = send(
            &c,
            Method::GET,
            url,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_balance_connections() {
    bounded(async {
        let mut bs = Vec::new();
        for _ in 0..2 {
            let mut cfg = BackendConfig::new(0);
            cfg.protocol = backend::Protocol::Tcp;
            bs.push(backend::spawn(cfg).await.expect("tcp backend"));
        }
        let server = start("round_robin", &addrs(&bs), "protocol = \"tcp\"", "");
        let addr = server.listen_addrs()[0];
        let mut seen = HashMap::new();
        for _ in 0..6 {
            let s = TcpStream::connect(addr).await.expect("connect");
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"PING\n").await.expect("write");
            let mut line = String::new();
            s.read_line(&mut line).await.expect("read");
            let id = line
                .trim()
                .strip_prefix("PONG ")
                .unwrap_or_else(|| panic!("{line:?}"))
                .to_string();
            *seen.entry(id).or_insert(0) += 1;
        }
        assert_eq!(seen.get(&id_of(&bs[0])), Some(&3), "{seen:?}");
        assert_eq!(seen.get(&id_of(&bs[1])), Some(&3), "{seen:?}");
        // A half-close reaches the backend, which answers and closes its side too.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"hello\n").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut all = String::new();
        s.read_to_string(&mut all).await.expect("read to end");
        assert!(all.ends_with(" hello\n"), "{all:?}");
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_add_and_remove_change_the_distribution() {
    bounded(async {
        let bs = spawn_backends(3).await;
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

/// `clients` concurrent clients × `each` GETs; returns the statuses that were not 200.
async fn load(
    addr: SocketAddr,
    clients: usize,
    each: usize,
    done: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for k in 0..clients {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            for i in 0..each {
                let r = get(&c, addr, &format!("/load/{k}/{i}")).await;
                if r.status != StatusCode::OK {
                    bad.push(format!("{}: {}", r.status, r.text().trim()));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.expect("client task"));
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_swap_under_load_fails_no_request() {
    bounded(async {
        let bs = spawn_backends(3).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_shut_down_during_load_fails_no_get() {
    bounded(async {
        let bs = spawn_backends(3).await;
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
        let bs = spawn_backends(2).await;
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
        let bs = spawn_backends(2).await;
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
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
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
        let bs = spawn_backends(2).await;
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
        let bs = spawn_backends(2).await;
        let text = config_text(
            &listener("web", "round_robin", &addrs(&bs[..1]), "", ""),
            Some("s3cret"),
        );
        let server = Server::start(parse(&text)).expect("server");
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
        let bs = spawn_backends(3).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lbwasm.toml");
        let write = |plugin: &str, backends: &[(SocketAddr, u32)]| {
            std::fs::write(
                &path,
                config_text(&listener("web", plugin, backends, "", ""), None),
            )
            .expect("write config");
        };
        write("round_robin", &addrs(&bs[..1]));
        let text = std::fs::read_to_string(&path).expect("read");
        let server =
            Server::start(config::parse_str(&text, &path).expect("config")).expect("server");
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

/// A child process killed (by PID) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lbwasm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lbwasm"))
}

/// Starts `cmd` (`lbwasm serve ...`) and reads the addresses of its `listeners` listeners
/// off its standard output.
async fn serving(mut cmd: Command, listeners: usize) -> (Reaped, Vec<SocketAddr>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start lbwasm");
    let stdout = child.stdout.take().expect("stdout");
    let child = Reaped(child);
    let addrs: Vec<SocketAddr> = tokio::task::spawn_blocking(move || {
        StdBufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("lbwasm listening on ")?.parse().ok())
            .take(listeners)
            .collect()
    })
    .await
    .expect("join");
    assert_eq!(addrs.len(), listeners, "lbwasm exited before listening");
    (child, addrs)
}

/// Sends `signal` to the child, by its PID.
fn signal(child: &Reaped, signal: i32) {
    let pid = i32::try_from(child.0.id()).expect("pid");
    // SAFETY: signalling our own child by its PID.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// SIGTERM, then the exit status.
async fn terminate(child: Reaped) -> std::process::ExitStatus {
    signal(&child, libc::SIGTERM);
    let mut child = child;
    tokio::task::spawn_blocking(move || (child.0.wait(), child))
        .await
        .expect("join")
        .0
        .expect("wait")
}

/// Runs `lbwasm serve ARGS`, which must fail; its stderr.
async fn refused(args: Vec<std::ffi::OsString>) -> String {
    let out = tokio::task::spawn_blocking(move || lbwasm().arg("serve").args(&args).output())
        .await
        .expect("join")
        .expect("run lbwasm");
    assert!(!out.status.success(), "lbwasm accepted {:?}", out);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_name_file_line_and_key_through_the_binary() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n\n[[listener.backend]]\naddress = \"127.0.0.1:9\"\nweight = 0\n",
        )
        .expect("write");
        let stderr = refused(vec!["--config".into(), bad.into()]).await;
        assert!(stderr.contains("bad.toml:7: listener[0].backend[0].weight"), "{stderr}");

        // A plugin option the plugin refuses: named, and nothing is bound.
        let opts = dir.path().join("opts.toml");
        std::fs::write(
            &opts,
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n[listener.plugin_options]\nbogus = 1\n[[listener.backend]]\naddress = \"127.0.0.1:9\"\n",
        )
        .expect("write");
        let stderr = refused(vec!["--config".into(), opts.into()]).await;
        assert!(stderr.contains("bogus"), "{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");

        // Flags: a log filter that is none, an access log that cannot be opened.
        let flags = |extra: &[&str]| -> Vec<std::ffi::OsString> {
            ["--listen", "127.0.0.1:0", "--plugin", "round_robin"]
                .iter()
                .chain(&["--backends", "127.0.0.1:9"])
                .chain(extra)
                .map(Into::into)
                .collect()
        };
        let stderr = refused(flags(&["--log-level", "lbwasm=loud"])).await;
        assert!(
            stderr.starts_with("lbwasm: error: --log-level: \"lbwasm=loud\" is not a log filter"),
            "{stderr}"
        );
        let missing = dir.path().join("no/such/dir/access.log");
        let missing = missing.to_str().expect("utf-8 path");
        let stderr = refused(flags(&["--access-log", missing])).await;
        assert!(
            stderr.contains(&format!("cannot open the access log {missing}: ")),
            "{stderr}"
        );
        assert!(!stderr.contains("listening"), "{stderr}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_exits_0_on_sigterm() {
    bounded(async {
        let bs = spawn_backends(2).await;
        let list = format!("{},{}", bs[0].addr(), bs[1].addr());
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
            "--workers",
            "1",
            "--backends",
            &list,
        ];
        let mut cmd = lbwasm();
        cmd.arg("serve").args(args);
        let (child, addrs) = serving(cmd, 1).await;
        let addr = addrs[0];
        let c = client();
        let seen = spread(&c, addr, 10).await;
        assert_eq!(seen.len(), 2, "{seen:?}");
        drop(c);
        let status = terminate(child).await;
        assert!(status.success(), "{status:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed() {
    bounded(async {
        let bs = spawn_backends(1).await;
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

/// Reads one request head (through the blank line) from `r`; None at end of stream.
async fn read_head(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return Some(lines);
        }
        lines.push(line);
    }
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
        let server = Server::start(parse(
            &config_text(&listener("web", "round_robin", &[(backend, 1)], "", ""), None)
                .replace("workers = 2", "workers = 1"),
        ))
        .expect("server starts");
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
        let posted = send(&c, Method::POST, format!("http://{addr}/stale"), &[], Bytes::from_static(b"x")).await;
        assert_eq!(posted.status, StatusCode::BAD_GATEWAY, "{}", posted.text());
        assert!(posted.text().contains("failed before answering"), "{}", posted.text());

        // Bodies go up full duplex: an early refusal is relayed (not a 502), and an echo
        // that answers as it reads, with far more than the socket buffers hold, finishes.
        let big: Bytes = vec![7u8; 16 << 20].into();
        let r = send(&c, Method::POST, format!("http://{addr}/early"), &[], big.clone()).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
        let c = client(); // the refused upload closed that connection
        let r = send(&c, Method::POST, format!("http://{addr}/echo"), &[], big.clone()).await;
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

/// Writes `raw` on a new connection to `addr` and reads until the proxy closes it.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
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
            let reply = raw_exchange(addr, raw).await;
            assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
            assert!(reply.contains(why), "{reply}");
            assert!(reply.contains("connection: close\r\n"), "{reply}");
            assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
        }

        // A head past 64 KiB is refused whole, not buffered without end.
        let mut huge = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
        huge.resize(huge.len() + 70 * 1024, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let reply = raw_exchange(addr, &huge).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        assert!(reply.contains("larger than 64 KiB"), "{reply}");

        // Pipelined requests are answered in order on one connection; a chunked answer
        // goes out chunked again (its trailers are a hop's and stay behind).
        let reply = raw_exchange(
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
        let reply = raw_exchange(addr, &raw).await;
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
        assert!(reply.ends_with("\r\n\r\nonce"), "{reply}");

        // HTTP/1.0 knows no chunks: the body ends with the connection.
        let reply = raw_exchange(addr, b"GET /chunked HTTP/1.0\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(!reply.contains("transfer-encoding"), "{reply}");
        assert!(reply.contains("connection: close\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nhello world"), "{reply}");

        // A HEAD answer keeps the length the GET would have, and has no body.
        let reply = raw_exchange(addr, b"HEAD /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
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

/// The lines of `path` (none yet: empty).
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_record_requests_and_connections_and_reopen_on_sighup() {
    bounded(async {
        let bs = spawn_backends(2).await;
        let mut tcp = Vec::new();
        for _ in 0..2 {
            let mut cfg = BackendConfig::new(0);
            cfg.protocol = backend::Protocol::Tcp;
            tcp.push(backend::spawn(cfg).await.expect("tcp backend"));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (web_log, tcp_log) = (dir.path().join("access.log"), dir.path().join("tcp.log"));
        // Relative paths: next to the configuration file.
        let text = format!(
            "workers = 2\n{}{}",
            listener("web", "round_robin", &addrs(&bs), "access_log = \"access.log\"", ""),
            listener(
                "raw",
                "round_robin",
                &addrs(&tcp),
                "protocol = \"tcp\"\naccess_log = \"tcp.log\"",
                ""
            ),
        );
        let path = dir.path().join("lbwasm.toml");
        std::fs::write(&path, text).expect("write config");
        let mut cmd = lbwasm();
        cmd.args(["serve", "--config"]).arg(&path);
        let (child, listening) = serving(cmd, 2).await;
        let (web, raw) = (listening[0], listening[1]);
        let backends: Vec<String> = bs.iter().map(|b| b.addr().to_string()).collect();

        let c = client();
        let r = send(
            &c,
            Method::GET,
            format!("http://{web}/a?x=1"),
            &[("user-agent", "probe \"quoted\""), ("referer", "http://r/")],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let body_len = r.body.len();
        let refused = raw_exchange(web, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        let mut s = TcpStream::connect(raw).await.expect("connect");
        s.write_all(b"PING\n").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut pong = String::new();
        s.read_to_string(&mut pong).await.expect("read");
        assert!(pong.starts_with("PONG "), "{pong:?}");

        // Lines are written within a second.
        eventually("two HTTP lines", || async { log_lines(&web_log).len() == 2 }).await;
        eventually("a TCP line", || async { log_lines(&tcp_log).len() == 1 }).await;
        let lines = log_lines(&web_log);
        let line = lines.iter().find(|l| l.contains("\"GET /a")).expect("GET line");
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        let expected = format!(
            "+0000] \"GET /a?x=1 HTTP/1.1\" 200 {body_len} \"http://r/\" \"probe \\x22quoted\\x22\" \""
        );
        assert!(line.contains(&expected), "{line}\nlacks {expected}");
        let fields: Vec<&str> = line.rsplitn(3, ' ').collect();
        assert_eq!(fields[0], "1", "one attempt: {line}");
        assert!(fields[1].parse::<f64>().is_ok(), "seconds: {line}");
        assert!(
            backends.iter().any(|b| fields[2].ends_with(&format!("\"{b}\""))),
            "backend of {line}"
        );
        let bad = lines.iter().find(|l| !l.contains("\"GET /a")).expect("400 line");
        // No request line, referer, user agent or backend; no attempt.
        assert!(bad.contains("] \"-\" 400 "), "{bad}");
        assert!(bad.contains(" \"-\" \"-\" \"-\" ") && bad.ends_with(" 0"), "{bad}");
        let tcp_line = &log_lines(&tcp_log)[0];
        let tail: Vec<&str> = tcp_line.rsplitn(4, ' ').collect();
        assert!(tcp_line.contains("\"TCP\" 200 "), "{tcp_line}");
        assert_eq!((tail[0], tail[1]), ("5", "1"), "5 bytes from the client, 1 attempt: {tcp_line}");
        assert!(
            tcp.iter().any(|b| tail[3].ends_with(&format!("\"{}\"", b.addr()))),
            "{tcp_line}"
        );

        // logrotate: rename, then SIGHUP; later lines go to a new file of the old name.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&web_log, &rotated).expect("rename");
        signal(&child, libc::SIGHUP);
        eventually("the log reopened", || async { web_log.exists() }).await;
        let r = get(&c, web, "/after").await;
        assert_eq!(r.status, StatusCode::OK);
        eventually("a line in the new file", || async {
            log_lines(&web_log).iter().any(|l| l.contains("\"GET /after HTTP/1.1\" 200 "))
        })
        .await;
        assert_eq!(log_lines(&rotated).len(), 2, "the rotated file is left alone");
        drop(c);
        let status = terminate(child).await;
        assert!(status.success(), "{status:?}");
    })
    .await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_files_limit_is_raised_to_serve_hundreds_of_clients() {
    use std::os::unix::process::CommandExt as _;
    const CLIENTS: usize = 300;
    bounded(async {
        // This process holds the clients and the backends' side of it all.
        lbwasm::serve::raise_fd_limit();
        let bs = spawn_backends(2).await;
        let list = format!("{},{}", bs[0].addr(), bs[1].addr());
        let mut cmd = lbwasm();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
        ])
        .args(["--workers", "1", "--backends", &list]);
        // SAFETY: pre_exec runs in the forked child; getrlimit and setrlimit are
        // async-signal-safe and touch only the struct passed by pointer.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                // 200 descriptors: not even 100 proxied connections, if left so.
                lim.rlim_cur = 200;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (child, addrs) = serving(cmd, 1).await;
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).expect("limits");
        let row: Vec<&str> = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("open files row")
            .split_whitespace()
            .collect();
        assert_eq!(
            row[3], row[4],
            "soft limit not raised to the hard one: {row:?}"
        );

        // Hundreds of clients at once, each with a request in flight.
        let mut conns = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            let mut s = TcpStream::connect(addrs[0]).await.expect("connect");
            s.write_all(b"GET /many HTTP/1.1\r\nHost: lb\r\n\r\n")
                .await
                .expect("write");
            conns.push(BufReader::new(s));
        }
        let mut ok = 0;
        for conn in &mut conns {
            let mut status = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut status));
            if matches!(read.await, Ok(Ok(_))) && status.starts_with("HTTP/1.1 200") {
                ok += 1;
            }
        }
        assert_eq!(ok, CLIENTS, "clients answered 200");
        drop(conns);
        assert!(terminate(child).await.success());
    })
    .await;
}

/// A TCP backend that reads a PROXY header (v1 or v2), answers one line naming the
/// addresses it carried (`TCP4 src dst`), then echoes what follows.
async fn proxy_protocol_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut first = [0u8; 16];
                s.read_exact(&mut first[..6]).await.expect("header start");
                let line = if &first[..6] == b"PROXY " {
                    let mut rest = String::new();
                    s.read_line(&mut rest).await.expect("v1 line");
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    format!("{} {}:{} {}:{}", f[0], f[1], f[3], f[2], f[4])
                } else {
                    s.read_exact(&mut first[6..]).await.expect("v2 header");
                    assert_eq!(&first[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
                    assert_eq!(
                        (first[12], first[13]),
                        (0x21, 0x11),
                        "v2 PROXY, TCP over IPv4"
                    );
                    let len = usize::from(u16::from_be_bytes([first[14], first[15]]));
                    let mut a = vec![0u8; len];
                    s.read_exact(&mut a).await.expect("v2 addresses");
                    let ip = |o: usize| std::net::Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
                    let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                    format!("TCP4 {}:{} {}:{}", ip(0), port(8), ip(4), port(10))
                };
                // The client's first bytes may have come with the header: echo them too.
                let early = s.buffer().to_vec();
                let mut s = s.into_inner();
                s.write_all(format!("{line}\n").as_bytes())
                    .await
                    .expect("answer");
                s.write_all(&early).await.expect("echo");
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_tell_backends_the_client_by_the_proxy_protocol() {
    bounded(async {
        let (b1, b2) = (
            proxy_protocol_backend().await,
            proxy_protocol_backend().await,
        );
        let tcp = |name: &str, backend: SocketAddr, version: &str| {
            let keys = format!("protocol = \"tcp\"\nproxy_protocol = \"{version}\"");
            listener(name, "round_robin", &[(backend, 1)], &keys, "")
        };
        let text = format!("{}{}", tcp("v1", b1, "v1"), tcp("v2", b2, "v2"));
        let server = Server::start(parse(&config_text(&text, None))).expect("server starts");
        for addr in server.listen_addrs() {
            let s = TcpStream::connect(addr).await.expect("connect");
            let client = s.local_addr().expect("client address");
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"hello\n").await.expect("write");
            let mut got = String::new();
            s.read_line(&mut got).await.expect("header line");
            assert_eq!(
                got,
                format!("TCP4 {client} {addr}\n"),
                "header seen through {addr}"
            );
            let mut echo = String::new();
            s.read_line(&mut echo).await.expect("echo");
            assert_eq!(echo, "hello\n", "the client's bytes follow the header");
        }
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
        if head[0].starts_with("GET /stall ") {
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
            raw_exchange(addr, b"GET /stall HTTP/1.1\r\nHost: lb\r\n\r\n"),
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
