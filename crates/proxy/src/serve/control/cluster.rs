//! Cluster mode on the control plane: the replica's side of [`crate::cluster`].
//!
//! - **Start**: [`initial`] reads the shared state before anything is built (etcd, else
//!   the snapshot this replica saved last, else the file), and [`overlay`] puts it in the
//!   configuration, so pools and plugins start as the cluster has them.
//! - **Sync** ([`run`]): read the prefix at revision R, seed what is missing, apply it as
//!   one snapshot, register under a lease, watch from R+1 and apply each change. Any
//!   failure (etcd down, a watch past a compaction, a lease lost) ends the session: the
//!   replica keeps serving what it applied, and the next session reads everything again.
//!   A store whose cluster id changed or whose revision went back (etcd replaced or
//!   wiped) is noticed there; an empty one is seeded again from what was last applied.
//! - **Writes** (the admin calls): a transaction compared on the `mod_revision` this
//!   replica applied, then a wait until its own watch has applied the result. The pool is
//!   never changed by the call itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::{AddReport, Added, AddedBackend, Control, ControlError, Draining, Leaving, Removed};
use crate::cluster::store::Write;
use crate::cluster::{
    BackendSpec, Commit, Desired, Expect, ListenerSpec, Mirror, PluginSpec, ReplicaInfo, Store,
    StoreError, keys, state,
};
use crate::config::{BackendConfig, ClusterConfig, Config, ListenerConfig, PluginRef};
use crate::pool::Backend;
use crate::proxy::{ListenerShared, Settings};
use lbwasm_plugin_host::{Plugin, PluginSource};

/// How long an admin write waits for this replica's watch to apply it.
const APPLY_WAIT: Duration = Duration::from_secs(5);

use crate::cluster::keys::CHANGED;

/// A replica's cluster state, owned by the control plane.
pub(crate) struct Cluster {
    pub(super) config: ClusterConfig,
    /// What was last applied.
    mirror: Mutex<Arc<Mirror>>,
    /// The store, while a session is up.
    store: Mutex<Option<Store>>,
    connected: AtomicBool,
    /// Why the store is unavailable, for 503s.
    down_reason: Mutex<String>,
    /// The store revision applied (raw: replica keys included); writes wait on it.
    applied: watch::Sender<i64>,
    /// The configuration revision applied ([`CHANGED`]'s), which replicas report.
    config_revision: AtomicI64,
    /// Per listener: the backends the cluster put in the pool (others — DNS, managed —
    /// are never touched).
    owned: Mutex<Vec<HashSet<SocketAddr>>>,
    /// Per listener: the plugin applied.
    plugins: Mutex<Vec<Option<PluginSpec>>>,
    /// Plugins this replica loaded to validate a write, used when the write comes back.
    preloaded: Mutex<HashMap<PluginSpec, Arc<Plugin>>>,
    resyncs: AtomicU64,
    /// Sessions that read the store: every one after the first is a resync.
    sessions: AtomicU64,
    conflicts: AtomicU64,
    /// Problems already logged (a bad key is reported once, not on every change).
    logged: Mutex<HashSet<String>>,
    admin: Option<String>,
    started: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the state a replica starts from came from.
pub(crate) enum Initial {
    /// etcd answered.
    Store(Mirror),
    /// etcd did not; the replica's saved snapshot.
    Saved(Mirror),
    /// Neither: the file (seeded into etcd once it answers).
    File,
}

/// Reads the shared state before the server is built: etcd (bounded), else the saved
/// snapshot. Runs on a thread of its own (the caller may be inside an async runtime).
pub(crate) fn initial(c: &ClusterConfig) -> Initial {
    let config = c.clone();
    let fetched = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError(e.to_string()))?;
        rt.block_on(async {
            let mut store = Store::connect(&config).await?;
            store.load().await
        })
    })
    .join()
    .unwrap_or_else(|_| Err(StoreError("the etcd reader panicked".into())));
    match fetched {
        Ok(m) if m.seeded() => Initial::Store(m),
        Ok(_) => {
            tracing::info!(cluster = %c.name, "the cluster store has no configuration yet: this replica will seed it from its file");
            Initial::File
        }
        Err(e) => match Mirror::load(&c.state_file) {
            Ok(m) => {
                tracing::warn!(cluster = %c.name, error = %e, snapshot = %c.state_file.display(), revision = m.revision, "cluster store unavailable: starting from the last saved snapshot");
                Initial::Saved(m)
            }
            Err(_) => {
                tracing::warn!(cluster = %c.name, error = %e, "cluster store unavailable and no saved snapshot: starting from the file; it is seeded once etcd answers");
                Initial::File
            }
        },
    }
}

