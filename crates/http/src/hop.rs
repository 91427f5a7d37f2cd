//! Hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every field it names,
//! `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`. They describe
//! one connection, not the message, so a proxy never passes them on. Found in a parsed head
//! ([`HopByHop`], before any map is built) or removed from a map ([`strip_hop_by_hop`]):
//! the same set either way.

use http::Version;
use http::header::{self, HeaderMap, HeaderName};

use crate::fields::Span;
use crate::framing::connection_has;
use crate::head::MAX_HEADERS;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

// The hop-by-hop headers, as bits: one scan of a message's header names says which are
// present, so that only those are looked up again to remove them.
const CONNECTION: u8 = 1;
const TE: u8 = 2;
const TRAILER: u8 = 4;
const TRANSFER_ENCODING: u8 = 8;
const UPGRADE_BIT: u8 = 16;
const KEEP_ALIVE_BIT: u8 = 32;
const PROXY_ANY: u8 = 64;

/// Which hop-by-hop header `name` is (0: none): they describe one connection, not the message.
fn hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        CONNECTION
    } else if name == header::TE {
        TE
    } else if name == header::TRAILER {
        TRAILER
    } else if name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        UPGRADE_BIT
    } else if name == KEEP_ALIVE {
        KEEP_ALIVE_BIT
    } else if name.as_str().starts_with("proxy-") {
        PROXY_ANY
    } else {
        0
    }
}

