//! `scaling` (the seed's A-2): the same offered load over 2 to 6 backends; average load per
//! server as requests served and as the CPU the backends report about themselves.

use std::time::Duration;

use tokio::time::Instant;

use super::super::Ctx;
use super::super::charts::{Axis, Body, Chart, Corner, Series, Style};
use super::super::clients::{Pacing, Stop};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary;
use super::{f1, workload};
use crate::backend::BackendHandle;

const PLUGINS: &[&str] = &["round_robin", "least_connections", "least_loaded"];
const MAX_SERVERS: usize = 6;

const ABOUT: &str = "A fixed open-loop load (250 requests/s, Poisson arrivals) is spread over \
2, 3, 4, 5 and 6 identical backends, each request costing 300 us of real CPU on the backend \
(each plugin has its own servers; the three plugins run side by side). For each pool \
size: requests served per server (average, and the busiest server) and the CPU each server \
reports on its /load endpoint (average over the run, percent of one core).\n\nWhat to look \
at: the average load per server falls as 1/n for every plugin — the balancer scales out. \
Round robin and least_connections keep the busiest server close to the average; \
least_loaded steers by the CPU the backends report about once a second (forecast with Holt \
smoothing), so over a short run it spreads less evenly. CPU follows requests, with \
measurement noise from sharing two cores with the proxy and the clients.";

/// One (plugin, pool size) run's loads.
#[derive(Clone, Debug, serde::Serialize)]
struct Point {
    plugin: String,
    servers: usize,
    requests_per_server: f64,
    busiest_server: u64,
    cpu_percent_per_server: f64,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report = ExperimentReport::new(
        "scaling",
        "Average load per server with 2 to 6 servers",
        ABOUT,
    );
    // Each plugin has its own six servers, so the three plugins can run side by side and
    // every server's CPU figure is its own plugin's doing.
    let mut cfgs = Vec::new();
    for p in PLUGINS {
        for i in 1..=MAX_SERVERS {
            let mut c = harness::backend(
                &format!("server-{i}"),
                ctx.seed_for(&["scaling", "backend", p, &i.to_string()]),
            );
            c.latency = Duration::from_millis(1);
            c.latency_jitter = Duration::from_millis(2);
            c.cpu_work = Duration::from_micros(300);
            cfgs.push(c);
        }
    }
    let backends = harness::spawn_all(cfgs).await?;
    let mut listeners = Vec::new();
    for (k, p) in PLUGINS.iter().enumerate() {
        let plugin = ctx.builtin(p);
        let addrs: Vec<_> = backends[k * MAX_SERVERS..(k + 1) * MAX_SERVERS]
            .iter()
            .map(|b| b.addr())
            .collect();
        for n in 2..=MAX_SERVERS {
            listeners.push(ListenerSpec::new(&format!("{p}-{n}"), &plugin, &addrs[..n]));
        }
    }
    let result = match Proxy::start(&listeners).await {
        Ok(proxy) => {
            let r = drive(ctx, &proxy, &backends, &mut report).await;
            proxy.stop().await;
            r
        }
        Err(e) => Err(e),
    };
    harness::stop_all(&backends).await;
    let points = result?;

