//! The chunked transfer coding (RFC 9112 §7.1), both ways: [`push_size_line`],
//! [`CHUNK_END`] and [`LAST_CHUNK`] frame what the proxy sends (responses to clients and
//! uploads to backends alike), [`ChunkDecoder`] undoes it, strictly, in what it receives.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

/// What follows a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// The end of a chunked body: the last chunk and an empty trailer section (an HTTP/1.1
/// hop's trailers are not forwarded).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends the size line of a chunk of `len` bytes (`{len:x}\r\n`) to `out`: the data
/// follows it, then [`CHUNK_END`]. The caller writes the data, so that a large one can go
/// out on its own rather than be copied after its size line.
#[inline]
pub fn push_size_line(out: &mut Vec<u8>, len: usize) {
    let mut line = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, d) in line[..digits].iter_mut().enumerate() {
        *d = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    out.extend_from_slice(&line[..digits + 2]);
}

/// The chunked transfer coding, decoded in place (RFC 9112 §7.1): data comes out as slices
/// of the read buffer; extensions are read and dropped, trailer fields kept for
/// [`ChunkDecoder::take_trailers`] (less those a trailer section must not carry).
#[derive(Clone, Default)]
pub struct ChunkDecoder {
    state: ChunkState,
    trailers: Option<HeaderMap>,
}

#[derive(Clone, Default)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// One step of a body's decoding ([`ChunkDecoder`], [`crate::BodyDecoder`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no complete next step: read more.
    More,
    /// The body has ended (chunked: the last chunk and the trailers have been read).
    Done,
}

impl ChunkDecoder {
    /// Consumes what it can from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::Done),
                ChunkState::Size => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err("chunk size line too long".into())
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    if end >= MAX_CHUNK_LINE {
                        return Err("chunk size line too long".into());
                    }
                    let line = buf.split_to(end + 1);
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers(seen) => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        return if seen + buf.len() > MAX_TRAILERS {
                            Err("trailer section too large".into())
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    if seen + end >= MAX_TRAILERS {
                        return Err("trailer section too large".into());
                    }
                    let line = buf.split_to(end + 1);
                    // Strict, so that what follows a body (the next pipelined request) can
                    // never be taken for trailer lines: CRLF only, and a field line each.
                    let Some(field) = line.strip_suffix(b"\r\n") else {
                        return Err("trailer line not ended by CRLF".into());
                    };
                    if field.is_empty() {
                        self.state = ChunkState::Done;
                    } else {
                        let (name, value) = trailer_field(field)?;
                        if !TRAILER_FORBIDDEN.contains(&name) {
                            self.trailers.get_or_insert_default().append(name, value);
                        }
                        self.state = ChunkState::Trailers(seen + line.len());
                    }
                }
            }
        }
    }

    /// The trailer fields, once the body is done (none if it had none).
    pub fn take_trailers(&mut self) -> Option<HeaderMap> {
        self.trailers.take()
    }

    /// Checks the chunked bytes already at hand without consuming them: a request whose
    /// framing is broken in what arrived with its head is refused before anything goes
    /// to a backend.
    pub fn check(&self, bytes: &[u8]) -> Result<(), String> {
        let mut probe = ChunkDecoder {
            state: self.state.clone(),
            trailers: None,
        };
        let mut buf = BytesMut::from(bytes);
        loop {
            match probe.decode(&mut buf)? {
                Decoded::Data(_) => {}
                Decoded::More | Decoded::Done => return Ok(()),
            }
        }
    }
}

/// The size of a chunk from its size line (`1a;name=value\r\n`), RFC 9112 §7.1. Refused:
/// a bare LF, no digits, more than fits a signed 64-bit length (NGINX's bound too), and
/// control characters in the extensions.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err("chunk size line not ended by CRLF".into());
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("invalid chunk size".into());
    }
    let hex = &line[..digits];
    let significant = hex.iter().skip_while(|&&b| b == b'0').count();
    if significant > 16 {
        return Err("chunk size too large".into());
    }
    let size = hex.iter().fold(0u64, |n, &b| {
        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
        n.wrapping_shl(4) | d
    });
    if size > i64::MAX as u64 {
        return Err("chunk size too large".into());
    }
    let rest = &line[digits..];
    match rest.iter().find(|&&b| b != b' ' && b != b'\t') {
        None | Some(b';') => {}
        Some(_) => return Err("invalid chunk size".into()),
    }
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("control character in a chunk extension".into());
    }
    Ok(size)
}

/// Fields a trailer section must not carry (RFC 9110 §6.5.1): framing, routing, control.
const TRAILER_FORBIDDEN: [HeaderName; 6] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HOST,
    header::TRAILER,
    header::CONNECTION,
    header::TE,
];

/// A trailer line must be a field line (`name: value`): a token, a colon, no control
/// characters but HTAB, and no obsolete line folding.
fn trailer_field(line: &[u8]) -> Result<(HeaderName, HeaderValue), String> {
    let colon = line.iter().position(|&b| b == b':');
    let name = colon.map_or(line, |c| &line[..c]);
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if colon.is_none() || name.is_empty() || !name.iter().all(token) {
        return Err("invalid trailer field".into());
    }
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("control character in a trailer field".into());
    }
    let value = colon.map_or(&[][..], |c| &line[c + 1..]).trim_ascii();
    let name = HeaderName::from_bytes(name).map_err(|_| "invalid trailer field".to_string())?;
    let value = HeaderValue::from_bytes(value).map_err(|_| "invalid trailer field".to_string())?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), String> {
        let mut d = ChunkDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::Done => return Ok((out, buf)),
                Decoded::More if fed >= input.len() => return Err("incomplete".into()),
                Decoded::More => {
                    let n = step.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let input =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (out, rest) = decode_all(input, step).unwrap();
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            // What follows the body is left for whoever reads next.
            assert_eq!(&rest[..], &b"NEXT"[..rest.len()], "step {step}");
        }
    }

    #[test]
    fn trailer_fields_are_kept_but_framing_ones() {
        let mut d = ChunkDecoder::default();
        let mut buf = BytesMut::from(
            &b"1\r\na\r\n0\r\nGrpc-Status: 0\r\nContent-Length: 9\r\nX-A:  b \r\n\r\n"[..],
        );
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"a")))
        );
        assert_eq!(d.decode(&mut buf), Ok(Decoded::Done));
        let t = d.take_trailers().expect("trailers");
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-a"], "b");
        assert!(d.take_trailers().is_none());
        // No trailer section, no map.
        let mut d = ChunkDecoder::default();
        let mut buf = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(Decoded::Done));
        assert!(d.take_trailers().is_none());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
        ] {
            assert!(
                decode_all(bad, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_size_lines() {
        for (len, line) in [
            (0x1f40, &b"1f40\r\n"[..]),
            (0, b"0\r\n"),
            (1, b"1\r\n"),
            (usize::MAX, b"ffffffffffffffff\r\n"),
        ] {
            let mut out = b"x".to_vec();
            push_size_line(&mut out, len);
            assert_eq!(&out[1..], line);
        }
    }
}
