//! `lbwasm simulate`: runs backends, the real proxy (with the real wasm plugins) and
//! simulated clients in one process on 127.0.0.1, runs a suite of experiments comparing
//! balancing plugins, and writes a report (HTML with inline SVG charts, PNGs, JSON, CSV).
//!
//! - [`clients`]: the traffic generator (closed and open loop, failover, lookaside);
//! - [`summary`]: per-run figures and HDR-histogram percentiles;
//! - `experiments`: one function per experiment (`distribution`, `scaling`, `failure`,
//!   `hashing`, `baseline`, `heterogeneous`, `inband`);
//! - `harness`: starting backends and the proxy, talking to its admin endpoint;
//! - [`charts`] and [`report`]: drawing and writing the results.
//!
//! Everything random is derived from one seed (`--seed`): the request mix and arrival times,
//! the backends' jitter, and the seeds of the plugins that draw random numbers.

pub mod charts;
pub mod clients;
mod experiments;
mod harness;
pub mod report;
pub mod summary;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

pub use report::{ExperimentReport, Report, Table};
pub use summary::{Latency, RunSummary};

/// Flags of `lbwasm simulate`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Directory of the report (created if missing; files in it are overwritten).
    #[arg(long, default_value = "lbwasm-report")]
    pub out: PathBuf,
    /// Same experiments, scaled down to run in well under 20 seconds.
    #[arg(long)]
    pub quick: bool,
    /// Seed of everything random (client traffic, backend jitter, plugin seeds); default:
    /// a random seed, printed so that the run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run only this experiment (repeatable); default: all of them.
    #[arg(long = "experiment", value_enum, value_name = "NAME")]
    pub experiments: Vec<Experiment>,
    /// Also compare this plugin component in every per-plugin experiment (repeatable).
    #[arg(long = "plugin", value_name = "FILE.wasm")]
    pub plugins: Vec<PathBuf>,
    /// Compare only these built-in plugins (repeatable); default: all of them.
    #[arg(long = "builtin", value_name = "NAME")]
    pub builtins: Vec<String>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// Executable run as `EXE backend --port N` for the managed pool of the failure
    /// experiment; default: this executable.
    #[arg(long, value_name = "EXE", hide = true)]
    pub backend_exe: Option<PathBuf>,
}

/// The experiments, in the order the suite runs them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Experiment {
    /// 10,000 requests over 3 backends per plugin: requests per backend.
    Distribution,
    /// 2 to 6 backends: requests and CPU per server.
    Scaling,
    /// A backend killed mid-run; health checks, retries, client failover, managed respawn.
    Failure,
    /// Consistent hashing: classic vs xxh3 vs fnv1a; spread, load, keys moved on a join.
    Hashing,
    /// Latency with no balancer (one server) against every plugin.
    Baseline,
    /// Backends of different speed and capacity under open-loop load: tail latency.
    Heterogeneous,
    /// A backend's load jumps: in-band ORCA reports against 1 s `/load` polling.
    Inband,
}

impl Experiment {
    /// Every experiment, in suite order.
    pub const ALL: [Experiment; 7] = [
        Experiment::Distribution,
        Experiment::Scaling,
        Experiment::Failure,
        Experiment::Hashing,
        Experiment::Baseline,
        Experiment::Heterogeneous,
        Experiment::Inband,
    ];

    /// The name used by `--experiment`, in `results.json` and for file names.
    pub fn name(self) -> &'static str {
        match self {
            Experiment::Distribution => "distribution",
            Experiment::Scaling => "scaling",
            Experiment::Failure => "failure",
            Experiment::Hashing => "hashing",
            Experiment::Baseline => "baseline",
            Experiment::Heterogeneous => "heterogeneous",
            Experiment::Inband => "inband",
        }
    }
}

