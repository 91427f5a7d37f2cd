//! The admin API: its own listener (loopback unless `allow_remote`), never the data
//! listener. JSON in and out, errors as `{"error": "..."}` with a proper status; when a
//! token is configured every call but `GET /healthz` needs `Authorization: Bearer <token>`.
//!
//! | call | does |
//! |---|---|
//! | `GET /healthz` | liveness |
//! | `GET /backends` (`/rep`) | listeners, backends, health and live figures |
//! | `POST /backends/add` (`/add`) | `{"listener", "addresses": [..], "weight"}` or `{"n": 2}` (managed) |
//! | `POST /backends/remove` (`/rm`) | `{"listener", "addresses" or "ids"}`; in-flight requests finish |
//! | `POST /backends/drain` | same selection; no new requests, stays listed |
//! | `POST /plugin` | `{"listener", "plugin", "options"}`: load, validate, swap |
//! | `POST /plugin/upload?listener=&name=&options=` | raw `.wasm` body: saved, then swapped in like `POST /plugin` |
//! | `GET /pick?listener=&key=&path=` | which backend the plugin would choose |
//! | `GET /metrics` | Prometheus text |
//! | `POST /reload` | re-read the configuration |
//! | `GET /`, `GET /events` | the live dashboard and its event stream ([`crate::dashboard`]) |
//!
//! The operations themselves are [`Control`]'s; this module only speaks HTTP.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::dashboard::Dashboard;
use crate::serve::{ApiError, Control, PluginRequest};

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// Largest plugin upload accepted.
const MAX_UPLOAD: usize = 32 << 20;

/// Serves the admin API on `socket` until the task is dropped.
pub async fn serve(socket: std::net::TcpListener, control: Arc<Control>, token: Option<String>) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, "admin: cannot use the listening socket");
            return;
        }
    };
    let token: Option<Arc<str>> = token.map(Arc::from);
    let dashboard = Dashboard::start(control.clone());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "admin: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (control, token, dashboard) = (control.clone(), token.clone(), dashboard.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (control, token, dashboard) =
                    (control.clone(), token.clone(), dashboard.clone());
                async move {
                    if let Some(res) = dashboard.route(&req, token.as_deref()) {
                        return Ok::<_, Infallible>(res);
                    }
                    Ok(route(&control, token.as_deref(), req)
                        .await
                        .map(|body| body.boxed_unsync()))
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message.into() }))
}

fn result(r: Result<Value, ApiError>) -> Response<Full<Bytes>> {
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error(e.status, e.message),
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request<Incoming>, token: &str) -> Result<(), &'static str> {
    let Some(v) = req.headers().get(header::AUTHORIZATION) else {
        return Err("this admin endpoint needs a token: send Authorization: Bearer <token>");
    };
    let given = v
        .to_str()
        .ok()
        .and_then(|s| s.strip_prefix("Bearer "))
        .unwrap_or("");
    if same(given.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err("wrong admin token")
    }
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("cannot read the body: {e}"),
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("invalid JSON body: {e}"),
    })
}

fn query(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes a query value (`%XX` and `+`); malformed escapes are kept as they are.
pub(crate) fn percent_decode(s: &str) -> String {
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

async fn route(
    control: &Control,
    token: Option<&str>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    if let Some(t) = token
        && let Err(why) = authorized(&req, t)
    {
        let mut res = error(StatusCode::UNAUTHORIZED, why);
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return res;
    }
    let res = match (&method, path.as_str()) {
        (&Method::GET, "/backends" | "/rep") => json_response(StatusCode::OK, &control.report()),
        (&Method::POST, "/backends/add" | "/add") => match body(req).await {
            Ok(b) => result(control.add(b)),
            Err(e) => result(Err(e)),
        },
        (&Method::POST, "/backends/remove" | "/rm") => match body(req).await {
            Ok(b) => result(control.remove(b)),
            Err(e) => result(Err(e)),
        },
        (&Method::POST, "/backends/drain") => match body(req).await {
            Ok(b) => result(control.drain(b)),
            Err(e) => result(Err(e)),
        },
        (&Method::POST, "/plugin") => match body(req).await {
            Ok(b) => result(control.swap_plugin(b).await),
            Err(e) => result(Err(e)),
        },
        (&Method::POST, "/plugin/upload") => result(upload(control, req).await),
        (&Method::GET, "/pick") => {
            let listener = query(&req, "listener");
            let path = query(&req, "path");
            result(control.pick(listener.as_deref(), query(&req, "key"), path.as_deref()))
        }
        (&Method::GET, "/metrics") => {
            let mut res = Response::new(Full::new(Bytes::from(control.metrics_text())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        (&Method::POST, "/reload") => result(control.reload().await),
        (
            _,
            "/backends" | "/rep" | "/backends/add" | "/add" | "/backends/remove" | "/rm"
            | "/backends/drain" | "/plugin" | "/plugin/upload" | "/pick" | "/metrics" | "/reload",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint {method} {path}"),
        ),
    };
    if method == Method::POST {
        tracing::info!(%method, %path, status = res.status().as_u16(), "admin call");
    }
    res
}

/// `POST /plugin/upload`: saves the component under the temp directory, named by its
/// content hash (one file per distinct upload), then swaps it in as `POST /plugin` would.
async fn upload(control: &Control, req: Request<Incoming>) -> Result<Value, ApiError> {
    let listener = query(&req, "listener");
    let options = match query(&req, "options").filter(|o| !o.trim().is_empty()) {
        Some(o) => serde_json::from_str(&o).map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("invalid options JSON: {e}"),
        })?,
        None => Default::default(),
    };
    let name = query(&req, "name").unwrap_or_default();
    let bytes = Limited::new(req.into_body(), MAX_UPLOAD)
        .collect()
        .await
        .map_err(|e| {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError {
                status,
                message: format!("cannot read the upload: {e}"),
            }
        })?;
    let bytes = bytes.to_bytes();
    if !bytes.starts_with(b"\0asm") {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "not a WebAssembly file (no \\0asm header)".into(),
        });
    }
    let stem: String = std::path::Path::new(&name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        .take(40)
        .collect();
    let stem = if stem.is_empty() {
        "plugin".to_string()
    } else {
        stem
    };
    // A directory of this process only, created 0700: no other local user can swap the file
    // between saving it and loading it.
    let dir = std::env::temp_dir().join(format!("lbwasm-uploads-{}", std::process::id()));
    let path = dir.join(format!(
        "{stem}-{:016x}.wasm",
        xxhash_rust::xxh3::xxh3_64(&bytes)
    ));
    let saved = match private_dir(&dir) {
        Ok(()) => tokio::fs::write(&path, &bytes).await,
        Err(e) => Err(e),
    };
    saved.map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("cannot save the upload to {}: {e}", path.display()),
    })?;
    let swapped = control
        .swap_plugin(PluginRequest {
            listener,
            plugin: path.to_string_lossy().into_owned(),
            options,
        })
        .await;
    if swapped.is_err() {
        let _ = tokio::fs::remove_file(&path).await;
    }
    swapped
}

/// Creates `dir` readable and writable by this user only, and checks an existing one is ours
/// and private (a directory planted by someone else is refused).
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(dir)?;
                // SAFETY: geteuid has no preconditions and cannot fail.
                let uid = unsafe { libc::geteuid() };
                if meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "{} is not a private directory of ours",
                        dir.display()
                    )))
                }
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
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
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
