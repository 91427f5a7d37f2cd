//! [`Control`]: the control plane's operations on a running server — membership (add,
//! remove, drain), plugin swap, lookaside pick, state report, metrics, reload — shared by
//! the admin API and the signal handlers. Everything here runs on the control runtime;
//! workers only ever see the results as newly published snapshots, plugins and settings.
//!
//! It speaks no HTTP: operations answer typed reports ([`report`]) or a [`ControlError`],
//! and the admin API (or any embedder) turns them into what it serves.

mod cluster;
mod error;
mod report;

pub(crate) use cluster::{Cluster, Initial, initial, overlay};
pub use cluster::{ClusterReport, ReplicaReport};
pub use error::ControlError;
pub use report::{
    AddReport, Added, AddedBackend, BackendReport, Draining, Leaving, ListenerReport,
    ListenerState, Picked, PluginReport, PluginSwapped, ReloadReport, Removed, Report, Starting,
};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::managed::{self, Instance};
use crate::config::{Config, ListenerConfig, Managed};
use crate::discovery::Discovery;
use crate::health;
use crate::metrics::{ListenerStatus, Metrics};
use crate::pool::Backend;
use crate::proxy::{AccessLog, Event, ListenerShared, Prepared, Settings};
use lbwasm_plugin_host::{
    PluginSource, PoolView, Protocol as PluginProtocol, RequestInfo, Runtime, Selector,
};

/// Re-reads the configuration (file and flags) for a reload.
pub type Reloader = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// A control-plane result.
type Result<T, E = ControlError> = std::result::Result<T, E>;

fn bad(message: impl Into<String>) -> ControlError {
    ControlError::BadRequest(message.into())
}

/// One listener's part of a reload, all of it prepared (and checked) before any is applied.
struct Step<'a> {
    /// The running listener.
    shared: &'a Arc<ListenerShared>,
    /// Its configuration before the reload.
    old: &'a ListenerConfig,
    /// Its configuration after.
    new: &'a ListenerConfig,
    /// The new plugin, when it changed.
    plugin: Option<Arc<lbwasm_plugin_host::Plugin>>,
    /// Its access log, opened again.
    log: Prepared,
}

/// A managed pool's spec and its running instances.
struct ManagedPool {
    spec: Managed,
    next: u32,
    instances: Vec<Instance>,
}

/// The running server as the control plane sees it.
pub struct Control {
    runtime: Runtime,
    /// The control-plane runtime: background loops and managed processes run there,
    /// whichever thread calls.
    handle: tokio::runtime::Handle,
    listeners: Vec<Arc<ListenerShared>>,
    listen_addrs: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    config: Mutex<Config>,
    reloader: Option<Reloader>,
    managed: Mutex<Vec<Option<ManagedPool>>>,
    /// `GET /pick`'s plugin instance per listener, kept while the plugin stays the same
    /// (instantiating one per call would cost a lookaside client milliseconds).
    pick_selectors: Mutex<Vec<Option<Selector>>>,
    /// The DNS sources' loops (`dns://`, `dns+srv://` backends).
    discovery: Discovery,
    /// Cluster mode: the shared configuration's state on this replica.
    cluster: Option<Arc<Cluster>>,
}

/// Body of `POST /backends/add`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// Listener name; optional when there is only one.
    pub listener: Option<String>,
    /// `host:port` of each new backend.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Weight of the new backends (default 1).
    pub weight: Option<u32>,
    /// Connection limit of the new backends (default none).
    pub max_connections: Option<u32>,
    /// For a managed pool: how many more processes to start.
    pub n: Option<u32>,
}

/// Body of `POST /backends/remove` and `/backends/drain`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectRequest {
    /// Listener name; optional when there is only one.
    pub listener: Option<String>,
    /// Backends by address.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Backends by id.
    #[serde(default)]
    pub ids: Vec<u32>,
}

/// Body of `POST /plugin`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRequest {
    /// Listener name; optional when there is only one.
    pub listener: Option<String>,
    /// Built-in name or path to a `.wasm` component.
    pub plugin: String,
    /// Plugin options (strings, numbers, booleans).
    #[serde(default)]
    pub options: BTreeMap<String, Value>,
}

