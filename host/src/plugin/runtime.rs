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

        // +1: the deadline counts ticks from "now", which is already partly elapsed.
        let deadline_ticks = (config.call_timeout.as_micros() / TICK.as_micros()).max(1) as u64 + 1;
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
        let mut probe = Instance::new(&plugin).with_context(|| format!("plugin {name}"))?;
        plugin.description = probe
            .describe()
            .with_context(|| format!("plugin {name}: describe()"))?;
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

    /// A new instance for one worker thread.
    pub fn selector(self: &Arc<Self>) -> Result<Selector> {
        Selector::new(self.clone())
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
        }
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
    ];
    for (a, b) in pairs {
        a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
