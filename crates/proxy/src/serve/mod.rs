//! `lbwasm serve`: starting, running and stopping the proxy.
//!
//! [`Server`] is the embeddable form (the simulator and the tests use it): `start` loads
//! every plugin and binds every socket before returning (a bad plugin fails before any
//! socket is bound), `shutdown` stops accepting and drains. [`run`] is the command: a
//! [`Server`] plus signals — SIGTERM/Ctrl-C drain and exit 0, SIGHUP reloads; with
//! `--check`, [`check`] alone (what `start` checks before binding) and exit.
//!
//! Threads: the workers ([`crate::proxy`]) and one control-plane runtime ("lbwasm-control")
//! for the admin API, health checks, load polling, ejections and managed processes.
//!
//! The admin API is not part of this module: [`Control`] is the control plane without
//! HTTP, and whoever starts a server with an `[admin]` section hands in the HTTP layer as an
//! [`AdminApi`].

mod control;
mod managed;

pub use control::{
    AddReport, AddRequest, Added, AddedBackend, BackendReport, ClusterReport, Control,
    ControlError, Draining, Leaving, ListenerReport, ListenerState, Picked, PluginReport,
    PluginRequest, PluginSwapped, ReloadReport, Reloader, Removed, ReplicaReport, Report,
    SelectRequest, Starting,
};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::watch;

use crate::config::{AdminConfig, BackendProtocol, Config, ListenerConfig, PluginRef, ServeArgs};
use crate::metrics::Metrics;
use crate::pool::{Backend, Pool};
use crate::proxy::{self, ListenerShared, WorkerHandle};
use crate::tls::{Terminator, Upstream};
use lbwasm_plugin_host::{PluginSource, Runtime, RuntimeConfig};

/// How long `run` lets in-flight requests finish after SIGTERM or Ctrl-C.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// The wasm engine, shared by every server of the process (one epoch thread, one pool of
/// instance slots).
fn wasm_runtime() -> Result<Runtime> {
    static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = slot.as_ref() {
        return Ok(rt.clone());
    }
    let rt = Runtime::new(RuntimeConfig::default())?;
    *slot = Some(rt.clone());
    Ok(rt)
}

/// The runtime's name for a configured plugin.
pub(crate) fn plugin_source(p: &PluginRef) -> PluginSource {
    match p {
        PluginRef::Builtin(n) => PluginSource::Builtin(n.clone()),
        PluginRef::File(f) => PluginSource::File(f.clone()),
    }
}

/// [`Runtime::load`], except that a plugin file that does not exist but is named like a
/// built-in (`least_loaded.wasm`, as a new user types it from the usage line) gets an error
/// saying how to get it, rather than "No such file or directory".
pub(crate) fn load_plugin(
    runtime: &Runtime,
    source: &PluginSource,
    options: &[(String, String)],
) -> Result<Arc<lbwasm_plugin_host::Plugin>> {
    if let Some(path) = source.path()
        && let Some(hint) = missing_builtin_hint(path)
    {
        anyhow::bail!(hint);
    }
    runtime.load(source, options)
}

