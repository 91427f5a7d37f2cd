//! Prometheus metrics: per-worker shards written on the hot path, summed and rendered in
//! the text exposition format at scrape time.
//!
//! Each worker owns a [`WorkerShard`] with one uncontended mutex per listener: recording a
//! request is one lock of a cache line no other core writes (no shared atomic per request).
//! Gauges (in-flight, health) and plugin counters are not kept here: they are read from the
//! pools and plugins when `/metrics` is scraped. This module knows nothing of sockets.

pub mod dns;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pool::Pool;
use lbwasm_plugin_host::{CHOOSE_BUCKETS_NS, Plugin, StatsSnapshot};

/// Upper bounds of the request-duration histogram, seconds (Prometheus client defaults,
/// extended down to 0.5 ms: a proxied request on loopback takes ~100 µs).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Reads one plugin counter.
type Counter = fn(&StatsSnapshot) -> u64;

/// The code label of a TCP connection that reached a backend.
pub const TCP_OK: u16 = 0;

/// Every worker's shards, for the scrape.
pub struct Metrics {
    listeners: usize,
    shards: Mutex<Vec<Arc<WorkerShard>>>,
}

/// One worker's counters, one slot per listener.
pub struct WorkerShard {
    listeners: Vec<Mutex<ListenerShard>>,
}

/// Counters of one listener on one worker.
#[derive(Clone, Default)]
struct ListenerShard {
    /// (backend, code, count); a handful of entries, so a linear scan beats hashing.
    requests: Vec<(Option<SocketAddr>, u16, u64)>,
    buckets: [u64; BUCKETS.len() + 1],
    sum_seconds: f64,
    count: u64,
    retries: u64,
    /// (reason, count): requests the proxy refused itself, or that failed by the client's
    /// doing; a handful of reasons.
    refused: Vec<(&'static str, u64)>,
    /// In-band load reports (ORCA) on backend responses: [taken, refused as malformed].
    load_reports: [u64; 2],
    /// gRPC calls by `grpc-status` (0..=16; 17: a value outside the spec's codes).
    grpc: [u64; GRPC_CODES + 1],
}

/// gRPC's status codes, OK (0) to UNAUTHENTICATED (16).
const GRPC_CODES: usize = 17;

/// What the scrape reads of a listener besides the shards.
pub struct ListenerStatus<'a> {
    /// Listener name (the `listener` label).
    pub name: &'a str,
    /// Its pool (in-flight and health gauges).
    pub pool: &'a Pool,
    /// Its current plugin (call, fault and fallback counters).
    pub plugin: &'a Plugin,
    /// Its TLS termination (handshake counters), if any.
    pub tls: Option<&'a crate::tls::Terminator>,
}

impl Metrics {
    /// Metrics for `listeners` listeners (in config order).
    pub fn new(listeners: usize) -> Arc<Self> {
        Arc::new(Metrics {
            listeners,
            shards: Mutex::new(Vec::new()),
        })
    }

