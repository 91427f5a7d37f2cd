//! Configuration of `lbwasm serve`: owns the TOML file format, the `serve` flags, and their
//! validation into one [`Config`].
//!
//! The file is deserialized (`toml`, `serde`) into private types that mirror it, one struct
//! per table (`file.rs`); each value is checked on its own as it is read (`leaf.rs`) and
//! remembers where it stood (`value.rs`). The flags are laid over those types, or over
//! empty ones, each value remembering its flag (`flags.rs`). One conversion then turns them
//! into a [`Config`], with defaults and the checks between values (`build.rs`). So every
//! mistake — TOML syntax, an unknown key, a wrong type, a number out of range, two
//! listeners on one address — is reported the same way, naming the place to fix:
//! `lbwasm.toml:14: listener[0].backend[1].weight: expected an integer >= 1, got 0`, or
//! `--backends: invalid socket address "x:y"`.
//!
//! The file format, every key with its default, is `examples/lbwasm.toml`. In brief:
//!
//! ```toml
//! workers = 0                          # 0 = one per CPU, less one (at least 1)
//! [discovery]                          # optional: resolver, min_ttl, max_ttl, timeout (DNS backends)
//! [admin]                              # optional: listen, token, allow_remote, hosts
//! [[listener]]                         # one or more: name, listen, protocol, backend_protocol, plugin, hash_key
//! [listener.plugin_options]            # key = string | integer | float | boolean
//! [listener.timeouts]                  # connect, request, idle ("2s", "500ms", "1m30s")
//! [listener.retry]                     # attempts, budget_percent
//! [listener.health]                    # optional active checks: type (http|grpc), path (else TCP), grpc_service, ...
//! [listener.passive]                   # consecutive_failures, base/max_ejection, slow_start
//! [listener.load_report]               # enabled (default: when the plugin reads load), path, interval
//! [[listener.backend]]                 # address (IP:PORT, dns://NAME:PORT, dns+srv://_svc._proto.NAME), weight, max_connections
//! [listener.managed]                   # optional spawned pool: command, count, base_port, ...
//! ```
//!
//! Durations are always strings with a unit (`us`, `ms`, `s`, `m`, `h`), never bare numbers.
//! Relative `.wasm` paths in the file are relative to the file's directory.

mod build;
mod cluster;
mod discovery;
mod error;
mod file;
mod flags;
mod leaf;
mod value;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::tls::{BackendTls, CertSpec, ListenerTls, TlsVersion};
pub use cluster::{ClusterConfig, PASSWORD_ENV as ETCD_PASSWORD_ENV};
pub use discovery::{DiscoveryConfig, DnsQuery, DnsSource};
pub use error::ConfigError;
pub use flags::ServeArgs;

use error::Source;

/// Parses and validates a configuration file's text. `file` names the file in errors, and
/// relative `.wasm` plugin paths are resolved against its directory.
pub fn parse_str(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let src = Source::file(file, text);
    build::config(&file::parse(&src)?, &src)
}

/// Everything `lbwasm serve` needs, validated: addresses parse, numbers are in range, no two
/// sockets collide, and every listener has backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Worker threads, each with its own plugin instances. `workers = 0` in the file (the
    /// default) is resolved to the number of CPUs less one, and is always >= 1.
    pub workers: usize,
    /// The admin endpoint (metrics, pool state); none unless configured.
    pub admin: Option<AdminConfig>,
    /// At least one.
    pub listeners: Vec<ListenerConfig>,
    /// The file the configuration came from; none when it came from flags alone.
    pub source: Option<PathBuf>,
    /// How `dns://` and `dns+srv://` backends are resolved (`[discovery]`, `--resolver`).
    pub discovery: DiscoveryConfig,
    /// Cluster mode (`[cluster]`, `--etcd`): pools and plugins come from etcd, shared by
    /// every replica of the cluster; none for a stand-alone proxy.
    pub cluster: Option<ClusterConfig>,
}

/// The admin endpoint. It can change the pool, so it stays on loopback unless the operator
/// opts out with `allow_remote = true` and a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Loopback unless `allow_remote`.
    pub listen: SocketAddr,
    /// Bearer token required on every request; from `token`, `--admin-token` or the
    /// `LBWASM_ADMIN_TOKEN` environment variable. Required when reachable remotely.
    pub token: Option<String>,
    /// Default false.
    pub allow_remote: bool,
    /// Further names browsers may use for the endpoint in `Host` (and so in `Origin`),
    /// lower case, beside its own address and `localhost:PORT`: a name without a port is
    /// accepted with none and with the admin port. From `hosts` and `--admin-host`.
    pub hosts: Vec<String>,
    /// HTTPS (`[admin.tls]`, the same keys as `[listener.tls]`); required with
    /// `allow_remote` on a non-loopback address, where the token would otherwise cross the
    /// network in cleartext.
    pub tls: Option<ListenerTls>,
}

