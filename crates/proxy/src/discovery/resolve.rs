//! One resolution of a DNS source with `hickory-resolver`: the addresses it gives now, the
//! TTL they hold for, or why there are none. Knows nothing of pools.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::{DiscoveryConfig, DnsQuery};

/// What one resolution found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Addresses with their weight (SRV's, 1 for A/AAAA) and the shortest TTL among the
    /// records that led to them.
    Found {
        members: BTreeMap<SocketAddr, u32>,
        ttl: Duration,
    },
    /// An authoritative "nothing": NXDOMAIN, no record of the type asked, or SRV records
    /// whose targets have no address; `ttl` is the negative TTL when the server gave one.
    Empty {
        nxdomain: bool,
        ttl: Option<Duration>,
    },
    /// SERVFAIL, REFUSED, a timeout or a transport error: nothing is known.
    Failed(String),
}

/// A resolver for `settings`: the configured server over UDP and TCP (TCP when an answer
/// is truncated), or the system's (`/etc/resolv.conf`), one attempt per query (the
/// discovery loop is the retry), no cache (every round asks), no hosts file.
pub(super) fn resolver(settings: &DiscoveryConfig) -> Result<TokioResolver, String> {
    let mut builder = match settings.resolver {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut ns.connections {
                connection.port = server.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?,
    };
    let options = builder.options_mut();
    options.timeout = settings.timeout;
    options.attempts = 1;
    options.use_hosts_file = ResolveHosts::Never;
    builder
        .build()
        .map_err(|e| format!("cannot build a DNS resolver: {e}"))
}

/// Resolves `query` once, within `timeout` in all.
pub(super) async fn resolve(
    resolver: &TokioResolver,
    query: &DnsQuery,
    timeout: Duration,
) -> Outcome {
    resolver.clear_cache();
    let work = async {
        match query {
            DnsQuery::Host { name, port } => host(resolver, name, *port, 1).await,
            DnsQuery::Srv { name } => srv(resolver, name).await,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Outcome::Found { members, ttl }) if members.len() > MAX_MEMBERS => {
            // A DNS server (or whoever answers for it) cannot grow a pool without bound:
            // the first addresses in order are kept, the same on every replica.
            tracing::warn!(
                name = query.name(),
                answered = members.len(),
                kept = MAX_MEMBERS,
                "DNS answer has more backends than a source takes: the rest are ignored"
            );
            let members = members.into_iter().take(MAX_MEMBERS).collect();
            Outcome::Found { members, ttl }
        }
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(format!("no answer within {timeout:?}")),
    }
}

/// Most backends one DNS source adds to a pool (the pool sizes the project measures go
/// to 1,000).
pub(super) const MAX_MEMBERS: usize = 1024;

/// The result of one record type's lookup: records, nothing (NXDOMAIN or not of this
/// type), or failure.
enum Records {
    Some(Vec<(RData, u32)>),
    None { nxdomain: bool, ttl: Option<u32> },
}

async fn lookup(resolver: &TokioResolver, name: &str, kind: RecordType) -> Result<Records, String> {
    match resolver.lookup(name, kind).await {
        Ok(lookup) => {
            let records: Vec<(RData, u32)> = lookup
                .answers()
                .iter()
                .filter(|r| r.record_type() == kind)
                .map(|r| (r.data.clone(), r.ttl))
                .collect();
            if records.is_empty() {
                Ok(Records::None {
                    nxdomain: false,
                    ttl: None,
                })
            } else {
                Ok(Records::Some(records))
            }
        }
        Err(e) => match no_records(&e) {
            Some(records) => Ok(records),
            None => Err(format!("{kind} {name}: {e}")),
        },
    }
}

/// An authoritative empty answer, told apart from a failure.
fn no_records(e: &NetError) -> Option<Records> {
    use hickory_resolver::net::DnsError;
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => Some(Records::None {
            nxdomain: e.is_nx_domain(),
            ttl: no.negative_ttl,
        }),
        _ => None,
    }
}

