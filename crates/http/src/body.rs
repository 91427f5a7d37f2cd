//! One decoder for every body the proxy reads, a client's request body or a backend's
//! response body: delimited by a length, chunked, or running until the close. It consumes
//! from the front of the connection's read buffer and hands out slices of it (no copy); the
//! caller does the reading, and says when the peer closed.

use bytes::BytesMut;

use crate::chunked::{ChunkDecoder, Decoded};
use crate::framing::{BodyFraming, Framing};

/// Where a body's decoding stands.
pub struct BodyDecoder {
    state: State,
    /// A chunked body's trailer fields, once it is done (boxed: most bodies have none).
    trailers: Option<Box<http::HeaderMap>>,
}

enum State {
    Length(u64),
    Chunked(ChunkDecoder),
    Close,
    Done,
}

impl From<BodyFraming> for BodyDecoder {
    fn from(framing: BodyFraming) -> Self {
        BodyDecoder::new(match framing {
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::Chunked(ChunkDecoder::default()),
        })
    }
}

impl From<Framing> for BodyDecoder {
    fn from(framing: Framing) -> Self {
        BodyDecoder::new(match framing {
            Framing::Length(n, _) => State::Length(n),
            Framing::Chunked(_) => State::Chunked(ChunkDecoder::default()),
            Framing::Close => State::Close,
        })
    }
}

impl BodyDecoder {
    fn new(state: State) -> Self {
        let state = match state {
            State::Length(0) => State::Done,
            s => s,
        };
        BodyDecoder {
            state,
            trailers: None,
        }
    }

    /// A chunked body's trailer fields, once it is done (taken; none if it had none).
    pub fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        self.trailers.take().map(|t| *t)
    }

    /// Consumes what it can from the front of `buf`. The last bytes of a body with a
    /// length come as `Data`, after which [`BodyDecoder::is_done`]; a chunked body ends
    /// with `Done`. What follows the body stays in `buf`.
    #[inline]
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        match &mut self.state {
            State::Done => Ok(Decoded::Done),
            State::Length(_) | State::Close if buf.is_empty() => Ok(Decoded::More),
            State::Length(left) => {
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::Done;
                }
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            State::Close => Ok(Decoded::Data(buf.split().freeze())),
            State::Chunked(decoder) => {
                let step = decoder.decode(buf)?;
                if step == Decoded::Done {
                    self.trailers = decoder.take_trailers().map(Box::new);
                    self.state = State::Done;
                }
                Ok(step)
            }
        }
    }

    /// The peer closed the connection (its buffered bytes decoded): true if that ends the
    /// body (one delimited by the close, or one already whole); false if it cut it short.
    #[inline]
    pub fn closed(&mut self) -> bool {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                true
            }
            State::Length(_) | State::Chunked(_) => false,
        }
    }

    /// The whole body has been decoded.
    #[inline]
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// How many bytes are left, when that is known (a length, or an ended body).
    #[inline]
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            State::Chunked(_) | State::Close => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Feed, body, chunked, rng, same_however_split};

    /// Decodes `input` fed in the pieces `cuts` make; the body and what follows it.
    fn decode(
        framing: Framing,
        input: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut feed = Feed::new(input, cuts);
        let mut decoder = BodyDecoder::from(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        while !decoder.is_done() {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Done => {}
                Decoded::More if feed.more(&mut buf) => {}
                Decoded::More if decoder.closed() => {}
                Decoded::More => return Err("cut short".into()),
            }
        }
        while feed.more(&mut buf) {}
        Ok((body, buf.to_vec()))
    }

    #[test]
    fn bodies_decode_by_their_framing_however_split() {
        for case in 0..200 {
            let mut rng = rng(case);
            let data = body(&mut rng);
            let next = b"GET / HTTP/1.1\r\n\r\n";
            let length = Framing::Length(data.len() as u64, true);
            for (framing, mut input, rest) in [
                (length, data.clone(), &next[..]),
                (Framing::Chunked(true), chunked(&mut rng, &data), next),
                (Framing::Close, data.clone(), b""),
            ] {
                input.extend_from_slice(rest);
                let whole = decode(framing, &input, &[]);
                assert_eq!(whole, Ok((data.clone(), rest.to_vec())), "case {case}");
                same_however_split(&mut rng, &input, &whole, |i, c| decode(framing, i, c));
            }
        }
    }

    #[test]
    fn a_close_ends_only_a_body_delimited_by_it() {
        let cut = decode(Framing::Length(5, true), b"hel", &[]);
        assert_eq!(cut, Err("cut short".into()));
        let cut = decode(Framing::Chunked(true), b"5\r\nhello\r\n", &[]);
        assert_eq!(cut, Err("cut short".into()));
        let none = BodyDecoder::from(Framing::Length(0, true));
        assert!(none.is_done() && none.remaining() == Some(0));
        let mut request = BodyDecoder::from(BodyFraming::Length(3));
        assert_eq!(request.remaining(), Some(3));
        assert!(!request.closed());
    }
}
