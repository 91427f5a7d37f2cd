//! `heterogeneous`: backends of different speed and capacity, one of which turns slow
//! mid-run, under open-loop load the pool can only just carry — where load-aware plugins
//! earn their keep. Per plugin: p50/p90/p99/p99.9 latency and success rate under a client
//! timeout.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use super::super::Ctx;
use super::super::charts::{Axis, Body, Chart, Corner, Series, Style};
use super::super::clients::{Pacing, Sample, Stop};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary;
use super::{f1, pct, workload};
use crate::backend::{BackendConfig, BackendHandle, Fault};

/// Offered load per plugin, requests per second.
const RATE: f64 = 350.0;
/// Extra latency of the `slow` fault on the backend that turns slow.
const FAULT_LATENCY: Duration = Duration::from_millis(100);

/// (id, latency ms, jitter ms, capacity).
const POOL: [(&str, u64, u64, usize); 5] = [
    ("fast-1", 20, 8, 6),
    ("fast-2", 20, 8, 6),
    ("medium", 50, 20, 4),
    ("slow", 120, 40, 2),
    ("turns-slow", 20, 8, 4),
];

const LISTENER: &str = "[listener.load_report]
interval = \"250ms\"";

const ABOUT: &str = "Four backends that differ: fast (20-28 ms per request, 6 at once), \
medium (50-70 ms, 4 at once), slow (120-160 ms, 2 at once) and turns-slow (like fast but 4 \
at once, until a 'slow' fault window adds 200 ms per request from 30% to 70% of the measured \
run). Requests beyond a backend's capacity queue. The capacities add up to about 500 \
requests/s, 350 during the fault; the clients send 250 requests/s open loop (Poisson \
arrivals, sent on schedule whatever the answers, latency measured from the scheduled start \
so that queueing is never hidden) with a 1 s client timeout; a timed-out request counts at \
the timeout. Every plugin gets its own pool and proxy and the same seeded request stream; \
the plugins run side by side, at the same time, so they share the machine's conditions. \
The first seconds warm the pool up (plugins that learn latencies need samples) and are not \
counted.\n\nWhat to look at: round robin (and random, and the hashing plugins, which spread \
keys evenly) send a quarter of the traffic to the slow backend, several times what it can \
do, so its queue grows for the whole run and the tail (p99, p99.9) hits the timeout. \
Load-aware plugins see it: least_connections and least_loaded by the requests in flight, \
p2c_ewma by measured latency times requests in flight; they send the slow backends only \
what they can take, and their p99 stays far lower. weighted_response_time weighs by \
latency alone, so it reacts to the fault only as slow answers come back, and its tail can \
still reach the timeout. The per-backend shares in the table show \
the decision each plugin made (a request that timed out is not attributed: the slow \
backend's 0% under round robin means it answered hardly anything in time, not that it got \
nothing).";

/// One plugin's own pool and proxy.
struct Setup {
    label: String,
    backends: Vec<BackendHandle>,
    proxy: Option<Proxy>,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report = ExperimentReport::new(
        "heterogeneous",
        "Tail latency with backends of different speed and capacity",
        ABOUT,
    );
    let warmup = Duration::from_secs_f64(ctx.pick(1.0, 0.5));
    let measured = Duration::from_secs_f64(ctx.pick(6.0, 2.0));
    let timeout = Duration::from_secs(1);
    let mut setups = Vec::new();
    let started = set_up(ctx, &mut setups).await;
    let result = match started {
        Ok(()) => drive(ctx, &setups, warmup, measured, timeout).await,
        Err(e) => Err(e),
    };
    for s in &mut setups {
        if let Some(proxy) = s.proxy.take() {
            proxy.stop().await;
        }
        harness::stop_all(&s.backends).await;
    }
    for (label, mut samples) in result? {
        // The warm-up is not counted.
        samples.retain(|s| s.start >= warmup);
        let s = summary::summarize(&label, &label, &samples)?;
        report.add_run(s, samples);
    }

