//! What a plugin can ask the proxy during `choose`: live load, request details, shared counters.

use std::borrow::Cow;

/// Live figures of one backend (mirrors the WIT `server-load`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServerLoad {
    /// Requests or connections this proxy has in flight to the backend.
    pub in_flight: u32,
    /// Peak-EWMA latency in µs; 0 until the first sample.
    pub latency_us: u32,
    /// Completed requests since the backend joined.
    pub requests: u64,
    /// Failed requests since the backend joined.
    pub failures: u64,
}

/// The listener's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 requests.
    #[default]
    Http,
    /// Plain TCP connections.
    Tcp,
}

/// The proxy, as seen from `choose`. On wasm every method is one host call, so read each
/// figure once per `choose` and only the ones the algorithm needs.
pub trait Host {
    /// This request's number in the sequence of `choose` calls of this plugin, shared by
    /// every worker thread (0, 1, 2…): a global rotation is `sequence % n`. Free to read (it
    /// is the call's argument, not a host call).
    fn sequence(&self) -> u64;
    /// In-flight count of every server, indexed like the pool. Borrowed when the counts came
    /// as arguments of `choose` (pools of up to 16 servers): then reading them allocates
    /// nothing and calls nothing; owned when they had to be fetched with a host call.
    fn in_flight(&self) -> Cow<'_, [u32]>;
    /// Peak-EWMA latency (µs, 0 = unknown) of every server.
    fn latency_us(&self) -> Vec<u32>;
    /// Every live figure of one server.
    fn server_load(&self, index: u32) -> ServerLoad;
    /// Host monotonic milliseconds.
    fn now_ms(&self) -> u64;
    /// HTTP or TCP.
    fn protocol(&self) -> Protocol;
    /// HTTP method, empty for TCP.
    fn method(&self) -> String;
    /// Path and query, empty for TCP.
    fn path(&self) -> String;
    /// First value of a request header.
    fn header(&self, name: &str) -> Option<String>;
    /// Client IP address without port.
    fn client_ip(&self) -> String;
    /// The hash key configured on the listener, resolved by the proxy.
    fn hash_key(&self) -> Option<String>;
    /// 0 on the first try, n on the n-th retry.
    fn attempt(&self) -> u32;
    /// A further counter shared by all instances: returns the value, then adds one.
    fn next(&self, counter: u8) -> u64;
    /// Adds to a shared counter, returns the new value.
    fn add(&self, counter: u8, delta: i64) -> i64;
    /// Reads a shared counter.
    fn get(&self, counter: u8) -> i64;
}
