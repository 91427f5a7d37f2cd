//! The backend pool of one listener: its members ([`Backend`]) and the immutable
//! [`Snapshot`] of them that workers read.
//!
//! Membership, health, weight and load-report changes rebuild the snapshot and publish it
//! atomically (`ArcSwap`), with a new generation from a process-wide counter, so a
//! plugin instance is given the server list again only when something changed — never per
//! request. Every change goes through [`Pool`] ([`Pool::add`], [`Pool::remove`],
//! [`Pool::update`]), which publishes it: nobody can change a backend and forget to. Live
//! figures (in-flight, latency, counters) are atomics in each [`Backend`], read through the
//! snapshot during `choose`. This module does not decide health (that is
//! [`crate::health`]), it only records and publishes it.

mod backend;
mod in_flight;

pub use backend::{Backend, BackendState, InFlight, LoadFigures};
use in_flight::PoolRows;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use lbwasm_plugin_host::{PoolView, ServerInfo, ServerLoad};

/// Generations of every snapshot of every pool; starts high so it never meets the
/// [`lbwasm_plugin_host::StaticPool`] counter.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1 << 56);

/// An immutable view of a pool: the backends in index order, and what plugins were told
/// about them. Indices a plugin returns refer to this list.
pub struct Snapshot {
    generation: u64,
    backends: Vec<Arc<Backend>>,
    /// Where each backend's in-flight count lives, in index order: reading a whole pool's
    /// counts per pick walks these columns, not every backend's own cache lines.
    in_flight: PoolRows,
    infos: Vec<ServerInfo>,
    healthy: usize,
}

impl Snapshot {
    fn build(backends: Vec<Arc<Backend>>, slow_start: Duration) -> Self {
        let now = Instant::now();
        let infos: Vec<ServerInfo> = backends
            .iter()
            .map(|b| {
                let st = b.current_state();
                let report = st.report;
                ServerInfo {
                    id: b.id,
                    address: b.address().to_string(),
                    weight: b.weight(),
                    healthy: st.healthy(),
                    max_connections: b.max_connections(),
                    warmup: st.warmup(slow_start, now),
                    cpu_percent: report.and_then(|r| r.cpu_percent),
                    memory_percent: report.and_then(|r| r.memory_percent),
                    backend_connections: report.and_then(|r| r.connections),
                    load_sample: st.report_samples,
                    load_sampled_at_ms: report.map_or(0, |r| r.sampled_at_ms),
                }
            })
            .collect();
        let healthy = infos.iter().filter(|i| i.healthy).count();
        Snapshot {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            in_flight: PoolRows::new(backends.iter().map(|b| b.in_flight_cell())),
            backends,
            infos,
            healthy,
        }
    }

    /// The backend at a plugin's index.
    pub fn backend(&self, index: usize) -> Option<&Arc<Backend>> {
        self.backends.get(index)
    }

    /// Every backend, in index order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// What plugins were told, in index order.
    pub fn infos(&self) -> &[ServerInfo] {
        &self.infos
    }

    /// Backends that may take new requests.
    pub fn healthy_count(&self) -> usize {
        self.healthy
    }
}

impl PoolView for Snapshot {
    fn generation(&self) -> u64 {
        self.generation
    }
    fn servers(&self) -> Vec<ServerInfo> {
        self.infos.clone()
    }
    fn len(&self) -> usize {
        self.backends.len()
    }
    fn load(&self, index: usize) -> ServerLoad {
        self.backends
            .get(index)
            .map(|b| b.load())
            .unwrap_or_default()
    }
    fn in_flight_column(&self, out: &mut Vec<u32>) {
        self.in_flight.column(out);
    }
    fn in_flight_prefix(&self, out: &mut [u32]) {
        self.in_flight.column_prefix(out);
    }
    fn latency_column(&self, out: &mut Vec<u32>) {
        out.extend(self.backends.iter().map(|b| b.latency_us()));
    }
}

/// One listener's pool: the member list (control plane) and the published snapshot
/// (workers). Every mutation goes through here and publishes a new snapshot.
pub struct Pool {
    name: String,
    current: Arc<ArcSwap<Snapshot>>,
    members: Mutex<Vec<Arc<Backend>>>,
    slow_start: Mutex<Duration>,
}

