//! Weighted random: each request goes to an eligible server with probability proportional to
//! its effective weight (slow start applied); unhealthy servers are left out.
//!
//! This is NGINX's `random` upstream method without `two` (ngx_http_upstream_random_module,
//! which also draws in proportion to weights), made reproducible: the random bits are
//! `splitmix64(seed ^ splitmix64(n))`, where `n` is the host's shared sequence (`choose`'s `sequence` argument).
//! Every worker thread therefore draws from one global, seeded sequence: the same seed and
//! the same request order give the same picks, and no instance keeps generator state.
//! SplitMix64 is from Steele, Lea & Flood, "Fast splittable pseudorandom number generators"
//! (OOPSLA 2014).
//!
//! `set_servers` precomputes the cumulative weights, and `choose` binary-searches them, so a
//! pick costs O(log n): a pool of 1,000 backends stays as fast as a pool of 3.
//!
//! # Options
//!
//! * `seed` (integer 0..=2^64-1, default 0): selects the random sequence.

use lbwasm_plugin::hash::{bounded, splitmix64};
use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// The weighted random algorithm.
pub struct WeightedRandom {
    seed: u64,
    /// Pool indices of the eligible servers, aligned with `cumulative`.
    indices: Vec<u32>,
    /// `cumulative[k]` = sum of the effective weights of `indices[..=k]`.
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    fn rebuild(&mut self, pool: &Pool) {
        let mut sum = 0;
        let cumulative = pool.eligible_weights().map(|(i, w)| {
            sum += w;
            (i, sum)
        });
        (self.indices, self.cumulative) = cumulative.unzip();
    }
}

impl Plugin for WeightedRandom {
    const DESCRIPTION: &'static str = "weighted random, reproducible with a seed";

    fn configure(options: &mut Options) -> Result<Self, String> {
        let seed = options.parse("seed", 0u64, "an integer from 0 to 18446744073709551615")?;
        Ok(WeightedRandom {
            seed,
            indices: Vec::new(),
            cumulative: Vec::new(),
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        self.rebuild(pool);
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        // The host always pushes the pool first; a length mismatch means it did not (a test,
        // or a custom host), and rebuilding is cheaper than picking from a stale table.
        if self.indices.len() != pool.eligible().len() {
            self.rebuild(pool);
        }
        let total = *self.cumulative.last()?;
        let random = splitmix64(self.seed ^ splitmix64(host.sequence()));
        let target = bounded(random, total);
        let k = self.cumulative.partition_point(|&c| c <= target);
        self.indices.get(k).copied()
    }
}

lbwasm_plugin::export_plugin!(WeightedRandom);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::{MockHost, configure, counts, pool};

    fn plugin(seed: &str, pool: &Pool) -> WeightedRandom {
        let mut p: WeightedRandom = configure(&[("seed", seed)]);
        p.set_servers(pool);
        p
    }

    #[test]
    fn shares_follow_weights() {
        let pool = pool(&[3, 2, 1]);
        let host = MockHost::new(3);
        let c = counts(&mut plugin("0", &pool), &pool, &host, 30_000);
        // Expected 15,000 / 10,000 / 5,000; one standard deviation is under 90.
        for (got, want) in c.iter().zip([15_000i64, 10_000, 5_000]) {
            assert!((i64::from(*got) - want).abs() < 500, "{c:?}");
        }
    }

    #[test]
    fn reproducible_for_a_seed() {
        let pool = pool(&[1, 1, 1, 1]);
        let run = |seed: &str| {
            let host = MockHost::new(4);
            let mut p = plugin(seed, &pool);
            (0..200)
                .map(|_| p.choose(&pool, &host).unwrap())
                .collect::<Vec<u32>>()
        };
        assert_eq!(run("42"), run("42"));
        assert_ne!(run("42"), run("43"));
    }

    #[test]
    fn instances_draw_from_one_global_sequence() {
        let pool = pool(&[1, 1, 1, 1]);
        let one_host = MockHost::new(4);
        let mut single = plugin("7", &pool);
        let alone: Vec<u32> = (0..100)
            .map(|_| single.choose(&pool, &one_host).unwrap())
            .collect();

        let shared = MockHost::new(4);
        let mut workers = [plugin("7", &pool), plugin("7", &pool)];
        let together: Vec<u32> = (0..100)
            .map(|n| workers[n % 2].choose(&pool, &shared).unwrap())
            .collect();
        assert_eq!(alone, together);
    }

    #[test]
    fn a_thousand_backends() {
        let mut weights = vec![1u32; 1000];
        weights[0] = 999;
        weights[999] = 1000;
        let pool = pool(&weights);
        let host = MockHost::new(1000);
        let c = counts(&mut plugin("1", &pool), &pool, &host, 30_000);
        // Total weight 2,997: about a third each to the first and last server.
        assert!((9_500..10_500).contains(&c[0]), "{}", c[0]);
        assert!((9_500..10_500).contains(&c[999]), "{}", c[999]);
        assert!(c[1..999].iter().filter(|&&n| n > 0).count() > 900);
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let mut servers = pool(&[1, 100, 1]).servers;
        servers[1].healthy = false;
        let pool = Pool::new(servers);
        let host = MockHost::new(3);
        let c = counts(&mut plugin("0", &pool), &pool, &host, 1000);
        assert_eq!(c[1], 0);
        assert!(c[0] > 400 && c[2] > 400, "{c:?}");

        let down = Pool::new(pool.servers.iter().cloned().map(Server::down).collect());
        let mut p = plugin("0", &down);
        assert_eq!(p.choose(&down, &host), None);
    }

    #[test]
    fn rejects_a_bad_seed_by_name() {
        let mut o = Options::from_pairs(&[("seed", "-1")]);
        assert!(
            WeightedRandom::configure(&mut o)
                .err()
                .unwrap()
                .contains("`seed`")
        );
    }
}
