//! Worker threads: each a tokio current-thread runtime with a `LocalSet`, its own
//! `SO_REUSEPORT` socket per listener, and per listener a [`LocalListener`]; the accept
//! loops, and the drain on shutdown (stop accepting, let in-flight requests finish until
//! the deadline, then drop what is left).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::client::ConnPool;
use super::drain::Drain;
use super::local::LocalListener;
use super::{ListenerShared, http, tcp};
use crate::config::Protocol;
use crate::metrics::{Metrics, WorkerShard};

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

/// A listener on one worker: its socket, or none when it takes connections from another
/// listener's socket (SNI routing: `routed_by` is that listener's index).
struct Assigned {
    shared: Arc<ListenerShared>,
    socket: Option<std::net::TcpListener>,
    routed_by: usize,
}

/// Starts one worker per entry of each listener's socket list (`sockets[l][w]` is worker
/// `w`'s socket for listener `l`; empty for a listener whose connections come through
/// another's socket, `routed_by[l]`, by SNI). Workers run until `shutdown` holds a
/// deadline, then drain.
pub fn spawn_workers(
    listeners: &[Arc<ListenerShared>],
    sockets: Vec<Vec<std::net::TcpListener>>,
    routed_by: &[usize],
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<Option<Instant>>,
) -> anyhow::Result<Vec<WorkerHandle>> {
    let workers = sockets.iter().map(Vec::len).max().unwrap_or(0);
    let mut per_worker: Vec<Vec<Assigned>> = (0..workers).map(|_| Vec::new()).collect();
    for (l, (shared, list)) in listeners.iter().zip(sockets).enumerate() {
        let mut list = list.into_iter();
        for assigned in &mut per_worker {
            assigned.push(Assigned {
                shared: shared.clone(),
                socket: list.next(),
                routed_by: routed_by.get(l).copied().unwrap_or(l),
            });
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
    listeners: Vec<Assigned>,
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
    listeners: Vec<Assigned>,
    shard: Arc<WorkerShard>,
    mut shutdown: watch::Receiver<Option<Instant>>,
) {
    let conns = Rc::new(ConnPool::default());
    let drain = Rc::new(Drain::default());
    let mut accepts = Vec::new();
    let locals: Vec<Rc<LocalListener>> = listeners
        .iter()
        .map(|a| {
            Rc::new(LocalListener::new(
                a.shared.clone(),
                shard.clone(),
                conns.clone(),
            ))
        })
        .collect();
    let routed_by: Vec<usize> = listeners.iter().map(|a| a.routed_by).collect();
    for (l, assigned) in listeners.into_iter().enumerate() {
        let Some(socket) = assigned.socket else {
            continue;
        };
        let name = assigned.shared.name.clone();
        // The listeners this socket's connections go to: itself, and those routed by it.
        let routes: Rc<[Rc<LocalListener>]> = (0..locals.len())
            .filter(|&i| routed_by[i] == l)
            .map(|i| locals[i].clone())
            .collect();
        match TcpListener::from_std(socket) {
            Ok(listener) => {
                accepts.push(tokio::task::spawn_local(accept_loop(
                    routes,
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

/// Accepts connections for `routes`: one listener, or (SNI routing) the listeners sharing
/// this socket, the first of which owns it.
async fn accept_loop(routes: Rc<[Rc<LocalListener>]>, listener: TcpListener, drain: Rc<Drain>) {
    let local = routes[0].clone();
    let routed = routes.len() > 1 || !local.shared.server_names.is_empty();
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
                    Protocol::Http => {
                        tokio::task::spawn_local(http::serve(l, stream, peer, d, live))
                    }
                    Protocol::Tcp if routed => {
                        let routes = routes.clone();
                        tokio::task::spawn_local(async move {
                            tcp::route(routes, stream, peer).await;
                            drop((live, d, l));
                        })
                    }
                    Protocol::Tcp => tokio::task::spawn_local(async move {
                        tcp::accept(l, stream, peer).await;
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
