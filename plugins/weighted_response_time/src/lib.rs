//! Weighted response time: each eligible server's share of traffic is proportional to
//! `effective_weight / latency`, where `latency` is the host's peak-EWMA response latency for
//! it. A server ten times faster than another of the same weight gets ten times the traffic
//! (10/11 of it with two servers).
//!
//! The latency figure is the peak-EWMA of Twitter's Finagle (`PeakEwma` load balancer, also
//! used by Linkerd): it jumps up at once on a slow response and decays slowly, so a server
//! that turns slow loses traffic quickly. Weighting by measured response time is the idea of
//! Netflix Ribbon's `WeightedResponseTimeRule`; this plugin uses the inverse of the latency
//! (throughput-like) rather than Ribbon's "total minus own average". The pick itself is
//! weighted random with bits from `splitmix64(n ^ seed)`, `n` being the host's shared
//! sequence (`choose`'s `sequence` argument), so the draws are one global, seeded sequence across worker threads.
//!
//! Servers without a sample yet (latency 0) are probed: while some eligible server has no
//! sample and nothing in flight, the request goes to it (taking turns, per instance, when
//! there are several), so a new or re-admitted server is measured at once. An unsampled
//! server that already has a request in flight is treated as the slowest sampled server, so
//! it takes a modest share until its first response instead of being flooded. Latencies are
//! floored at `min_latency_us`, so one near-zero sample (a cached or failed-fast response)
//! cannot take all the traffic. Unhealthy servers are left out.
//!
//! Per request this costs one host call (`latency-us`), plus one (`in-flight`) only while
//! some eligible server is unsampled.
//!
//! # Options
//!
//! * `seed` (integer 0..=2^64-1, default 0): selects the random sequence.
//! * `min_latency_us` (1..=10,000,000, default 100): floor applied to every latency, in µs.

use lbwasm_plugin::hash::splitmix64;
use lbwasm_plugin::select::{least_by_key, weighted_pick};
use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// The weighted response-time algorithm.
pub struct WeightedResponseTime {
    seed: u64,
    min_latency_us: u32,
    /// Whose turn it is among the servers waiting for a probe; advances on every probe.
    rotation: u64,
}

impl Plugin for WeightedResponseTime {
    const DESCRIPTION: &'static str =
        "traffic inversely proportional to peak-EWMA latency, unsampled servers probed";

    fn configure(options: &mut Options) -> Result<Self, String> {
        let seed = options.parse("seed", 0u64, "an integer from 0 to 18446744073709551615")?;
        let min_latency_us = options.number("min_latency_us", 100u32, 1, 10_000_000)?;
        Ok(WeightedResponseTime {
            seed,
            min_latency_us,
            rotation: 0,
        })
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        if eligible.is_empty() {
            return None;
        }
        let latency = host.latency_us();
        let latency_of = |i: u32| latency.get(i as usize).copied().unwrap_or(0);

        if eligible.iter().any(|&i| latency_of(i) == 0) {
            let in_flight = host.in_flight();
            let idle = |i: u32| in_flight.get(i as usize).is_none_or(|&n| n == 0);
            // The idle unsampled servers all tie, so they take equal turns.
            let probe = least_by_key(pool, self.rotation, |i| {
                (latency_of(i) == 0 && idle(i)).then_some(())
            });
            if probe.is_some() {
                self.rotation = self.rotation.wrapping_add(1);
                return probe;
            }
        }

        // Zero when no server has a sample: every server then gets the floor, i.e. shares
        // follow the weights alone.
        let slowest = eligible.iter().map(|&i| latency_of(i)).max().unwrap_or(0);
        let random = splitmix64(host.sequence() ^ self.seed);
        weighted_pick(pool, random, |i| {
            let l = match latency_of(i) {
                0 => slowest,
                l => l,
            };
            f64::from(pool.server(i).effective_weight()) / f64::from(l.max(self.min_latency_us))
        })
    }
}

