//! `inband`: how fast `least_loaded` moves traffic off a backend whose load jumps, when it
//! learns the backends' load from `/load` polled every second, against in-band ORCA reports
//! (`endpoint-load-metrics` on every response, `lbwasm backend --orca text`) with polling
//! off. The load is real: every request burns CPU on the backend, and from known instants
//! a "noisy neighbour" (clients that bypass the proxy) sends one backend after the other
//! extra work (three jumps, each at its own phase of the polls).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use super::super::Ctx;
use super::super::charts::{Axis, Body, Chart, Corner, Series, Style};
use super::super::clients::{Pacing, Route, Sample, Stop, Workload};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary;
use super::{f1, pct, workload};
use crate::backend::{BackendConfig, BackendHandle, OrcaFormat};

/// Requests per second through the proxy (open loop), per mode.
const RATE: f64 = 150.0;
/// Requests per second the neighbour sends straight to the backend it loads.
const NEIGHBOUR_RATE: f64 = 300.0;
/// CPU every request costs a backend (real CPU time, on a blocking thread).
const CPU_WORK: Duration = Duration::from_millis(1);
/// The backends of each pool, in the order the neighbour loads them (one jump each, at a
/// different phase of the polls).
const POOL: [&str; 3] = ["server-1", "server-2", "server-3"];
/// Width of the windows the share over time is counted in.
const BUCKET: Duration = Duration::from_millis(200);
/// Width of the sliding window the reaction time is measured on.
const REACTION_WINDOW: Duration = Duration::from_millis(250);
/// The share of the loaded backend that counts as moved off: half of a fair third.
const SETTLED: f64 = 1.0 / 6.0;

/// least_loaded weighted towards the reported CPU, the figure under test: with the default
/// weights the in-flight term (live, the same in both modes) dominates as soon as the
/// machine is busy and hides what the reports change. Memory is the process's, the same
/// for every backend here, so it is left out.
const PLUGIN_OPTIONS: [(&str, &str); 3] = [
    ("cpu_weight", "1.0"),
    ("memory_weight", "0"),
    ("connections_weight", "0.1"),
];

/// The two ways of learning load, in report order: (label, listener TOML, ORCA format).
const MODES: [(&str, &str, Option<OrcaFormat>); 2] = [
    (
        "least_loaded, /load polled every 1 s",
        "[listener.load_report]\ninterval = \"1s\"",
        None,
    ),
    (
        "least_loaded, in-band ORCA reports",
        "[listener.load_report]\nenabled = false",
        Some(OrcaFormat::Text),
    ),
];

const ABOUT: &str = "Three backends in each of two pools, every request costing 1 ms of real \
CPU; 150 requests/s open loop through the proxy (least_loaded, weighted towards CPU: \
cpu_weight 1, memory_weight 0, connections_weight 0.1) into each pool. In one pool the \
proxy learns the backends' load by polling GET /load every second (the default way); in \
the other the backends attach their load to every response (ORCA in-band reports, header \
endpoint-load-metrics: TEXT cpu_utilization=..., mem_utilization=..., the same figures as \
their /load) and polling is off. Both pools run at the same time, so they share the \
machine's conditions. After a warm-up, a noisy neighbour (300 requests/s straight to one \
backend, bypassing the proxy) makes that backend's CPU jump from a few percent to about \
30%; it then moves to the next backend, three jumps in all, each at its own phase of the \
polls. The backends measure their CPU over a sliding ~1 s window, so the figure they report \
climbs over about a second either way.\n\nWhat to look at: the share of the proxy's \
requests that the loaded backend answers after each jump (chart; dashed lines: the jumps). \
With in-band reports every response carries the climbing figure and the proxy publishes \
it to the plugin within 50 ms, so least_loaded turns away within a fraction of a second. \
With polling it sees nothing until the next poll (up to 1 s later, depending on where the \
jump falls between polls), and then one sample at a time. 'Reaction' is the time from a \
jump after which the loaded backend's share over every 250 ms window, until the neighbour \
moves on, stays below half of a fair third (16.7%); 0 when it already was (the plugin was \
sending that backend little before the jump). Before the jumps, note the polled pool's \
shares: between two polls every pick is made with the same figures, so the backend that \
reported the lowest CPU takes most of the traffic for a whole second (herding), whichever \
it is; with in-band figures refreshed every 50 ms the pool stays closer to a third each. \
'before' is the share of each backend in the second before its jump.";

