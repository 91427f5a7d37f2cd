//! The HTTP face of a backend (HTTP/1.1 and HTTP/2 prior knowledge on one port): routes,
//! response shapes, `x-served-by`, gRPC-shaped answers, ORCA load reports, and a body
//! wrapper that keeps a request counted as in flight until its response has been streamed
//! out.
//!
//! gRPC: a `POST` whose `content-type` starts with `application/grpc` is answered the gRPC
//! way: `200`, `content-type: application/grpc`, the request's messages echoed back (its
//! gRPC frames, byte for byte), trailer `grpc-status: 0`. The knobs apply as to any
//! workload request; an injected error or `down` is a trailers-only answer with
//! `grpc-status` 13 (INTERNAL) or 14 (UNAVAILABLE). `/grpc.health.v1.Health/Check` is
//! not a workload: it answers `SERVING`, or `NOT_SERVING` during an `error` or `down`
//! fault (what `/heartbeat` answers 500/503 for), `slow` delaying it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;

use super::config::Fault;
use super::load::MeteredExec;
use super::orca::{ORCA_HEADER, ORCA_TRAILER, OrcaFigures};
use super::state::{Gauge, GaugeGuard, Outcome, Shared};

/// The header every response carries so that clients can attribute it to a server.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The standard gRPC health-checking method (grpc.health.v1).
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// Largest health-check request read (a service name): anything bigger is not one.
const HEALTH_REQUEST_MAX: usize = 16 * 1024;
/// gRPC status codes the backend answers with.
const GRPC_OK: u8 = 0;
const GRPC_INVALID_ARGUMENT: u8 = 3;
const GRPC_INTERNAL: u8 = 13;
const GRPC_UNAVAILABLE: u8 = 14;
/// `HealthCheckResponse.ServingStatus` values.
const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let exec = MeteredExec {
        meter: shared.meter.clone(),
    };
    let svc = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(shared, req).await) }
        })
    };
    if let Err(error) = auto::Builder::new(exec)
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(server = %shared.id, %peer, %error, "connection ended with an error");
    }
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if is_grpc(&req) {
        return grpc(shared, req).await;
    }
    let mut res = route_http(&shared, req).await;
    if let Some(format) = shared.cfg.orca {
        let report = OrcaFigures::from_load(&shared.load_report());
        res.headers_mut().insert(ORCA_HEADER, report.header(format));
    }
    res
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.method() == Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

async fn route_http(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let shared = shared.clone();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/load" if get => load(&shared),
        "/heartbeat" if get => heartbeat(&shared).await,
        _ if get || req.method() == Method::POST => workload(shared, req).await,
        _ => {
            let mut res = text(
                &shared,
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
            );
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            res
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn respond(
    shared: &Shared,
    status: StatusCode,
    content_type: HeaderValue,
    body: Body,
) -> Response<Body> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, content_type);
    res.headers_mut()
        .insert(SERVED_BY, shared.served_by.clone());
    res
}

fn text(shared: &Shared, status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(shared, status, TEXT, full(body))
}

fn json(shared: &Shared, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(shared, StatusCode::OK, JSON, full(body)),
        Err(error) => {
            tracing::error!(server = %shared.id, %error, "cannot serialise a response");
            text(
                shared,
                StatusCode::INTERNAL_SERVER_ERROR,
                "serialisation failed\n",
            )
        }
    }
}

/// Never subject to knobs or faults (short of `down`): a balancer must be able to read
/// the load of an overloaded or failing server.
fn load(shared: &Shared) -> Response<Body> {
    json(shared, &shared.load_report())
}

/// Sees faults (so health checks notice them) but no other knob.
async fn heartbeat(shared: &Shared) -> Response<Body> {
    match shared.fault() {
        Some(Fault::Error) => text(shared, StatusCode::INTERNAL_SERVER_ERROR, "error"),
        Some(Fault::Down) => text(shared, StatusCode::SERVICE_UNAVAILABLE, "down"),
        Some(Fault::Slow(d)) => {
            tokio::time::sleep(d).await;
            text(shared, StatusCode::OK, "ok")
        }
        None => text(shared, StatusCode::OK, "ok"),
    }
}

/// The trailers ending a gRPC answer: `grpc-status` and, with `--orca`, the load report.
fn grpc_trailers(shared: &Shared, status: u8, message: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(GRPC_STATUS, HeaderValue::from(u16::from(status)));
    if let Some(msg) = message.and_then(|m| HeaderValue::try_from(m).ok()) {
        map.insert(GRPC_MESSAGE, msg);
    }
    if shared.cfg.orca.is_some() {
        let report = OrcaFigures::from_load(&shared.load_report());
        map.insert(ORCA_TRAILER, report.trailer());
    }
    map
}

