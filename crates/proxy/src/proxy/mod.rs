//! The data path, top-down: listener → pick → forward → record.
//!
//! Worker model (NGINX/HAProxy style, to share nothing per request): N worker threads, each
//! a tokio current-thread runtime with a `LocalSet`, its own `SO_REUSEPORT` socket per
//! listener, its own plugin [`Selector`](lbwasm_plugin_host::Selector) per listener, its own
//! keep-alive connections to the backends (its own HTTP/1.1 client), its
//! own retry budget and metrics shard. What workers share is read-mostly: the pool snapshot,
//! the plugin and the settings, each behind an `ArcSwap` that a worker caches and re-reads
//! only when its pointer changes — which is how a plugin swap or a reload reaches them on
//! their next request, with no lock and no failed request. The per-backend atomics of
//! [`crate::pool`] (in-flight, latency) are the only per-request shared writes.
//!
//! - [`worker`]: threads, accept loops; [`drain`]: the drain on shutdown.
//! - [`local`]: a listener as one worker sees it (cached snapshot, settings, selector).
//! - [`failover`]: one request's or connection's attempts: pick, budget, retries, health.
//! - [`http`]: client connections (HTTP/2 through hyper), forwarding an HTTP request.
//! - [`h1`]: the proxy's own HTTP/1.1 server: request framing, responses, upgrades.
//! - [`tcp`]: per-connection balancing of raw TCP; [`proxy_header`]: the PROXY protocol.
//! - [`client`]: the per-worker backend connections, and the HTTP/1.1 exchange on one;
//!   [`h2c`]: HTTP/2 to backends, a stream per request over shared connections.
//! - [`tunnel`]: byte relays (TCP mode, protocol switches) with an idle timeout.
//! - [`access_log`]: a line per request or connection, buffered per worker.
//! - [`response`]: a response's lifecycle as it streams; [`body`]: request bodies;
//!   [`activity`]: what an HTTP/2 connection's idle timeout watches.
//! - [`headers`] (forwarding policy), [`budget`], [`sock`] (connects, writes), [`stream`]
//!   (a connection plain or TLS, read and written by shared reference),
//!   [`exec`] (hyper's executor on a worker), [`date`]: the pieces the HTTP path is made of. What HTTP/1.1 bytes mean is the codec's, [`lbwasm_http`].
//!
//! Health, load reports and managed processes are not here: they run on the control plane
//! ([`crate::health`], [`crate::serve`]); workers only report failures to it ([`Event`]).

mod access_log;
mod activity;
mod body;
mod budget;
mod client;
mod date;
mod drain;
mod exec;
mod failover;
mod grpc;
mod h1;
mod h2c;
mod headers;
mod http;
mod local;
mod orca;
mod proxy_header;
mod response;
mod sock;
mod stream;
mod tcp;
mod tunnel;
mod worker;

pub use access_log::{AccessLog, Prepared};
pub use worker::{WorkerHandle, bind, spawn_workers};

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{
    BackendProtocol, HashKey, HealthCheck, ListenerConfig, LoadReport, Passive, Protocol,
    ProxyProtocol, Retry, Timeouts,
};
use crate::pool::{Backend, Pool};
use crate::tls::{Terminator, Upstream};
use lbwasm_plugin_host::Plugin;

/// One listener as everything outside the workers sees it: the pool, the plugin and the
/// settings, each swappable at run time.
pub struct ListenerShared {
    /// Position in the configuration (metrics shard slot).
    pub index: usize,
    /// Listener name (logs, metrics, 503 messages).
    pub name: String,
    /// HTTP or TCP; fixed for the listener's life.
    pub protocol: Protocol,
    /// The backends.
    pub pool: Arc<Pool>,
    /// The balancing plugin; storing a new one is a plugin swap.
    pub plugin: Arc<ArcSwap<Plugin>>,
    /// Timeouts, retries, hashing, health settings; storing new ones is a reload.
    pub settings: Arc<ArcSwap<Settings>>,
    /// Where requests are logged; reopened by a reload.
    pub access_log: AccessLog,
    /// TLS termination: the certificates, reloaded in place.
    pub tls: Option<Arc<Terminator>>,
    /// TLS to the backends; fixed for the listener's life.
    pub upstream: Option<Arc<Upstream>>,
    /// SNI routing (TCP pass-through): the names this listener's pool takes.
    pub server_names: Vec<String>,
    events: UnboundedSender<Event>,
}