fn parse_addr(s: &str) -> Result<SocketAddr> {
    let t = s.trim();
    let t = t
        .strip_prefix("localhost:")
        .map_or_else(|| t.to_string(), |p| format!("127.0.0.1:{p}"));
    t.parse()
        .map_err(|_| bad(format!("invalid backend address {s:?} (expected IP:PORT)")))
}

impl Control {
    pub(crate) fn new(
        runtime: Runtime,
        handle: tokio::runtime::Handle,
        listeners: Vec<Arc<ListenerShared>>,
        listen_addrs: Vec<SocketAddr>,
        metrics: Arc<Metrics>,
        config: Config,
        reloader: Option<Reloader>,
    ) -> Self {
        let managed = config
            .listeners
            .iter()
            .map(|l| {
                l.managed.clone().map(|spec| ManagedPool {
                    next: spec.count,
                    spec,
                    instances: Vec::new(),
                })
            })
            .collect();
        let discovery = Discovery::new(handle.clone());
        Control {
            runtime,
            handle,
            listeners,
            listen_addrs,
            metrics,
            config: Mutex::new(config),
            reloader,
            managed: Mutex::new(managed),
            pick_selectors: Mutex::new(Vec::new()),
            discovery,
            cluster: None,
        }
    }

    /// Cluster mode: the replica's cluster state (built before the workers started).
    pub(crate) fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    fn managed(&self) -> std::sync::MutexGuard<'_, Vec<Option<ManagedPool>>> {
        self.managed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the managed pools' first instances and the per-listener background loops
    /// (checks, load reports, slow start, ejections) on the control runtime.
    pub(crate) fn start_background(self: &Arc<Self>, events: UnboundedReceiver<Event>) {
        for l in &self.listeners {
            self.handle.spawn(health::active_checks(l.clone()));
            if l.protocol == crate::config::Protocol::Http {
                self.handle.spawn(health::load_reports(l.clone()));
                self.handle.spawn(health::inband_reports(l.clone()));
            }
            self.handle.spawn(health::slow_start(l.clone()));
            if let Some(tls) = &l.tls {
                self.handle
                    .spawn(crate::tls::server::watch_files(tls.clone()));
            }
        }
        let mut managed = self.managed();
        for (l, slot) in self.listeners.iter().zip(managed.iter_mut()) {
            if let Some(m) = slot {
                for addr in m.spec.addresses() {
                    m.instances.push(managed::start(
                        &self.handle,
                        l.clone(),
                        m.spec.clone(),
                        addr.port(),
                    ));
                }
            }
        }
        drop(managed);
        if let Some(c) = &self.cluster {
            self.handle.spawn(cluster::run(self.clone(), c.clone()));
        }
        self.handle.spawn(handle_events(self.clone(), events));
        // Last, as it may wait (bounded) for DNS's first answers.
        let config = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.discovery.start(&self.listeners, &config);
    }

    /// Stops every managed process (SIGTERM by PID, then SIGKILL) and waits for them, and
    /// in cluster mode takes this replica's key out of the store.
    pub(crate) async fn stop_managed(&self) {
        if let Some(c) = &self.cluster {
            cluster::leave(c).await;
        }
        let instances: Vec<Instance> = self
            .managed()
            .iter_mut()
            .flatten()
            .flat_map(|m| m.instances.drain(..))
            .collect();
        for i in &instances {
            let _ = i.stop.send(true);
        }
        for i in instances {
            let _ = i.task.await;
        }
    }

    fn listener(&self, name: Option<&str>) -> Result<&Arc<ListenerShared>> {
        match name {
            Some(n) => self
                .listeners
                .iter()
                .find(|l| l.name == n)
                .ok_or_else(|| ControlError::NotFound(format!("no listener named {n:?}"))),
            None if self.listeners.len() == 1 => Ok(&self.listeners[0]),
            None => Err(bad("several listeners: say which with \"listener\"")),
        }
    }