/// One mode's pool, neighbour target and proxy.
struct Setup {
    label: &'static str,
    backends: Vec<BackendHandle>,
    proxy: Option<Proxy>,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report = ExperimentReport::new(
        "inband",
        "In-band load reports (ORCA) against 1 s polling when a backend's load jumps",
        ABOUT,
    );
    // Polling needs a few polls before the first jump (the plugin's trend needs samples).
    let warmup = Duration::from_secs_f64(ctx.pick(3.0, 2.0));
    let period = Duration::from_secs_f64(ctx.pick(2.5, 1.2));
    let jumps: Vec<Jump> = POOL
        .iter()
        .enumerate()
        .map(|(k, target)| Jump {
            target,
            at: warmup + period * k as u32,
            until: warmup + period * (k as u32 + 1),
        })
        .collect();
    let end = warmup + period * POOL.len() as u32;
    let timeout = Duration::from_secs(1);
    let mut setups = Vec::new();
    let started = set_up(ctx, &mut setups).await;
    let result = match started {
        Ok(()) => drive(ctx, &setups, &jumps, end, timeout).await,
        Err(e) => Err(e),
    };
    for s in &mut setups {
        if let Some(proxy) = s.proxy.take() {
            proxy.stop().await;
        }
        harness::stop_all(&s.backends).await;
    }
    let result = result?;

    let ms = Duration::from_millis;
    // (name, from, to) after each jump; "before": the second before it.
    let windows: [(&str, Duration, Duration, bool); 4] = [
        ("before (1 s)", ms(1000), Duration::ZERO, true),
        ("+0-250 ms", Duration::ZERO, ms(250), false),
        ("+250-500 ms", ms(250), ms(500), false),
        ("+0.5-1 s", ms(500), ms(1000), false),
    ];
    let mut columns = vec!["mode"];
    let reaction_names: Vec<String> = POOL.iter().map(|t| format!("reaction {t} (ms)")).collect();
    columns.extend(reaction_names.iter().map(String::as_str));
    columns.push("mean reaction (ms)");
    columns.extend(windows.iter().map(|w| w.0));
    columns.extend(["p99 (ms)", "success"]);
    let mut table = Table::new(
        "Reaction to each jump, and the share of the proxy's requests the loaded backend answered around its jump (all jumps pooled)",
        &columns,
    );
    let mut series = Vec::new();
    let mut figures = BTreeMap::new();
    for (label, samples) in result {
        let run = summary::summarize(label, "least_loaded", &samples)?;
        let reactions: Vec<Option<Duration>> =
            jumps.iter().map(|j| reaction(&samples, j)).collect();
        let mut row = vec![label.to_string()];
        row.extend(
            reactions.iter().map(|r| {
                r.map_or_else(|| "not settled".to_string(), |d| d.as_millis().to_string())
            }),
        );
        let mean = mean_reaction(&reactions);
        row.push(mean.map_or_else(|| "-".to_string(), |d| d.as_millis().to_string()));
        let mut shares = BTreeMap::new();
        for (name, from, to, before) in windows {
            let spans: Vec<(&str, Duration, Duration)> = jumps
                .iter()
                .map(|j| {
                    if before {
                        (j.target, j.at.saturating_sub(from), j.at)
                    } else {
                        (j.target, j.at + from, (j.at + to).min(j.until))
                    }
                })
                .collect();
            let s = pooled_share(&samples, &spans);
            row.push(s.map_or_else(|| "-".to_string(), pct));
            shares.insert(name, s);
        }
        row.push(f1(run.latency.p99_ms));
        row.push(pct(run.success_rate));
        table.row(row);
        series.push(Series {
            name: label.to_string(),
            points: share_over_time(&samples, &jumps, warmup.saturating_sub(ms(1000)), end),
            style: Style::LineDots,
        });
        figures.insert(
            label.to_string(),
            serde_json::json!({
                "reaction_ms": reactions.iter().map(|r| r.map(|d| d.as_millis() as u64)).collect::<Vec<_>>(),
                "mean_reaction_ms": mean.map(|d| d.as_millis() as u64),
                "shares": shares,
            }),
        );
        report.add_run(run, samples);
    }
    report.chart(Chart {
        name: "inband".into(),
        title: "Share of requests to the backend under load: 1 s polling vs in-band".into(),
        x_label: "request start (s)".into(),
        y_label: format!(
            "share answered by the loaded backend per {} ms (%)",
            BUCKET.as_millis()
        ),
        body: Body::Lines {
            series,
            x_axis: Axis::Linear,
            y_axis: Axis::Linear,
            events: jumps
                .iter()
                .map(|j| (format!("{} loaded", j.target), j.at.as_secs_f64()))
                .collect(),
            legend: Corner::UpperRight,
        },
    });
    report.figures = serde_json::json!({
        "rate_rps": RATE,
        "neighbour_rps": NEIGHBOUR_RATE,
        "cpu_work_ms": CPU_WORK.as_secs_f64() * 1000.0,
        "jumps": jumps.iter().map(|j| serde_json::json!({
            "backend": j.target, "from_s": j.at.as_secs_f64(), "to_s": j.until.as_secs_f64(),
        })).collect::<Vec<_>>(),
        "modes": figures,
    });
    report.tables.push(table);
    Ok(report)
}

