//! [`LocalListener`]: one listener as one worker sees it — the cached pool snapshot,
//! settings and plugin selector (re-read only when their pointer changes), the retry budget,
//! the worker's backend connections and metrics shard — and [`LocalListener::choose`], the
//! plugin's pick.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;

use super::access_log::LocalLog;
use super::budget::RetryBudget;
use super::client::ConnPool;
use super::exec::LocalExec;
use super::{ListenerShared, Settings};
use crate::metrics::WorkerShard;
use crate::pool::Snapshot;
use lbwasm_plugin_host::{PickSource, Plugin, PoolView, RequestInfo, Selector};

/// A snapshot as this worker uses it: the snapshot, and the same as the trait object the
/// selector takes (made once per snapshot, not per request).
pub(super) struct LocalView {
    pub(super) snapshot: Arc<Snapshot>,
    pub(super) dyn_view: Arc<dyn PoolView>,
}

impl LocalView {
    fn new(snapshot: Arc<Snapshot>) -> Self {
        LocalView {
            dyn_view: snapshot.clone(),
            snapshot,
        }
    }
}

/// Why no backend was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoBackend {
    /// Every backend is down, ejected or draining (or the pool is empty).
    NoneHealthy,
    /// The plugin answered none.
    Refused,
    /// Healthy backends exist but none is eligible (all tried, or at their limit).
    Busy,
    /// No plugin instance could be made on this worker.
    Unavailable,
}

impl NoBackend {
    /// The cause, for the one-line 503 body.
    pub(super) fn message(self, local: &LocalListener) -> String {
        let pool = &local.shared.name;
        match self {
            NoBackend::NoneHealthy => format!("no healthy backend in pool \"{pool}\""),
            NoBackend::Refused => {
                format!(
                    "plugin {} found no backend for this request in pool \"{pool}\"",
                    local.shared.plugin.load().name()
                )
            }
            NoBackend::Busy => format!(
                "no backend of pool \"{pool}\" can take the request (all at their connection limit)"
            ),
            NoBackend::Unavailable => format!(
                "plugin {} cannot run on this worker",
                local.shared.plugin.load().name()
            ),
        }
    }
}

type CacheOf<T> = Cache<Arc<ArcSwap<T>>, Arc<T>>;

/// One listener on one worker: everything a request needs, without a lock.
pub(super) struct LocalListener {
    pub(super) shared: Arc<ListenerShared>,
    pub(super) metrics: Arc<WorkerShard>,
    pub(super) conns: Rc<ConnPool>,
    pub(super) budget: RetryBudget,
    pub(super) h2: hyper::server::conn::http2::Builder<LocalExec>,
    pub(super) log: Rc<LocalLog>,
    snapshots: RefCell<CacheOf<Snapshot>>,
    view: RefCell<Rc<LocalView>>,
    plugins: RefCell<CacheOf<Plugin>>,
    selector: RefCell<Option<Selector>>,
    settings_cache: RefCell<CacheOf<Settings>>,
    settings: RefCell<(Arc<Settings>, Rc<Settings>)>,
}

impl LocalListener {
    /// `shared` on this worker, over the worker's `conns` and metrics shard.
    pub(super) fn new(
        shared: Arc<ListenerShared>,
        metrics: Arc<WorkerShard>,
        conns: Rc<ConnPool>,
    ) -> Self {
        let h2 = hyper::server::conn::http2::Builder::new(LocalExec);
        let snapshot = shared.pool.snapshot();
        let settings = shared.settings.load_full();
        LocalListener {
            metrics,
            conns,
            budget: RetryBudget::new(),
            h2,
            log: Rc::new(LocalLog::new(&shared.access_log)),
            snapshots: RefCell::new(Cache::new(shared.pool.cell().clone())),
            view: RefCell::new(Rc::new(LocalView::new(snapshot))),
            plugins: RefCell::new(Cache::new(shared.plugin.clone())),
            selector: RefCell::new(None),
            settings_cache: RefCell::new(Cache::new(shared.settings.clone())),
            settings: RefCell::new((settings.clone(), Rc::new((*settings).clone()))),
            shared,
        }
    }

    /// The current snapshot and settings (re-read only when they were replaced).
    pub(super) fn state(&self) -> (Rc<LocalView>, Rc<Settings>) {
        let view = {
            let mut cache = self.snapshots.borrow_mut();
            let snap = cache.load();
            let mut v = self.view.borrow_mut();
            if !Arc::ptr_eq(&v.snapshot, snap) {
                *v = Rc::new(LocalView::new(snap.clone()));
            }
            v.clone()
        };
        let settings = {
            let mut cache = self.settings_cache.borrow_mut();
            let cur = cache.load();
            let mut s = self.settings.borrow_mut();
            if !Arc::ptr_eq(&s.0, cur) {
                *s = (cur.clone(), Rc::new((**cur).clone()));
            }
            s.1.clone()
        };
        (view, settings)
    }

    /// Asks the plugin for a backend index in `view`, never one in `tried`. A swapped plugin
    /// gets its instance on this worker here, on its first request.
    pub(super) fn choose(
        &self,
        view: &LocalView,
        info: &mut RequestInfo,
        tried: &[usize],
    ) -> Result<usize, NoBackend> {
        if view.snapshot.healthy_count() == 0 {
            return Err(NoBackend::NoneHealthy);
        }
        let mut selector = self.selector.borrow_mut();
        {
            let mut cache = self.plugins.borrow_mut();
            let plugin = cache.load();
            let current = selector
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s.plugin(), plugin));
            if !current {
                // Never fails: without an instance the selector picks natively and retries
                // after a cool-down (logged, and counted on /metrics).
                *selector = Some(plugin.worker_selector());
            }
        }
        let Some(sel) = selector.as_mut() else {
            return Err(NoBackend::Unavailable);
        };
        let t = self.settings.borrow().1.timeouts;
        sel.set_limits(t.plugin, t.plugin_budget);
        let pick = sel.choose(&view.dyn_view, info, tried);
        match (pick.index, pick.source) {
            (Some(i), _) => Ok(i),
            (None, PickSource::Plugin) => Err(NoBackend::Refused),
            (None, PickSource::Fallback(_)) => Err(NoBackend::Busy),
        }
    }
}
