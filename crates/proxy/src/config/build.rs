//! The file types, with the flags laid over them, → a validated [`Config`]: required keys,
//! defaults, and the checks between values (colliding sockets, duplicate backends and
//! names, a TCP listener with an HTTP health check). Each value was already checked on its
//! own as it was read (`leaf.rs`).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use super::cluster::FileCluster;
use super::discovery::{BackendTarget, DiscoveryConfig, DnsSource};
use super::file::{
    CheckType, FileAdmin, FileBackend, FileBackendTls, FileCert, FileConfig, FileDiscovery,
    FileHealth, FileListener, FileLoadReport, FileManaged, FilePassive, FileRetry, FileTimeouts,
    FileTls, PluginOptions,
};
use super::leaf::{Leaf, NonEmpty, Raw};
use super::value::{At, Origin, Table};
use super::{
    AccessLogTarget, AdminConfig, BackendConfig, BackendProtocol, ClusterConfig, Config,
    ConfigError, HashKey, HealthCheck, HealthKind, ListenerConfig, LoadReport, Managed, Passive,
    PluginRef, Protocol, Retry, Source, Timeouts,
};
use crate::tls::{self, BackendTls, CertSpec, ListenerTls, Part};

pub(super) fn config(file: &FileConfig, src: &Source<'_>) -> Result<Config, ConfigError> {
    let root = Scope {
        src,
        path: String::new(),
        at: Origin::default(),
    };
    let mut sockets = Sockets::default();
    let admin = root.sub("admin", &file.admin, |s, a| admin(s, a, &mut sockets))?;

    let at = file.listener.as_ref().map_or(&root.at, |list| &list.at);
    let list = (file.listener.as_ref())
        .filter(|list| !list.items.is_empty())
        .ok_or_else(|| root.error("listener", at, "at least one [[listener]] is required"))?;
    let mut names = Vec::new();
    let mut listeners = Vec::with_capacity(list.items.len());
    for (i, table) in list.items.iter().enumerate() {
        let s = root.table(&format!("listener[{i}]"), table);
        listeners.push(listener(&s, &table.value, i, &mut sockets, &mut names)?);
    }
    for (i, table) in list.items.iter().enumerate() {
        if listeners[i].server_names.is_empty() || !group_leader(&listeners, i) {
            continue;
        }
        let s = root.table(&format!("listener[{i}]"), table);
        sni_group(&s, &table.value, &listeners, i, &mut sockets)?;
    }

    let discovery = root
        .sub("discovery", &file.discovery, discovery)?
        .unwrap_or_default();
    let cluster = root.sub("cluster", &file.cluster, cluster)?;
    let workers = match value_or(&file.workers, 0) {
        0 => auto_workers(std::thread::available_parallelism().map_or(1, NonZeroUsize::get)),
        n => usize::from(n),
    };
    Ok(Config {
        workers,
        admin,
        listeners,
        source: src.file.map(Path::to_path_buf),
        discovery,
        cluster,
    })
}

/// `[cluster]` alone (file and flags), for commands that need no listener.
pub(super) fn cluster_only(
    file: &FileConfig,
    src: &Source<'_>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let root = Scope {
        src,
        path: String::new(),
        at: Origin::default(),
    };
    root.sub("cluster", &file.cluster, cluster)
}

