//! The admin token, checked in one place for the API and the dashboard's event stream: as
//! `Authorization: Bearer <token>`, and for `/events` also as `?token=` (`EventSource`
//! cannot send headers). A refusal is 401 with `WWW-Authenticate: Bearer`.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use super::reply::{ApiError, Body, query};

/// Where a token may be given besides the `Authorization` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Also {
    /// Nowhere else.
    Nothing,
    /// As `?token=` (the event stream).
    Query,
}

/// `None` when `req` gives `token`; otherwise the 401 to answer.
pub(super) fn refuse<B>(req: &Request<B>, token: &str, also: Also) -> Option<Response<Body>> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer "))
                .unwrap_or("")
        })
        .map(|s| s.trim().to_string());
    let in_query = match also {
        Also::Query => query(req, "token"),
        Also::Nothing => None,
    };
    let why = match (header, in_query) {
        (None, None) => match also {
            Also::Nothing => {
                "this admin endpoint needs a token: send Authorization: Bearer <token>"
            }
            Also::Query => {
                "this admin endpoint needs a token: send Authorization: Bearer <token> (or ?token= for /events)"
            }
        },
        (header, in_query) => {
            if [header, in_query]
                .into_iter()
                .flatten()
                .any(|given| same(given.as_bytes(), token.as_bytes()))
            {
                return None;
            }
            "wrong admin token"
        }
    };
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, why).response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(res)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, auth: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    fn refused(r: &Request<()>, also: Also) -> bool {
        refuse(r, "s3 cret", also).is_some()
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn bearer_header_everywhere_query_only_for_events() {
        assert!(!refused(
            &req("/backends", Some("Bearer s3 cret")),
            Also::Nothing
        ));
        assert!(refused(
            &req("/backends", Some("Bearer nope")),
            Also::Nothing
        ));
        assert!(refused(&req("/backends", Some("s3 cret")), Also::Nothing));
        assert!(refused(&req("/backends", None), Also::Nothing));
        assert!(refused(
            &req("/backends?token=s3%20cret", None),
            Also::Nothing
        ));
        assert!(!refused(&req("/events?token=s3%20cret", None), Also::Query));
        assert!(!refused(
            &req("/events", Some("Bearer s3 cret")),
            Also::Query
        ));
        assert!(refused(&req("/events?token=nope", None), Also::Query));
        assert!(refused(&req("/events", None), Also::Query));
        let res = refuse(&req("/events", None), "t", Also::Query).unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
