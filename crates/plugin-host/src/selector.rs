//! [`Selector`]: one worker's plugin instance, wrapped so that whatever the plugin does, the
//! proxy gets a usable answer.
//!
//! Around every call: the pool is pushed when its generation changed; the answer is checked
//! (in range, healthy, not already tried, under its connection limit); a trap or timeout
//! drops the instance (a trapped instance cannot be entered again) and the next call gets a
//! fresh one from the pre-instance. Whenever the plugin cannot answer, a native
//! least-in-flight pick stands in, and the reason is counted. A plugin that keeps failing is
//! suspended for a growing cool-down (0.5 s up to 30 s) so that a plugin stuck in a loop
//! costs one deadline per cool-down, not one per request.
//!
//! Two answers are faults although the call returned: `none` while the host sees an
//! eligible backend (a deliberate `none` is honoured only when no backend is eligible), and
//! an instance that cannot be made at all (`configure` refusing, trapping or looping on this
//! worker): the worker then serves with the fallback and retries after the cool-down.
//!
//! Every `choose` is timed (two vDSO clock reads, no system call) into a per-worker
//! histogram; a worker whose calls over a second exceed the listener's budget more than 1%
//! of the time (its p99 is over the budget) logs a warning.
//!
//! A worker's selector ([`Plugin::worker_selector`]) keeps a slow `set-servers` (over 2 ms
//! of CPU: a big Maglev table) off the request path: after one, the next pool change builds
//! a new instance on a builder thread while the old one goes on answering with its list,
//! its answers translated into the current pool by server id (see `rebuild`).

use super::component::Plugin;
use super::instance::{Instance, SETUP_FACTOR, fault_text, is_timeout};
use super::rebuild::{self, Built, Failed, GONE, Pending, RebuildStats, Shape};
use super::stats::WorkerStats;
use super::{PoolView, RequestInfo, ServerInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why the plugin's answer was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call ran past its deadline.
    Timeout,
    /// The call trapped (panic, abort, out of memory...).
    Trap(String),
    /// The index is not in the pool.
    OutOfRange {
        /// What the plugin returned.
        index: u32,
        /// Pool size.
        len: usize,
    },
    /// The backend is unhealthy.
    Unhealthy(usize),
    /// The backend already failed this request.
    AlreadyTried(usize),
    /// The backend is at its connection limit.
    Full(usize),
    /// The plugin is suspended after repeated faults.
    Suspended,
    /// No instance could be created.
    Unavailable(String),
    /// The plugin answered none while the host saw an eligible backend.
    NoneWhileEligible,
    /// The answer came from the instance that serves while another is built for the new
    /// pool off the request path, and its backend has left the pool or cannot take the
    /// request now (or it had none to give). Not the plugin's fault.
    Stale,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Timeout => f.write_str("timed out"),
            Fault::Trap(m) => write!(f, "{m}"),
            Fault::OutOfRange { index, len } => {
                write!(f, "returned index {index}, out of range (pool has {len})")
            }
            Fault::Unhealthy(i) => write!(f, "returned unhealthy backend {i}"),
            Fault::AlreadyTried(i) => {
                write!(f, "returned backend {i}, which already failed this request")
            }
            Fault::Full(i) => write!(f, "returned backend {i}, which is at its connection limit"),
            Fault::Suspended => f.write_str("suspended after repeated faults"),
            Fault::Unavailable(m) => write!(f, "no instance: {m}"),
            Fault::NoneWhileEligible => {
                f.write_str("answered none while an eligible backend was available")
            }
            Fault::Stale => f.write_str(
                "answered from the server list before the pool changed (the new instance is being built) with a backend that cannot take the request now",
            ),
        }
    }
}

/// Who made a pick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickSource {
    /// The plugin's answer was used.
    Plugin,
    /// The native fallback picked, for this reason.
    Fallback(Fault),
}

/// A pick: the backend index (None: no backend can take the request) and who made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index into the pool view, or None.
    pub index: Option<usize>,
    /// Plugin or fallback.
    pub source: PickSource,
}

