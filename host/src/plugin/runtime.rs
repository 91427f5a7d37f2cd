//! [`Runtime`]: the wasmtime engine and its sandbox settings; [`Plugin`]: a loaded component.

use super::bindings::BalancerPre;
use super::instance::{Instance, StoreData};
use super::selector::Selector;
use super::{builtin, cache, wasm_err};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Sandbox limits and caching for a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Longest a single plugin call may run before it is interrupted. Default 20 ms: a
    /// `choose` over 1,000 backends takes tens of microseconds.
    pub call_timeout: Duration,
    /// Most linear memory one instance may have. Default 64 MiB.
    pub max_memory: usize,
    /// Instances the pooling allocator can hold at once (all plugins, all workers). Default 256.
    pub max_instances: u32,
    /// Compiled-plugin cache; `None` disables it. Default: [`cache::default_dir`].
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            call_timeout: Duration::from_millis(20),
            max_memory: 64 << 20,
            max_instances: 256,
            cache_dir: cache::default_dir(),
        }
    }
}

/// Epoch ticks are this long; a call's deadline is a whole number of them.
const TICK: Duration = Duration::from_millis(2);

/// The wasm engine, shared by every plugin of a process. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

pub(super) struct RuntimeInner {
    pub(super) engine: Engine,
    pub(super) linker: Linker<StoreData>,
    pub(super) config: RuntimeConfig,
    pub(super) deadline_ticks: u64,
    stop: Arc<AtomicBool>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine: Cranelift, component model without its async machinery (which
    /// doubles the cost of a call), epoch interruption driven by a ticker thread, and the
    /// pooling allocator so that replacing a trapped instance takes microseconds.
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .max_memory_size(config.max_memory);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)
            .map_err(wasm_err)
            .context("creating the wasm engine")?;

        let mut linker = Linker::new(&engine);
        super::bindings::Balancer::add_to_linker::<StoreData, HasSelf<StoreData>>(
            &mut linker,
            |d| d,
        )
        .map_err(wasm_err)?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.weak();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("lbwasm-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match ticker_engine.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })
            .context("starting the epoch ticker")?;

        let deadline_ticks = deadline_ticks(config.call_timeout);
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                deadline_ticks,
                stop,
            }),
        })
    }

    /// The wasmtime engine (inspection, benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Loads a plugin, validates it against the `balancer` world, and configures one
    /// instance with `options` so that bad options are refused here, at start-up.
    pub fn load(&self, source: &PluginSource, options: &[(String, String)]) -> Result<Arc<Plugin>> {
        let name = source.to_string();
        let bytes: std::borrow::Cow<'static, [u8]> = match source {
            PluginSource::Builtin(n) => builtin::get(n)
                .ok_or_else(|| {
                    anyhow!(
                        "no built-in plugin named `{n}` (built-ins: {}; a file path must end in .wasm)",
                        builtin::names().collect::<Vec<_>>().join(", ")
                    )
                })?
                .into(),
            PluginSource::File(p) => std::fs::read(p).with_context(|| format!("reading plugin {}", p.display()))?.into(),
        };
        self.load_bytes(&name, &bytes, options)
    }

    /// [`Runtime::load`] from bytes in memory; `name` is used in messages.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        options: &[(String, String)],
    ) -> Result<Arc<Plugin>> {
        if !bytes.starts_with(b"\0asm") {
            bail!("plugin {name} is not a WebAssembly file (no \\0asm header)");
        }
        let component = cache::load(
            &self.inner.engine,
            bytes,
            self.inner.config.cache_dir.as_deref(),
        )
        .map_err(|e| anyhow!("plugin {name} is not a valid WebAssembly component: {e:#}"))?;
        let pre = self
            .pre(&component)
            .with_context(|| format!("plugin {name}"))?;
        let mut plugin = Plugin {
            name: name.to_string(),
            runtime: self.clone(),
            pre,
            options: options.to_vec(),
            shared: Arc::new(SharedCounters::default()),
            stats: PluginStats::default(),
            description: String::new(),
            size: bytes.len(),
        };
        // One instance now: configure errors, start-up traps and describe() surface here.
        let mut probe = Instance::new(&plugin, self.inner.deadline_ticks)
            .with_context(|| format!("plugin {name}"))?;
        let description = probe
            .describe()
            .with_context(|| format!("plugin {name}: describe()"))?;
        plugin.description = checked_description(description)
            .map_err(|e| anyhow!("plugin {name}: describe(): {e}"))?;
        drop(probe);
        // Counters touched by the probe's configure are reset so that every worker starts at 0.
        plugin.shared.reset();
        Ok(Arc::new(plugin))
    }

    /// Links a component against our imports (anything else it imports traps if called:
    /// no WASI capability is granted) and type-checks its exports against the world.
    pub(super) fn pre(&self, component: &Component) -> Result<BalancerPre<StoreData>> {
        let mut linker = self.inner.linker.clone();
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(wasm_err)?;
        let instance_pre = linker.instantiate_pre(component).map_err(wasm_err)?;
        BalancerPre::new(instance_pre).map_err(|e| {
            let missing = super::inspect::missing_exports(&self.inner.engine, component);
            if missing.is_empty() {
                anyhow!("does not implement the world lbwasm:balancer/balancer@0.2.0: {e:#}")
            } else {
                anyhow!(
                    "does not implement the world lbwasm:balancer/balancer@0.2.0: missing or mistyped exports: {}",
                    missing.join(", ")
                )
            }
        })
    }

    pub(super) fn inner(&self) -> &RuntimeInner {
        &self.inner
    }
}

