//! The kinds of scalar a key can hold ([`Leaf`]) and how each is checked on its own: a
//! wrong type and a wrong value are refused in the same words, `expected WHAT, got VALUE`,
//! whether the value stands in the file or comes from a flag.

use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::discovery::{BackendTarget, DnsQuery};
use super::{AccessLogTarget, BackendProtocol, HashKey, Protocol, ProxyProtocol};

/// A kind of scalar: how a raw TOML value is checked and converted, on its own.
pub(super) trait Leaf {
    type Value;
    /// The value, or why `raw` is not one (`expected WHAT, got VALUE`).
    fn read(raw: Raw) -> Result<Self::Value, String>;
}

/// Any TOML value, as much of it as leaves and messages need.
#[derive(Clone, Debug)]
pub(super) enum Raw {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
    /// As written, e.g. `2020-01-01`.
    Datetime(String),
    /// An array; its items are not kept.
    Array,
    /// A table; its entries are not kept.
    Table,
}

impl Raw {
    /// "expected WHAT, got VALUE": scalars as written, containers by kind.
    pub fn expected(&self, what: &str) -> String {
        format!("expected {what}, got {self}")
    }
}

impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Str(s) => write!(f, "{s:?}"),
            Raw::Int(n) => write!(f, "{n}"),
            Raw::Float(x) => write!(f, "{x}"),
            Raw::Bool(b) => write!(f, "{b}"),
            Raw::Datetime(d) => write!(f, "the date-time {d}"),
            Raw::Array => f.write_str("an array"),
            Raw::Table => f.write_str("a table"),
        }
    }
}

/// A leaf written as a string of a known form: another string is refused as `expected
/// WHAT, got "TEXT"`, anything else as `expected a string, got VALUE`.
pub(super) trait Text {
    type Value;
    const WHAT: &'static str;
    fn parse(text: &str) -> Option<Self::Value>;
}

impl<K: Text> Leaf for K {
    type Value = K::Value;

    fn read(raw: Raw) -> Result<K::Value, String> {
        let Raw::Str(text) = &raw else {
            return Err(raw.expected("a string"));
        };
        K::parse(text).ok_or_else(|| raw.expected(K::WHAT))
    }
}

/// "No maximum" for [`Int`].
pub(super) const NO_MAX: i64 = u32::MAX as i64;

/// An integer in `MIN..=MAX` (a `MAX` of [`NO_MAX`] or more reads as "no maximum"), as `T`.
pub(super) struct Int<T, const MIN: i64, const MAX: i64>(PhantomData<T>);

impl<T: TryFrom<i128>, const MIN: i64, const MAX: i64> Leaf for Int<T, MIN, MAX> {
    type Value = T;

    fn read(raw: Raw) -> Result<T, String> {
        if let Raw::Int(n) = raw
            && (i128::from(MIN)..=i128::from(MAX)).contains(&n)
            && let Ok(value) = T::try_from(n)
        {
            return Ok(value);
        }
        Err(raw.expected(&if MAX >= NO_MAX {
            format!("an integer >= {MIN}")
        } else {
            format!("an integer between {MIN} and {MAX}")
        }))
    }
}

impl Leaf for bool {
    type Value = bool;

    fn read(raw: Raw) -> Result<bool, String> {
        match raw {
            Raw::Bool(b) => Ok(b),
            other => Err(other.expected("true or false")),
        }
    }
}

impl Text for String {
    type Value = String;
    const WHAT: &'static str = "a string";
    fn parse(text: &str) -> Option<String> {
        Some(text.to_owned())
    }
}

/// A string that is not empty.
pub(super) struct NonEmpty;

impl Text for NonEmpty {
    type Value = String;
    const WHAT: &'static str = "a non-empty string";
    fn parse(text: &str) -> Option<String> {
        (!text.is_empty()).then(|| text.to_owned())
    }
}

/// A listener's name.
pub(super) struct ListenerName;

impl Text for ListenerName {
    type Value = String;
    const WHAT: &'static str = "a name of ASCII letters, digits, '-', '_' and '.'";
    fn parse(text: &str) -> Option<String> {
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        (!text.is_empty() && text.chars().all(valid)).then(|| text.to_owned())
    }
}

/// A name for the admin endpoint as a browser writes it in `Host`: `name` or `name:port`
/// (`[v6]:port`), no scheme, path or space; stored lower case.
pub(super) struct AdminHost;