/// Puts the shared pools and plugins into `config` (the file keeps the rest), so the
/// server is built as the cluster has it.
pub(crate) fn overlay(config: &mut Config, mirror: &Mirror) {
    let Some(c) = &config.cluster else { return };
    let desired = Desired::from_mirror(mirror);
    let dir = state::blob_dir(&c.state_file);
    for l in &mut config.listeners {
        let Some(spec) = desired.listeners.get(&l.name) else {
            continue;
        };
        let Some(plugin) = &spec.plugin else { continue };
        match source_of(plugin, mirror, &dir) {
            Ok(PluginSource::Builtin(n)) => l.plugin = PluginRef::Builtin(n),
            Ok(PluginSource::File(p)) => l.plugin = PluginRef::File(p),
            Err(e) => {
                tracing::error!(listener = %l.name, error = %e, "the cluster's plugin is not available here: starting with the file's");
                continue;
            }
        }
        l.plugin_options = plugin.option_list();
        if let Some(v) = &spec.settings
            && !v.overlay(l)
        {
            tracing::error!(listener = %l.name, settings = ?v, "the cluster's settings are not valid here: keeping the file's");
        }
        l.backends = spec
            .backends
            .iter()
            .map(|(&address, b)| BackendConfig {
                address,
                weight: b.weight,
                max_connections: b.max_connections,
            })
            .collect();
    }
}

/// Where the plugin host finds a shared plugin: a built-in, or the stored component
/// written to this replica's folder (named by its digest, written once).
fn source_of(
    p: &PluginSpec,
    mirror: &Mirror,
    dir: &std::path::Path,
) -> Result<PluginSource, String> {
    let Some(digest) = p.digest() else {
        return Ok(PluginSource::Builtin(p.plugin.clone()));
    };
    let path = dir.join(format!("{}.wasm", digest.replace(':', "-")));
    // The folder is this user's alone, and a file already there is used only if it still
    // has the digest it is named by: anything else is written again from the store.
    state::private_dir(dir).map_err(|e| format!("{e:#}"))?;
    let intact = state::check_private(&path).is_ok()
        && std::fs::read(&path).is_ok_and(|b| state::digest_of(&b) == digest);
    if !intact {
        let bytes = mirror
            .blob(digest)
            .ok_or_else(|| format!("component {digest} is not (completely) in the store"))?;
        state::write_private(&path, &bytes).map_err(|e| format!("{e:#}"))?;
    }
    Ok(PluginSource::File(path))
}

impl Cluster {
    /// The cluster state of a server built from `config` (after [`overlay`]).
    pub(crate) fn new(
        config: &Config,
        initial: Option<Mirror>,
        admin: Option<SocketAddr>,
    ) -> Option<Arc<Cluster>> {
        let c = config.cluster.clone()?;
        let mirror = initial.unwrap_or_default();
        let desired = Desired::from_mirror(&mirror);
        let mut owned = Vec::new();
        let mut plugins = Vec::new();
        for l in &config.listeners {
            // What the file (or the overlay) put in the pool is the cluster's to change.
            owned.push(l.backends.iter().map(|b| b.address).collect());
            plugins.push(
                desired
                    .listeners
                    .get(&l.name)
                    .and_then(|s| s.plugin.clone()),
            );
        }
        let (applied, _) = watch::channel(mirror.revision);
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(Arc::new(Cluster {
            config_revision: AtomicI64::new(changed_revision(&mirror)),
            mirror: Mutex::new(Arc::new(mirror)),
            config: c,
            store: Mutex::new(None),
            connected: AtomicBool::new(false),
            down_reason: Mutex::new("not connected yet".into()),
            applied,
            owned: Mutex::new(owned),
            plugins: Mutex::new(plugins),
            preloaded: Mutex::new(HashMap::new()),
            resyncs: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            logged: Mutex::new(HashSet::new()),
            admin: admin.map(|a| a.to_string()),
            started,
        }))
    }