    let mut table = Table::new(
        "Load per server",
        &[
            "plugin",
            "servers",
            "requests/server",
            "busiest server",
            "CPU %/server",
        ],
    );
    for p in &points {
        table.row(vec![
            p.plugin.clone(),
            p.servers.to_string(),
            f1(p.requests_per_server),
            p.busiest_server.to_string(),
            f1(p.cpu_percent_per_server),
        ]);
    }
    let line = |plugin: &str, f: &dyn Fn(&Point) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|p| p.plugin == plugin)
            .map(|p| (p.servers as f64, f(p)))
            .collect()
    };
    let mut requests_series = Vec::new();
    for p in PLUGINS {
        requests_series.push(Series {
            name: format!("{p} (average)"),
            points: line(p, &|x| x.requests_per_server),
            style: Style::LineDots,
        });
    }
    for p in PLUGINS {
        requests_series.push(Series {
            name: format!("{p} (busiest)"),
            points: line(p, &|x| x.busiest_server as f64),
            style: Style::Line,
        });
    }
    report.chart(Chart {
        name: "scaling_requests".into(),
        title: "Requests per server vs number of servers".into(),
        x_label: "servers".into(),
        y_label: "requests per server".into(),
        body: Body::Lines {
            series: requests_series,
            x_axis: Axis::Count,
            y_axis: Axis::Linear,
            events: Vec::new(),
            legend: Corner::UpperRight,
        },
    });
    report.chart(Chart {
        name: "scaling_cpu".into(),
        title: "Backend-reported CPU per server vs number of servers".into(),
        x_label: "servers".into(),
        y_label: "CPU % of one core (average per server)".into(),
        body: Body::Lines {
            series: PLUGINS
                .iter()
                .map(|p| Series {
                    name: (*p).to_string(),
                    points: line(p, &|x| x.cpu_percent_per_server),
                    style: Style::LineDots,
                })
                .collect(),
            x_axis: Axis::Count,
            y_axis: Axis::Linear,
            events: Vec::new(),
            legend: Corner::UpperRight,
        },
    });
    report.figures = serde_json::json!({ "points": points });
    report.tables.push(table);
    Ok(report)
}

async fn drive(
    ctx: &Ctx,
    proxy: &Proxy,
    backends: &[BackendHandle],
    report: &mut ExperimentReport,
) -> anyhow::Result<Vec<Point>> {
    let rate = 250.0;
    let duration = Duration::from_secs_f64(ctx.pick(2.0, 0.3));
    let mut points = Vec::new();
    for n in 2..=MAX_SERVERS {
        let t0 = Instant::now();
        let mut runs = Vec::new();
        for (k, p) in PLUGINS.iter().enumerate() {
            let label = format!("{p}-{n}");
            let w = workload(
                proxy.addr(&label)?,
                Pacing::Open { rate, clients: 32 },
                Stop::Duration(duration),
                Duration::from_secs(5),
                ctx.seed_for(&["scaling", "clients", &n.to_string()]),
            );
            let servers = &backends[k * MAX_SERVERS..k * MAX_SERVERS + n];
            runs.push(async move {
                let bar = format!("scaling {label}");
                let (samples, cpu) = tokio::join!(
                    ctx.drive_from(&bar, &w, t0),
                    sample_cpu(servers, t0, duration)
                );
                (*p, samples, cpu)
            });
        }
        for (p, samples, cpu) in futures_util::future::join_all(runs).await {
            let s = summary::summarize(&format!("n={n} {p}"), p, &samples)?;
            points.push(Point {
                plugin: p.to_string(),
                servers: n,
                requests_per_server: s.per_backend.values().sum::<u64>() as f64 / n as f64,
                busiest_server: s.per_backend.values().copied().max().unwrap_or(0),
                cpu_percent_per_server: cpu,
            });
            report.add_run(s, samples);
        }
    }
    points.sort_by_key(|p| (PLUGINS.iter().position(|x| *x == p.plugin), p.servers));
    Ok(points)
}

/// Average of the servers' reported CPU %, sampled every 100 ms once the report (which
/// covers about the last second) no longer shows the previous run — or over the second half
/// of a short run.
async fn sample_cpu(backends: &[BackendHandle], t0: Instant, duration: Duration) -> f64 {
    let from = if duration > Duration::from_millis(1200) {
        Duration::from_secs(1)
    } else {
        duration / 2
    };
    tokio::time::sleep_until(t0 + from).await;
    let mut sum = 0.0;
    let mut n = 0u32;
    while t0.elapsed() < duration {
        let total: f64 = backends
            .iter()
            .map(|b| f64::from(b.stats().cpu_percent))
            .sum();
        sum += total / backends.len().max(1) as f64;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}
