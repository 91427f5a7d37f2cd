//! Counters of a loaded plugin: the WIT `shared` interface's counters, and the call, fault
//! and latency statistics each worker keeps and the admin API sums.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

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

    pub(super) fn reset(&self) {
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
    /// Off-path rebuilds ([`super::RebuildStats`]): started, swapped in, discarded, failed.
    pub(super) rebuilds_started: AtomicU64,
    pub(super) rebuilds_swapped: AtomicU64,
    pub(super) rebuilds_discarded: AtomicU64,
    pub(super) rebuilds_failed: AtomicU64,
    /// `choose` calls answered by an instance whose server list was older than the pool's.
    pub(super) stale_calls: AtomicU64,
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
    /// Instances built on a builder thread after a slow `set-servers`.
    pub rebuilds_started: u64,
    /// Of those, swapped in.
    pub rebuilds_swapped: u64,
    /// Of those, dropped: the pool had returned to the list in use meanwhile.
    pub rebuilds_discarded: u64,
    /// Of those, failed (no instance, a trap or the deadline).
    pub rebuilds_failed: u64,
    /// `choose` calls answered by an instance whose server list was older than the pool's
    /// (while a rebuild was under way); their answers were translated by server id.
    pub stale_calls: u64,
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
            rebuilds_started: g(&total.rebuilds_started),
            rebuilds_swapped: g(&total.rebuilds_swapped),
            rebuilds_discarded: g(&total.rebuilds_discarded),
            rebuilds_failed: g(&total.rebuilds_failed),
            stale_calls: g(&total.stale_calls),
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

impl WorkerStats {
    /// Every counter, in one order: what [`add`] and [`WorkerStats::zero`] walk, so a new
    /// counter is summed and retired once listed here.
    fn counters(&self) -> impl Iterator<Item = &AtomicU64> {
        [
            &self.calls,
            &self.timeouts,
            &self.traps,
            &self.bad_answers,
            &self.fallbacks,
            &self.refusals,
            &self.reinstantiations,
            &self.instantiation_failures,
            &self.rebuilds_started,
            &self.rebuilds_swapped,
            &self.rebuilds_discarded,
            &self.rebuilds_failed,
            &self.stale_calls,
            &self.choose_ns,
        ]
        .into_iter()
        .chain(&self.choose_buckets)
    }

    /// Zeroes every counter (a retired worker's, once folded into the registry's).
    pub(super) fn zero(&self) {
        for c in self.counters() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

fn add(into: &WorkerStats, from: &WorkerStats) {
    for (a, b) in into.counters().zip(from.counters()) {
        a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