/// `[cluster]`: a name and at least one endpoint; TLS files must come as a pair.
fn cluster(s: &Scope<'_>, c: &FileCluster) -> Result<ClusterConfig, ConfigError> {
    let name = s.require("name", &c.name)?.value.clone();
    let endpoints: Vec<String> = c.etcd.as_ref().map_or_else(Vec::new, |list| {
        list.items.iter().map(|e| e.value.clone()).collect()
    });
    if endpoints.is_empty() {
        return Err(s.whole(
            "missing required key `etcd` (the etcd endpoints, e.g. [\"http://127.0.0.1:2379\"], or --etcd)",
        ));
    }
    let replica = c
        .replica
        .as_ref()
        .map_or_else(ClusterConfig::default_replica, |r| r.value.clone());
    let state_file = c.state_file.as_ref().map_or_else(
        || ClusterConfig::default_state_file(&name, &replica),
        |f| f.value.clone().into(),
    );
    let password = c
        .password
        .as_ref()
        .map(|p| p.value.clone())
        .or_else(|| std::env::var(super::ETCD_PASSWORD_ENV).ok());
    let user = match (&c.username, password) {
        (Some(u), Some(p)) => Some((u.value.clone(), p)),
        (Some(u), None) => {
            return Err(s.error(
                "username",
                &u.at,
                format!(
                    "needs a password (`password` or {})",
                    super::ETCD_PASSWORD_ENV
                ),
            ));
        }
        (None, _) => None,
    };
    // TLS files relative to the configuration file, and readable now: a typo is an error
    // here, not a store that never answers.
    let file = |key: &str, f: &At<NonEmpty>| -> Result<std::path::PathBuf, ConfigError> {
        let path = s.src.resolve(&f.at, Path::new(&f.value));
        std::fs::metadata(&path)
            .map_err(|e| s.error(key, &f.at, format!("cannot read {}: {e}", path.display())))?;
        Ok(path)
    };
    let ca = c.ca.as_ref().map(|f| file("ca", f)).transpose()?;
    let identity = match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => Some((file("cert", cert)?, file("key", key)?)),
        (None, None) => None,
        (Some(f), None) | (None, Some(f)) => {
            return Err(s.error(
                if c.cert.is_some() { "cert" } else { "key" },
                &f.at,
                "`cert` and `key` (etcd client certificate) go together",
            ));
        }
    };
    Ok(ClusterConfig {
        name,
        endpoints,
        replica,
        state_file,
        lease_ttl: c
            .lease_ttl
            .as_ref()
            .map_or(Duration::from_secs(5), |t| t.value),
        user,
        ca,
        identity,
    })
}

/// `[discovery]`: the TTL floor may not exceed the ceiling.
fn discovery(s: &Scope<'_>, d: &FileDiscovery) -> Result<DiscoveryConfig, ConfigError> {
    let defaults = DiscoveryConfig::default();
    let config = DiscoveryConfig {
        resolver: d.resolver.as_ref().map(|r| r.value),
        min_ttl: value_or(&d.min_ttl, defaults.min_ttl),
        max_ttl: value_or(&d.max_ttl, defaults.max_ttl),
        timeout: value_or(&d.timeout, defaults.timeout),
    };
    if let Some(resolver) = &d.resolver
        && (resolver.value.port() == 0 || resolver.value.ip().is_unspecified())
    {
        return Err(s.error(
            "resolver",
            &resolver.at,
            format!("expected a DNS server's IP:PORT, got {}", resolver.value),
        ));
    }
    if config.min_ttl > config.max_ttl {
        let (key, at) = match (&d.max_ttl, &d.min_ttl) {
            (Some(max), _) => ("max_ttl", &max.at),
            (None, Some(min)) => ("min_ttl", &min.at),
            (None, None) => ("max_ttl", &s.at),
        };
        return Err(s.error(
            key,
            at,
            format!(
                "max_ttl ({:?}) is below min_ttl ({:?})",
                config.max_ttl, config.min_ttl
            ),
        ));
    }
    Ok(config)
}

/// `workers = 0`: one worker per CPU this process may use, less one, and at least one.
/// The CPU a proxied request costs is mostly the kernel's (TCP, loopback or NIC softirq,
/// wake-ups), and on the same CPUs run the control thread, and often clients or backends: a
/// worker on every CPU contends with all of that and is preempted mid-request (on 2 CPUs
/// shared with wrk and the backends, 2 workers served 5-15% fewer requests than 1, with
/// 1.5-2x the p99). A box that runs nothing else sets `workers` to its CPU count.
pub(super) fn auto_workers(cpus: usize) -> usize {
    cpus.saturating_sub(1).max(1)
}

/// The value of an optional key, or its default.
fn value_or<K: Leaf>(field: &Option<At<K>>, default: K::Value) -> K::Value
where
    K::Value: Clone,
{
    field.as_ref().map_or(default, |f| f.value.clone())
}

/// A table being converted: its key path and where it is, for errors.
struct Scope<'a> {
    src: &'a Source<'a>,
    /// Key path, e.g. `listener[0].health`; empty for the root.
    path: String,
    /// The table's header (or the flag that created it).
    at: Origin,
}