    /// A new shard for one worker.
    pub fn shard(&self) -> Arc<WorkerShard> {
        let shard = Arc::new(WorkerShard {
            listeners: (0..self.listeners)
                .map(|_| Mutex::new(ListenerShard::default()))
                .collect(),
        });
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shard.clone());
        shard
    }

    fn sum(&self, listener: usize) -> ListenerShard {
        let mut total = ListenerShard::default();
        for shard in self.shards.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let Some(slot) = shard.listeners.get(listener) else {
                continue;
            };
            let s = slot.lock().unwrap_or_else(|e| e.into_inner());
            for &(backend, code, n) in &s.requests {
                match total
                    .requests
                    .iter_mut()
                    .find(|(b, c, _)| *b == backend && *c == code)
                {
                    Some(e) => e.2 += n,
                    None => total.requests.push((backend, code, n)),
                }
            }
            for (t, b) in total.buckets.iter_mut().zip(s.buckets.iter()) {
                *t += b;
            }
            total.sum_seconds += s.sum_seconds;
            total.count += s.count;
            total.retries += s.retries;
            for (t, n) in total.load_reports.iter_mut().zip(s.load_reports) {
                *t += n;
            }
            for (t, n) in total.grpc.iter_mut().zip(s.grpc) {
                *t += n;
            }
            for &(reason, n) in &s.refused {
                match total.refused.iter_mut().find(|(r, _)| *r == reason) {
                    Some(e) => e.1 += n,
                    None => total.refused.push((reason, n)),
                }
            }
        }
        total.requests.sort_by_key(|a| (a.0, a.1));
        total
    }

    /// The text exposition of everything, listeners in `status` order (the config order
    /// the shards were made with).
    pub fn render(&self, status: &[ListenerStatus<'_>]) -> String {
        let sums: Vec<ListenerShard> = (0..status.len()).map(|i| self.sum(i)).collect();
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "lbwasm_requests_total",
            "counter",
            "Requests (HTTP) or connections (TCP, code=\"tcp\") answered, by backend and status code.",
        );
        for (st, sum) in status.iter().zip(&sums) {
            for (backend, code, n) in &sum.requests {
                let backend = backend.map_or_else(|| "none".to_string(), |a| a.to_string());
                let code = if *code == TCP_OK {
                    "tcp".to_string()
                } else {
                    code.to_string()
                };
                let _ = writeln!(
                    out,
                    "lbwasm_requests_total{{listener=\"{}\",backend=\"{}\",code=\"{}\"}} {n}",
                    esc(st.name),
                    esc(&backend),
                    code
                );
            }
        }
        header(
            &mut out,
            "lbwasm_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response head (TCP: to the backend connect).",
        );
        for (st, sum) in status.iter().zip(&sums) {
            let name = esc(st.name);
            let mut cumulative = 0;
            for (le, n) in BUCKETS.iter().zip(sum.buckets.iter()) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "lbwasm_request_duration_seconds_bucket{{listener=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "lbwasm_request_duration_seconds_bucket{{listener=\"{name}\",le=\"+Inf\"}} {}",
                sum.count
            );
            let _ = writeln!(
                out,
                "lbwasm_request_duration_seconds_sum{{listener=\"{name}\"}} {}",
                sum.sum_seconds
            );
            let _ = writeln!(
                out,
                "lbwasm_request_duration_seconds_count{{listener=\"{name}\"}} {}",
                sum.count
            );
        }
        header(
            &mut out,
            "lbwasm_retries_total",
            "counter",
            "Attempts retried on another backend.",
        );
        for (st, sum) in status.iter().zip(&sums) {
            let _ = writeln!(
                out,
                "lbwasm_retries_total{{listener=\"{}\"}} {}",
                esc(st.name),
                sum.retries
            );
        }
        header(
            &mut out,
            "lbwasm_requests_refused_total",
            "counter",
            "Requests refused by the proxy itself or failed by the client (bad framing, \
             oversized head, a body cut short or stalled), by reason; never counted \
             against a backend.",
        );
        for (st, sum) in status.iter().zip(&sums) {
            let mut refused = sum.refused.clone();
            refused.sort_unstable();
            for (reason, n) in refused {
                let _ = writeln!(
                    out,
                    "lbwasm_requests_refused_total{{listener=\"{}\",reason=\"{reason}\"}} {n}",
                    esc(st.name),
                );
            }
        }
        header(
            &mut out,
            "lbwasm_load_reports_total",
            "counter",
            "Load reports received from backends, by source (inband: ORCA endpoint-load-metrics \
             on responses) and result (ok: taken; invalid: malformed, ignored).",
        );
        for (st, sum) in status.iter().zip(&sums) {
            for (result, n) in ["ok", "invalid"].iter().zip(sum.load_reports) {
                let _ = writeln!(
                    out,
                    "lbwasm_load_reports_total{{listener=\"{}\",source=\"inband\",result=\"{result}\"}} {n}",
                    esc(st.name),
                );
            }
        }
        header(
            &mut out,
            "lbwasm_grpc_calls_total",
            "counter",
            "gRPC calls answered, by grpc-status (from the backend's trailers, or the proxy's \
             own Trailers-Only answer; \"other\": a code outside 0-16).",
        );
        for (st, sum) in status.iter().zip(&sums) {
            for (code, n) in sum.grpc.iter().enumerate().filter(|(_, n)| **n > 0) {
                let label = if code < GRPC_CODES {
                    code.to_string()
                } else {
                    "other".to_owned()
                };
                let _ = writeln!(
                    out,
                    "lbwasm_grpc_calls_total{{listener=\"{}\",grpc_status=\"{label}\"}} {n}",
                    esc(st.name),
                );
            }
        }
        header(
            &mut out,
            "lbwasm_tls_handshakes_total",
            "counter",
            "TLS handshakes completed on a listener, by protocol version and ALPN protocol.",
        );
        for st in status {
            let Some(tls) = st.tls else { continue };
            for (version, alpn, n) in tls.handshakes.completed() {
                let _ = writeln!(
                    out,
                    "lbwasm_tls_handshakes_total{{listener=\"{}\",version=\"{version}\",alpn=\"{alpn}\"}} {n}",
                    esc(st.name),
                );
            }
        }
        header(
            &mut out,
            "lbwasm_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed, by reason (not_tls: cleartext to a TLS port; \
             incompatible: no common version, cipher or ALPN; unknown_name: an SNI no \
             certificate serves, refused; client_alert: the client refused ours; closed: \
             gone or too slow).",
        );
        for st in status {
            let Some(tls) = st.tls else { continue };
            for (reason, n) in tls.handshakes.failed() {
                let _ = writeln!(
                    out,
                    "lbwasm_tls_handshake_failures_total{{listener=\"{}\",reason=\"{reason}\"}} {n}",
                    esc(st.name),
                );
            }
        }
        header(
            &mut out,
            "lbwasm_tls_certificate_expiry_seconds",
            "gauge",
            "When each certificate a listener serves expires (notAfter, Unix time).",
        );
        for st in status {
            let Some(tls) = st.tls else { continue };
            for c in tls.certificates() {
                let _ = writeln!(
                    out,
                    "lbwasm_tls_certificate_expiry_seconds{{listener=\"{}\",serial=\"{}\"}} {}",
                    esc(st.name),
                    esc(&c.serial),
                    c.not_after_unix
                );
            }
        }
        header(
            &mut out,
            "lbwasm_backend_in_flight",
            "gauge",
            "Requests or connections in flight to a backend.",
        );
        for st in status {
            for b in st.pool.snapshot().backends() {
                let _ = writeln!(
                    out,
                    "lbwasm_backend_in_flight{{listener=\"{}\",backend=\"{}\"}} {}",
                    esc(st.name),
                    b.address(),
                    b.in_flight()
                );
            }
        }
        header(
            &mut out,
            "lbwasm_backend_healthy",
            "gauge",
            "1 when a backend may take new requests (checks, ejection, drain).",
        );
        for st in status {
            let snap = st.pool.snapshot();
            for info in snap.infos() {
                let _ = writeln!(
                    out,
                    "lbwasm_backend_healthy{{listener=\"{}\",backend=\"{}\"}} {}",
                    esc(st.name),
                    info.address,
                    u8::from(info.healthy)
                );
            }
        }
        let stats: Vec<StatsSnapshot> = status.iter().map(|s| s.plugin.stats()).collect();
        let plugin_counters: [(&str, &str, Counter); 13] = [
            (
                "lbwasm_plugin_calls_total",
                "Calls to the plugin's choose.",
                |s| s.calls,
            ),
            (
                "lbwasm_plugin_timeouts_total",
                "Plugin calls interrupted by the deadline.",
                |s| s.timeouts,
            ),
            (
                "lbwasm_plugin_traps_total",
                "Plugin calls that trapped.",
                |s| s.traps,
            ),
            (
                "lbwasm_plugin_fallbacks_total",
                "Picks made by the native fallback instead of the plugin.",
                |s| s.fallbacks,
            ),
            (
                "lbwasm_plugin_bad_answers_total",
                "Plugin answers refused (out of range, unhealthy).",
                |s| s.bad_answers,
            ),
            (
                "lbwasm_plugin_refusals_total",
                "Calls where the plugin found no backend.",
                |s| s.refusals,
            ),
            (
                "lbwasm_plugin_reinstantiations_total",
                "Plugin instances replaced after a fault.",
                |s| s.reinstantiations,
            ),
            (
                "lbwasm_plugin_instantiation_failures_total",
                "Failed attempts to make a plugin instance on a worker (it used the native fallback meanwhile).",
                |s| s.instantiation_failures,
            ),
            (
                "lbwasm_plugin_rebuilds_started_total",
                "Plugin instances built off the request path after a slow pool update.",
                |s| s.rebuilds_started,
            ),
            (
                "lbwasm_plugin_rebuilds_swapped_total",
                "Instances built off the request path that replaced the one in use.",
                |s| s.rebuilds_swapped,
            ),
            (
                "lbwasm_plugin_rebuilds_discarded_total",
                "Instances built off the request path and dropped: the pool had changed back.",
                |s| s.rebuilds_discarded,
            ),
            (
                "lbwasm_plugin_rebuilds_failed_total",
                "Instances built off the request path that failed (trap, deadline, refusal).",
                |s| s.rebuilds_failed,
            ),
            (
                "lbwasm_plugin_stale_calls_total",
                "Picks answered from an older server list while a rebuild was under way.",
                |s| s.stale_calls,
            ),
        ];
        for (name, help, get) in plugin_counters {
            header(&mut out, name, "counter", help);
            for (st, s) in status.iter().zip(&stats) {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",plugin=\"{}\"}} {}",
                    esc(st.name),
                    esc(st.plugin.name()),
                    get(s)
                );
            }
        }
        render_choose_histogram(&mut out, status);
        out
    }
}