/// `dns://NAME:PORT` (and an SRV target): A and AAAA at once, every address on `port`.
async fn host(resolver: &TokioResolver, name: &str, port: u16, weight: u32) -> Outcome {
    let (a, aaaa) = tokio::join!(
        lookup(resolver, name, RecordType::A),
        lookup(resolver, name, RecordType::AAAA)
    );
    let mut members = BTreeMap::new();
    let mut ttl: Option<u32> = None;
    let (mut nxdomain, mut negative) = (true, None::<u32>);
    for answer in [a, aaaa] {
        match answer {
            Err(e) => return Outcome::Failed(e),
            Ok(Records::None { nxdomain: nx, ttl }) => {
                nxdomain &= nx;
                negative = min_opt(negative, ttl);
            }
            Ok(Records::Some(records)) => {
                for (data, record_ttl) in records {
                    let ip = match data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                        _ => continue,
                    };
                    members.insert(SocketAddr::new(ip, port), weight);
                    ttl = min_opt(ttl, Some(record_ttl));
                }
            }
        }
    }
    if members.is_empty() {
        return Outcome::Empty {
            nxdomain,
            ttl: negative.map(secs),
        };
    }
    Outcome::Found {
        members,
        ttl: secs(ttl.unwrap_or(0)),
    }
}

/// `dns+srv://`: the SRV records of the lowest priority present (RFC 2782), each target's
/// addresses on the record's port with the record's weight (0 counts as 1). A target
/// named `.` ("no such service here") or without addresses adds nothing; a target that
/// fails to resolve fails the round, so that a partial answer never removes members.
async fn srv(resolver: &TokioResolver, name: &str) -> Outcome {
    let records = match lookup(resolver, name, RecordType::SRV).await {
        Err(e) => return Outcome::Failed(e),
        Ok(Records::None { nxdomain, ttl }) => {
            return Outcome::Empty {
                nxdomain,
                ttl: ttl.map(secs),
            };
        }
        Ok(Records::Some(records)) => records,
    };
    let srvs: Vec<_> = records
        .into_iter()
        .filter_map(|(data, ttl)| match data {
            RData::SRV(srv) => Some((srv, ttl)),
            _ => None,
        })
        .collect();
    let Some(lowest) = srvs.iter().map(|(s, _)| s.priority).min() else {
        return Outcome::Empty {
            nxdomain: false,
            ttl: None,
        };
    };
    let mut members = BTreeMap::new();
    let mut ttl: Option<u32> = None;
    for (srv, record_ttl) in srvs.iter().filter(|(s, _)| s.priority == lowest) {
        if srv.target.is_root() {
            continue;
        }
        let target = srv.target.to_ascii();
        match Box::pin(host(resolver, &target, srv.port, srv.weight.max(1).into())).await {
            Outcome::Failed(e) => return Outcome::Failed(e),
            Outcome::Empty { .. } => {}
            Outcome::Found {
                members: found,
                ttl: target_ttl,
            } => {
                for (addr, weight) in found {
                    // The same address and port twice: the larger weight.
                    let slot = members.entry(addr).or_insert(weight);
                    *slot = (*slot).max(weight);
                }
                let target_secs = u32::try_from(target_ttl.as_secs()).unwrap_or(u32::MAX);
                ttl = min_opt(ttl, Some((*record_ttl).min(target_secs)));
            }
        }
    }
    if members.is_empty() {
        return Outcome::Empty {
            nxdomain: false,
            ttl: None,
        };
    }
    Outcome::Found {
        members,
        ttl: secs(ttl.unwrap_or(0)),
    }
}

fn min_opt(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

/// The wait before the next resolution: the TTL within `[min_ttl, max_ttl]`; after a
/// failure or an empty answer without a TTL, the floor.
pub(super) fn next_wait(outcome: &Outcome, settings: &DiscoveryConfig) -> Duration {
    let ttl = match outcome {
        Outcome::Found { ttl, .. } => Some(*ttl),
        Outcome::Empty { ttl, .. } => *ttl,
        Outcome::Failed(_) => None,
    };
    ttl.unwrap_or(settings.min_ttl)
        .clamp(settings.min_ttl, settings.max_ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_clamped_to_the_floor_and_ceiling() {
        let settings = DiscoveryConfig {
            min_ttl: Duration::from_secs(2),
            max_ttl: Duration::from_secs(30),
            ..DiscoveryConfig::default()
        };
        let found = |s| Outcome::Found {
            members: BTreeMap::new(),
            ttl: Duration::from_secs(s),
        };
        assert_eq!(next_wait(&found(0), &settings), Duration::from_secs(2));
        assert_eq!(next_wait(&found(10), &settings), Duration::from_secs(10));
        assert_eq!(next_wait(&found(3600), &settings), Duration::from_secs(30));
        let failed = Outcome::Failed("x".into());
        assert_eq!(next_wait(&failed, &settings), Duration::from_secs(2));
        let empty = Outcome::Empty {
            nxdomain: true,
            ttl: Some(Duration::from_secs(300)),
        };
        assert_eq!(next_wait(&empty, &settings), Duration::from_secs(30));
    }
}
