//! The pool as the plugin sees it: [`Pool`] is the list of [`Server`]s the host pushed last,
//! with the eligible subset precomputed once per change instead of once per request.

/// One backend (mirrors the WIT `server`).
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    /// Stable id, never reused.
    pub id: u32,
    /// `host:port`: the identity hash-based algorithms hash.
    pub address: String,
    /// Configured weight, >= 1.
    pub weight: u32,
    /// Health as the proxy sees it.
    pub healthy: bool,
    /// Connection limit; 0 = none.
    pub max_connections: u32,
    /// Slow-start factor in 0..=1 (1 = full weight).
    pub warmup: f32,
    /// Backend-reported CPU %, if it reports.
    pub cpu_percent: Option<f32>,
    /// Backend-reported memory %, if it reports.
    pub memory_percent: Option<f32>,
    /// Backend-reported connection count, if it reports.
    pub backend_connections: Option<u32>,
    /// Number of load reports received so far.
    pub load_sample: u64,
    /// Host time of the latest report, ms.
    pub load_sampled_at_ms: u64,
}

impl Server {
    /// A healthy server with weight 1 and no load report (tests and examples).
    pub fn new(id: u32, address: impl Into<String>) -> Self {
        Server {
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

    /// Same server with another weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Same server, marked down.
    pub fn down(mut self) -> Self {
        self.healthy = false;
        self
    }

    /// The reported CPU %, clamped to 0..=100; `None` when not reported or not a number, so
    /// that a plugin treats it as unknown rather than as 0.
    pub fn cpu(&self) -> Option<f64> {
        percent(self.cpu_percent)
    }

    /// The reported memory %, as [`Server::cpu`].
    pub fn memory(&self) -> Option<f64> {
        percent(self.memory_percent)
    }

    /// Weight scaled by slow start: at least 1 so a warming server still gets some traffic.
    pub fn effective_weight(&self) -> u32 {
        let w = self.weight.max(1);
        if self.warmup >= 1.0 || !self.warmup.is_finite() {
            return w;
        }
        ((w as f32 * self.warmup.max(0.0)).round() as u32).max(1)
    }
}

/// A reported percentage, or `None` when absent or not a number.
fn percent(v: Option<f32>) -> Option<f64> {
    v.filter(|v| v.is_finite())
        .map(|v| f64::from(v).clamp(0.0, 100.0))
}

/// The servers pushed by the host plus the indices of the eligible (healthy) ones.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pool {
    /// Every server, in the host's order; `choose` returns an index into this.
    pub servers: Vec<Server>,
    eligible: Vec<u32>,
    has_limits: bool,
}

impl Pool {
    /// An empty pool.
    pub const fn empty() -> Self {
        Pool {
            servers: Vec::new(),
            eligible: Vec::new(),
            has_limits: false,
        }
    }

    /// Builds a pool and its eligible list.
    pub fn new(servers: Vec<Server>) -> Self {
        let eligible = servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.healthy)
            .map(|(i, _)| i as u32)
            .collect();
        let has_limits = servers.iter().any(|s| s.max_connections > 0);
        Pool {
            servers,
            eligible,
            has_limits,
        }
    }

    /// Indices of the healthy servers, ascending.
    pub fn eligible(&self) -> &[u32] {
        &self.eligible
    }

    /// The server at `index` (an index from [`Pool::eligible`] or a column).
    pub fn server(&self, index: u32) -> &Server {
        &self.servers[index as usize]
    }

    /// Whether any server has a connection limit: when none has, the per-request loops can
    /// skip the check (and the trip to each `Server` it costs).
    pub fn has_limits(&self) -> bool {
        self.has_limits
    }

    /// Whether eligible server `index` can take one more request, given its in-flight count.
    pub fn has_room(&self, index: u32, in_flight: u32) -> bool {
        let max = self.server(index).max_connections;
        max == 0 || in_flight < max
    }

    /// The eligible server at `hash` mod their count: the last resort of a hash-based plugin
    /// whose table has no answer, still the same server for the same key.
    pub fn eligible_by_hash(&self, hash: u64) -> Option<u32> {
        let n = self.eligible.len() as u64;
        (n > 0).then(|| self.eligible[(hash % n) as usize])
    }

    /// Each eligible server's index and effective weight (widened, so sums cannot overflow):
    /// what weighted algorithms build their tables from.
    pub fn eligible_weights(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let weight = |i: u32| u64::from(self.server(i).effective_weight());
        self.eligible.iter().map(move |&i| (i, weight(i)))
    }

    /// Sum of the effective weights of the eligible servers.
    pub fn eligible_weight(&self) -> u64 {
        self.eligible_weights().map(|(_, w)| w).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_percentages_are_sanitised() {
        let mut s = Server::new(0, "a");
        assert_eq!((s.cpu(), s.memory()), (None, None));
        s.cpu_percent = Some(140.0);
        s.memory_percent = Some(f32::NAN);
        assert_eq!((s.cpu(), s.memory()), (Some(100.0), None));
        s.cpu_percent = Some(-3.0);
        s.memory_percent = Some(42.5);
        assert_eq!((s.cpu(), s.memory()), (Some(0.0), Some(42.5)));
    }

    #[test]
    fn eligible_weights_apply_slow_start() {
        let mut warming = Server::new(2, "c").with_weight(10);
        warming.warmup = 0.25;
        let pool = Pool::new(vec![
            Server::new(0, "a").with_weight(4).down(),
            Server::new(1, "b"),
            warming,
        ]);
        assert_eq!(
            pool.eligible_weights().collect::<Vec<_>>(),
            [(1, 1), (2, 3)]
        );
        assert_eq!(pool.eligible_weight(), 4);
    }

    #[test]
    fn eligible_by_hash_stays_among_the_eligible() {
        let pool = Pool::new(vec![
            Server::new(0, "a").down(),
            Server::new(1, "b"),
            Server::new(2, "c"),
        ]);
        assert_eq!(pool.eligible_by_hash(4), Some(1));
        assert_eq!(pool.eligible_by_hash(7), Some(2));
        assert_eq!(
            Pool::new(vec![Server::new(0, "a").down()]).eligible_by_hash(1),
            None
        );
    }
}
