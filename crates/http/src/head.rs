//! What request and response heads share: their limits, where their fields lie in the
//! buffer they were parsed from, and how a field line and a number are written.

use std::mem::MaybeUninit;

use crate::fields::Span;

/// The most headers a request or response head may have.
pub(crate) const MAX_HEADERS: usize = 128;

/// The largest head accepted (start line and headers), request or response.
pub const MAX_HEAD: usize = 64 * 1024;

/// Storage for a head's [`spans`], left uninitialised (a 2 KiB memset per head showed in
/// profiles; so did returning it by value).
pub(crate) type SpanStore = [MaybeUninit<Span>; MAX_HEADERS];

/// An empty [`SpanStore`].
pub(crate) const fn span_store() -> SpanStore {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Records in `out` where `parsed`'s names and values lie relative to `base` (the start of
/// the buffer they were parsed from), so that both can be cut from that buffer once it is
/// frozen: no copy, and no allocation. Returns the spans written.
pub(crate) fn spans<'s>(
    base: *const u8,
    parsed: &[httparse::Header<'_>],
    out: &'s mut SpanStore,
) -> &'s [Span] {
    let base = base as usize;
    let mut len = 0;
    for (slot, h) in out.iter_mut().zip(parsed) {
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (h.value.as_ptr() as usize - base) as u32;
        slot.write(Span {
            name_start: name,
            name_end: name + h.name.len() as u32,
            value_start: value,
            value_end: value + h.value.len() as u32,
        });
        len += 1;
    }
    // SAFETY: the first `len` entries were just written; `MaybeUninit<T>` has `T`'s layout.
    unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<Span>(), len) }
}

/// Appends the field line `name: value` to a head being written.
#[inline]
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Decimal digits of `n` without a heap allocation (a `Content-Length` per message).
#[inline]
pub(crate) fn itoa_buf(n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    let mut n = n;
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break d;
        }
    }
}

/// A number's decimal digits, on the stack.
pub(crate) struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_without_allocation() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(itoa_buf(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
