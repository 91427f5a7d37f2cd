//! Worker threads: each a tokio current-thread runtime with a `LocalSet`, its own
//! `SO_REUSEPORT` socket per listener, and per listener a [`LocalListener`] (cached pool
//! snapshot, plugin selector, settings, retry budget). Also the drain on shutdown: stop
//! accepting, let in-flight requests finish until the deadline, then drop what is left.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};

use super::access_log::LocalLog;
use super::budget::RetryBudget;
use super::client::ConnPool;
use super::{ListenerShared, Settings, http, tcp};
use crate::config::Protocol;
use crate::metrics::{Metrics, WorkerShard};
use crate::plugin::{PickSource, Plugin, PoolView, RequestInfo, Selector};
use crate::pool::Snapshot;

/// Binds `count` sockets on `addr` in one `SO_REUSEPORT` group (the kernel spreads new
/// connections over them); port 0 is resolved by the first. Refuses a port some other
/// socket already listens on, even one that would have let us join its group.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        // A plain bind fails if anyone listens there; a SO_REUSEPORT bind might not.
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut addr = addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let s = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        let l: std::net::TcpListener = s.into();
        if addr.port() == 0 {
            addr = l.local_addr()?;
        }
        out.push(l);
    }
    Ok(out)
}

/// A running worker thread.
pub struct WorkerHandle {
    done: oneshot::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Resolves when the worker has drained and its runtime is gone.
    pub async fn wait(mut self) {
        let _ = (&mut self.done).await;
        if let Some(t) = self.thread.take() {
            // Already past its last statement: joining does not block.
            let _ = t.join();
        }
    }
}

/// Starts one worker per entry of each listener's socket list (`sockets[l][w]` is worker
/// `w`'s socket for listener `l`). Workers run until `shutdown` holds a deadline, then drain.
pub fn spawn_workers(
    listeners: &[Arc<ListenerShared>],
    sockets: Vec<Vec<std::net::TcpListener>>,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<Option<Instant>>,
) -> anyhow::Result<Vec<WorkerHandle>> {
    let workers = sockets.iter().map(Vec::len).max().unwrap_or(0);
    let mut per_worker: Vec<Vec<(Arc<ListenerShared>, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for (shared, list) in listeners.iter().zip(sockets) {
        for (w, socket) in list.into_iter().enumerate() {
            per_worker[w].push((shared.clone(), socket));
        }
    }
    let mut handles = Vec::with_capacity(workers);
    for (index, listeners) in per_worker.into_iter().enumerate() {
        let (done_tx, done) = oneshot::channel();
        let shard = metrics.shard();
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lbwasm-worker-{index}"))
            .spawn(move || run(index, listeners, shard, shutdown, done_tx))
            .context("starting a worker thread")?;
        handles.push(WorkerHandle {
            done,
            thread: Some(thread),
        });
    }
    Ok(handles)
}

fn run(
    index: usize,
    listeners: Vec<(Arc<ListenerShared>, std::net::TcpListener)>,
    shard: Arc<WorkerShard>,
    shutdown: watch::Receiver<Option<Instant>>,
    done: oneshot::Sender<()>,
) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, main(index, listeners, shard, shutdown));
            // Dropping the set and the runtime closes whatever outlived the deadline.
            drop(local);
            drop(rt);
        }
        Err(error) => tracing::error!(worker = index, %error, "cannot start the worker's runtime"),
    }
    let _ = done.send(());
}