/// What [`simulate`] runs; the embeddable twin of [`SimulateArgs`].
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    /// Report directory.
    pub out_dir: PathBuf,
    pub quick: bool,
    pub seed: u64,
    /// Empty = all, in suite order.
    pub experiments: Vec<Experiment>,
    /// Extra plugin components compared beside the built-ins.
    pub plugins: Vec<PathBuf>,
    /// The built-ins compared; empty = all.
    pub builtins: Vec<String>,
    /// Draw progress bars on stderr (only when it is a terminal).
    pub progress: bool,
    /// Print the summary tables on stdout at the end.
    pub print_summary: bool,
    /// The `lbwasm` executable for the managed pool; `None` = this executable if it is
    /// `lbwasm`, else that part of the failure experiment is skipped (noted in the report).
    pub backend_exe: Option<PathBuf>,
}

impl SimulateOptions {
    /// The whole suite, full size, seed 1, quiet (no progress, no printed summary).
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        SimulateOptions {
            out_dir: out_dir.into(),
            quick: false,
            seed: 1,
            experiments: Vec::new(),
            plugins: Vec::new(),
            builtins: Vec::new(),
            progress: false,
            print_summary: false,
            backend_exe: None,
        }
    }
}

/// Builds the runtime and runs `lbwasm simulate` on it. Unless a log level was asked for
/// (`--log-level` or `RUST_LOG`), only warnings are logged, and they are printed above the
/// progress bars instead of through them.
pub fn run_blocking(args: SimulateArgs, log_level_given: bool) -> anyhow::Result<()> {
    let quiet = !log_level_given && std::env::var_os("RUST_LOG").is_none();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if quiet {
        builder.on_thread_start(|| {
            // Each runtime thread keeps this default for its whole life.
            std::mem::forget(tracing::dispatcher::set_default(&quiet_dispatch()));
        });
    }
    let rt = builder.build().context("starting the tokio runtime")?;
    let _guard = quiet.then(|| tracing::dispatcher::set_default(&quiet_dispatch()));
    rt.block_on(run(args))
}

fn quiet_dispatch() -> tracing::Dispatch {
    static DISPATCH: OnceLock<tracing::Dispatch> = OnceLock::new();
    DISPATCH
        .get_or_init(|| {
            tracing::Dispatch::new(
                tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                    .with_writer(|| LogWriter)
                    .finish(),
            )
        })
        .clone()
}

/// The progress bars of the current run, so that logs can be printed above them.
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Writes log lines to stderr, suspending the progress bars while it does.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let write = || std::io::stderr().write_all(buf);
        match BARS.get() {
            Some(bars) => bars.suspend(write)?,
            None => write()?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `lbwasm simulate`: runs the suite, prints the summary, writes the report.
pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>().into());
    let opts = SimulateOptions {
        out_dir: args.out,
        quick: args.quick,
        seed,
        experiments: args.experiments,
        plugins: args.plugins,
        builtins: args.builtins,
        progress: !args.no_progress,
        print_summary: true,
        backend_exe: args.backend_exe,
    };
    let report = simulate(opts).await?;
    println!(
        "\nReport: {} (seed {}, {:.1} s). Open report.html in a browser.",
        report.out_dir.join("report.html").display(),
        report.seed,
        report.wall_time_s
    );
    Ok(())
}