    /// Gives the pools built from the overlaid configuration what a configuration file
    /// cannot say (backends draining), before any request is served.
    pub(crate) fn adopt(&self, listeners: &[Arc<ListenerShared>]) {
        let desired = Desired::from_mirror(&self.mirror());
        for l in listeners {
            if let Some(spec) = desired
                .listeners
                .get(&l.name)
                .filter(|s| s.plugin.is_some())
            {
                self.apply_backends(l, spec);
            }
        }
    }

    fn mirror(&self) -> Arc<Mirror> {
        lock(&self.mirror).clone()
    }

    /// The store for a write, or why there is none (503).
    fn store(&self) -> Result<Store, ControlError> {
        lock(&self.store).clone().ok_or_else(|| {
            ControlError::Unavailable(format!(
                "cluster store unavailable ({}): the change was not made; this replica keeps serving its last applied configuration",
                lock(&self.down_reason)
            ))
        })
    }

    fn set_down(&self, why: &str) {
        *lock(&self.store) = None;
        *lock(&self.down_reason) = why.to_owned();
        self.connected.store(false, Ordering::Relaxed);
    }

    /// This replica's own key.
    fn info(&self) -> ReplicaInfo {
        ReplicaInfo {
            replica: self.config.replica.clone(),
            admin: self.admin.clone(),
            pid: std::process::id(),
            applied_revision: self.config_revision.load(Ordering::Relaxed),
            plugins: Default::default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started: self.started,
        }
    }