impl Text for AdminHost {
    type Value = String;
    const WHAT: &'static str =
        "a host name as browsers send it in Host, e.g. \"lb.example\" or \"lb.example:9900\"";
    fn parse(text: &str) -> Option<String> {
        let valid = |c: char| c.is_ascii_alphanumeric() || ".-_:[]".contains(c);
        (!text.is_empty() && text.chars().all(valid)).then(|| text.to_ascii_lowercase())
    }
}

/// A URL path: starts with `/`, no whitespace.
pub(super) struct UrlPath;

impl Text for UrlPath {
    type Value = String;
    const WHAT: &'static str = "a path starting with \"/\"";
    fn parse(text: &str) -> Option<String> {
        let bad = |c: char| c.is_whitespace() || c.is_control();
        (text.starts_with('/') && !text.contains(bad)).then(|| text.to_owned())
    }
}

impl Text for Protocol {
    type Value = Protocol;
    const WHAT: &'static str = "\"http\" or \"tcp\"";
    fn parse(text: &str) -> Option<Protocol> {
        match text {
            "http" => Some(Protocol::Http),
            "tcp" => Some(Protocol::Tcp),
            _ => None,
        }
    }
}

impl Text for BackendProtocol {
    type Value = BackendProtocol;
    const WHAT: &'static str = "\"http1\", \"h2c\" or \"h2\"";
    fn parse(text: &str) -> Option<BackendProtocol> {
        match text {
            "http1" => Some(BackendProtocol::Http1),
            "h2c" => Some(BackendProtocol::H2c),
            "h2" => Some(BackendProtocol::H2),
            _ => None,
        }
    }
}

impl Text for ProxyProtocol {
    type Value = ProxyProtocol;
    const WHAT: &'static str = "\"v1\" or \"v2\"";
    fn parse(text: &str) -> Option<ProxyProtocol> {
        match text {
            "v1" => Some(ProxyProtocol::V1),
            "v2" => Some(ProxyProtocol::V2),
            _ => None,
        }
    }
}

impl Text for HashKey {
    type Value = HashKey;
    const WHAT: &'static str =
        "\"header:NAME\", \"cookie:NAME\", \"path\", \"client-ip\" or \"sni\"";
    fn parse(text: &str) -> Option<HashKey> {
        // Header and cookie names are HTTP tokens (RFC 9110 `tchar`s).
        let token = |prefix: &str| {
            let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            text.strip_prefix(prefix)
                .filter(|name| !name.is_empty() && name.chars().all(tchar))
        };
        match text {
            "path" => Some(HashKey::Path),
            "client-ip" => Some(HashKey::ClientIp),
            "sni" => Some(HashKey::Sni),
            _ => token("header:")
                .map(|name| HashKey::Header(name.to_ascii_lowercase()))
                .or_else(|| token("cookie:").map(|name| HashKey::Cookie(name.to_owned()))),
        }
    }
}

