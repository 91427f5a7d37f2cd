//! Header rewriting at the proxy boundary (RFC 9110 §7.6): hop-by-hop headers stripped
//! both ways, `X-Forwarded-For`/`X-Forwarded-Proto`/`Via` added to requests, requests put in
//! the origin form an HTTP/1.1 backend expects, and the listener's hash key resolved.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Uri, Version};

use crate::fields::Fields;

use crate::config::HashKey;

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
pub(crate) fn wants_upgrade<'a>(
    version: Version,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> bool {
    version == Version::HTTP_11
        && fields
            .clone()
            .any(|(n, _)| n.eq_ignore_ascii_case(b"upgrade"))
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
}

/// The most headers a request or response head may have.
pub(crate) const MAX_HEADERS: usize = 128;

pub(crate) use crate::fields::Span;

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

/// Which headers of a parsed head (by position, up to [`MAX_HEADERS`]) are hop-by-hop: the
/// same set [`strip_hop_by_hop`] removes from a map, found before the map is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HopByHop(u128);

impl HopByHop {
    /// Whether the field at `index` is hop-by-hop.
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
        const FIXED: [&str; 5] = [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
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

/// Whether `Connection` values list `token`.
pub(crate) fn connection_has<'a>(values: impl Iterator<Item = &'a [u8]>, token: &str) -> bool {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The `X-Forwarded-For` value this proxy adds for a client (computed once per connection).
pub(crate) fn client_value(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// A client's request head, as the proxy forwards it.
#[derive(Debug)]
pub(crate) struct ReqHead {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    /// As the client spoke (a backend always gets HTTP/1.1; `Via` says which it was).
    pub(crate) version: Version,
    pub(crate) fields: Fields,
    /// A protocol switch passed through: `Upgrade` is kept, `Connection: upgrade` sent.
    pub(crate) upgrade: bool,
}

impl ReqHead {
    /// A request head from hyper (HTTP/2).
    pub(crate) fn from_parts(parts: Parts) -> Self {
        ReqHead {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            fields: Fields::Map(parts.headers),
            upgrade: false,
        }
    }
}

/// Makes a client request fit to send to an HTTP/1.1 backend: origin-form target, a `Host`
/// field (HTTP/2 carries it in `:authority`), and no hop-by-hop fields (raw ones were left
/// out as the head was parsed). The forwarding fields are added as it is written
/// ([`encode_request`]).
pub(crate) fn prepare_request(head: &mut ReqHead) {
    if head.uri.scheme().is_some() || head.uri.authority().is_some() {
        // The target's authority is the host (RFC 9112 §3.2.2, RFC 9113 §8.3.1): a `Host`
        // that says otherwise is replaced (an HTTP/1.1 parser has already left it out).
        let host = head.uri.authority().map(|a| match a.port() {
            // Never the userinfo of `http://user@host/`: Host is `uri-host [":" port]`.
            Some(port) => format!("{}:{port}", a.host()),
            None => a.host().to_string(),
        });
        if let Some(host) = host
            && let Ok(v) = HeaderValue::from_str(&host)
            && head.fields.get("host") != Some(v.as_bytes())
        {
            // HTTP/2, or an absolute-form request: rare enough for a map.
            // A raw field the map refuses keeps the fields raw, without the `Host`.
            let map = match &head.fields {
                Fields::Raw(raw) => raw.to_map().ok(),
                Fields::Map(_) => None,
            };
            if let Some(map) = map {
                head.fields = Fields::Map(map);
            }
            if let Fields::Map(map) = &mut head.fields {
                map.insert(header::HOST, v);
            }
        }
        let origin = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        if let Ok(uri) = origin.parse::<Uri>() {
            head.uri = uri;
        }
    }
    if let Fields::Map(map) = &mut head.fields {
        strip_hop_by_hop(map, head.upgrade);
    }
}

/// Fields a request's writer leaves out because it writes its own: the framing, `Expect`
/// (the proxy reads the client's body itself and answers `100 Continue` when it starts
/// to), the forwarding fields (extended) and `Connection`.
const REWRITTEN: [&[u8]; 6] = [
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"via",
    b"connection",
];

/// Writes `head` as an HTTP/1.1 backend gets it: request line, the client's fields, then
/// `X-Forwarded-For` (the client's list with `client` appended), `X-Forwarded-Proto` and,
/// with `via`, `Via` (likewise extended; off by default, as in NGINX, HAProxy and Envoy:
/// NGINX backends with `gzip_proxied off` stop compressing for a request with `Via`), and
/// the body's framing: `length`, the body's exact length (a
/// `Content-Length` is written for it, replacing the client's), or `chunked`.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    head: &ReqHead,
    client: &HeaderValue,
    via: bool,
    length: Option<u64>,
    chunked: bool,
) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in head.fields.iter() {
        if !REWRITTEN.iter().any(|r| name.eq_ignore_ascii_case(r)) {
            push_field(out, name, value);
        }
    }
    let extended = |out: &mut Vec<u8>, name: &str, last: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        for v in head.fields.get_all(name).map(<[u8]>::trim_ascii) {
            if !v.is_empty() {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(last);
        out.extend_from_slice(b"\r\n");
    };
    extended(out, "x-forwarded-for", client.as_bytes());
    out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    if via {
        let received: &[u8] = match head.version {
            Version::HTTP_2 => b"2 lbwasm",
            Version::HTTP_10 => b"1.0 lbwasm",
            _ => b"1.1 lbwasm",
        };
        extended(out, "via", received);
    } else {
        // Not ours to add, but the client's own `Via` goes on as it came.
        for v in head.fields.get_all("via") {
            push_field(out, b"via", v);
        }
    }
    if head.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if head.method == Method::POST || head.method == Method::PUT {
        // An empty body still says so: some servers wait for a body otherwise.
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The listener's hash key for this request; none when not configured or absent.
pub(crate) fn hash_key(key: Option<&HashKey>, head: &ReqHead, client: IpAddr) -> Option<String> {
    match key? {
        HashKey::Header(name) => head
            .fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        HashKey::Cookie(name) => cookie(&head.fields, name),
        HashKey::Path => Some(
            head.uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string(),
        ),
        HashKey::ClientIp => Some(client.to_string()),
    }
}

fn cookie(fields: &Fields, name: &str) -> Option<String> {
    fields
        .get_all("cookie")
        .flat_map(|v| v.split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = std::str::from_utf8(pair).ok()?;
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn head(req: Request<()>) -> ReqHead {
        ReqHead::from_parts(req.into_parts().0)
    }

    /// The head as a backend gets it, and its field lines after the request line.
    fn encoded(head: &ReqHead, client: &str) -> (String, Vec<String>) {
        let mut out = Vec::new();
        encode_request(
            &mut out,
            head,
            &client_value(client.parse().unwrap()),
            true,
            None,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        let lines = text
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        (text, lines)
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_stripped() {
        let mut h = head(
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
        prepare_request(&mut h);
        let (_, lines) = encoded(&h, "10.0.0.1");
        assert_eq!(
            lines,
            [
                "x-kept: 1",
                "x-forwarded-for: 10.0.0.1",
                "x-forwarded-proto: http",
                "via: 1.1 lbwasm"
            ]
        );
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

    #[test]
    fn via_is_added_only_when_asked() {
        let h = head(
            Request::get("/")
                .header("host", "x")
                .header("via", "1.0 edge")
                .body(())
                .unwrap(),
        );
        let client = client_value("10.0.0.1".parse().unwrap());
        let mut out = Vec::new();
        encode_request(&mut out, &h, &client, false, None, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 10.0.0.1\r\n\
             x-forwarded-proto: http\r\nvia: 1.0 edge\r\n\r\n"
        );
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = head(
            Request::get("/")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-forwarded-for", "5.6.7.8")
                .header("x-forwarded-proto", "https")
                .header("via", "1.0 edge")
                .body(())
                .unwrap(),
        );
        prepare_request(&mut h);
        let (_, lines) = encoded(&h, "10.0.0.1");
        assert_eq!(
            lines,
            [
                "x-forwarded-for: 1.2.3.4, 5.6.7.8, 10.0.0.1",
                "x-forwarded-proto: http",
                "via: 1.0 edge, 1.1 lbwasm"
            ]
        );
    }

    #[test]
    fn heads_are_encoded_with_the_body_framing() {
        let h = head(
            Request::post("/a?b=1")
                .header("host", "x")
                .header("content-length", "999")
                .header("expect", "100-continue")
                .body(())
                .unwrap(),
        );
        let client = client_value("10.0.0.1".parse().unwrap());
        let mut out = Vec::new();
        encode_request(&mut out, &h, &client, true, Some(3), false);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 10.0.0.1\r\n\
             x-forwarded-proto: http\r\nvia: 1.1 lbwasm\r\ncontent-length: 3\r\n\r\n"
        );
        encode_request(&mut out, &h, &client, true, None, true);
        assert!(
            String::from_utf8(out.clone())
                .unwrap()
                .ends_with("transfer-encoding: chunked\r\n\r\n")
        );
        encode_request(&mut out, &h, &client, true, None, false);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with("content-length: 0\r\n\r\n")
        );
    }

    #[test]
    fn h2_requests_become_origin_form_with_a_host() {
        let mut h = head(
            Request::get("http://example.test:8080/a?b=1")
                .version(Version::HTTP_2)
                .body(())
                .unwrap(),
        );
        prepare_request(&mut h);
        assert_eq!(h.uri, "/a?b=1");
        let (text, lines) = encoded(&h, "::1");
        assert!(text.starts_with("GET /a?b=1 HTTP/1.1\r\n"), "{text}");
        assert_eq!(lines[0], "host: example.test:8080");
        assert_eq!(lines[3], "via: 2 lbwasm");
    }

    #[test]
    fn the_authority_wins_over_a_host_field() {
        let mut h = head(
            Request::get("http://good.example/a")
                .version(Version::HTTP_2)
                .header("host", "evil.example")
                .body(())
                .unwrap(),
        );
        prepare_request(&mut h);
        let (_, lines) = encoded(&h, "::1");
        assert_eq!(lines[0], "host: good.example");
        assert!(!lines.iter().any(|l| l.contains("evil")), "{lines:?}");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = head(
            Request::get("/ws")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        let fields: Vec<_> = h.fields.iter().collect();
        assert!(wants_upgrade(h.version, fields.iter().copied()));
        h.upgrade = true;
        prepare_request(&mut h);
        let (_, lines) = encoded(&h, "10.0.0.1");
        assert_eq!(lines[0], "upgrade: websocket");
        assert_eq!(lines[4], "connection: upgrade");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn hash_keys_resolve() {
        let h = head(
            Request::get("/p?q")
                .header("x-user", "42")
                .header("cookie", "a=1; sid=\"xyz\"")
                .body(())
                .unwrap(),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            hash_key(Some(&HashKey::Header("X-User".into())), &h, ip).as_deref(),
            Some("42")
        );
        assert_eq!(
            hash_key(Some(&HashKey::Cookie("sid".into())), &h, ip).as_deref(),
            Some("xyz")
        );
        assert_eq!(
            hash_key(Some(&HashKey::Path), &h, ip).as_deref(),
            Some("/p?q")
        );
        assert_eq!(
            hash_key(Some(&HashKey::ClientIp), &h, ip).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(hash_key(None, &h, ip), None);
    }
}
