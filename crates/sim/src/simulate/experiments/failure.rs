//! `failure` (the seed's A-3): a backend dies mid-run. Three ways to survive it: the proxy's
//! retries and active health checks (the backend is killed, then restarted), client-side
//! failover without a proxy, and the proxy respawning a managed backend process killed
//! with SIGKILL.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::super::Ctx;
use super::super::charts::{Axis, Body, Chart, Corner, Series, Style};
use super::super::clients::{Pacing, Route, Sample, Stop, Workload};
use super::super::harness::{self, ListenerSpec, Proxy};
use super::super::report::{ExperimentReport, Table};
use super::super::summary::{self, RunSummary};
use super::{f1, workload};

const ABOUT: &str = "Open-loop traffic (150 requests/s, 30% POST) while a backend dies (three \
independent scenarios, run side by side). Each \
dot is one request: when it started (x) and how long it took (y, log scale); red crosses \
are requests that failed. Three scenarios:\n\n1. proxy: round_robin over 3 backends with \
active health checks every 100 ms (fall 2, rise 2) and up to 3 tries per request. One \
backend is killed (listener closed, open connections dropped), later restarted on the same \
port. Requests that hit the dead backend are retried on another one (a refused connect is \
safe to retry for any method, a broken GET too); the health checks take it out of rotation \
within about 200 ms and put it back after it returns.\n\n2. client failover: no proxy; each \
client has the list of the 3 backends and moves to the next one when it cannot connect \
(the seed's client that switches server when one is unresponsive).\n\n3. managed respawn: \
the proxy runs 3 backends as child processes (`lbwasm backend --port N`); one is killed \
with SIGKILL and the proxy restarts it; the figures give the time until it answered again \
and until it served traffic again.\n\nWhat to look at: failed GETs should be zero (retries \
and failover absorb the failure: a few requests are slower, none lost); a POST can only \
fail if it was in flight on the backend at the moment it died.";