impl<'a> Scope<'a> {
    /// The path of `key` in this table.
    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The sub-table `key`.
    fn table<T>(&self, key: &str, table: &Table<T>) -> Scope<'a> {
        Scope {
            src: self.src,
            path: self.key(key),
            at: table.at.clone(),
        }
    }

    /// An error about the value of `key`, at `at`.
    fn error(&self, key: &str, at: &Origin, message: impl Into<String>) -> ConfigError {
        self.src.error(at, &self.key(key), message)
    }

    /// Errors about the value of `key` at `at`, from their message.
    fn blame<'s>(&'s self, key: &'s str, at: &'s Origin) -> impl Fn(String) -> ConfigError + 's {
        move |message| self.error(key, at, message)
    }

    /// An error about the whole table, pointing at its header.
    fn whole(&self, message: impl Into<String>) -> ConfigError {
        self.src.error(&self.at, &self.path, message)
    }

    /// Where the value of `key` is, for messages about another one.
    fn place(&self, key: &str, at: &Origin) -> String {
        self.src.place(at, &self.key(key))
    }

    /// The sub-table `key` converted by `convert`, if given.
    fn sub<T, U>(
        &self,
        key: &str,
        table: &Option<Table<T>>,
        convert: impl FnOnce(&Scope<'a>, &T) -> Result<U, ConfigError>,
    ) -> Result<Option<U>, ConfigError> {
        table
            .as_ref()
            .map(|t| convert(&self.table(key, t), &t.value))
            .transpose()
    }

    /// Refuses the value of `key` with `message` when `bad` holds for it.
    fn refuse<K: Leaf>(
        &self,
        key: &str,
        field: &Option<At<K>>,
        bad: impl FnOnce(&K::Value) -> bool,
        message: &str,
    ) -> Result<(), ConfigError> {
        match field {
            Some(f) if bad(&f.value) => Err(self.error(key, &f.at, message)),
            _ => Ok(()),
        }
    }

    /// The value of `key`, which must be given.
    fn require<'f, T>(&self, key: &str, field: &'f Option<T>) -> Result<&'f T, ConfigError> {
        field
            .as_ref()
            .ok_or_else(|| self.whole(format!("missing required key `{key}`")))
    }
}

/// Sockets this process (or its managed pools) will bind, with where each was configured:
/// a collision is refused here, with both places, rather than by `bind()` at start-up.
#[derive(Default)]
struct Sockets(Vec<(SocketAddr, String)>);

impl Sockets {
    /// Records `addr`; on a collision returns the place of the earlier claim instead.
    fn claim(&mut self, addr: SocketAddr, place: String) -> Result<(), String> {
        if addr.port() != 0
            && let Some((_, other)) = self.0.iter().find(|(a, _)| collide(*a, addr))
        {
            return Err(other.clone());
        }
        self.0.push((addr, place));
        Ok(())
    }

    /// Claims the socket `key` of `s` gives, refusing a collision with the earlier claim.
    fn claim_key(
        &mut self,
        s: &Scope<'_>,
        key: &str,
        addr: &At<SocketAddr>,
    ) -> Result<(), ConfigError> {
        let (blame, value) = (s.blame(key, &addr.at), addr.value);
        (self.claim(value, s.place(key, &addr.at)))
            .map_err(|other| blame(format!("{value} is already used by {other}")))
    }
}

/// Whether binding both would fail (or, for a backend, reach the same socket): same port,
/// and the same IP or a wildcard of the same family.
fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

fn admin(s: &Scope<'_>, a: &FileAdmin, sockets: &mut Sockets) -> Result<AdminConfig, ConfigError> {
    let listen = s.require("listen", &a.listen)?;
    let token = a.token.as_ref().map(|t| t.value.clone());
    let allow_remote = value_or(&a.allow_remote, false);
    let blame = s.blame("listen", &listen.at);
    if !listen.value.ip().is_loopback() && !allow_remote {
        return Err(blame(format!(
            "{} is not a loopback address; the admin endpoint can change the pool, so it \
             listens on 127.0.0.1 or [::1] unless allow_remote = true",
            listen.value
        )));
    }
    if !listen.value.ip().is_loopback() && token.is_none() {
        return Err(blame(
            "a remotely reachable admin endpoint needs a token (admin.token, --admin-token or \
             LBWASM_ADMIN_TOKEN)"
                .into(),
        ));
    }
    let tls = s.sub("tls", &a.tls, listener_tls)?;
    if !listen.value.ip().is_loopback() && tls.is_none() {
        return Err(blame(
            "a remotely reachable admin endpoint needs TLS ([admin.tls] cert and key): its \
             token and the pool's state would otherwise cross the network in cleartext"
                .into(),
        ));
    }
    sockets.claim_key(s, "listen", listen)?;
    let hosts = a.hosts.as_ref().map_or_else(Vec::new, |list| {
        list.items.iter().map(|h| h.value.clone()).collect()
    });
    Ok(AdminConfig {
        listen: listen.value,
        token,
        allow_remote,
        hosts,
        tls,
    })
}

