//! Turning a run's samples into figures: counts per backend and per outcome, and latency
//! percentiles from an HDR histogram (microsecond resolution, 3 significant digits).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::clients::{Outcome, Sample, Verb};

/// Latency percentiles of a run, in milliseconds. Failed requests count at the latency at
/// which they failed (a timeout at the client timeout), so a plugin cannot look fast by
/// letting requests time out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// What one run of traffic did, as the clients saw it. Invariant:
/// `sum(per_backend) + unattributed == sent`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Which run of the experiment (a plugin name, `n=3 round_robin`, `baseline`, ...).
    pub label: String,
    /// The plugin balancing it; `none` when clients went straight to servers.
    pub plugin: String,
    /// Requests sent.
    pub sent: u64,
    /// Answered 2xx.
    pub succeeded: u64,
    /// Answered, but not 2xx (a backend's 500, the proxy's 502/503).
    pub http_errors: u64,
    /// No answer at all (connect, reset, timeout).
    pub failed: u64,
    /// Of `http_errors + failed`: GETs (idempotent, so retries should have saved them).
    pub failed_idempotent: u64,
    /// Of `http_errors + failed`: POSTs.
    pub failed_non_idempotent: u64,
    /// Non-2xx outcomes by kind: `status 503`, `timeout`, `reset`, ...
    pub errors: BTreeMap<String, u64>,
    /// Answers per backend (`x-served-by`), errors from a backend included.
    pub per_backend: BTreeMap<String, u64>,
    /// Requests no backend answered (client-side failures, proxy-generated errors).
    pub unattributed: u64,
    /// `succeeded / sent`.
    pub success_rate: f64,
    pub latency: Latency,
    /// From the first start to the last completion, seconds.
    pub duration_s: f64,
    /// `sent / duration_s`.
    pub throughput_rps: f64,
}

/// An empty latency histogram in microseconds, 1 µs to 1 h.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| anyhow::anyhow!("creating a latency histogram: {e:?}"))
}

/// Histogram of the samples' latencies.
pub fn histogram<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = new_histogram()?;
    for s in samples {
        h.saturating_record(micros(s.latency));
    }
    Ok(h)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Milliseconds of an HDR value in microseconds.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Percentiles of a histogram.
pub fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// The percentile curve of a histogram for a chart: x in "nines" (`-log10(1 - q)`: 1 = p90,
/// 2 = p99, 3 = p99.9), y in milliseconds.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=60)
        .map(|i| {
            let nines = f64::from(i) * 0.05;
            let q = 1.0 - 10f64.powf(-nines);
            (nines, ms(h.value_at_quantile(q)))
        })
        .collect()
}

/// Summarises one run.
pub fn summarize(label: &str, plugin: &str, samples: &[Sample]) -> anyhow::Result<RunSummary> {
    let mut s = RunSummary {
        label: label.to_string(),
        plugin: plugin.to_string(),
        sent: samples.len() as u64,
        ..RunSummary::default()
    };
    let mut first = Duration::MAX;
    let mut last = Duration::ZERO;
    for x in samples {
        first = first.min(x.start);
        last = last.max(x.start + x.latency);
        match &x.backend {
            Some(b) => *s.per_backend.entry(b.to_string()).or_default() += 1,
            None => s.unattributed += 1,
        }
        match x.outcome {
            o if o.ok() => s.succeeded += 1,
            Outcome::Status(code) => {
                s.http_errors += 1;
                *s.errors.entry(format!("status {code}")).or_default() += 1;
            }
            Outcome::Failed(kind) => {
                s.failed += 1;
                *s.errors.entry(kind.as_str().to_string()).or_default() += 1;
            }
        }
        if !x.outcome.ok() {
            match x.verb {
                Verb::Get => s.failed_idempotent += 1,
                Verb::Post => s.failed_non_idempotent += 1,
            }
        }
    }
    if s.sent > 0 {
        s.success_rate = s.succeeded as f64 / s.sent as f64;
        s.duration_s = last.saturating_sub(first).as_secs_f64();
        if s.duration_s > 0.0 {
            s.throughput_rps = s.sent as f64 / s.duration_s;
        }
    }
    s.latency = latency(&histogram(samples)?);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::clients::ErrorKind;
    use std::sync::Arc;

    fn sample(ms: u64, backend: Option<&str>, outcome: Outcome, verb: Verb) -> Sample {
        Sample {
            start: Duration::from_millis(ms),
            latency: Duration::from_millis(ms),
            backend: backend.map(Arc::from),
            outcome,
            verb,
            tries: 1,
        }
    }

    #[test]
    fn counts_add_up() {
        let samples = vec![
            sample(1, Some("a"), Outcome::Status(200), Verb::Get),
            sample(2, Some("a"), Outcome::Status(500), Verb::Post),
            sample(3, Some("b"), Outcome::Status(200), Verb::Get),
            sample(4, None, Outcome::Status(503), Verb::Get),
            sample(5, None, Outcome::Failed(ErrorKind::Timeout), Verb::Get),
        ];
        let s = summarize("x", "round_robin", &samples).unwrap();
        assert_eq!(s.sent, 5);
        assert_eq!(s.succeeded, 2);
        assert_eq!(s.http_errors, 2);
        assert_eq!(s.failed, 1);
        assert_eq!(s.failed_idempotent, 2);
        assert_eq!(s.failed_non_idempotent, 1);
        assert_eq!(s.per_backend.values().sum::<u64>() + s.unattributed, s.sent);
        assert_eq!(s.errors["timeout"], 1);
        assert!((s.latency.max_ms - 5.0).abs() < 0.01);
        assert!((s.latency.p50_ms - 3.0).abs() < 0.01);
    }

    #[test]
    fn percentile_curve_is_monotonic() {
        let samples: Vec<_> = (1..=1000)
            .map(|i| sample(i, None, Outcome::Status(200), Verb::Get))
            .collect();
        let curve = percentile_curve(&histogram(&samples).unwrap());
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1));
        // x = 1 is p90, x = 2 is p99.
        assert!((curve[20].1 - 900.0).abs() < 2.0, "{:?}", curve[20]);
        assert!((curve[40].1 - 990.0).abs() < 2.0, "{:?}", curve[40]);
    }
}