    let mut table = Table::new(
        "Latency (ms), success under the 1 s client timeout, share of requests each backend answered in time",
        &[
            "plugin",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "success",
            "timeouts",
            "fast-1",
            "fast-2",
            "medium",
            "slow",
            "turns-slow",
        ],
    );
    let mut curves = Vec::new();
    for (run, set) in report.runs.iter().zip(&report.samples) {
        let l = &run.latency;
        let mut row = vec![
            run.label.clone(),
            f1(l.p50_ms),
            f1(l.p90_ms),
            f1(l.p99_ms),
            f1(l.p999_ms),
            pct(run.success_rate),
            run.errors.get("timeout").copied().unwrap_or(0).to_string(),
        ];
        for (id, ..) in POOL {
            let c = run.per_backend.get(id).copied().unwrap_or(0);
            row.push(pct(c as f64 / run.sent.max(1) as f64));
        }
        table.row(row);
        curves.push(Series {
            name: run.label.clone(),
            points: summary::percentile_curve(&summary::histogram(&set.samples)?),
            style: Style::Line,
        });
    }
    let labels: Vec<String> = report.runs.iter().map(|r| r.label.clone()).collect();
    let pick = |f: fn(&summary::Latency) -> f64| -> Vec<f64> {
        report.runs.iter().map(|r| f(&r.latency)).collect()
    };
    let bars = vec![
        ("p50".to_string(), pick(|l| l.p50_ms)),
        ("p90".to_string(), pick(|l| l.p90_ms)),
        ("p99".to_string(), pick(|l| l.p99_ms)),
        ("p99.9".to_string(), pick(|l| l.p999_ms)),
    ];
    report.chart(Chart {
        name: "heterogeneous".into(),
        title: format!(
            "Heterogeneous pool at {RATE} req/s: latency percentiles (timeout {} ms)",
            timeout.as_millis()
        ),
        x_label: "response time (ms, log scale)".into(),
        y_label: "plugin".into(),
        body: Body::Bars {
            categories: labels,
            series: bars,
            log: true,
            reference: Some(("client timeout".into(), timeout.as_secs_f64() * 1000.0)),
        },
    });
    report.chart(Chart {
        name: "heterogeneous_percentiles".into(),
        title: "Heterogeneous pool: latency percentile curves".into(),
        x_label: "percentile".into(),
        y_label: "response time (ms)".into(),
        body: Body::Lines {
            series: curves,
            x_axis: Axis::Nines,
            y_axis: Axis::Log,
            events: Vec::new(),
            legend: Corner::LowerRight,
        },
    });
    report.figures = serde_json::json!({
        "rate_rps": RATE,
        "warmup_s": warmup.as_secs_f64(),
        "measured_s": measured.as_secs_f64(),
        "client_timeout_ms": timeout.as_millis() as u64,
        "pool": POOL.iter().map(|(id, l, j, c)| serde_json::json!({
            "id": id, "latency_ms": l, "jitter_ms": j, "capacity": c,
        })).collect::<Vec<_>>(),
        "slow_fault": { "backend": "turns-slow", "extra_ms": FAULT_LATENCY.as_millis() as u64, "from_s": (warmup + measured.mul_f64(0.3)).as_secs_f64(), "to_s": (warmup + measured.mul_f64(0.7)).as_secs_f64() },
        "latency_ms": report.runs.iter().map(|r| (r.label.clone(), r.latency)).collect::<BTreeMap<_, _>>(),
        "success_rate": report.runs.iter().map(|r| (r.label.clone(), r.success_rate)).collect::<BTreeMap<_, _>>(),
    });
    report.tables.push(table);
    Ok(report)
}

/// Starts every plugin's pool and proxy (pushing each into `setups` as it starts, so that
/// the caller can stop whatever started even on an error).
async fn set_up(ctx: &Ctx, setups: &mut Vec<Setup>) -> anyhow::Result<()> {
    for p in &ctx.plugins {
        let cfgs: Vec<BackendConfig> = POOL
            .iter()
            .map(|(id, latency, jitter, capacity)| {
                let mut c = harness::backend(id, ctx.seed_for(&["heterogeneous", "backend", id]));
                c.latency = Duration::from_millis(*latency);
                c.latency_jitter = Duration::from_millis(*jitter);
                c.capacity = *capacity;
                c
            })
            .collect();
        let backends = harness::spawn_all(cfgs).await?;
        let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
        let mut setup = Setup {
            label: p.label.clone(),
            backends,
            proxy: None,
        };
        let proxy = Proxy::start(&[ListenerSpec::new("hetero", p, &addrs).extra(LISTENER)]).await;
        let failed = proxy.is_err();
        setup.proxy = proxy.ok();
        setups.push(setup);
        if failed {
            anyhow::bail!("starting the proxy for {}", p.label);
        }
    }
    Ok(())
}

/// Runs every plugin's traffic at the same time; returns (plugin, samples).
async fn drive(
    ctx: &Ctx,
    setups: &[Setup],
    warmup: Duration,
    measured: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<(String, Vec<Sample>)>> {
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut runs = Vec::new();
    for s in setups {
        let addr = s
            .proxy
            .as_ref()
            .context("proxy not started")?
            .addr("hetero")?;
        let w = workload(
            addr,
            Pacing::Open {
                rate: RATE,
                clients: 64,
            },
            Stop::Duration(warmup + measured),
            timeout,
            ctx.seed_for(&["heterogeneous", "clients"]),
        );
        let turns_slow = &s.backends[4];
        let bar = format!("heterogeneous {}", s.label);
        runs.push(async move {
            let fault = async {
                tokio::time::sleep_until(t0 + warmup + measured.mul_f64(0.3)).await;
                turns_slow.set_fault(Some(Fault::Slow(FAULT_LATENCY)));
                tokio::time::sleep_until(t0 + warmup + measured.mul_f64(0.7)).await;
                turns_slow.set_fault(None);
            };
            let (samples, ()) = tokio::join!(ctx.drive_from(&bar, &w, t0), fault);
            (s.label.clone(), samples)
        });
    }
    Ok(futures_util::future::join_all(runs).await)
}
