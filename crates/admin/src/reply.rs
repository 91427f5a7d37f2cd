//! The admin layer's HTTP vocabulary: response bodies, JSON answers, errors as
//! `{"error": ...}` with a status ([`ApiError`], and how each [`ControlError`] maps to one),
//! and query-string values.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use serde::Serialize;

use lbwasm_proxy::serve::ControlError;

/// Body of every admin response: whole (JSON, assets) or streamed (events).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A whole body.
pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// An admin call that failed: the status and a one-line reason.
#[derive(Debug)]
pub(super) struct ApiError {
    /// HTTP status to answer.
    pub status: StatusCode,
    /// What went wrong, for the `{"error": ...}` body.
    pub message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(super) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// `{"error": message}` with the status.
    pub(super) fn response(&self) -> Response<Body> {
        #[derive(Serialize)]
        struct Error<'a> {
            error: &'a str,
        }
        json(
            self.status,
            &Error {
                error: &self.message,
            },
        )
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// `value` as indented JSON and a newline. It goes through a `serde_json::Value`, so the
/// answers read as they always have: keys in alphabetical order, `f32` figures widened to
/// `f64`.
pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut body = serde_json::to_value(value)
        .and_then(|v| serde_json::to_vec_pretty(&v))
        .unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// A call's answer: its report with 200, or its error.
pub(super) fn answer<T: Serialize, E: Into<ApiError>>(r: Result<T, E>) -> Response<Body> {
    match r {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => e.into().response(),
    }
}

/// The query parameter `name`, decoded.
pub(super) fn query<B>(req: &Request<B>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes a query value (`%XX` and `+`); malformed escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%2Fd"), "a b c/d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn query_values_are_decoded_and_found_by_name() {
        let req = Request::get("/pick?listener=web&key=a%2Fb&empty")
            .body(())
            .unwrap();
        assert_eq!(query(&req, "key").as_deref(), Some("a/b"));
        assert_eq!(query(&req, "empty").as_deref(), Some(""));
        assert_eq!(query(&req, "path"), None);
    }

    #[test]
    fn control_errors_map_to_statuses() {
        let status = |e| ApiError::from(e).status.as_u16();
        assert_eq!(status(ControlError::BadRequest("x".into())), 400);
        assert_eq!(status(ControlError::NotFound("x".into())), 404);
        assert_eq!(status(ControlError::Rejected("x".into())), 422);
        assert_eq!(status(ControlError::Unavailable("x".into())), 503);
        assert_eq!(status(ControlError::Conflict("x".into())), 409);
        assert_eq!(status(ControlError::Internal("x".into())), 500);
    }
}
