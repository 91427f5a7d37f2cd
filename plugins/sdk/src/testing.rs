//! A [`Host`] for native unit tests of plugin logic: set the figures, call `choose`.

use crate::host::{Host, Protocol, ServerLoad};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// An in-memory host. Shared counters are plain cells: one `MockHost` stands for one proxy.
#[derive(Default)]
pub struct MockHost {
    /// Per-server live figures, indexed like the pool.
    pub loads: RefCell<Vec<ServerLoad>>,
    /// Clock returned by `now_ms`.
    pub now_ms: Cell<u64>,
    /// Protocol of the request.
    pub protocol: Protocol,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: RefCell<String>,
    /// Headers, lower-case names.
    pub headers: RefCell<HashMap<String, String>>,
    /// Client IP.
    pub client_ip: RefCell<String>,
    /// Listener hash key.
    pub hash_key: RefCell<Option<String>>,
    /// Retry attempt.
    pub attempt: Cell<u32>,
    sequence: Cell<u64>,
    counters: RefCell<[i64; 8]>,
}

impl MockHost {
    /// A host for `n` idle servers, client 127.0.0.1, `GET /`.
    pub fn new(n: usize) -> Self {
        MockHost {
            loads: RefCell::new(vec![ServerLoad::default(); n]),
            method: "GET".into(),
            path: RefCell::new("/".into()),
            client_ip: RefCell::new("127.0.0.1".into()),
            ..Default::default()
        }
    }

    /// Sets the in-flight count of server `i`.
    pub fn set_in_flight(&self, i: usize, v: u32) {
        self.loads.borrow_mut()[i].in_flight = v;
    }

    /// Sets the latency of server `i`.
    pub fn set_latency_us(&self, i: usize, v: u32) {
        self.loads.borrow_mut()[i].latency_us = v;
    }

    /// Sets a header for the next calls.
    pub fn set_header(&self, name: &str, value: &str) {
        self.headers
            .borrow_mut()
            .insert(name.to_ascii_lowercase(), value.to_string());
    }
}

impl Host for MockHost {
    /// Each read stands for one `choose` call: 0, 1, 2… (read it once per `choose`, as the
    /// real host hands one number per call).
    fn sequence(&self) -> u64 {
        let n = self.sequence.get();
        self.sequence.set(n + 1);
        n
    }
    fn in_flight(&self) -> Vec<u32> {
        self.loads.borrow().iter().map(|l| l.in_flight).collect()
    }
    fn latency_us(&self) -> Vec<u32> {
        self.loads.borrow().iter().map(|l| l.latency_us).collect()
    }
    fn server_load(&self, index: u32) -> ServerLoad {
        self.loads.borrow()[index as usize]
    }
    fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }
    fn protocol(&self) -> Protocol {
        self.protocol
    }
    fn method(&self) -> String {
        self.method.clone()
    }
    fn path(&self) -> String {
        self.path.borrow().clone()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .borrow()
            .get(&name.to_ascii_lowercase())
            .cloned()
    }
    fn client_ip(&self) -> String {
        self.client_ip.borrow().clone()
    }
    fn hash_key(&self) -> Option<String> {
        self.hash_key.borrow().clone()
    }
    fn attempt(&self) -> u32 {
        self.attempt.get()
    }
    fn next(&self, counter: u8) -> u64 {
        let mut c = self.counters.borrow_mut();
        let v = c[counter as usize % 8];
        c[counter as usize % 8] += 1;
        v as u64
    }
    fn add(&self, counter: u8, delta: i64) -> i64 {
        let mut c = self.counters.borrow_mut();
        c[counter as usize % 8] += delta;
        c[counter as usize % 8]
    }
    fn get(&self, counter: u8) -> i64 {
        self.counters.borrow()[counter as usize % 8]
    }
}