/// Longest description a plugin may give: it is one line, shown by `lbwasm plugins`, the
/// admin API and the dashboard (a plugin describing itself in megabytes would have every
/// client of those carry them).
pub const MAX_DESCRIPTION: usize = 1024;

/// Refuses a description over [`MAX_DESCRIPTION`] bytes; control characters (newlines, escape
/// sequences a terminal would obey) become spaces.
fn checked_description(text: String) -> Result<String> {
    if text.len() > MAX_DESCRIPTION {
        bail!(
            "the description is {} bytes; a plugin describes itself in one line of at most {MAX_DESCRIPTION} bytes",
            text.len()
        );
    }
    if text.chars().any(char::is_control) {
        return Ok(text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect());
    }
    Ok(text)
}

/// Converts a call deadline to epoch ticks.
pub(super) fn deadline_ticks(timeout: Duration) -> u64 {
    // +1: the deadline counts ticks from "now", which is already partly elapsed.
    (timeout.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

/// Where a plugin comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginSource {
    /// A built-in, by name.
    Builtin(String),
    /// A component file.
    File(PathBuf),
}

impl PluginSource {
    /// `round_robin` → built-in; anything ending in `.wasm` or containing a path separator → file.
    pub fn parse(s: &str) -> Self {
        if s.ends_with(".wasm") || s.contains('/') || s.contains(std::path::MAIN_SEPARATOR) {
            PluginSource::File(PathBuf::from(s))
        } else {
            PluginSource::Builtin(s.to_string())
        }
    }

    /// The file, if this is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            PluginSource::File(p) => Some(p),
            PluginSource::Builtin(_) => None,
        }
    }
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Builtin(n) => f.write_str(n),
            PluginSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A loaded, validated plugin with its options. Shared by every worker; each worker makes its
/// own [`Selector`] from it.
pub struct Plugin {
    pub(super) name: String,
    pub(super) runtime: Runtime,
    pub(super) pre: BalancerPre<StoreData>,
    pub(super) options: Vec<(String, String)>,
    pub(super) shared: Arc<SharedCounters>,
    pub(super) stats: PluginStats,
    description: String,
    size: usize,
}

impl Plugin {
    /// Built-in name or file path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's own one-line description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Component size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The options it was configured with.
    pub fn options(&self) -> &[(String, String)] {
        &self.options
    }

    /// Call, fault and fallback counters summed over every worker.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Time spent in `choose`, summed over every worker.
    pub fn choose_histogram(&self) -> ChooseHistogram {
        self.stats.histogram()
    }

    /// A new instance for one worker thread; an error when no instance can be made.
    pub fn selector(self: &Arc<Self>) -> Result<Selector> {
        Selector::new(self.clone())
    }

    /// A selector for one proxy worker, even when no instance can be made now: it then
    /// picks with the native fallback and retries the instance after a growing cool-down
    /// (counted as `instantiation_failures`, logged).
    pub fn worker_selector(self: &Arc<Self>) -> Selector {
        Selector::new_or_fallback(self.clone())
    }
}

/// The global `choose` sequence and the counters behind the WIT `shared` interface: one set
/// per loaded plugin, shared by all its instances.
#[derive(Default)]
pub(super) struct SharedCounters {
    pub(super) sequence: AtomicU64,
    counters: [AtomicI64; 8],
}

impl SharedCounters {
    pub(super) fn slot(&self, counter: u8) -> &AtomicI64 {
        &self.counters[counter as usize % self.counters.len()]
    }

    fn reset(&self) {
        self.sequence.store(0, Ordering::Relaxed);
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Per-worker counters of a plugin. Each worker writes only its own (no shared cache line on
/// the hot path); readers sum them.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub(super) calls: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) traps: AtomicU64,
    pub(super) bad_answers: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) refusals: AtomicU64,
    pub(super) reinstantiations: AtomicU64,
    pub(super) instantiation_failures: AtomicU64,
    /// Calls to `choose` by duration, per [`CHOOSE_BUCKETS_NS`] (last: above them all).
    pub(super) choose_buckets: [AtomicU64; CHOOSE_BUCKETS_NS.len() + 1],
    /// Total time in `choose`, ns.
    pub(super) choose_ns: AtomicU64,
}

/// Upper bounds of the `choose` duration histogram, ns: a call normally takes 0.3 to 10 µs;
/// the top buckets reach the default deadline (20 ms) and beyond.
pub const CHOOSE_BUCKETS_NS: [u64; 15] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
];

