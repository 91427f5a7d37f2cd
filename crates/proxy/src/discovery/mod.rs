//! DNS service discovery: backends given as `dns://NAME:PORT` (A and AAAA records) or
//! `dns+srv://_service._proto.NAME` (SRV records, RFC 2782) follow what DNS says.
//!
//! Each source is a loop on the control plane ([`source`]) that resolves with
//! `hickory-resolver` ([`resolve`]), applies the answer to its listener's pool
//! ([`members`]) and waits for the answer's TTL, clamped to `[min_ttl, max_ttl]`:
//! - records: new addresses join the pool (`Pool::add`; health checks apply to them as to
//!   any member); addresses gone are drained (`draining`, no new requests) and removed once
//!   nothing is in flight to them, or after the listener's request timeout; SRV weights
//!   follow the records.
//! - NXDOMAIN or no records (an authoritative "nothing", what a Kubernetes headless service
//!   with no ready pod answers): the source's members drain and go.
//! - SERVFAIL, REFUSED, a timeout or a transport error: the last good answer stays (a
//!   warning once per streak, `lbwasm_dns_resolutions_total{result="error"}`), and the
//!   source asks again after `min_ttl`.
//!
//! A source only ever touches the backends it added itself: static backends, those added
//! through the admin API and those another owner (cluster mode) manages are never removed
//! by discovery, even when their address is in an answer. [`Discovery`] owns the running
//! sources: started with the server, changed, started or stopped by a reload.

mod members;
mod resolve;
mod source;

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{Config, DiscoveryConfig, DnsQuery, DnsSource};
use crate::metrics::dns::{self, DnsStats};
use crate::proxy::ListenerShared;
use source::Spec;

/// Beyond the query timeout, how long [`Discovery::start`] waits for first answers.
const FIRST_ANSWER_SLACK: Duration = Duration::from_millis(500);

/// The running DNS sources of a server, in start order.
pub struct Discovery {
    /// The control-plane runtime the loops run on.
    handle: tokio::runtime::Handle,
    sources: Mutex<Vec<Running>>,
}

/// One running source; dropping it stops its loop, which then drains its members.
struct Running {
    listener: usize,
    query: DnsQuery,
    spec: watch::Sender<Spec>,
    stats: Arc<DnsStats>,
    /// Ids of the backends the source has in the pool, as its loop last published them.
    owned: Arc<Mutex<Vec<u32>>>,
}

impl Discovery {
    /// No source yet; loops will run on `handle`.
    pub fn new(handle: tokio::runtime::Handle) -> Self {
        Discovery {
            handle,
            sources: Mutex::new(Vec::new()),
        }
    }

    fn sources(&self) -> MutexGuard<'_, Vec<Running>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts every DNS source of `config`, then waits for their first answers (at most
    /// the query timeout and a little more) so that a pool made only of DNS backends does
    /// not start empty when DNS works. When DNS does not answer, the server starts with
    /// its other backends and the sources keep asking (logged).
    pub fn start(&self, listeners: &[Arc<ListenerShared>], config: &Config) {
        let (tx, rx) = mpsc::sync_channel(64);
        let mut started = 0;
        for (l, lc) in listeners.iter().zip(&config.listeners) {
            for s in &lc.discovery {
                self.spawn(l, s, &config.discovery, Some(tx.clone()));
                started += 1;
            }
        }
        drop(tx);
        if started == 0 {
            return;
        }
        let deadline = Instant::now() + config.discovery.timeout + FIRST_ANSWER_SLACK;
        let mut answered = 0;
        while answered < started {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                break;
            }
            answered += 1;
        }
        if answered < started {
            tracing::warn!(
                sources = started,
                answered,
                "DNS discovery: not every source has resolved yet; serving with the backends there are, and retrying"
            );
        }
    }

    fn spawn(
        &self,
        listener: &Arc<ListenerShared>,
        source: &DnsSource,
        settings: &DiscoveryConfig,
        first: Option<SyncSender<()>>,
    ) {
        let spec = spec(source, settings);
        let (tx, rx) = watch::channel(spec);
        let stats = DnsStats::new(&listener.name, &source.query.to_string());
        let owned = Arc::new(Mutex::new(Vec::new()));
        self.handle.spawn(source::run(
            listener.clone(),
            source.query.clone(),
            rx,
            stats.clone(),
            owned.clone(),
            first,
        ));
        tracing::info!(listener = %listener.name, source = %source.query, "DNS source started");
        self.sources().push(Running {
            listener: listener.index,
            query: source.query.clone(),
            spec: tx,
            stats,
            owned,
        });
    }

    /// A reload: `listener`'s sources become `sources` resolved with `settings`. A source
    /// gone from the file stops (its members drain), a new one starts, a changed weight,
    /// limit or `[discovery]` setting is applied to the running loop (members kept).
    /// Returns what changed, for the reload report.
    pub fn reconcile(
        &self,
        listener: &Arc<ListenerShared>,
        sources: &[DnsSource],
        settings: &DiscoveryConfig,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let mut running = self.sources();
        running.retain(|r| {
            let keep = r.listener != listener.index || sources.iter().any(|s| s.query == r.query);
            if !keep {
                changes.push(format!(
                    "{}: DNS source {} removed (its backends drain)",
                    listener.name, r.query
                ));
            }
            keep
        });
        let mut new = Vec::new();
        for s in sources {
            match running
                .iter()
                .find(|r| r.listener == listener.index && r.query == s.query)
            {
                Some(r) => {
                    let spec = spec(s, settings);
                    if *r.spec.borrow() != spec {
                        r.spec.send_replace(spec);
                        changes.push(format!("{}: DNS source {} updated", listener.name, s.query));
                    }
                }
                None => new.push(s),
            }
        }
        drop(running);
        for s in new {
            self.spawn(listener, s, settings, None);
            changes.push(format!("{}: DNS source {} added", listener.name, s.query));
        }
        changes
    }

    /// The source (its URL) that added backend `id` of listener `listener`, if one did:
    /// `GET /backends` shows it.
    pub fn source_of(&self, listener: usize, id: u32) -> Option<String> {
        self.sources()
            .iter()
            .filter(|r| r.listener == listener)
            .find(|r| {
                r.owned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id)
            })
            .map(|r| r.query.to_string())
    }

    /// Appends the sources' metrics to a `/metrics` text.
    pub fn render_metrics(&self, out: &mut String) {
        let stats: Vec<Arc<DnsStats>> = self.sources().iter().map(|r| r.stats.clone()).collect();
        dns::render(out, &stats);
    }
}

fn spec(source: &DnsSource, settings: &DiscoveryConfig) -> Spec {
    Spec {
        weight: source.weight,
        max_connections: source.max_connections,
        settings: *settings,
    }
}