/// `lbwasm_plugin_choose_duration_seconds`: the time each `choose` took, by listener.
fn render_choose_histogram(out: &mut String, status: &[ListenerStatus<'_>]) {
    header(
        out,
        "lbwasm_plugin_choose_duration_seconds",
        "histogram",
        "Time spent in the plugin's choose per call (a slow plugin limits each worker's requests per second).",
    );
    for st in status {
        let h = st.plugin.choose_histogram();
        let labels = format!(
            "listener=\"{}\",plugin=\"{}\"",
            esc(st.name),
            esc(st.plugin.name())
        );
        let mut cumulative = 0;
        for (le_ns, n) in CHOOSE_BUCKETS_NS.iter().zip(h.buckets.iter()) {
            cumulative += n;
            let _ = writeln!(
                out,
                "lbwasm_plugin_choose_duration_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                *le_ns as f64 / 1e9
            );
        }
        let _ = writeln!(
            out,
            "lbwasm_plugin_choose_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            h.count()
        );
        let _ = writeln!(
            out,
            "lbwasm_plugin_choose_duration_seconds_sum{{{labels}}} {}",
            h.sum_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "lbwasm_plugin_choose_duration_seconds_count{{{labels}}} {}",
            h.count()
        );
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escaped as the text format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl WorkerShard {
    /// Records one answered request (or TCP connection, `code` [`TCP_OK`]).
    pub fn record(
        &self,
        listener: usize,
        backend: Option<SocketAddr>,
        code: u16,
        elapsed: Duration,
    ) {
        let Some(slot) = self.listeners.get(listener) else {
            return;
        };
        let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
        match s
            .requests
            .iter_mut()
            .find(|(b, c, _)| *b == backend && *c == code)
        {
            Some(e) => e.2 += 1,
            None => s.requests.push((backend, code, 1)),
        }
        let secs = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        s.buckets[bucket] += 1;
        s.sum_seconds += secs;
        s.count += 1;
    }

    /// Counts a request refused for `reason` (see `lbwasm_requests_refused_total`).
    pub fn refused(&self, listener: usize, reason: &'static str) {
        if let Some(slot) = self.listeners.get(listener) {
            let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
            match s.refused.iter_mut().find(|(r, _)| *r == reason) {
                Some(e) => e.1 += 1,
                None => s.refused.push((reason, 1)),
            }
        }
    }

    /// Counts an in-band load report on a backend response: `ok`, or malformed (ignored).
    pub fn load_report(&self, listener: usize, ok: bool) {
        if let Some(slot) = self.listeners.get(listener) {
            slot.lock().unwrap_or_else(|e| e.into_inner()).load_reports[usize::from(!ok)] += 1;
        }
    }

    /// Counts a gRPC call that ended with `grpc-status` `code` (its text, as it came).
    pub fn grpc_status(&self, listener: usize, code: &[u8]) {
        let code = std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .filter(|c| *c < GRPC_CODES)
            .unwrap_or(GRPC_CODES);
        if let Some(slot) = self.listeners.get(listener) {
            slot.lock().unwrap_or_else(|e| e.into_inner()).grpc[code] += 1;
        }
    }

    /// Counts a retry.
    pub fn retry(&self, listener: usize) {
        if let Some(slot) = self.listeners.get(listener) {
            slot.lock().unwrap_or_else(|e| e.into_inner()).retries += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_summed_and_buckets_cumulated() {
        let m = Metrics::new(1);
        let a = m.shard();
        let b = m.shard();
        let be: SocketAddr = "127.0.0.1:9101".parse().unwrap();
        a.record(0, Some(be), 200, Duration::from_micros(300));
        b.record(0, Some(be), 200, Duration::from_millis(3));
        b.record(0, None, 503, Duration::from_micros(10));
        a.retry(0);
        a.load_report(0, true);
        b.load_report(0, true);
        b.load_report(0, false);
        let s = m.sum(0);
        assert_eq!(s.load_reports, [2, 1]);
        assert_eq!(s.requests, vec![(None, 503, 1), (Some(be), 200, 2)]);
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[3], 1);
        assert_eq!(s.retries, 1);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c"), "a\\\"b\\\\c");
    }
}
