//! Native unit tests of plugin logic: a [`Host`] whose figures the test sets, and the pool,
//! configuration and tallying steps every plugin's tests would otherwise write again.

use crate::host::{Host, Protocol, ServerLoad};
use crate::{Options, Plugin, Pool, Server};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Configures `P` with `pairs` as a proxy would (unread options refused), panicking on an
/// error: for tests whose options are valid.
pub fn configure<P: Plugin>(pairs: &[(&str, &str)]) -> P {
    let mut options = Options::from_pairs(pairs);
    let plugin = P::configure(&mut options).unwrap_or_else(|e| panic!("configure: {e}"));
    options
        .finish()
        .unwrap_or_else(|e| panic!("configure: {e}"));
    plugin
}

/// Healthy servers with these weights: server `i` has id `i` and address `10.0.0.{i+1}:8080`
/// (addresses matter to hash-based plugins, so every test uses the same ones).
pub fn servers(weights: &[u32]) -> Vec<Server> {
    (0u32..)
        .zip(weights)
        .map(|(i, &w)| Server::new(i, format!("10.0.0.{}:8080", i + 1)).with_weight(w))
        .collect()
}

/// A pool of [`servers`] with these weights.
pub fn pool(weights: &[u32]) -> Pool {
    Pool::new(servers(weights))
}

/// How many of `picks` calls to `choose` went to each server, by pool index. Panics on a
/// `None`: for pools with an eligible server.
pub fn counts<P: Plugin>(plugin: &mut P, pool: &Pool, host: &dyn Host, picks: usize) -> Vec<u32> {
    let mut counts = vec![0; pool.servers.len()];
    for _ in 0..picks {
        counts[plugin.choose(pool, host).expect("a pick") as usize] += 1;
    }
    counts
}

/// The address chosen for each of the hash keys `user-0`…`user-{keys - 1}` on retry
/// `attempt`, after pushing `pool`: addresses, not indices, so mappings of different pools
/// compare (keys that moved are the ones that differ).
pub fn key_map<P: Plugin>(
    plugin: &mut P,
    pool: &Pool,
    attempt: u32,
    keys: usize,
) -> Vec<Option<String>> {
    plugin.set_servers(pool);
    let host = MockHost::new(pool.servers.len());
    host.attempt.set(attempt);
    (0..keys)
        .map(|k| {
            *host.hash_key.borrow_mut() = Some(format!("user-{k}"));
            let pick = plugin.choose(pool, &host);
            pick.map(|i| pool.server(i).address.clone())
        })
        .collect()
}

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
    fn in_flight(&self) -> Cow<'_, [u32]> {
        Cow::Owned(self.loads.borrow().iter().map(|l| l.in_flight).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Round robin over the eligible servers, refusing any option but `n`.
    struct Rotate;

    impl Plugin for Rotate {
        const DESCRIPTION: &'static str = "test rotation";
        fn configure(options: &mut Options) -> Result<Self, String> {
            options.number("n", 0u32, 0, 9).map(|_| Rotate)
        }
        fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
            let eligible = pool.eligible();
            let n = eligible.len() as u64;
            (n > 0).then(|| eligible[(host.sequence() % n) as usize])
        }
    }

    #[test]
    fn helpers_configure_build_pools_and_tally() {
        let mut p: Rotate = configure(&[("n", "3")]);
        let pool = pool(&[1, 5]);
        assert_eq!(pool.server(1).address, "10.0.0.2:8080");
        assert_eq!(pool.server(1).weight, 5);
        assert_eq!(counts(&mut p, &pool, &MockHost::new(2), 10), [5, 5]);
        let map = key_map(&mut p, &pool, 0, 3);
        assert_eq!(map[0].as_deref(), Some("10.0.0.1:8080"));
        assert_eq!(map[1].as_deref(), Some("10.0.0.2:8080"));
        let down = Pool::new(servers(&[1]).into_iter().map(Server::down).collect());
        assert_eq!(key_map(&mut p, &down, 0, 2), [None, None]);
    }

    #[test]
    #[should_panic(expected = "`x`")]
    fn configure_refuses_unread_options() {
        let _: Rotate = configure(&[("x", "1")]);
    }

    #[test]
    fn in_flight_column_follows_the_loads() {
        let host = MockHost::new(3);
        host.set_in_flight(1, 4);
        assert_eq!(host.in_flight(), [0, 4, 0].as_slice());
    }
}