/// For a missing `path` whose stem names a built-in plugin: what to do instead.
pub fn missing_builtin_hint(path: &std::path::Path) -> Option<String> {
    if path.exists() {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    if !lbwasm_plugin_host::builtin::is_builtin(name) {
        return None;
    }
    Some(format!(
        "no plugin file {file}; `{name}` is a built-in plugin: name it without .wasm \
         (`--plugin {name}`, `plugin = \"{name}\"`), or write it to a file with \
         `lbwasm plugins export {name}`, or build it from source with \
         `cargo build --release --target wasm32-wasip2 -p {name}` (it is then \
         target/wasm32-wasip2/release/{name}.wasm)",
        file = path.display()
    ))
}

/// Every listener's plugin, loaded (compiled, configured, described) in order: what
/// [`Server::start_with`] does first and `serve --check` does alone.
fn load_plugins(
    runtime: &Runtime,
    listeners: &[ListenerConfig],
) -> Result<Vec<Arc<lbwasm_plugin_host::Plugin>>> {
    listeners
        .iter()
        .map(|l| {
            load_plugin(runtime, &plugin_source(&l.plugin), &l.plugin_options)
                .with_context(|| format!("listener {:?}", l.name))
        })
        .collect()
}

/// `lbwasm serve --check`: what [`Server::start_with`] checks before it binds a socket —
/// every listener's plugin, its TLS termination, its TLS to backends and its access log,
/// and the admin endpoint's TLS — without binding, starting a worker or a managed process,
/// or contacting anything. (`config` was built by [`ServeArgs::load`], which has read and
/// checked the certificate files.) Returns how many listeners were checked.
pub fn check(config: &Config) -> Result<usize> {
    let runtime = wasm_runtime()?;
    load_plugins(&runtime, &config.listeners)?;
    for l in &config.listeners {
        if let Some(tls) = &l.tls {
            Terminator::new(&l.name, tls, proxy::alpn(l.protocol))
                .with_context(|| format!("listener {:?}: tls", l.name))?;
        }
        if let Some(tls) = &l.backend_tls {
            Upstream::new(&l.name, tls, l.backend_protocol == BackendProtocol::H2)
                .with_context(|| format!("listener {:?}: backend_tls", l.name))?;
        }
        // Opened (created if missing) as `serve` opens it, as `nginx -t` does: a log that
        // cannot be written is found now, not at start.
        proxy::AccessLog::prepare(l.access_log.as_ref())
            .with_context(|| format!("listener {:?}", l.name))?;
    }
    if let Some(tls) = config.admin.as_ref().and_then(|a| a.tls.as_ref()) {
        // The admin API offers HTTP/1.1 only (lbwasm-admin).
        Terminator::new("admin", tls, &[b"http/1.1"]).context("admin: tls")?;
    }
    Ok(config.listeners.len())
}

/// The admin API as a [`Server`] sees it: the HTTP layer over [`Control`], which lives
/// above this module (the control plane knows no HTTP), so the caller hands it in.
pub trait AdminApi: Send + Sync {
    /// Serves the admin API on `socket` (bound, non-blocking) until the returned future is
    /// dropped with the control runtime; `config` is the `[admin]` section.
    fn serve(
        &self,
        socket: std::net::TcpListener,
        control: Arc<Control>,
        config: AdminConfig,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// The process is done serving ([`run`] returns, however it ends: SIGTERM, Ctrl-C, an
    /// error): removes what the API left on disk. Not called per [`Server`]: several
    /// servers of one process (tests) may share it.
    fn at_exit(&self);
}

/// Calls [`AdminApi::at_exit`] when dropped.
struct AtExit<'a>(&'a dyn AdminApi);

impl Drop for AtExit<'_> {
    fn drop(&mut self) {
        self.0.at_exit();
    }
}

/// A running proxy: workers, control plane, admin endpoint.
pub struct Server {
    listen_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    control: Arc<Control>,
    workers: Vec<WorkerHandle>,
    stop_workers: watch::Sender<Option<Instant>>,
    control_rt: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// Starts a server for `config` without an admin API (refused if `config` has an
    /// `[admin]` section). Reloads re-read `config.source` (if any).
    pub fn start(config: Config) -> Result<Server> {
        Self::start_with(config, None, None)
    }