/// The neighbour loading `target` from `at` to `until` (offsets in the run).
#[derive(Clone, Copy, Debug)]
struct Jump {
    target: &'static str,
    at: Duration,
    until: Duration,
}

/// Starts each mode's pool and proxy (pushing each into `setups` as it starts, so that the
/// caller can stop whatever started even on an error).
async fn set_up(ctx: &Ctx, setups: &mut Vec<Setup>) -> anyhow::Result<()> {
    let plugin = ctx.builtin("least_loaded");
    for (i, (label, listener, orca)) in MODES.into_iter().enumerate() {
        let cfgs: Vec<BackendConfig> = POOL
            .iter()
            .map(|id| {
                let mut c = harness::backend(id, ctx.seed_for(&["inband", "backend", id]));
                c.cpu_work = CPU_WORK;
                c.orca = orca;
                c
            })
            .collect();
        let backends = harness::spawn_all(cfgs).await?;
        let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
        let mut setup = Setup {
            label,
            backends,
            proxy: None,
        };
        let name = format!("inband-{i}");
        let mut spec = ListenerSpec::new(&name, &plugin, &addrs).extra(listener);
        for (key, value) in PLUGIN_OPTIONS {
            spec = spec.option(key, value);
        }
        let proxy = Proxy::start(&[spec]).await;
        let failed = proxy.is_err();
        setup.proxy = proxy.ok();
        setups.push(setup);
        if failed {
            anyhow::bail!("starting the proxy for {label}");
        }
    }
    Ok(())
}

/// Runs both modes' traffic at the same time, and each one's neighbour through `jumps`;
/// returns (mode, samples of the proxied traffic).
async fn drive(
    ctx: &Ctx,
    setups: &[Setup],
    jumps: &[Jump],
    end: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<(&'static str, Vec<Sample>)>> {
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut runs = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let addr = s
            .proxy
            .as_ref()
            .context("proxy not started")?
            .addr(&format!("inband-{i}"))?;
        let w = workload(
            addr,
            Pacing::Open {
                rate: RATE,
                clients: 16,
            },
            Stop::Duration(end),
            timeout,
            ctx.seed_for(&["inband", "clients"]),
        );
        let mut loads = Vec::new();
        for j in jumps {
            let target = s
                .backends
                .iter()
                .find(|b| b.id() == j.target)
                .with_context(|| format!("backend {}", j.target))?
                .addr();
            let neighbour = Workload {
                route: Route::Direct(vec![target]),
                pacing: Pacing::Open {
                    rate: NEIGHBOUR_RATE,
                    clients: 8,
                },
                stop: Stop::Duration(j.until - j.at),
                timeout,
                post_share: 0.0,
                user_keys: None,
                seed: ctx.seed_for(&["inband", "neighbour", j.target]),
            };
            loads.push((
                format!("inband neighbour {i} {}", j.target),
                neighbour,
                j.at,
            ));
        }
        let bar = format!("inband {}", s.label);
        runs.push(async move {
            let noisy = async {
                for (bar, neighbour, at) in &loads {
                    ctx.drive_from(bar, neighbour, t0 + *at).await;
                }
            };
            let (samples, ()) = tokio::join!(ctx.drive_from(&bar, &w, t0), noisy);
            (s.label, samples)
        });
    }
    Ok(futures_util::future::join_all(runs).await)
}

/// Share of the answered requests started in `[from, to)` that `backend` answered; none
/// when nothing was answered then.
fn share(samples: &[Sample], backend: &str, from: Duration, to: Duration) -> Option<f64> {
    pooled_share(samples, &[(backend, from, to)])
}

/// [`share`] over several spans, each with its own backend, counted together.
fn pooled_share(samples: &[Sample], spans: &[(&str, Duration, Duration)]) -> Option<f64> {
    let (mut answered, mut hit) = (0u64, 0u64);
    for &(backend, from, to) in spans {
        for s in samples.iter().filter(|s| s.start >= from && s.start < to) {
            if let Some(b) = s.backend.as_deref() {
                answered += 1;
                hit += u64::from(b == backend);
            }
        }
    }
    (answered > 0).then(|| hit as f64 / answered as f64)
}

