//! Least connections: each request goes to the eligible server with the fewest requests in
//! flight from this proxy. Weights are ignored (see `weighted_least_connections` for the
//! weighted variant).
//!
//! This is HAProxy's `balance leastconn` and NGINX's `least_conn` with equal weights. The
//! figures come from one host call per request (`in-flight`, the whole column), so they are
//! global across worker threads. Ties are broken by a per-instance counter rotating over the
//! tied servers, as HAProxy round-robins among equally loaded servers: with short requests
//! most servers sit at 0 in flight, and always taking the first of them would send it nearly
//! all the traffic.
//!
//! A server with a connection limit (`max_connections` > 0) that has reached it is skipped;
//! when every eligible server is full, `choose` returns none (the proxy answers 503).
//! Unhealthy servers are left out.
//!
//! # Options
//!
//! None.

use lbwasm_plugin::select::least_in_flight;
use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// The least-connections algorithm. Takes no options.
pub struct LeastConnections {
    /// Whose turn it is among tied servers; advances on every pick.
    rotation: u64,
}

impl Plugin for LeastConnections {
    const DESCRIPTION: &'static str = "least connections, ties rotated, connection limits honoured";

    fn configure(_options: &mut Options) -> Result<Self, String> {
        Ok(LeastConnections { rotation: 0 })
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        if pool.eligible().is_empty() {
            return None;
        }
        let rotation = self.rotation;
        self.rotation = self.rotation.wrapping_add(1);
        least_in_flight(pool, &host.in_flight(), rotation)
    }
}

lbwasm_plugin::export_plugin!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::{self, MockHost};

    fn pool(n: usize) -> Pool {
        testing::pool(&vec![1; n])
    }

    fn plugin() -> LeastConnections {
        testing::configure(&[])
    }

    #[test]
    fn picks_the_least_loaded() {
        let pool = pool(3);
        let host = MockHost::new(3);
        host.set_in_flight(0, 4);
        host.set_in_flight(1, 1);
        host.set_in_flight(2, 3);
        let mut lc = plugin();
        for _ in 0..5 {
            assert_eq!(lc.choose(&pool, &host), Some(1));
        }
    }

    #[test]
    fn rotates_ties() {
        let pool = pool(3);
        let host = MockHost::new(3);
        let mut lc = plugin();
        let picks: Vec<u32> = (0..6).map(|_| lc.choose(&pool, &host).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);

        // Ties among a subset: the tied servers take equal turns, the loaded one none.
        host.set_in_flight(0, 2);
        let mut counts = [0u32; 3];
        for _ in 0..300 {
            counts[lc.choose(&pool, &host).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [0, 150, 150]);
    }

    #[test]
    fn balances_in_flight_under_load() {
        let pool = pool(4);
        let host = MockHost::new(4);
        host.set_in_flight(2, 10);
        let mut lc = plugin();
        for _ in 0..30 {
            let i = lc.choose(&pool, &host).unwrap() as usize;
            let n = host.in_flight()[i];
            host.set_in_flight(i, n + 1);
        }
        assert_eq!(host.in_flight(), vec![10, 10, 10, 10]);
    }

    #[test]
    fn respects_max_connections() {
        let mut servers = pool(2).servers;
        servers[0].max_connections = 2;
        servers[1].max_connections = 5;
        let pool = Pool::new(servers);
        let host = MockHost::new(2);
        host.set_in_flight(0, 2);
        host.set_in_flight(1, 4);
        let mut lc = plugin();
        assert_eq!(lc.choose(&pool, &host), Some(1));
        host.set_in_flight(1, 5);
        assert_eq!(lc.choose(&pool, &host), None);
        host.set_in_flight(0, 1);
        assert_eq!(lc.choose(&pool, &host), Some(0));
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let mut servers = pool(3).servers;
        servers[0].healthy = false;
        let pool = Pool::new(servers);
        let host = MockHost::new(3);
        host.set_in_flight(2, 1);
        let mut lc = plugin();
        assert_eq!(lc.choose(&pool, &host), Some(1));

        let down = Pool::new(pool.servers.iter().cloned().map(Server::down).collect());
        assert_eq!(lc.choose(&down, &host), None);
    }

    #[test]
    fn refuses_options() {
        let mut o = Options::from_pairs(&[("x", "1")]);
        LeastConnections::configure(&mut o).unwrap();
        assert!(o.finish().unwrap_err().contains("`x`"));
    }
}