impl Pool {
    /// A pool named like its listener (`name` appears in 503 messages), with these backends.
    pub fn new(name: &str, backends: Vec<Arc<Backend>>, slow_start: Duration) -> Self {
        let snapshot = Snapshot::build(backends.clone(), slow_start);
        Pool {
            name: name.to_string(),
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            members: Mutex::new(backends),
            slow_start: Mutex::new(slow_start),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cell workers cache (`arc_swap::Cache`) to read snapshots without a lock.
    pub fn cell(&self) -> &Arc<ArcSwap<Snapshot>> {
        &self.current
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The members now (control plane), in index order: a copy, so no lock is held.
    pub fn members(&self) -> Vec<Arc<Backend>> {
        self.lock_members().clone()
    }

    fn lock_members(&self) -> MutexGuard<'_, Vec<Arc<Backend>>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member by address.
    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        self.lock_members().iter().find(|b| b.addr == addr).cloned()
    }

    /// A member by id.
    pub fn find_id(&self, id: u32) -> Option<Arc<Backend>> {
        self.lock_members().iter().find(|b| b.id == id).cloned()
    }

    /// Slow-start ramp length (from `[listener.passive]`).
    pub fn slow_start(&self) -> Duration {
        *self.slow_start.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the ramp (reload).
    pub fn set_slow_start(&self, ramp: Duration) {
        *self.slow_start.lock().unwrap_or_else(|e| e.into_inner()) = ramp;
    }

    /// Adds a backend unless one with its address is already a member. Publishes.
    pub fn add(&self, backend: Arc<Backend>) -> bool {
        {
            let mut m = self.lock_members();
            if m.iter().any(|b| b.addr == backend.addr) {
                return false;
            }
            m.push(backend);
        }
        self.publish();
        true
    }

    /// Removes the members `which` selects and publishes; their in-flight requests finish
    /// on the `Arc`s they hold.
    pub fn remove(&self, which: impl Fn(&Backend) -> bool) -> Vec<Arc<Backend>> {
        let removed: Vec<Arc<Backend>> = {
            let mut m = self.lock_members();
            let (gone, kept): (Vec<_>, Vec<_>) = m.drain(..).partition(|b| which(b));
            *m = kept;
            gone
        };
        if !removed.is_empty() {
            self.publish();
        }
        removed
    }

    /// Runs `f`, which changes members through [`Changes`], then publishes one new snapshot
    /// if anything a snapshot or a report shows changed. The only way to change a backend
    /// (health, drain, load report, weight): no caller can forget to publish, a round of
    /// changes costs one generation, and a round that changes nothing shown (a check that
    /// confirms "up", a failure counted towards `fall`) costs plugins none.
    pub fn update<R>(&self, f: impl FnOnce(&mut Changes) -> R) -> R {
        let mut changes = Changes { shown: false };
        let result = f(&mut changes);
        if changes.shown {
            self.publish();
        }
        result
    }

    /// [`Pool::update`] of one backend's state.
    pub fn update_one<R>(&self, backend: &Backend, f: impl FnOnce(&mut BackendState) -> R) -> R {
        self.update(|changes| changes.state(backend, f))
    }

    /// Rebuilds the snapshot from the members and their state, with a new generation.
    fn publish(&self) {
        let members = self.members();
        self.current
            .store(Arc::new(Snapshot::build(members, self.slow_start())));
    }

    /// Republishes while some member is in its slow-start ramp (its share in the snapshot
    /// grows with time), and once more when the ramp ends.
    pub fn republish_warming(&self) {
        let ramp = self.slow_start();
        let now = Instant::now();
        let mut warming = false;
        for b in self.lock_members().iter() {
            b.modify_state(|st| {
                if let Some(since) = st.warming_since {
                    warming = true;
                    if ramp.is_zero() || now.saturating_duration_since(since) >= ramp {
                        st.warming_since = None;
                    }
                }
            });
        }
        if warming {
            self.publish();
        }
    }
}

/// Changes to a pool's members within one [`Pool::update`], which publishes them together.
/// Only [`Pool::update`] makes one.
pub struct Changes {
    /// Something a snapshot or a report shows has changed.
    shown: bool,
}

impl Changes {
    /// Changes `backend`'s state with `f` (its lock is held only while `f` runs).
    pub fn state<R>(&mut self, backend: &Backend, f: impl FnOnce(&mut BackendState) -> R) -> R {
        let (result, changed) = backend.modify_state(|st| {
            let before = shown(st);
            let result = f(st);
            (result, shown(st) != before)
        });
        self.shown |= changed;
        result
    }

    /// Sets `backend`'s weight and connection limit; true if either changed.
    pub fn set_limits(&mut self, backend: &Backend, weight: u32, max_connections: u32) -> bool {
        let changed = backend.set_limits(weight, max_connections);
        self.shown |= changed;
        changed
    }
}

/// Up by checks, process up, draining, ejected until, warming since, load report, reports.
type Shown = (
    bool,
    bool,
    bool,
    Option<Instant>,
    Option<Instant>,
    Option<LoadFigures>,
    u64,
);

/// What snapshots and reports show of a backend's state; the rest (`rise`, `fall`,
/// `ejections`, `readmitted_at`) is the health checks' own bookkeeping.
fn shown(st: &BackendState) -> Shown {
    (
        st.active_up,
        st.process_up,
        st.draining,
        st.ejected_until,
        st.warming_since,
        st.report,
        st.report_samples,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn publishing_changes_generation_and_reflects_health() {
        let pool = Pool::new(
            "web",
            vec![Backend::new(addr(1), 1, 0), Backend::new(addr(2), 2, 0)],
            Duration::ZERO,
        );
        let first = pool.snapshot();
        assert_eq!(first.healthy_count(), 2);
        let b = pool.find(addr(2)).unwrap();
        pool.update_one(&b, |st| st.fall += 1);
        assert_eq!(
            pool.snapshot().generation(),
            first.generation(),
            "bookkeeping alone publishes nothing"
        );
        pool.update_one(&b, |st| st.draining = true);
        let second = pool.snapshot();
        assert_ne!(second.generation(), first.generation());
        assert_eq!(second.healthy_count(), 1);
        assert_eq!(second.infos()[1].weight, 2);
        assert!(!second.infos()[1].healthy);
        let third = pool.update(|c| {
            assert!(!c.set_limits(&b, 2, 0), "unchanged");
            assert!(c.set_limits(&b, 3, 10));
            c.state(&b, |st| st.draining = false);
            pool.snapshot()
        });
        assert_eq!(
            third.generation(),
            second.generation(),
            "published on return"
        );
        let fourth = pool.snapshot();
        assert_ne!(fourth.generation(), second.generation());
        assert_eq!((fourth.infos()[1].weight, fourth.healthy_count()), (3, 2));
    }

    #[test]
    fn add_refuses_duplicates_and_remove_keeps_ids() {
        let pool = Pool::new("web", vec![Backend::new(addr(1), 1, 0)], Duration::ZERO);
        assert!(!pool.add(Backend::new(addr(1), 1, 0)));
        let b = Backend::new(addr(2), 1, 0);
        let id = b.id;
        assert!(pool.add(b));
        let gone = pool.remove(|b| b.addr == addr(1));
        assert_eq!(gone.len(), 1);
        assert_eq!(
            pool.snapshot()
                .infos()
                .iter()
                .map(|i| i.id)
                .collect::<Vec<_>>(),
            vec![id]
        );
    }

    #[test]
    fn slow_start_ramps_from_a_floor() {
        let mut st = BackendState::default();
        let now = Instant::now();
        assert_eq!(st.warmup(Duration::from_secs(10), now), 1.0);
        st.warming_since = Some(now);
        assert_eq!(st.warmup(Duration::from_secs(10), now), 0.1);
        let w = st.warmup(Duration::from_secs(10), now + Duration::from_secs(5));
        assert!((0.49..=0.51).contains(&w));
    }
}
