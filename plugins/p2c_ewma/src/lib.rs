//! Power of two choices over peak-EWMA latency, as Finagle and Linkerd balance.
//!
//! Per request, two distinct eligible servers are drawn at random and the cheaper one wins:
//!
//! ```text
//! cost = latency × (in_flight + 1) / effective_weight
//! ```
//!
//! where latency is the host's peak-EWMA of response times (it jumps up at once on a slow
//! response and decays slowly, so a server turning slow is noticed on its first slow answer)
//! and an unsampled server counts as `default_latency_us`. Comparing two random servers
//! instead of all of them avoids the herd behaviour of "least of all" under stale figures,
//! while still cutting the maximum load from O(log n / log log n) to O(log log n).
//! Sources: M. Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (IEEE
//! TPDS, 2001); Finagle's `Balancers.p2cPeakEwma`; Linkerd's `PeakEwma` load with tower's p2c.
//!
//! Each worker thread has its own instance, so each has its own generator: seeded from
//! `seed` mixed with the first value of the shared sequence, so instances differ yet a run
//! is reproducible. `choose` reads only the two candidates (two `figures` host calls), not
//! whole columns, so its cost does not grow with the pool.
//!
//! # Options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `seed` | 0 | mixed into every instance's generator |
//! | `default_latency_us` | 1000 | latency assumed for a server without samples, 1..=60000000 |

use lbwasm_plugin::hash::{Rng, splitmix64};
use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// The P2C peak-EWMA algorithm.
pub struct P2cEwma {
    seed: u64,
    default_latency_us: u32,
    /// Created on the first `choose`, the first moment the shared sequence can be read.
    rng: Option<Rng>,
}

impl P2cEwma {
    fn cost(&self, pool: &Pool, host: &dyn Host, i: u32) -> f64 {
        let load = host.server_load(i);
        let latency = if load.latency_us == 0 {
            self.default_latency_us
        } else {
            load.latency_us
        };
        latency as f64 * (load.in_flight as f64 + 1.0) / pool.server(i).effective_weight() as f64
    }
}

impl Plugin for P2cEwma {
    const DESCRIPTION: &'static str =
        "power of two choices over peak-EWMA latency × in-flight (Finagle, Linkerd)";

    fn configure(o: &mut Options) -> Result<Self, String> {
        let seed = o.number("seed", 0u64, 0, u64::MAX)?;
        let default_latency_us = o.number("default_latency_us", 1000u32, 1, 60_000_000)?;
        Ok(P2cEwma {
            seed,
            default_latency_us,
            rng: None,
        })
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        let n = eligible.len() as u64;
        if n < 2 {
            return eligible.first().copied();
        }
        let seed = self.seed;
        let rng = self
            .rng
            .get_or_insert_with(|| Rng::new(seed ^ splitmix64(host.sequence())));
        let first = rng.below(n);
        // Draw the second from the other n − 1, so the two are distinct without a retry loop.
        let mut second = rng.below(n - 1);
        if second >= first {
            second += 1;
        }
        let (a, b) = (eligible[first as usize], eligible[second as usize]);
        // On a tie keep `a`: it is already a uniform random choice.
        if self.cost(pool, host, b) < self.cost(pool, host, a) {
            Some(b)
        } else {
            Some(a)
        }
    }
}

