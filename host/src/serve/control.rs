//! [`Control`]: the control plane's operations on a running server — membership (add,
//! remove, drain), plugin swap, lookaside pick, state report, metrics, reload — shared by
//! the admin API and the signal handlers. Everything here runs on the control runtime;
//! workers only ever see the results as newly published snapshots, plugins and settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::managed::{self, Instance};
use crate::config::{Config, ListenerConfig, Managed};
use crate::health;
use crate::metrics::{ListenerStatus, Metrics};
use crate::plugin::{
    PluginSource, PoolView, Protocol as PluginProtocol, RequestInfo, Runtime, Selector,
};
use crate::pool::Backend;
use crate::proxy::{AccessLog, Event, ListenerShared, Prepared, Settings};

/// Re-reads the configuration (file and flags) for a reload.
pub type Reloader = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// An admin call that failed: the status and a one-line reason.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status to answer.
    pub status: StatusCode,
    /// What went wrong, for the `{"error": ...}` body.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// One listener's part of a reload: the listener, its old and new configuration, its new
/// plugin, its access log opened again.
type Step<'a> = (
    &'a Arc<ListenerShared>,
    &'a ListenerConfig,
    &'a ListenerConfig,
    Option<Arc<crate::plugin::Plugin>>,
    Prepared,
);

/// A managed pool's spec and its running instances.
struct ManagedPool {
    spec: Managed,
    next: u32,
    instances: Vec<Instance>,
}