    /// Commits a write of shared configuration (bumping [`CHANGED`]) and waits until this
    /// replica's watch has applied it.
    async fn write(
        &self,
        mut expect: Vec<(String, Expect)>,
        mut writes: Vec<Write>,
        what: &str,
    ) -> Result<(), ControlError> {
        let mut store = self.store()?;
        writes.push(Write::Put(
            CHANGED.into(),
            state::json(&self.config.replica),
        ));
        expect.dedup();
        let done = store
            .commit(&expect, writes)
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = match done {
            Commit::Done(r) => r,
            Commit::Conflict => {
                self.conflicts.fetch_add(1, Ordering::Relaxed);
                return Err(ControlError::Conflict(format!(
                    "{what}: changed concurrently through another replica; nothing was written here. Read GET /backends and try again"
                )));
            }
        };
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(APPLY_WAIT, applied.wait_for(|&r| r >= revision)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ControlError::Unavailable(format!(
                "{what}: written to the cluster store at revision {revision}, not yet applied by this replica after {APPLY_WAIT:?} (it will be)"
            ))),
        }
    }

    fn unavailable(&self, e: StoreError) -> ControlError {
        ControlError::Unavailable(format!(
            "cluster store unavailable ({e}): the change may not have been made; read GET /backends"
        ))
    }

    /// Applies a new state: backends and plugins of every listener, then saves it.
    async fn apply(&self, control: &Control, mirror: Mirror) {
        let desired = Desired::from_mirror(&mirror);
        for p in &desired.problems {
            if lock(&self.logged).insert(p.clone()) {
                tracing::warn!(cluster = %self.config.name, problem = %p, "cluster key ignored");
            }
        }
        for l in &control.listeners {
            let Some(spec) = desired.listeners.get(&l.name) else {
                continue;
            };
            let Some(plugin) = &spec.plugin else { continue };
            self.apply_backends(l, spec);
            self.apply_settings(control, l, spec);
            self.apply_plugin(control, l, plugin, &mirror).await;
        }
        let revision = mirror.revision;
        let changed = changed_revision(&mirror);
        let mirror = Arc::new(mirror);
        *lock(&self.mirror) = mirror.clone();
        self.config_revision.store(changed, Ordering::Relaxed);
        self.applied.send_replace(revision);
        let path = self.config.state_file.clone();
        let saved = tokio::task::spawn_blocking(move || mirror.save(&path)).await;
        if let Ok(Err(e)) = saved
            && lock(&self.logged).insert(format!("save: {e}"))
        {
            tracing::warn!(error = %e, "cannot save the cluster snapshot: a restart while etcd is down would start from the file");
        }
    }

    /// Makes the pool's cluster-owned backends the spec's: added, re-weighted, drained or
    /// taken back, removed.
    fn apply_backends(&self, l: &ListenerShared, spec: &ListenerSpec) {
        let mut owned = lock(&self.owned);
        let Some(owned) = owned.get_mut(l.index) else {
            return;
        };
        let gone = l
            .pool
            .remove(|b| owned.contains(&b.addr) && !spec.backends.contains_key(&b.addr));
        for b in &gone {
            owned.remove(&b.addr);
            tracing::info!(listener = %l.name, backend = %b.addr, "backend removed (cluster)");
        }
        l.pool.update(|changes| {
            for (&addr, b) in &spec.backends {
                let member = match l.pool.find(addr) {
                    Some(m) => {
                        changes.set_limits(&m, b.weight, b.max_connections);
                        m
                    }
                    None => {
                        let m = Backend::new(addr, b.weight, b.max_connections);
                        l.pool.add(m.clone());
                        tracing::info!(listener = %l.name, backend = %addr, "backend added (cluster)");
                        m
                    }
                };
                changes.state(&member, |st| st.draining = b.draining);
                owned.insert(addr);
            }
        });
    }

    /// The listener's configuration with the cluster's shared settings laid over it.
    pub(crate) fn overlay_settings(&self, l: &ListenerConfig) -> ListenerConfig {
        let mut l = l.clone();
        let desired = Desired::from_mirror(&self.mirror());
        if let Some(v) = desired
            .listeners
            .get(&l.name)
            .and_then(|s| s.settings.as_ref())
        {
            v.overlay(&mut l);
        }
        l
    }

    /// Publishes the spec's settings (hash key, retries) over the listener's own.
    fn apply_settings(&self, control: &Control, l: &ListenerShared, spec: &ListenerSpec) {
        let Some(v) = &spec.settings else { return };
        let Some(mut lc) = lock(&control.config)
            .listeners
            .iter()
            .find(|c| c.name == l.name)
            .cloned()
        else {
            return;
        };
        if !v.overlay(&mut lc) {
            if lock(&self.logged).insert(format!("settings {v:?}")) {
                tracing::error!(listener = %l.name, settings = ?v, "the cluster's settings are not valid here: keeping the current ones");
            }
            return;
        }
        let settings = Settings::from_config(&lc);
        if **l.settings.load() != settings {
            l.settings.store(Arc::new(settings));
            tracing::info!(listener = %l.name, settings = ?v, "settings changed (cluster)");
        }
    }

    /// Swaps in the spec's plugin if it is not the one applied. A plugin that does not
    /// load here is logged and the old one kept (the replica reports what it runs).
    async fn apply_plugin(
        &self,
        control: &Control,
        l: &ListenerShared,
        p: &PluginSpec,
        m: &Mirror,
    ) {
        if lock(&self.plugins)
            .get(l.index)
            .is_some_and(|a| a.as_ref() == Some(p))
        {
            return;
        }
        let preloaded = lock(&self.preloaded).remove(p);
        let loaded = match preloaded {
            Some(plugin) => Ok(plugin),
            None => {
                let dir = state::blob_dir(&self.config.state_file);
                let (p2, m2) = (p.clone(), m.clone());
                let runtime = control.runtime.clone();
                tokio::task::spawn_blocking(move || {
                    let source = source_of(&p2, &m2, &dir).map_err(anyhow::Error::msg)?;
                    crate::serve::load_plugin(&runtime, &source, &p2.option_list())
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("plugin load task: {e}")))
            }
        };
        match loaded {
            Ok(plugin) => {
                let old = l.plugin.swap(plugin.clone());
                tracing::info!(listener = %l.name, from = %old.name(), to = %plugin.name(), spec = %p.label(), "plugin swapped (cluster)");
            }
            Err(e) => {
                tracing::error!(listener = %l.name, plugin = %p.label(), error = %format!("{e:#}"), "the cluster's plugin does not load on this replica: keeping the current one");
            }
        }
        if let Some(slot) = lock(&self.plugins).get_mut(l.index) {
            *slot = Some(p.clone());
        }
    }

    /// Writes the listeners the store has no plugin for: from what this replica last
    /// applied if it had them (a wiped store gets its configuration back), else from the
    /// file. One transaction, compared on absence: of two replicas seeding, one wins.
    async fn seed(
        &self,
        control: &Control,
        store: &mut Store,
        now: &Mirror,
    ) -> Result<bool, StoreError> {
        let last = self.mirror();
        let last_desired = Desired::from_mirror(&last);
        let file = lock(&control.config).clone();
        let mut specs = Vec::new();
        for l in &file.listeners {
            if now.entries.contains_key(&keys::plugin(&l.name)) {
                continue;
            }
            let kept = (last_desired.listeners.get(&l.name)).filter(|s| s.plugin.is_some());
            let (spec, blob) = match kept {
                Some(spec) => {
                    let blob = (spec.plugin.as_ref().and_then(PluginSpec::digest))
                        .and_then(|d| last.blob(d).map(|b| (d.to_owned(), b)));
                    (spec.clone(), blob)
                }
                None => state::spec_of(l).map_err(|e| StoreError(format!("{e:#}")))?,
            };
            specs.push((l.name.clone(), spec, blob));
        }
        if specs.is_empty() {
            return Ok(false);
        }
        let seeded = store.seed(now, specs, &self.config.replica).await?;
        if seeded.is_empty() {
            tracing::info!(cluster = %self.config.name, "another replica seeded the cluster store first");
        } else {
            tracing::info!(cluster = %self.config.name, listeners = ?seeded, "seeded the cluster store");
        }
        Ok(true)
    }

    /// What `GET /backends` says of the cluster.
    pub(crate) fn report(&self) -> ClusterReport {
        let mirror = self.mirror();
        let desired = Desired::from_mirror(&mirror);
        let latest = changed_revision(&mirror);
        let replicas = desired
            .replicas
            .into_values()
            .map(|r| ReplicaReport {
                up_to_date: r.applied_revision >= latest,
                replica: r.replica,
                admin: r.admin,
                applied_revision: r.applied_revision,
            })
            .collect();
        ClusterReport {
            name: self.config.name.clone(),
            replica: self.config.replica.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            applied_revision: self.config_revision.load(Ordering::Relaxed),
            replicas,
        }
    }

    /// Prometheus lines.
    pub(crate) fn metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let labels = format!(
            "cluster=\"{}\",replica=\"{}\"",
            self.config.name, self.config.replica
        );
        let report = self.report();
        let gauges: [(&str, &str, &str, String); 5] = [
            (
                "lbwasm_cluster_connected",
                "gauge",
                "1 while this replica is connected to the cluster store (etcd)",
                u8::from(report.connected).to_string(),
            ),
            (
                "lbwasm_cluster_applied_revision",
                "gauge",
                "The cluster configuration revision this replica has applied",
                report.applied_revision.to_string(),
            ),
            (
                "lbwasm_cluster_replicas",
                "gauge",
                "Replicas registered in the cluster (live leases), as last seen",
                report.replicas.len().to_string(),
            ),
            (
                "lbwasm_cluster_resyncs_total",
                "counter",
                "Full re-reads of the cluster store after the watch could not go on (etcd restarted, compacted, replaced)",
                self.resyncs.load(Ordering::Relaxed).to_string(),
            ),
            (
                "lbwasm_cluster_conflicts_total",
                "counter",
                "Admin writes refused because another replica changed the same keys first (409)",
                self.conflicts.load(Ordering::Relaxed).to_string(),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}"
            );
        }
    }
}

