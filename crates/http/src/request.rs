//! Request heads: parsed strictly as a client sent them ([`parse_request`]), and written
//! as a backend gets them ([`write_request_line`], then the fields, then
//! [`end_request_head`]).
//!
//! Request framing is strict, because a proxy that reads a body differently from the
//! backend behind it lets one request hide inside another (request smuggling, RFC 9112
//! §11.2): `Transfer-Encoding` together with `Content-Length` is refused, a transfer coding
//! other than exactly `chunked` is refused (501), so is one in an HTTP/1.0 request, and so
//! are differing or malformed `Content-Length` values; HTTP/1.1 requests need exactly one
//! `Host`. The body goes to the backend re-framed by the proxy, never as the client framed it.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::request::Parts;
use http::{Method, StatusCode, Uri, Version};

use crate::fields::{Fields, RawFields};
use crate::framing::{BodyFraming, connection_has, content_length};
use crate::head::{MAX_HEADERS, itoa_buf, push_field, span_store, spans};
use crate::hop::{HopByHop, wants_upgrade};

/// A client's request head, as the proxy forwards it.
#[derive(Debug)]
pub struct ReqHead {
    /// The method.
    pub method: Method,
    /// The target, as the client sent it (the proxy puts it in origin form).
    pub uri: Uri,
    /// As the client spoke (a backend always gets HTTP/1.1; `Via` says which it was).
    pub version: Version,
    /// Its fields, less the hop-by-hop ones when parsed here.
    pub fields: Fields,
    /// A protocol switch passed through: `Upgrade` is kept, `Connection: upgrade` sent.
    pub upgrade: bool,
    /// The client takes trailers (`TE: trailers`, RFC 9110 §10.1.4): a hop-by-hop field,
    /// left out of `fields`, but what it says decides whether trailers are sent to this
    /// client and whether `te: trailers` goes on to an HTTP/2 backend.
    pub trailers: bool,
}

impl ReqHead {
    /// A request head from hyper (HTTP/2).
    pub fn from_parts(parts: Parts) -> Self {
        let trailers = parts
            .headers
            .get_all(http::header::TE)
            .iter()
            .any(|v| te_trailers(v.as_bytes()));
        ReqHead {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            fields: Fields::Map(parts.headers),
            upgrade: false,
            trailers,
        }
    }
}

/// Whether a `TE` value lists `trailers`.
fn te_trailers(v: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// A parsed request head and what the connection needs to know about it.
#[derive(Debug)]
pub struct ParsedRequest {
    /// The head, as it goes on.
    pub req: ReqHead,
    /// How its body is delimited; none: it has none.
    pub body: Option<BodyFraming>,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
}

/// Why a request is refused before it is forwarded: the status to answer, and the cause.
#[derive(Debug, PartialEq, Eq)]
pub struct Reject(pub StatusCode, pub String);

/// A [`Reject`] with `status` for `why`.
pub fn reject(status: StatusCode, why: impl Into<String>) -> Reject {
    Reject(status, why.into())
}

/// Parses a request head off the front of `buf` (None: incomplete; the caller bounds the
/// wait at [`crate::MAX_HEAD`]). Header values share the head's buffer; what follows (body,
/// next requests) stays in `buf`.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<ParsedRequest>, Reject> {
    // Uninitialised: a 4 KiB memset per request would show in profiles.
    let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut parsed,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} request headers"),
            ));
        }
        Err(httparse::Error::Version) => {
            return Err(reject(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "only HTTP/1.0 and HTTP/1.1 are served in this form",
            ));
        }
        Err(e) => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                format!("invalid request: {e}"),
            ));
        }
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| reject(StatusCode::BAD_REQUEST, "invalid method"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let path = req.path.unwrap_or("");
    let base = buf.as_ptr() as usize;
    let path_span = (path.as_ptr() as usize - base, path.len());
    if method == Method::CONNECT {
        return Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served by a reverse proxy",
        ));
    }
    // Everything is decided on the raw fields; only what goes on is kept, unparsed.
    let fields = req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let all = |name: &'static str| {
        fields
            .clone()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    };
    let body = framing(
        version,
        all("transfer-encoding"),
        all("content-length").peekable(),
    )?;
    if version == Version::HTTP_11 {
        let mut hosts = all("host");
        match (hosts.next(), hosts.next()) {
            (Some(_), None) => {}
            (None, _) => return Err(reject(StatusCode::BAD_REQUEST, "missing Host header")),
            (Some(_), Some(_)) => {
                return Err(reject(StatusCode::BAD_REQUEST, "more than one Host header"));
            }
        }
    }
    let keep_alive = if version == Version::HTTP_11 {
        !connection_has(all("connection"), "close")
    } else {
        connection_has(all("connection"), "keep-alive")
    };
    let expect_continue = version == Version::HTTP_11
        && body.is_some()
        && all("expect")
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    // A switch needs the connection free of a body.
    let trailers = version == Version::HTTP_11 && all("te").any(te_trailers);
    let upgrade = body.is_none() && wants_upgrade(version, fields);
    let mut hop =
        HopByHop::of(req.headers, upgrade).map_err(|why| reject(StatusCode::BAD_REQUEST, why))?;
    // Absolute form (`GET http://a.example/x`): the target's authority is the request's
    // host, whatever `Host` says (RFC 9112 §3.2.2); it becomes the `Host` sent on.
    let absolute = !path.starts_with('/') && path != "*";
    if absolute {
        for (i, h) in req.headers.iter().enumerate() {
            if h.name.eq_ignore_ascii_case("host") {
                hop.skip(i);
            }
        }
    }
    let mut store = span_store();
    let spans = spans(buf.as_ptr(), req.headers, &mut store);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_span.0..path_span.0 + path_span.1))
        .ok()
        .filter(|uri| !absolute || uri.authority().is_some_and(|a| !a.host().is_empty()))
        .ok_or_else(|| reject(StatusCode::BAD_REQUEST, "invalid request target"))?;
    Ok(Some(ParsedRequest {
        req: ReqHead {
            method,
            uri,
            version,
            fields: Fields::Raw(RawFields::new(head, hop.keep(spans))),
            upgrade,
            trailers,
        },
        body,
        keep_alive,
        expect_continue,
    }))
}

