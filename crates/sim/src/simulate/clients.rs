//! The simulated clients: a seeded GET/POST traffic generator over hyper that records what
//! every request saw (start offset, latency, backend, status or error kind).
//!
//! Two pacings:
//! - **closed loop**: `clients` concurrent clients, each sending its next request when the
//!   previous one is answered (fixed concurrency; throughput follows latency);
//! - **open loop**: Poisson arrivals at a fixed rate (exponential inter-arrival times), each
//!   request sent on schedule whether or not earlier ones were answered. Latency is measured
//!   from the *scheduled* start, so a stalled generator or server cannot hide queueing
//!   (no coordinated omission).
//!
//! Three routes: through one address (the proxy), straight to a list of servers with
//! client-side failover (a client that cannot connect moves to the next address in its
//! list and stays there), or lookaside (`GET /pick` on the proxy's admin endpoint, then
//! straight to the backend it names).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::ProgressBar;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backend::SERVED_BY;

/// The pooled keep-alive client every simulated client shares (about one connection per
/// concurrent request, reused).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Header carrying a request's user key, which the hashing listeners hash on.
pub const USER_KEY_HEADER: &str = "x-user-id";

/// Requests in flight at most per open-loop run; beyond it an arrival fails at once as
/// [`ErrorKind::Overload`] instead of exhausting file descriptors (every request in flight
/// holds a connection, and everything runs in one process: four descriptors each, counting
/// the proxy's and the backend's ends).
const MAX_IN_FLIGHT: usize = 1024;

/// Builds the shared HTTP client; `connect_timeout` bounds a connect so that failover to
/// the next address is quick.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build(connector)
}

/// Where requests go.
#[derive(Clone, Debug)]
pub enum Route {
    /// Client `c` starts at `addrs[c % len]` and moves to the next address when it cannot
    /// connect (or, for a GET, when the connection breaks). One address = the proxy.
    Direct(Vec<SocketAddr>),
    /// Ask the admin endpoint which backend to use for the request's key, then go there.
    Lookaside { admin: SocketAddr, listener: String },
}

/// How requests are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pacing {
    /// `clients` clients, each with one request outstanding at a time.
    Closed { clients: usize },
    /// Poisson arrivals at `rate` requests per second, spread over `clients` client
    /// identities (which only matters for their failover cursors).
    Open { rate: f64, clients: usize },
}

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// After this many requests.
    Count(u64),
    /// After this long (closed loop: no new request; open loop: no new arrival).
    Duration(Duration),
}

/// One run of traffic.
#[derive(Clone, Debug)]
pub struct Workload {
    pub route: Route,
    pub pacing: Pacing,
    pub stop: Stop,
    /// A request not answered this long after its (scheduled) start fails as a timeout.
    pub timeout: Duration,
    /// Share of POSTs, 0..=1; the rest are GETs.
    pub post_share: f64,
    /// Send [`USER_KEY_HEADER`] drawn from this many users (hashing experiments).
    pub user_keys: Option<u64>,
    /// Seeds the request mix (methods, paths, bodies, keys) and the arrival times.
    pub seed: u64,
}

/// GET or POST.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verb {
    Get,
    Post,
}

impl Verb {
    /// GETs may be retried anywhere; POSTs only when they never reached a server.
    pub fn idempotent(self) -> bool {
        self == Verb::Get
    }
}

/// Why a request got no HTTP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No address in the client's list accepted a connection.
    Connect,
    /// No answer within the client timeout.
    Timeout,
    /// The connection broke mid-request.
    Reset,
    /// The lookaside `/pick` failed.
    Lookaside,
    /// Open loop only: too many requests in flight on the client side.
    Overload,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Lookaside => "lookaside",
            ErrorKind::Overload => "overload",
        }
    }
}

/// What a request got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    Failed(ErrorKind),
}

impl Outcome {
    /// A 2xx answer.
    pub fn ok(self) -> bool {
        matches!(self, Outcome::Status(s) if (200..300).contains(&s))
    }
}

