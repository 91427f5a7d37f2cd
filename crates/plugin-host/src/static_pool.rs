//! [`StaticPool`]: a fixed server list with settable live figures — a [`PoolView`] for
//! embedding the runtime without the proxy, and for tests and benchmarks.

use super::{PoolView, ServerInfo, ServerLoad};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1 << 48);

/// A fixed list of servers; in-flight counts and latencies can be changed at any time.
pub struct StaticPool {
    generation: u64,
    servers: Vec<ServerInfo>,
    in_flight: Vec<AtomicU32>,
    latency_us: Vec<AtomicU32>,
}

impl StaticPool {
    /// A pool of these servers, idle.
    pub fn new(servers: Vec<ServerInfo>) -> Arc<Self> {
        let n = servers.len();
        Arc::new(StaticPool {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            servers,
            in_flight: (0..n).map(|_| AtomicU32::new(0)).collect(),
            latency_us: (0..n).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    /// `n` healthy servers `127.0.0.1:9101`… with weight 1.
    pub fn with_servers(n: usize) -> Arc<Self> {
        Self::new(
            (0..n)
                .map(|i| ServerInfo::new(i as u32, format!("127.0.0.1:{}", 9101 + i)))
                .collect(),
        )
    }

    /// Sets server `i`'s in-flight count.
    pub fn set_in_flight(&self, i: usize, v: u32) {
        self.in_flight[i].store(v, Ordering::Relaxed);
    }

    /// Sets server `i`'s latency.
    pub fn set_latency_us(&self, i: usize, v: u32) {
        self.latency_us[i].store(v, Ordering::Relaxed);
    }

    /// This pool as the trait object selectors take.
    pub fn view(self: &Arc<Self>) -> Arc<dyn PoolView> {
        self.clone()
    }
}

impl PoolView for StaticPool {
    fn generation(&self) -> u64 {
        self.generation
    }
    fn servers(&self) -> Vec<ServerInfo> {
        self.servers.clone()
    }
    fn len(&self) -> usize {
        self.servers.len()
    }
    fn load(&self, i: usize) -> ServerLoad {
        ServerLoad {
            in_flight: self.in_flight[i].load(Ordering::Relaxed),
            latency_us: self.latency_us[i].load(Ordering::Relaxed),
            requests: 0,
            failures: 0,
        }
    }
    fn in_flight_column(&self, out: &mut Vec<u32>) {
        out.extend(self.in_flight.iter().map(|a| a.load(Ordering::Relaxed)));
    }
    fn latency_column(&self, out: &mut Vec<u32>) {
        out.extend(self.latency_us.iter().map(|a| a.load(Ordering::Relaxed)));
    }
    fn in_flight_prefix(&self, out: &mut [u32]) {
        for (slot, a) in out.iter_mut().zip(&self.in_flight) {
            *slot = a.load(Ordering::Relaxed);
        }
    }
}
