//! The HTTP face of a backend (HTTP/1.1 and HTTP/2 prior knowledge on one port): routes,
//! response shapes, `x-served-by`, and a body wrapper that keeps a request counted as in
//! flight until its response has been streamed out.

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
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;

use super::config::Fault;
use super::load::MeteredExec;
use super::state::{Gauge, GaugeGuard, Outcome, Shared};

/// The header every response carries so that clients can attribute it to a server.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

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
