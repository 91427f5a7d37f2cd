//! Trend forecasts of the load figures backends report, for plugins that want to avoid a
//! server before its reported load gets there. Reports arrive about once a second, so the
//! last value always lags; [`Holt`] smooths a series and extrapolates its trend, and
//! [`LoadTrends`] keeps one per server and figure, fed exactly once per report.
//!
//! Holt's linear (double exponential) smoothing:
//!
//! ```text
//! level  = alpha·x + (1 − alpha)·(level + trend)
//! trend  = beta·(level − previous level) + (1 − beta)·trend
//! forecast(h) = level + trend·h
//! ```
//!
//! initialised as in the textbook (level = first sample, trend = second − first). Source:
//! C. C. Holt, "Forecasting seasonals and trends by exponentially weighted moving averages"
//! (1957); NIST/SEMATECH e-Handbook of Statistical Methods, §6.4.3.3.

use std::collections::BTreeMap;

use crate::{Pool, Server};

/// Smoothing factors of [`Holt`]: `alpha` for the level (above 0 up to 1; 1 trusts the last
/// sample alone), `beta` for the trend (0..=1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Smoothing {
    /// Level smoothing.
    pub alpha: f64,
    /// Trend smoothing.
    pub beta: f64,
}

/// Holt's linear smoothing of one series of percentages.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Holt {
    level: f64,
    trend: f64,
    /// Samples taken, saturating at 2 (after which the textbook initialisation is done).
    seen: u8,
}

impl Holt {
    /// Takes one sample.
    pub fn update(&mut self, x: f64, s: Smoothing) {
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
                self.level = s.alpha * x + (1.0 - s.alpha) * (self.level + self.trend);
                self.trend = s.beta * (self.level - previous) + (1.0 - s.beta) * self.trend;
            }
        }
    }

    /// The value `horizon` samples ahead, clamped to 0..=100; `None` before the first sample.
    pub fn forecast(&self, horizon: f64) -> Option<f64> {
        (self.seen > 0).then(|| (self.level + self.trend * horizon).clamp(0.0, 100.0))
    }
}

/// One server's forecasts of its reported CPU and memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Trend {
    /// `load_sample` of the last report taken.
    sample: u64,
    /// Reported CPU %.
    pub cpu: Holt,
    /// Reported memory %.
    pub memory: Holt,
}

/// A [`Trend`] per server, keyed by its stable id (ids are never reused, so a model cannot be
/// inherited). The pool is pushed on health and membership changes too, which must not count
/// as samples: a report is taken only when the server's `load_sample` grows.
#[derive(Clone, Debug, Default)]
pub struct LoadTrends {
    trends: BTreeMap<u32, Trend>,
}

impl LoadTrends {
    /// Takes every new report in `pool`; servers that left the pool are forgotten.
    pub fn update(&mut self, pool: &Pool, smoothing: Smoothing) {
        let mut old = std::mem::take(&mut self.trends);
        for s in &pool.servers {
            let mut t = old.remove(&s.id).unwrap_or_default();
            if s.load_sample < t.sample {
                // A counter going back means the host restarted its count: start over.
                t = Trend::default();
            }
            if s.load_sample != 0 && s.load_sample != t.sample {
                t.sample = s.load_sample;
                if let Some(cpu) = s.cpu() {
                    t.cpu.update(cpu, smoothing);
                }
                if let Some(memory) = s.memory() {
                    t.memory.update(memory, smoothing);
                }
            }
            self.trends.insert(s.id, t);
        }
    }

    /// Server `s`'s reported CPU and memory % to score with: each forecast `horizon` reports
    /// ahead, or the last report without a horizon (or before a first sample); `None` for a
    /// figure the server does not report, which is unknown rather than 0.
    pub fn figures(&self, s: &Server, horizon: Option<f64>) -> [Option<f64>; 2] {
        let t = self.trends.get(&s.id).copied().unwrap_or_default();
        let at = |holt: Holt, last: Option<f64>| {
            let last = last?;
            Some(horizon.and_then(|h| holt.forecast(h)).unwrap_or(last))
        };
        [at(t.cpu, s.cpu()), at(t.memory, s.memory())]
    }

    /// The trend of server `id`, if it is in the pool.
    pub fn get(&self, id: u32) -> Option<&Trend> {
        self.trends.get(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: Smoothing = Smoothing {
        alpha: 0.5,
        beta: 0.5,
    };

    #[test]
    fn holt_follows_the_textbook() {
        let mut h = Holt::default();
        assert_eq!(h.forecast(2.0), None);
        h.update(20.0, HALF);
        assert_eq!(h.forecast(2.0), Some(20.0));
        // 20, 30 → level 30, trend 10; 40 → level 40, trend 10; forecast 40 + 2·10.
        h.update(30.0, HALF);
        h.update(40.0, HALF);
        assert_eq!(h.forecast(2.0), Some(60.0));
        assert_eq!(h.forecast(10.0), Some(100.0), "clamped");
        h.update(10.0, HALF);
        // level 0.5·10 + 0.5·50 = 30, trend 0.5·(30 − 40) + 0.5·10 = 0.
        assert_eq!(h.forecast(5.0), Some(30.0));
    }

    fn reporting(id: u32, cpu: f32, sample: u64) -> Server {
        let mut s = Server::new(id, format!("s{id}"));
        s.cpu_percent = Some(cpu);
        s.load_sample = sample;
        s
    }

    #[test]
    fn takes_each_report_exactly_once() {
        let (mut once, mut repeated) = (LoadTrends::default(), LoadTrends::default());
        for (cpu, sample) in [(20.0, 1), (30.0, 2), (40.0, 3)] {
            let pool = Pool::new(vec![reporting(7, cpu, sample), Server::new(8, "b")]);
            once.update(&pool, HALF);
            // Health flaps and re-orderings re-push the same report.
            repeated.update(&pool, HALF);
            let flapped = vec![Server::new(8, "b").down(), reporting(7, cpu, sample)];
            repeated.update(&Pool::new(flapped), HALF);
            repeated.update(&pool, HALF);
        }
        assert_eq!(once.get(7), repeated.get(7));
        assert_eq!(once.get(7).unwrap().cpu.forecast(2.0), Some(60.0));
        assert_eq!(
            once.get(7).unwrap().memory.forecast(2.0),
            None,
            "not reported"
        );
        // A counter going back starts over; a server that leaves takes its trend along.
        once.update(&Pool::new(vec![reporting(7, 50.0, 1)]), HALF);
        assert_eq!(once.get(7).unwrap().cpu.forecast(2.0), Some(50.0));
        once.update(&Pool::new(vec![Server::new(8, "b")]), HALF);
        assert!(once.get(7).is_none());
    }

    #[test]
    fn figures_forecast_or_last() {
        let mut trends = LoadTrends::default();
        let mut s = reporting(1, 20.0, 1);
        trends.update(&Pool::new(vec![s.clone()]), HALF);
        s = reporting(1, 30.0, 2);
        trends.update(&Pool::new(vec![s.clone()]), HALF);
        assert_eq!(trends.figures(&s, Some(2.0)), [Some(50.0), None]);
        assert_eq!(trends.figures(&s, None), [Some(30.0), None]);
        // Reported but not yet taken (a pool the trends have not seen): the last report.
        assert_eq!(
            trends.figures(&reporting(2, 70.0, 1), Some(2.0)),
            [Some(70.0), None]
        );
    }
}