/// The configuration revision a mirror is at.
fn changed_revision(m: &Mirror) -> i64 {
    m.entries.get(CHANGED).map_or(0, |e| e.mod_revision)
}

/// The cluster as `GET /backends` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    /// The cluster's name.
    pub name: String,
    /// This replica's name.
    pub replica: String,
    /// Connected to etcd now.
    pub connected: bool,
    /// The configuration revision applied here.
    pub applied_revision: i64,
    /// Every live replica (this one included) as it reports itself.
    pub replicas: Vec<ReplicaReport>,
}

/// A replica as its own key says.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaReport {
    /// Its name.
    pub replica: String,
    /// Its admin endpoint.
    pub admin: Option<String>,
    /// The configuration revision it has applied.
    pub applied_revision: i64,
    /// It has applied the latest configuration this replica knows of.
    pub up_to_date: bool,
}

/// The sync loop: sessions one after the other, for the life of the control plane.
pub(crate) async fn run(control: Arc<Control>, cluster: Arc<Cluster>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let began = Instant::now();
        let Err(e) = session(&control, &cluster).await;
        let was_connected = cluster.connected.load(Ordering::Relaxed);
        cluster.set_down(&e.0);
        if was_connected {
            tracing::warn!(cluster = %cluster.config.name, error = %e, "cluster store session ended: serving the last applied configuration, reconnecting");
        } else {
            tracing::debug!(cluster = %cluster.config.name, error = %e, "cluster store still unavailable");
        }
        if began.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection's life: resync, register, follow the watch. Returns only on failure.
async fn session(
    control: &Control,
    cluster: &Cluster,
) -> Result<std::convert::Infallible, StoreError> {
    let mut store = Store::connect(&cluster.config).await?;
    let mut mirror = store.load().await?;
    let last = cluster.mirror();
    if cluster.sessions.fetch_add(1, Ordering::Relaxed) > 0 {
        cluster.resyncs.fetch_add(1, Ordering::Relaxed);
    }
    if last.revision > 0 {
        let replaced = last.cluster_id != 0 && mirror.cluster_id != last.cluster_id;
        if replaced || mirror.revision < last.revision {
            tracing::warn!(cluster = %cluster.config.name, applied = last.revision, store = mirror.revision, replaced, "the cluster store was replaced or wiped: resyncing (an empty store gets this replica's last applied configuration)");
        }
    }
    if cluster.seed(control, &mut store, &mirror).await? {
        mirror = store.load().await?;
    }
    cluster.apply(control, mirror.clone()).await;
    let ttl = cluster.config.lease_ttl;
    let (mut lease, mut keeper, mut beats) = store.lease(ttl).await?;
    let me = keys::replica(&cluster.config.replica);
    store
        .put_leased(&me, replica_value(control, cluster), lease)
        .await?;
    let (_watcher, mut stream) = store.watch(mirror.revision + 1).await?;
    *lock(&cluster.store) = Some(store.clone());
    cluster.connected.store(true, Ordering::Relaxed);
    tracing::info!(cluster = %cluster.config.name, replica = %cluster.config.replica, revision = mirror.revision, "cluster store connected: configuration applied, watching");
    let mut reported = cluster.config_revision.load(Ordering::Relaxed);
    let mut last_beat = Instant::now();
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = msg?.ok_or_else(|| StoreError("the watch stream ended".into()))?;
                if store.apply(&mut mirror, &resp)? {
                    cluster.apply(control, mirror.clone()).await;
                } else {
                    // Replicas' keys only (or a progress report): nothing to apply or save.
                    *lock(&cluster.mirror) = Arc::new(mirror.clone());
                    cluster.applied.send_replace(mirror.revision);
                }
                let now = cluster.config_revision.load(Ordering::Relaxed);
                if now != reported {
                    store.put_leased(&me, replica_value(control, cluster), lease).await?;
                    reported = now;
                }
            }
            _ = tick.tick() => {
                if last_beat.elapsed() > ttl {
                    return Err(StoreError(format!("etcd answered no lease keep-alive for {:?}", last_beat.elapsed())));
                }
                keeper.keep_alive().await?;
            }
            beat = beats.message() => {
                let beat = beat?.ok_or_else(|| StoreError("the lease stream ended".into()))?;
                last_beat = Instant::now();
                if beat.ttl() <= 0 {
                    // Expired while this replica was stopped or cut off: register again.
                    tracing::warn!(cluster = %cluster.config.name, "the replica's lease had expired: registering again");
                    (lease, keeper, beats) = store.lease(ttl).await?;
                    store.put_leased(&me, replica_value(control, cluster), lease).await?;
                }
            }
        }
    }
}