lbwasm_plugin::export_plugin!(WeightedResponseTime);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::{MockHost, configure, counts, pool};

    fn plugin(options: &[(&str, &str)]) -> WeightedResponseTime {
        configure(options)
    }

    fn near(got: u32, want: f64, tolerance: f64) -> bool {
        (f64::from(got) - want).abs() <= tolerance
    }

    #[test]
    fn ten_times_faster_gets_ten_elevenths() {
        let pool = pool(&[1, 1]);
        let host = MockHost::new(2);
        host.set_latency_us(0, 1_000);
        host.set_latency_us(1, 10_000);
        let c = counts(&mut plugin(&[]), &pool, &host, 33_000);
        assert!(near(c[0], 30_000.0, 400.0), "{c:?}");
    }

    #[test]
    fn weights_scale_the_share() {
        let pool = pool(&[3, 1]);
        let host = MockHost::new(2);
        host.set_latency_us(0, 2_000);
        host.set_latency_us(1, 2_000);
        let c = counts(&mut plugin(&[]), &pool, &host, 20_000);
        assert!(near(c[0], 15_000.0, 400.0), "{c:?}");
    }

    #[test]
    fn probes_idle_unsampled_servers_in_rotation() {
        let pool = pool(&[1, 1, 1]);
        let host = MockHost::new(3);
        host.set_latency_us(0, 1_000);
        let mut wrt = plugin(&[]);
        let picks: Vec<u32> = (0..4).map(|_| wrt.choose(&pool, &host).unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        assert_eq!(host.get(0), 0, "a probe draws no random number");
    }

    #[test]
    fn busy_unsampled_server_counts_as_the_slowest() {
        let pool = pool(&[1, 1, 1]);
        let host = MockHost::new(3);
        host.set_latency_us(0, 1_000);
        host.set_latency_us(2, 5_000);
        host.set_in_flight(1, 1);
        let c = counts(&mut plugin(&[]), &pool, &host, 35_000);
        // Shares 5:1:1 (1/1000 : 1/5000 : 1/5000).
        assert!(
            near(c[0], 25_000.0, 400.0) && near(c[1], 5_000.0, 300.0),
            "{c:?}"
        );

        // Nothing sampled and everything busy: the weights alone decide.
        let host = MockHost::new(3);
        (0..3).for_each(|i| host.set_in_flight(i, 1));
        let c = counts(&mut plugin(&[]), &pool, &host, 30_000);
        assert!(c.iter().all(|&n| near(n, 10_000.0, 400.0)), "{c:?}");
    }

    #[test]
    fn latency_floor() {
        let pool = pool(&[1, 1]);
        let host = MockHost::new(2);
        host.set_latency_us(0, 1);
        host.set_latency_us(1, 1_000);
        // Default floor 100 µs: 1,000 vs 100 is 10:1.
        let c = counts(&mut plugin(&[]), &pool, &host, 33_000);
        assert!(near(c[0], 30_000.0, 400.0), "{c:?}");
        // A floor of 1 µs lets the 1 µs server take ~1000/1001.
        let c = counts(
            &mut plugin(&[("min_latency_us", "1")]),
            &pool,
            &host,
            10_000,
        );
        assert!(c[1] < 40, "{c:?}");
    }

    #[test]
    fn reproducible_for_a_seed() {
        let pool = pool(&[1, 1, 1]);
        let run = |seed: &str| {
            let host = MockHost::new(3);
            (0..3).for_each(|i| host.set_latency_us(i, 1_000 * (i as u32 + 1)));
            let mut p = plugin(&[("seed", seed)]);
            (0..200)
                .map(|_| p.choose(&pool, &host).unwrap())
                .collect::<Vec<u32>>()
        };
        assert_eq!(run("9"), run("9"));
        assert_ne!(run("9"), run("10"));
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let mut servers = pool(&[1, 1, 1]).servers;
        servers[1].healthy = false;
        let pool = Pool::new(servers);
        let host = MockHost::new(3);
        host.set_latency_us(0, 1_000);
        host.set_latency_us(2, 1_000);
        // Server 1 is unsampled and idle, but down: never probed.
        let c = counts(&mut plugin(&[]), &pool, &host, 1_000);
        assert_eq!(c[1], 0);
        assert!(c[0] > 400 && c[2] > 400, "{c:?}");

        let down = Pool::new(pool.servers.iter().cloned().map(Server::down).collect());
        assert_eq!(plugin(&[]).choose(&down, &host), None);
    }

    #[test]
    fn rejects_bad_options_by_name() {
        for (key, value) in [
            ("min_latency_us", "0"),
            ("min_latency_us", "10000001"),
            ("seed", "x"),
        ] {
            let mut o = Options::from_pairs(&[(key, value)]);
            let e = WeightedResponseTime::configure(&mut o).err().unwrap();
            assert!(e.contains(&format!("`{key}`")), "{e}");
        }
        let mut o = Options::from_pairs(&[("min_latency", "5")]);
        WeightedResponseTime::configure(&mut o).unwrap();
        assert!(o.finish().unwrap_err().contains("`min_latency`"));
    }
}