/// One listening socket with its pool and the plugin that balances it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Names the listener in logs and metrics; default `listener0`, `listener1`, ...
    pub name: String,
    /// Port 0 binds an ephemeral port (tests).
    pub listen: SocketAddr,
    /// Default HTTP.
    pub protocol: Protocol,
    /// What an HTTP listener speaks to its backends; default HTTP/1.1.
    pub backend_protocol: BackendProtocol,
    /// The balancing algorithm.
    pub plugin: PluginRef,
    /// Passed to the plugin's `configure`, in file order, flags last; numbers and booleans
    /// are converted to their TOML text (`5`, `0.5`, `true`).
    pub plugin_options: Vec<(String, String)>,
    /// What hashing plugins hash on; none lets the plugin decide.
    pub hash_key: Option<HashKey>,
    /// Where each request (HTTP) or connection (TCP) is logged; none: not logged.
    pub access_log: Option<AccessLogTarget>,
    /// TCP listeners: the PROXY protocol header sent to the backend first, so that it
    /// learns the client's address; none: the bytes are relayed as they are.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// HTTP listeners: add `Via: 1.1 lbwasm` to requests (off by default, as in NGINX,
    /// HAProxy and Envoy: NGINX backends with `gzip_proxied off` do not compress a
    /// response to a request that has `Via`).
    pub via: bool,
    /// See [`Timeouts`] for defaults.
    pub timeouts: Timeouts,
    /// See [`Retry`] for defaults.
    pub retry: Retry,
    /// Active health checks; none unless `[listener.health]` is present.
    pub health: Option<HealthCheck>,
    /// Ejection on live failures; see [`Passive`] for defaults.
    pub passive: Passive,
    /// Polling of the backends' load endpoint; none when turned off (`enabled = false`,
    /// `--no-load-poll`) and for TCP listeners. Otherwise it polls when
    /// [`LoadReport::always`], or when the listener's plugin says it reads load.
    pub load_report: Option<LoadReport>,
    /// Static backends; may be empty only when `managed` or `discovery` is set.
    pub backends: Vec<BackendConfig>,
    /// Backends found in DNS (`dns://`, `dns+srv://` addresses), in file order.
    pub discovery: Vec<DnsSource>,
    /// Backends the proxy spawns and restarts itself.
    pub managed: Option<Managed>,
    /// TLS termination (`[listener.tls]`, `--tls-cert`); none: cleartext.
    pub tls: Option<ListenerTls>,
    /// TLS to the backends (`[listener.backend_tls]`, `--backend-tls`); also set, with
    /// the system's roots, by `backend_protocol = "h2"`.
    pub backend_tls: Option<BackendTls>,
    /// TCP listeners: TLS pass-through routed by the ClientHello's server name to this
    /// listener's pool when it matches (exact, `*.` one label, `*` any); listeners sharing
    /// an address share one socket. Empty: no routing.
    pub server_names: Vec<String>,
}

/// The version of HAProxy's PROXY protocol a TCP listener speaks to its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// The human-readable line: `PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n`.
    V1,
    /// The binary header (16 bytes, then the addresses).
    V2,
}

/// Where a listener's access log goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AccessLogTarget {
    /// The process's standard output (`access_log = "-"`).
    Stdout,
    /// A file, created if missing, appended to, reopened on every reload (logrotate).
    File(PathBuf),
}

/// What a listener carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2, balanced per request.
    #[default]
    Http,
    /// Raw TCP, balanced per connection.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        })
    }
}

/// What an HTTP listener speaks to its backends (`backend_protocol`, `--backend-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendProtocol {
    /// HTTP/1.1, one request at a time per pooled connection.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP (prior knowledge): many requests per connection, each
    /// balanced on its own; what gRPC backends speak.
    H2c,
    /// HTTP/2 over TLS, negotiated by ALPN (`[listener.backend_tls]`, or the system's
    /// roots when absent).
    H2,
}

impl fmt::Display for BackendProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendProtocol::Http1 => "http1",
            BackendProtocol::H2c => "h2c",
            BackendProtocol::H2 => "h2",
        })
    }
}

/// Where the plugin comes from: `plugin = "least_loaded"` or `plugin = "./my_lb.wasm"`.
/// A value ending in `.wasm` or containing `/` is a file; anything else a built-in name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginRef {
    /// One of [`lbwasm_plugin_host::builtin::names`].
    Builtin(String),
    /// A component file; relative paths from the config file are already joined to its
    /// directory, relative paths from `--plugin` stay relative to the working directory.
    File(PathBuf),
}

/// What a hashing plugin hashes (the `hash-key` of the request interface).
/// Parsed from `"header:NAME"`, `"cookie:NAME"`, `"path"` or `"client-ip"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// A request header; the name is stored lowercase (header names are case-insensitive).
    Header(String),
    /// A cookie, by its case-sensitive name.
    Cookie(String),
    /// Path and query.
    Path,
    /// Client IP without port.
    ClientIp,
    /// The server name of a TLS ClientHello: TCP listeners (pass-through or terminating).
    Sni,
}

