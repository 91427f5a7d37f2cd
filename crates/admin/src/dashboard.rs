//! The live dashboard on the admin listener: `GET /` (an operator page), `GET /assets/...`
//! (its script and style, embedded in the binary: no CDN, no build step) and `GET /events`,
//! a Server-Sent Events stream of one JSON snapshot per second.
//!
//! One producer per server samples the pools every second: request counters become rates
//! by difference, and each backend's latency window ([`Backend::take_latency_window`])
//! gives that interval's p50/p99 — so the producer must stay the windows' only reader. The
//! snapshot is serialised once and handed to every open page through a `watch` channel: a
//! slow browser skips snapshots instead of queueing them. The last five minutes are kept in
//! compact form, so a page opened (or reconnected) late draws its charts at once.
//!
//! What rarely changes (each listener's plugin description, the list of built-ins) is not in
//! the per-second snapshot: it goes as a `facts` event when a page connects and again only
//! when it changes (a plugin swap), so a page costs the same whatever a plugin says of itself.
//!
//! Nothing here changes state: the page's controls call the admin API like any client.
//! The page and assets hold no data and are served without a token; with a token
//! configured `/events` needs it like the API does ([`super::auth`]) — also as `?token=`,
//! since `EventSource` cannot send headers.
//!
//! Backends are shown from the same [`BackendReport`]s as `GET /backends`, read through
//! [`Control::listener_states`].
//!
//! [`Backend::take_latency_window`]: lbwasm_proxy::pool::Backend::take_latency_window

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::auth::{self, Also};
use super::reply::{Body, full};
use lbwasm_plugin_host::StatsSnapshot;
use lbwasm_proxy::serve::{BackendReport, Control, ListenerState};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Time between snapshots.
const PERIOD: Duration = Duration::from_secs(1);

/// Snapshots kept for the charts: five minutes.
const HISTORY: usize = 300;

/// The page only talks to its own origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard of one server: the producer's latest snapshot and history.
pub(super) struct Dashboard {
    control: Arc<Control>,
    latest: watch::Sender<Bytes>,
    /// The latest `facts` event.
    facts: watch::Sender<Bytes>,
    /// Each listener's name and points, in configuration order.
    history: Mutex<Vec<(String, VecDeque<Point>)>>,
}

impl Dashboard {
    /// Starts the producer on the current tokio runtime; it stops when the dashboard is
    /// dropped.
    pub(super) fn start(control: Arc<Control>) -> Arc<Self> {
        let (latest, _) = watch::channel(Bytes::new());
        let (facts, _) = watch::channel(Bytes::new());
        let dashboard = Arc::new(Dashboard {
            control,
            latest,
            facts,
            history: Mutex::new(Vec::new()),
        });
        tokio::spawn(produce(Arc::downgrade(&dashboard)));
        dashboard
    }

    /// Answers the dashboard's own paths; `None` for everything else (the admin API's).
    pub(super) fn route<B>(&self, req: &Request<B>, token: Option<&str>) -> Option<Response<Body>> {
        if req.method() != Method::GET {
            return None;
        }
        let res = match req.uri().path() {
            "/" | "/index.html" => asset(INDEX_HTML, "text/html; charset=utf-8"),
            "/assets/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
            "/assets/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
            "/events" => match token.and_then(|t| auth::refuse(req, t, Also::Query)) {
                Some(refused) => refused,
                None => self.events(),
            },
            _ => return None,
        };
        Some(res)
    }

    /// The event stream: reconnect delay, history, the facts, the latest snapshot, then each
    /// new snapshot, and the facts again whenever they change.
    fn events(&self) -> Response<Body> {
        let mut rx = self.latest.subscribe();
        let mut facts = self.facts.subscribe();
        let mut head = format!(
            "retry: 1000\n\nevent: history\ndata: {}\n\n",
            self.history_json()
        );
        head.push_str(&String::from_utf8_lossy(&facts.borrow_and_update()));
        head.push_str(&String::from_utf8_lossy(&rx.borrow_and_update()));
        let frames = futures_util::stream::unfold(
            (rx, facts, Some(Bytes::from(head))),
            |(mut rx, mut facts, head)| async move {
                if let Some(head) = head {
                    return Some((Ok::<_, Infallible>(Frame::data(head)), (rx, facts, None)));
                }
                // Ends when the producer stops; a closed page ends it at the next write.
                // Facts first: the producer publishes them before the snapshot using them.
                let next = tokio::select! {
                    biased;
                    changed = facts.changed() => {
                        changed.ok()?;
                        facts.borrow_and_update().clone()
                    }
                    changed = rx.changed() => {
                        changed.ok()?;
                        rx.borrow_and_update().clone()
                    }
                };
                Some((Ok(Frame::data(next)), (rx, facts, None)))
            },
        );
        let mut res = Response::new(StreamBody::new(frames).boxed_unsync());
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        res
    }

