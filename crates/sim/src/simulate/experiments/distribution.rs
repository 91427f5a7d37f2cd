//! `distribution` (the seed's A-1): 10,000 async requests over 3 backends per plugin, and
//! how many each backend served.

use std::collections::BTreeMap;
use std::time::Duration;

use super::super::Ctx;
use super::super::charts::{Body, Chart};
use super::super::clients::{Pacing, Stop};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary;
use super::{f2, workload};

const ABOUT: &str = "Every plugin balances the same request stream (closed loop, 32 concurrent \
clients, 30% POST, random paths and user keys) over the same 3 identical backends \
(0-2 ms of random latency). The bars count the requests each backend answered (its \
x-served-by header); the dashed line is the even share.\n\nWhat to look at: round robin and \
weighted round robin are exact; random and the hashing plugins (consistent_hash, maglev) are \
even only statistically; load-aware plugins (least_connections, least_loaded, p2c_ewma, \
weighted_response_time) stay near even because the backends are identical. The max/min \
column is the imbalance: 1.00 is perfect.";

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report = ExperimentReport::new(
        "distribution",
        "Request distribution across 3 servers",
        ABOUT,
    );
    let requests: u64 = ctx.pick(10_000, 1_500);
    let cfgs = (1..=3)
        .map(|i| {
            let mut c = harness::backend(
                &format!("server-{i}"),
                ctx.seed_for(&["distribution", "backend", &i.to_string()]),
            );
            c.latency_jitter = Duration::from_millis(2);
            c
        })
        .collect();
    let backends = harness::spawn_all(cfgs).await?;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let ids: Vec<String> = backends.iter().map(|b| b.id().to_string()).collect();
    let listeners: Vec<ListenerSpec> = ctx
        .plugins
        .iter()
        .map(|p| ListenerSpec::new(&p.label, p, &addrs))
        .collect();
    let proxy = Proxy::start(&listeners).await?;
    let result = drive(ctx, &proxy, requests, &mut report).await;
    proxy.stop().await;
    harness::stop_all(&backends).await;
    result?;

    let mut table = Table::new(
        "Requests per backend",
        &[
            "plugin", "server-1", "server-2", "server-3", "failed", "max/min",
        ],
    );
    let mut counts = BTreeMap::new();
    for run in &report.runs {
        let per: Vec<u64> = ids
            .iter()
            .map(|id| run.per_backend.get(id).copied().unwrap_or(0))
            .collect();
        let max = per.iter().copied().max().unwrap_or(0) as f64;
        let min = per.iter().copied().min().unwrap_or(0) as f64;
        let mut row = vec![run.label.clone()];
        row.extend(per.iter().map(|c| c.to_string()));
        row.push((run.sent - run.succeeded).to_string());
        row.push(if min > 0.0 {
            f2(max / min)
        } else {
            "inf".into()
        });
        table.row(row);
        counts.insert(run.label.clone(), per);
    }
    report.chart(Chart {
        name: "distribution".into(),
        title: format!("Requests per server ({requests} requests over 3 servers)"),
        x_label: "requests served".into(),
        y_label: "plugin".into(),
        body: Body::Bars {
            categories: report.runs.iter().map(|r| r.label.clone()).collect(),
            series: ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    (
                        id.clone(),
                        report
                            .runs
                            .iter()
                            .map(|r| counts.get(&r.label).map_or(0.0, |c| c[i] as f64))
                            .collect(),
                    )
                })
                .collect(),
            log: false,
            reference: Some(("even share".into(), requests as f64 / 3.0)),
        },
    });
    report.figures = serde_json::json!({
        "requests_per_plugin": requests,
        "backends": ids,
        "requests_per_backend": counts,
    });
    report.tables.push(table);
    Ok(report)
}

async fn drive(
    ctx: &Ctx,
    proxy: &Proxy,
    requests: u64,
    report: &mut ExperimentReport,
) -> anyhow::Result<()> {
    for p in &ctx.plugins {
        let w = workload(
            proxy.addr(&p.label)?,
            Pacing::Closed { clients: 32 },
            Stop::Count(requests),
            Duration::from_secs(5),
            ctx.seed_for(&["distribution", "clients", &p.label]),
        );
        let samples = ctx.drive(&format!("distribution {}", p.label), &w).await;
        let s = summary::summarize(&p.label, &p.label, &samples)?;
        report.add_run(s, samples);
    }
    Ok(())
}