/// Whether listener `i` is the first of those sharing its address (SNI routing).
fn group_leader(listeners: &[ListenerConfig], i: usize) -> bool {
    !listeners[..i]
        .iter()
        .any(|o| o.listen == listeners[i].listen && !o.server_names.is_empty())
}

/// Checks the listeners routed by SNI on listener `i`'s address (it is the group's first
/// with `server_names`): all tcp, at most one without names; claims the address once.
fn sni_group(
    s: &Scope<'_>,
    l: &FileListener,
    listeners: &[ListenerConfig],
    i: usize,
    sockets: &mut Sockets,
) -> Result<(), ConfigError> {
    let me = &listeners[i];
    let group: Vec<&ListenerConfig> = listeners.iter().filter(|o| o.listen == me.listen).collect();
    let listen = s.require("listen", &l.listen)?;
    if let Some(other) = group.iter().find(|o| o.protocol != Protocol::Tcp) {
        return Err(s.error(
            "listen",
            &listen.at,
            format!(
                "{} is shared by listener {:?}, which is not a tcp listener: SNI routing                  (server_names) shares an address among tcp listeners only",
                me.listen, other.name
            ),
        ));
    }
    let catch_all: Vec<&str> = group
        .iter()
        .filter(|o| o.server_names.is_empty())
        .map(|o| o.name.as_str())
        .collect();
    if catch_all.len() > 1 {
        return Err(s.error(
            "listen",
            &listen.at,
            format!(
                "listeners {catch_all:?} share {} without server_names: at most one may take                  the names no other listener routes",
                me.listen
            ),
        ));
    }
    if catch_all.is_empty() {
        sockets.claim_key(s, "listen", listen)?;
    }
    Ok(())
}

