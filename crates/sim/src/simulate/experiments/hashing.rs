//! `hashing` (the seed's A-4): consistent hashing with the seed's quadratic slot ring
//! (`hash = "classic"`) against modern ketama rings (`xxh3`, `fnv1a`): spread over 3
//! servers, load per server from 2 to 6 servers, and the share of keys that move when a
//! server joins (measured with lookaside `/pick` before and after `POST /backends/add`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;

use super::super::Ctx;
use super::super::charts::{Axis, Body, Chart, Corner, Series, Style};
use super::super::clients::{self, Pacing, Route, Stop, Workload};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary;
use super::{f2, pct, workload};

const HASHES: &[&str] = &["classic", "xxh3", "fnv1a"];
const MAX_SERVERS: usize = 6;
/// Concurrent lookaside clients (the admin endpoint answers on one thread).
const PICKERS: usize = 8;
/// Tries per key before a pick counts as failed.
const PICK_TRIES: usize = 4;

const ABOUT: &str = "consistent_hash hashes each request's user key (header x-user-id, 1 \
million users) onto a ring. classic is the seed project's ring: 512 slots, virtual node j of \
server i at i^2 + j^2 + 2j + 25, key k at k^2 + 2k + 17 (quadratic, so only part of the \
slots are reachable); xxh3 and fnv1a are ketama-style rings with 160 points per server.\n\n\
Three views: the requests each of 3 servers got (bars; the dashed line is the even share); \
requests per server as the pool grows from 2 to 6 servers by POST /backends/add (lines: the \
average, identical for all, and the busiest server of each ring, per 1,000 requests); and the share of 10,000 \
keys whose backend changes when a 4th server joins, asked through the admin endpoint's \
lookaside GET /pick before and after the join (ideal: 1/4, the keys the newcomer takes \
over, and nothing else moves).\n\nWhat to look at: the modern rings stay near the even share \
and near 25% moved; the classic ring's quadratic formulas leave it lopsided. A last run \
sends traffic lookaside (the client asks /pick, then goes straight to the backend) and \
shows the same spread as through the proxy.";

/// Load at one pool size.
#[derive(Clone, Debug, serde::Serialize)]
struct Load {
    servers: usize,
    requests: u64,
    average: f64,
    busiest: u64,
    least: u64,
    per_backend: BTreeMap<String, u64>,
}

/// One ring's results.
#[derive(Clone, Debug, serde::Serialize)]
struct Ring {
    hash: String,
    loads: Vec<Load>,
    keys: usize,
    moved_share_on_join: f64,
    ideal_moved_share: f64,
    /// Of the moved keys, the share that moved to the new server (ideal 1.0).
    moved_to_newcomer: f64,
    /// Lookaside picks that failed (left out of the moved share).
    picks_failed: usize,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report = ExperimentReport::new(
        "hashing",
        "Consistent hashing: classic vs modern hash functions",
        ABOUT,
    );
    let cfgs = (1..=MAX_SERVERS)
        .map(|i| {
            let mut c = harness::backend(
                &format!("node-{i}"),
                ctx.seed_for(&["hashing", "backend", &i.to_string()]),
            );
            c.latency_jitter = Duration::from_millis(1);
            c
        })
        .collect();
    let backends = harness::spawn_all(cfgs).await?;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let ids: Vec<String> = backends.iter().map(|b| b.id().to_string()).collect();
    let plugin = ctx.builtin("consistent_hash");
    let listeners: Vec<ListenerSpec> = HASHES
        .iter()
        .map(|h| ListenerSpec::new(&format!("hash-{h}"), &plugin, &addrs[..2]).option("hash", h))
        .collect();
    let proxy = Proxy::start(&listeners).await?;
    let result = drive(ctx, &proxy, &addrs, &mut report).await;
    proxy.stop().await;
    harness::stop_all(&backends).await;
    let (rings, lookaside) = result?;
    for r in &rings {
        if r.picks_failed > 0 {
            report.notes.push(format!(
                "{}: {} of {} lookaside picks failed and were left out of the moved share",
                r.hash,
                r.picks_failed,
                2 * r.keys
            ));
        }
    }