async fn main(
    index: usize,
    listeners: Vec<(Arc<ListenerShared>, std::net::TcpListener)>,
    shard: Arc<WorkerShard>,
    mut shutdown: watch::Receiver<Option<Instant>>,
) {
    let conns = Rc::new(ConnPool::default());
    let drain = Rc::new(Drain::default());
    let mut accepts = Vec::new();
    let mut locals = Vec::new();
    for (shared, socket) in listeners {
        let name = shared.name.clone();
        match TcpListener::from_std(socket) {
            Ok(listener) => {
                let local = Rc::new(LocalListener::new(shared, shard.clone(), conns.clone()));
                locals.push(local.clone());
                accepts.push(tokio::task::spawn_local(accept_loop(
                    local,
                    listener,
                    drain.clone(),
                )));
            }
            Err(error) => {
                tracing::error!(worker = index, listener = %name, %error, "cannot use the listening socket")
            }
        }
    }
    let sweeper = {
        let conns = conns.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                conns.sweep();
                release_freed_pages();
            }
        })
    };
    // Access-log lines wait at most a second (the rest go when the listeners drop).
    let flusher = tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for local in &locals {
                local.log.flush();
            }
        }
    });
    tracing::debug!(worker = index, "worker started");
    let deadline = loop {
        if let Some(d) = *shutdown.borrow_and_update() {
            break d;
        }
        if shutdown.changed().await.is_err() {
            break Instant::now();
        }
    };
    drain.start();
    for a in accepts {
        a.abort();
    }
    sweeper.abort();
    flusher.abort();
    let live = drain.live.get();
    if tokio::time::timeout_at(deadline.into(), drain.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            worker = index,
            connections = drain.live.get(),
            "drain deadline reached; closing what is left"
        );
    }
    tracing::debug!(worker = index, drained = live, "worker stopped");
}

/// Returns to the system the pages this worker's requests freed and mimalloc still holds
/// (it purges them only from within allocator calls, which an idle worker does not
/// make): 4,000 idle connections held 1.2 KiB more each without it. A no-op where
/// mimalloc is not the allocator (the library in tests).
fn release_freed_pages() {
    // SAFETY: `mi_collect` takes no pointer and only touches the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

async fn accept_loop(local: Rc<LocalListener>, listener: TcpListener, drain: Rc<Drain>) {
    let started = drain.started();
    tokio::pin!(started);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut started => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let live = drain.enter();
                let (l, d) = (local.clone(), drain.clone());
                match local.shared.protocol {
                    Protocol::Http => tokio::task::spawn_local(async move {
                        http::serve(l, stream, peer, d).await;
                        drop(live);
                    }),
                    Protocol::Tcp => tokio::task::spawn_local(async move {
                        tcp::serve(l, stream, peer).await;
                        drop((live, d));
                    }),
                };
            }
            Err(error) => {
                tracing::warn!(listener = %local.shared.name, %error, "accept failed");
                // Typically out of file descriptors: don't spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// hyper's executor for HTTP/2 streams: tasks stay on this worker (they may hold `Rc`s).
#[derive(Clone, Copy, Debug)]
pub(super) struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// A worker's connections, and the signal to wind them down.
#[derive(Default)]
pub(super) struct Drain {
    draining: Cell<bool>,
    started: Notify,
    live: Cell<usize>,
    idle: Notify,
}

/// Counts one live client connection.
pub(super) struct Live(Rc<Drain>);

impl Drop for Live {
    fn drop(&mut self) {
        let d = &self.0;
        d.live.set(d.live.get() - 1);
        if d.live.get() == 0 {
            d.idle.notify_waiters();
        }
    }
}

impl Drain {
    fn start(&self) {
        self.draining.set(true);
        self.started.notify_waiters();
    }

    /// Whether the worker is draining.
    pub(super) fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Resolves once the worker is draining.
    pub(super) async fn started(&self) {
        loop {
            let notified = self.started.notified();
            if self.draining.get() {
                return;
            }
            notified.await;
        }
    }

    fn enter(self: &Rc<Self>) -> Live {
        self.live.set(self.live.get() + 1);
        Live(self.clone())
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

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
    Healthy,
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
            NoBackend::Healthy => format!("no healthy backend in pool \"{pool}\""),
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

/// Indices already tried for a request (at most `retry.attempts` <= 10).
#[derive(Default)]
pub(super) struct Tried {
    list: [usize; 16],
    len: usize,
}

impl Tried {
    pub(super) fn push(&mut self, index: usize) {
        if self.len < self.list.len() {
            self.list[self.len] = index;
            self.len += 1;
        }
    }

    pub(super) fn as_slice(&self) -> &[usize] {
        &self.list[..self.len]
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
    fn new(shared: Arc<ListenerShared>, metrics: Arc<WorkerShard>, conns: Rc<ConnPool>) -> Self {
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
            return Err(NoBackend::Healthy);
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
