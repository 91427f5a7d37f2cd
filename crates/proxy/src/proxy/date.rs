//! The current time as an HTTP date (`Mon, 30 Nov 2026 12:40:00 GMT`), formatted once a
//! second per thread: the `Date` header of every response and the access-log timestamps
//! read it without formatting a date per request.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

/// Calls `f` with the current `Date` value (29 bytes).
pub(super) fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let s = httpdate::fmt_http_date(now);
            let n = s.len().min(29);
            c.1[..n].copy_from_slice(&s.as_bytes()[..n]);
            c.0 = secs;
        }
        f(&c.1)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_are_http_dates() {
        let d = super::with(|d| String::from_utf8(d.to_vec()).unwrap());
        assert!(httpdate::parse_http_date(&d).is_ok(), "{d}");
    }
}