/// A gRPC answer with no message: status (and report) in the headers, nothing else.
fn grpc_trailers_only(shared: &Shared, status: u8, message: &str) -> Response<Body> {
    let mut res = respond(shared, StatusCode::OK, GRPC, full(Bytes::new()));
    res.headers_mut()
        .extend(grpc_trailers(shared, status, Some(message)));
    res
}

/// A gRPC answer: `body` (gRPC-framed messages) then the trailers.
fn grpc_reply(shared: Arc<Shared>, body: Body) -> Response<Body> {
    let body = body
        .with_trailers(async move { Some(Ok(grpc_trailers(&shared, GRPC_OK, None))) })
        .boxed_unsync();
    let mut res = Response::new(body);
    res.headers_mut().insert(header::CONTENT_TYPE, GRPC);
    res
}

/// One gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    out.into()
}

async fn grpc(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == HEALTH_CHECK {
        return grpc_health(shared, req).await;
    }
    let active = shared.enter(Gauge::Active);
    let mut res = match shared.process().await {
        Outcome::Down => grpc_trailers_only(&shared, GRPC_UNAVAILABLE, "down"),
        Outcome::Error => grpc_trailers_only(
            &shared,
            GRPC_INTERNAL,
            &format!("injected error from {}", shared.id),
        ),
        // The request's frames streamed back as they arrive: a valid gRPC answer, one
        // message per request message.
        Outcome::Ok => {
            let mut res = grpc_reply(shared.clone(), req.into_body().boxed_unsync());
            res.headers_mut()
                .insert(SERVED_BY, shared.served_by.clone());
            res
        }
    };
    let body = std::mem::replace(res.body_mut(), full(Bytes::new()));
    *res.body_mut() = Tracked {
        inner: body,
        active: Some(active),
    }
    .boxed_unsync();
    res
}

/// `grpc.health.v1.Health/Check` for any service name: the fault decides, nothing else.
async fn grpc_health(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let body = http_body_util::Limited::new(req.into_body(), HEALTH_REQUEST_MAX);
    let valid = match body.collect().await {
        Ok(bytes) => {
            let bytes = bytes.to_bytes();
            // One uncompressed message (its HealthCheckRequest content is not checked).
            bytes.len() >= 5
                && bytes[0] == 0
                && u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize
                    == bytes.len() - 5
        }
        Err(_) => false,
    };
    if !valid {
        return grpc_trailers_only(
            &shared,
            GRPC_INVALID_ARGUMENT,
            "expected one uncompressed HealthCheckRequest",
        );
    }
    let status = match shared.fault() {
        Some(Fault::Error | Fault::Down) => NOT_SERVING,
        Some(Fault::Slow(d)) => {
            tokio::time::sleep(d).await;
            SERVING
        }
        None => SERVING,
    };
    // HealthCheckResponse { ServingStatus status = 1; }: key 0x08, varint.
    let mut res = grpc_reply(shared.clone(), full(grpc_frame(&[0x08, status])));
    res.headers_mut()
        .insert(SERVED_BY, shared.served_by.clone());
    res
}

/// `GET` anything but `/load` and `/heartbeat`, and `POST` anything: the knobs apply.
async fn workload(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let active = shared.enter(Gauge::Active);
    let mut res = match shared.process().await {
        Outcome::Down => text(&shared, StatusCode::SERVICE_UNAVAILABLE, "down\n"),
        Outcome::Error => text(
            &shared,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("injected error from {}\n", shared.id),
        ),
        Outcome::Ok if req.method() == Method::POST => {
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            // Streamed back frame by frame as it arrives, never buffered whole.
            respond(
                &shared,
                StatusCode::OK,
                content_type,
                req.into_body().boxed_unsync(),
            )
        }
        Outcome::Ok if req.uri().path() == "/home" => json(
            &shared,
            &serde_json::json!({
                "message": format!("Hello from Server: {}", shared.id),
                "status": "successful",
            }),
        ),
        Outcome::Ok => text(
            &shared,
            StatusCode::OK,
            format!(
                "{} {} served by {}\n",
                req.method(),
                req.uri().path(),
                shared.id
            ),
        ),
    };
    let body = std::mem::replace(res.body_mut(), full(Bytes::new()));
    *res.body_mut() = Tracked {
        inner: body,
        active: Some(active),
    }
    .boxed_unsync();
    res
}

pin_project! {
    /// A response body that keeps its request counted as active until fully sent (or
    /// dropped with the connection).
    struct Tracked<B> {
        #[pin]
        inner: B,
        active: Option<GaugeGuard>,
    }
}

impl<B: HttpBody> HttpBody for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            this.active.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
