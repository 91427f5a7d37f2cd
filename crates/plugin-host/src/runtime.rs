//! [`Runtime`]: the wasmtime engine, its sandbox settings and the epoch ticker that bounds
//! every call. Plugins are loaded into it ([`Runtime::load`], in `load.rs`).

use super::bindings::Balancer;
use super::store::StoreData;
use super::{cache, wasm_err};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::component::{HasSelf, Linker};
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
        Balancer::add_to_linker::<StoreData, HasSelf<StoreData>>(&mut linker, |d| d)
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

    pub(super) fn inner(&self) -> &RuntimeInner {
        &self.inner
    }
}

/// Converts a call deadline to epoch ticks.
pub(super) fn deadline_ticks(timeout: Duration) -> u64 {
    // +1: the deadline counts ticks from "now", which is already partly elapsed.
    (timeout.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}