    let mut table = Table::new(
        "Spread and keys moved",
        &[
            "hash",
            "node-1 (n=3)",
            "node-2 (n=3)",
            "node-3 (n=3)",
            "busiest/avg n=3",
            "busiest/avg n=6",
            "keys moved 3→4",
            "ideal",
        ],
    );
    for r in &rings {
        let at = |n: usize| r.loads.iter().find(|l| l.servers == n);
        let mut row = vec![r.hash.clone()];
        if let Some(l) = at(3) {
            for id in &ids[..3] {
                let c = l.per_backend.get(id).copied().unwrap_or(0);
                row.push(pct(c as f64 / l.requests.max(1) as f64));
            }
        }
        for n in [3, MAX_SERVERS] {
            row.push(at(n).map_or("-".into(), |l| f2(l.busiest as f64 / l.average.max(1e-9))));
        }
        row.push(pct(r.moved_share_on_join));
        row.push(pct(r.ideal_moved_share));
        table.row(row);
    }
    report.tables.push(table);
    if let Some((proxied, looked)) = &lookaside {
        let mut t = Table::new(
            "xxh3 with 6 servers: proxied vs lookaside traffic",
            &["backend", "proxied", "lookaside"],
        );
        let total_p: u64 = proxied.values().sum();
        let total_l: u64 = looked.values().sum();
        for id in &ids {
            t.row(vec![
                id.clone(),
                pct(proxied.get(id).copied().unwrap_or(0) as f64 / total_p.max(1) as f64),
                pct(looked.get(id).copied().unwrap_or(0) as f64 / total_l.max(1) as f64),
            ]);
        }
        report.tables.push(t);
    }

    let n3 = |r: &Ring, id: &str| -> f64 {
        r.loads
            .iter()
            .find(|l| l.servers == 3)
            .and_then(|l| l.per_backend.get(id))
            .copied()
            .unwrap_or(0) as f64
    };
    let requests_n3 = rings
        .first()
        .and_then(|r| r.loads.iter().find(|l| l.servers == 3))
        .map_or(0, |l| l.requests);
    report.chart(Chart {
        name: "hashing_distribution".into(),
        title: format!("consistent_hash: {requests_n3} requests over 3 servers"),
        x_label: "requests served".into(),
        y_label: "hash".into(),
        body: Body::Bars {
            categories: rings.iter().map(|r| r.hash.clone()).collect(),
            series: ids[..3]
                .iter()
                .map(|id| (id.clone(), rings.iter().map(|r| n3(r, id)).collect()))
                .collect(),
            log: false,
            reference: Some(("even share".into(), requests_n3 as f64 / 3.0)),
        },
    });
    // Per 1,000 requests: the pool sizes got different request counts.
    let per_k = |v: f64, l: &Load| v * 1000.0 / l.requests.max(1) as f64;
    let mut series = vec![Series {
        name: "average (all hashes)".into(),
        points: rings
            .first()
            .map(|r| {
                r.loads
                    .iter()
                    .map(|l| (l.servers as f64, per_k(l.average, l)))
                    .collect()
            })
            .unwrap_or_default(),
        style: Style::LineDots,
    }];
    for r in &rings {
        series.push(Series {
            name: format!("{} busiest", r.hash),
            points: r
                .loads
                .iter()
                .map(|l| (l.servers as f64, per_k(l.busiest as f64, l)))
                .collect(),
            style: Style::LineDots,
        });
    }
    report.chart(Chart {
        name: "hashing_load".into(),
        title: "consistent_hash: load per server as servers join".into(),
        x_label: "servers".into(),
        y_label: "requests per server, per 1,000 requests".into(),
        body: Body::Lines {
            series,
            x_axis: Axis::Count,
            y_axis: Axis::Linear,
            events: Vec::new(),
            legend: Corner::UpperRight,
        },
    });
    report.chart(Chart {
        name: "hashing_moved".into(),
        title: "Keys that change server when a 4th server joins".into(),
        x_label: "% of keys moved".into(),
        y_label: "hash".into(),
        body: Body::Bars {
            categories: rings.iter().map(|r| r.hash.clone()).collect(),
            series: vec![(
                "keys moved".into(),
                rings
                    .iter()
                    .map(|r| r.moved_share_on_join * 100.0)
                    .collect(),
            )],
            log: false,
            reference: Some(("ideal 1/4".into(), 25.0)),
        },
    });
    report.figures = serde_json::json!({
        "rings": rings,
        "lookaside_vs_proxied_xxh3": lookaside.map(|(p, l)| serde_json::json!({"proxied": p, "lookaside": l})),
    });
    Ok(report)
}

type Counts = BTreeMap<String, u64>;