/// How a request's body is delimited (RFC 9112 §6.3) by its `Transfer-Encoding` and
/// `Content-Length` values; refuses what could be read two ways.
fn framing<'a>(
    version: Version,
    codings: impl Iterator<Item = &'a [u8]>,
    mut lengths: std::iter::Peekable<impl Iterator<Item = &'a [u8]>>,
) -> Result<Option<BodyFraming>, Reject> {
    let mut codings = codings.peekable();
    if codings.peek().is_some() {
        if version == Version::HTTP_10 {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if lengths.peek().is_some() {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "both Transfer-Encoding and Content-Length",
            ));
        }
        let mut list = codings
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty());
        return match (list.next(), list.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Some(BodyFraming::Chunked)),
            _ => Err(reject(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            )),
        };
    }
    let length = content_length(lengths).map_err(|why| reject(StatusCode::BAD_REQUEST, why))?;
    Ok(match length {
        None | Some(0) => None,
        Some(n) => Some(BodyFraming::Length(n)),
    })
}

/// Starts a request head for an HTTP/1.1 backend in `out` (cleared): the request line,
/// in origin form. The fields follow ([`push_field`]), then [`end_request_head`].
pub fn write_request_line(out: &mut Vec<u8>, method: &Method, uri: &Uri) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Ends a request head: `Connection: upgrade` for a protocol switch, and the body's
/// framing, the proxy's own: `length`, the body's exact length, or `chunked`. The
/// request's own framing fields and `Connection` must have been left out.
pub fn end_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    upgrade: bool,
    length: Option<u64>,
    chunked: bool,
) {
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if let Some(n) = length {
        push_field(out, b"content-length", itoa_buf(n).as_bytes());
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if method == Method::POST || method == Method::PUT {
        // An empty body still says so: some servers wait for a body otherwise.
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunked::ChunkDecoder;
    use crate::head::MAX_HEAD;
    use crate::testing::{Feed, body, chunked, mutate, rng, same_however_split, splits, word};

    fn parse(raw: &str) -> Result<Option<ParsedRequest>, Reject> {
        parse_request(&mut BytesMut::from(raw.as_bytes()))
    }

    fn refused(raw: &str) -> (u16, String) {
        match parse(raw) {
            Err(Reject(s, why)) => (s.as_u16(), why),
            Ok(_) => panic!("accepted: {raw:?}"),
        }
    }

    #[test]
    fn requests_parse_with_their_framing() {
        let mut buf = BytesMut::from(
            &b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhelloGET"[..],
        );
        let head = parse_request(&mut buf).unwrap().unwrap();
        assert_eq!(head.req.method, Method::POST);
        assert_eq!(head.req.uri, "/a?b=1");
        assert_eq!(head.body, Some(BodyFraming::Length(5)));
        assert!(head.keep_alive && head.expect_continue && !head.req.upgrade);
        assert_eq!(&buf[..], b"helloGET");

        let head = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive && head.body.is_none());
        let head = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.keep_alive);
        let head = parse(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(head.req.upgrade);
        // An h2c offer is declined: a plain request, without `Upgrade` or its settings.
        let head = parse(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Kept: 1\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!head.req.upgrade);
        let names: Vec<String> = head
            .req
            .fields
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).to_ascii_lowercase())
            .collect();
        assert_eq!(names, ["host", "x-kept"]);
        let head = parse("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Some(BodyFraming::Chunked));
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for (raw, status, why) in [
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                400,
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
                "chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
                "chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
                501,
                "chunked",
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "HTTP/1.0",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
                "conflicting",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n",
                400,
                "Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
                400,
                "Content-Length",
            ),
            ("GET / HTTP/1.1\r\n\r\n", 400, "missing Host"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                400,
                "more than one Host",
            ),
            ("GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "invalid"),
            (
                "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
                400,
                "invalid",
            ),
            (
                "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
                405,
                "CONNECT",
            ),
            ("GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "HTTP/1"),
        ] {
            let (s, w) = refused(raw);
            assert_eq!(s, status, "{raw:?}: {w}");
            assert!(w.contains(why), "{raw:?}: {w}");
        }
        let same = parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(same.body, Some(BodyFraming::Length(3)));
    }

    /// A request as the tests see it after parsing: method, target, fields, body.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        method: String,
        target: String,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        body: Vec<u8>,
    }

    /// Parses `input` as a client's pipelined requests, arriving in the pieces that `cuts`
    /// make, the way the connection does: heads by [`parse_request`] (and the chunked check
    /// of what came with them), bodies by their framing.
    fn decode_stream(input: &[u8], cuts: &[usize]) -> Result<Vec<Seen>, String> {
        let mut feed = Feed::new(input, cuts);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        loop {
            let head = loop {
                if !buf.is_empty() {
                    match parse_request(&mut buf) {
                        Ok(Some(h)) => break h,
                        Ok(None) if buf.len() >= MAX_HEAD => return Err("head too large".into()),
                        Ok(None) => {}
                        Err(Reject(_, why)) => return Err(why),
                    }
                }
                if !feed.more(&mut buf) {
                    return if buf.is_empty() {
                        Ok(out)
                    } else {
                        Err("incomplete head".into())
                    };
                }
            };
            let body = match head.body {
                None => Vec::new(),
                Some(BodyFraming::Length(n)) => feed.length(&mut buf, n)?,
                Some(BodyFraming::Chunked) => {
                    let mut decoder = ChunkDecoder::default();
                    decoder.check(&buf)?;
                    feed.chunked(&mut buf, &mut decoder)?
                }
            };
            let Fields::Raw(raw) = &head.req.fields else {
                return Err("fields not raw".into());
            };
            out.push(Seen {
                method: head.req.method.to_string(),
                target: head.req.uri.to_string(),
                fields: raw.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                body,
            });
        }
    }

    /// A random valid request and how it must parse.
    fn random_request(rng: &mut rand::rngs::SmallRng, chunked_body: bool) -> (Vec<u8>, Seen) {
        use rand::Rng as _;
        let method = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"][rng.random_range(0..6)];
        let target = format!("/{}?{}={}", word(rng, 12), word(rng, 4), word(rng, 8));
        let mut fields = vec![(b"Host".to_vec(), word(rng, 10).into_bytes())];
        for _ in 0..rng.random_range(0..6) {
            fields.push((
                format!("X-{}", word(rng, 8)).into_bytes(),
                word(rng, 20).into_bytes(),
            ));
        }
        let mut raw = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
        let data = body(rng);
        let framing = if chunked_body || (method != "GET" && rng.random_bool(0.5)) {
            Some(true)
        } else if method != "GET" {
            Some(false)
        } else {
            None
        };
        if framing == Some(false) {
            fields.push((
                b"Content-Length".to_vec(),
                data.len().to_string().into_bytes(),
            ));
        }
        for (n, v) in &fields {
            raw.extend_from_slice(n);
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v);
            raw.extend_from_slice(b"\r\n");
        }
        if framing == Some(true) {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        match framing {
            Some(true) => raw.extend_from_slice(&chunked(rng, &data)),
            Some(false) => raw.extend_from_slice(&data),
            None => {}
        }
        let seen = Seen {
            method: method.into(),
            target,
            fields,
            body: if framing.is_some() { data } else { Vec::new() },
        };
        (raw, seen)
    }

    #[test]
    fn requests_parse_the_same_however_they_are_split() {
        for case in 0..300 {
            let mut rng = rng(case);
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..3 {
                let (raw, seen) = random_request(&mut rng, false);
                input.extend_from_slice(&raw);
                expected.push(seen);
            }
            let whole = decode_stream(&input, &[]);
            assert_eq!(whole, Ok(expected), "case {case}");
            same_however_split(&mut rng, &input, &whole, decode_stream);
        }
    }

    #[test]
    fn mutated_requests_fail_cleanly_and_never_swallow_the_next_one() {
        let canary = b"GET /canary HTTP/1.1\r\nHost: c\r\n\r\n";
        for case in 0..3000 {
            let mut rng = rng(case);
            let (raw, _) = random_request(&mut rng, true);
            let body_at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut input = raw.clone();
            input.extend_from_slice(canary);
            // Half the mutations anywhere in the first request, half in its chunked body.
            let within = if case % 2 == 0 {
                0..raw.len()
            } else {
                body_at..raw.len()
            };
            let (input, at) = mutate(&mut rng, &input, within);
            let whole = decode_stream(&input, &[]);
            let cuts = splits(&mut rng, input.len());
            assert_eq!(decode_stream(&input, &cuts), whole, "case {case}: {cuts:?}");
            if at >= body_at
                && let Ok(seen) = &whole
            {
                // The framing decided where the body ends: the canary is still a request
                // of its own, never trailer lines or body bytes.
                assert_eq!(
                    seen.len(),
                    2,
                    "case {case}: {:?}",
                    String::from_utf8_lossy(&input)
                );
                assert_eq!(seen[1].target, "/canary", "case {case}");
            }
        }
    }
}
