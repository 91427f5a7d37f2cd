//! An in-process proxy ([`Server`]) and its admin API, as the tests of `lbwasm serve` drive
//! them: start one over some backends, call the admin API, read a backend's state, count
//! which backend served what.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use lbwasm::backend::BackendHandle;
use lbwasm::config::Config;
use lbwasm::serve::Server;
use serde_json::Value;

use super::config::{listener, parse, with_admin};
use super::http::{HttpClient, client, get, send};

/// A proxy started from `config`, which must start; the built-in plugins installed first,
/// as the binary does.
pub fn start_parsed(config: Config) -> Server {
    lbwasm::install_builtins();
    lbwasm::admin::start(config).expect("server starts")
}

/// A proxy started from `text`, which must start.
pub fn start_config(text: &str) -> Server {
    start_parsed(parse(text))
}

/// A proxy (2 workers, an admin endpoint) with one listener "web" over `backends`; `keys`
/// and `sections` as [`listener`] takes them.
pub fn start(plugin: &str, backends: &[(SocketAddr, u32)], keys: &str, sections: &str) -> Server {
    start_config(&with_admin(
        2,
        &listener("web", plugin, backends, keys, sections),
        None,
    ))
}

/// One admin API call (JSON in, with `token` as a bearer token if given); the status and
/// the JSON answer (a text answer as a JSON string).
pub async fn admin(
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
    let reply = send(client, method, addr, path, &headers, body).await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::String(reply.text()));
    (reply.status, value)
}

/// The backend at `addr` of the first listener, as `/backends` reports it.
pub async fn backend_state(client: &HttpClient, server: &Server, addr: SocketAddr) -> Value {
    let (status, v) = admin(client, server, Method::GET, "/backends", None, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["listeners"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{addr} is not listed: {v}"))
}

/// `n` sequential GETs; counts by `x-served-by`. Every one must be 200.
pub async fn spread(client: &HttpClient, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let r = get(client, addr, &format!("/req/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        *seen.entry(r.served_by()).or_default() += 1;
    }
    seen
}

/// `clients` concurrent clients × `each` GETs, counting in `done` the requests answered
/// (so that a test can change something mid-way); returns those that were not 200.
pub async fn load(
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

/// The id a demo backend sends as `x-served-by`.
pub fn id_of(b: &BackendHandle) -> String {
    b.id().to_string()
}
