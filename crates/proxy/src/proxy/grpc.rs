//! gRPC as a proxy must know it (gRPC over HTTP/2, PROTOCOL-HTTP2.md): a call's deadline
//! (`grpc-timeout`), and the proxy's own answers in gRPC's terms — HTTP 200 with
//! `grpc-status` and `grpc-message` and no body ("Trailers-Only"), as Envoy and NGINX
//! answer, since a gRPC client reads a bare 502 as a protocol error it cannot explain.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use lbwasm_http::{Fields, ReqHead};

use super::response::{Reply, ResBody};

/// A request that is a gRPC call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GrpcCall {
    /// The call's deadline, from `grpc-timeout`.
    pub(crate) deadline: Option<Duration>,
}

impl GrpcCall {
    /// The call `head` makes, if it is one (`content-type: application/grpc[+proto|;...]`).
    pub(crate) fn of(head: &ReqHead) -> Option<GrpcCall> {
        let ct = head.fields.get("content-type")?;
        let grpc = ct
            .get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
            && matches!(ct.get(16), None | Some(b'+' | b';'));
        grpc.then(|| GrpcCall {
            deadline: head.fields.get("grpc-timeout").and_then(timeout),
        })
    }
}

/// `grpc-timeout`: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`); anything else
/// is no deadline (as gRPC servers treat it).
fn timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.trim_ascii().split_last().map(|(u, d)| (d, *u))?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status for the proxy's own HTTP answer (gRPC's http-grpc-status-mapping, with
/// the proxy's timeouts as the deadline they are).
fn status_of(http: StatusCode) -> u8 {
    match http.as_u16() {
        // DEADLINE_EXCEEDED
        504 | 408 => 4,
        // UNAVAILABLE: no backend, or none that answered
        502 | 503 | 429 => 14,
        // RESOURCE_EXHAUSTED
        413 | 431 => 8,
        // INTERNAL: the request itself was unusable
        400 => 13,
        // UNIMPLEMENTED
        501 | 505 => 12,
        // UNKNOWN
        _ => 2,
    }
}

/// `grpc-message`: percent-encoded, every byte outside printable ASCII and `%` itself.
fn message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("proxy error"))
}

/// The proxy's own answer `reply` (a one-line text) as a gRPC Trailers-Only response.
pub(crate) fn error_reply(reply: Reply) -> Reply {
    let Reply { status, body, .. } = reply;
    let text = body.into_text().unwrap_or_default();
    // The one-line text is "<code> <cause>": the cause is the message.
    let text = String::from_utf8_lossy(&text);
    let cause = text.split_once(' ').map_or(&*text, |(_, c)| c);
    let mut fields = HeaderMap::with_capacity(3);
    fields.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    fields.insert(
        "grpc-status",
        HeaderValue::from(u16::from(status_of(status))),
    );
    fields.insert("grpc-message", message(cause));
    Reply {
        status: StatusCode::OK,
        fields: Fields::Map(fields),
        body: ResBody::text(Bytes::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_strictly() {
        assert_eq!(timeout(b"200m"), Some(Duration::from_millis(200)));
        assert_eq!(timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(timeout(b"3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(
            timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"10x",
            b"-1S",
            b"1.5S",
            b"10",
        ] {
            assert_eq!(timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(message("no backend: 100%\n"), "no backend: 100%25");
        assert_eq!(message("café"), "caf%C3%A9");
    }

    #[test]
    fn proxy_statuses_map_to_grpc_codes() {
        assert_eq!(status_of(StatusCode::GATEWAY_TIMEOUT), 4);
        assert_eq!(status_of(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(status_of(StatusCode::BAD_GATEWAY), 14);
        assert_eq!(status_of(StatusCode::BAD_REQUEST), 13);
    }
}