/// Time from `jump.at` after which the loaded backend's share over every
/// [`REACTION_WINDOW`] (sliding by 25 ms) until `jump.until` stays below [`SETTLED`]; none
/// if the last window is still above it. "Stays" rather than "first falls": a plugin fed
/// stale figures swings traffic between backends, and one lucky window is no reaction.
fn reaction(samples: &[Sample], jump: &Jump) -> Option<Duration> {
    let step = Duration::from_millis(25);
    let mut settled = None;
    let mut at = jump.at;
    while at + REACTION_WINDOW <= jump.until {
        match share(samples, jump.target, at, at + REACTION_WINDOW) {
            Some(s) if s >= SETTLED => settled = None,
            _ => {
                settled.get_or_insert(at - jump.at);
            }
        }
        at += step;
    }
    settled
}

/// The mean of the reactions, when every jump settled.
fn mean_reaction(reactions: &[Option<Duration>]) -> Option<Duration> {
    let all: Option<Vec<Duration>> = reactions.iter().copied().collect();
    let all = all.filter(|a| !a.is_empty())?;
    Some(all.iter().sum::<Duration>() / all.len() as u32)
}

/// The share of the backend under load at the time (the first one before the first jump),
/// per [`BUCKET`] from `from` to `end`, in percent, at each bucket's middle.
fn share_over_time(
    samples: &[Sample],
    jumps: &[Jump],
    from: Duration,
    end: Duration,
) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut at = from;
    while at < end {
        let to = at + BUCKET;
        let target = jumps
            .iter()
            .rev()
            .find(|j| j.at <= at)
            .or(jumps.first())
            .map_or("", |j| j.target);
        if let Some(s) = share(samples, target, at, to) {
            points.push(((at + BUCKET / 2).as_secs_f64(), s * 100.0));
        }
        at = to;
    }
    points
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::simulate::clients::{Outcome, Verb};

    fn sample(ms: u64, backend: &str) -> Sample {
        Sample {
            start: Duration::from_millis(ms),
            latency: Duration::from_millis(1),
            backend: Some(Arc::from(backend)),
            outcome: Outcome::Status(200),
            verb: Verb::Get,
            tries: 1,
        }
    }

    #[test]
    fn reaction_is_when_the_share_settles_below_a_sixth_after_the_jump() {
        // A third to server-1 until 1.4 s, then none.
        let samples: Vec<Sample> = (0..300)
            .map(|i| {
                let ms = i * 10;
                let b = if i % 3 == 0 && ms < 1400 {
                    "server-1"
                } else {
                    "server-2"
                };
                sample(ms, b)
            })
            .collect();
        let ms = Duration::from_millis;
        let jump = |until| Jump {
            target: "server-1",
            at: ms(1000),
            until: ms(until),
        };
        let before = share(&samples, "server-1", Duration::ZERO, ms(1000)).unwrap();
        assert!((before - 1.0 / 3.0).abs() < 0.01, "{before}");
        // The 250 ms window holds less than a sixth of server-1 once it starts past ~1.28 s.
        let r = reaction(&samples, &jump(3000)).unwrap();
        assert!((ms(250)..=ms(400)).contains(&r), "{r:?}");
        assert_eq!(reaction(&samples, &jump(1300)), None);
        // A window above the line later on resets it: only a lasting move counts.
        let mut swinging = samples.clone();
        swinging.extend((0..10).map(|i| sample(2500 + i * 10, "server-1")));
        let r = reaction(&swinging, &jump(3000)).unwrap();
        assert!(r > ms(1500), "{r:?}");
        assert_eq!(
            mean_reaction(&[Some(ms(100)), Some(ms(300))]),
            Some(ms(200))
        );
        assert_eq!(mean_reaction(&[Some(ms(100)), None]), None);
        let points = share_over_time(&samples, &[jump(3000)], Duration::ZERO, ms(3000));
        assert_eq!(points.len(), 15);
        assert_eq!(points.last().unwrap().1, 0.0);
        let pooled = pooled_share(
            &samples,
            &[
                ("server-1", ms(0), ms(300)),
                ("server-2", ms(2000), ms(2300)),
            ],
        );
        // 10 of 30 in the first span, 30 of 30 in the second.
        assert!((pooled.unwrap() - 40.0 / 60.0).abs() < 1e-9, "{pooled:?}");
    }
}