async fn drive(
    ctx: &Ctx,
    proxy: &Proxy,
    addrs: &[SocketAddr],
    report: &mut ExperimentReport,
) -> anyhow::Result<(Vec<Ring>, Option<(Counts, Counts)>)> {
    let requests_n3: u64 = ctx.pick(10_000, 1_500);
    let requests: u64 = ctx.pick(3_000, 600);
    let keys: Vec<String> = (0..ctx.pick(10_000, 1_000))
        .map(|k| format!("user-{k}"))
        .collect();
    let mut rings = Vec::new();
    let mut lookaside = None;
    for h in HASHES {
        let listener = format!("hash-{h}");
        let mut loads = Vec::new();
        let mut before = Vec::new();
        let mut picks_failed = 0;
        let mut moved = (0.0, 0.0);
        for n in 2..=MAX_SERVERS {
            if n > 2 {
                proxy
                    .add_backends(&ctx.http, &listener, &addrs[n - 1..n])
                    .await?;
            }
            if n == 4 {
                let after = pick_all(ctx, proxy, &listener, &keys).await;
                picks_failed += before.iter().chain(&after).filter(|p| p.is_none()).count();
                moved = moved_share(&before, &after, addrs[3]);
            }
            let count = if n == 3 { requests_n3 } else { requests };
            let w = workload(
                proxy.addr(&listener)?,
                Pacing::Closed { clients: 32 },
                Stop::Count(count),
                Duration::from_secs(5),
                ctx.seed_for(&["hashing", "clients", h, &n.to_string()]),
            );
            let samples = ctx.drive(&format!("hashing {h} n={n}"), &w).await;
            let s = summary::summarize(&format!("{h} n={n}"), "consistent_hash", &samples)?;
            let attributed: u64 = s.per_backend.values().sum();
            loads.push(Load {
                servers: n,
                requests: attributed,
                average: attributed as f64 / n as f64,
                busiest: s.per_backend.values().copied().max().unwrap_or(0),
                least: if s.per_backend.len() == n {
                    s.per_backend.values().copied().min().unwrap_or(0)
                } else {
                    0
                },
                per_backend: s.per_backend.clone(),
            });
            report.add_run(s, samples);
            if n == 3 {
                before = pick_all(ctx, proxy, &listener, &keys).await;
            }
            if n == MAX_SERVERS && *h == "xxh3" {
                let proxied = loads
                    .last()
                    .map(|l| l.per_backend.clone())
                    .unwrap_or_default();
                let w = Workload {
                    route: Route::Lookaside {
                        admin: proxy.admin(),
                        listener: listener.clone(),
                    },
                    pacing: Pacing::Closed { clients: 16 },
                    stop: Stop::Count(ctx.pick(3_000, 500)),
                    timeout: Duration::from_secs(5),
                    post_share: 0.3,
                    user_keys: Some(1_000_000),
                    seed: ctx.seed_for(&["hashing", "lookaside"]),
                };
                let samples = ctx.drive("hashing xxh3 lookaside", &w).await;
                let s = summary::summarize("xxh3 n=6 lookaside", "consistent_hash", &samples)?;
                lookaside = Some((proxied, s.per_backend.clone()));
                report.add_run(s, samples);
            }
        }
        rings.push(Ring {
            hash: (*h).to_string(),
            loads,
            keys: keys.len(),
            moved_share_on_join: moved.0,
            ideal_moved_share: 0.25,
            moved_to_newcomer: moved.1,
            picks_failed,
        });
    }
    Ok((rings, lookaside))
}

/// (share of keys whose backend changed, share of those that went to `newcomer`), over the
/// keys picked both times.
fn moved_share(
    before: &[Option<SocketAddr>],
    after: &[Option<SocketAddr>],
    newcomer: SocketAddr,
) -> (f64, f64) {
    let both: Vec<(SocketAddr, SocketAddr)> = before
        .iter()
        .zip(after)
        .filter_map(|(b, a)| Some(((*b)?, (*a)?)))
        .collect();
    let moved: Vec<SocketAddr> = both
        .iter()
        .filter(|(b, a)| b != a)
        .map(|(_, a)| *a)
        .collect();
    let to_new = moved.iter().filter(|a| **a == newcomer).count();
    (
        moved.len() as f64 / both.len().max(1) as f64,
        to_new as f64 / moved.len().max(1) as f64,
    )
}

/// The backend `/pick` names for every key, in key order; `None` where the admin endpoint
/// kept failing (it instantiates the plugin per call, which a loaded machine can time out).
async fn pick_all(
    ctx: &Ctx,
    proxy: &Proxy,
    listener: &str,
    keys: &[String],
) -> Vec<Option<SocketAddr>> {
    let bar = ctx
        .progress
        .counter(&format!("hashing /pick {listener}"), keys.len() as u64);
    let mut tasks = JoinSet::new();
    for w in 0..PICKERS {
        let mine: Vec<(usize, String)> = keys
            .iter()
            .enumerate()
            .skip(w)
            .step_by(PICKERS)
            .map(|(i, k)| (i, k.clone()))
            .collect();
        let http = ctx.http.clone();
        let admin = proxy.admin();
        let listener = listener.to_string();
        let bar = bar.clone();
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(mine.len());
            for (i, k) in mine {
                let mut pick = None;
                for attempt in 0..PICK_TRIES {
                    match clients::pick(&http, admin, &listener, &k).await {
                        Ok(p) => {
                            pick = Some(p.addr);
                            break;
                        }
                        Err(error) if attempt + 1 == PICK_TRIES => {
                            tracing::warn!(%error, key = %k, "lookaside pick failed");
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                bar.inc(1);
                out.push((i, pick));
            }
            out
        });
    }
    let mut picks = vec![None; keys.len()];
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(out) => {
                for (i, a) in out {
                    picks[i] = a;
                }
            }
            Err(error) => tracing::warn!(%error, "pick task failed"),
        }
    }
    bar.finish_and_clear();
    picks
}