/// One request as the client saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Scheduled (open loop) or actual (closed loop) start, from the run's start.
    pub start: Duration,
    /// From `start` to the last byte of the response, or to the failure.
    pub latency: Duration,
    /// `x-served-by` of the answer; none when no backend answered.
    pub backend: Option<Arc<str>>,
    pub outcome: Outcome,
    pub verb: Verb,
    /// Addresses tried (client-side failover), 1 when the first one answered.
    pub tries: u8,
}

/// One request to send, drawn from the seeded mix.
#[derive(Clone, Debug)]
struct Planned {
    verb: Verb,
    path: String,
    body: Bytes,
    key: Option<String>,
}

fn plan(rng: &mut SmallRng, w: &Workload) -> Planned {
    let verb = if rng.random::<f64>() < w.post_share {
        Verb::Post
    } else {
        Verb::Get
    };
    let path = match rng.random_range(0..10u32) {
        0..=5 => format!("/item/{}", rng.random_range(1..10_000u32)),
        6..=7 => format!("/user/{}/cart", rng.random_range(1..5_000u32)),
        8 => "/home".to_string(),
        _ => format!("/search?q={}", rng.random_range(1..100_000u32)),
    };
    let body = match verb {
        Verb::Get => Bytes::new(),
        Verb::Post => {
            let len = rng.random_range(16..256usize);
            let note: String = (0..len)
                .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                .collect();
            Bytes::from(format!(
                "{{\"qty\":{},\"note\":\"{note}\"}}",
                rng.random_range(1..100u32)
            ))
        }
    };
    let key = w
        .user_keys
        .map(|n| format!("user-{}", rng.random_range(0..n.max(1))));
    Planned {
        verb,
        path,
        body,
        key,
    }
}

/// State shared by the tasks of one run.
struct Shared {
    http: HttpClient,
    route: Route,
    timeout: Duration,
    t0: Instant,
    /// Per client identity: index of its current address (failover cursor).
    cursors: Vec<AtomicUsize>,
    bar: ProgressBar,
}

/// Runs `w` from `t0` (so that the caller can act at known offsets, e.g. kill a backend
/// mid-run) and returns every request's sample, in completion order.
pub async fn run(w: &Workload, http: &HttpClient, bar: &ProgressBar, t0: Instant) -> Vec<Sample> {
    let clients = match w.pacing {
        Pacing::Closed { clients } | Pacing::Open { clients, .. } => clients.max(1),
    };
    let shared = Arc::new(Shared {
        http: http.clone(),
        route: w.route.clone(),
        timeout: w.timeout,
        t0,
        cursors: (0..clients).map(AtomicUsize::new).collect(),
        bar: bar.clone(),
    });
    match w.pacing {
        Pacing::Closed { clients } => closed_loop(w, shared, clients.max(1)).await,
        Pacing::Open { rate, clients } => open_loop(w, shared, rate, clients.max(1)).await,
    }
}

async fn closed_loop(w: &Workload, shared: Arc<Shared>, clients: usize) -> Vec<Sample> {
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for c in 0..clients {
        let shared = shared.clone();
        let issued = issued.clone();
        let w = w.clone();
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(w.seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
            let mut out = Vec::new();
            loop {
                let more = match w.stop {
                    Stop::Count(n) => issued.fetch_add(1, Ordering::Relaxed) < n,
                    Stop::Duration(d) => shared.t0.elapsed() < d,
                };
                if !more {
                    break;
                }
                let req = plan(&mut rng, &w);
                let start = Instant::now();
                out.push(send(&shared, c, req, start).await);
            }
            out
        });
    }
    let mut samples = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(mut s) => samples.append(&mut s),
            Err(error) => tracing::warn!(%error, "client task failed"),
        }
    }
    samples
}

