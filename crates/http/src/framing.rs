//! How message bodies are delimited (RFC 9112 §6): a response's [`Framing`] as its head
//! declares it, a request's [`BodyFraming`] (decided, strictly, as its head is parsed:
//! [`crate::parse_request`]), and the field values both are read from.

use http::{StatusCode, Version};

/// How a request's body is delimited (a request without one has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// Exactly this many bytes (more than 0).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// How a backend's response body is delimited (RFC 9112 §6.3), and whether the
/// connection can carry another request after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body: HEAD, 1xx, 204, 304); then reusable or not.
    Length(u64, bool),
    /// Chunked transfer coding; then reusable or not.
    Chunked(bool),
    /// Everything until the backend closes the connection.
    Close,
}

impl Framing {
    /// Whether the connection can carry another message after this body.
    #[inline]
    pub fn keep_alive(self) -> bool {
        match self {
            Framing::Length(_, keep_alive) | Framing::Chunked(keep_alive) => keep_alive,
            Framing::Close => false,
        }
    }

    /// The framing a response head declares (its raw headers, as parsed). A malformed
    /// `Content-Length` is an error (a desynchronised connection must not be reused or
    /// trusted).
    pub fn of(
        status: StatusCode,
        version: Version,
        headers: &[httparse::Header<'_>],
        head_only: bool,
    ) -> Result<Framing, String> {
        let mut keep_alive = version == Version::HTTP_11;
        let (mut has_coding, mut codings, mut only_chunked) = (false, 0, true);
        let mut has_length = false;
        for h in headers {
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive")
                        && version == Version::HTTP_10
                    {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                for c in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if !c.is_empty() {
                        codings += 1;
                        only_chunked &= c.eq_ignore_ascii_case(b"chunked");
                    }
                }
                has_coding = true;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                has_length = true;
            }
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Framing::Length(0, false));
        }
        if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Length(0, keep_alive));
        }
        if has_coding {
            // Only `chunked` is undone here; another coding would reach the client
            // unlabelled once the hop's Transfer-Encoding is dropped (NGINX refuses these
            // too: "upstream sent unknown Transfer-Encoding").
            if codings != 1 || !only_chunked {
                return Err("transfer coding other than chunked".into());
            }
            // With both, Transfer-Encoding wins and the connection is not reused.
            return Ok(Framing::Chunked(keep_alive && !has_length));
        }
        let length = content_length(
            headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| h.value),
        )?;
        Ok(match length {
            Some(n) => Framing::Length(n, keep_alive),
            None => Framing::Close,
        })
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

/// Whether `Connection` values list `token`.
pub(crate) fn connection_has<'a>(values: impl Iterator<Item = &'a [u8]>, token: &str) -> bool {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&'static str, &'static str)]| -> Vec<httparse::Header<'static>> {
            pairs
                .iter()
                .map(|(k, v)| httparse::Header {
                    name: k,
                    value: v.as_bytes(),
                })
                .collect()
        };
        let ok = StatusCode::OK;
        let v11 = Version::HTTP_11;
        assert_eq!(
            Framing::of(ok, v11, &h(&[("content-length", "7")]), false),
            Ok(Framing::Length(7, true))
        );
        assert_eq!(
            Framing::of(ok, v11, &h(&[("content-length", "7")]), true),
            Ok(Framing::Length(0, true))
        );
        assert_eq!(
            Framing::of(StatusCode::NO_CONTENT, v11, &h(&[]), false),
            Ok(Framing::Length(0, true))
        );
        assert_eq!(
            Framing::of(ok, v11, &h(&[("transfer-encoding", "Chunked")]), false),
            Ok(Framing::Chunked(true))
        );
        for refused in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "gzip")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        ] {
            assert_eq!(
                Framing::of(ok, v11, &h(refused), false),
                Err("transfer coding other than chunked".into()),
                "{refused:?}"
            );
        }
        assert_eq!(
            Framing::of(
                ok,
                v11,
                &h(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
                false
            ),
            Ok(Framing::Chunked(false))
        );
        assert_eq!(Framing::of(ok, v11, &h(&[]), false), Ok(Framing::Close));
        assert_eq!(
            Framing::of(
                ok,
                v11,
                &h(&[("connection", "close"), ("content-length", "1")]),
                false
            ),
            Ok(Framing::Length(1, false))
        );
        assert_eq!(
            Framing::of(ok, Version::HTTP_10, &h(&[("content-length", "1")]), false),
            Ok(Framing::Length(1, false))
        );
        assert_eq!(
            Framing::of(
                ok,
                Version::HTTP_10,
                &h(&[("connection", "keep-alive"), ("content-length", "1")]),
                false
            ),
            Ok(Framing::Length(1, true))
        );
        assert_eq!(
            Framing::of(ok, v11, &h(&[("content-length", "3, 3")]), false),
            Ok(Framing::Length(3, true))
        );
        assert!(
            Framing::of(
                ok,
                v11,
                &h(&[("content-length", "3"), ("content-length", "4")]),
                false
            )
            .is_err()
        );
        assert!(Framing::of(ok, v11, &h(&[("content-length", "+3")]), false).is_err());
    }
}