fn listener(
    s: &Scope<'_>,
    l: &FileListener,
    index: usize,
    sockets: &mut Sockets,
    names: &mut Vec<(String, String)>,
) -> Result<ListenerConfig, ConfigError> {
    let listen = s.require("listen", &l.listen)?;
    if l.server_names.is_none() {
        sockets.claim_key(s, "listen", listen)?;
    }

    let name = value_or(&l.name, format!("listener{index}"));
    if let Some((_, other)) = names.iter().find(|(n, _)| *n == name) {
        let message = format!("the name {name:?} is already used by {other}");
        return Err(match &l.name {
            Some(f) => s.error("name", &f.at, message),
            None => s.whole(message),
        });
    }
    let name_place = match &l.name {
        Some(f) => s.place("name", &f.at),
        None => s.src.place(&s.at, &s.path),
    };
    names.push((name.clone(), name_place));

    let protocol = value_or(&l.protocol, Protocol::Http);
    let tcp = protocol == Protocol::Tcp;
    let plugin = plugin_ref(s, s.require("plugin", &l.plugin)?)?;
    let plugin_options = s.sub("plugin_options", &l.plugin_options, plugin_options)?;
    s.refuse(
        "hash_key",
        &l.hash_key,
        |key| tcp && !matches!(key, HashKey::ClientIp | HashKey::Sni),
        "a tcp listener has no headers, cookies or paths; it can hash on \"client-ip\" or \"sni\"",
    )?;
    s.refuse(
        "hash_key",
        &l.hash_key,
        |key| !tcp && *key == HashKey::Sni,
        "an http listener hashes on the name the client asked for with \"header:host\"; \
         \"sni\" is for tcp listeners",
    )?;
    s.refuse(
        "proxy_protocol",
        &l.proxy_protocol,
        |_| !tcp,
        "only a tcp listener sends the PROXY protocol; an http listener tells backends the \
         client's address in X-Forwarded-For",
    )?;
    s.refuse(
        "backend_protocol",
        &l.backend_protocol,
        |p| tcp && *p != BackendProtocol::Http1,
        "a tcp listener relays bytes; backend_protocol is for http listeners",
    )?;
    s.refuse(
        "via",
        &l.via,
        |on| *on && tcp,
        "only an http listener adds Via; a tcp listener relays bytes untouched",
    )?;
    let access_log = l.access_log.as_ref().map(|f| match &f.value {
        AccessLogTarget::File(path) => AccessLogTarget::File(s.src.resolve(&f.at, path)),
        AccessLogTarget::Stdout => AccessLogTarget::Stdout,
    });
    let timeouts = s.sub("timeouts", &l.timeouts, |_, t| Ok(timeouts(t)))?;
    let retry = s.sub("retry", &l.retry, |_, r| Ok(retry(r)))?;
    let backend_protocol = value_or(&l.backend_protocol, BackendProtocol::Http1);
    let health = s.sub("health", &l.health, |h, t| {
        health(h, t, protocol, backend_protocol)
    })?;
    let passive = s.sub("passive", &l.passive, passive)?;
    let load_report = s.sub("load_report", &l.load_report, |r, t| load_report(r, t, tcp))?;

    let (mut backends, mut listed, mut discovery) = (Vec::new(), Vec::new(), Vec::new());
    for (i, b) in l
        .backend
        .iter()
        .flat_map(|list| list.items.iter().enumerate())
    {
        let scope = s.table(&format!("backend[{i}]"), b);
        match backend(&scope, &b.value, listen.value, &mut listed)? {
            Member::Static(b) => backends.push(b),
            Member::Dns(d) if discovery.iter().any(|o: &DnsSource| o.query == d.query) => {
                return Err(scope.whole(format!("{} is listed twice", d.query)));
            }
            Member::Dns(d) => discovery.push(d),
        }
    }
    let managed = s.sub("managed", &l.managed, |m, t| {
        managed(m, t, &listed, sockets)
    })?;
    let tls = s.sub("tls", &l.tls, listener_tls)?;
    let mut backend_tls = s.sub("backend_tls", &l.backend_tls, backend_tls)?;
    if backend_protocol == BackendProtocol::H2 && backend_tls.is_none() {
        backend_tls = Some(BackendTls::default());
    }
    let server_names = match &l.server_names {
        None => Vec::new(),
        Some(list) => {
            let at = &list.at;
            if !tcp {
                return Err(s.error(
                    "server_names",
                    at,
                    "server_names routes TLS pass-through on tcp listeners; an http listener \
                     with [listener.tls] picks its certificate by SNI ([[listener.tls.certificate]] names)",
                ));
            }
            if tls.is_some() {
                return Err(s.error(
                    "server_names",
                    at,
                    "server_names passes TLS through untouched, [listener.tls] terminates it: \
                     a listener does one or the other",
                ));
            }
            if list.items.is_empty() {
                return Err(s.error("server_names", at, "expected at least one server name"));
            }
            list.items.iter().map(|n| n.value.clone()).collect()
        }
    };
    if backends.is_empty() && managed.is_none() && discovery.is_empty() {
        return Err(
            s.whole("no backends: add [[listener.backend]] entries or a [listener.managed] pool")
        );
    }

    Ok(ListenerConfig {
        name,
        listen: listen.value,
        protocol,
        backend_protocol,
        plugin,
        plugin_options: plugin_options.unwrap_or_default(),
        hash_key: l.hash_key.as_ref().map(|f| f.value.clone()),
        access_log,
        proxy_protocol: l.proxy_protocol.as_ref().map(|f| f.value),
        via: value_or(&l.via, false),
        timeouts: timeouts.unwrap_or_default(),
        retry: retry.unwrap_or_default(),
        health,
        passive: passive.unwrap_or_default(),
        // No [listener.load_report]: as an empty one.
        load_report: load_report.unwrap_or_else(|| (!tcp).then(LoadReport::default)),
        backends,
        discovery,
        managed,
        tls,
        backend_tls,
        server_names,
    })
}

/// `[listener.tls]`: every certificate is read and checked now, so that a missing file, a
/// key that does not match or a name the certificate does not cover is refused at start
/// (and by a reload) naming its key.
fn listener_tls(s: &Scope<'_>, t: &FileTls) -> Result<ListenerTls, ConfigError> {
    let provider = tls::provider();
    let mut certs = Vec::new();
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let spec = CertSpec {
                cert: s.src.resolve(&cert.at, cert.value.as_ref()),
                key: s.src.resolve(&key.at, key.value.as_ref()),
                names: Vec::new(),
            };
            check_cert(s, &spec, cert, key, None, &provider)?;
            certs.push(spec);
        }
        (Some(_), None) => {
            return Err(s.whole("missing required key `key` (the certificate's private key)"));
        }
        (None, Some(_)) => {
            return Err(s.whole("missing required key `cert` (the certificate the key is for)"));
        }
        (None, None) => {}
    }
    for (i, c) in t
        .certificate
        .iter()
        .flat_map(|list| list.items.iter().enumerate())
    {
        let scope = s.table(&format!("certificate[{i}]"), c);
        certs.push(certificate(&scope, &c.value, &provider)?);
    }
    if certs.is_empty() {
        return Err(s.whole(
            "no certificate: set cert and key, or add [[listener.tls.certificate]] entries",
        ));
    }
    Ok(ListenerTls {
        certs,
        min_version: value_or(&t.min_version, tls::TlsVersion::V12),
        default_for_unknown: value_or(&t.unknown_name, true),
        session_tickets: value_or(&t.session_tickets, true),
        check_interval: value_or(&t.check_interval, Duration::from_secs(5)),
    })
}