    fn history_json(&self) -> String {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_name = Map::new();
        for (name, points) in history.iter() {
            by_name.insert(name.clone(), json!(points));
        }
        Value::Object(by_name).to_string()
    }

    fn remember(&self, snapshot: &Snapshot) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.resize_with(snapshot.listeners.len(), Default::default);
        for ((name, points), l) in history.iter_mut().zip(&snapshot.listeners) {
            if *name != l.name {
                name.clone_from(&l.name);
            }
            if points.len() == HISTORY {
                points.pop_front();
            }
            points.push_back(Point {
                t: snapshot.t_ms,
                rps: l.rps,
                p50: l.p50_us,
                p99: l.p99_us,
                share: l.backends.iter().map(|b| (b.id, b.share)).collect(),
            });
        }
    }
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(full(text));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small, and must follow the binary on upgrade: revalidate every time.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

/// Samples every [`PERIOD`] while the dashboard lives.
async fn produce(dashboard: Weak<Dashboard>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler = Sampler::default();
    let mut last_facts = String::new();
    loop {
        tick.tick().await;
        let Some(d) = dashboard.upgrade() else { return };
        let facts = facts_json(&d.control);
        if facts != last_facts {
            d.facts
                .send_replace(Bytes::from(format!("event: facts\ndata: {facts}\n\n")));
            last_facts = facts;
        }
        let snapshot = sampler.sample(&d.control);
        d.remember(&snapshot);
        match serde_json::to_string(&snapshot) {
            Ok(text) => {
                d.latest
                    .send_replace(Bytes::from(format!("data: {text}\n\n")));
            }
            Err(error) => tracing::warn!(%error, "dashboard: cannot serialise a snapshot"),
        }
    }
}

/// What the page is told once (and again when it changes): the built-in plugins, and each
/// listener's plugin with its description (at most [`lbwasm_plugin_host::MAX_DESCRIPTION`] bytes).
fn facts_json(control: &Control) -> String {
    json!({
        "builtins": lbwasm_plugin_host::builtin::names().collect::<Vec<_>>(),
        "listeners": control.plugins(),
    })
    .to_string()
}

/// One second of the whole server, as sent to the page.
#[derive(Serialize)]
struct Snapshot {
    /// Unix time, ms.
    t_ms: u64,
    /// Since the previous snapshot (0 on the first).
    interval_ms: u64,
    listeners: Vec<ListenerTick>,
}

#[derive(Serialize)]
struct ListenerTick {
    name: String,
    listen: String,
    protocol: String,
    healthy: usize,
    rps: f64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    plugin: PluginTick,
    backends: Vec<BackendTick>,
    /// A TLS listener's certificates; absent in cleartext.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Vec<lbwasm_proxy::tls::CertInfo>>,
}

#[derive(Serialize)]
struct PluginTick {
    name: String,
    calls_per_s: f64,
    #[serde(flatten)]
    stats: StatsSnapshot,
}

#[derive(Serialize)]
struct BackendTick {
    id: u32,
    address: String,
    weight: u32,
    status: &'static str,
    healthy: bool,
    in_flight: u32,
    requests: u64,
    failures: u64,
    rps: f64,
    /// Of the listener's requests in the interval, 0..=1.
    share: f64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    /// The peak-EWMA plugins see.
    ewma_us: u32,
    cpu_percent: Option<f32>,
    memory_percent: Option<f32>,
}

impl BackendTick {
    /// The page's view of `r`, with the interval's figures.
    fn new(r: BackendReport, rps: f64, p50_us: Option<u64>, p99_us: Option<u64>) -> Self {
        BackendTick {
            status: r.status(),
            id: r.id,
            address: r.address,
            weight: r.weight,
            healthy: r.healthy,
            in_flight: r.in_flight,
            requests: r.requests,
            failures: r.failures,
            rps,
            share: 0.0,
            p50_us,
            p99_us,
            ewma_us: r.latency_us,
            cpu_percent: r.cpu_percent,
            memory_percent: r.memory_percent,
        }
    }
}

/// A listener's second in the charts' history: `share` is `[backend id, share]` pairs.
#[derive(Clone, Serialize)]
struct Point {
    t: u64,
    rps: f64,
    p50: Option<u64>,
    p99: Option<u64>,
    share: Vec<(u32, f64)>,
}

/// Counters at the previous sample, to turn them into rates.
#[derive(Default)]
struct Sampler {
    at: Option<Instant>,
    /// Backend id → completed requests.
    requests: HashMap<u32, u64>,
    /// Listener index → (plugin identity, calls): a swapped plugin starts from zero.
    calls: HashMap<usize, (usize, u64)>,
}

