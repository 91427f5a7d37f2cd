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
//! on health and membership changes, which must not count as samples):
//!
//! ```text
//! level  = alpha·x + (1 − alpha)·(level + trend)
//! trend  = beta·(level − previous level) + (1 − beta)·trend
//! score with  level + trend·horizon   (clamped to 0..=100)
//! ```
//!
//! initialised as in the textbook (level = first sample, trend = second − first). A server
//! whose load climbs is therefore avoided before its reported load overtakes the others'.
//! Source: C. C. Holt, "Forecasting seasonals and trends by exponentially weighted moving
//! averages" (1957); NIST/SEMATECH e-Handbook of Statistical Methods, §6.4.3.3.
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

use std::collections::BTreeMap;

use lbwasm_plugin::{Host, Options, Plugin, Pool, Server};

/// The least-loaded algorithm with Holt load forecasting.
pub struct LeastLoaded {
    cpu_weight: f64,
    memory_weight: f64,
    connections_weight: f64,
    predict: bool,
    alpha: f64,
    beta: f64,
    horizon: f64,
    /// Forecast state per server id; ids are never reused, so an entry cannot be inherited.
    models: BTreeMap<u32, Model>,
    /// Per pool index: weighted sum and total weight of the reported terms. Reports change only
    /// in `set_servers`, so `choose` adds just the live in-flight term.
    reported: Vec<Reported>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Reported {
    sum: f64,
    weight: f64,
}

/// One server's forecast state.
#[derive(Clone, Debug, Default)]
struct Model {
    /// `load_sample` of the last report taken.
    sample: u64,
    cpu: Holt,
    memory: Holt,
}

/// Holt's linear smoothing of one figure.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Holt {
    level: f64,
    trend: f64,
    /// Samples taken, saturating at 2 (after which the textbook initialisation is done).
    seen: u8,
}

impl Holt {
    fn update(&mut self, x: f64, alpha: f64, beta: f64) {
        match self.seen {
            0 => {
                self.level = x;
                self.trend = 0.0;
                self.seen = 1;
            }
            1 => {
                self.trend = x - self.level;
                self.level = x;
                self.seen = 2;
            }
            _ => {
                let previous = self.level;
                self.level = alpha * x + (1.0 - alpha) * (self.level + self.trend);
                self.trend = beta * (self.level - previous) + (1.0 - beta) * self.trend;
            }
        }
    }

    fn forecast(&self, horizon: f64) -> Option<f64> {
        (self.seen > 0).then(|| (self.level + self.trend * horizon).clamp(0.0, 100.0))
    }
}

/// A reported percentage, or `None` when absent or not a number.
fn percent(v: Option<f32>) -> Option<f64> {
    v.filter(|v| v.is_finite())
        .map(|v| (v as f64).clamp(0.0, 100.0))
}

/// `Options::number` lets `NaN` through for floats (it compares false with both bounds).
fn real(
    o: &mut Options,
    key: &'static str,
    default: f64,
    min: f64,
    max: f64,
) -> Result<f64, String> {
    let v = o.number(key, default, min, max)?;
    if v.is_nan() {
        return Err(format!(
            "option `{key}`: expected a number from {min} to {max}, got NaN"
        ));
    }
    Ok(v)
}

impl LeastLoaded {
    /// Takes a new report into the server's model, once per `load_sample`.
    fn observe(&self, model: &mut Model, s: &Server) {
        if s.load_sample < model.sample {
            // A counter going back means the host restarted its count: start over.
            *model = Model::default();
        }
        if s.load_sample == 0 || s.load_sample == model.sample {
            return;
        }
        model.sample = s.load_sample;
        if let Some(cpu) = percent(s.cpu_percent) {
            model.cpu.update(cpu, self.alpha, self.beta);
        }
        if let Some(memory) = percent(s.memory_percent) {
            model.memory.update(memory, self.alpha, self.beta);
        }
    }

    /// The reported terms of one server: forecast or last value, only for figures it reports.
    fn reported_terms(&self, model: &Model, s: &Server) -> Reported {
        let mut r = Reported::default();
        let terms = [
            (percent(s.cpu_percent), &model.cpu, self.cpu_weight),
            (percent(s.memory_percent), &model.memory, self.memory_weight),
        ];
        for (last, holt, weight) in terms {
            let Some(last) = last else { continue };
            let value = if self.predict {
                holt.forecast(self.horizon).unwrap_or(last)
            } else {
                last
            };
            r.sum += weight * value / 100.0;
            r.weight += weight;
        }
        r
    }