/// What one scenario produced.
struct Outcome {
    summary: RunSummary,
    samples: Vec<Sample>,
    figures: serde_json::Value,
    recovery: String,
    chart: Chart,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    let mut report =
        ExperimentReport::new("failure", "Response times around a backend failure", ABOUT);
    let duration = Duration::from_secs_f64(ctx.pick(4.0, 1.2));
    // The three scenarios are independent (own backends, own proxies): run them side by side.
    let managed_run = async {
        match &ctx.backend_exe {
            Some(exe) => managed(ctx, duration.max(Duration::from_millis(1500)), exe).await,
            None => Ok(Err(
                "managed respawn skipped: not running as the lbwasm executable (set backend_exe)"
                    .into(),
            )),
        }
    };
    let (proxied, direct, managed) = tokio::join!(
        proxied(ctx, duration),
        client_failover(ctx, duration),
        managed_run
    );
    let mut outcomes = vec![proxied?, direct?];
    match managed? {
        Ok(o) => outcomes.push(o),
        Err(why) => report.notes.push(why),
    }
    let mut table = Table::new(
        "Errors seen by clients",
        &[
            "scenario",
            "sent",
            "failed GET",
            "failed POST",
            "errors",
            "p99 ms",
            "max ms",
            "recovery",
        ],
    );
    let mut figures = serde_json::Map::new();
    for o in outcomes {
        let s = &o.summary;
        let errors = s
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        table.row(vec![
            s.label.clone(),
            s.sent.to_string(),
            s.failed_idempotent.to_string(),
            s.failed_non_idempotent.to_string(),
            if errors.is_empty() {
                "none".into()
            } else {
                errors
            },
            f1(s.latency.p99_ms),
            f1(s.latency.max_ms),
            o.recovery.clone(),
        ]);
        figures.insert(s.label.clone(), o.figures);
        report.chart(o.chart);
        report.add_run(o.summary, o.samples);
    }
    report.figures = serde_json::Value::Object(figures);
    report.tables.push(table);
    Ok(report)
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Latency over time, failures as red crosses, events as dashed lines.
fn timeline(name: &str, title: &str, samples: &[Sample], events: Vec<(String, f64)>) -> Chart {
    let point = |s: &Sample| (s.start.as_secs_f64(), s.latency.as_secs_f64() * 1000.0);
    Chart {
        name: name.to_string(),
        title: title.to_string(),
        x_label: "request start (s)".into(),
        y_label: "response time (ms)".into(),
        body: Body::Lines {
            series: vec![
                Series {
                    name: "answered".into(),
                    points: samples
                        .iter()
                        .filter(|s| s.outcome.ok())
                        .map(point)
                        .collect(),
                    style: Style::Dots,
                },
                Series {
                    name: "failed".into(),
                    points: samples
                        .iter()
                        .filter(|s| !s.outcome.ok())
                        .map(point)
                        .collect(),
                    style: Style::Crosses,
                },
            ],
            x_axis: Axis::Linear,
            y_axis: Axis::Log,
            events,
            legend: Corner::UpperLeft,
        },
    }
}

/// First request served by `backend` that started at or after `after`, as an offset.
fn first_served_by(samples: &[Sample], backend: &str, after: Duration) -> Option<Duration> {
    samples
        .iter()
        .filter(|s| s.start >= after && s.backend.as_deref() == Some(backend) && s.outcome.ok())
        .map(|s| s.start)
        .min()
}

fn ms_text(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
}

const HEALTH: &str = "[listener.health]
path = \"/heartbeat\"
interval = \"100ms\"
timeout = \"100ms\"
rise = 2
fall = 2
[listener.retry]
attempts = 3
budget_percent = 100
[listener.passive]
consecutive_failures = 3
base_ejection = \"500ms\"
[listener.timeouts]
connect = \"200ms\"
request = \"2s\"";

/// Scenario 1: the proxy, retries and active health checks; kill then restart a backend.
async fn proxied(ctx: &Ctx, duration: Duration) -> anyhow::Result<Outcome> {
    let cfgs: Vec<_> = (1..=3)
        .map(|i| {
            let mut c = harness::backend(
                &format!("server-{i}"),
                ctx.seed_for(&["failure", "backend", &i.to_string()]),
            );
            c.latency = Duration::from_millis(2);
            c.latency_jitter = Duration::from_millis(2);
            c
        })
        .collect();
    let victim_cfg = cfgs[1].clone();
    let mut backends = harness::spawn_all(cfgs).await?;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let listener = ListenerSpec::new("failover", &ctx.builtin("round_robin"), &addrs).extra(HEALTH);
    let proxy = Proxy::start(&[listener]).await?;
    let kill_at = duration.mul_f64(0.3);
    let restart_at = duration.mul_f64(0.6);
    let w = workload(
        proxy.addr("failover")?,
        Pacing::Open {
            rate: 150.0,
            clients: 16,
        },
        Stop::Duration(duration),
        Duration::from_secs(3),
        ctx.seed_for(&["failure", "clients", "proxy"]),
    );
    let t0 = Instant::now();
    let victim = &backends[1];
    let victim_id = victim.id().to_string();
    let mut restarted_cfg = victim_cfg;
    restarted_cfg.port = victim.addr().port();
    let actions = async {
        tokio::time::sleep_until(t0 + kill_at).await;
        victim.shutdown().await;
        tokio::time::sleep_until(t0 + restart_at).await;
        crate::backend::spawn(restarted_cfg).await
    };
    let (samples, restarted) = tokio::join!(
        ctx.drive_from("failure: proxy + health checks", &w, t0),
        actions
    );
    proxy.stop().await;
    let restarted_ok = restarted.is_ok();
    match restarted {
        Ok(h) => backends.push(h),
        Err(error) => tracing::warn!(%error, "restarting the killed backend failed"),
    }
    harness::stop_all(&backends).await;

    let summary = summary::summarize("proxy: health checks + retries", "round_robin", &samples)?;
    let last_before = samples
        .iter()
        .filter(|s| s.backend.as_deref() == Some(victim_id.as_str()) && s.start < kill_at)
        .map(|s| s.start)
        .max();
    let back = first_served_by(&samples, &victim_id, restart_at);
    let slowed = samples
        .iter()
        .filter(|s| s.start >= kill_at && s.start < kill_at + Duration::from_secs(1))
        .filter(|s| s.tries > 1 || s.latency > Duration::from_millis(50))
        .count();
    let figures = serde_json::json!({
        "killed": victim_id,
        "kill_at_s": seconds(kill_at),
        "restart_at_s": seconds(restart_at),
        "restarted": restarted_ok,
        "last_served_before_kill_s": last_before.map(seconds),
        "back_in_rotation_s": back.map(seconds),
        "back_in_rotation_after_restart_ms": back.map(|b| b.saturating_sub(restart_at).as_millis() as u64),
        "slow_requests_in_the_second_after_the_kill": slowed,
        "failed_get": summary.failed_idempotent,
        "failed_post": summary.failed_non_idempotent,
    });
    let recovery = format!(
        "back {} after restart",
        ms_text(back.map(|b| b.saturating_sub(restart_at)))
    );
    let chart = timeline(
        "failure_proxy",
        "Proxy: a backend killed, then restarted (health checks + retries)",
        &samples,
        vec![
            (format!("{victim_id} killed"), kill_at.as_secs_f64()),
            (format!("{victim_id} restarted"), restart_at.as_secs_f64()),
        ],
    );
    Ok(Outcome {
        summary,
        samples,
        figures,
        recovery,
        chart,
    })
}

/// Scenario 2: no proxy; clients fail over along their own server lists.
async fn client_failover(ctx: &Ctx, duration: Duration) -> anyhow::Result<Outcome> {
    let cfgs: Vec<_> = (1..=3)
        .map(|i| {
            let mut c = harness::backend(
                &format!("direct-{i}"),
                ctx.seed_for(&["failure", "direct", &i.to_string()]),
            );
            c.latency = Duration::from_millis(2);
            c.latency_jitter = Duration::from_millis(2);
            c
        })
        .collect();
    let backends = harness::spawn_all(cfgs).await?;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let kill_at = duration.mul_f64(0.3);
    let w = Workload {
        route: Route::Direct(addrs),
        pacing: Pacing::Open {
            rate: 150.0,
            clients: 12,
        },
        stop: Stop::Duration(duration),
        timeout: Duration::from_secs(3),
        post_share: 0.3,
        user_keys: None,
        seed: ctx.seed_for(&["failure", "clients", "direct"]),
    };
    let t0 = Instant::now();
    let victim = &backends[0];
    let victim_id = victim.id().to_string();
    let actions = async {
        tokio::time::sleep_until(t0 + kill_at).await;
        victim.shutdown().await;
    };
    let (samples, ()) = tokio::join!(ctx.drive_from("failure: client failover", &w, t0), actions);
    harness::stop_all(&backends).await;
    let summary = summary::summarize("direct: client failover", "none", &samples)?;
    let failovers = samples.iter().filter(|s| s.tries > 1).count();
    let figures = serde_json::json!({
        "killed": victim_id,
        "kill_at_s": seconds(kill_at),
        "requests_that_failed_over": failovers,
        "failed_get": summary.failed_idempotent,
        "failed_post": summary.failed_non_idempotent,
    });
    let chart = timeline(
        "failure_client",
        "No proxy: clients fail over to the next server",
        &samples,
        vec![(format!("{victim_id} killed"), kill_at.as_secs_f64())],
    );
    Ok(Outcome {
        summary,
        samples,
        figures,
        recovery: format!("{failovers} requests failed over"),
        chart,
    })
}

/// Scenario 3: a managed pool; SIGKILL one child and watch the proxy respawn it. The
/// inner `Err` is a reason to skip (noted in the report), the outer one a real failure.
async fn managed(
    ctx: &Ctx,
    duration: Duration,
    exe: &std::path::Path,
) -> anyhow::Result<Result<Outcome, String>> {
    if !cfg!(target_os = "linux") {
        return Ok(Err(
            "managed respawn skipped: finding the child's PID needs Linux /proc".into(),
        ));
    }
    let seed = ctx.seed_for(&["failure", "managed"]);
    let base = harness::free_consecutive_ports(3, seed)?;
    let exe_text = harness::toml_str(&exe.display().to_string());
    let extra = format!(
        "[listener.managed]
command = [{exe_text}, \"--log-level\", \"warn\", \"backend\", \"--port\", \"{{port}}\", \"--latency-ms\", \"2\", \"--latency-jitter-ms\", \"2\", \"--seed\", \"{}\"]
count = 3
base_port = {base}
restart_backoff = \"200ms\"
{HEALTH}",
        seed >> 1
    );
    let listener = ListenerSpec::new("managed", &ctx.builtin("round_robin"), &[]).extra(&extra);
    let proxy = Proxy::start(&[listener]).await?;
    let ports: Vec<u16> = (0..3).map(|i| base + i).collect();
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    for p in &ports {
        if !harness::wait_healthy(&ctx.http, addr(*p), Duration::from_secs(15)).await {
            proxy.stop().await;
            reap(&ports);
            return Ok(Err(format!(
                "managed respawn skipped: managed backend on port {p} never answered"
            )));
        }
    }
    if !proxy
        .wait_pool_healthy(&ctx.http, "managed", 3, Duration::from_secs(15))
        .await
    {
        proxy.stop().await;
        reap(&ports);
        return Ok(Err(
            "managed respawn skipped: the proxy never saw the 3 managed backends healthy".into(),
        ));
    }
    let victim_port = ports[0];
    let victim_id = format!("backend-{victim_port}");
    let kill_at = duration.mul_f64(0.3);
    let w = workload(
        proxy.addr("managed")?,
        Pacing::Open {
            rate: 150.0,
            clients: 16,
        },
        Stop::Duration(duration),
        Duration::from_secs(3),
        ctx.seed_for(&["failure", "clients", "managed"]),
    );
    let t0 = Instant::now();
    let http = ctx.http.clone();
    let actions = async move {
        tokio::time::sleep_until(t0 + kill_at).await;
        let Some(pid) = harness::managed_child_pid(victim_port) else {
            return Err(format!("no child process serves port {victim_port}"));
        };
        harness::kill(pid).map_err(|e| e.to_string())?;
        let killed = Instant::now();
        // Until the old process is gone, the port may still answer.
        while harness::managed_child_pid(victim_port) == Some(pid)
            && killed.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deadline = Duration::from_secs(10);
        while killed.elapsed() < deadline {
            if harness::heartbeat(&http, addr(victim_port)).await {
                return Ok((pid, killed.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "the backend on port {victim_port} did not come back in 10 s"
        ))
    };
    let (samples, respawn) =
        tokio::join!(ctx.drive_from("failure: managed respawn", &w, t0), actions);
    proxy.stop().await;
    reap(&ports);
    let (pid, respawned_after) = match respawn {
        Ok(r) => r,
        Err(why) => return Ok(Err(format!("managed respawn: {why}"))),
    };
    let summary = summary::summarize("proxy: managed respawn", "round_robin", &samples)?;
    let back = first_served_by(&samples, &victim_id, kill_at);
    let figures = serde_json::json!({
        "killed": victim_id,
        "killed_pid": pid,
        "kill_at_s": seconds(kill_at),
        "answered_again_after_ms": respawned_after.as_millis() as u64,
        "back_in_rotation_s": back.map(seconds),
        "back_in_rotation_after_kill_ms": back.map(|b| b.saturating_sub(kill_at).as_millis() as u64),
        "failed_get": summary.failed_idempotent,
        "failed_post": summary.failed_non_idempotent,
    });
    let chart = timeline(
        "failure_managed",
        "Proxy: a managed backend process SIGKILLed and respawned",
        &samples,
        vec![
            (
                format!("{victim_id} killed (pid {pid})"),
                kill_at.as_secs_f64(),
            ),
            (
                "answering again".into(),
                (kill_at + respawned_after).as_secs_f64(),
            ),
        ],
    );
    Ok(Ok(Outcome {
        summary,
        samples,
        figures,
        recovery: format!(
            "respawned in {} ms, serving again {} after the kill",
            respawned_after.as_millis(),
            ms_text(back.map(|b| b.saturating_sub(kill_at)))
        ),
        chart,
    }))
}

/// Kills managed children the proxy left behind (it should stop them itself).
fn reap(ports: &[u16]) {
    for p in ports {
        if let Some(pid) = harness::managed_child_pid(*p) {
            tracing::warn!(
                pid,
                port = p,
                "managed backend still running after the proxy stopped; killing it"
            );
            let _ = harness::kill(pid);
        }
    }
}
