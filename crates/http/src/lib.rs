//! lbwasm's HTTP/1.1 codec: request and response heads parsed and written, bodies framed
//! and decoded, header fields carried as they arrived. Pure functions over buffers: no
//! socket, no task, no timer, and nothing of the proxy (pools, plugins, metrics, logs). The
//! host reads and writes the bytes; this crate says what they mean.
//!
//! Pingora's split (`protocols/http/v1/{common,body}.rs` apart from its server and client)
//! rather than a general server library's: both sides of the proxy share one parser per
//! head, one body decoder ([`BodyDecoder`]) and one chunked encoder, so that a client's
//! request and a backend's response are held to the same framing rules (RFC 9112).
//!
//! - [`fields`]: header fields, raw ([`RawFields`]) or as a map.
//! - [`parse_request`] / [`write_request_line`]: request heads; [`parse_response`] /
//!   [`write_response_head`]: response heads.
//! - [`Framing`], [`BodyFraming`]: how bodies are delimited; [`BodyDecoder`] reads them.
//! - [`ChunkDecoder`], [`push_size_line`]: the chunked coding.
//! - [`strip_hop_by_hop`]: the fields that describe one connection only.
//! - [`orca`]: ORCA in-band load reports (`endpoint-load-metrics`), parsed strictly.

mod body;
mod chunked;
pub mod fields;
mod framing;
mod head;
mod hop;
pub mod orca;
mod request;
mod response;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use body::BodyDecoder;
pub use chunked::{CHUNK_END, ChunkDecoder, Decoded, LAST_CHUNK, push_size_line};
pub use fields::{Fields, RawFields};
pub use framing::{BodyFraming, Framing};
pub use head::{MAX_HEAD, push_field};
pub use hop::{strip_hop_by_hop, wants_upgrade};
pub use request::{
    ParsedRequest, Reject, ReqHead, end_request_head, parse_request, reject, write_request_line,
};
pub use response::{ResponseFraming, ResponseHead, parse_response, write_response_head};