/// Whether a request asks to switch protocols (`Connection: upgrade` + `Upgrade`), which
/// the proxy then passes through. `fields`: the request's raw (name, value) pairs.
///
/// An offer of `h2c` (RFC 7540 §3.2) is no switch to pass through: it upgrades the
/// client's hop, whose `HTTP2-Settings` are for the proxy, not for a backend (which may not
/// even speak HTTP/1.1). The proxy declines it the way RFC 9110 §7.8 lets a server, by
/// answering in HTTP/1.1: `Upgrade` and `HTTP2-Settings` are dropped as hop-by-hop and the
/// request is forwarded as a plain one. HTTP/2 clients use prior knowledge instead.
pub fn wants_upgrade<'a>(
    version: Version,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> bool {
    let h2c = |v: &[u8]| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    };
    version == Version::HTTP_11
        && fields
            .clone()
            .any(|(n, v)| n.eq_ignore_ascii_case(b"upgrade") && !h2c(v))
        && connection_has(
            fields
                .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
                .map(|(_, v)| v),
            "upgrade",
        )
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`. With `keep_upgrade` (a protocol
/// switch being passed through) `Upgrade` stays (the request's writer sends its own
/// `Connection: upgrade`).
/// Allocation-free unless `Connection` names unusual headers or `Proxy-*` ones are present.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass to find out what there is to do: usually nothing, or `Connection: keep-alive`.
    let present = headers.keys().fold(0, |bits, k| bits | hop_bit(k));
    if present & CONNECTION != 0 {
        let mut listed: Vec<HeaderName> = Vec::new();
        for t in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let t = t.trim();
            let usual = ["", "keep-alive", "close", "upgrade", "te"]
                .iter()
                .any(|u| t.eq_ignore_ascii_case(u));
            // A client cannot make the proxy drop what routes the request.
            if !usual
                && let Ok(n) = HeaderName::from_bytes(t.as_bytes())
                && n != header::HOST
            {
                listed.push(n);
            }
        }
        for n in listed {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    let fixed = [
        (TE, &header::TE),
        (TRAILER, &header::TRAILER),
        (TRANSFER_ENCODING, &header::TRANSFER_ENCODING),
        (KEEP_ALIVE_BIT, &KEEP_ALIVE),
    ];
    for (bit, name) in fixed {
        if present & bit != 0 {
            headers.remove(name);
        }
    }
    if present & UPGRADE_BIT != 0 && !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if present & PROXY_ANY != 0 {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for n in doomed {
            headers.remove(n);
        }
    }
}

/// Which headers of a parsed head (by position, up to [`MAX_HEADERS`]) are hop-by-hop: the
/// same set [`strip_hop_by_hop`] removes from a map, found before the map is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HopByHop(u128);

impl HopByHop {
    /// Whether the field at `index` is hop-by-hop.
    #[inline]
    pub(crate) fn skips(&self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }

    /// The `spans` of the fields that are not hop-by-hop.
    pub(crate) fn keep(&self, spans: &[Span]) -> Vec<Span> {
        let kept = spans.iter().enumerate().filter(|&(i, _)| !self.skips(i));
        kept.map(|(_, s)| *s).collect()
    }

    /// Marks the hop-by-hop headers of `parsed`; with `keep_upgrade` (a protocol switch)
    /// `Upgrade` is kept (`Connection` is not: the proxy sets its own). Linear in the
    /// head's size: the options `Connection` lists are collected once (at most
    /// [`MAX_CONNECTION_OPTIONS`] that are not the usual ones; more are refused), then each
    /// field is looked up among them.
    pub(crate) fn of(parsed: &[httparse::Header<'_>], keep_upgrade: bool) -> Result<Self, String> {
        const FIXED: [&str; 6] = [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            // The settings of an `h2c` upgrade offer: for this hop only (RFC 7540 §3.2.1).
            "http2-settings",
        ];
        let mut listed: [&[u8]; MAX_CONNECTION_OPTIONS] = [&[]; MAX_CONNECTION_OPTIONS];
        let mut count = 0;
        let mut bits = 0u128;
        for (i, h) in parsed.iter().enumerate().take(MAX_HEADERS) {
            let n = h.name;
            if n.eq_ignore_ascii_case("connection") {
                for t in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    let usual = [
                        &b""[..],
                        b"keep-alive",
                        b"close",
                        b"upgrade",
                        b"te",
                        b"host",
                    ]
                    .iter()
                    .any(|u| t.eq_ignore_ascii_case(u));
                    if usual || listed[..count].iter().any(|l| l.eq_ignore_ascii_case(t)) {
                        continue;
                    }
                    if count == MAX_CONNECTION_OPTIONS {
                        return Err(format!(
                            "more than {MAX_CONNECTION_OPTIONS} Connection options"
                        ));
                    }
                    listed[count] = t;
                    count += 1;
                }
            }
            let hop = FIXED.iter().any(|f| n.eq_ignore_ascii_case(f))
                || (!keep_upgrade && n.eq_ignore_ascii_case("upgrade"))
                || n.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("proxy-"));
            if hop {
                bits |= 1 << i;
            }
        }
        if count > 0 {
            let listed = &listed[..count];
            for (i, h) in parsed.iter().enumerate().take(MAX_HEADERS) {
                let name = h.name.as_bytes();
                if bits & (1 << i) == 0 && listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
                    bits |= 1 << i;
                }
            }
        }
        Ok(HopByHop(bits))
    }

    /// Also leaves out the field at `index`.
    pub(crate) fn skip(&mut self, index: usize) {
        if index < MAX_HEADERS {
            self.0 |= 1 << index;
        }
    }
}

/// The most options a `Connection` field may list besides `close`, `keep-alive`,
/// `upgrade` and `te`: real clients name one or two; a list of thousands only costs CPU.
pub(crate) const MAX_CONNECTION_OPTIONS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_found_in_a_parsed_head() {
        let raw = [
            ("Connection", "keep-alive, X-Secret, Host"),
            ("Keep-Alive", "timeout=5"),
            ("x-secret", "1"),
            ("Host", "a"),
            ("Upgrade", "websocket"),
            ("Proxy-Authenticate", "basic"),
            ("Transfer-Encoding", "chunked"),
            ("X-Kept", "1"),
        ];
        let parsed: Vec<httparse::Header<'_>> = raw
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect();
        let kept = |skip: HopByHop| -> Vec<&str> {
            (0..raw.len())
                .filter(|&i| !skip.skips(i))
                .map(|i| raw[i].0)
                .collect()
        };
        assert_eq!(
            kept(HopByHop::of(&parsed, false).unwrap()),
            ["Host", "X-Kept"]
        );
        assert_eq!(
            kept(HopByHop::of(&parsed, true).unwrap()),
            ["Host", "Upgrade", "X-Kept"]
        );
        assert_eq!(
            HopByHop::of(&parsed[3..4], false).unwrap(),
            HopByHop::default()
        );
    }

    #[test]
    fn connection_options_are_bounded() {
        let many: String = (0..=MAX_CONNECTION_OPTIONS)
            .map(|i| format!("x-{i}, "))
            .collect();
        // Repeats and the usual options do not count against the bound.
        let fine = "x-1, X-1, keep-alive, close, te, upgrade, x-1";
        for (value, ok) in [(many.as_str(), false), (fine, true)] {
            let parsed = [httparse::Header {
                name: "Connection",
                value: value.as_bytes(),
            }];
            assert_eq!(HopByHop::of(&parsed, false).is_ok(), ok, "{value}");
        }
    }
}