    /// Starts a server whose reloads call `reloader` (e.g. to re-apply command-line flags
    /// over the file), serving `admin` on the `[admin]` socket.
    pub fn start_with(
        mut config: Config,
        reloader: Option<Reloader>,
        admin: Option<Arc<dyn AdminApi>>,
    ) -> Result<Server> {
        if config.admin.is_some() && admin.is_none() {
            anyhow::bail!(
                "the configuration has an [admin] section, but this server was started without an admin API"
            );
        }
        raise_fd_limit();
        // Cluster mode: pools and plugins as the cluster has them (etcd, else the snapshot
        // this replica saved last, else the file).
        let initial = match &config.cluster {
            Some(c) => match control::initial(c) {
                control::Initial::Store(m) | control::Initial::Saved(m) => {
                    control::overlay(&mut config, &m);
                    Some(m)
                }
                control::Initial::File => None,
            },
            None => None,
        };
        let runtime = wasm_runtime()?;
        // Plugins first: a bad plugin or option fails before any socket is bound.
        let plugins = load_plugins(&runtime, &config.listeners)?;
        let routed_by = routed_by(&config.listeners);
        let mut sockets = Vec::with_capacity(config.listeners.len());
        let mut listen_addrs: Vec<SocketAddr> = Vec::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            if routed_by[i] != i {
                // Its connections come through another listener's socket (SNI routing).
                listen_addrs.push(listen_addrs[routed_by[i]]);
                sockets.push(Vec::new());
                continue;
            }
            let s = proxy::bind(l.listen, config.workers)
                .with_context(|| format!("listener {:?}: cannot listen on {}", l.name, l.listen))?;
            listen_addrs.push(s[0].local_addr().context("reading a bound address")?);
            sockets.push(s);
        }
        let admin_socket = match &config.admin {
            Some(a) => {
                let s = std::net::TcpListener::bind(a.listen)
                    .with_context(|| format!("admin: cannot listen on {}", a.listen))?;
                s.set_nonblocking(true).context("admin socket")?;
                Some(s)
            }
            None => None,
        };
        let admin_addr = match &admin_socket {
            Some(s) => Some(s.local_addr().context("reading the admin address")?),
            None => None,
        };

        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let listeners: Vec<Arc<ListenerShared>> = config
            .listeners
            .iter()
            .zip(plugins)
            .enumerate()
            .map(|(i, (l, plugin))| {
                let backends = l
                    .backends
                    .iter()
                    .map(|b| Backend::new(b.address, b.weight, b.max_connections))
                    .collect();
                let pool = Arc::new(Pool::new(&l.name, backends, l.passive.slow_start));
                ListenerShared::new(i, l, pool, plugin, events_tx.clone())
                    .map(Arc::new)
                    .with_context(|| format!("listener {:?}", l.name))
            })
            .collect::<anyhow::Result<_>>()?;
        drop(events_tx);
        let metrics = Metrics::new(listeners.len());
        // Cluster mode: what the file cannot say (draining) before a request is served.
        let cluster = control::Cluster::new(&config, initial, admin_addr);
        if let Some(c) = &cluster {
            c.adopt(&listeners);
        }

        // Workers first: if they cannot start, no runtime has to be torn down (dropping one
        // inside the caller's async context would panic).
        let (stop_workers, stop_rx) = watch::channel(None);
        let workers = proxy::spawn_workers(&listeners, sockets, &routed_by, &metrics, &stop_rx)?;
        // On an error below, dropping `stop_workers` stops the workers.
        let control_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lbwasm-control")
            .enable_all()
            .build()
            .context("starting the control-plane runtime")?;
        let admin_config = config.admin.clone();
        let control = Arc::new(
            Control::new(
                runtime,
                control_rt.handle().clone(),
                listeners.clone(),
                listen_addrs.clone(),
                metrics.clone(),
                config,
                reloader,
            )
            .with_cluster(cluster),
        );
        control.start_background(events_rx);
        if let (Some(socket), Some(config), Some(admin)) = (admin_socket, admin_config, admin) {
            control_rt.spawn(admin.serve(socket, control.clone(), config));
        }
        for (l, addr) in listeners.iter().zip(&listen_addrs) {
            tracing::info!(listener = %l.name, %addr, protocol = %l.protocol, plugin = %l.plugin.load().name(), backends = l.pool.members().len(), workers = workers.len(), "listening");
        }
        if let Some(addr) = admin_addr {
            tracing::info!(%addr, "admin endpoint listening");
        }
        Ok(Server {
            listen_addrs,
            admin_addr,
            control,
            workers,
            stop_workers,
            control_rt: Some(control_rt),
        })
    }

    /// The listeners' bound addresses, in configuration order (port 0 resolved).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listen_addrs.clone()
    }

    /// The admin endpoint's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The control plane (membership, plugin swap, report, metrics) for embedders.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Re-reads the configuration and applies it (see [`Control::reload`]).
    pub async fn reload(&self) -> Result<ReloadReport> {
        let control = self.control.clone();
        let rt = self.control_rt.as_ref().context("server stopped")?;
        Ok(rt
            .spawn(async move { control.reload().await })
            .await
            .context("reload task failed")??)
    }

    /// Stops accepting, lets in-flight requests and connections finish within `deadline`
    /// (then closes what is left), stops managed processes, and returns when everything
    /// is gone.
    pub async fn shutdown(mut self, deadline: Duration) {
        let _ = self.stop_workers.send(Some(Instant::now() + deadline));
        for w in std::mem::take(&mut self.workers) {
            w.wait().await;
        }
        if let Some(rt) = self.control_rt.take() {
            let control = self.control.clone();
            let _ = rt.spawn(async move { control.stop_managed().await }).await;
            rt.shutdown_background();
        }
        tracing::info!("server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Not shut down properly: stop now (workers close at once; managed processes are
        // killed when their supervisors are dropped with the control runtime).
        let _ = self.stop_workers.send(Some(Instant::now()));
        if let Some(rt) = self.control_rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The most open files [`raise_fd_limit`] asks for: the kernel's own default ceiling
/// (`fs.nr_open`), which a hard limit of "unlimited" would otherwise exceed.
const MAX_OPEN_FILES: u64 = 1 << 20;

/// For each listener, the listener whose socket its connections arrive on: itself, or for
/// tcp listeners sharing an address by SNI routing (`server_names`), the first of them.
fn routed_by(listeners: &[ListenerConfig]) -> Vec<usize> {
    (0..listeners.len())
        .map(|i| {
            let same = |o: &ListenerConfig| o.listen == listeners[i].listen;
            let routed = listeners
                .iter()
                .any(|o| same(o) && !o.server_names.is_empty());
            if routed {
                listeners.iter().position(same).unwrap_or(i)
            } else {
                i
            }
        })
        .collect()
}

/// Raises this process's soft limit on open files to its hard limit (at most 2^20), as the
/// Go runtime does at start, and returns the limit in force. Every proxied connection holds
/// two descriptors (client and backend): the usual soft limit of 1024 would refuse clients
/// beyond about 500 while the hard limit, set by the administrator, allows far more.
/// [`Server::start`] calls it; it warns when the limit stays low.
#[cfg(unix)]
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    let now = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let old = lim.rlim_cur;
        let want = lim.rlim_max.min(MAX_OPEN_FILES);
        if old < want {
            lim.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(from = old, to = want, "raised the open-files limit");
            } else {
                lim.rlim_cur = old;
            }
        }
        lim.rlim_cur
    };
    if now < 4096 {
        tracing::warn!(
            limit = now,
            "the open-files limit is low: about {} concurrent proxied connections at most; raise the hard limit (ulimit -Hn, LimitNOFILE=)",
            now / 2
        );
    }
    now
}

