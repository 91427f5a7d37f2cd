//! Least loaded: the eligible server with the lowest forecast load per unit of weight.
//!
//! A server's load blends what the backend reports about itself (CPU % and memory %, from its
//! load endpoint, about once a second) with what this proxy sees live (its in-flight requests):
//!
//! ```text
//! load  = (cpu_weight·cpu/100 + memory_weight·memory/100 + connections_weight·in_flight/max)
//!         / (sum of the weights of the terms present)
//! score = load / effective_weight            (lowest wins; equal scores take turns)
//! ```
//!
//! * A figure the backend does not report is unknown, not zero: its term and its weight drop
//!   out of the average, so a server without reports scores on in-flight alone and is not
//!   favoured for reporting less. With no reports anywhere this is least connections.
//! * In-flight is normalised by the largest in-flight count among the eligible servers, which
//!   puts it on the 0..=1 scale of the percentages. `backend_connections` is deliberately not
//!   used: it is a sample up to a second old that also counts other clients, whose effect the
//!   CPU and memory figures already carry, whereas in-flight is exact and live.
//!
//! # Load-spike prediction
//!
//! Reports arrive once a second, so the last value always lags. Per server (keyed by its
//! stable id) CPU and memory each go through Holt's linear (double exponential) smoothing,
//! updated exactly once per new report, i.e. when `load_sample` grows (`set_servers` also runs
//! on health and membership changes, which must not count as samples), and the score uses
//! the forecast `horizon` reports ahead, `level + trend·horizon` (clamped to 0..=100). A
//! server whose load climbs is therefore avoided before its reported load overtakes the
//! others'. The smoothing and its bookkeeping are the SDK's `forecast` module (formulas and
//! sources there).
//!
//! # Options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `cpu_weight` | 0.5 | weight of reported CPU %, 0..=10 |
//! | `memory_weight` | 0.2 | weight of reported memory %, 0..=10 |
//! | `connections_weight` | 0.3 | weight of live in-flight requests, 0..=10 |
//! | `predict` | true | score with the Holt forecast instead of the last report |
//! | `alpha` | 0.5 | level smoothing, above 0 up to 1 (1 = trust the last sample) |
//! | `beta` | 0.5 | trend smoothing, 0..=1 |
//! | `horizon` | 2 | how many samples ahead to forecast, 0..=100 |
//!
//! At least one of the three weights must be above 0.

use lbwasm_plugin::forecast::{LoadTrends, Smoothing};
use lbwasm_plugin::select::{least_in_column, min_by_score};
use lbwasm_plugin::{Host, Options, Plugin, Pool, Server};

/// The least-loaded algorithm with Holt load forecasting.
pub struct LeastLoaded {
    cpu_weight: f64,
    memory_weight: f64,
    connections_weight: f64,
    smoothing: Smoothing,
    /// How many reports ahead to forecast; `None`: score with the last report.
    horizon: Option<f64>,
    trends: LoadTrends,
    /// Per pool index, the score as `base + per_share · share`: the reported terms and the
    /// weights folded in by `set_servers` (reports change only there), so that `choose`
    /// does a multiplication and an addition per server, not three divisions. Two columns,
    /// so that the scores of a whole pool are computed in SIMD lanes.
    base: Vec<f64>,
    per_share: Vec<f64>,
    /// Every server's score for this pick, kept to reuse its allocation.
    scores: Vec<f64>,
}

impl Plugin for LeastLoaded {
    // `[reads-load]` asks the host to poll the backends' load endpoint for this plugin.
    const DESCRIPTION: &'static str = "least loaded by forecast CPU, memory and in-flight per unit of weight (Holt smoothing) [reads-load]";