    fn is_managed(&self, listener: usize, addr: SocketAddr) -> bool {
        self.managed()
            .get(listener)
            .and_then(Option::as_ref)
            .is_some_and(|m| m.instances.iter().any(|i| i.addr == addr))
    }

    /// `GET /backends`: every listener with its backends and their live figures.
    pub fn report(&self) -> Report {
        Report {
            listeners: self.listener_states().map(|l| l.report).collect(),
            cluster: self.cluster.as_ref().map(|c| c.report()),
        }
    }

    /// Every listener now, with the backends and plugin its report was read from.
    pub fn listener_states(&self) -> impl Iterator<Item = ListenerState> + '_ {
        self.listeners
            .iter()
            .zip(&self.listen_addrs)
            .map(|(l, &listen)| {
                let snap = l.pool.snapshot();
                let plugin = l.plugin.load_full();
                let backends = snap
                    .backends()
                    .iter()
                    .zip(snap.infos())
                    .map(|(b, info)| BackendReport {
                        dns: self.discovery.source_of(l.index, b.id),
                        ..BackendReport::new(b, info, self.is_managed(l.index, b.addr))
                    })
                    .collect();
                ListenerState {
                    report: ListenerReport {
                        name: l.name.clone(),
                        listen,
                        protocol: l.protocol.to_string(),
                        plugin: plugin.name().to_string(),
                        generation: snap.generation(),
                        healthy: snap.healthy_count(),
                        backends,
                        tls: l.tls.as_ref().map(|t| t.certificates()),
                    },
                    backends: snap.backends().to_vec(),
                    plugin,
                }
            })
    }

    /// Each listener's plugin and what it says of itself.
    pub fn plugins(&self) -> Vec<PluginReport> {
        self.listeners
            .iter()
            .map(|l| {
                let plugin = l.plugin.load();
                PluginReport {
                    name: l.name.clone(),
                    plugin: plugin.name().to_string(),
                    description: plugin.description().to_string(),
                }
            })
            .collect()
    }

    /// `POST /backends/add`: static backends by address (a draining one is taken back), or
    /// `n` more processes of a managed pool.
    pub async fn add(&self, req: AddRequest) -> Result<AddReport> {
        let l = self.listener(req.listener.as_deref())?;
        if let Some(n) = req.n {
            if !req.addresses.is_empty() {
                return Err(bad("give either \"addresses\" or \"n\", not both"));
            }
            return self.add_managed(l, n).map(AddReport::Managed);
        }
        if req.addresses.is_empty() {
            return Err(bad(
                "nothing to add: give \"addresses\" (or \"n\" for a managed pool)",
            ));
        }
        let weight = req.weight.unwrap_or(1);
        if weight == 0 {
            return Err(bad("\"weight\" must be >= 1"));
        }
        let addrs = req
            .addresses
            .iter()
            .map(|a| parse_addr(a))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(c) = &self.cluster {
            let max = req.max_connections.unwrap_or(0);
            return self.cluster_add(c, l, addrs, weight, max).await;
        }
        let mut added = Vec::new();
        let mut unchanged = Vec::new();
        for addr in addrs {
            let (b, undrained) = match l.pool.find(addr) {
                Some(b) => {
                    let undrained = l
                        .pool
                        .update_one(&b, |st| std::mem::replace(&mut st.draining, false));
                    if !undrained {
                        unchanged.push(addr.to_string());
                        continue;
                    }
                    (b, true)
                }
                None => {
                    let b = Backend::new(addr, weight, req.max_connections.unwrap_or(0));
                    l.pool.add(b.clone());
                    (b, false)
                }
            };
            added.push(AddedBackend {
                id: b.id,
                address: b.address().to_string(),
                undrained,
            });
        }
        tracing::info!(listener = %l.name, added = added.len(), "backends added (admin)");
        Ok(AddReport::Static(Added {
            listener: l.name.clone(),
            added,
            already_members: unchanged,
        }))
    }

    fn add_managed(&self, l: &Arc<ListenerShared>, n: u32) -> Result<Starting> {
        if n == 0 || n > 100 {
            return Err(bad("\"n\" must be within 1..=100"));
        }
        let mut managed = self.managed();
        let Some(Some(m)) = managed.get_mut(l.index) else {
            return Err(bad(format!(
                "listener {:?} has no managed pool: give \"addresses\"",
                l.name
            )));
        };
        let mut ports = Vec::new();
        for _ in 0..n {
            let port = u16::try_from(u32::from(m.spec.base_port) + m.next)
                .map_err(|_| bad("the managed pool ran out of ports"))?;
            m.next += 1;
            m.instances.push(managed::start(
                &self.handle,
                l.clone(),
                m.spec.clone(),
                port,
            ));
            ports.push(format!("127.0.0.1:{port}"));
        }
        tracing::info!(listener = %l.name, started = n, "managed backends added (admin)");
        Ok(Starting {
            listener: l.name.clone(),
            starting: ports,
            note: "each joins the pool once it answers a check",
        })
    }

    fn select(&self, l: &ListenerShared, req: &SelectRequest) -> Result<Vec<Arc<Backend>>> {
        if req.addresses.is_empty() && req.ids.is_empty() {
            return Err(bad("say which backends: \"addresses\" or \"ids\""));
        }
        let mut found = Vec::new();
        for a in &req.addresses {
            let addr = parse_addr(a)?;
            found.push(l.pool.find(addr).ok_or_else(|| {
                ControlError::NotFound(format!("no backend {addr} in pool {:?}", l.name))
            })?);
        }
        for &id in &req.ids {
            found.push(l.pool.find_id(id).ok_or_else(|| {
                ControlError::NotFound(format!("no backend with id {id} in pool {:?}", l.name))
            })?);
        }
        Ok(found)
    }

    /// `POST /backends/remove`: out of the pool at once (no new requests); in-flight ones
    /// finish on their own. A managed backend's process is stopped.
    pub async fn remove(&self, req: SelectRequest) -> Result<Removed> {
        let l = self.listener(req.listener.as_deref())?;
        let chosen = self.select(l, &req)?;
        if let Some(c) = &self.cluster
            && !chosen.iter().any(|b| self.is_managed(l.index, b.addr))
        {
            return self.cluster_remove(c, l, chosen).await;
        }
        let ids: Vec<u32> = chosen.iter().map(|b| b.id).collect();
        let removed = l.pool.remove(|b| ids.contains(&b.id));
        let mut stopped = Vec::new();
        if let Some(Some(m)) = self.managed().get_mut(l.index) {
            m.instances.retain(|i| {
                let gone = removed.iter().any(|b| b.addr == i.addr);
                if gone {
                    let _ = i.stop.send(true);
                    stopped.push(i.addr.to_string());
                }
                !gone
            });
        }
        let removed: Vec<Leaving> = removed.iter().map(|b| Leaving::new(b)).collect();
        tracing::info!(listener = %l.name, removed = removed.len(), "backends removed (admin)");
        Ok(Removed {
            listener: l.name.clone(),
            removed,
            stopped_processes: stopped,
        })
    }

    /// `POST /backends/drain`: kept in the pool but given no new requests (add it again to
    /// take it back).
    pub async fn drain(&self, req: SelectRequest) -> Result<Draining> {
        let l = self.listener(req.listener.as_deref())?;
        let chosen = self.select(l, &req)?;
        if let Some(c) = &self.cluster {
            return self.cluster_drain(c, l, chosen).await;
        }
        l.pool.update(|changes| {
            for b in &chosen {
                changes.state(b, |st| st.draining = true);
            }
        });
        let draining: Vec<Leaving> = chosen.iter().map(|b| Leaving::new(b)).collect();
        tracing::info!(listener = %l.name, draining = draining.len(), "backends draining (admin)");
        Ok(Draining {
            listener: l.name.clone(),
            draining,
        })
    }

    /// `POST /plugin`: loads and validates the new plugin first (off the control thread:
    /// compiling can take a while), then publishes it; workers switch on their next request.
    pub async fn swap_plugin(&self, req: PluginRequest) -> Result<PluginSwapped> {
        let l = self.listener(req.listener.as_deref())?.clone();
        let options: Vec<(String, String)> = req
            .options
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                Value::Number(_) | Value::Bool(_) => Ok((k, v.to_string())),
                _ => Err(bad(format!(
                    "option {k:?}: expected a string, number or boolean"
                ))),
            })
            .collect::<Result<_, _>>()?;
        let source = PluginSource::parse(&req.plugin);
        let runtime = self.runtime.clone();
        let (src, opts) = (source.clone(), options.clone());
        let plugin = tokio::task::spawn_blocking(move || super::load_plugin(&runtime, &src, &opts))
            .await
            .map_err(|e| ControlError::Internal(format!("plugin load task failed: {e}")))?
            .map_err(|e| ControlError::Rejected(format!("{e:#}")))?;
        if let Some(c) = &self.cluster {
            let previous = self
                .cluster_plugin(c, &l, &source, &options, plugin.clone())
                .await?;
            return Ok(PluginSwapped {
                listener: l.name.clone(),
                plugin: plugin.name().to_string(),
                description: plugin.description().to_string(),
                previous,
            });
        }
        let old = l.plugin.swap(plugin.clone());
        tracing::info!(listener = %l.name, from = %old.name(), to = %plugin.name(), "plugin swapped");
        Ok(PluginSwapped {
            listener: l.name.clone(),
            plugin: plugin.name().to_string(),
            description: plugin.description().to_string(),
            previous: old.name().to_string(),
        })
    }

    /// `GET /pick`: which backend the plugin would choose for a request with this hash key
    /// (and path), without sending anything.
    pub fn pick(
        &self,
        listener: Option<&str>,
        key: Option<String>,
        path: Option<&str>,
    ) -> Result<Picked> {
        let l = self.listener(listener)?;
        let plugin = l.plugin.load_full();
        let mut selectors = self
            .pick_selectors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if selectors.len() <= l.index {
            selectors.resize_with(l.index + 1, || None);
        }
        let slot = &mut selectors[l.index];
        if !slot
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s.plugin(), &plugin))
        {
            *slot = Some(plugin.selector().map_err(|e| {
                ControlError::Unavailable(format!("plugin {}: {e:#}", plugin.name()))
            })?);
        }
        let selector = slot.as_mut().expect("set above");
        let snapshot = l.pool.snapshot();
        if snapshot.healthy_count() == 0 {
            return Err(ControlError::Unavailable(format!(
                "no healthy backend in pool {:?}",
                l.name
            )));
        }
        let view: Arc<dyn PoolView> = snapshot.clone();
        let mut info = RequestInfo {
            hash_key: key,
            ..RequestInfo::default()
        };
        if l.protocol == crate::config::Protocol::Tcp {
            info.protocol = PluginProtocol::Tcp;
        }
        if let Some(p) = path {
            info.uri = p.parse().map_err(|_| bad(format!("invalid path {p:?}")))?;
        }
        let pick = selector.choose(&view, &mut info, &[]);
        let Some(b) = pick.index.and_then(|i| snapshot.backend(i)) else {
            return Err(ControlError::Unavailable(format!(
                "plugin {} found no backend",
                plugin.name()
            )));
        };
        let by = match pick.source {
            lbwasm_plugin_host::PickSource::Plugin => "plugin".to_string(),
            lbwasm_plugin_host::PickSource::Fallback(f) => format!("fallback ({f})"),
        };
        Ok(Picked {
            listener: l.name.clone(),
            backend: b.address().to_string(),
            id: b.id,
            plugin: plugin.name().to_string(),
            picked_by: by,
        })
    }

    /// `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        let plugins: Vec<_> = self
            .listeners
            .iter()
            .map(|l| l.plugin.load_full())
            .collect();
        let status: Vec<ListenerStatus<'_>> = self
            .listeners
            .iter()
            .zip(&plugins)
            .map(|(l, p)| ListenerStatus {
                name: &l.name,
                pool: &l.pool,
                plugin: p,
                tls: l.tls.as_deref(),
            })
            .collect();
        let mut text = self.metrics.render(&status);
        self.discovery.render_metrics(&mut text);
        if let Some(c) = &self.cluster {
            c.metrics(&mut text);
        }
        text
    }

    /// `POST /reload` and SIGHUP: re-reads the configuration and applies what can change
    /// without dropping connections — plugins and their options, static backends (added,
    /// removed, re-weighted), timeouts, retries, health, load-report and PROXY-protocol
    /// settings, access logs (always reopened). Listener addresses, protocols, workers,
    /// admin and managed pools need a restart: reported as warnings. Nothing is applied
    /// unless every new plugin loads and every access log opens.
    pub async fn reload(&self) -> Result<ReloadReport> {
        let new = {
            let source = self
                .config
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .source
                .clone();
            let loaded = match &self.reloader {
                Some(f) => f(),
                None => match &source {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))
                        .and_then(|text| {
                            crate::config::parse_str(&text, path).map_err(anyhow::Error::from)
                        }),
                    None => Err(anyhow::anyhow!(
                        "started without a configuration file: nothing to reload"
                    )),
                },
            };
            loaded.map_err(|e| bad(format!("{e:#}")))?
        };
        let old = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut warnings = Vec::new();
        let mut changes = Vec::new();
        if new.workers != old.workers {
            warnings.push(format!(
                "workers {} -> {} needs a restart",
                old.workers, new.workers
            ));
        }
        if new.admin != old.admin {
            warnings.push("admin settings change needs a restart".to_string());
        }
        for l in &old.listeners {
            if !new.listeners.iter().any(|n| n.name == l.name) {
                warnings.push(format!(
                    "listener {:?} removed from the file: needs a restart",
                    l.name
                ));
            }
        }
        // Load every changed plugin first: a bad one leaves everything as it was.
        let mut plan: Vec<Step<'_>> = Vec::new();
        for nl in &new.listeners {
            let Some(shared) = self.listeners.iter().find(|s| s.name == nl.name) else {
                warnings.push(format!("new listener {:?} needs a restart", nl.name));
                continue;
            };
            let Some(ol) = old.listeners.iter().find(|o| o.name == nl.name) else {
                continue;
            };
            if nl.listen != ol.listen || nl.protocol != ol.protocol {
                warnings.push(format!(
                    "listener {:?}: address or protocol change needs a restart",
                    nl.name
                ));
            }
            if nl.tls.is_some() != ol.tls.is_some() {
                warnings.push(format!(
                    "listener {:?}: turning TLS on or off needs a restart",
                    nl.name
                ));
            }
            if nl.backend_tls != ol.backend_tls || nl.server_names != ol.server_names {
                warnings.push(format!(
                    "listener {:?}: backend_tls or server_names change needs a restart",
                    nl.name
                ));
            }
            if nl.managed != ol.managed {
                warnings.push(format!(
                    "listener {:?}: managed pool change needs a restart",
                    nl.name
                ));
            }
            let shared_changed = nl.plugin != ol.plugin
                || nl.plugin_options != ol.plugin_options
                || nl.backends != ol.backends;
            if self.cluster.is_some() && shared_changed {
                warnings.push(format!(
                    "listener {:?}: backends and plugin are the cluster's: the file's are used only to seed an empty cluster store; change them through the admin API",
                    nl.name
                ));
            }
            let plugin = if self.cluster.is_none()
                && (nl.plugin != ol.plugin || nl.plugin_options != ol.plugin_options)
            {
                let source = super::plugin_source(&nl.plugin);
                let options = nl.plugin_options.clone();
                let runtime = self.runtime.clone();
                let name = nl.name.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    super::load_plugin(&runtime, &source, &options)
                })
                .await
                .map_err(|e| ControlError::Internal(e.to_string()))?
                .map_err(|e| ControlError::Rejected(format!("listener {name:?}: {e:#}")))?;
                Some(loaded)
            } else {
                None
            };
            // Opened again even when unchanged: logrotate renames the file, then signals.
            let log = AccessLog::prepare(nl.access_log.as_ref())
                .map_err(|e| ControlError::Rejected(format!("listener {:?}: {e}", nl.name)))?;
            plan.push(Step {
                shared,
                old: ol,
                new: nl,
                plugin,
                log,
            });
        }
        for Step {
            shared,
            old: ol,
            new: nl,
            plugin,
            log,
        } in plan
        {
            if let Some(p) = plugin {
                changes.push(format!("{}: plugin {}", nl.name, p.name()));
                shared.plugin.store(p);
            }
            if shared.access_log.target() != nl.access_log {
                changes.push(format!("{}: access log", nl.name));
            }
            shared.access_log.install(log);
            // Certificates are read again even when the file names are the same: a
            // renewal replaces the files in place. The configuration check already
            // loaded them, so a bad one never got this far.
            if let (Some(tls), Some(settings)) = (&shared.tls, &nl.tls) {
                match tls.reload(settings) {
                    Ok(c) => changes.extend(c),
                    Err(e) => warnings.push(format!(
                        "listener {:?}: certificates not reloaded, the previous ones stay: {e}",
                        nl.name
                    )),
                }
            }
            // Cluster mode: the shared settings (hash key, retries) win over the file's.
            let settings = match &self.cluster {
                Some(c) => Settings::from_config(&c.overlay_settings(nl)),
                None => Settings::from_config(nl),
            };
            if **shared.settings.load() != settings {
                changes.push(format!("{}: settings", nl.name));
                shared.pool.set_slow_start(settings.passive.slow_start);
                shared.settings.store(Arc::new(settings));
            }
            if self.cluster.is_none() {
                changes.extend(self.reconcile_backends(shared, ol, nl));
            }
            changes.extend(
                self.discovery
                    .reconcile(shared, &nl.discovery, &new.discovery),
            );
        }
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = new;
        tracing::info!(changes = ?changes, warnings = ?warnings, "configuration reloaded");
        Ok(ReloadReport { changes, warnings })
    }

    /// Applies what changed in the file between `ol` and `nl`: backends taken out of it are
    /// removed, backends new in it are added, changed weights and limits are set. What the
    /// admin API changed at run time stays (as HAProxy's runtime API with a state file):
    /// a backend added through the API is not in either file, so a reload leaves it alone.
    /// Managed members are never touched.
    fn reconcile_backends(
        &self,
        shared: &ListenerShared,
        ol: &ListenerConfig,
        nl: &ListenerConfig,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let managed: Vec<SocketAddr> = self
            .managed()
            .get(shared.index)
            .and_then(Option::as_ref)
            .map(|m| m.instances.iter().map(|i| i.addr).collect())
            .unwrap_or_default();
        let in_old = |a: SocketAddr| ol.backends.iter().any(|c| c.address == a);
        let removed = shared.pool.remove(|b| {
            !managed.contains(&b.addr)
                && in_old(b.addr)
                && !nl.backends.iter().any(|c| c.address == b.addr)
        });
        for b in removed {
            changes.push(format!("{}: removed {}", nl.name, b.addr));
        }
        shared.pool.update(|limits| {
            for c in &nl.backends {
                match shared.pool.find(c.address) {
                    Some(b) => {
                        if limits.set_limits(&b, c.weight, c.max_connections) {
                            changes.push(format!(
                                "{}: {} weight {} max_connections {}",
                                nl.name, c.address, c.weight, c.max_connections
                            ));
                        }
                    }
                    // Removed through the API while still in the file: stays removed.
                    None if in_old(c.address) => {}
                    None => {
                        shared
                            .pool
                            .add(Backend::new(c.address, c.weight, c.max_connections));
                        changes.push(format!("{}: added {}", nl.name, c.address));
                    }
                }
            }
        });
        changes
    }
}

/// Passive ejections reported by the workers: eject, then re-admit when the time is up.
async fn handle_events(control: Arc<Control>, mut events: UnboundedReceiver<Event>) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Eject { listener, backend } => {
                let Some(l) = control.listeners.get(listener) else {
                    continue;
                };
                let passive = l.settings.load().passive;
                if let Some(length) = health::eject(l, &backend, &passive) {
                    let l = l.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(length).await;
                        health::readmit(&l, &backend);
                    });
                }
            }
        }
    }
}