/// Runs the experiments and writes the report into `opts.out_dir`; returns what it wrote.
pub async fn simulate(opts: SimulateOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    // Clients, backends and the proxy share this process's descriptors.
    lbwasm_proxy::serve::raise_fd_limit();
    let experiments = if opts.experiments.is_empty() {
        Experiment::ALL.to_vec()
    } else {
        // Suite order, each once.
        Experiment::ALL
            .into_iter()
            .filter(|e| opts.experiments.contains(e))
            .collect()
    };
    let ctx = Ctx::new(&opts, experiments.len() as u64)?;
    ctx.progress.println(format!(
        "lbwasm simulate: seed {}{}; experiments: {}; plugins: {}",
        opts.seed,
        if opts.quick { ", quick" } else { "" },
        experiments
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(", "),
        ctx.plugins
            .iter()
            .map(|p| p.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut report = Report {
        seed: opts.seed,
        quick: opts.quick,
        plugins: ctx.plugins.iter().map(|p| p.label.clone()).collect(),
        out_dir: opts.out_dir.clone(),
        ..Report::default()
    };
    for e in experiments {
        ctx.progress.overall.set_message(e.name());
        let t = Instant::now();
        let mut r = experiments::run(e, &ctx)
            .await
            .with_context(|| format!("experiment {}", e.name()))?;
        r.wall_time_s = t.elapsed().as_secs_f64();
        ctx.progress.overall.inc(1);
        ctx.progress
            .println(format!("  {} done in {:.1} s", r.name, r.wall_time_s));
        report.experiments.push(r);
    }
    report.wall_time_s = started.elapsed().as_secs_f64();
    ctx.progress.overall.set_message("writing the report");
    report::write(&report, &opts.out_dir)?;
    ctx.progress.overall.finish_and_clear();
    if opts.print_summary {
        print!("{}", report::terminal_summary(&report));
    }
    Ok(report)
}

/// A plugin as the experiments use it.
#[derive(Clone, Debug)]
pub(crate) struct PluginUnderTest {
    /// Name in tables and charts: the built-in's name or the file's stem.
    pub label: String,
    /// The TOML value of `plugin = ...`: a built-in name or an absolute path.
    pub source: String,
    /// Options every listener of this plugin gets (the seed, for plugins that take one).
    pub options: Vec<(String, String)>,
}

/// Built-ins that draw random numbers and take a `seed` option.
const SEEDED_PLUGINS: &[&str] = &["random", "p2c_ewma", "weighted_response_time"];

/// What every experiment gets: options, plugins, the HTTP client, progress bars.
pub(crate) struct Ctx {
    pub seed: u64,
    pub quick: bool,
    /// Built-ins in their listed order, then `--plugin` files.
    pub plugins: Vec<PluginUnderTest>,
    pub http: clients::HttpClient,
    pub progress: Progress,
    /// The `lbwasm` executable for managed backends, if known.
    pub backend_exe: Option<PathBuf>,
}

impl Ctx {
    fn new(opts: &SimulateOptions, experiments: u64) -> anyhow::Result<Self> {
        if let Some(unknown) = opts
            .builtins
            .iter()
            .find(|b| !lbwasm_plugin_host::builtin::names().any(|n| n == b.as_str()))
        {
            anyhow::bail!(
                "--builtin {unknown}: no such built-in plugin (built-ins: {})",
                lbwasm_plugin_host::builtin::names()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut plugins: Vec<PluginUnderTest> = lbwasm_plugin_host::builtin::names()
            .filter(|name| opts.builtins.is_empty() || opts.builtins.iter().any(|b| b == name))
            .map(|name| plugin_under_test(name, opts.seed))
            .collect();
        for path in &opts.plugins {
            let abs = std::fs::canonicalize(path)
                .with_context(|| format!("--plugin {}", path.display()))?;
            // The label names a listener: ASCII letters, digits, '-', '_' and '.'.
            let stem: String = abs
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("plugin")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let mut label = stem.clone();
            let mut n = 2;
            while plugins.iter().any(|p| p.label == label) {
                label = format!("{stem}-{n}");
                n += 1;
            }
            plugins.push(PluginUnderTest {
                label,
                source: abs.display().to_string(),
                options: Vec::new(),
            });
        }
        let backend_exe = opts.backend_exe.clone().or_else(|| {
            let exe = std::env::current_exe().ok()?;
            (exe.file_stem()? == "lbwasm").then_some(exe)
        });
        Ok(Ctx {
            seed: opts.seed,
            quick: opts.quick,
            plugins,
            http: clients::http_client(Duration::from_millis(500)),
            progress: Progress::new(opts.progress, experiments),
            backend_exe,
        })
    }

    /// A seed for one purpose (`parts` name it), derived from the run's seed.
    pub fn seed_for(&self, parts: &[&str]) -> u64 {
        derive_seed(self.seed, parts)
    }

    /// `full` normally, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// A built-in plugin by name (with its seed).
    pub fn builtin(&self, name: &str) -> PluginUnderTest {
        self.plugins
            .iter()
            .find(|p| p.label == name)
            .cloned()
            .unwrap_or_else(|| plugin_under_test(name, self.seed))
    }

    /// Runs a workload from now, with a progress bar labelled `label`.
    pub async fn drive(&self, label: &str, w: &clients::Workload) -> Vec<clients::Sample> {
        self.drive_from(label, w, tokio::time::Instant::now()).await
    }

    /// Runs a workload from `t0` (so the caller can act at known offsets).
    pub async fn drive_from(
        &self,
        label: &str,
        w: &clients::Workload,
        t0: tokio::time::Instant,
    ) -> Vec<clients::Sample> {
        let bar = self.progress.bar(label, w);
        let samples = clients::run(w, &self.http, &bar, t0).await;
        bar.finish_and_clear();
        samples
    }
}

fn plugin_under_test(name: &str, seed: u64) -> PluginUnderTest {
    let options = if SEEDED_PLUGINS.contains(&name) {
        // TOML integers are i64.
        let s = derive_seed(seed, &["plugin", name]) >> 1;
        vec![("seed".to_string(), s.to_string())]
    } else {
        Vec::new()
    };
    PluginUnderTest {
        label: name.to_string(),
        source: name.to_string(),
        options,
    }
}

fn derive_seed(seed: u64, parts: &[&str]) -> u64 {
    let mut text = String::new();
    for p in parts {
        text.push_str(p);
        text.push('\u{1f}');
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(text.as_bytes(), seed)
}

/// The progress bars: one for the suite, one per run of traffic.
pub(crate) struct Progress {
    multi: MultiProgress,
    pub overall: ProgressBar,
}

impl Progress {
    fn new(enabled: bool, experiments: u64) -> Self {
        let target = if enabled {
            ProgressDrawTarget::stderr_with_hz(8)
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        if enabled {
            // Logs go above the bars of the first run only (later runs keep their own bars).
            let _ = BARS.set(multi.clone());
        }
        let overall = multi.add(ProgressBar::new(experiments));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} experiments  {msg}  ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        overall.set_prefix("simulate");
        if enabled {
            overall.enable_steady_tick(Duration::from_millis(250));
        }
        Progress { multi, overall }
    }

    /// A bar for one run of traffic.
    fn bar(&self, label: &str, w: &clients::Workload) -> ProgressBar {
        let total = match (w.stop, w.pacing) {
            (clients::Stop::Count(n), _) => Some(n),
            (clients::Stop::Duration(d), clients::Pacing::Open { rate, .. }) => {
                Some((rate * d.as_secs_f64()).ceil() as u64)
            }
            (clients::Stop::Duration(_), clients::Pacing::Closed { .. }) => None,
        };
        let bar = match total {
            Some(n) => {
                let b = ProgressBar::new(n);
                b.set_style(
                    ProgressStyle::with_template(
                        "  {prefix:<34} [{bar:30}] {pos:>6}/{len:<6} {elapsed:>4}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            }
            None => {
                let b = ProgressBar::new_spinner();
                b.set_style(
                    ProgressStyle::with_template("  {prefix:<34} {spinner} {pos:>6} {elapsed:>4}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                b
            }
        };
        bar.set_prefix(label.to_string());
        self.multi.add(bar)
    }

    /// A bar counting `total` steps of something other than requests.
    pub fn counter(&self, label: &str, total: u64) -> ProgressBar {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "  {prefix:<34} [{bar:30}] {pos:>6}/{len:<6} {elapsed:>4}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(label.to_string());
        self.multi.add(b)
    }

    /// A line above the bars (or on stderr when they are hidden and it is a terminal).
    pub fn println(&self, line: String) {
        if self.multi.is_hidden() {
            tracing::info!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

/// The report directory's files, for callers that want to check them.
pub fn report_files(dir: &Path, report: &Report) -> Vec<PathBuf> {
    let mut files = vec![
        dir.join("report.html"),
        dir.join("results.json"),
        dir.join("response_times.json"),
    ];
    for e in &report.experiments {
        files.push(dir.join(format!("{}.csv", e.name)));
        files.extend(e.charts.iter().map(|c| dir.join(c)));
    }
    files
}