/// Open-file limits are Unix's; elsewhere there is nothing to raise.
#[cfg(not(unix))]
pub fn raise_fd_limit() -> u64 {
    0
}

/// `lbwasm serve`: loads the configuration (errors name the file, line and key, or the
/// flag), starts a [`Server`] with `admin` as its admin API, then serves until SIGTERM or
/// Ctrl-C (drain, exit 0); SIGHUP reloads the configuration.
pub async fn run(args: ServeArgs, admin: Arc<dyn AdminApi>) -> Result<()> {
    // Declared first, dropped last: after the server has stopped.
    let _at_exit = AtExit(admin.as_ref());
    let config = args.load()?;
    if args.check {
        // Before anything that binds, spawns or connects (sockets, workers, etcd, DNS).
        let n = check(&config)?;
        let s = if n == 1 { "" } else { "s" };
        println!("lbwasm: configuration OK ({n} listener{s})");
        return Ok(());
    }
    let reload_args = args.clone();
    let reloader: Reloader = Box::new(move || reload_args.load().map_err(anyhow::Error::from));
    let server = Server::start_with(config, Some(reloader), Some(admin.clone()))?;
    for addr in server.listen_addrs() {
        println!("lbwasm listening on {addr}");
    }
    if let Some(addr) = server.admin_addr() {
        println!("lbwasm admin on {addr}");
    }
    wait_for_stop(&server).await?;
    tracing::info!(deadline_s = DRAIN_DEADLINE.as_secs(), "draining");
    server.shutdown(DRAIN_DEADLINE).await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_stop(server: &Server) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            res = tokio::signal::ctrl_c() => return res.context("waiting for Ctrl-C"),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => match server.reload().await {
                Ok(report) => tracing::info!(changes = ?report.changes, warnings = ?report.warnings, "SIGHUP: configuration reloaded"),
                Err(error) => tracing::error!(error = %format!("{error:#}"), "SIGHUP: reload refused; keeping the running configuration"),
            },
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_stop(_server: &Server) -> Result<()> {
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}
