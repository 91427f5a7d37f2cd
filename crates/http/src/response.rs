//! Response heads: parsed as a backend sent them ([`parse_response`], with the body's
//! [`Framing`]), and written as a client gets them ([`write_response_head`], with the
//! proxy's own framing: [`ResponseFraming`]).

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{StatusCode, Version};

use crate::fields::{Fields, RawFields};
use crate::framing::Framing;
use crate::head::{MAX_HEADERS, itoa_buf, push_field, span_store, spans};
use crate::hop::HopByHop;

/// A response head as a backend sent it: its status and its fields less the hop-by-hop
/// ones.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// The fields, in order, as they came.
    pub fields: RawFields,
}

/// Parses a response head off the front of `buf` (None: incomplete). The header values
/// share the head's buffer (no copy); what follows stays in `buf`. `head_only`: the answer
/// to a HEAD request, which has no body whatever its head says.
pub fn parse_response(
    buf: &mut BytesMut,
    head_only: bool,
) -> Result<Option<(ResponseHead, Framing)>, String> {
    // Uninitialised: a 4 KiB memset per response showed in profiles.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("status {code}"))?;
    let version = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Framing and hop-by-hop headers from the raw head, in one pass: the map then never
    // holds what would only be removed again.
    let framing = Framing::of(status, version, res.headers, head_only)?;
    let hop = HopByHop::of(res.headers, status == StatusCode::SWITCHING_PROTOCOLS)?;
    let mut store = span_store();
    let spans = spans(buf.as_ptr(), res.headers, &mut store);
    let head: Bytes = buf.split_to(len).freeze();
    let fields = RawFields::new(head, hop.keep(spans));
    Ok(Some((ResponseHead { status, fields }, framing)))
}

/// How a response's body goes out to a client: what its head says, and whether only the
/// close can end it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseFraming {
    /// No body, whatever the fields say (HEAD, 1xx, 204, 304).
    pub bodiless: bool,
    /// Sent with this `Content-Length`.
    pub length: Option<u64>,
    /// Sent in the chunked coding ([`crate::push_size_line`]).
    pub chunked: bool,
    /// Neither a length nor chunks (an HTTP/1.0 client): the end of the body is the close.
    pub until_close: bool,
}

impl ResponseFraming {
    /// The framing of a response with `status` to a request of `version` (`head_only`: a
    /// HEAD request), whose body has `length` bytes when that is known.
    pub fn new(status: StatusCode, head_only: bool, version: Version, length: Option<u64>) -> Self {
        let bodiless = head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let length = if bodiless { None } else { length };
        let chunked = !bodiless && length.is_none() && version == Version::HTTP_11;
        ResponseFraming {
            bodiless,
            length,
            chunked,
            until_close: !bodiless && length.is_none() && !chunked,
        }
    }
}

