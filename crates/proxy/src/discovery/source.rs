//! The loop of one DNS source on the control plane: resolve, apply the answer to the pool,
//! wait for the TTL (within the floor and ceiling), again; drain what the source added
//! when it is stopped.

use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tokio::time::Instant;

use super::members::Members;
use super::resolve::{self, Outcome};
use crate::config::{DiscoveryConfig, DnsQuery};
use crate::metrics::dns::{DnsStats, Resolution};
use crate::proxy::ListenerShared;

/// How often draining members are looked at (in flight yet?).
const SWEEP: Duration = Duration::from_millis(100);

/// What a running source may be told to change (a reload) without losing its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Spec {
    /// Weight of a `dns://` source's members; SRV members take their record's.
    pub weight: u32,
    /// Connection limit of every member.
    pub max_connections: u32,
    /// Resolver, TTL bounds, timeout.
    pub settings: DiscoveryConfig,
}

/// One source's loop: runs until `spec`'s sender is dropped, then drains what it added
/// (removed once idle, or after the listener's request timeout) and returns. `first` is
/// told when the first resolution has been applied (or has failed).
pub(super) async fn run(
    listener: Arc<ListenerShared>,
    query: DnsQuery,
    mut spec: watch::Receiver<Spec>,
    stats: Arc<DnsStats>,
    owned: Arc<Mutex<Vec<u32>>>,
    mut first: Option<SyncSender<()>>,
) {
    let publish = |members: &Members| {
        *owned.lock().unwrap_or_else(|e| e.into_inner()) = members.ids();
    };
    let mut current = spec.borrow_and_update().clone();
    let mut resolver: Option<TokioResolver> = None;
    let mut members = Members::default();
    let mut failing = false;
    let source = query.to_string();
    'resolve: loop {
        if resolver.is_none() {
            resolver = resolve::resolver(&current.settings)
                .inspect_err(|error| {
                    if !failing {
                        tracing::error!(listener = %listener.name, %source, %error, "DNS discovery cannot make a resolver");
                    }
                })
                .ok();
        }
        let outcome = match &resolver {
            Some(r) => resolve::resolve(r, &query, current.settings.timeout).await,
            None => Outcome::Failed("no resolver (see the error above)".into()),
        };
        let wait = resolve::next_wait(&outcome, &current.settings);
        let grace = listener.settings.load().timeouts.request;
        match outcome {
            Outcome::Found {
                members: mut found, ..
            } => {
                stats.resolved(Resolution::Ok);
                if let DnsQuery::Host { .. } = query {
                    found.values_mut().for_each(|w| *w = current.weight);
                }
                let applied = members.apply(&listener.pool, &found, current.max_connections, grace);
                if failing {
                    tracing::info!(listener = %listener.name, %source, "DNS answers again");
                    failing = false;
                }
                log_applied(&listener.name, &source, &applied);
            }
            Outcome::Empty { nxdomain, .. } => {
                let kind = if nxdomain {
                    Resolution::NxDomain
                } else {
                    Resolution::Ok
                };
                stats.resolved(kind);
                let applied = members.apply(
                    &listener.pool,
                    &Default::default(),
                    current.max_connections,
                    grace,
                );
                failing = false;
                if !applied.leaving.is_empty() {
                    tracing::warn!(listener = %listener.name, %source, nxdomain, leaving = ?applied.leaving, "DNS has no records for the source: its backends drain");
                }
            }
            Outcome::Failed(error) => {
                stats.resolved(Resolution::Error);
                if !failing {
                    tracing::warn!(listener = %listener.name, %source, %error, members = members.serving(), "DNS resolution failed: keeping the last good answer, retrying");
                    failing = true;
                }
            }
        }
        stats.set_backends(members.serving());
        publish(&members);
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        let next = Instant::now() + wait;
        loop {
            let tick = if members.any_leaving() {
                next.min(Instant::now() + SWEEP)
            } else {
                next
            };
            tokio::select! {
                _ = tokio::time::sleep_until(tick) => {
                    sweep(&listener, &source, &mut members);
                    publish(&members);
                    if Instant::now() >= next {
                        continue 'resolve;
                    }
                }
                changed = spec.changed() => {
                    if changed.is_err() {
                        break 'resolve;
                    }
                    let new = spec.borrow_and_update().clone();
                    if new.settings != current.settings {
                        resolver = None;
                    }
                    let weight = matches!(query, DnsQuery::Host { .. }).then_some(new.weight);
                    members.set_limits(&listener.pool, weight, new.max_connections);
                    current = new;
                    continue 'resolve;
                }
            }
        }
    }
    // Stopped: every member drains, then goes.
    let grace = listener.settings.load().timeouts.request;
    members.leave_all(&listener.pool, grace);
    stats.set_backends(0);
    while members.any_leaving() {
        tokio::time::sleep(SWEEP).await;
        sweep(&listener, &source, &mut members);
    }
    publish(&members);
    tracing::info!(listener = %listener.name, %source, "DNS source stopped; its backends are gone");
}

fn sweep(listener: &ListenerShared, source: &str, members: &mut Members) {
    let removed = members.sweep(&listener.pool);
    if !removed.is_empty() {
        tracing::info!(listener = %listener.name, %source, removed = ?removed, "drained DNS backends removed");
    }
}

fn log_applied(listener: &str, source: &str, applied: &super::members::Applied) {
    if !applied.added.is_empty() || !applied.leaving.is_empty() || !applied.returned.is_empty() {
        tracing::info!(%listener, %source, added = ?applied.added, draining = ?applied.leaving, back = ?applied.returned, "DNS answer applied");
    }
    if !applied.not_ours.is_empty() {
        tracing::debug!(%listener, %source, addresses = ?applied.not_ours, "already members by another means: left as they are");
    }
}
