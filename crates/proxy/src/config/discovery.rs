//! DNS service discovery in the configuration: the backend URLs (`dns://NAME:PORT`,
//! `dns+srv://_service._proto.NAME`) a `[[listener.backend]] address` may hold beside
//! `IP:PORT`, and the settings of the process-wide `[discovery]` table (resolver, TTL floor
//! and ceiling, query timeout). The resolving itself is [`crate::discovery`]'s.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// What a `[[listener.backend]] address` names: one backend, or a DNS name whose records
/// are the backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BackendTarget {
    /// `IP:PORT`: one static backend.
    Addr(SocketAddr),
    /// `dns://` or `dns+srv://`: the members DNS gives, re-resolved at run time.
    Dns(DnsQuery),
}

/// A DNS name whose records are a listener's backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DnsQuery {
    /// `dns://NAME:PORT`: every A and AAAA record of `name` is a backend on `port`.
    Host {
        /// As written, lower case.
        name: String,
        /// 1..=65535.
        port: u16,
    },
    /// `dns+srv://_service._proto.NAME`: the SRV records of `name` with the lowest priority
    /// present, each target's addresses on the record's port, with the record's weight.
    Srv {
        /// As written, lower case; starts `_service._proto.`.
        name: String,
    },
}

impl DnsQuery {
    /// The name the query asks for.
    pub fn name(&self) -> &str {
        match self {
            DnsQuery::Host { name, .. } | DnsQuery::Srv { name } => name,
        }
    }

    /// Reads `dns://NAME:PORT` or `dns+srv://_service._proto.NAME`; `None` when `text` has
    /// neither scheme, the reason when it has one but is malformed.
    pub(super) fn parse(text: &str) -> Option<Result<DnsQuery, String>> {
        if let Some(rest) = text.strip_prefix("dns+srv://") {
            return Some(srv(rest, text));
        }
        let rest = text.strip_prefix("dns://")?;
        Some(host(rest, text))
    }
}

/// `NAME:PORT` of a `dns://` URL.
fn host(rest: &str, text: &str) -> Result<DnsQuery, String> {
    let Some((name, port)) = rest.rsplit_once(':') else {
        return Err(format!(
            "expected dns://NAME:PORT (an A/AAAA record has no port: give one), got {text:?}"
        ));
    };
    let name = dns_name(name, text)?;
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(DnsQuery::Host { name, port }),
        _ => Err(format!(
            "expected dns://NAME:PORT with a port from 1 to 65535, got {text:?}"
        )),
    }
}

/// `_service._proto.NAME` of a `dns+srv://` URL.
fn srv(rest: &str, text: &str) -> Result<DnsQuery, String> {
    if rest.contains(':') {
        return Err(format!(
            "a dns+srv:// URL takes no port (each SRV record gives its own), got {text:?}"
        ));
    }
    let name = dns_name(rest, text)?;
    let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
    let underscored = |l: &&str| l.len() > 1 && l.starts_with('_');
    if labels.len() < 3 || !labels[..2].iter().all(underscored) {
        return Err(format!(
            "expected dns+srv://_service._proto.NAME (RFC 2782, e.g. \
             dns+srv://_http._tcp.web.example), got {text:?}"
        ));
    }
    Ok(DnsQuery::Srv { name })
}

/// A host name: labels of letters, digits, `-` and `_`, 1..=63 bytes each, 253 in all;
/// lower case. A trailing dot is kept: it makes the name absolute (no search domains).
fn dns_name(name: &str, text: &str) -> Result<String, String> {
    let name = name.to_ascii_lowercase();
    let bare = name.strip_suffix('.').unwrap_or(&name);
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if bare.is_empty() {
        return Err(format!("the DNS name is empty in {text:?}"));
    }
    if bare.len() > 253 || !bare.split('.').all(label) {
        return Err(format!(
            "invalid DNS name {name:?} in {text:?} (labels of letters, digits, '-' and '_')"
        ));
    }
    Ok(name)
}

impl fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsQuery::Host { name, port } => write!(f, "dns://{name}:{port}"),
            DnsQuery::Srv { name } => write!(f, "dns+srv://{name}"),
        }
    }
}

/// One `[[listener.backend]]` whose address is a DNS URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSource {
    /// What is resolved.
    pub query: DnsQuery,
    /// Weight of each member a `dns://` source finds (SRV members take the record's).
    pub weight: u32,
    /// Connection limit of each member found; 0 means none.
    pub max_connections: u32,
}

/// `[discovery]`: how every DNS source of the process resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The DNS server asked (`resolver`, `--resolver`); none: the system's
    /// (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// Floor of the time between two resolutions of a source, whatever the TTL says (a
    /// TTL of 0 would otherwise mean a query loop). Default 1s.
    pub min_ttl: Duration,
    /// Ceiling of it: a long TTL still lets a change be seen this soon. Default 60s.
    pub max_ttl: Duration,
    /// One query's deadline (UDP, then TCP when the answer is truncated). Default 2s.
    pub timeout: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            resolver: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
        }
    }
}
