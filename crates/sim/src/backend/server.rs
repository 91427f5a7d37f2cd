//! One backend server's life: binding, the accept loop, fault windows (including closing
//! and reopening the listener for `down`), and the [`BackendHandle`] that controls it all.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use hyper::header::HeaderValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::config::{BackendConfig, Fault, Protocol};
use super::load::{self, Metered};
use super::state::{BackendStats, Gauge, LoadReport, Shared};
use super::{http, tcp};

/// How long to wait before retrying to reopen the listener after a `down` window.
const REBIND_RETRY: Duration = Duration::from_millis(200);

/// Starts a backend: binds `cfg.host:cfg.port` (0 = ephemeral) and serves it on background
/// tasks of the current tokio runtime until [`BackendHandle::shutdown`] or drop.
pub async fn spawn(cfg: BackendConfig) -> anyhow::Result<BackendHandle> {
    cfg.validate()?;
    // Gives sysinfo its CPU baseline, so that the first `/load` has a process figure.
    load::process_figures();
    let listener = TcpListener::bind((cfg.host, cfg.port))
        .await
        .with_context(|| format!("binding backend on {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let id = cfg
        .id
        .clone()
        .unwrap_or_else(|| format!("backend-{}", addr.port()));
    let served_by = HeaderValue::from_str(&id).with_context(|| format!("--id {id:?}"))?;
    let shared = Shared::new(cfg, id, served_by).await?;
    // A server that starts `down` must refuse from the first connection on.
    let listener = match shared.refresh_fault() {
        Some(Fault::Down) => None,
        _ => Some(listener),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(Metered::new(
        supervise(shared.clone(), listener, addr, shutdown_rx),
        shared.meter.clone(),
    ));
    tracing::info!(server = %shared.id, %addr, protocol = ?shared.cfg.protocol, "backend started");
    Ok(BackendHandle {
        shared,
        addr,
        shutdown_tx,
        task: Mutex::new(Some(task)),
    })
}

/// Controls a running backend. Dropping it stops the server too (without waiting).
#[derive(Debug)]
pub struct BackendHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl BackendHandle {
    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The id sent in `x-served-by`.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn stats(&self) -> BackendStats {
        self.shared.stats()
    }

    /// The `/load` report, without going through HTTP.
    pub fn load(&self) -> LoadReport {
        self.shared.load_report()
    }

    /// The fault in force now (set by [`Self::set_fault`] or a scheduled window).
    pub fn fault(&self) -> Option<Fault> {
        self.shared.fault()
    }

    /// `Some(f)` forces fault `f` from now on, overriding scheduled windows; `None` lifts
    /// the override and returns to the schedule (healthy outside its windows).
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self
            .shared
            .fault_override
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = fault;
        self.shared.refresh_fault();
    }

    /// Stops like a killed process: the listener closes and every open connection is
    /// dropped, in-flight requests included. Returns once the port is closed. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task
            && let Err(error) = task.await
            && error.is_panic()
        {
            tracing::error!(server = %self.shared.id, %error, "backend task panicked");
        }
        tracing::info!(server = %self.shared.id, "backend stopped");
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Aborting drops the accept loop's JoinSets, which aborts every connection.
            task.abort();
        }
    }
}

async fn accept(listener: &Option<TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The accept loop; owns every task of the server so that ending it ends them all.
async fn supervise(
    shared: Arc<Shared>,
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut aux = JoinSet::new();
    aux.spawn(sample_cpu(shared.clone()));
    if !shared.cfg.faults.is_empty() {
        aux.spawn(schedule_faults(shared.clone()));
    }
    let mut conns = JoinSet::new();
    let mut fault_rx = shared.fault_tx.subscribe();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut was_down = listener.is_none();
    loop {
        let down = *fault_rx.borrow_and_update() == Some(Fault::Down);
        if down {
            if !was_down {
                tracing::info!(server = %shared.id, connections = conns.len(), "down: closing listener and connections");
            }
            listener = None;
            conns.abort_all();
            retry_at = None;
        } else if listener.is_none() && retry_at.is_none_or(|t| t <= tokio::time::Instant::now()) {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(server = %shared.id, %addr, "up: listening again");
                    listener = Some(l);
                    retry_at = None;
                }
                Err(error) => {
                    tracing::warn!(server = %shared.id, %addr, %error, "cannot reopen listener, retrying");
                    retry_at = Some(tokio::time::Instant::now() + REBIND_RETRY);
                }
            }
        }
        was_down = down;
        let retry = retry_at.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = fault_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(retry), if retry_at.is_some() => {}
            accepted = accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = serve_conn(shared.clone(), stream, peer);
                    conns.spawn(Metered::new(conn, shared.meter.clone()));
                }
                Err(error) => {
                    tracing::warn!(server = %shared.id, %error, "accept failed");
                    // Typically out of file descriptors: don't spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(joined) = conns.join_next(), if !conns.is_empty() => {
                if let Err(error) = joined
                    && error.is_panic()
                {
                    tracing::error!(server = %shared.id, %error, "connection task panicked");
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
    aux.shutdown().await;
}

async fn serve_conn(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _open = shared.enter(Gauge::Connections);
    tracing::trace!(server = %shared.id, %peer, "connection accepted");
    match shared.cfg.protocol {
        Protocol::Http => http::serve(shared.clone(), stream, peer).await,
        Protocol::Tcp => tcp::serve(shared.clone(), stream, peer).await,
    }
}

async fn sample_cpu(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(load::SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        shared.meter.sample();
    }
}

/// Publishes scheduled fault windows as they open and close.
async fn schedule_faults(shared: Arc<Shared>) {
    loop {
        shared.refresh_fault();
        let t = shared.started.elapsed();
        let next = shared
            .cfg
            .faults
            .iter()
            .flat_map(|w| [w.start, w.end])
            .filter(|&b| b > t)
            .min();
        let Some(next) = next else { return };
        tokio::time::sleep_until(tokio::time::Instant::from_std(shared.started + next)).await;
    }
}