/// One worker's instance of a plugin. Not shared: each worker thread owns one, so the hot
/// path takes no lock.
pub struct Selector {
    plugin: Arc<Plugin>,
    instance: Option<Instance>,
    stats: Arc<WorkerStats>,
    generation: u64,
    healthy: Vec<bool>,
    max_connections: Vec<u32>,
    consecutive_faults: u32,
    suspended_until: Option<Instant>,
    cooldown: Duration,
    rotation: u64,
    last_warning: Option<Instant>,
    suppressed: u64,
    column: Vec<u32>,
    /// The per-call deadline and its epoch ticks.
    timeout: Duration,
    deadline_ticks: u64,
    /// Calls over this are slow; more than 1% slow in a window means a warning.
    budget_ns: u64,
    window: SlowWindow,
    /// An instance could not be made; cleared (and logged) when one is.
    instance_failing: bool,
    /// Rebuilds off the request path (worker selectors only).
    rebuild: Rebuild,
}

/// The state of off-path rebuilds (see `rebuild`).
#[derive(Default)]
struct Rebuild {
    /// Whether this selector builds off the request path at all.
    enabled: bool,
    /// A `set-servers` that changed the shape took over [`rebuild::SLOW_SETUP`] (or timed
    /// out); cleared by a build off the request path that did not.
    slow: bool,
    /// The build under way.
    pending: Option<Pending>,
    /// The generation of the list the instance was given.
    generation: u64,
    /// That list's shape.
    given: Vec<Shape>,
    /// While the instance serves an older list: its index → the current index, or [`GONE`].
    translate: Vec<u32>,
}

/// Adds one to a counter only this worker writes (no locked read-modify-write needed).
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Counts calls over the budget during about a second.
struct SlowWindow {
    calls: u64,
    slow: u64,
    ends: Option<Instant>,
    last_warning: Option<Instant>,
}

const FAULTS_BEFORE_SUSPENSION: u32 = 3;
const MIN_COOLDOWN: Duration = Duration::from_millis(500);
const MAX_COOLDOWN: Duration = Duration::from_secs(30);
/// Default `choose` budget: calls slower than this, more than 1% of the time, are warned of.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(1);
const SLOW_WINDOW: Duration = Duration::from_secs(1);
/// Fewer calls in a window say nothing about a p99.
const SLOW_MIN_CALLS: u64 = 10;
/// At most one slowness warning per worker this often.
const SLOW_WARNING_EVERY: Duration = Duration::from_secs(30);

impl Selector {
    /// A selector with a working instance, or the reason none can be made.
    pub(super) fn new(plugin: Arc<Plugin>) -> anyhow::Result<Self> {
        let ticks = plugin.runtime.inner().deadline_ticks;
        let instance = Instance::new(&plugin, ticks)?;
        let mut sel = Self::empty(plugin);
        sel.instance = Some(instance);
        Ok(sel)
    }

    /// A selector even when no instance can be made now (see [`Plugin::worker_selector`]),
    /// which rebuilds off the request path when `set-servers` is slow.
    pub(super) fn new_or_fallback(plugin: Arc<Plugin>) -> Self {
        let mut sel = Self::empty(plugin);
        sel.rebuild.enabled = true;
        match Instance::new(&sel.plugin, sel.deadline_ticks) {
            Ok(instance) => sel.instance = Some(instance),
            Err(e) => sel.instantiation_failed(&e),
        }
        sel
    }

    fn empty(plugin: Arc<Plugin>) -> Self {
        let stats = plugin.stats.register();
        let rt = plugin.runtime.inner();
        let (timeout, deadline_ticks) = (rt.config.call_timeout, rt.deadline_ticks);
        Selector {
            plugin,
            instance: None,
            stats,
            generation: u64::MAX,
            healthy: Vec::new(),
            max_connections: Vec::new(),
            consecutive_faults: 0,
            suspended_until: None,
            cooldown: MIN_COOLDOWN,
            rotation: 0,
            last_warning: None,
            suppressed: 0,
            column: Vec::new(),
            timeout,
            deadline_ticks,
            budget_ns: DEFAULT_BUDGET.as_nanos() as u64,
            window: SlowWindow {
                calls: 0,
                slow: 0,
                ends: None,
                last_warning: None,
            },
            instance_failing: false,
            rebuild: Rebuild {
                generation: u64::MAX,
                ..Rebuild::default()
            },
        }
    }