/// One `[[listener.tls.certificate]]`.
fn certificate(
    s: &Scope<'_>,
    c: &FileCert,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertSpec, ConfigError> {
    let cert = s.require("cert", &c.cert)?;
    let key = s.require("key", &c.key)?;
    let spec = CertSpec {
        cert: s.src.resolve(&cert.at, cert.value.as_ref()),
        key: s.src.resolve(&key.at, key.value.as_ref()),
        names: c.names.as_ref().map_or_else(Vec::new, |l| {
            l.items.iter().map(|n| n.value.clone()).collect()
        }),
    };
    let names_at = c.names.as_ref().map(|l| &l.at);
    check_cert(s, &spec, cert, key, names_at, provider)?;
    Ok(spec)
}

/// Loads `spec` as the server will, blaming the key whose file (or names) is wrong.
fn check_cert(
    s: &Scope<'_>,
    spec: &CertSpec,
    cert: &At<NonEmpty>,
    key: &At<NonEmpty>,
    names: Option<&Origin>,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(), ConfigError> {
    match tls::certs::load(spec, provider) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.part {
            Part::Cert => s.error("cert", &cert.at, e.message),
            Part::Key => s.error("key", &key.at, e.message),
            Part::Names => s.error("names", names.unwrap_or(&cert.at), e.message),
        }),
    }
}

/// `[listener.backend_tls]`: the files are read when the server starts (its error names
/// the listener); here, what must go together.
fn backend_tls(s: &Scope<'_>, t: &FileBackendTls) -> Result<BackendTls, ConfigError> {
    let path = |f: &At<NonEmpty>| s.src.resolve(&f.at, f.value.as_ref());
    let client_cert = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => Some((path(c), path(k))),
        (None, None) => None,
        (Some(_), None) => {
            return Err(
                s.whole("missing required key `key` (the client certificate's private key)")
            );
        }
        (None, Some(_)) => {
            return Err(
                s.whole("missing required key `cert` (the client certificate the key is for)")
            );
        }
    };
    if let Some(ca) = &t.ca
        && let Err(e) = tls::certs::read_chain(&path(ca))
    {
        return Err(s.error("ca", &ca.at, e));
    }
    if let Some(name) = &t.server_name
        && rustls_pki_types::ServerName::try_from(name.value.as_str()).is_err()
    {
        return Err(s.error(
            "server_name",
            &name.at,
            "expected a DNS name or an IP address",
        ));
    }
    Ok(BackendTls {
        ca: t.ca.as_ref().map(path),
        server_name: t.server_name.as_ref().map(|n| n.value.clone()),
        client_cert,
        insecure_skip_verify: value_or(&t.insecure_skip_verify, false),
    })
}

