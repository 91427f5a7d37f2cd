//! `baseline` (the stress tester of seed 004): response times with no balancer (every
//! client straight to one server) against the same clients through the proxy with each
//! plugin over three servers.

use std::time::Duration;

use super::super::Ctx;
use super::super::charts::{Axis, Body, Chart, Corner, Series, Style};
use super::super::clients::{Pacing, Route, Stop, Workload};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary;
use super::{f1, f2, workload};

const CLIENTS: usize = 12;

const ABOUT: &str = "12 closed-loop clients (each sends its next request when the previous \
one is answered) against servers that take 2-5 ms per request and process at most 4 \
requests at once (the rest queue). Baseline: no balancer, every client connected straight \
to one server, as in the seed's stress test. Every other line: the same clients through \
the proxy, with that plugin spreading them over three such servers. The curves are \
latency percentiles (HDR histogram): x is the percentile on a 'nines' scale (p50, p90, \
p99, p99.9), y the response time, log scale.\n\nWhat to look at: the baseline server queues \
8 of the 12 clients, so its whole curve sits higher; through the proxy the queueing \
disappears and what remains is the proxy hop. Round robin and the load-aware plugins \
(least_connections, least_loaded, p2c_ewma) keep the tail (p99, p99.9) lowest; random and \
the hashing plugins now and then pile requests on one server and show it in the tail.";

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report = ExperimentReport::new(
        "baseline",
        "Response times: no balancer vs every plugin",
        ABOUT,
    );
    let cfgs = (1..=3)
        .map(|i| {
            let mut c = harness::backend(
                &format!("server-{i}"),
                ctx.seed_for(&["baseline", "backend", &i.to_string()]),
            );
            c.latency = Duration::from_millis(2);
            c.latency_jitter = Duration::from_millis(3);
            c.capacity = 4;
            c
        })
        .collect();
    let backends = harness::spawn_all(cfgs).await?;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let listeners: Vec<ListenerSpec> = ctx
        .plugins
        .iter()
        .map(|p| ListenerSpec::new(&p.label, p, &addrs))
        .collect();
    let proxy = Proxy::start(&listeners).await?;
    let requests: u64 = ctx.pick(3_000, 300);
    let result = async {
        let direct = Workload {
            route: Route::Direct(vec![addrs[0]]),
            pacing: Pacing::Closed { clients: CLIENTS },
            stop: Stop::Count(requests),
            timeout: Duration::from_secs(5),
            post_share: 0.3,
            user_keys: Some(1_000_000),
            seed: ctx.seed_for(&["baseline", "clients"]),
        };
        let samples = ctx.drive("baseline (no balancer)", &direct).await;
        let s = summary::summarize("baseline (no balancer)", "none", &samples)?;
        report.add_run(s, samples);
        for p in &ctx.plugins {
            let w = workload(
                proxy.addr(&p.label)?,
                Pacing::Closed { clients: CLIENTS },
                Stop::Count(requests),
                Duration::from_secs(5),
                // The same request stream as the baseline.
                ctx.seed_for(&["baseline", "clients"]),
            );
            let samples = ctx.drive(&format!("baseline {}", p.label), &w).await;
            let s = summary::summarize(&p.label, &p.label, &samples)?;
            report.add_run(s, samples);
        }
        anyhow::Ok(())
    }
    .await;
    proxy.stop().await;
    harness::stop_all(&backends).await;
    result?;

    let mut table = Table::new(
        "Latency percentiles (ms)",
        &[
            "run", "p50", "p90", "p99", "p99.9", "max", "req/s", "failed",
        ],
    );
    let mut series = Vec::new();
    for (run, set) in report.runs.iter().zip(&report.samples) {
        let l = &run.latency;
        table.row(vec![
            run.label.clone(),
            f2(l.p50_ms),
            f2(l.p90_ms),
            f2(l.p99_ms),
            f2(l.p999_ms),
            f2(l.max_ms),
            f1(run.throughput_rps),
            (run.sent - run.succeeded).to_string(),
        ]);
        series.push(Series {
            name: run.label.clone(),
            points: summary::percentile_curve(&summary::histogram(&set.samples)?),
            style: Style::Line,
        });
    }
    report.chart(Chart {
        name: "baseline".into(),
        title: "Latency percentiles: no balancer vs each plugin (3 servers)".into(),
        x_label: "percentile".into(),
        y_label: "response time (ms)".into(),
        body: Body::Lines {
            series,
            x_axis: Axis::Nines,
            y_axis: Axis::Log,
            events: Vec::new(),
            legend: Corner::LowerRight,
        },
    });
    report.figures = serde_json::json!({
        "requests_per_run": requests,
        "clients": CLIENTS,
        "latency_ms": report.runs.iter().map(|r| (r.label.clone(), r.latency)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    report.tables.push(table);
    Ok(report)
}