/// The running server as the control plane sees it.
pub struct Control {
    pub(crate) runtime: Runtime,
    /// The control-plane runtime: background loops and managed processes run there,
    /// whichever thread calls.
    handle: tokio::runtime::Handle,
    pub(crate) listeners: Vec<Arc<ListenerShared>>,
    pub(crate) listen_addrs: Vec<SocketAddr>,
    pub(crate) metrics: Arc<Metrics>,
    config: Mutex<Config>,
    reloader: Option<Reloader>,
    managed: Mutex<Vec<Option<ManagedPool>>>,
    /// `GET /pick`'s plugin instance per listener, kept while the plugin stays the same
    /// (instantiating one per call would cost a lookaside client milliseconds).
    pick_selectors: Mutex<Vec<Option<Selector>>>,
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

fn parse_addr(s: &str) -> Result<SocketAddr, ApiError> {
    let t = s.trim();
    let t = t
        .strip_prefix("localhost:")
        .map_or_else(|| t.to_string(), |p| format!("127.0.0.1:{p}"));
    t.parse()
        .map_err(|_| ApiError::bad(format!("invalid backend address {s:?} (expected IP:PORT)")))
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
        }
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
            }
            self.handle.spawn(health::slow_start(l.clone()));
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
        self.handle.spawn(handle_events(self.clone(), events));
    }

    /// Stops every managed process (SIGTERM by PID, then SIGKILL) and waits for them.
    pub(crate) async fn stop_managed(&self) {
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

    fn listener(&self, name: Option<&str>) -> Result<&Arc<ListenerShared>, ApiError> {
        match name {
            Some(n) => self.listeners.iter().find(|l| l.name == n).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("no listener named {n:?}"))
            }),
            None if self.listeners.len() == 1 => Ok(&self.listeners[0]),
            None => Err(ApiError::bad(
                "several listeners: say which with \"listener\"",
            )),
        }
    }

    fn is_managed(&self, listener: usize, addr: SocketAddr) -> bool {
        self.managed()
            .get(listener)
            .and_then(Option::as_ref)
            .is_some_and(|m| m.instances.iter().any(|i| i.addr == addr))
    }

    /// `GET /backends`: every listener with its backends and their live figures.
    pub fn report(&self) -> Value {
        let listeners: Vec<Value> = self
            .listeners
            .iter()
            .zip(&self.listen_addrs)
            .map(|(l, addr)| {
                let snap = l.pool.snapshot();
                let backends: Vec<Value> = snap
                    .backends()
                    .iter()
                    .zip(snap.infos())
                    .map(|(b, info)| {
                        let st = b.state().clone();
                        json!({
                            "id": b.id,
                            "address": b.address(),
                            "weight": info.weight,
                            "max_connections": info.max_connections,
                            "healthy": info.healthy,
                            "draining": st.draining,
                            "ejected": st.ejected_until.is_some(),
                            "checks_up": st.active_up,
                            "managed": self.is_managed(l.index, b.addr),
                            "warmup": info.warmup,
                            "in_flight": b.in_flight(),
                            "requests": b.requests(),
                            "failures": b.failures(),
                            "latency_us": b.latency_us(),
                            "cpu_percent": info.cpu_percent,
                            "memory_percent": info.memory_percent,
                            "connections": info.backend_connections,
                            "load_samples": info.load_sample,
                        })
                    })
                    .collect();
                json!({
                    "name": l.name,
                    "listen": addr.to_string(),
                    "protocol": l.protocol.to_string(),
                    "plugin": l.plugin.load().name(),
                    "generation": snap.generation(),
                    "healthy": snap.healthy_count(),
                    "backends": backends,
                })
            })
            .collect();
        json!({ "listeners": listeners })
    }

    /// `POST /backends/add`: static backends by address (a draining one is taken back), or
    /// `n` more processes of a managed pool.
    pub fn add(&self, req: AddRequest) -> Result<Value, ApiError> {
        let l = self.listener(req.listener.as_deref())?;
        if let Some(n) = req.n {
            if !req.addresses.is_empty() {
                return Err(ApiError::bad(
                    "give either \"addresses\" or \"n\", not both",
                ));
            }
            return self.add_managed(l, n);
        }
        if req.addresses.is_empty() {
            return Err(ApiError::bad(
                "nothing to add: give \"addresses\" (or \"n\" for a managed pool)",
            ));
        }
        let weight = req.weight.unwrap_or(1);
        if weight == 0 {
            return Err(ApiError::bad("\"weight\" must be >= 1"));
        }
        let addrs = req
            .addresses
            .iter()
            .map(|a| parse_addr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut added = Vec::new();
        let mut unchanged = Vec::new();
        for addr in addrs {
            match l.pool.find(addr) {
                Some(b) => {
                    let was_draining = std::mem::replace(&mut b.state().draining, false);
                    if was_draining {
                        added.push(json!({"id": b.id, "address": b.address(), "undrained": true}));
                    } else {
                        unchanged.push(addr.to_string());
                    }
                }
                None => {
                    let b = Backend::new(addr, weight, req.max_connections.unwrap_or(0));
                    added.push(json!({"id": b.id, "address": b.address()}));
                    l.pool.add(b);
                }
            }
        }
        l.pool.publish();
        tracing::info!(listener = %l.name, added = added.len(), "backends added (admin)");
        Ok(json!({"listener": l.name, "added": added, "already_members": unchanged}))
    }

    fn add_managed(&self, l: &Arc<ListenerShared>, n: u32) -> Result<Value, ApiError> {
        if n == 0 || n > 100 {
            return Err(ApiError::bad("\"n\" must be within 1..=100"));
        }
        let mut managed = self.managed();
        let Some(Some(m)) = managed.get_mut(l.index) else {
            return Err(ApiError::bad(format!(
                "listener {:?} has no managed pool: give \"addresses\"",
                l.name
            )));
        };
        let mut ports = Vec::new();
        for _ in 0..n {
            let port = u16::try_from(u32::from(m.spec.base_port) + m.next)
                .map_err(|_| ApiError::bad("the managed pool ran out of ports"))?;
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
        Ok(
            json!({"listener": l.name, "starting": ports, "note": "each joins the pool once it answers a check"}),
        )
    }

    fn select(
        &self,
        l: &ListenerShared,
        req: &SelectRequest,
    ) -> Result<Vec<Arc<Backend>>, ApiError> {
        if req.addresses.is_empty() && req.ids.is_empty() {
            return Err(ApiError::bad(
                "say which backends: \"addresses\" or \"ids\"",
            ));
        }
        let mut found = Vec::new();
        for a in &req.addresses {
            let addr = parse_addr(a)?;
            found.push(l.pool.find(addr).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no backend {addr} in pool {:?}", l.name),
                )
            })?);
        }
        for &id in &req.ids {
            found.push(l.pool.find_id(id).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no backend with id {id} in pool {:?}", l.name),
                )
            })?);
        }
        Ok(found)
    }

    /// `POST /backends/remove`: out of the pool at once (no new requests); in-flight ones
    /// finish on their own. A managed backend's process is stopped.
    pub fn remove(&self, req: SelectRequest) -> Result<Value, ApiError> {
        let l = self.listener(req.listener.as_deref())?;
        let chosen = self.select(l, &req)?;
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
        let list: Vec<Value> = removed
            .iter()
            .map(|b| json!({"id": b.id, "address": b.address(), "in_flight": b.in_flight()}))
            .collect();
        tracing::info!(listener = %l.name, removed = list.len(), "backends removed (admin)");
        Ok(json!({"listener": l.name, "removed": list, "stopped_processes": stopped}))
    }

    /// `POST /backends/drain`: kept in the pool but given no new requests (add it again to
    /// take it back).
    pub fn drain(&self, req: SelectRequest) -> Result<Value, ApiError> {
        let l = self.listener(req.listener.as_deref())?;
        let chosen = self.select(l, &req)?;
        for b in &chosen {
            b.state().draining = true;
        }
        l.pool.publish();
        let list: Vec<Value> = chosen
            .iter()
            .map(|b| json!({"id": b.id, "address": b.address(), "in_flight": b.in_flight()}))
            .collect();
        tracing::info!(listener = %l.name, draining = list.len(), "backends draining (admin)");
        Ok(json!({"listener": l.name, "draining": list}))
    }

    /// `POST /plugin`: loads and validates the new plugin first (off the control thread:
    /// compiling can take a while), then publishes it; workers switch on their next request.
    pub async fn swap_plugin(&self, req: PluginRequest) -> Result<Value, ApiError> {
        let l = self.listener(req.listener.as_deref())?.clone();
        let options: Vec<(String, String)> = req
            .options
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                Value::Number(_) | Value::Bool(_) => Ok((k, v.to_string())),
                _ => Err(ApiError::bad(format!(
                    "option {k:?}: expected a string, number or boolean"
                ))),
            })
            .collect::<Result<_, _>>()?;
        let source = PluginSource::parse(&req.plugin);
        let runtime = self.runtime.clone();
        let plugin =
            tokio::task::spawn_blocking(move || super::load_plugin(&runtime, &source, &options))
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("plugin load task failed: {e}"),
                    )
                })?
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
        let old = l.plugin.swap(plugin.clone());
        tracing::info!(listener = %l.name, from = %old.name(), to = %plugin.name(), "plugin swapped");
        Ok(
            json!({"listener": l.name, "plugin": plugin.name(), "description": plugin.description(), "previous": old.name()}),
        )
    }

    /// `GET /pick`: which backend the plugin would choose for a request with this hash key
    /// (and path), without sending anything.
    pub fn pick(
        &self,
        listener: Option<&str>,
        key: Option<String>,
        path: Option<&str>,
    ) -> Result<Value, ApiError> {
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
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("plugin {}: {e:#}", plugin.name()),
                )
            })?);
        }
        let selector = slot.as_mut().expect("set above");
        let snapshot = l.pool.snapshot();
        if snapshot.healthy_count() == 0 {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy backend in pool {:?}", l.name),
            ));
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
            info.uri = p
                .parse()
                .map_err(|_| ApiError::bad(format!("invalid path {p:?}")))?;
        }
        let pick = selector.choose(&view, &mut info, &[]);
        let Some(b) = pick.index.and_then(|i| snapshot.backend(i)) else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("plugin {} found no backend", plugin.name()),
            ));
        };
        let by = match pick.source {
            crate::plugin::PickSource::Plugin => "plugin".to_string(),
            crate::plugin::PickSource::Fallback(f) => format!("fallback ({f})"),
        };
        Ok(
            json!({"listener": l.name, "backend": b.address(), "id": b.id, "plugin": plugin.name(), "picked_by": by}),
        )
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
            })
            .collect();
        self.metrics.render(&status)
    }

    /// `POST /reload` and SIGHUP: re-reads the configuration and applies what can change
    /// without dropping connections — plugins and their options, static backends (added,
    /// removed, re-weighted), timeouts, retries, health, load-report and PROXY-protocol
    /// settings, access logs (always reopened). Listener addresses, protocols, workers,
    /// admin and managed pools need a restart: reported as warnings. Nothing is applied
    /// unless every new plugin loads and every access log opens.
    pub async fn reload(&self) -> Result<Value, ApiError> {
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
            loaded.map_err(|e| ApiError::bad(format!("{e:#}")))?
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
            if nl.managed != ol.managed {
                warnings.push(format!(
                    "listener {:?}: managed pool change needs a restart",
                    nl.name
                ));
            }
            let plugin = if nl.plugin != ol.plugin || nl.plugin_options != ol.plugin_options {
                let source = super::plugin_source(&nl.plugin);
                let options = nl.plugin_options.clone();
                let runtime = self.runtime.clone();
                let name = nl.name.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    super::load_plugin(&runtime, &source, &options)
                })
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("listener {name:?}: {e:#}"),
                    )
                })?;
                Some(loaded)
            } else {
                None
            };
            // Opened again even when unchanged: logrotate renames the file, then signals.
            let log = AccessLog::prepare(nl.access_log.as_ref()).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("listener {:?}: {e}", nl.name),
                )
            })?;
            plan.push((shared, ol, nl, plugin, log));
        }
        for (shared, ol, nl, plugin, log) in plan {
            if let Some(p) = plugin {
                changes.push(format!("{}: plugin {}", nl.name, p.name()));
                shared.plugin.store(p);
            }
            if shared.access_log.target() != nl.access_log {
                changes.push(format!("{}: access log", nl.name));
            }
            shared.access_log.install(log);
            let settings = Settings::from_config(nl);
            if **shared.settings.load() != settings {
                changes.push(format!("{}: settings", nl.name));
                shared.pool.set_slow_start(settings.passive.slow_start);
                shared.settings.store(Arc::new(settings));
            }
            changes.extend(self.reconcile_backends(shared, ol, nl));
        }
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = new;
        tracing::info!(changes = ?changes, warnings = ?warnings, "configuration reloaded");
        Ok(json!({"changes": changes, "warnings": warnings}))
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
        let mut touched = false;
        for c in &nl.backends {
            match shared.pool.find(c.address) {
                Some(b) => {
                    if b.set_limits(c.weight, c.max_connections) {
                        changes.push(format!(
                            "{}: {} weight {} max_connections {}",
                            nl.name, c.address, c.weight, c.max_connections
                        ));
                        touched = true;
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
        if touched {
            shared.pool.publish();
        }
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
