//! The wasm plugin runtime: loads balancing components, runs them sandboxed, and turns their
//! answers into a pick the proxy can trust.
//!
//! - [`Runtime`] owns the wasmtime engine (epoch interruption, pooling allocator, no WASI) and
//!   the on-disk cache of compiled plugins.
//! - [`Plugin`] is one loaded, validated component with its options: shared by all workers.
//! - [`Selector`] is one worker's instance of a plugin. It pushes the pool when it changes,
//!   calls `choose`, checks the answer (range, health, connection limit), and on a trap, a
//!   timeout or a bad answer replaces the instance and falls back to a native pick.
//!
//! WIT types stop here: the proxy talks to this module in [`ServerInfo`], [`ServerLoad`],
//! [`RequestInfo`] and [`PoolView`].

mod bindings;
pub mod builtin;
mod cache;
mod component;
pub mod inspect;
mod instance;
mod load;
mod rebuild;
mod runtime;
mod selector;
mod static_pool;
mod stats;
mod store;
mod types_text;

pub use component::{Plugin, PluginSource};
pub use load::MAX_DESCRIPTION;
pub use rebuild::RebuildStats;
pub use runtime::{Runtime, RuntimeConfig};
pub use selector::{DEFAULT_BUDGET, Fault, Pick, PickSource, Selector};
pub use static_pool::StaticPool;
pub use stats::{CHOOSE_BUCKETS_NS, ChooseHistogram, PluginStats, StatsSnapshot};

use http::{Method, Uri};

use lbwasm_http::fields::Fields;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Instant;

/// A backend as pushed to plugins (host side of the WIT `server` record).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerInfo {
    /// Stable id, never reused in the pool.
    pub id: u32,
    /// `host:port`.
    pub address: String,
    /// Configured weight, >= 1.
    pub weight: u32,
    /// Healthy as far as the proxy knows (checks, ejection, drain).
    pub healthy: bool,
    /// Connection limit, 0 = none.
    pub max_connections: u32,
    /// Slow-start factor 0..=1.
    pub warmup: f32,
    /// Backend-reported CPU %.
    pub cpu_percent: Option<f32>,
    /// Backend-reported memory %.
    pub memory_percent: Option<f32>,
    /// Backend-reported connections.
    pub backend_connections: Option<u32>,
    /// Number of load reports received.
    pub load_sample: u64,
    /// [`clock_ms`] of the latest report.
    pub load_sampled_at_ms: u64,
}

impl ServerInfo {
    /// A healthy backend with weight 1 and no reports.
    pub fn new(id: u32, address: impl Into<String>) -> Self {
        ServerInfo {
            id,
            address: address.into(),
            weight: 1,
            healthy: true,
            max_connections: 0,
            warmup: 1.0,
            cpu_percent: None,
            memory_percent: None,
            backend_connections: None,
            load_sample: 0,
            load_sampled_at_ms: 0,
        }
    }
}

/// Live figures of one backend (host side of the WIT `server-load`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerLoad {
    /// Requests or connections in flight.
    pub in_flight: u32,
    /// Peak-EWMA latency, µs (0 = no sample).
    pub latency_us: u32,
    /// Completed requests.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
}

/// What a plugin sees of the pool; the proxy's pool snapshot implements it.
///
/// `servers` is read only when `generation` changes; the rest is read live during `choose`.
pub trait PoolView: Send + Sync {
    /// Identifies this view's server list; a different list must have a different number
    /// (take it from a process-wide counter).
    fn generation(&self) -> u64;
    /// The server list, in index order.
    fn servers(&self) -> Vec<ServerInfo>;
    /// Number of servers.
    fn len(&self) -> usize;
    /// True when the pool is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Live figures of server `index` (< `len()`).
    fn load(&self, index: usize) -> ServerLoad;
    /// In-flight count of every server, appended to `out`.
    fn in_flight_column(&self, out: &mut Vec<u32>) {
        out.extend((0..self.len()).map(|i| self.load(i).in_flight));
    }
    /// In-flight counts of the first `out.len()` servers (the rest of `out` untouched).
    fn in_flight_prefix(&self, out: &mut [u32]) {
        for (i, slot) in out.iter_mut().enumerate().take(self.len()) {
            *slot = self.load(i).in_flight;
        }
    }
    /// Latency of every server, appended to `out`.
    fn latency_column(&self, out: &mut Vec<u32>) {
        out.extend((0..self.len()).map(|i| self.load(i).latency_us));
    }
}

/// The listener's protocol, as told to plugins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP requests.
    #[default]
    Http,
    /// TCP connections.
    Tcp,
}

/// The request being balanced. The proxy moves its method, URI and headers in (no copy) and
/// takes them back after the pick.
#[derive(Debug)]
pub struct RequestInfo {
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// Method (GET for TCP).
    pub method: Method,
    /// URI (`/` for TCP).
    pub uri: Uri,
    /// Request headers (empty for TCP).
    pub headers: Fields,
    /// Client address.
    pub client_ip: IpAddr,
    /// The listener's hash key, resolved by the proxy.
    pub hash_key: Option<String>,
    /// 0 on the first try, n on the n-th retry.
    pub attempt: u32,
}

impl Default for RequestInfo {
    fn default() -> Self {
        RequestInfo {
            protocol: Protocol::Http,
            method: Method::GET,
            uri: Uri::from_static("/"),
            headers: Fields::default(),
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            hash_key: None,
            attempt: 0,
        }
    }
}

/// wasmtime 48's error type is not `std::error::Error` (without its `anyhow` feature, which
/// would mean building wasmtime twice), so convert at the edge, keeping the whole chain.
pub(crate) fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// Milliseconds on the process's monotonic clock: the clock plugins see as `now-ms`.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