/// This replica's key's value, with the plugins it runs.
fn replica_value(control: &Control, cluster: &Cluster) -> Vec<u8> {
    let mut info = cluster.info();
    let applied = lock(&cluster.plugins).clone();
    info.plugins = control
        .listeners
        .iter()
        .zip(applied)
        .map(|(l, p)| {
            (
                l.name.clone(),
                p.map_or_else(|| l.plugin.load().name().to_owned(), |p| p.plugin),
            )
        })
        .collect::<BTreeMap<_, _>>();
    state::json(&info)
}

/// Leaves the cluster on shutdown: the replica's key goes at once (not after the TTL).
pub(crate) async fn leave(cluster: &Cluster) {
    let Some(mut store) = lock(&cluster.store).clone() else {
        return;
    };
    let key = keys::replica(&cluster.config.replica);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        store.commit(&[], vec![Write::Delete(key)]),
    )
    .await;
}

/// The admin calls in cluster mode: each a transaction, applied by the watch.
impl Control {
    fn entry_spec(mirror: &Mirror, key: &str) -> Option<(BackendSpec, i64)> {
        let e = mirror.entries.get(key)?;
        serde_json::from_slice(&e.value)
            .ok()
            .map(|s| (s, e.mod_revision))
    }

    /// `POST /backends/add` of static addresses.
    pub(super) async fn cluster_add(
        &self,
        cluster: &Cluster,
        l: &Arc<ListenerShared>,
        addrs: Vec<SocketAddr>,
        weight: u32,
        max_connections: u32,
    ) -> Result<AddReport, ControlError> {
        cluster.store()?;
        let mirror = cluster.mirror();
        let (mut expect, mut writes) = (Vec::new(), Vec::new());
        let (mut undrained, mut unchanged, mut wanted) = (HashSet::new(), Vec::new(), Vec::new());
        for addr in addrs {
            let key = keys::backend(&l.name, addr);
            match Self::entry_spec(&mirror, &key) {
                None => {
                    let spec = BackendSpec {
                        weight,
                        max_connections,
                        draining: false,
                        zone: None,
                        labels: Default::default(),
                    };
                    expect.push((key.clone(), Expect::Absent));
                    writes.push(Write::Put(key, state::json(&spec)));
                    wanted.push(addr);
                }
                Some((mut spec, rev)) if spec.draining => {
                    spec.draining = false;
                    expect.push((key.clone(), Expect::At(rev)));
                    writes.push(Write::Put(key, state::json(&spec)));
                    undrained.insert(addr);
                    wanted.push(addr);
                }
                Some(_) => unchanged.push(addr.to_string()),
            }
        }
        if !writes.is_empty() {
            cluster.write(expect, writes, "add").await?;
        }
        let added = wanted
            .into_iter()
            .filter_map(|addr| l.pool.find(addr))
            .map(|b| AddedBackend {
                id: b.id,
                address: b.address().to_string(),
                undrained: undrained.contains(&b.addr),
            })
            .collect();
        Ok(AddReport::Static(Added {
            listener: l.name.clone(),
            added,
            already_members: unchanged,
        }))
    }

