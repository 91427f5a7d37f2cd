//! The admin API: its own listener (loopback unless `allow_remote`), never the data
//! listener. JSON in and out, errors as `{"error": "..."}` with a proper status; when a
//! token is configured every call but `GET /healthz` and the dashboard's page and assets
//! needs `Authorization: Bearer <token>`.
//!
//! A web page must not be able to use it through the operator's browser ([`Access`]): every
//! request but `GET /healthz` must name this endpoint in `Host` (no DNS rebinding), and a
//! state-changing call must come from the admin's own origin (or from no browser at all)
//! with a body type no cross-site form or `no-cors` fetch can send.
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
use std::net::SocketAddr;
use std::path::PathBuf;
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

use crate::config::AdminConfig;
use crate::dashboard::Dashboard;
use crate::serve::{ApiError, Control, PluginRequest};

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// Largest plugin upload accepted.
const MAX_UPLOAD: usize = 32 << 20;

/// Serves the admin API on `socket` until the task is dropped; `config` gives the token and
/// the names (`[admin] hosts`) it may be reached by.
pub async fn serve(socket: std::net::TcpListener, control: Arc<Control>, config: AdminConfig) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, "admin: cannot use the listening socket");
            return;
        }
    };
    let bound = listener.local_addr().unwrap_or(config.listen);
    let access = Arc::new(Access::new(bound, &config.hosts));
    let token: Option<Arc<str>> = config.token.map(Arc::from);
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
        // The address the client reached: on a wildcard bind, its IP literal is a name of ours.
        let local = stream.local_addr().ok();
        let (control, token, dashboard, access) = (
            control.clone(),
            token.clone(),
            dashboard.clone(),
            access.clone(),
        );
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (control, token, dashboard, access) = (
                    control.clone(),
                    token.clone(),
                    dashboard.clone(),
                    access.clone(),
                );
                async move {
                    if let Some(refused) = access.check(&req, local) {
                        tracing::info!(%peer, method = %req.method(), path = %req.uri().path(), status = refused.status().as_u16(), "admin call refused (browser protections)");
                        return Ok(refused.map(|body| body.boxed_unsync()));
                    }
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

/// Keeps web pages out of the admin API. A browser always sends `Host`, sends `Origin` on
/// every cross-origin POST and `Sec-Fetch-Site` on every request, and without a CORS
/// preflight (which this API never grants) a page can only send a body as `text/plain`,
/// `application/x-www-form-urlencoded` or `multipart/form-data`. So:
///
/// - `Host` (and an absolute request target's authority) must be one of this endpoint's
///   own names: its bound address, `localhost:PORT`, the IP the client connected to, or a
///   name in `[admin] hosts`. A rebinding page's requests carry the page's own name.
/// - A state-changing call (any method but GET and HEAD) is refused when `Sec-Fetch-Site`
///   is `cross-site` or `same-site`, or when `Origin` is present and is not `http://` (or
///   `https://`) followed by one of those names. Clients that are no browser send neither.
/// - Its body type must be the one the call reads: `application/json`, or
///   `application/wasm` / `application/octet-stream` for an upload; `POST /reload` takes no
///   body (none, or JSON). A form-submittable type is refused on every POST.
///
/// `GET /healthz` is exempt: it reveals and changes nothing, and probes use any name.
#[derive(Debug)]
pub struct Access {
    /// Accepted names, lower case, as `Host` carries them (`name:port`, `[v6]:port`).
    hosts: Vec<String>,
}

impl Access {
    /// The rules for an endpoint bound to `bound`, also reachable as `names` (`[admin]
    /// hosts`; a name given without a port is accepted without one, and with ours).
    pub fn new(bound: SocketAddr, names: &[String]) -> Self {
        let port = bound.port();
        let mut hosts = vec![bound.to_string(), format!("localhost:{port}")];
        for name in names {
            let name = name.trim().to_ascii_lowercase();
            if !has_port(&name) {
                hosts.push(format!("{name}:{port}"));
            }
            hosts.push(name);
        }
        Access { hosts }
    }

    fn allows(&self, host: &str, local: Option<SocketAddr>) -> bool {
        let host = host.trim().to_ascii_lowercase();
        self.hosts.contains(&host) || local.is_some_and(|a| a.to_string() == host)
    }

    /// The refusal (403, or 415 for a body type) of a request a web page could have made
    /// against the operator's will; none when it may go on. `local` is the address the
    /// client connected to.
    pub fn check<B>(
        &self,
        req: &Request<B>,
        local: Option<SocketAddr>,
    ) -> Option<Response<Full<Bytes>>> {
        let path = req.uri().path();
        if path == "/healthz" {
            return None;
        }
        let forbidden = |why: String| Some(error(StatusCode::FORBIDDEN, why));
        let Some(host) = req.headers().get(header::HOST) else {
            return forbidden(
                "no Host header: the admin API answers only requests that name it".into(),
            );
        };
        let host = String::from_utf8_lossy(host.as_bytes());
        if !self.allows(&host, local) {
            return forbidden(format!(
                "Host {host:?} is not a name of this admin endpoint (add it to [admin] hosts or --admin-host to use it)"
            ));
        }
        if let Some(authority) = req.uri().authority()
            && !self.allows(authority.as_str(), local)
        {
            return forbidden(format!(
                "the request target names another host ({authority})"
            ));
        }
        let method = req.method();
        if method == Method::GET || method == Method::HEAD {
            return None;
        }
        let text = |name: &str| {
            req.headers().get(name).map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .trim()
                    .to_ascii_lowercase()
            })
        };
        if let Some(site) = text("sec-fetch-site")
            && (site == "cross-site" || site == "same-site")
        {
            return forbidden(format!(
                "{method} {path} from a {site} web page refused: only the admin's own page may change state"
            ));
        }
        if let Some(origin) = text("origin") {
            let own = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|h| self.allows(h, local));
            if !own {
                return forbidden(format!(
                    "{method} {path} from origin {origin} refused: only the admin's own origin may change state"
                ));
            }
        }
        let media = text("content-type").map(|ct| {
            let essence = ct.split(';').next().unwrap_or_default().trim();
            essence.to_string()
        });
        let wanted: &[&str] = match path {
            "/plugin/upload" => &["application/wasm", "application/octet-stream"],
            _ => &["application/json"],
        };
        let reads_body = matches!(
            path,
            "/backends/add"
                | "/add"
                | "/backends/remove"
                | "/rm"
                | "/backends/drain"
                | "/plugin"
                | "/plugin/upload"
        );
        // No form-submittable type is ever wanted, so a form is refused on every POST; a call
        // that reads no body (`/reload`) may come without one.
        let fine = match media.as_deref() {
            None => !reads_body,
            Some(m) => wanted.contains(&m),
        };
        if fine {
            return None;
        }
        let got = media.map_or_else(|| "none".to_string(), |m| m.to_string());
        Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "{method} {path} needs Content-Type: {} (got {got}; with curl: -H 'Content-Type: {}')",
                wanted.join(" or "),
                wanted[0]
            ),
        ))
    }
}

