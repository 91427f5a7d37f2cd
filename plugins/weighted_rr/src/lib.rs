//! Smooth weighted round robin, as NGINX does it, exact across worker threads.
//!
//! # Algorithm
//!
//! NGINX's smooth weighted round robin (commit 52327e0627f4 "Upstream: smooth weighted
//! round-robin balancing.", Maxim Dounin, 2012; `ngx_http_upstream_get_peer` in
//! `src/http/ngx_http_upstream_round_robin.c`): on each pick, every eligible server's
//! `current` grows by its weight, the server with the largest `current` wins (the first in
//! pool order on a tie), and the winner's `current` drops by the total weight. Weights 5:1:1
//! give `a a b a c a a`: the heavy server's turns are spread out instead of sent as a burst
//! of five, as a plain weighted rotation would.
//!
//! Weights are effective weights (slow start applied), so a warming server ramps up;
//! unhealthy servers are left out.
//!
//! # Exact across worker threads
//!
//! Each worker thread has its own instance, so a rotation kept in the instance would run one
//! independent rotation per worker, and the proxy as a whole would see the workers' sequences
//! interleaved (bursts included). The sequence is deterministic and periodic, though: after
//! `P` picks, `P` being the sum of the weights divided by their gcd, every `current` is back
//! to 0. So `set_servers` computes one period, and `choose` takes its element at the host's
//! shared sequence number (`choose`'s `sequence` argument): the n-th request of the whole proxy gets the n-th
//! element, whichever worker serves it.
//!
//! # Fallback for long periods
//!
//! When the reduced period would exceed [`MAX_PERIOD`] (65,536) entries, or building it would
//! take more than [`MAX_BUILD_WORK`] steps (period × servers), the table would cost too much
//! memory and time at each pool change, so the plugin falls back to the classic
//! stateful algorithm per instance: shares and smoothness hold within each worker, but the
//! global sequence is an interleaving of the workers' sequences, no longer exact.
//!
//! # Options
//!
//! None.

use lbwasm_plugin::select::reduced;
use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// Longest period (in picks) that is precomputed; above it the plugin runs per instance.
pub const MAX_PERIOD: u64 = 1 << 16;

/// Most work (period × servers steps) spent building the table at one pool change; above
/// it the plugin runs per instance too. Bounds a rebuild to a few milliseconds even for a
/// large pool warming up (slow start changes effective weights at every push).
pub const MAX_BUILD_WORK: u64 = 1 << 22;

/// The smooth weighted round-robin algorithm. Takes no options.
pub struct WeightedRoundRobin {
    /// Pool index and effective weight of each eligible server the tables were built for, so
    /// that a pool push that changes neither (a new load report) keeps them as they are.
    servers: Vec<(u32, u64)>,
    mode: Mode,
}

enum Mode {
    /// One period of the global sequence, as pool indices.
    Schedule(Vec<u32>),
    /// Per-instance state, aligned with `servers` (never empty): reduced weights, `current`
    /// values, total.
    Stateful(Vec<i64>, Vec<i64>, i64),
}

impl WeightedRoundRobin {
    fn rebuild(&mut self, pool: &Pool) {
        let servers: Vec<(u32, u64)> = pool.eligible_weights().collect();
        if servers == self.servers {
            return;
        }
        let weights: Vec<i64> = reduced(servers.iter().map(|s| s.1))
            .iter()
            .map(|&w| w as i64)
            .collect();
        let total = weights.iter().sum::<i64>();
        let mut current = vec![0; weights.len()];
        self.mode =
            if total as u64 > MAX_PERIOD || total as u64 * weights.len() as u64 > MAX_BUILD_WORK {
                Mode::Stateful(weights, current, total)
            } else {
                let step = |_| servers[smooth_step(&mut current, &weights, total)].0;
                Mode::Schedule((0..total).map(step).collect())
            };
        self.servers = servers;
    }

    /// Whether the sequence is precomputed (globally exact) rather than per instance.
    pub fn is_global(&self) -> bool {
        matches!(self.mode, Mode::Schedule(_))
    }
}

/// One NGINX step over `weights`; returns the position of the pick. `weights` is not empty.
fn smooth_step(current: &mut [i64], weights: &[i64], total: i64) -> usize {
    current.iter_mut().zip(weights).for_each(|(c, w)| *c += w);
    // Strictly greater: the first server in order wins a tie, as in NGINX.
    let best = (0..current.len()).fold(0, |b, k| if current[k] > current[b] { k } else { b });
    current[best] -= total;
    best
}

impl Plugin for WeightedRoundRobin {
    const DESCRIPTION: &'static str =
        "smooth weighted round robin (NGINX), exact across worker threads";