/// `-` is standard output, anything else a file (made relative to the configuration file
/// by `build.rs`).
impl Text for AccessLogTarget {
    type Value = AccessLogTarget;
    const WHAT: &'static str = "a file path, or \"-\" for standard output";
    fn parse(text: &str) -> Option<AccessLogTarget> {
        match text {
            "-" => Some(AccessLogTarget::Stdout),
            blank if blank.trim().is_empty() => None,
            path => Some(AccessLogTarget::File(PathBuf::from(path))),
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
impl Leaf for SocketAddr {
    type Value = SocketAddr;

    fn read(raw: Raw) -> Result<SocketAddr, String> {
        let text = String::read(raw)?;
        parse_addr(&text).ok_or_else(|| format!("invalid socket address {text:?}"))
    }
}

/// A backend's address: a socket address with an IP and a port, or a DNS URL whose
/// records are backends (`dns://NAME:PORT`, `dns+srv://_service._proto.NAME`).
pub(super) struct BackendAddr;

impl Leaf for BackendAddr {
    type Value = BackendTarget;

    fn read(raw: Raw) -> Result<BackendTarget, String> {
        if let Raw::Str(text) = &raw
            && let Some(query) = DnsQuery::parse(text)
        {
            return query.map(BackendTarget::Dns);
        }
        match SocketAddr::read(raw.clone())? {
            addr if addr.port() == 0 || addr.ip().is_unspecified() => {
                Err(raw.expected("a backend address with an IP and a port"))
            }
            addr => Ok(BackendTarget::Addr(addr)),
        }
    }
}

/// A duration string such as `"500ms"`, `"2s"` or `"1m30s"`; zero allowed.
impl Leaf for Duration {
    type Value = Duration;

    fn read(raw: Raw) -> Result<Duration, String> {
        let Raw::Str(text) = raw else {
            return Err(raw.expected("a duration such as \"500ms\", \"2s\" or \"1m30s\""));
        };
        parse_duration(&text).ok_or_else(|| {
            format!("invalid duration {text:?} (expected numbers with a unit: us, ms, s, m, h)")
        })
    }
}

/// A duration greater than zero.
pub(super) struct Positive;

impl Leaf for Positive {
    type Value = Duration;

    fn read(raw: Raw) -> Result<Duration, String> {
        match Duration::read(raw.clone())? {
            Duration::ZERO => Err(raw.expected("a duration > 0")),
            d => Ok(d),
        }
    }
}

/// The plugin deadline: 1 ms (the epoch tick is 2 ms, so shorter would not be honoured) to
/// 1 s (a worker waits for its plugin: longer would stall every request of the worker).
pub(super) struct Deadline;

impl Leaf for Deadline {
    type Value = Duration;

    fn read(raw: Raw) -> Result<Duration, String> {
        match Duration::read(raw.clone())? {
            d if d < Duration::from_millis(1) || d > Duration::from_secs(1) => {
                Err(raw.expected("a duration from \"1ms\" to \"1s\""))
            }
            d => Ok(d),
        }
    }
}

/// A plugin option's value: a string, number or boolean, as the plugin will read it.
pub(super) struct OptionValue;

impl Leaf for OptionValue {
    type Value = Raw;

    fn read(raw: Raw) -> Result<Raw, String> {
        match raw {
            Raw::Str(_) | Raw::Int(_) | Raw::Float(_) | Raw::Bool(_) => Ok(raw),
            other => Err(other.expected("a string, number or boolean")),
        }
    }
}

/// Parses `"1m30s"`-style durations: one or more number+unit pairs (`us`, `ms`, `s`, `m`,
/// `h`), decimals allowed (`"1.5s"`), spaces between pairs allowed.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        let nanos_per_unit: u64 = match unit {
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let part = if number.contains('.') {
            let value: f64 = number.parse().ok()?;
            // Duration: 1e-9 precision; the conversion rounds to the nearest nanosecond.
            Duration::try_from_secs_f64(value * nanos_per_unit as f64 / 1e9).ok()?
        } else {
            let value: u64 = number.parse().ok()?;
            Duration::from_nanos(value.checked_mul(nanos_per_unit)?)
        };
        total = total.checked_add(part)?;
        rest = tail.trim_start();
    }
    Some(total)
}

/// `IP:PORT`, `[IPv6]:PORT`, or `localhost:PORT` meaning 127.0.0.1 (no DNS lookups).
pub(super) fn parse_addr(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix("localhost:") {
        Some(port) => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port.parse().ok()?))),
        None => text.parse().ok(),
    }
}

/// A server name as SNI carries it, or a `*.` wildcard for one label, or `*` for any
/// name: lower case, a trailing dot dropped.
pub(super) struct ServerNamePattern;

impl Text for ServerNamePattern {
    type Value = String;
    const WHAT: &'static str =
        "a server name (\"a.example\"), a wildcard for one label (\"*.example\") or \"*\"";
    fn parse(text: &str) -> Option<String> {
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        if name == "*" {
            return Some(name);
        }
        let rest = name.strip_prefix("*.").unwrap_or(&name);
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        (!rest.is_empty() && name.len() <= 253 && rest.split('.').all(label)).then_some(name)
    }
}

/// `min_version` of `[listener.tls]`.
pub(super) struct MinVersion;

impl Text for MinVersion {
    type Value = crate::tls::TlsVersion;
    const WHAT: &'static str = "\"1.2\" or \"1.3\"";
    fn parse(text: &str) -> Option<crate::tls::TlsVersion> {
        match text {
            "1.2" => Some(crate::tls::TlsVersion::V12),
            "1.3" => Some(crate::tls::TlsVersion::V13),
            _ => None,
        }
    }
}

/// `unknown_name` of `[listener.tls]`: whether the default certificate answers names no
/// certificate claims (`"default"`), or the handshake fails (`"refuse"`).
pub(super) struct UnknownName;

impl Text for UnknownName {
    type Value = bool;
    const WHAT: &'static str = "\"default\" or \"refuse\"";
    fn parse(text: &str) -> Option<bool> {
        match text {
            "default" => Some(true),
            "refuse" => Some(false),
            _ => None,
        }
    }
}
