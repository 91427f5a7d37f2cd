//! Where hash-based algorithms take their key from: a header, a cookie, the path, the
//! client address, or the listener's configured hash key.

use crate::Options;
use crate::host::Host;

/// A key source, parsed from a plugin's `key` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The listener's `hash_key` if configured and present, else the client IP.
    Auto,
    /// A request header.
    Header(String),
    /// A cookie from the `Cookie` header.
    Cookie(String),
    /// Path and query.
    Path,
    /// Client IP address.
    ClientIp,
}

impl KeySource {
    /// What the `key` option accepts.
    pub const SYNTAX: &'static str = "`auto`, `header:NAME`, `cookie:NAME`, `path` or `client-ip`";

    /// Parses `auto`, `header:NAME`, `cookie:NAME`, `path`, `client-ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "auto" | "hash-key" => return Ok(KeySource::Auto),
            "path" => return Ok(KeySource::Path),
            "client-ip" | "ip" => return Ok(KeySource::ClientIp),
            _ => {}
        }
        if let Some(name) = lower.strip_prefix("header:").filter(|n| !n.is_empty()) {
            return Ok(KeySource::Header(name.to_string()));
        }
        if let Some(name) = s
            .get(7..)
            .filter(|n| lower.starts_with("cookie:") && !n.is_empty())
        {
            return Ok(KeySource::Cookie(name.to_string()));
        }
        Err(format!(
            "option `key`: expected {}, got `{s}`",
            Self::SYNTAX
        ))
    }

    /// The `key` option, or `default` when it is not given.
    pub fn option(options: &mut Options, default: KeySource) -> Result<Self, String> {
        options
            .string("key")
            .map_or(Ok(default), |s| Self::parse(&s))
    }

    /// The key for the current request; falls back to the client IP when the source is absent,
    /// so every request still maps somewhere stable.
    pub fn key(&self, host: &dyn Host) -> String {
        let found = match self {
            KeySource::Auto => host.hash_key(),
            KeySource::Header(name) => host.header(name),
            KeySource::Cookie(name) => host
                .header("cookie")
                .and_then(|c| cookie_value(&c, name).map(str::to_string)),
            KeySource::Path => Some(host.path()),
            KeySource::ClientIp => None,
        };
        found.unwrap_or_else(|| host.client_ip())
    }
}

/// The value of cookie `name` in a `Cookie` header value.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            KeySource::parse("header:X-User"),
            Ok(KeySource::Header("x-user".into()))
        );
        assert_eq!(
            KeySource::parse("cookie:sid"),
            Ok(KeySource::Cookie("sid".into()))
        );
        assert!(KeySource::parse("body").unwrap_err().contains("`key`"));
        assert_eq!(cookie_value("a=1; sid=abc", "sid"), Some("abc"));
    }

    #[test]
    fn option_with_a_default() {
        let mut o = Options::from_pairs(&[("key", "path")]);
        assert_eq!(
            KeySource::option(&mut o, KeySource::Auto),
            Ok(KeySource::Path)
        );
        assert!(o.finish().is_ok(), "the option counts as read");
        let mut o = Options::default();
        assert_eq!(
            KeySource::option(&mut o, KeySource::Auto),
            Ok(KeySource::Auto)
        );
        let mut o = Options::from_pairs(&[("key", "body")]);
        assert!(KeySource::option(&mut o, KeySource::Auto).is_err());
    }
}
