//! Header fields as the proxy carries them: raw, as an HTTP/1.1 peer sent them, or as a
//! map. Requests (which plugins read) and responses use the same type.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Where one field's name and value lie in a head's buffer (offsets; 16 bytes, where two
/// `Bytes` would be 64 and two reference counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) name_start: u32,
    pub(crate) name_end: u32,
    pub(crate) value_start: u32,
    pub(crate) value_end: u32,
}

impl Span {
    fn name(self) -> std::ops::Range<usize> {
        self.name_start as usize..self.name_end as usize
    }

    fn value(self) -> std::ops::Range<usize> {
        self.value_start as usize..self.value_end as usize
    }
}

/// A message's header fields as they arrived, less the hop-by-hop ones: the head's bytes
/// and where each field lies in them. HTTP/1.1 to HTTP/1.1 they are copied out as they are;
/// a [`HeaderMap`] (a hash and a validation per field, two allocations, a drop) is built
/// only where one is needed, for HTTP/2. That map was the largest user-space item of a
/// proxied request.
#[derive(Clone, Debug, Default)]
pub struct RawFields {
    head: Bytes,
    spans: Vec<Span>,
}

impl RawFields {
    /// The fields at `spans` in `head` (the hop-by-hop ones already left out).
    pub(crate) fn new(head: Bytes, spans: Vec<Span>) -> Self {
        RawFields { head, spans }
    }

    /// Every field, in order, as (name, value).
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        self.spans
            .iter()
            .map(|&s| (&self.head[s.name()], &self.head[s.value()]))
    }

    /// The map of these fields; values share the head's buffer.
    pub fn to_map(&self) -> Result<HeaderMap, String> {
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for &span in &self.spans {
            let raw = &self.head[span.name()];
            let name = HeaderName::from_bytes(raw)
                .map_err(|_| format!("header name {:?}", String::from_utf8_lossy(raw)))?;
            let value = HeaderValue::from_maybe_shared(self.head.slice(span.value()))
                .map_err(|_| format!("value of header {name}"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

/// Header fields either as received from an HTTP/1.1 peer ([`RawFields`]), or as a map
/// (HTTP/2 from hyper, and the proxy's own answers).
#[derive(Debug)]
pub enum Fields {
    /// As an HTTP/1.1 peer sent them.
    Raw(RawFields),
    /// As a map.
    Map(HeaderMap),
}

impl Default for Fields {
    fn default() -> Self {
        Fields::Map(HeaderMap::new())
    }
}

impl Fields {
    /// Every field, in order, as (name, value).
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let (raw, map) = match self {
            Fields::Raw(r) => (Some(r.iter()), None),
            Fields::Map(m) => (
                None,
                Some(m.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))),
            ),
        };
        raw.into_iter().flatten().chain(map.into_iter().flatten())
    }

    /// The values of the fields called `name` (case-insensitive), in order.
    #[inline]
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of the field called `name` (case-insensitive).
    #[inline]
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        match self {
            Fields::Raw(r) => r
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v),
            Fields::Map(m) => m.get(name).map(HeaderValue::as_bytes),
        }
    }

    /// The fields as a map (built from raw ones).
    pub fn into_map(self) -> Result<HeaderMap, String> {
        match self {
            Fields::Raw(r) => r.to_map(),
            Fields::Map(m) => Ok(m),
        }
    }
}

impl From<HeaderMap> for Fields {
    fn from(map: HeaderMap) -> Self {
        Fields::Map(map)
    }
}