lbwasm_plugin::export_plugin!(P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::testing::{self, MockHost, counts};
    use lbwasm_plugin::{Protocol, Server, ServerLoad};
    use std::borrow::Cow;
    use std::cell::Cell;

    fn plugin(pairs: &[(&str, &str)]) -> P2cEwma {
        testing::configure(pairs)
    }

    fn pool(n: usize) -> Pool {
        testing::pool(&vec![1; n])
    }

    #[test]
    fn avoids_the_slow_server() {
        let host = MockHost::new(3);
        for i in 0..3 {
            host.set_latency_us(i, 2_000);
        }
        host.set_latency_us(1, 20_000);
        let c = counts(&mut plugin(&[]), &pool(3), &host, 10_000);
        assert!(c[1] * 100 < 10_000 * 5, "{c:?}");
        // The two fast ones share the rest.
        assert!(c[0].abs_diff(c[2]) < 600, "{c:?}");
    }

    #[test]
    fn in_flight_and_weight_enter_the_cost() {
        let host = MockHost::new(2);
        host.set_latency_us(0, 1_000);
        host.set_latency_us(1, 1_000);
        host.set_in_flight(0, 3);
        assert_eq!(counts(&mut plugin(&[]), &pool(2), &host, 100), vec![0, 100]);
        let weighted = Pool::new(vec![
            Server::new(0, "a").with_weight(8),
            Server::new(1, "b"),
        ]);
        assert_eq!(
            counts(&mut plugin(&[]), &weighted, &host, 100),
            vec![100, 0]
        );
    }

    #[test]
    fn unsampled_server_counts_as_default_latency() {
        let host = MockHost::new(2);
        host.set_latency_us(1, 5_000);
        assert_eq!(counts(&mut plugin(&[]), &pool(2), &host, 50), vec![50, 0]);
        let patient = &mut plugin(&[("default_latency_us", "10000")]);
        assert_eq!(counts(patient, &pool(2), &host, 50), vec![0, 50]);
    }

    #[test]
    fn skips_unhealthy_single_and_none() {
        let host = MockHost::new(3);
        let mut p = plugin(&[]);
        let one_up = Pool::new(vec![
            Server::new(0, "a").down(),
            Server::new(1, "b"),
            Server::new(2, "c").down(),
        ]);
        assert_eq!(counts(&mut p, &one_up, &host, 20), vec![0, 20, 0]);
        let two_up = Pool::new(vec![
            Server::new(0, "a").down(),
            Server::new(1, "b"),
            Server::new(2, "c"),
        ]);
        assert_eq!(counts(&mut p, &two_up, &host, 100)[0], 0);
        let none = Pool::new(vec![Server::new(0, "a").down()]);
        assert_eq!(p.choose(&none, &host), None);
        assert_eq!(p.choose(&Pool::empty(), &host), None);
    }

    #[test]
    fn instances_draw_differently_but_reproducibly() {
        let run = |seed: &str| {
            let host = MockHost::new(8);
            let mut a = plugin(&[("seed", seed)]);
            let mut b = plugin(&[("seed", seed)]);
            let pool = pool(8);
            let picks = |p: &mut P2cEwma| {
                (0..32)
                    .map(|_| p.choose(&pool, &host).unwrap())
                    .collect::<Vec<_>>()
            };
            (picks(&mut a), picks(&mut b))
        };
        let (a, b) = run("7");
        assert_ne!(a, b, "two instances of one proxy must not move in lockstep");
        assert_eq!((a.clone(), b), run("7"));
        assert_ne!(a, run("8").0);
    }

    /// Counts `server_load` calls and refuses whole-column reads.
    struct Counting(MockHost, Cell<u32>);

    impl Host for Counting {
        fn sequence(&self) -> u64 {
            self.0.sequence()
        }
        fn in_flight(&self) -> Cow<'_, [u32]> {
            panic!("p2c must not read a whole column")
        }
        fn latency_us(&self) -> Vec<u32> {
            panic!("p2c must not read a whole column")
        }
        fn server_load(&self, index: u32) -> ServerLoad {
            self.1.set(self.1.get() + 1);
            self.0.server_load(index)
        }
        fn now_ms(&self) -> u64 {
            self.0.now_ms()
        }
        fn protocol(&self) -> Protocol {
            self.0.protocol()
        }
        fn method(&self) -> String {
            self.0.method()
        }
        fn path(&self) -> String {
            self.0.path()
        }
        fn header(&self, name: &str) -> Option<String> {
            self.0.header(name)
        }
        fn client_ip(&self) -> String {
            self.0.client_ip()
        }
        fn hash_key(&self) -> Option<String> {
            self.0.hash_key()
        }
        fn attempt(&self) -> u32 {
            self.0.attempt()
        }
        fn next(&self, counter: u8) -> u64 {
            self.0.next(counter)
        }
        fn add(&self, counter: u8, delta: i64) -> i64 {
            self.0.add(counter, delta)
        }
        fn get(&self, counter: u8) -> i64 {
            self.0.get(counter)
        }
    }

    #[test]
    fn reads_exactly_two_servers() {
        let host = Counting(MockHost::new(1000), Cell::new(0));
        let mut p = plugin(&[]);
        let pool = pool(1000);
        for _ in 0..10 {
            p.choose(&pool, &host).unwrap();
        }
        assert_eq!(host.1.get(), 20);
    }

    #[test]
    fn refuses_invalid_options() {
        for (key, value) in [
            ("seed", "-1"),
            ("default_latency_us", "0"),
            ("default_latency_us", "fast"),
        ] {
            let e = P2cEwma::configure(&mut Options::from_pairs(&[(key, value)]))
                .err()
                .unwrap();
            assert!(e.contains(&format!("`{key}`")), "{key}={value}: {e}");
        }
    }
}