    fn configure(_options: &mut Options) -> Result<Self, String> {
        Ok(WeightedRoundRobin {
            servers: Vec::new(),
            mode: Mode::Schedule(Vec::new()),
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        self.rebuild(pool);
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        // The host always pushes the pool first; a length mismatch means it did not (a test,
        // or a custom host), and rebuilding is cheaper than picking from a stale table.
        if self.servers.len() != pool.eligible().len() {
            self.rebuild(pool);
        }
        match &mut self.mode {
            Mode::Schedule(s) if s.is_empty() => None,
            Mode::Schedule(s) => Some(s[(host.sequence() % s.len() as u64) as usize]),
            Mode::Stateful(weights, current, total) => {
                Some(self.servers[smooth_step(current, weights, *total)].0)
            }
        }
    }
}

lbwasm_plugin::export_plugin!(WeightedRoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::{MockHost, configure, pool};

    fn plugin(pool: &Pool) -> WeightedRoundRobin {
        let mut p: WeightedRoundRobin = configure(&[]);
        p.set_servers(pool);
        p
    }

    fn letters(picks: &[u32]) -> String {
        picks.iter().map(|&i| (b'a' + i as u8) as char).collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        let pool = pool(&[5, 1, 1]);
        let host = MockHost::new(3);
        let mut wrr = plugin(&pool);
        let picks: Vec<u32> = (0..21).map(|_| wrr.choose(&pool, &host).unwrap()).collect();
        assert_eq!(letters(&picks), "aabacaa".repeat(3));
    }

    #[test]
    fn exact_shares_over_7000_picks() {
        let pool = pool(&[5, 1, 1]);
        let host = MockHost::new(3);
        let mut wrr = plugin(&pool);
        let mut counts = [0u32; 3];
        for _ in 0..7000 {
            counts[wrr.choose(&pool, &host).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [5000, 1000, 1000]);
    }

    #[test]
    fn two_instances_share_one_global_sequence() {
        let pool = pool(&[5, 1, 1]);
        let host = MockHost::new(3);
        let mut workers = [plugin(&pool), plugin(&pool)];
        // An irregular interleaving, as two worker threads would produce.
        let mut picks = Vec::new();
        for n in 0..70usize {
            let w = (n * 7 + n / 3) % 2;
            picks.push(workers[w].choose(&pool, &host).unwrap());
        }
        assert_eq!(letters(&picks), "aabacaa".repeat(10));
    }

    #[test]
    fn weights_are_reduced_by_their_gcd() {
        let pool = pool(&[10, 2, 2]);
        let host = MockHost::new(3);
        let mut wrr = plugin(&pool);
        assert!(matches!(&wrr.mode, Mode::Schedule(s) if s.len() == 7));
        let picks: Vec<u32> = (0..7).map(|_| wrr.choose(&pool, &host).unwrap()).collect();
        assert_eq!(letters(&picks), "aabacaa");
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let mut servers = pool(&[1, 5, 1]).servers;
        servers[1].healthy = false;
        let pool = Pool::new(servers);
        let host = MockHost::new(3);
        let mut wrr = plugin(&pool);
        let picks: Vec<u32> = (0..4).map(|_| wrr.choose(&pool, &host).unwrap()).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);

        let down = Pool::new(pool.servers.iter().cloned().map(Server::down).collect());
        wrr.set_servers(&down);
        assert_eq!(wrr.choose(&down, &host), None);
    }

    #[test]
    fn slow_start_and_weight_changes_rebuild_the_schedule() {
        let mut servers = pool(&[5, 1, 1]).servers;
        servers[0].warmup = 0.2; // effective weight 1
        let warming = Pool::new(servers);
        let host = MockHost::new(3);
        let mut wrr = plugin(&warming);
        let picks: Vec<u32> = (0..6)
            .map(|_| wrr.choose(&warming, &host).unwrap())
            .collect();
        assert_eq!(letters(&picks), "abcabc");

        let full = pool(&[5, 1, 1]);
        wrr.set_servers(&full);
        let mut counts = [0u32; 3];
        for _ in 0..700 {
            counts[wrr.choose(&full, &host).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
    }

    #[test]
    fn long_periods_fall_back_to_per_instance_state() {
        let at_limit = pool(&[3, (MAX_PERIOD - 3) as u32]);
        assert!(plugin(&at_limit).is_global());

        let over = pool(&[3, (MAX_PERIOD - 2) as u32]);
        let host = MockHost::new(2);
        let mut wrr = plugin(&over);
        assert!(!wrr.is_global());
        let period = MAX_PERIOD + 1;
        let picks: Vec<u32> = (0..period)
            .map(|_| wrr.choose(&over, &host).unwrap())
            .collect();
        let light: Vec<usize> = picks
            .iter()
            .enumerate()
            .filter(|(_, i)| **i == 0)
            .map(|(n, _)| n)
            .collect();
        // Exact share, and the three light picks spread out over the period, not bunched.
        assert_eq!(light.len(), 3);
        assert!(light.windows(2).all(|w| w[1] - w[0] > 20_000), "{light:?}");
        assert_eq!(host.get(0), 0, "the fallback needs no shared counter");
    }

    #[test]
    fn refuses_options() {
        let mut o = Options::from_pairs(&[("seed", "1")]);
        WeightedRoundRobin::configure(&mut o).unwrap();
        assert!(o.finish().unwrap_err().contains("`seed`"));
    }
}