    /// The cluster keys of `chosen` with their revisions; a backend the cluster does not
    /// own (DNS, managed) cannot be changed through it.
    fn owned_keys(
        cluster: &Cluster,
        l: &ListenerShared,
        chosen: &[Arc<Backend>],
    ) -> Result<Vec<(String, BackendSpec, i64)>, ControlError> {
        let mirror = cluster.mirror();
        chosen
            .iter()
            .map(|b| {
                let key = keys::backend(&l.name, b.addr);
                let (spec, rev) = Self::entry_spec(&mirror, &key).ok_or_else(|| {
                    ControlError::BadRequest(format!(
                        "backend {} of {:?} is not one of the cluster's (it comes from DNS discovery or a managed pool): change it where it comes from",
                        b.addr, l.name
                    ))
                })?;
                Ok((key, spec, rev))
            })
            .collect()
    }

    /// `POST /backends/remove`.
    pub(super) async fn cluster_remove(
        &self,
        cluster: &Cluster,
        l: &Arc<ListenerShared>,
        chosen: Vec<Arc<Backend>>,
    ) -> Result<Removed, ControlError> {
        cluster.store()?;
        let keyed = Self::owned_keys(cluster, l, &chosen)?;
        let expect = keyed
            .iter()
            .map(|(k, _, rev)| (k.clone(), Expect::At(*rev)))
            .collect();
        let writes = keyed
            .into_iter()
            .map(|(k, _, _)| Write::Delete(k))
            .collect();
        cluster.write(expect, writes, "remove").await?;
        Ok(Removed {
            listener: l.name.clone(),
            removed: chosen.iter().map(|b| Leaving::new(b)).collect(),
            stopped_processes: Vec::new(),
        })
    }