async fn open_loop(w: &Workload, shared: Arc<Shared>, rate: f64, clients: usize) -> Vec<Sample> {
    let mut rng = SmallRng::seed_from_u64(w.seed);
    let rate = rate.max(0.001);
    let mut tasks = JoinSet::new();
    let mut samples = Vec::new();
    let mut at = 0.0f64;
    let mut k: u64 = 0;
    loop {
        // Exponential inter-arrival time: -ln(U) / rate with U in (0, 1].
        at += -(1.0 - rng.random::<f64>()).ln() / rate;
        let offset = Duration::from_secs_f64(at);
        match w.stop {
            Stop::Count(n) if k >= n => break,
            Stop::Duration(d) if offset >= d => break,
            _ => {}
        }
        let req = plan(&mut rng, w);
        let client = (k % clients as u64) as usize;
        k += 1;
        let scheduled = shared.t0 + offset;
        tokio::time::sleep_until(scheduled).await;
        while let Some(done) = tasks.try_join_next() {
            collect(done, &mut samples);
        }
        if tasks.len() >= MAX_IN_FLIGHT {
            shared.bar.inc(1);
            samples.push(Sample {
                start: offset,
                latency: Duration::ZERO,
                backend: None,
                outcome: Outcome::Failed(ErrorKind::Overload),
                verb: req.verb,
                tries: 0,
            });
            continue;
        }
        let shared = shared.clone();
        tasks.spawn(async move { send(&shared, client, req, scheduled).await });
    }
    while let Some(done) = tasks.join_next().await {
        collect(done, &mut samples);
    }
    samples
}

fn collect(done: Result<Sample, tokio::task::JoinError>, samples: &mut Vec<Sample>) {
    match done {
        Ok(s) => samples.push(s),
        Err(error) => tracing::warn!(%error, "request task failed"),
    }
}

/// Sends one request (with failover or lookaside) and records it; never fails.
async fn send(shared: &Shared, client: usize, req: Planned, start: Instant) -> Sample {
    let deadline = start + shared.timeout;
    let verb = req.verb;
    let mut tries = 0u8;
    let result = tokio::time::timeout_at(deadline, attempt(shared, client, &req, &mut tries)).await;
    let latency = start.elapsed();
    shared.bar.inc(1);
    let (outcome, backend) = match result {
        Ok(Ok((status, backend))) => (Outcome::Status(status.as_u16()), backend),
        Ok(Err(kind)) => (Outcome::Failed(kind), None),
        Err(_) => (Outcome::Failed(ErrorKind::Timeout), None),
    };
    Sample {
        start: start.saturating_duration_since(shared.t0),
        latency,
        backend,
        outcome,
        verb,
        tries,
    }
}

type Answer = (StatusCode, Option<Arc<str>>);