impl Sampler {
    fn sample(&mut self, control: &Control) -> Snapshot {
        let now = Instant::now();
        let secs = self
            .at
            .map(|at| now.saturating_duration_since(at).as_secs_f64());
        self.at = Some(now);
        let mut requests = HashMap::with_capacity(self.requests.len());
        let mut listeners = Vec::new();
        for (index, state) in control.listener_states().enumerate() {
            let ListenerState {
                report: l,
                backends: live,
                plugin,
            } = state;
            let mut merged: Option<Histogram<u64>> = None;
            let mut backends = Vec::with_capacity(l.backends.len());
            for (r, b) in l.backends.into_iter().zip(&live) {
                let delta = self
                    .requests
                    .get(&r.id)
                    .map(|&prev| r.requests.saturating_sub(prev));
                requests.insert(r.id, r.requests);
                let window = b.take_latency_window();
                let (p50_us, p99_us) = percentiles(window.as_ref());
                if let Some(w) = window {
                    match &mut merged {
                        // Same bounds for every window: adding cannot fail.
                        Some(m) => {
                            let _ = m.add(&w);
                        }
                        None => merged = Some(w),
                    }
                }
                backends.push(BackendTick::new(r, rate(delta, secs), p50_us, p99_us));
            }
            let rps: f64 = backends.iter().map(|b| b.rps).sum();
            if rps > 0.0 {
                for b in &mut backends {
                    b.share = round(b.rps / rps, 1e4);
                }
            }
            let stats = plugin.stats();
            let identity = Arc::as_ptr(&plugin) as usize;
            let calls = match self.calls.insert(index, (identity, stats.calls)) {
                Some((same, prev)) if same == identity => Some(stats.calls.saturating_sub(prev)),
                Some(_) => Some(stats.calls),
                None => None,
            };
            let (p50_us, p99_us) = percentiles(merged.as_ref());
            listeners.push(ListenerTick {
                name: l.name,
                listen: l.listen.to_string(),
                protocol: l.protocol,
                tls: l.tls,
                healthy: l.healthy,
                rps: round(rps, 10.0),
                p50_us,
                p99_us,
                plugin: PluginTick {
                    name: l.plugin,
                    calls_per_s: rate(calls, secs),
                    stats,
                },
                backends,
            });
        }
        self.requests = requests;
        let t_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Snapshot {
            t_ms,
            interval_ms: secs.map_or(0, |s| (s * 1000.0).round() as u64),
            listeners,
        }
    }
}

/// Events per second, to 0.1; 0 without a previous sample.
fn rate(delta: Option<u64>, secs: Option<f64>) -> f64 {
    match (delta, secs) {
        (Some(d), Some(s)) if s > 0.0 => round(d as f64 / s, 10.0),
        _ => 0.0,
    }
}

fn round(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

/// p50 and p99 of a window, none when it is empty.
fn percentiles(h: Option<&Histogram<u64>>) -> (Option<u64>, Option<u64>) {
    match h {
        Some(h) if !h.is_empty() => (
            Some(h.value_at_quantile(0.5)),
            Some(h.value_at_quantile(0.99)),
        ),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_proxy::pool::{Backend, InFlight};

    #[test]
    fn rates_need_a_previous_sample() {
        assert_eq!(rate(None, Some(1.0)), 0.0);
        assert_eq!(rate(Some(10), None), 0.0);
        assert_eq!(rate(Some(10), Some(0.0)), 0.0);
        assert_eq!(rate(Some(15), Some(2.0)), 7.5);
        assert_eq!(rate(Some(1), Some(3.0)), 0.3);
    }

    #[test]
    fn latency_window_gives_interval_percentiles_and_restarts() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, 0);
        for ms in 1..=100 {
            InFlight::start(b.clone()).finish(true, Some(Duration::from_millis(ms)), 0);
        }
        let w = b.take_latency_window().unwrap();
        let (p50, p99) = percentiles(Some(&w));
        assert!((49_000..=51_000).contains(&p50.unwrap()), "{p50:?}");
        assert!((98_000..=100_000).contains(&p99.unwrap()), "{p99:?}");
        assert_eq!(
            percentiles(b.take_latency_window().as_ref()),
            (None, None),
            "a new window"
        );
    }

    #[test]
    fn assets_are_embedded_and_reference_each_other() {
        assert!(INDEX_HTML.contains("/assets/app.js") && INDEX_HTML.contains("/assets/style.css"));
        assert!(APP_JS.contains("EventSource"));
        assert!(
            !INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"),
            "no network"
        );
    }
}