    /// `POST /backends/drain`.
    pub(super) async fn cluster_drain(
        &self,
        cluster: &Cluster,
        l: &Arc<ListenerShared>,
        chosen: Vec<Arc<Backend>>,
    ) -> Result<Draining, ControlError> {
        cluster.store()?;
        let keyed = Self::owned_keys(cluster, l, &chosen)?;
        let mut expect = Vec::new();
        let mut writes = Vec::new();
        for (k, mut spec, rev) in keyed {
            spec.draining = true;
            expect.push((k.clone(), Expect::At(rev)));
            writes.push(Write::Put(k, state::json(&spec)));
        }
        cluster.write(expect, writes, "drain").await?;
        Ok(Draining {
            listener: l.name.clone(),
            draining: chosen.iter().map(|b| Leaving::new(b)).collect(),
        })
    }

    /// `POST /plugin` (and uploads): `plugin` was loaded from `source` and validated here;
    /// the store gets its name or its bytes. Returns the plugin it replaced, by label.
    pub(super) async fn cluster_plugin(
        &self,
        cluster: &Cluster,
        l: &Arc<ListenerShared>,
        source: &PluginSource,
        options: &[(String, String)],
        plugin: Arc<Plugin>,
    ) -> Result<String, ControlError> {
        let mut store = cluster.store()?;
        let mirror = cluster.mirror();
        let spec = match source {
            PluginSource::Builtin(name) => PluginSpec {
                plugin: name.clone(),
                name: None,
                options: options.iter().cloned().collect(),
            },
            PluginSource::File(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| ControlError::Rejected(format!("{}: {e}", path.display())))?;
                let digest = state::digest_of(&bytes);
                store
                    .put_blob(&mirror, &digest, &bytes)
                    .await
                    .map_err(|e| cluster.unavailable(e))?;
                PluginSpec {
                    plugin: digest,
                    name: path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    options: options.iter().cloned().collect(),
                }
            }
        };
        let key = keys::plugin(&l.name);
        let (expect, previous) = match mirror.entries.get(&key) {
            Some(e) => (
                Expect::At(e.mod_revision),
                serde_json::from_slice::<PluginSpec>(&e.value)
                    .map_or_else(|_| "?".into(), |p| p.label()),
            ),
            None => (Expect::Absent, l.plugin.load().name().to_owned()),
        };
        lock(&cluster.preloaded).insert(spec.clone(), plugin);
        let result = cluster
            .write(
                vec![(key, expect)],
                vec![Write::Put(keys::plugin(&l.name), state::json(&spec))],
                "plugin swap",
            )
            .await;
        lock(&cluster.preloaded).remove(&spec);
        result.map(|()| previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Entry;

    /// A component file planted (or damaged) under the digest's name is written again
    /// from the store, never loaded.
    #[test]
    fn a_component_file_is_used_only_with_its_digest() {
        let dir = std::env::temp_dir().join(format!("lbwasm-blob-test-{}", std::process::id()));
        let bytes = b"\0asm component bytes".to_vec();
        let digest = state::digest_of(&bytes);
        let mut mirror = Mirror::default();
        mirror.entries.insert(
            keys::blob_chunk(&digest, 0),
            Entry {
                value: bytes.clone(),
                mod_revision: 1,
            },
        );
        let spec = PluginSpec {
            plugin: digest.clone(),
            name: None,
            options: Default::default(),
        };
        let Ok(PluginSource::File(path)) = source_of(&spec, &mirror, &dir) else {
            panic!("no file");
        };
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        std::fs::write(&path, b"planted").unwrap();
        source_of(&spec, &mirror, &dir).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "rewritten from the store"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