async fn attempt(
    shared: &Shared,
    client: usize,
    req: &Planned,
    tries: &mut u8,
) -> Result<Answer, ErrorKind> {
    match &shared.route {
        Route::Direct(addrs) if !addrs.is_empty() => {
            let cursor = &shared.cursors[client % shared.cursors.len()];
            let mut last = ErrorKind::Connect;
            for _ in 0..addrs.len() {
                let raw = cursor.load(Ordering::Relaxed);
                let i = raw % addrs.len();
                *tries = tries.saturating_add(1);
                match request(&shared.http, addrs[i], req).await {
                    Ok(answer) => return Ok(answer),
                    Err(kind) => {
                        last = kind;
                        // A refused connect never reached a server: safe to go elsewhere for
                        // any method; a broken connection only for an idempotent request.
                        if kind == ErrorKind::Connect || req.verb.idempotent() {
                            // Unless a concurrent request of this client moved it already.
                            let _ = cursor.compare_exchange(
                                raw,
                                (i + 1) % addrs.len(),
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        } else {
                            break;
                        }
                    }
                }
            }
            Err(last)
        }
        Route::Direct(_) => Err(ErrorKind::Connect),
        Route::Lookaside { admin, listener } => {
            let key = req.key.clone().unwrap_or_else(|| req.path.clone());
            let mut last = ErrorKind::Lookaside;
            for _ in 0..3 {
                *tries = tries.saturating_add(1);
                let Ok(pick) = pick(&shared.http, *admin, listener, &key).await else {
                    return Err(ErrorKind::Lookaside);
                };
                match request(&shared.http, pick.addr, req).await {
                    Ok(answer) => return Ok(answer),
                    Err(kind) => {
                        last = kind;
                        if kind != ErrorKind::Connect && !req.verb.idempotent() {
                            break;
                        }
                    }
                }
            }
            Err(last)
        }
    }
}

/// One HTTP exchange with `addr`, body read to the end.
async fn request(http: &HttpClient, addr: SocketAddr, req: &Planned) -> Result<Answer, ErrorKind> {
    let method = match req.verb {
        Verb::Get => Method::GET,
        Verb::Post => Method::POST,
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{}", req.path));
    if let Some(key) = &req.key {
        builder = builder.header(USER_KEY_HEADER, key.as_str());
    }
    if req.verb == Verb::Post {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(req.body.clone()))
        .map_err(|_| ErrorKind::Reset)?;
    let response = http.request(request).await.map_err(|e| {
        if e.is_connect() {
            ErrorKind::Connect
        } else {
            ErrorKind::Reset
        }
    })?;
    let status = response.status();
    let backend = response
        .headers()
        .get(SERVED_BY)
        .and_then(|v| v.to_str().ok())
        .map(Arc::from);
    response
        .into_body()
        .collect()
        .await
        .map_err(|_| ErrorKind::Reset)?;
    Ok((status, backend))
}

/// The admin endpoint's answer to `GET /pick`.
#[derive(Clone, Debug, Deserialize)]
pub struct PickAnswer {
    pub backend: String,
    pub id: u32,
}

/// A lookaside pick, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub addr: SocketAddr,
    pub id: u32,
}

/// Asks the proxy's admin endpoint which backend `listener` would use for `key`.
pub async fn pick(
    http: &HttpClient,
    admin: SocketAddr,
    listener: &str,
    key: &str,
) -> anyhow::Result<Pick> {
    let uri = format!(
        "http://{admin}/pick?listener={}&key={}",
        url_escape(listener),
        url_escape(key)
    );
    let (status, body) = get_text(http, &uri).await?;
    anyhow::ensure!(status.is_success(), "GET {uri}: {status}: {body}");
    let answer: PickAnswer = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("GET {uri}: unexpected answer {body:?}: {e}"))?;
    let addr = answer
        .backend
        .parse()
        .map_err(|e| anyhow::anyhow!("GET {uri}: backend {:?}: {e}", answer.backend))?;
    Ok(Pick {
        addr,
        id: answer.id,
    })
}

/// `GET uri` → (status, body as text).
pub async fn get_text(http: &HttpClient, uri: &str) -> anyhow::Result<(StatusCode, String)> {
    let request = Request::get(uri).body(Full::new(Bytes::new()))?;
    exchange(http, request).await
}

/// `POST uri` with a JSON body → (status, body as text).
pub async fn post_json(
    http: &HttpClient,
    uri: &str,
    body: &serde_json::Value,
) -> anyhow::Result<(StatusCode, String)> {
    let request = Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    exchange(http, request).await
}

async fn exchange(
    http: &HttpClient,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, String)> {
    let uri = request.uri().clone();
    let response = tokio::time::timeout(Duration::from_secs(10), http.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{uri}: no answer in 10 s"))?
        .map_err(|e| anyhow::anyhow!("{uri}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{uri}: reading the body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes everything but unreserved characters (keys and names are ASCII here).
fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(seed: u64) -> Workload {
        Workload {
            route: Route::Direct(Vec::new()),
            pacing: Pacing::Closed { clients: 1 },
            stop: Stop::Count(1),
            timeout: Duration::from_secs(1),
            post_share: 0.3,
            user_keys: Some(100),
            seed,
        }
    }

    #[test]
    fn the_mix_is_seeded_and_mixed() {
        let w = workload(7);
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..200)
                .map(|_| {
                    let p = plan(&mut rng, &w);
                    (p.verb, p.path, p.body, p.key)
                })
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let posts = a.iter().filter(|p| p.0 == Verb::Post).count();
        assert!((30..=90).contains(&posts), "{posts} POSTs of 200");
        assert!(a.iter().all(|p| (p.0 == Verb::Post) != p.2.is_empty()));
    }

    #[test]
    fn escapes_query_values() {
        assert_eq!(url_escape("user-1 a&b"), "user-1%20a%26b");
    }
}