impl ListenerShared {
    /// The TLS client for backend connections, if the pool speaks TLS.
    pub(crate) fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_deref()
    }

    /// A listener over `pool` with `plugin`; workers send passive-health events to `events`.
    /// Fails if the access log cannot be opened, or a certificate or CA file cannot be
    /// used.
    pub fn new(
        index: usize,
        config: &ListenerConfig,
        pool: Arc<Pool>,
        plugin: Arc<Plugin>,
        events: UnboundedSender<Event>,
    ) -> anyhow::Result<Self> {
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(Terminator::new(
                &config.name,
                t,
                alpn(config.protocol),
            )?)),
            None => None,
        };
        let h2 = config.backend_protocol == BackendProtocol::H2;
        let upstream = match &config.backend_tls {
            Some(t) => Some(Arc::new(
                Upstream::new(&config.name, t, h2)
                    .map_err(|e| anyhow::anyhow!("backend_tls: {e:#}"))?,
            )),
            None => None,
        };
        Ok(ListenerShared {
            tls,
            upstream,
            server_names: config.server_names.clone(),
            index,
            name: config.name.clone(),
            protocol: config.protocol,
            pool,
            plugin: Arc::new(ArcSwap::new(plugin)),
            settings: Arc::new(ArcSwap::from_pointee(Settings::from_config(config))),
            access_log: AccessLog::open(config.access_log.as_ref())?,
            events,
        })
    }

    /// Asks the control plane to eject `backend` (a streak of live failures).
    pub(crate) fn eject(&self, backend: Arc<Backend>) {
        let _ = self.events.send(Event::Eject {
            listener: self.index,
            backend,
        });
    }
}

/// The ALPN protocols a listener's TLS termination offers: HTTP/2 and HTTP/1.1 on an http
/// listener, none on a tcp one (it relays whatever the client speaks).
pub(crate) fn alpn(protocol: Protocol) -> &'static [&'static [u8]] {
    match protocol {
        Protocol::Http => &[b"h2", b"http/1.1"],
        Protocol::Tcp => &[],
    }
}

/// What workers tell the control plane.
#[derive(Debug)]
pub enum Event {
    /// `backend` failed `passive.consecutive_failures` attempts in a row.
    Eject {
        /// Listener index.
        listener: usize,
        /// The failing backend.
        backend: Arc<Backend>,
    },
}

/// The part of a listener's configuration that can change at run time (reload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Connect, request and idle timeouts.
    pub timeouts: Timeouts,
    /// Attempts and retry budget.
    pub retry: Retry,
    /// What hashing plugins hash.
    pub hash_key: Option<HashKey>,
    /// Passive ejection and slow start.
    pub passive: Passive,
    /// Active checks.
    pub health: Option<HealthCheck>,
    /// Load-report polling.
    pub load_report: Option<LoadReport>,
    /// TCP: the PROXY protocol header sent to backends.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// HTTP: add `Via` to requests.
    pub via: bool,
    /// HTTP: what the backends speak.
    pub backend_protocol: BackendProtocol,
}

impl Settings {
    /// The run-time settings of a listener's configuration.
    pub fn from_config(l: &ListenerConfig) -> Self {
        Settings {
            timeouts: l.timeouts,
            retry: l.retry,
            hash_key: l.hash_key.clone(),
            passive: l.passive,
            health: l.health.clone(),
            load_report: l.load_report.clone(),
            proxy_protocol: l.proxy_protocol,
            via: l.via,
            backend_protocol: l.backend_protocol,
        }
    }
}