    /// What the off-path rebuild did on this selector.
    pub fn rebuild_stats(&self) -> RebuildStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RebuildStats {
            started: g(&self.stats.rebuilds_started),
            swapped: g(&self.stats.rebuilds_swapped),
            discarded: g(&self.stats.rebuilds_discarded),
            failed: g(&self.stats.rebuilds_failed),
            stale_calls: g(&self.stats.stale_calls),
        }
    }

    /// Whether an instance is being built off the request path now.
    pub fn rebuilding(&self) -> bool {
        self.rebuild.pending.is_some()
    }

    /// Pushes `servers` (the list of `view`, of shape `shape` when known) to the instance on
    /// this thread; a push that changes the shape is timed.
    fn push_inline(
        &mut self,
        view: &Arc<dyn PoolView>,
        servers: &[ServerInfo],
        shape: Option<Vec<Shape>>,
    ) -> Result<(), wasmtime::Error> {
        let Some(inst) = self.instance.as_mut() else {
            return Ok(());
        };
        let started = rebuild::thread_cpu_time();
        let result = inst.set_servers(view.clone(), servers);
        let took = rebuild::thread_cpu_time().saturating_sub(started);
        let r = &mut self.rebuild;
        if r.enabled {
            let shape = shape.unwrap_or_else(|| rebuild::shape(servers));
            if shape != r.given || r.generation == u64::MAX {
                r.slow = took > rebuild::SLOW_SETUP || result.as_ref().is_err_and(is_timeout);
            }
            r.generation = view.generation();
            r.given = shape;
            r.translate.clear();
        }
        result
    }

    /// Whether pool changes go off the request path now.
    fn off_path(&self) -> bool {
        self.rebuild.enabled && self.rebuild.slow
    }

    /// Starts building an instance for `view` on a builder thread, unless one is under way
    /// (when it arrives for an older list, another is started). False if no thread could be
    /// started.
    fn start_rebuild(&mut self, view: &Arc<dyn PoolView>, servers: Vec<ServerInfo>) -> bool {
        if self.rebuild.pending.is_some() {
            return true;
        }
        let setup = super::runtime::deadline_ticks(rebuild::BACKGROUND_SETUP)
            .max(self.deadline_ticks * SETUP_FACTOR);
        let started = rebuild::start(
            self.plugin.clone(),
            self.deadline_ticks,
            setup,
            view.clone(),
            servers,
        );
        match started {
            Ok(pending) => {
                self.rebuild.pending = Some(pending);
                bump(&self.stats.rebuilds_started);
                tracing::debug!(plugin = %self.plugin.name(), generation = view.generation(), "building a plugin instance for the new pool off the request path");
                true
            }
            Err(e) => {
                tracing::warn!(plugin = %self.plugin.name(), error = %e, "cannot start a builder thread; pushing the pool on the request path");
                false
            }
        }
    }

    /// Takes a finished build: swaps its instance in, or on a failure drops the instance
    /// and returns the fault (as an inline `set-servers` failing would).
    fn poll_rebuild(&mut self, view: &Arc<dyn PoolView>) -> Option<Fault> {
        let outcome = self.rebuild.pending.as_ref()?.poll()?;
        self.rebuild.pending = None;
        match outcome {
            Ok(built) => {
                self.swap_in(built, view);
                None
            }
            Err(failed) => Some(self.rebuild_failed(failed)),
        }
    }

    fn swap_in(&mut self, built: Built, view: &Arc<dyn PoolView>) {
        let Built {
            mut instance,
            generation,
            shape,
            took,
        } = built;
        let r = &mut self.rebuild;
        r.slow = took > rebuild::SLOW_SETUP;
        if self.instance.is_some() && r.generation == self.generation {
            // The pool came back to what the instance in use has (a load-only change since
            // is pushed to it inline): the older build is not wanted.
            bump(&self.stats.rebuilds_discarded);
            return;
        }
        instance.set_deadline_ticks(self.deadline_ticks);
        self.instance = Some(instance);
        if std::mem::take(&mut self.instance_failing) {
            tracing::info!(plugin = %self.plugin.name(), "plugin instance made on this worker; the plugin picks again");
        }
        let r = &mut self.rebuild;
        bump(&self.stats.rebuilds_swapped);
        r.generation = generation;
        r.given = shape;
        r.translate.clear();
        tracing::debug!(plugin = %self.plugin.name(), generation, took_us = took.as_micros() as u64, "plugin instance for the new pool swapped in");
        if generation != self.generation || generation != view.generation() {
            // Built for a list that has changed since: newer than the instance it replaces,
            // and the pool check below starts the next build (or pushes inline if the
            // plugin turned fast).
            self.generation = u64::MAX;
        }
    }

    fn rebuild_failed(&mut self, failed: Failed) -> Fault {
        bump(&self.stats.rebuilds_failed);
        tracing::warn!(
            plugin = %self.plugin.name(),
            error = %failed.message,
            "building a plugin instance for the new pool off the request path failed"
        );
        self.instance = None;
        let fault = if failed.timeout {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            Fault::Timeout
        } else {
            self.stats.traps.fetch_add(1, Ordering::Relaxed);
            Fault::Trap(format!("building off the request path: {}", failed.message))
        };
        self.note_fault(&fault);
        fault
    }

    /// Sets the per-call deadline (`choose`; setup calls get ten times it) and the budget
    /// whose excess is warned of. Cheap when nothing changed: the proxy calls it per request
    /// with its listener's settings, so a reload applies at once.
    pub fn set_limits(&mut self, deadline: Duration, budget: Duration) {
        if deadline != self.timeout {
            self.timeout = deadline;
            self.deadline_ticks = super::runtime::deadline_ticks(deadline);
            if let Some(inst) = self.instance.as_mut() {
                inst.set_deadline_ticks(self.deadline_ticks);
            }
        }
        self.budget_ns = budget.as_nanos().min(u64::MAX as u128) as u64;
    }

    /// Counts and logs a failed instantiation, and suspends the plugin on this worker for the
    /// cool-down (trying again on every request would cost a `configure` each, up to ten
    /// deadlines when it loops).
    fn instantiation_failed(&mut self, e: &anyhow::Error) {
        self.instance = None;
        self.instance_failing = true;
        self.stats
            .instantiation_failures
            .fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        tracing::warn!(
            plugin = %self.plugin.name(),
            error = %format!("{e:#}"),
            retry_in_ms = self.cooldown.as_millis() as u64,
            "cannot instantiate the plugin on this worker; using the native fallback (least in flight) until an instance can be made"
        );
        self.last_warning = Some(now);
        self.suspended_until = Some(now + self.cooldown);
        self.cooldown = (self.cooldown * 2).min(MAX_COOLDOWN);
        self.consecutive_faults = 0;
    }

    /// The plugin this selector runs.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Picks a backend for `request` among `view`'s servers, never one in `tried`.
    pub fn choose(
        &mut self,
        view: &Arc<dyn PoolView>,
        request: &mut RequestInfo,
        tried: &[usize],
    ) -> Pick {
        if self.rebuild.pending.is_some()
            && let Some(fault) = self.poll_rebuild(view)
        {
            return self.fallback(view, tried, fault);
        }
        let fresh_list = view.generation() != self.generation;
        if fresh_list {
            let servers = view.servers();
            self.healthy = servers.iter().map(|s| s.healthy).collect();
            self.max_connections = servers.iter().map(|s| s.max_connections).collect();
            self.generation = view.generation();
            if self.instance.is_some() && self.rebuild.generation != self.generation {
                // Off the request path: a slow plugin's new shape (not load figures only).
                let shape = self.rebuild.enabled.then(|| rebuild::shape(&servers));
                let result = if self.off_path()
                    && shape.as_ref().is_some_and(|s| *s != self.rebuild.given)
                {
                    let translate = rebuild::translation(&self.rebuild.given, &servers);
                    if self.start_rebuild(view, servers) {
                        self.rebuild.translate = translate;
                        Ok(())
                    } else {
                        self.push_inline(view, &view.servers(), shape)
                    }
                } else {
                    self.push_inline(view, &servers, shape)
                };
                if let Err(e) = result {
                    let fault = self.fault(&e, "set-servers");
                    return self.fallback(view, tried, fault);
                }
            }
        }
        if let Some(until) = self.suspended_until {
            if Instant::now() < until {
                return self.fallback(view, tried, Fault::Suspended);
            }
            self.suspended_until = None;
        }
        if self.instance.is_none() && self.off_path() && self.start_rebuild(view, view.servers()) {
            // A slow plugin's new instance is made off the request path too.
            let why = "being built off the request path".to_string();
            return self.fallback(view, tried, Fault::Unavailable(why));
        }
        if self.instance.is_none() {
            match Instance::new(&self.plugin, self.deadline_ticks) {
                Ok(inst) => {
                    self.stats.reinstantiations.fetch_add(1, Ordering::Relaxed);
                    if std::mem::take(&mut self.instance_failing) {
                        tracing::info!(plugin = %self.plugin.name(), "plugin instance made on this worker; the plugin picks again");
                    }
                    self.instance = Some(inst);
                    self.rebuild.generation = u64::MAX;
                    if let Err(e) = self.push_inline(view, &view.servers(), None) {
                        let fault = self.fault(&e, "set-servers");
                        return self.fallback(view, tried, fault);
                    }
                }
                Err(e) => {
                    self.instantiation_failed(&e);
                    return self.fallback(view, tried, Fault::Unavailable(format!("{e:#}")));
                }
            }
        }
        let Some(inst) = self.instance.as_mut() else {
            return self.fallback(view, tried, Fault::Unavailable("instance missing".into()));
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let answer = inst.choose(request);
        let ended = Instant::now();
        self.timed(ended.saturating_duration_since(started), ended);
        // An instance still serving the list before the pool changed: its answer is an index
        // into that list, translated by server id; what it cannot give now is not a fault.
        let stale = self.rebuild.enabled && self.rebuild.generation != self.generation;
        if stale {
            bump(&self.stats.stale_calls);
            let answer = match answer {
                Ok(Some(index)) if (index as usize) < self.rebuild.given.len() => {
                    match self.rebuild.translate.get(index as usize) {
                        Some(&i) if i != GONE => Ok(Some(i)),
                        _ => return self.fallback(view, tried, Fault::Stale),
                    }
                }
                Ok(None) if self.native_pick(view, tried).is_some() => {
                    return self.fallback(view, tried, Fault::Stale);
                }
                Ok(Some(index)) => {
                    // Out of range of its own list: the plugin's bug.
                    self.instance = None;
                    let f = Fault::OutOfRange {
                        index,
                        len: self.rebuild.given.len(),
                    };
                    self.stats.bad_answers.fetch_add(1, Ordering::Relaxed);
                    self.note_fault(&f);
                    return self.fallback(view, tried, f);
                }
                other => other,
            };
            if let Ok(Some(i)) = answer
                && !self.healthy.get(i as usize).copied().unwrap_or(false)
            {
                return self.fallback(view, tried, Fault::Stale);
            }
            return self.checked(answer, view, tried);
        }
        self.checked(answer, view, tried)
    }

    /// Checks the plugin's answer (an index into `view`) and makes the pick.
    fn checked(
        &mut self,
        answer: Result<Option<u32>, wasmtime::Error>,
        view: &Arc<dyn PoolView>,
        tried: &[usize],
    ) -> Pick {
        match answer {
            Ok(None) if self.native_pick(view, tried).is_some() => {
                // The host sees a backend that could take it: a plugin bug (or a stale
                // notion of the pool), not a decision the client should pay for with a 503.
                let f = Fault::NoneWhileEligible;
                self.stats.bad_answers.fetch_add(1, Ordering::Relaxed);
                self.note_fault(&f);
                self.fallback(view, tried, f)
            }
            Ok(None) => {
                self.consecutive_faults = 0;
                self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                Pick {
                    index: None,
                    source: PickSource::Plugin,
                }
            }
            Ok(Some(index)) => {
                let i = index as usize;
                let fault = if i >= view.len() {
                    // A wrong index is a bug in the plugin's state: start it afresh.
                    self.instance = None;
                    Some(Fault::OutOfRange {
                        index,
                        len: view.len(),
                    })
                } else if !self.healthy.get(i).copied().unwrap_or(false) {
                    Some(Fault::Unhealthy(i))
                } else if tried.contains(&i) {
                    Some(Fault::AlreadyTried(i))
                } else if self.is_full(view, i) {
                    Some(Fault::Full(i))
                } else {
                    None
                };
                match fault {
                    None => {
                        self.consecutive_faults = 0;
                        self.cooldown = MIN_COOLDOWN;
                        Pick {
                            index: Some(i),
                            source: PickSource::Plugin,
                        }
                    }
                    Some(f @ (Fault::AlreadyTried(_) | Fault::Full(_))) => {
                        self.fallback(view, tried, f)
                    }
                    Some(f) => {
                        self.stats.bad_answers.fetch_add(1, Ordering::Relaxed);
                        self.note_fault(&f);
                        self.fallback(view, tried, f)
                    }
                }
            }
            Err(e) => {
                let fault = self.fault(&e, "choose");
                self.fallback(view, tried, fault)
            }
        }
    }

    /// Records a trap or timeout: counts it and drops the (now unusable) instance.
    fn fault(&mut self, e: &wasmtime::Error, during: &str) -> Fault {
        self.instance = None;
        let fault = if is_timeout(e) {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            Fault::Timeout
        } else {
            self.stats.traps.fetch_add(1, Ordering::Relaxed);
            Fault::Trap(format!("{during}: {}", fault_text(e)))
        };
        self.note_fault(&fault);
        fault
    }

    /// Logs (rate-limited) and advances the suspension breaker.
    fn note_fault(&mut self, fault: &Fault) {
        self.consecutive_faults += 1;
        let now = Instant::now();
        if self.consecutive_faults >= FAULTS_BEFORE_SUSPENSION {
            self.suspended_until = Some(now + self.cooldown);
            self.cooldown = (self.cooldown * 2).min(MAX_COOLDOWN);
            self.consecutive_faults = 0;
        }
        let due = self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            tracing::warn!(
                plugin = %self.plugin.name(),
                fault = %fault,
                suppressed = self.suppressed,
                "plugin fault; using the native fallback for this request"
            );
            self.last_warning = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    /// Records a call's duration; once a window is over, warns if more than 1% of its calls
    /// were over the budget.
    fn timed(&mut self, took: Duration, now: Instant) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        self.stats.record_choose(ns);
        let w = &mut self.window;
        w.calls += 1;
        w.slow += u64::from(ns > self.budget_ns);
        let Some(ends) = w.ends else {
            w.ends = Some(now + SLOW_WINDOW);
            return;
        };
        if now < ends {
            return;
        }
        let (calls, slow) = (w.calls, w.slow);
        (w.calls, w.slow, w.ends) = (0, 0, Some(now + SLOW_WINDOW));
        let due = w
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= SLOW_WARNING_EVERY);
        if calls >= SLOW_MIN_CALLS && slow * 100 > calls && due {
            w.last_warning = Some(now);
            tracing::warn!(
                plugin = %self.plugin.name(),
                slow_calls = slow,
                calls,
                budget_us = self.budget_ns / 1000,
                deadline_ms = self.timeout.as_millis() as u64,
                "plugin choose p99 over budget: the plugin's time per request limits this worker's throughput (see lbwasm_plugin_choose_duration_seconds)"
            );
        }
    }

    fn is_full(&mut self, view: &Arc<dyn PoolView>, i: usize) -> bool {
        let max = self.max_connections.get(i).copied().unwrap_or(0);
        max > 0 && view.load(i).in_flight >= max
    }

    /// Native pick, counted as a fallback for `fault`.
    fn fallback(&mut self, view: &Arc<dyn PoolView>, tried: &[usize], fault: Fault) -> Pick {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        Pick {
            index: self.native_pick(view, tried),
            source: PickSource::Fallback(fault),
        }
    }

    /// The eligible backend (healthy, not tried, under its limit) with the fewest in-flight
    /// requests, ties rotating; none when no backend is eligible.
    fn native_pick(&mut self, view: &Arc<dyn PoolView>, tried: &[usize]) -> Option<usize> {
        let mut column = std::mem::take(&mut self.column);
        column.clear();
        view.in_flight_column(&mut column);
        let n = column.len().min(self.healthy.len());
        self.rotation = self.rotation.wrapping_add(1);
        let mut best: Option<(usize, u32)> = None;
        for k in 0..n {
            let i = (k + self.rotation as usize) % n;
            let max = self.max_connections.get(i).copied().unwrap_or(0);
            let eligible = self.healthy[i] && !tried.contains(&i) && (max == 0 || column[i] < max);
            if eligible && best.is_none_or(|(_, b)| column[i] < b) {
                best = Some((i, column[i]));
            }
        }
        self.column = column;
        best.map(|(i, _)| i)
    }
}

impl Drop for Selector {
    fn drop(&mut self) {
        self.plugin.stats.retire(&self.stats);
        // Zero ours so the sum stays right until the registry drops the dead entry.
        self.stats.zero();
    }
}

impl Plugin {
    /// A new instance for one worker thread; an error when no instance can be made.
    pub fn selector(self: &Arc<Self>) -> anyhow::Result<Selector> {
        Selector::new(self.clone())
    }

    /// A selector for one proxy worker, even when no instance can be made now: it then
    /// picks with the native fallback and retries the instance after a growing cool-down
    /// (counted as `instantiation_failures`, logged).
    pub fn worker_selector(self: &Arc<Self>) -> Selector {
        Selector::new_or_fallback(self.clone())
    }
}
