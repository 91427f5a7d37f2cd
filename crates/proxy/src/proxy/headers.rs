//! Forwarding policy at the proxy boundary (RFC 9110 §7.6): `X-Forwarded-For`,
//! `X-Forwarded-Proto` and `Via` added to requests, requests put in the origin form an
//! HTTP/1.1 backend expects (hop-by-hop fields out: [`lbwasm_http::strip_hop_by_hop`]), and
//! the listener's hash key resolved. How heads are parsed and written is the codec's
//! ([`lbwasm_http`]); what the proxy adds to them is decided here.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};
use lbwasm_http::{Fields, ReqHead, end_request_head, push_field, write_request_line};

use crate::config::HashKey;

/// The `X-Forwarded-For` value this proxy adds for a client (computed once per connection).
pub(crate) fn client_value(client: IpAddr) -> Forwarded {
    Forwarded {
        addr: HeaderValue::from_str(&client.to_string())
            .unwrap_or(HeaderValue::from_static("unknown")),
        https: false,
    }
}

/// The client as the forwarding fields tell the backend about it.
pub(crate) struct Forwarded {
    /// Its `X-Forwarded-For` element.
    pub(crate) addr: HeaderValue,
    /// It came over TLS: `X-Forwarded-Proto: https`.
    pub(crate) https: bool,
}

impl Forwarded {
    fn proto(&self) -> &'static str {
        if self.https { "https" } else { "http" }
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
        lbwasm_http::strip_hop_by_hop(map, head.upgrade);
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
    client: &Forwarded,
    via: bool,
    length: Option<u64>,
    chunked: bool,
) {
    write_request_line(out, &head.method, &head.uri);
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
    extended(out, "x-forwarded-for", client.addr.as_bytes());
    out.extend_from_slice(b"x-forwarded-proto: ");
    out.extend_from_slice(client.proto().as_bytes());
    out.extend_from_slice(b"\r\n");
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
    end_request_head(out, &head.method, head.upgrade, length, chunked);
}

/// The request an HTTP/2 backend gets (RFC 9113 §8.2.2, §8.3.1): the same fields and
/// forwarding fields as [`encode_request`] writes for HTTP/1.1, `:authority` from `Host`
/// (`authority` when the client sent none), `:scheme` http, no connection-specific fields
/// (an upgrade offer goes as a plain request: HTTP/2 has no `Upgrade`), and `te: trailers`
/// when `trailers` (the client declared it, as gRPC clients must). An invalid field is the
/// client's: the error says which.
pub(crate) fn h2_request<B>(
    head: &ReqHead,
    client: &Forwarded,
    via: bool,
    trailers: bool,
    authority: &str,
    body: B,
) -> Result<http::Request<B>, String> {
    let host = head.fields.get("host").unwrap_or(authority.as_bytes());
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri = Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(target)
        .build()
        .map_err(|e| format!("cannot make an HTTP/2 target of host and path: {e}"))?;
    let mut map = HeaderMap::with_capacity(16);
    for (name, value) in head.fields.iter() {
        let skip = REWRITTEN.iter().any(|r| name.eq_ignore_ascii_case(r))
            || H2_HOP.iter().any(|r| name.eq_ignore_ascii_case(r));
        if skip {
            continue;
        }
        let name = HeaderName::from_bytes(name)
            .map_err(|_| format!("invalid field name {:?}", String::from_utf8_lossy(name)))?;
        let value =
            HeaderValue::from_bytes(value).map_err(|_| format!("invalid value of field {name}"))?;
        map.append(name, value);
    }
    let extended = |list: &[u8], last: &[u8]| -> Option<HeaderValue> {
        let mut v = list.trim_ascii().to_vec();
        if !v.is_empty() {
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(last);
        HeaderValue::from_bytes(&v).ok()
    };
    let joined = |name: &str| -> Vec<u8> {
        let mut all = Vec::new();
        for v in head.fields.get_all(name).map(<[u8]>::trim_ascii) {
            if !v.is_empty() {
                if !all.is_empty() {
                    all.extend_from_slice(b", ");
                }
                all.extend_from_slice(v);
            }
        }
        all
    };
    if let Some(v) = extended(&joined("x-forwarded-for"), client.addr.as_bytes()) {
        map.insert(X_FORWARDED_FOR, v);
    }
    map.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.proto()));
    if via {
        let received: &[u8] = match head.version {
            Version::HTTP_2 => b"2 lbwasm",
            Version::HTTP_10 => b"1.0 lbwasm",
            _ => b"1.1 lbwasm",
        };
        if let Some(v) = extended(&joined("via"), received) {
            map.insert(header::VIA, v);
        }
    } else {
        for v in head.fields.get_all("via") {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                map.append(header::VIA, v);
            }
        }
    }
    if trailers {
        map.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let mut req = http::Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = map;
    Ok(req)
}

/// Fields HTTP/2 has no place for (RFC 9113 §8.2.2), besides those the writer rewrites:
/// `Host` becomes `:authority`; an upgrade offer is not forwarded.
const H2_HOP: [&[u8]; 7] = [
    b"host",
    b"upgrade",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"http2-settings",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

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
        // A TCP listener's key; an HTTP request has no ClientHello of its own to offer.
        HashKey::Sni => None,
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
    use bytes::BytesMut;
    use http::Request;
    use lbwasm_http::parse_request;

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
    fn raw_fields_go_on_as_sent_less_hop_by_hop_ones() {
        let head = parse_request(&mut BytesMut::from(
            "GET http://example.test:81/a?b HTTP/1.0\r\nX-Kept: 1\r\nConnection: keep-alive, X-Gone\r\n\
             X-Gone: 2\r\nKeep-Alive: timeout=5\r\n\r\n"
                .as_bytes(),
        ))
        .unwrap()
        .unwrap();
        assert!(head.keep_alive);
        let mut req = head.req;
        assert!(matches!(req.fields, Fields::Raw(_)));
        // Absolute form without a Host: the target's authority becomes one.
        prepare_request(&mut req);
        let mut out = Vec::new();
        let client = client_value("10.0.0.1".parse().unwrap());
        encode_request(&mut out, &req, &client, true, None, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a?b HTTP/1.1\r\nx-kept: 1\r\nhost: example.test:81\r\n\
             x-forwarded-for: 10.0.0.1\r\nx-forwarded-proto: http\r\nvia: 1.0 lbwasm\r\n\r\n"
        );
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
        assert!(lbwasm_http::wants_upgrade(
            h.version,
            fields.iter().copied()
        ));
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