/// Writes a response head in `out` (cleared) for a request of `version`: the status line,
/// `fields` (a `Content-Length` among them only where there is no body to frame: a HEAD
/// answer keeps the length the GET would have), a `Date` unless they have one (`date` is
/// asked for it), the `framing`, and `Connection`: `upgrade` for a switch, `close` when
/// `close` (then the connection closes after this response), `keep-alive` for an HTTP/1.0
/// client otherwise.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    fields: &Fields,
    framing: ResponseFraming,
    version: Version,
    close: bool,
    date: impl FnOnce(&mut dyn FnMut(&[u8])),
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in fields.iter() {
        if !framing.bodiless && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        push_field(out, name, value);
    }
    if !dated {
        date(&mut |d| push_field(out, b"date", d));
    }
    if let Some(n) = framing.length {
        push_field(out, b"content-length", itoa_buf(n).as_bytes());
    } else if framing.chunked {
        push_field(out, b"transfer-encoding", b"chunked");
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        push_field(out, b"connection", b"upgrade");
    } else if close {
        push_field(out, b"connection", b"close");
    } else if version == Version::HTTP_10 {
        push_field(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunked::ChunkDecoder;
    use crate::head::MAX_HEAD;
    use crate::testing::{Feed, body, chunked, mutate, rng, same_however_split, splits, word};
    use rand::Rng as _;

    #[test]
    fn response_heads_parse_and_leave_the_body() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello"[..],
        );
        let (head, framing) = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(
            head.fields
                .iter()
                .filter(|(n, _)| *n == b"X-A")
                .map(|(_, v)| v)
                .collect::<Vec<_>>(),
            [&b"1"[..], b"2"]
        );
        assert_eq!(framing, Framing::Length(5, true));
        assert_eq!(&buf[..], b"hello");
        // Hop-by-hop fields never make it in.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-b\r\nX-B: 1\r\nServer: s\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let (head, _) = parse_response(&mut buf, false).unwrap().unwrap();
        let names: Vec<&[u8]> = head.fields.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"Server"[..], b"Content-Length"]);

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_response(&mut partial, false).unwrap().is_none());
        let mut bad = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..]);
        assert!(
            parse_response(&mut bad, false)
                .unwrap_err()
                .contains("Content-Length")
        );
        let mut garbage = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert!(parse_response(&mut garbage, false).is_err());
    }

    /// A response as the tests see it after parsing: status, fields, body.
    type Seen = (u16, Vec<(Vec<u8>, Vec<u8>)>, Vec<u8>);

    /// Parses `input` as a backend's responses to pipelined GETs, arriving in the pieces
    /// that `cuts` make: heads by [`parse_head`], bodies by their framing, as
    /// `BackendBody` reads them.
    fn decode_stream(input: &[u8], cuts: &[usize]) -> Result<Vec<Seen>, String> {
        let mut feed = Feed::new(input, cuts);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        loop {
            let (head, framing) = loop {
                if !buf.is_empty() {
                    match parse_response(&mut buf, false)? {
                        Some(h) => break h,
                        None if buf.len() >= MAX_HEAD => return Err("head too large".into()),
                        None => {}
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
            let body = match framing {
                Framing::Length(n, _) => feed.length(&mut buf, n)?,
                Framing::Chunked(_) => {
                    let mut decoder = ChunkDecoder::default();
                    feed.chunked(&mut buf, &mut decoder)?
                }
                Framing::Close => {
                    let mut body = buf.split().to_vec();
                    while feed.more(&mut buf) {
                        body.extend_from_slice(&buf.split());
                    }
                    body
                }
            };
            let fields = head.fields.iter().map(|(n, v)| (n.to_vec(), v.to_vec()));
            out.push((head.status.as_u16(), fields.collect(), body));
        }
    }

    /// A random valid response (delimited by its length or chunked, unless `last`, which
    /// may run to the close) and how it must parse.
    fn random_response(rng: &mut rand::rngs::SmallRng, last: bool) -> (Vec<u8>, Seen) {
        let status = [200u16, 201, 204, 304, 404, 500][rng.random_range(0..6)];
        let mut fields = Vec::new();
        for _ in 0..rng.random_range(0..6) {
            fields.push((
                format!("X-{}", word(rng, 8)).into_bytes(),
                word(rng, 20).into_bytes(),
            ));
        }
        let bodiless = status == 204 || status == 304;
        let data = if bodiless { Vec::new() } else { body(rng) };
        let framing = rng.random_range(0..if last { 3 } else { 2 });
        if !bodiless && framing == 0 {
            fields.push((
                b"Content-Length".to_vec(),
                data.len().to_string().into_bytes(),
            ));
        }
        let mut raw = format!("HTTP/1.1 {status} X\r\n").into_bytes();
        for (n, v) in &fields {
            raw.extend_from_slice(n);
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v);
            raw.extend_from_slice(b"\r\n");
        }
        if !bodiless && framing == 1 {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        match framing {
            _ if bodiless => {}
            1 => raw.extend_from_slice(&chunked(rng, &data)),
            _ => raw.extend_from_slice(&data),
        }
        (raw, (status, fields, data))
    }

    #[test]
    fn responses_parse_the_same_however_they_are_split() {
        for case in 0..300 {
            let mut rng = rng(case);
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for i in 0..3 {
                let (raw, seen) = random_response(&mut rng, i == 2);
                input.extend_from_slice(&raw);
                expected.push(seen);
            }
            let whole = decode_stream(&input, &[]);
            assert_eq!(whole, Ok(expected), "case {case}");
            same_however_split(&mut rng, &input, &whole, decode_stream);
        }
    }

    #[test]
    fn mutated_responses_fail_cleanly_whatever_the_split() {
        for case in 0..3000 {
            let mut rng = rng(case);
            let (mut input, _) = random_response(&mut rng, false);
            let (next, _) = random_response(&mut rng, false);
            let first = input.len();
            input.extend_from_slice(&next);
            let (input, _) = mutate(&mut rng, &input, 0..first);
            let whole = decode_stream(&input, &[]);
            let cuts = splits(&mut rng, input.len());
            assert_eq!(decode_stream(&input, &cuts), whole, "case {case}: {cuts:?}");
        }
    }

    #[test]
    fn response_heads_are_written_with_the_proxy_framing() {
        let fields = Fields::from(http::HeaderMap::from_iter([
            (http::header::CONTENT_LENGTH, "9".parse().unwrap()),
            (http::header::SERVER, "s".parse().unwrap()),
        ]));
        let write = |status, head_only, version, length, close| {
            let mut out = b"old".to_vec();
            let framing = ResponseFraming::new(status, head_only, version, length);
            write_response_head(&mut out, status, &fields, framing, version, close, |f| {
                f(b"Thu, 03 Dec 2026 06:00:00 GMT")
            });
            String::from_utf8(out).unwrap()
        };
        let (ok, v11, v10) = (StatusCode::OK, Version::HTTP_11, Version::HTTP_10);
        let date = "date: Thu, 03 Dec 2026 06:00:00 GMT\r\n";
        assert_eq!(
            write(ok, false, v11, Some(3), false),
            format!("HTTP/1.1 200 OK\r\nserver: s\r\n{date}content-length: 3\r\n\r\n")
        );
        assert_eq!(
            write(ok, true, v11, Some(3), false),
            format!("HTTP/1.1 200 OK\r\ncontent-length: 9\r\nserver: s\r\n{date}\r\n")
        );
        assert_eq!(
            write(ok, false, v11, None, true),
            format!(
                "HTTP/1.1 200 OK\r\nserver: s\r\n{date}transfer-encoding: chunked\r\n\
                 connection: close\r\n\r\n"
            )
        );
        assert_eq!(
            write(ok, false, v10, Some(0), false),
            format!(
                "HTTP/1.1 200 OK\r\nserver: s\r\n{date}content-length: 0\r\n\
                 connection: keep-alive\r\n\r\n"
            )
        );
        let framing = ResponseFraming::new(ok, false, v10, None);
        assert!(framing.until_close && !framing.chunked);
    }
}