/// Time spent in `choose`: counts per bucket of [`CHOOSE_BUCKETS_NS`] (not cumulative; the
/// last counts calls above every bound), and the total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChooseHistogram {
    /// Calls per bucket.
    pub buckets: [u64; CHOOSE_BUCKETS_NS.len() + 1],
    /// Sum of the calls' durations, ns.
    pub sum_ns: u64,
}

impl ChooseHistogram {
    /// Number of calls.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

impl WorkerStats {
    /// Records one `choose` that took `ns`. Only the owning worker writes these counters, so
    /// a plain load and store (no locked read-modify-write) is enough.
    pub(super) fn record_choose(&self, ns: u64) {
        let i = CHOOSE_BUCKETS_NS
            .iter()
            .position(|&le| ns <= le)
            .unwrap_or(CHOOSE_BUCKETS_NS.len());
        let bump = |a: &AtomicU64, by: u64| {
            a.store(
                a.load(Ordering::Relaxed).wrapping_add(by),
                Ordering::Relaxed,
            )
        };
        bump(&self.choose_buckets[i], 1);
        bump(&self.choose_ns, ns);
    }
}

/// Registry of the workers' counters.
#[derive(Default)]
pub struct PluginStats {
    workers: Mutex<Vec<Weak<WorkerStats>>>,
    retired: WorkerStats,
}

/// Counters of a plugin, summed over its workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Calls to `choose`.
    pub calls: u64,
    /// Calls interrupted by the deadline.
    pub timeouts: u64,
    /// Calls that trapped (panic, abort, out of memory, unreachable).
    pub traps: u64,
    /// Answers refused by the host: index out of range, unhealthy or already-tried backend.
    pub bad_answers: u64,
    /// Picks made by the native fallback instead of the plugin.
    pub fallbacks: u64,
    /// Calls where the plugin said no backend can take the request.
    pub refusals: u64,
    /// Instances replaced after a fault.
    pub reinstantiations: u64,
    /// Attempts to make an instance on a worker that failed (configure refused, trapped or
    /// timed out); the worker used the native fallback meanwhile.
    pub instantiation_failures: u64,
}

impl PluginStats {
    pub(super) fn register(&self) -> Arc<WorkerStats> {
        let w = Arc::new(WorkerStats::default());
        let mut list = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        // Fold counters of workers that are gone, so totals never go backwards.
        list.retain(|weak| weak.strong_count() > 0);
        list.push(Arc::downgrade(&w));
        w
    }

    pub(super) fn retire(&self, w: &WorkerStats) {
        add(&self.retired, w);
    }

    /// Sums every worker's counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let total = WorkerStats::default();
        add(&total, &self.retired);
        for w in self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
        {
            add(&total, &w);
        }
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            calls: g(&total.calls),
            timeouts: g(&total.timeouts),
            traps: g(&total.traps),
            bad_answers: g(&total.bad_answers),
            fallbacks: g(&total.fallbacks),
            refusals: g(&total.refusals),
            reinstantiations: g(&total.reinstantiations),
            instantiation_failures: g(&total.instantiation_failures),
        }
    }

    /// Sums every worker's `choose` durations.
    pub fn histogram(&self) -> ChooseHistogram {
        let mut out = ChooseHistogram::default();
        let mut take = |w: &WorkerStats| {
            for (o, b) in out.buckets.iter_mut().zip(&w.choose_buckets) {
                *o += b.load(Ordering::Relaxed);
            }
            out.sum_ns += w.choose_ns.load(Ordering::Relaxed);
        };
        take(&self.retired);
        for w in self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
        {
            take(&w);
        }
        out
    }
}

fn add(into: &WorkerStats, from: &WorkerStats) {
    let pairs = [
        (&into.calls, &from.calls),
        (&into.timeouts, &from.timeouts),
        (&into.traps, &from.traps),
        (&into.bad_answers, &from.bad_answers),
        (&into.fallbacks, &from.fallbacks),
        (&into.refusals, &from.refusals),
        (&into.reinstantiations, &from.reinstantiations),
        (&into.instantiation_failures, &from.instantiation_failures),
        (&into.choose_ns, &from.choose_ns),
    ];
    for (a, b) in pairs
        .into_iter()
        .chain(into.choose_buckets.iter().zip(&from.choose_buckets))
    {
        a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
