//! Generated inputs for the parsers' property tests (request heads, response heads,
//! chunked bodies): random valid messages, random ways to split them, random mutations.
//! Shared by this crate's tests and the host's (feature `testing`).

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

/// The generator for test case `case`: every run sees the same inputs.
pub fn rng(case: u64) -> SmallRng {
    SmallRng::seed_from_u64(0x6c62_7761_736d ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Printable bytes for names and values.
pub fn word(rng: &mut SmallRng, max: usize) -> String {
    let n = rng.random_range(1..=max);
    (0..n)
        .map(|_| b"abcdefghijklmnopqrstuvwxyz0123456789-"[rng.random_range(0..37)] as char)
        .collect()
}

/// `data` in the chunked coding: random chunk sizes (hex in either case, leading
/// zeros), extensions and trailers.
pub fn chunked(rng: &mut SmallRng, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = rng.random_range(1..=rest.len());
        let size = if rng.random_bool(0.5) {
            format!("{n:x}")
        } else {
            format!("0{n:X}")
        };
        out.extend_from_slice(size.as_bytes());
        if rng.random_bool(0.3) {
            out.extend_from_slice(format!(";{}={}", word(rng, 5), word(rng, 5)).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    for _ in 0..rng.random_range(0..3) {
        out.extend_from_slice(format!("x-{}: {}\r\n", word(rng, 6), word(rng, 8)).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A random body.
pub fn body(rng: &mut SmallRng) -> Vec<u8> {
    let n = rng.random_range(0..200);
    (0..n).map(|_| rng.random()).collect()
}

/// Input arriving in the pieces that `cuts` make, as a socket would deliver it.
pub struct Feed<'a> {
    pieces: std::vec::IntoIter<&'a [u8]>,
}

impl<'a> Feed<'a> {
    /// `input`, cut at `cuts` (sorted, inside the input).
    pub fn new(input: &'a [u8], cuts: &[usize]) -> Self {
        let mut pieces = Vec::new();
        let mut from = 0;
        for &cut in cuts {
            pieces.push(&input[from..cut]);
            from = cut;
        }
        pieces.push(&input[from..]);
        Feed {
            pieces: pieces.into_iter(),
        }
    }

    /// Appends the next piece to `buf`; false when there is none left.
    pub fn more(&mut self, buf: &mut bytes::BytesMut) -> bool {
        match self.pieces.next() {
            Some(p) => {
                buf.extend_from_slice(p);
                true
            }
            None => false,
        }
    }

    /// A body of `n` bytes, from `buf` and the pieces after it.
    pub fn length(&mut self, buf: &mut bytes::BytesMut, n: u64) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        let mut left = n as usize;
        while left > 0 {
            if buf.is_empty() && !self.more(buf) {
                return Err("incomplete body".into());
            }
            let k = left.min(buf.len());
            body.extend_from_slice(&buf.split_to(k));
            left -= k;
        }
        Ok(body)
    }

    /// A chunked body, decoded by `decoder` from `buf` and the pieces after it.
    pub fn chunked(
        &mut self,
        buf: &mut bytes::BytesMut,
        decoder: &mut crate::ChunkDecoder,
    ) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            match decoder.decode(buf)? {
                crate::Decoded::Data(b) => body.extend_from_slice(&b),
                crate::Decoded::Done => return Ok(body),
                crate::Decoded::More if self.more(buf) => {}
                crate::Decoded::More => return Err("incomplete chunked body".into()),
            }
        }
    }
}

/// Asserts that `decode` gives `whole` for `input` cut at every byte boundary and in
/// 20 random multi-way splits: a parser must not depend on how bytes arrive.
pub fn same_however_split<T: PartialEq + std::fmt::Debug>(
    rng: &mut SmallRng,
    input: &[u8],
    whole: &T,
    decode: impl Fn(&[u8], &[usize]) -> T,
) {
    for cut in 0..=input.len() {
        assert_eq!(&decode(input, &[cut]), whole, "cut at {cut}");
    }
    for _ in 0..20 {
        let cuts = splits(rng, input.len());
        assert_eq!(&decode(input, &cuts), whole, "cuts {cuts:?}");
    }
}

/// Cut points for `len` bytes: sorted, inside the input.
pub fn splits(rng: &mut SmallRng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.random_range(1..8))
        .map(|_| rng.random_range(0..=len))
        .collect();
    cuts.sort_unstable();
    cuts
}

/// `input` with one random mutation: a byte changed, dropped, doubled, or a CR, LF,
/// NUL, space, colon or semicolon put in. Returns the position mutated too.
pub fn mutate(
    rng: &mut SmallRng,
    input: &[u8],
    within: std::ops::Range<usize>,
) -> (Vec<u8>, usize) {
    let mut out = input.to_vec();
    let at = rng.random_range(within);
    match rng.random_range(0..4) {
        0 => out[at] = rng.random(),
        1 => {
            out.remove(at);
        }
        2 => out.insert(at, out[at]),
        _ => out.insert(at, b"\r\n\0 :;"[rng.random_range(0..6)]),
    }
    (out, at)
}