    /// Score of server `i` given its in-flight share (0..=1 of the busiest eligible server).
    fn score(&self, pool: &Pool, i: u32, in_flight_share: f64) -> f64 {
        let r = self.reported.get(i as usize).copied().unwrap_or_default();
        let total = r.weight + self.connections_weight;
        let load = if total > 0.0 {
            (r.sum + self.connections_weight * in_flight_share) / total
        } else {
            // connections_weight = 0 and nothing reported: in-flight is all there is.
            in_flight_share
        };
        load / pool.server(i).effective_weight() as f64
    }
}

impl Plugin for LeastLoaded {
    // `[reads-load]` asks the host to poll the backends' load endpoint for this plugin.
    const DESCRIPTION: &'static str = "least loaded by forecast CPU, memory and in-flight per unit of weight (Holt smoothing) [reads-load]";

    fn configure(o: &mut Options) -> Result<Self, String> {
        let cpu_weight = real(o, "cpu_weight", 0.5, 0.0, 10.0)?;
        let memory_weight = real(o, "memory_weight", 0.2, 0.0, 10.0)?;
        let connections_weight = real(o, "connections_weight", 0.3, 0.0, 10.0)?;
        if cpu_weight + memory_weight + connections_weight <= 0.0 {
            return Err(
                "options `cpu_weight`, `memory_weight`, `connections_weight`: at least one must be above 0"
                    .to_string(),
            );
        }
        let predict = o.boolean("predict", true)?;
        let alpha = real(o, "alpha", 0.5, 0.0, 1.0)?;
        if alpha <= 0.0 {
            return Err(
                "option `alpha`: must be above 0 (0 would never take a new sample)".to_string(),
            );
        }
        let beta = real(o, "beta", 0.5, 0.0, 1.0)?;
        let horizon = real(o, "horizon", 2.0, 0.0, 100.0)?;
        Ok(LeastLoaded {
            cpu_weight,
            memory_weight,
            connections_weight,
            predict,
            alpha,
            beta,
            horizon,
            models: BTreeMap::new(),
            reported: Vec::new(),
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        let mut old = std::mem::take(&mut self.models);
        let mut reported = Vec::with_capacity(pool.servers.len());
        for s in &pool.servers {
            // Servers that left the pool are dropped with `old`.
            let mut model = old.remove(&s.id).unwrap_or_default();
            self.observe(&mut model, s);
            reported.push(self.reported_terms(&model, s));
            self.models.insert(s.id, model);
        }
        self.reported = reported;
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        match eligible {
            [] => return None,
            [only] => return Some(*only),
            _ => {}
        }
        let in_flight = host.in_flight();
        let in_flight_of = |i: u32| in_flight.get(i as usize).copied().unwrap_or(0);
        let busiest = eligible.iter().map(|&i| in_flight_of(i)).max().unwrap_or(0);
        let share = |i: u32| {
            if busiest == 0 {
                0.0
            } else {
                in_flight_of(i) as f64 / busiest as f64
            }
        };

        let mut best = f64::INFINITY;
        let mut tied: Vec<u32> = Vec::new();
        for &i in eligible {
            let s = self.score(pool, i, share(i));
            if s < best {
                best = s;
                tied.clear();
            }
            if s <= best {
                tied.push(i);
            }
        }
        match tied.as_slice() {
            [] => eligible.first().copied(),
            [one] => Some(*one),
            // Only a tie costs the shared-counter call; the global sequence spreads the tie
            // evenly across worker threads too.
            _ => Some(tied[(host.sequence() % tied.len() as u64) as usize]),
        }
    }
}

lbwasm_plugin::export_plugin!(LeastLoaded);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::testing::MockHost;

    fn plugin(pairs: &[(&str, &str)]) -> LeastLoaded {
        let mut o = Options::from_pairs(pairs);
        let p = LeastLoaded::configure(&mut o).unwrap();
        o.finish().unwrap();
        p
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
    fn takes_each_report_exactly_once() {
        let mut once = plugin(&[]);
        let mut repeated = plugin(&[]);
        for (cpu, sample) in [(20.0, 1), (30.0, 2), (40.0, 3)] {
            let pool = Pool::new(vec![reporting(7, cpu, cpu, sample), Server::new(8, "b")]);
            once.set_servers(&pool);
            // Health flaps and re-orderings re-push the same report.
            repeated.set_servers(&pool);
            repeated.set_servers(&Pool::new(vec![
                Server::new(8, "b").down(),
                reporting(7, cpu, cpu, sample),
            ]));
            repeated.set_servers(&pool);
        }
        assert_eq!(once.models[&7].cpu, repeated.models[&7].cpu);
        // 20, 30 → level 30, trend 10; 40 → level 40, trend 10; forecast 40 + 2·10.
        assert_eq!(once.models[&7].cpu.forecast(2.0), Some(60.0));
        // A server that leaves takes its model along.
        once.set_servers(&Pool::new(vec![Server::new(8, "b")]));
        assert!(!once.models.contains_key(&7));
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
