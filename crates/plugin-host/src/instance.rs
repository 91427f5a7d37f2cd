//! One sandboxed plugin instance: its store, its limits, and the host side of the imports.

use super::bindings::{Balancer, WitServer};
use super::component::Plugin;
use super::store::StoreData;
use super::{PoolView, RequestInfo, ServerInfo};
use anyhow::{Result, anyhow};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use wasmtime::{Store, StoreLimitsBuilder};

/// Setup calls get this many times the per-request deadline (20 ms → 200 ms by default).
pub(super) const SETUP_FACTOR: u64 = 10;

/// A store plus the instance's exports. `Send`: an instance can be built on one thread and
/// used on another (see `rebuild`).
pub struct Instance {
    pub(super) store: Store<StoreData>,
    bindings: Balancer,
    deadline_ticks: u64,
    /// The deadline of setup calls (`configure`, `set-servers`, `describe`).
    setup_ticks: u64,
}

impl Instance {
    /// Instantiates `plugin` from its pre-instance and runs `configure` with its options;
    /// `deadline_ticks` bounds each `choose` (setup calls get [`SETUP_FACTOR`] times it).
    pub fn new(plugin: &Plugin, deadline_ticks: u64) -> Result<Self> {
        Self::with_setup_ticks(plugin, deadline_ticks, deadline_ticks * SETUP_FACTOR)
    }

    /// As [`Instance::new`], with setup calls bounded by `setup_ticks` until the next
    /// [`Instance::set_deadline_ticks`] (a build off the request path may take longer).
    pub(super) fn with_setup_ticks(
        plugin: &Plugin,
        deadline_ticks: u64,
        setup_ticks: u64,
    ) -> Result<Self> {
        let rt = plugin.runtime.inner();
        let limits = StoreLimitsBuilder::new()
            .memory_size(rt.config.max_memory)
            .instances(64)
            .tables(64)
            .memories(16)
            .build();
        let data = StoreData {
            limits,
            shared: plugin.shared.clone(),
            view: None,
            request: RequestInfo::default(),
        };
        let mut store = Store::new(&rt.engine, data);
        store.limiter(|d| &mut d.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(setup_ticks);
        let bindings = plugin
            .pre
            .instantiate(&mut store)
            .map_err(|e| describe_error("instantiating", &e))?;
        let mut instance = Instance {
            store,
            bindings,
            deadline_ticks,
            setup_ticks,
        };
        instance.arm_setup();
        match instance
            .bindings
            .call_configure(&mut instance.store, &plugin.options)
        {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(msg)) => Err(anyhow!("refused its options: {msg}")),
            Err(e) => Err(describe_error("configure", &e)),
        }
    }

    /// Sets the per-request deadline (the listener's, which a reload may change); setup
    /// calls get [`SETUP_FACTOR`] times it.
    pub fn set_deadline_ticks(&mut self, ticks: u64) {
        self.deadline_ticks = ticks;
        self.setup_ticks = ticks * SETUP_FACTOR;
    }

    /// The per-request deadline, for `choose`.
    fn arm(&mut self) {
        self.store.set_epoch_deadline(self.deadline_ticks);
    }

    /// A longer deadline for the calls that build tables (configure, set-servers: a Maglev
    /// table, a WRR schedule) and run only at start-up or on a pool change, not per request;
    /// still bounded, so a plugin looping there is cut off too.
    fn arm_setup(&mut self) {
        self.store.set_epoch_deadline(self.setup_ticks);
    }

    /// The plugin's one-line description.
    pub fn describe(&mut self) -> Result<String> {
        self.arm_setup();
        self.bindings
            .call_describe(&mut self.store)
            .map_err(|e| describe_error("describe", &e))
    }

    /// Pushes a new server list.
    pub fn set_servers(
        &mut self,
        view: Arc<dyn PoolView>,
        servers: &[ServerInfo],
    ) -> Result<(), wasmtime::Error> {
        let wit: Vec<WitServer> = servers.iter().map(to_wit).collect();
        self.store.data_mut().view = Some(view);
        self.arm_setup();
        self.bindings.call_set_servers(&mut self.store, &wit)
    }

    /// Calls `choose` with `request` lent to the host functions for the call's duration.
    pub fn choose(&mut self, request: &mut RequestInfo) -> Result<Option<u32>, wasmtime::Error> {
        std::mem::swap(&mut self.store.data_mut().request, request);
        self.arm();
        let sequence = self
            .store
            .data()
            .shared
            .sequence
            .fetch_add(1, Ordering::Relaxed);
        // Up to 16 servers, the in-flight counts go as arguments (`choose-loaded`).
        let packed = self
            .store
            .data()
            .view
            .as_ref()
            .filter(|v| v.len() <= 16)
            .map(|v| {
                let mut a = [0u32; 16];
                v.in_flight_prefix(&mut a);
                let p = |k: usize| u64::from(a[2 * k]) | (u64::from(a[2 * k + 1]) << 32);
                (p(0), p(1), p(2), p(3), p(4), p(5), p(6), p(7))
            });
        let result = match packed {
            Some(p) => self
                .bindings
                .call_choose_loaded(&mut self.store, sequence, p),
            None => self.bindings.call_choose(&mut self.store, sequence),
        };
        std::mem::swap(&mut self.store.data_mut().request, request);
        result
    }
}

/// Turns a wasmtime error into a one-line message that says what kind of fault it was.
pub fn describe_error(during: &str, e: &wasmtime::Error) -> anyhow::Error {
    anyhow!("{during}: {}", fault_text(e))
}

/// "timed out", "trapped: ..." or the error's first line.
pub fn fault_text(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timed out (call deadline exceeded)".to_string(),
        Some(wasmtime::Trap::UnreachableCodeReached) => {
            "trapped: unreachable code (a panic, an abort or a failed allocation in the plugin)"
                .to_string()
        }
        Some(trap) => format!("trapped: {trap}"),
        // Not a trap code: the root cause says what happened (e.g. the guest called an
        // import that is linked to a trap because no capability is granted).
        None => format!("trapped: {}", e.root_cause()),
    }
}

/// Whether an error is the call deadline.
pub fn is_timeout(e: &wasmtime::Error) -> bool {
    matches!(
        e.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    )
}

fn to_wit(s: &ServerInfo) -> WitServer {
    WitServer {
        id: s.id,
        address: s.address.clone(),
        weight: s.weight,
        healthy: s.healthy,
        max_connections: s.max_connections,
        warmup: s.warmup,
        cpu_percent: s.cpu_percent,
        memory_percent: s.memory_percent,
        backend_connections: s.backend_connections,
        load_sample: s.load_sample,
        load_sampled_at_ms: s.load_sampled_at_ms,
    }
}
