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

use super::instance::{Instance, fault_text, is_timeout};
use super::runtime::{Plugin, WorkerStats};
use super::{PoolView, RequestInfo};
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
}

const FAULTS_BEFORE_SUSPENSION: u32 = 3;
const MIN_COOLDOWN: Duration = Duration::from_millis(500);
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

impl Selector {
    pub(super) fn new(plugin: Arc<Plugin>) -> anyhow::Result<Self> {
        let instance = Instance::new(&plugin)?;
        let stats = plugin.stats.register();
        Ok(Selector {
            plugin,
            instance: Some(instance),
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
        })
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
        let fresh_list = view.generation() != self.generation;
        if fresh_list {
            let servers = view.servers();
            self.healthy = servers.iter().map(|s| s.healthy).collect();
            self.max_connections = servers.iter().map(|s| s.max_connections).collect();
            self.generation = view.generation();
            if let Some(inst) = self.instance.as_mut()
                && let Err(e) = inst.set_servers(view.clone(), &servers)
            {
                let fault = self.fault(&e, "set-servers");
                return self.fallback(view, tried, fault);
            }
        }
        if let Some(until) = self.suspended_until {
            if Instant::now() < until {
                return self.fallback(view, tried, Fault::Suspended);
            }
            self.suspended_until = None;
        }
        if self.instance.is_none() {
            match Instance::new(&self.plugin) {
                Ok(mut inst) => {
                    self.stats.reinstantiations.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = inst.set_servers(view.clone(), &view.servers()) {
                        let fault = self.fault(&e, "set-servers");
                        return self.fallback(view, tried, fault);
                    }
                    self.instance = Some(inst);
                }
                Err(e) => {
                    let fault = Fault::Unavailable(format!("{e:#}"));
                    self.note_fault(&fault);
                    return self.fallback(view, tried, fault);
                }
            }
        }
        let Some(inst) = self.instance.as_mut() else {
            return self.fallback(view, tried, Fault::Unavailable("instance missing".into()));
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        match inst.choose(request) {
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

    fn is_full(&mut self, view: &Arc<dyn PoolView>, i: usize) -> bool {
        let max = self.max_connections.get(i).copied().unwrap_or(0);
        max > 0 && view.load(i).in_flight >= max
    }

    /// Native pick: the eligible backend with the fewest in-flight requests, ties rotating.
    fn fallback(&mut self, view: &Arc<dyn PoolView>, tried: &[usize], fault: Fault) -> Pick {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
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
        Pick {
            index: best.map(|(i, _)| i),
            source: PickSource::Fallback(fault),
        }
    }
}

impl Drop for Selector {
    fn drop(&mut self) {
        self.plugin.stats.retire(&self.stats);
        // Zero ours so the sum stays right until the registry drops the dead entry.
        for c in [
            &self.stats.calls,
            &self.stats.timeouts,
            &self.stats.traps,
            &self.stats.bad_answers,
            &self.stats.fallbacks,
            &self.stats.refusals,
            &self.stats.reinstantiations,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}