/// Per-listener timeouts; all must be > 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a connection to a backend. Default 2s.
    pub connect: Duration,
    /// One attempt, from sending the request to receiving the response head (HTTP only).
    /// Default 30s.
    pub request: Duration,
    /// A client connection with nothing in flight (HTTP keep-alive, or a silent TCP
    /// connection) is closed after this; so is a response whose body the backend sends no
    /// byte of, or an HTTP/1.1 client takes no byte of, for this long. Default 60s.
    pub idle: Duration,
    /// Longest one call to the plugin's `choose` may run before it is interrupted and the
    /// native fallback picks (setup calls get ten times it). The worker waits for its plugin,
    /// so this is also the worst a plugin can add to a request. Default 20ms.
    pub plugin: Duration,
    /// A worker whose `choose` calls exceed this more than 1% of the time over a second
    /// (a p99 over budget) logs a warning. Default 1ms.
    pub plugin_budget: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            plugin: Duration::from_millis(20),
            plugin_budget: Duration::from_millis(1),
        }
    }
}

/// Retrying a failed attempt on another backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Total tries including the first, 1..=10; 1 disables retries. Default 3.
    pub attempts: u32,
    /// Retries may add at most this percentage of requests, 0..=100, so that retries
    /// cannot multiply the load of a struggling pool. Default 20.
    pub budget_percent: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 3,
            budget_percent: 20,
        }
    }
}

/// Active health checking of every backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// HTTP request or plain TCP connect.
    pub kind: HealthKind,
    /// Time between checks of one backend. Default 2s.
    pub interval: Duration,
    /// A check not answered within this fails; <= interval. Default 1s (or the interval
    /// when shorter).
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy. Default 2.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy. Default 3.
    pub fall: u32,
}

/// How a health check probes a backend (`[listener.health] type`, `path`): in the
/// protocol the pool speaks, since an h2c-only backend (a gRPC server) answers nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthKind {
    /// `GET path`, healthy when the status is `expect_status` (default 200).
    Http {
        /// Starts with `/`.
        path: String,
        /// 100..=599.
        expect_status: u16,
        /// Sent over HTTP/2 with prior knowledge: the listener's `backend_protocol` is h2c.
        http2: bool,
    },
    /// `type = "grpc"`: the standard gRPC health check (`grpc.health.v1.Health/Check`)
    /// over h2c; healthy when the call succeeds (`grpc-status` 0) and answers `SERVING`.
    /// Only with `backend_protocol = "h2c"`: gRPC needs HTTP/2.
    Grpc {
        /// `HealthCheckRequest.service`: "" (the default) asks about the server as a whole.
        service: String,
    },
    /// A TCP connect; chosen when `path` is absent, and the only check for TCP listeners.
    Tcp,
}

/// Passive health: ejecting a backend that fails live traffic, with exponential back-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Passive {
    /// Consecutive failed attempts that eject a backend; 0 disables ejection. Default 5.
    pub consecutive_failures: u32,
    /// First ejection length, doubled on each re-ejection. Default 10s.
    pub base_ejection: Duration,
    /// Cap on the ejection length; >= base_ejection. Default 300s.
    pub max_ejection: Duration,
    /// Ramp of a re-admitted backend's share from 0 to its full weight; 0 (the default)
    /// re-admits at full weight.
    pub slow_start: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            slow_start: Duration::ZERO,
        }
    }
}

/// Polling each backend's load endpoint (CPU, memory, connections) for load-aware plugins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Starts with `/`. Default `/load`.
    pub path: String,
    /// Time between polls of one backend. Default 1s.
    pub interval: Duration,
    /// `enabled = true` in the file: poll whatever the plugin. Otherwise (the default) the
    /// backends are polled only while the plugin declares that it reads load figures
    /// ([`crate::health::READS_LOAD`] in its description), sparing backends requests, and
    /// log lines, nobody reads.
    pub always: bool,
}

impl Default for LoadReport {
    fn default() -> Self {
        LoadReport {
            path: "/load".to_owned(),
            interval: Duration::from_secs(1),
            always: false,
        }
    }
}

/// One static backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// `localhost:PORT` is accepted and means 127.0.0.1 (no DNS at run time).
    pub address: SocketAddr,
    /// Relative share for weighted plugins, >= 1. Default 1.
    pub weight: u32,
    /// In-flight limit the plugins are told about; 0 (the default) means none.
    pub max_connections: u32,
}

/// A pool of backend processes the proxy starts, watches and restarts: instance `i` is
/// `command` with `{port}` replaced by `base_port + i`, reached at 127.0.0.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Managed {
    /// argv, not a shell line; at least one argument contains `{port}`.
    pub command: Vec<String>,
    /// Instances, >= 1. Default 1.
    pub count: u32,
    /// Port of instance 0; the pool uses `base_port ..= base_port + count - 1`.
    pub base_port: u16,
    /// Wait before restarting an instance that exited, doubled while it keeps failing.
    /// Default 1s.
    pub restart_backoff: Duration,
}

impl Managed {
    /// The backend addresses of the instances, in instance order.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (0..self.count).filter_map(|i| {
            let port = u16::try_from(u32::from(self.base_port) + i).ok()?;
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        })
    }

    /// The argv of the instance listening on `port`.
    pub fn command_for(&self, port: u16) -> Vec<String> {
        let port = port.to_string();
        self.command
            .iter()
            .map(|arg| arg.replace("{port}", &port))
            .collect()
    }
}
