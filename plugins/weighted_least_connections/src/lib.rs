//! Weighted least connections: each request goes to the eligible server with the smallest
//! `(in_flight + 1) / effective_weight`.
//!
//! This is HAProxy's `balance leastconn` key (`src/lb_fwlc.c`: servers are sorted by
//! `(inflight + 1) * SRV_EWGHT_MAX / eweight`). Counting the request about to be sent
//! (`+ 1`) makes the weights matter at low load: with nothing in flight the heavier server
//! wins, and under steady load the in-flight counts settle in the ratio of the weights (3:1
//! for weights 3:1). HAProxy additionally puts every idle server first (key 0); this plugin
//! does not, so even at zero load the weights decide. NGINX's `least_conn` compares
//! `conns / weight` instead, without the `+ 1`.
//!
//! Weights are effective weights (slow start applied). The in-flight figures come from one
//! host call per request, so they are global across worker threads. Ties are broken by a
//! per-instance counter rotating over the tied servers, so equal servers take equal turns.
//! A server at its connection limit (`max_connections` > 0) is skipped; when every eligible
//! server is full, `choose` returns none. Unhealthy servers are left out.
//!
//! # Options
//!
//! None.

use lbwasm_plugin::select::{Ratio, least_in_flight, least_with_room};
use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// The weighted least-connections algorithm. Takes no options.
pub struct WeightedLeastConnections {
    /// Whose turn it is among tied servers; advances on every pick.
    rotation: u64,
    /// Effective weight of every server, by pool index (kept out of the per-request loop).
    weights: Vec<u32>,
    /// Every weight is the same: the order is the in-flight counts' own, and the pick is
    /// least connections' (the same answer, from its vectorised scan).
    uniform: bool,
}

impl Plugin for WeightedLeastConnections {
    const DESCRIPTION: &'static str = "weighted least connections ((in-flight + 1) / weight)";

    fn configure(_options: &mut Options) -> Result<Self, String> {
        Ok(WeightedLeastConnections {
            rotation: 0,
            weights: Vec::new(),
            uniform: true,
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        self.weights = pool.servers.iter().map(|s| s.effective_weight()).collect();
        self.uniform = self.weights.windows(2).all(|w| w[0] == w[1]);
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        if pool.eligible().is_empty() {
            return None;
        }
        if self.weights.len() != pool.servers.len() {
            self.set_servers(pool); // a host that did not push the pool first
        }
        let rotation = self.rotation;
        self.rotation = self.rotation.wrapping_add(1);
        let in_flight = host.in_flight();
        if self.uniform {
            return least_in_flight(pool, &in_flight, rotation);
        }
        let weights = &self.weights;
        // Compared exactly (equal ratios tie), without a division per server.
        least_with_room(pool, &in_flight, rotation, |i, n| {
            Ratio::with_next(n, weights.get(i as usize).copied().unwrap_or(1))
        })
    }
}

lbwasm_plugin::export_plugin!(WeightedLeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::{MockHost, configure, pool};

    fn plugin() -> WeightedLeastConnections {
        configure(&[])
    }

    /// Sends `picks` requests that never complete; returns the in-flight counts.
    fn load(
        wlc: &mut WeightedLeastConnections,
        pool: &Pool,
        host: &MockHost,
        picks: usize,
    ) -> Vec<u32> {
        for _ in 0..picks {
            let i = wlc.choose(pool, host).unwrap() as usize;
            let n = host.in_flight()[i];
            host.set_in_flight(i, n + 1);
        }
        host.in_flight().into_owned()
    }

    #[test]
    fn heavier_server_wins_at_zero_load() {
        // The heavy server is second, so a first-in-order tie-break cannot explain the pick.
        let pool = pool(&[1, 3]);
        let host = MockHost::new(2);
        let mut wlc = plugin();
        for _ in 0..4 {
            assert_eq!(wlc.choose(&pool, &host), Some(1));
        }
    }

    #[test]
    fn in_flight_tends_to_the_weight_ratio() {
        let pool = pool(&[3, 1]);
        let host = MockHost::new(2);
        let counts = load(&mut plugin(), &pool, &host, 4000);
        assert!((2995..=3005).contains(&counts[0]), "{counts:?}");

        // With completions: each round one request finishes on a server chosen in proportion
        // to its in-flight count, and two new ones arrive; the ratio holds.
        let host = MockHost::new(2);
        let mut wlc = plugin();
        let mut rng = lbwasm_plugin::hash::Rng::new(3);
        for _ in 0..5000 {
            let f = host.in_flight();
            let total = u64::from(f[0] + f[1]);
            if total > 40 {
                let i = usize::from(rng.below(total) >= u64::from(f[0]));
                host.set_in_flight(i, f[i] - 1);
            }
            load(&mut wlc, &pool, &host, 1);
        }
        let f = host.in_flight();
        let ratio = f64::from(f[0]) / f64::from(f[1]);
        assert!((2.5..=3.5).contains(&ratio), "{f:?}");
    }

    #[test]
    fn rotates_ties() {
        let pool = pool(&[2, 2, 2]);
        let host = MockHost::new(3);
        let mut wlc = plugin();
        let picks: Vec<u32> = (0..6).map(|_| wlc.choose(&pool, &host).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn respects_max_connections() {
        let mut servers = pool(&[10, 1]).servers;
        servers[0].max_connections = 3;
        servers[1].max_connections = 1;
        let pool = Pool::new(servers);
        let host = MockHost::new(2);
        host.set_in_flight(0, 3);
        let mut wlc = plugin();
        assert_eq!(wlc.choose(&pool, &host), Some(1));
        host.set_in_flight(1, 1);
        assert_eq!(wlc.choose(&pool, &host), None);
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let mut servers = pool(&[10, 1, 1]).servers;
        servers[0].healthy = false;
        let pool = Pool::new(servers);
        let host = MockHost::new(3);
        let counts = load(&mut plugin(), &pool, &host, 10);
        assert_eq!(counts, vec![0, 5, 5]);

        let down = Pool::new(pool.servers.iter().cloned().map(Server::down).collect());
        assert_eq!(plugin().choose(&down, &host), None);
    }

    #[test]
    fn refuses_options() {
        let mut o = Options::from_pairs(&[("x", "1")]);
        WeightedLeastConnections::configure(&mut o).unwrap();
        assert!(o.finish().unwrap_err().contains("`x`"));
    }
}