    fn configure(o: &mut Options) -> Result<Self, String> {
        let cpu_weight = o.number("cpu_weight", 0.5, 0.0, 10.0)?;
        let memory_weight = o.number("memory_weight", 0.2, 0.0, 10.0)?;
        let connections_weight = o.number("connections_weight", 0.3, 0.0, 10.0)?;
        if cpu_weight + memory_weight + connections_weight <= 0.0 {
            return Err("options `cpu_weight`, `memory_weight`, `connections_weight`: at least one must be above 0".to_string());
        }
        let predict = o.boolean("predict", true)?;
        let alpha = o.number("alpha", 0.5, 0.0, 1.0)?;
        if alpha <= 0.0 {
            return Err("option `alpha`: must be above 0 (0 would never take a new sample)".into());
        }
        let beta = o.number("beta", 0.5, 0.0, 1.0)?;
        let horizon = o.number("horizon", 2.0, 0.0, 100.0)?;
        Ok(LeastLoaded {
            cpu_weight,
            memory_weight,
            connections_weight,
            smoothing: Smoothing { alpha, beta },
            horizon: predict.then_some(horizon),
            trends: LoadTrends::default(),
            base: Vec::new(),
            per_share: Vec::new(),
            scores: Vec::new(),
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        self.trends.update(pool, self.smoothing);
        let reported = |s: &Server| {
            let [cpu, memory] = self.trends.figures(s, self.horizon);
            let (mut sum, mut total) = (0.0, 0.0);
            for (figure, w) in [(cpu, self.cpu_weight), (memory, self.memory_weight)] {
                if let Some(v) = figure {
                    (sum, total) = (sum + w * v / 100.0, total + w);
                }
            }
            let weight = f64::from(s.effective_weight());
            let total = total + self.connections_weight;
            if total > 0.0 {
                // (sum + connections_weight·share) / total / weight
                (
                    sum / total / weight,
                    self.connections_weight / total / weight,
                )
            } else {
                // connections_weight = 0 and nothing reported: in-flight is all there is.
                (0.0, 1.0 / weight)
            }
        };
        (self.base, self.per_share) = pool.servers.iter().map(reported).unzip();
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        if eligible.len() < 2 {
            return eligible.first().copied();
        }
        if self.base.len() != pool.servers.len() {
            self.set_servers(pool); // a host that did not push the pool first
        }
        let in_flight = host.in_flight();
        // Lowest load per unit of weight; equal scores take turns along the global sequence.
        // share = in_flight / busiest; the scores are compared times `busiest` (the same
        // order, no division per server), and with nothing in flight the share is 0.
        let n = pool.servers.len();
        let (base, per_share) = (&self.base[..n], &self.per_share[..n]);
        if let Some(column) = in_flight.get(..n)
            && eligible.len() == n
        {
            // Every server eligible (the usual case): the scores as a column, scanned in
            // SIMD lanes.
            fill_scores(&mut self.scores, base, per_share, column);
            return least_in_column(&self.scores, host.sequence());
        }
        let in_flight_of = |i: u32| in_flight.get(i as usize).copied().unwrap_or(0);
        let busiest = eligible.iter().map(|&i| in_flight_of(i)).max().unwrap_or(0);
        let scale = f64::from(busiest.max(1));
        min_by_score(pool, host.sequence(), |i| {
            let k = i as usize;
            base[k] * scale + per_share[k] * f64::from(in_flight_of(i))
        })
    }
}

/// `base · busiest + per_share · in_flight` for every server, into `scores`. A function of
/// its own so that it can carry `simd128`: the vectoriser works per function, and only a
/// function with the feature gets SIMD lanes. The loops go 16 counts and 8 scores a step
/// (several registers each) because Cranelift checks the epoch and spills its registers
/// on every iteration: 4 counts or 2 scores a step measured twice the time.
#[cfg_attr(target_family = "wasm", target_feature(enable = "simd128"))]
fn fill_scores(scores: &mut Vec<f64>, base: &[f64], per_share: &[f64], in_flight: &[u32]) {
    let mut top = [0u32; 16];
    let mut counts = in_flight.chunks_exact(16);
    for chunk in &mut counts {
        for k in 0..16 {
            top[k] = if chunk[k] > top[k] { chunk[k] } else { top[k] };
        }
    }
    let busiest = top
        .iter()
        .chain(counts.remainder())
        .copied()
        .max()
        .unwrap_or(0);
    let scale = f64::from(busiest.max(1));
    let n = in_flight.len().min(base.len()).min(per_share.len());
    scores.clear();
    scores.resize(n, 0.0);
    let score = |b: f64, p: f64, c: u32| b * scale + p * f64::from(c);
    let mut steps = (scores.chunks_exact_mut(8))
        .zip(base.chunks_exact(8))
        .zip(per_share.chunks_exact(8))
        .zip(in_flight.chunks_exact(8));
    for (((s, b), p), c) in &mut steps {
        for k in 0..8 {
            s[k] = score(b[k], p[k], c[k]);
        }
    }
    let done = n - n % 8;
    for k in done..n {
        scores[k] = score(base[k], per_share[k], in_flight[k]);
    }
}

lbwasm_plugin::export_plugin!(LeastLoaded);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::testing::MockHost;

    fn plugin(pairs: &[(&str, &str)]) -> LeastLoaded {
        lbwasm_plugin::testing::configure(pairs)
    }

    fn reporting(id: u32, cpu: f32, memory: f32, sample: u64) -> Server {
        let mut s = Server::new(id, format!("10.0.0.{id}:80"));
        s.cpu_percent = Some(cpu);
        s.memory_percent = Some(memory);
        s.load_sample = sample;
        s
    }

    fn pick(p: &mut LeastLoaded, servers: Vec<Server>, host: &MockHost) -> Option<u32> {
        let pool = Pool::new(servers);
        p.set_servers(&pool);
        p.choose(&pool, host)
    }

    #[test]
    fn prefers_lower_cpu_memory_and_in_flight() {
        // A fresh plugin per case: one report each, so the forecast is the report.
        let host = MockHost::new(3);
        let cpu = vec![
            reporting(0, 80.0, 30.0, 1),
            reporting(1, 20.0, 30.0, 1),
            reporting(2, 50.0, 30.0, 1),
        ];
        assert_eq!(pick(&mut plugin(&[]), cpu, &host), Some(1));
        let memory = vec![
            reporting(0, 40.0, 90.0, 1),
            reporting(1, 40.0, 50.0, 1),
            reporting(2, 40.0, 10.0, 1),
        ];
        assert_eq!(pick(&mut plugin(&[]), memory, &host), Some(2));
        let same = vec![
            reporting(0, 40.0, 40.0, 1),
            reporting(1, 40.0, 40.0, 1),
            reporting(2, 40.0, 40.0, 1),
        ];
        host.set_in_flight(0, 5);
        host.set_in_flight(1, 2);
        host.set_in_flight(2, 7);
        assert_eq!(pick(&mut plugin(&[]), same, &host), Some(1));
    }

    #[test]
    fn without_reports_it_is_least_connections_with_rotating_ties() {
        let host = MockHost::new(3);
        let mut p = plugin(&[]);
        let servers = || {
            (0..3)
                .map(|i| Server::new(i, format!("s{i}")))
                .collect::<Vec<_>>()
        };
        let picks: Vec<u32> = (0..6)
            .map(|_| pick(&mut p, servers(), &host).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        host.set_in_flight(0, 3);
        host.set_in_flight(1, 1);
        host.set_in_flight(2, 2);
        assert_eq!(pick(&mut p, servers(), &host), Some(1));
    }

    #[test]
    fn unreported_server_scores_on_in_flight_alone() {
        let host = MockHost::new(2);
        let mut p = plugin(&[]);
        // Busiest in flight, so its share is 1.0: worse than a 50 % CPU server with none.
        host.set_in_flight(0, 4);
        let servers = vec![Server::new(0, "quiet"), reporting(1, 50.0, 50.0, 1)];
        assert_eq!(pick(&mut p, servers.clone(), &host), Some(1));
        host.set_in_flight(0, 0);
        host.set_in_flight(1, 1);
        assert_eq!(pick(&mut p, servers, &host), Some(0));
    }

    #[test]
    fn honours_weights() {
        let host = MockHost::new(2);
        let mut p = plugin(&[]);
        let servers = vec![
            reporting(0, 30.0, 30.0, 1),
            reporting(1, 50.0, 50.0, 1).with_weight(3),
        ];
        assert_eq!(pick(&mut p, servers, &host), Some(1));
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let host = MockHost::new(3);
        let mut p = plugin(&[]);
        let servers = vec![
            reporting(0, 5.0, 5.0, 1).down(),
            reporting(1, 90.0, 90.0, 1),
            reporting(2, 60.0, 60.0, 1),
        ];
        assert_eq!(pick(&mut p, servers, &host), Some(2));
        let down = vec![Server::new(0, "a").down(), Server::new(1, "b").down()];
        assert_eq!(pick(&mut p, down, &host), None);
        assert_eq!(pick(&mut p, Vec::new(), &host), None);
    }

    /// Server 0 climbs 20, 30, 40, 50 while the others sit at 55.
    fn rising(p: &mut LeastLoaded, host: &MockHost) -> Vec<(f32, u32)> {
        [20.0, 30.0, 40.0, 50.0]
            .into_iter()
            .zip(1..)
            .map(|(cpu, sample)| {
                let servers = vec![
                    reporting(0, cpu, cpu, sample),
                    reporting(1, 55.0, 55.0, sample),
                    reporting(2, 55.0, 55.0, sample),
                ];
                (cpu, pick(p, servers, host).unwrap())
            })
            .collect()
    }

    #[test]
    fn avoids_a_climbing_server_before_it_overtakes() {
        let host = MockHost::new(3);
        let picks = rising(&mut plugin(&[]), &host);
        let avoided_at = picks.iter().find(|(_, i)| *i != 0).map(|(cpu, _)| *cpu);
        assert!(matches!(avoided_at, Some(cpu) if cpu < 55.0), "{picks:?}");
        assert_ne!(picks.last().map(|p| p.1), Some(0), "{picks:?}");
        // Without prediction the last report (50 < 55) still wins.
        let picks = rising(&mut plugin(&[("predict", "false")]), &host);
        assert!(picks.iter().all(|(_, i)| *i == 0), "{picks:?}");
    }

    #[test]
    fn refuses_invalid_options() {
        for (key, value) in [
            ("cpu_weight", "11"),
            ("memory_weight", "-1"),
            ("connections_weight", "x"),
            ("alpha", "0"),
            ("alpha", "NaN"),
            ("beta", "1.5"),
            ("horizon", "-2"),
            ("predict", "maybe"),
        ] {
            let e = LeastLoaded::configure(&mut Options::from_pairs(&[(key, value)]))
                .err()
                .unwrap();
            assert!(e.contains(&format!("`{key}`")), "{key}={value}: {e}");
        }
        let zero = [
            ("cpu_weight", "0"),
            ("memory_weight", "0"),
            ("connections_weight", "0"),
        ];
        assert!(LeastLoaded::configure(&mut Options::from_pairs(&zero)).is_err());
        let mut o = Options::from_pairs(&[("alpah", "0.3")]);
        LeastLoaded::configure(&mut o).unwrap();
        assert!(o.finish().unwrap_err().contains("`alpah`"));
    }
}
