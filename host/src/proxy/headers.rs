//! Header rewriting at the proxy boundary (RFC 9110 §7.6): hop-by-hop headers stripped
//! both ways, `X-Forwarded-For`/`X-Forwarded-Proto`/`Via` added to requests, requests put in
//! the origin form an HTTP/1.1 backend expects, and the listener's hash key resolved.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Uri, Version};

use crate::config::HashKey;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

const HTTP: HeaderValue = HeaderValue::from_static("http");
const UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

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
/// the proxy then passes through.
pub(crate) fn wants_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_has(headers, "upgrade")
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`. With `keep_upgrade` (a protocol
/// switch being passed through) `Upgrade` stays and `Connection: upgrade` is set again.
/// Allocation-free unless `Connection` names unusual headers or `Proxy-*` ones are present.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
    if keep_upgrade {
        headers.insert(header::CONNECTION, UPGRADE);
    }
}

/// The most headers a request or response head may have.
pub(crate) const MAX_HEADERS: usize = 128;

/// Where one header's name and value lie in a head's buffer.
pub(crate) type Span = (u32, u32, u32, u32);

/// Storage for a head's [`spans`], left uninitialised (a 2 KiB memset per head showed in
/// profiles; so did returning it by value).
pub(crate) type SpanStore = [std::mem::MaybeUninit<Span>; MAX_HEADERS];

/// An empty [`SpanStore`].
pub(crate) const fn span_store() -> SpanStore {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Records in `out` where `parsed`'s names and values lie relative to `base` (the start of
/// the buffer they were parsed from), so that both can be cut from that buffer once it is
/// frozen: no copy, and no allocation. Returns the spans written.
pub(crate) fn spans<'s>(
    base: *const u8,
    parsed: &[httparse::Header<'_>],
    out: &'s mut SpanStore,
) -> &'s [Span] {
    let base = base as usize;
    let mut len = 0;
    for (slot, h) in out.iter_mut().zip(parsed) {
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (h.value.as_ptr() as usize - base) as u32;
        slot.write((
            name,
            name + h.name.len() as u32,
            value,
            value + h.value.len() as u32,
        ));
        len += 1;
    }
    // SAFETY: the first `len` entries were just written; `MaybeUninit<T>` has `T`'s layout.
    unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<Span>(), len) }
}

/// The header map of a head whose headers are at `spans` in `head`, less those `skip`
/// marks; values share the head's buffer.
pub(crate) fn header_map(
    head: &bytes::Bytes,
    spans: &[Span],
    skip: &HopByHop,
) -> Result<HeaderMap, String> {
    // Room for the forwarding headers a request gets, so that adding them does not grow it.
    let mut map = HeaderMap::with_capacity(spans.len() + 3);
    for (i, &(ns, ne, vs, ve)) in spans.iter().enumerate() {
        if skip.0 & (1 << i) != 0 {
            continue;
        }
        let raw = &head[ns as usize..ne as usize];
        let name = HeaderName::from_bytes(raw)
            .map_err(|_| format!("header name {:?}", String::from_utf8_lossy(raw)))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| format!("value of header {name}"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Which headers of a parsed head (by position, up to [`MAX_HEADERS`]) are hop-by-hop: the
/// same set [`strip_hop_by_hop`] removes from a map, found before the map is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HopByHop(u128);

impl HopByHop {
    /// Marks the hop-by-hop headers of `parsed`; with `keep_upgrade` (a protocol switch)
    /// `Upgrade` is kept (`Connection` is not: the proxy sets its own).
    pub(crate) fn of(parsed: &[httparse::Header<'_>], keep_upgrade: bool) -> Self {
        const FIXED: [&str; 5] = [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
        ];
        let listed = |name: &str| {
            parsed
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .flat_map(|h| h.value.split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .any(|t| {
                    t.eq_ignore_ascii_case(name.as_bytes()) && !t.eq_ignore_ascii_case(b"host")
                })
        };
        let mut bits = 0u128;
        let mut has_connection = false;
        for (i, h) in parsed.iter().enumerate().take(MAX_HEADERS) {
            let n = h.name;
            has_connection |= n.eq_ignore_ascii_case("connection");
            let hop = FIXED.iter().any(|f| n.eq_ignore_ascii_case(f))
                || (!keep_upgrade && n.eq_ignore_ascii_case("upgrade"))
                || n.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("proxy-"));
            if hop {
                bits |= 1 << i;
            }
        }
        if has_connection {
            for (i, h) in parsed.iter().enumerate().take(MAX_HEADERS) {
                if bits & (1 << i) == 0
                    && !(keep_upgrade && h.name.eq_ignore_ascii_case("upgrade"))
                    && listed(h.name)
                {
                    bits |= 1 << i;
                }
            }
        }
        HopByHop(bits)
    }
}

/// The body length that `Content-Length` values declare (RFC 9112 §6.3): every item of
/// every value digits only, and all the same (`3, 3` is 3). Requests and responses share it,
/// so that both sides of the proxy refuse the same ambiguous framings.
pub(crate) fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, String> {
    let mut length = None;
    for item in values.flat_map(|v| v.split(|&b| b == b',')) {
        let item = item.trim_ascii();
        let n: u64 = (!item.is_empty() && item.len() <= 19 && item.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(item).ok()?.parse().ok())
            .flatten()
            .ok_or_else(|| format!("invalid Content-Length {:?}", String::from_utf8_lossy(item)))?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values".into());
        }
        length = Some(n);
    }
    Ok(length)
}

/// Whether a `Connection` header lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `X-Forwarded-For` value this proxy adds for a client (computed once per connection).
pub(crate) fn client_value(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Makes a client request fit to send to an HTTP/1.1 backend: origin-form URI, a `Host`
/// header (HTTP/2 carries it in `:authority`), hop-by-hop headers stripped, and the
/// forwarding headers added.
pub(crate) fn prepare_request(parts: &mut Parts, client: &HeaderValue, upgrade: bool) {
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if !parts.headers.contains_key(header::HOST)
            && let Some(auth) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(auth.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let origin = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        if let Ok(uri) = origin.parse::<Uri>() {
            parts.uri = uri;
        }
    }
    let received = match parts.version {
        Version::HTTP_2 => "2 lbwasm",
        Version::HTTP_10 => "1.0 lbwasm",
        _ => "1.1 lbwasm",
    };
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // X-Forwarded-For, X-Forwarded-Proto, Via: grow the map once, not per insert.
    parts.headers.reserve(3);

    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .map(HeaderValue::as_bytes)
    {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client.len());
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
            v.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(client.clone()),
    };
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    parts.headers.insert(X_FORWARDED_PROTO.clone(), HTTP);
    let via = match parts.headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {received}")).ok(),
        None => Some(HeaderValue::from_static(received)),
    };
    if let Some(v) = via {
        parts.headers.insert(header::VIA, v);
    }
}

/// The listener's hash key for this request; none when not configured or absent.
pub(crate) fn hash_key(key: Option<&HashKey>, parts: &Parts, client: IpAddr) -> Option<String> {
    match key? {
        HashKey::Header(name) => parts
            .headers
            .get(name.as_str())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        HashKey::Cookie(name) => cookie(&parts.headers, name),
        HashKey::Path => Some(
            parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string(),
        ),
        HashKey::ClientIp => Some(client.to_string()),
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_stripped() {
        let mut p = parts(
            Request::get("/x")
                .header("connection", "keep-alive, x-secret")
                .header("keep-alive", "timeout=5")
                .header("x-secret", "1")
                .header("te", "trailers")
                .header("proxy-authorization", "basic x")
                .header("x-kept", "1")
                .body(())
                .unwrap(),
        );
        prepare_request(&mut p, &client_value("10.0.0.1".parse().unwrap()), false);
        let names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            vec!["x-kept", "x-forwarded-for", "x-forwarded-proto", "via"]
        );
        assert_eq!(p.headers["via"], "1.1 lbwasm");
    }

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
                .filter(|i| skip.0 & (1 << i) == 0)
                .map(|i| raw[i].0)
                .collect()
        };
        assert_eq!(kept(HopByHop::of(&parsed, false)), ["Host", "X-Kept"]);
        assert_eq!(
            kept(HopByHop::of(&parsed, true)),
            ["Host", "Upgrade", "X-Kept"]
        );
        assert_eq!(HopByHop::of(&parsed[3..4], false), HopByHop::default());
    }

    #[test]
    fn forwarding_headers_append() {
        let mut p = parts(
            Request::get("/")
                .header("x-forwarded-for", "1.2.3.4")
                .header("via", "1.0 edge")
                .body(())
                .unwrap(),
        );
        prepare_request(&mut p, &client_value("10.0.0.1".parse().unwrap()), false);
        assert_eq!(p.headers["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["via"], "1.0 edge, 1.1 lbwasm");
    }

    #[test]
    fn h2_requests_become_origin_form_with_a_host() {
        let mut p = parts(
            Request::get("http://example.test:8080/a?b=1")
                .version(Version::HTTP_2)
                .body(())
                .unwrap(),
        );
        prepare_request(&mut p, &client_value("::1".parse().unwrap()), false);
        assert_eq!(p.uri, "/a?b=1");
        assert_eq!(p.headers["host"], "example.test:8080");
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers["via"], "2 lbwasm");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut p = parts(
            Request::get("/ws")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        assert!(wants_upgrade(p.version, &p.headers));
        prepare_request(&mut p, &client_value("10.0.0.1".parse().unwrap()), true);
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["connection"], "upgrade");
    }

    #[test]
    fn hash_keys_resolve() {
        let p = parts(
            Request::get("/p?q")
                .header("x-user", "42")
                .header("cookie", "a=1; sid=\"xyz\"")
                .body(())
                .unwrap(),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            hash_key(Some(&HashKey::Header("x-user".into())), &p, ip).as_deref(),
            Some("42")
        );
        assert_eq!(
            hash_key(Some(&HashKey::Cookie("sid".into())), &p, ip).as_deref(),
            Some("xyz")
        );
        assert_eq!(
            hash_key(Some(&HashKey::Path), &p, ip).as_deref(),
            Some("/p?q")
        );
        assert_eq!(
            hash_key(Some(&HashKey::ClientIp), &p, ip).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(hash_key(None, &p, ip), None);
    }
}