/// A `.wasm` name or a path is a file (relative to the config file when it came from one);
/// anything else must be a built-in.
fn plugin_ref(s: &Scope<'_>, f: &At<NonEmpty>) -> Result<PluginRef, ConfigError> {
    let text = f.value.as_str();
    if text.ends_with(".wasm") || text.contains('/') {
        return Ok(PluginRef::File(s.src.resolve(&f.at, Path::new(text))));
    }
    // The list comes from what build.rs embedded: one source of truth for the names.
    if lbwasm_plugin_host::builtin::is_builtin(text) {
        Ok(PluginRef::Builtin(text.to_owned()))
    } else {
        Err(s.error(
            "plugin",
            &f.at,
            format!(
                "unknown built-in plugin {text:?} (expected one of: {}; or a path to a .wasm file)",
                lbwasm_plugin_host::builtin::names()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

/// Options as the plugin's `configure` reads them: numbers and booleans as TOML text,
/// floats as written less `_` separators (`1e3` stays `1e3`, `1_000.5` is `1000.5`).
fn plugin_options(
    s: &Scope<'_>,
    options: &PluginOptions,
) -> Result<Vec<(String, String)>, ConfigError> {
    options
        .0
        .iter()
        .map(|(key, f)| {
            if key.is_empty() {
                return Err(s.error(key, &f.at, "empty option name"));
            }
            let text = match &f.value {
                Raw::Str(text) => text.clone(),
                Raw::Float(x) => s
                    .src
                    .written(&f.at)
                    .map_or_else(|| x.to_string(), |text| text.replace('_', "")),
                other => other.to_string(),
            };
            Ok((key.clone(), text))
        })
        .collect()
}

fn timeouts(t: &FileTimeouts) -> Timeouts {
    let d = Timeouts::default();
    Timeouts {
        connect: value_or(&t.connect, d.connect),
        request: value_or(&t.request, d.request),
        idle: value_or(&t.idle, d.idle),
        plugin: value_or(&t.plugin, d.plugin),
        plugin_budget: value_or(&t.plugin_budget, d.plugin_budget),
    }
}

fn retry(r: &FileRetry) -> Retry {
    let d = Retry::default();
    Retry {
        attempts: value_or(&r.attempts, d.attempts),
        budget_percent: value_or(&r.budget_percent, d.budget_percent),
    }
}

fn health(
    s: &Scope<'_>,
    h: &FileHealth,
    protocol: Protocol,
    backend_protocol: BackendProtocol,
) -> Result<HealthCheck, ConfigError> {
    let grpc = value_or(&h.kind, CheckType::Http) == CheckType::Grpc;
    s.refuse(
        "type",
        &h.kind,
        |_| protocol == Protocol::Tcp,
        "a tcp listener's health check is a TCP connect; remove `type`, or set protocol = \"http\"",
    )?;
    s.refuse(
        "type",
        &h.kind,
        |t| *t == CheckType::Grpc && backend_protocol == BackendProtocol::Http1,
        "gRPC runs over HTTP/2: a grpc check needs backend_protocol = \"h2c\" or \"h2\"",
    )?;
    s.refuse(
        "path",
        &h.path,
        |_| protocol == Protocol::Tcp,
        "a tcp listener's health check is a TCP connect; remove `path`, or set protocol = \"http\"",
    )?;
    s.refuse(
        "path",
        &h.path,
        |_| grpc,
        "a grpc check calls /grpc.health.v1.Health/Check; remove `path` (name the service \
         with grpc_service)",
    )?;
    s.refuse(
        "expect_status",
        &h.expect_status,
        |_| grpc,
        "a grpc check wants grpc-status 0 and SERVING; remove `expect_status`",
    )?;
    s.refuse(
        "expect_status",
        &h.expect_status,
        |_| h.path.is_none(),
        "needs `path`: without a path the check is a TCP connect",
    )?;
    s.refuse(
        "grpc_service",
        &h.grpc_service,
        |_| !grpc,
        "only a grpc check names a service; add type = \"grpc\"",
    )?;
    if let Some(t) = &h.kind
        && t.value == CheckType::Http
        && h.path.is_none()
    {
        return Err(s.error(
            "type",
            &t.at,
            "an http check needs `path` (e.g. path = \"/health\"); without `type` and `path` \
             the check is a TCP connect",
        ));
    }
    let kind = match &h.path {
        _ if grpc => HealthKind::Grpc {
            service: value_or(&h.grpc_service, String::new()),
        },
        Some(path) => HealthKind::Http {
            path: path.value.clone(),
            expect_status: value_or(&h.expect_status, 200),
            http2: matches!(backend_protocol, BackendProtocol::H2c | BackendProtocol::H2),
        },
        None => HealthKind::Tcp,
    };
    let interval = value_or(&h.interval, Duration::from_secs(2));
    let timeout = match &h.timeout {
        Some(f) if f.value > interval => {
            let message = format!(
                "{:?} is longer than the interval ({interval:?}); a check must end before the \
                 next one starts",
                f.value
            );
            return Err(s.error("timeout", &f.at, message));
        }
        Some(f) => f.value,
        None => interval.min(Duration::from_secs(1)),
    };
    Ok(HealthCheck {
        kind,
        interval,
        timeout,
        rise: value_or(&h.rise, 2),
        fall: value_or(&h.fall, 3),
    })
}

fn passive(s: &Scope<'_>, p: &FilePassive) -> Result<Passive, ConfigError> {
    let d = Passive::default();
    let base = value_or(&p.base_ejection, d.base_ejection);
    let max = value_or(&p.max_ejection, d.max_ejection);
    if max < base {
        let message = format!("max_ejection ({max:?}) is shorter than base_ejection ({base:?})");
        return Err(match (&p.max_ejection, &p.base_ejection) {
            (Some(f), _) => s.error("max_ejection", &f.at, message),
            (None, Some(f)) => s.error("base_ejection", &f.at, message),
            (None, None) => s.whole(message),
        });
    }
    Ok(Passive {
        consecutive_failures: value_or(&p.consecutive_failures, d.consecutive_failures),
        base_ejection: base,
        max_ejection: max,
        slow_start: value_or(&p.slow_start, d.slow_start),
    })
}

/// Available to HTTP listeners (a TCP listener's backends speak no HTTP to poll): polled
/// when the plugin asks for load figures, always with `enabled = true`, never with `false`.
fn load_report(
    s: &Scope<'_>,
    r: &FileLoadReport,
    tcp: bool,
) -> Result<Option<LoadReport>, ConfigError> {
    s.refuse(
        "enabled",
        &r.enabled,
        |on| *on && tcp,
        "load reports are polled over HTTP; a tcp listener cannot use them",
    )?;
    let explicit = r.enabled.as_ref().map(|f| f.value);
    let d = LoadReport::default();
    Ok(explicit.unwrap_or(!tcp).then(|| LoadReport {
        path: value_or(&r.path, d.path),
        interval: value_or(&r.interval, d.interval),
        always: explicit == Some(true),
    }))
}

/// What one `[[listener.backend]]` is.
enum Member {
    Static(BackendConfig),
    Dns(DnsSource),
}

/// One `[[listener.backend]]`, which must be neither listed twice nor the listener itself;
/// a DNS one (each of its members) takes `weight` unless SRV records give it.
fn backend(
    s: &Scope<'_>,
    b: &FileBackend,
    listen: SocketAddr,
    listed: &mut Vec<(SocketAddr, String)>,
) -> Result<Member, ConfigError> {
    let address = s.require("address", &b.address)?;
    let blame = s.blame("address", &address.at);
    let addr = match &address.value {
        BackendTarget::Addr(addr) => *addr,
        BackendTarget::Dns(query) => {
            s.refuse(
                "weight",
                &b.weight,
                |_| matches!(query, super::DnsQuery::Srv { .. }),
                "each SRV record gives its target's weight; weight is for dns:// and IP:PORT",
            )?;
            return Ok(Member::Dns(DnsSource {
                query: query.clone(),
                weight: value_or(&b.weight, 1),
                max_connections: value_or(&b.max_connections, 0),
            }));
        }
    };
    if let Some((_, other)) = listed.iter().find(|(a, _)| *a == addr) {
        return Err(blame(format!("{addr} is listed twice (also {other})")));
    }
    if collide(listen, addr) {
        return Err(blame(format!(
            "{addr} is this listener's own address; requests would loop"
        )));
    }
    listed.push((addr, s.place("address", &address.at)));
    Ok(Member::Static(BackendConfig {
        address: addr,
        weight: value_or(&b.weight, 1),
        max_connections: value_or(&b.max_connections, 0),
    }))
}

fn managed(
    s: &Scope<'_>,
    m: &FileManaged,
    listed: &[(SocketAddr, String)],
    sockets: &mut Sockets,
) -> Result<Managed, ConfigError> {
    let list = s.require("command", &m.command)?;
    let blame = s.blame("command", &list.at);
    let command: Vec<String> = list.items.iter().map(|arg| arg.value.clone()).collect();
    if command.first().is_none_or(String::is_empty) {
        const ARGV: &str = "a non-empty argv such as [\"lbwasm\", \"backend\", ...]";
        return Err(blame(Raw::Array.expected(ARGV)));
    }
    if !command.iter().any(|arg| arg.contains("{port}")) {
        return Err(blame(
            "no argument contains \"{port}\": every instance would bind the same port".into(),
        ));
    }
    let count = value_or(&m.count, 1);
    let base = s.require("base_port", &m.base_port)?;
    let (base_port, blame) = (base.value, s.blame("base_port", &base.at));
    if u32::from(base_port) + count - 1 > u32::from(u16::MAX) {
        return Err(blame(format!(
            "{count} instances from port {base_port} go past 65535"
        )));
    }
    let pool = Managed {
        command,
        count,
        base_port,
        restart_backoff: value_or(&m.restart_backoff, Duration::from_secs(1)),
    };
    let place = s.place("base_port", &base.at);
    for addr in pool.addresses() {
        let port = addr.port();
        if let Some((_, other)) = listed.iter().find(|(a, _)| *a == addr) {
            return Err(blame(format!(
                "the managed pool's port {port} is also {other}"
            )));
        }
        (sockets.claim(addr, place.clone())).map_err(|other| {
            blame(format!(
                "the managed pool's port {port} is already used by {other}"
            ))
        })?;
    }
    Ok(pool)
}