/// Whether a `Host`-style name carries a port (`name:1`, `[::1]:1`; not `[::1]`).
fn has_port(name: &str) -> bool {
    match name.rsplit_once(']') {
        Some((_, rest)) => rest.starts_with(':'),
        None => name.contains(':'),
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
    let dir = upload_dir();
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

/// Where `POST /plugin/upload` saves components: one private folder per process, removed
/// at exit by [`remove_uploads`].
fn upload_dir() -> PathBuf {
    std::env::temp_dir().join(format!("lbwasm-uploads-{}", std::process::id()))
}

/// Removes this process's upload folder, if it made one. `lbwasm serve` calls it on the way
/// out (SIGTERM, Ctrl-C, errors), when no plugin is loaded from it any more: a loaded
/// plugin is compiled code in memory and no longer reads its file.
pub fn remove_uploads() {
    let dir = upload_dir();
    // Only a real directory of ours: never follow a link someone else planted there.
    let ours = std::fs::symlink_metadata(&dir).is_ok_and(|meta| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions and cannot fail.
            meta.is_dir() && meta.uid() == unsafe { libc::geteuid() }
        }
        #[cfg(not(unix))]
        {
            meta.is_dir()
        }
    });
    if !ours {
        return;
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::debug!(dir = %dir.display(), "removed the plugin upload folder"),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot remove the plugin upload folder")
        }
    }
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
    fn access_names_and_origins() {
        let bound: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        let a = Access::new(bound, &["Admin.Test".into(), "lb.internal:8443".into()]);
        let req = |method: &str, host: Option<&str>, extra: &[(&str, &str)]| {
            let mut b = Request::builder().method(method).uri("/backends/add");
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            for (k, v) in extra {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        let json = ("content-type", "application/json");
        let status = |r: &Request<()>| a.check(r, Some(bound)).map(|res| res.status().as_u16());
        for ok in [
            "127.0.0.1:9900",
            "localhost:9900",
            "admin.test",
            "ADMIN.test:9900",
            "lb.internal:8443",
        ] {
            assert_eq!(status(&req("POST", Some(ok), &[json])), None, "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost",
            "lb.internal",
            "127.0.0.1:9901",
            "admin.test:1",
        ] {
            assert_eq!(status(&req("GET", Some(bad), &[])), Some(403), "{bad}");
        }
        assert_eq!(status(&req("GET", None, &[])), Some(403));
        let host = Some("127.0.0.1:9900");
        let post = |extra: &[(&str, &str)]| status(&req("POST", host, extra));
        assert_eq!(post(&[json, ("origin", "http://127.0.0.1:9900")]), None);
        assert_eq!(post(&[json, ("origin", "http://admin.test:9900")]), None);
        assert_eq!(post(&[json, ("origin", "http://evil.example")]), Some(403));
        assert_eq!(post(&[json, ("origin", "null")]), Some(403));
        assert_eq!(post(&[json, ("sec-fetch-site", "same-origin")]), None);
        assert_eq!(post(&[json, ("sec-fetch-site", "same-site")]), Some(403));
        assert_eq!(post(&[("content-type", "text/plain")]), Some(415));
        assert_eq!(
            post(&[("content-type", "Application/JSON; charset=utf-8")]),
            None
        );
        assert_eq!(post(&[]), Some(415));
        assert!(has_port("[::1]:9") && !has_port("[::1]") && has_port("a:1") && !has_port("a"));
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
