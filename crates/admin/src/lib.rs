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
//! | `GET /`, `GET /events` | the live dashboard and its event stream ([`dashboard`]) |
//!
//! The operations themselves are [`Control`]'s; this module only speaks HTTP: it maps
//! [`Control`]'s typed reports to JSON and its errors to statuses ([`reply`]). It is handed
//! to the server as an [`AdminApi`] ([`Admin`]); the control plane does not know it.

mod access;
mod auth;
mod dashboard;
mod reply;
mod uploads;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lbwasm_proxy::tls::Terminator;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use self::access::Access;
use self::auth::Also;
use self::dashboard::Dashboard;
use self::reply::{ApiError, Body, answer, full, json, query};
use lbwasm_proxy::config::{AdminConfig, Config};
use lbwasm_proxy::serve::{AdminApi, Control, Server};

/// Longest a client may take to finish a TLS handshake.
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// The admin API and its dashboard, as the [`AdminApi`] a [`Server`] serves on its
/// `[admin]` socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Admin;

impl AdminApi for Admin {
    fn serve(
        &self,
        socket: std::net::TcpListener,
        control: Arc<Control>,
        config: AdminConfig,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(serve(socket, control, config))
    }

    fn at_exit(&self) {
        uploads::remove();
    }
}

/// Starts a server for `config` with this admin API on its `[admin]` socket, if it has one:
/// what the simulator and the tests run (`lbwasm serve` is [`lbwasm_proxy::serve::run`] with
/// [`Admin`]).
pub fn start(config: Config) -> anyhow::Result<Server> {
    Server::start_with(config, None, Some(Arc::new(Admin)))
}

/// Serves the admin API on `socket` until the task is dropped; `config` gives the token and
/// the names (`[admin] hosts`) it may be reached by.
async fn serve(socket: std::net::TcpListener, control: Arc<Control>, config: AdminConfig) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, "admin: cannot use the listening socket");
            return;
        }
    };
    // HTTPS with `[admin.tls]`: its certificates reload with changed files as a
    // listener's do (a reload of the file reaches them only by a restart).
    let tls = match &config.tls {
        Some(settings) => match Terminator::new("admin", settings, &[b"http/1.1"]) {
            Ok(t) => {
                let t = Arc::new(t);
                tokio::spawn(lbwasm_proxy::tls::server::watch_files(t.clone()));
                Some(t)
            }
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "admin: cannot use its TLS settings; not serving");
                return;
            }
        },
        None => None,
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
        let acceptor = tls.as_ref().map(|t| t.acceptor());
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
                        return Ok(refused);
                    }
                    if let Some(res) = dashboard.route(&req, token.as_deref()) {
                        return Ok::<_, std::convert::Infallible>(res);
                    }
                    Ok(route(&control, token.as_deref(), req).await)
                }
            });
            let http = hyper::server::conn::http1::Builder::new();
            let served = match acceptor {
                None => http.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(HANDSHAKE, handshake).await {
                        Ok(Ok(tls)) => http.serve_connection(TokioIo::new(tls), svc).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "admin: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad(format!("cannot read the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

async fn route(control: &Control, token: Option<&str>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/healthz" {
        return Response::new(full(Bytes::from_static(b"ok\n")));
    }
    if let Some(refused) = token.and_then(|t| auth::refuse(&req, t, Also::Nothing)) {
        return refused;
    }
    let res = match (&method, path.as_str()) {
        (&Method::GET, "/backends" | "/rep") => json(StatusCode::OK, &control.report()),
        (&Method::POST, "/backends/add" | "/add") => match body(req).await {
            Ok(b) => answer(control.add(b).await),
            Err(e) => e.response(),
        },
        (&Method::POST, "/backends/remove" | "/rm") => match body(req).await {
            Ok(b) => answer(control.remove(b).await),
            Err(e) => e.response(),
        },
        (&Method::POST, "/backends/drain") => match body(req).await {
            Ok(b) => answer(control.drain(b).await),
            Err(e) => e.response(),
        },
        (&Method::POST, "/plugin") => match body(req).await {
            Ok(b) => answer(control.swap_plugin(b).await),
            Err(e) => e.response(),
        },
        (&Method::POST, "/plugin/upload") => answer(uploads::upload(control, req).await),
        (&Method::GET, "/pick") => {
            let listener = query(&req, "listener");
            let path = query(&req, "path");
            answer(control.pick(listener.as_deref(), query(&req, "key"), path.as_deref()))
        }
        (&Method::GET, "/metrics") => {
            let mut res = Response::new(full(control.metrics_text()));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        (&Method::POST, "/reload") => answer(control.reload().await),
        (
            _,
            "/backends" | "/rep" | "/backends/add" | "/add" | "/backends/remove" | "/rm"
            | "/backends/drain" | "/plugin" | "/plugin/upload" | "/pick" | "/metrics" | "/reload",
        ) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )
        .response(),
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint {method} {path}"),
        )
        .response(),
    };
    if method == Method::POST {
        tracing::info!(%method, %path, status = res.status().as_u16(), "admin call");
    }
    res
}
