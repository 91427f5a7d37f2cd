//! Integration tests of `lbwasm simulate`: a quick suite through the embeddable
//! `simulate()` (the report's files and the consistency of its counts), a seeded
//! heterogeneous run (load-aware plugins beat round robin on p99: an ordering of measured
//! results, not a timing threshold), and the real binary. The tests of this file run one at
//! a time (they share two cores), each bounded by a timeout.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::process::lbwasm;
use common::within;
use lbwasm::simulate::{Experiment, Report, SimulateOptions, simulate};

/// Generous bound, only there to turn a hang into a failure (the quick suite aims at 20 s).
const LIMIT: Duration = Duration::from_secs(240);

/// Serialises the tests of this file: each one loads the machine on purpose.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options(dir: &Path, seed: u64) -> SimulateOptions {
    let mut o = SimulateOptions::new(dir);
    o.quick = true;
    o.seed = seed;
    o.backend_exe = Some(env!("CARGO_BIN_EXE_lbwasm").into());
    o
}

async fn bounded_simulate(opts: SimulateOptions) -> Report {
    lbwasm::install_builtins();
    within(LIMIT, simulate(opts))
        .await
        .expect("simulate failed")
}

fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_suite_writes_a_consistent_report() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let report = bounded_simulate(options(dir.path(), 7)).await;

    for f in ["report.html", "results.json", "response_times.json"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    for e in Experiment::ALL {
        let csv = dir.path().join(format!("{}.csv", e.name()));
        let text = std::fs::read_to_string(&csv).unwrap();
        assert!(
            text.lines().count() >= 2,
            "{} has no rows:\n{text}",
            csv.display()
        );
    }
    for f in lbwasm::simulate::report_files(dir.path(), &report) {
        let len = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} missing or empty", f.display());
    }
    // The charts of the brief, as SVG and PNG.
    for chart in [
        "distribution",
        "scaling_requests",
        "scaling_cpu",
        "failure_proxy",
        "failure_client",
        "failure_managed",
        "hashing_distribution",
        "hashing_load",
        "hashing_moved",
        "baseline",
        "heterogeneous",
    ] {
        for ext in ["svg", "png"] {
            let f = dir.path().join(format!("{chart}.{ext}"));
            assert!(f.is_file(), "{} missing", f.display());
        }
    }
    let png = std::fs::read(dir.path().join("distribution.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("<svg"), "charts are inlined");
    assert!(!html.contains("<script"), "no script");
    assert!(
        !html.contains("src=\"http"),
        "nothing fetched from the network"
    );

    // results.json: every experiment, and per run the per-backend counts (plus requests no
    // backend answered) add up to the requests sent.
    let results = read_json(&dir.path().join("results.json"));
    let experiments = results["experiments"].as_array().unwrap();
    let names: Vec<&str> = experiments
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        Experiment::ALL.map(|e| e.name()).to_vec(),
        "every experiment, in order"
    );
    let mut total_sent = 0;
    for e in experiments {
        let runs = e["runs"].as_array().unwrap();
        assert!(!runs.is_empty(), "{} has no runs", e["name"]);
        for r in runs {
            let sent = r["sent"].as_u64().unwrap();
            assert!(sent > 0, "{}: empty run {}", e["name"], r["label"]);
            let per_backend: u64 = r["per_backend"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            let unattributed = r["unattributed"].as_u64().unwrap();
            assert_eq!(
                per_backend + unattributed,
                sent,
                "{} {}: counts do not add up",
                e["name"],
                r["label"]
            );
            total_sent += sent;
        }
    }
    // Distribution: every plugin sent exactly the requests asked for, all answered by the
    // three backends.
    let dist = report.experiment("distribution").unwrap();
    let asked = dist.figures["requests_per_plugin"].as_u64().unwrap();
    assert_eq!(dist.runs.len(), report.plugins.len());
    for r in &dist.runs {
        assert_eq!(r.sent, asked, "{}", r.label);
        assert_eq!(r.per_backend.values().sum::<u64>(), asked, "{}", r.label);
        assert_eq!(r.per_backend.len(), 3, "{}: {:?}", r.label, r.per_backend);
    }
    // Failure: retries and failover leave no failed idempotent request.
    let failure = report.experiment("failure").unwrap();
    assert!(failure.notes.is_empty(), "{:?}", failure.notes);
    for r in &failure.runs {
        assert_eq!(r.failed_idempotent, 0, "{}: {:?}", r.label, r.errors);
    }

    // response_times.json: one entry per request sent.
    let times = read_json(&dir.path().join("response_times.json"));
    let times = times.as_array().unwrap();
    assert_eq!(times.len() as u64, total_sent);
    let first = &times[0];
    for key in ["experiment", "plugin", "latency_ms", "backend", "status"] {
        assert!(first.get(key).is_some(), "{key} missing in {first}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_plugins_beat_round_robin_on_p99() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), 2024);
    opts.experiments = vec![Experiment::Heterogeneous];
    // The four the assertion is about: the plugins run side by side, and fewer of them
    // leave the machine (2 cores, shared with the clients and the backends) unsaturated.
    opts.builtins = [
        "round_robin",
        "least_loaded",
        "p2c_ewma",
        "least_connections",
    ]
    .map(String::from)
    .to_vec();
    let report = bounded_simulate(opts).await;
    let e = report.experiment("heterogeneous").unwrap();
    let p99 = |plugin: &str| {
        e.runs
            .iter()
            .find(|r| r.label == plugin)
            .unwrap_or_else(|| panic!("no run for {plugin}"))
            .latency
            .p99_ms
    };
    let table = e.tables[0].text();
    let rr = p99("round_robin");
    for plugin in ["least_loaded", "p2c_ewma", "least_connections"] {
        assert!(
            p99(plugin) < rr,
            "{plugin} p99 {} ms is not below round_robin's {rr} ms\n{table}",
            p99(plugin)
        );
    }
}

#[test]
fn the_binary_runs_one_experiment() {
    let _one = ONE_AT_A_TIME.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("report");
    // Files, not pipes: nobody reads a pipe while we wait, so a chatty child could block.
    let stdout_path = dir.path().join("stdout.txt");
    let stderr_path = dir.path().join("stderr.txt");
    let mut child = lbwasm()
        .args([
            "simulate",
            "--quick",
            "--experiment",
            "distribution",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&out_dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lbwasm simulate did not finish in {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let results = read_json(&out_dir.join("results.json"));
    assert_eq!(results["seed"], 3);
    assert_eq!(results["experiments"][0]["name"], "distribution");
    assert!(
        stdout.contains("round_robin"),
        "summary table printed:\n{stdout}"
    );
}
