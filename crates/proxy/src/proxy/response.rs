//! A response's lifecycle as it streams to the client ([`ResBody`]): what must live exactly
//! as long as it does (the backend's in-flight guard, the client connection's activity mark,
//! the request's access-log line) and who hears of a backend body that fails ([`Blame`]).
//! The bytes themselves come from [`BackendBody`] (or are the proxy's own text). Also
//! [`Reply`], a whole response as either server (HTTP/1.1 or HTTP/2) sends it.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use lbwasm_http::fields::Fields;

use super::access_log::Pending;
use super::activity::ActivityGuard;
use super::body::BoxError;
use super::client::{BackendBody, BackendConn};
use super::h2c::StreamSlot;
use super::local::LocalListener;
use super::orca;
use crate::pool::InFlight;

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// What is sent to a client: a backend's body, or the proxy's own one-line text.
pub(crate) struct ResBody {
    kind: Kind,
    tail: Tail,
}

enum Kind {
    Backend(BackendBody),
    /// An HTTP/2 backend's stream: data, then trailers. Its slot on the connection is
    /// held until the body ends or is dropped (a client that goes away resets the stream
    /// on the backend: hyper sends `RST_STREAM(CANCEL)` when the body is dropped unended).
    H2(Incoming, Option<StreamSlot>),
    Text(Option<Bytes>),
    /// A protocol switch: the backend connection, for the HTTP/1.1 server to relay to.
    Switch(Option<BackendConn>),
}

/// Released when the response ends (or is dropped).
#[derive(Default)]
struct Tail {
    in_flight: Option<InFlight>,
    activity: Option<ActivityGuard>,
    /// Boxed: a response is moved several times, and most listeners keep no log.
    log: Option<Box<Pending>>,
    blame: Option<Blame>,
}

impl Tail {
    fn release(&mut self) {
        self.in_flight = None;
        self.activity = None;
        self.log = None;
        self.blame = None;
    }

    /// A backend's body arrived whole.
    fn completed(&mut self) {
        if let (Some(guard), Some(_)) = (&mut self.in_flight, &self.blame) {
            guard.completed();
        }
    }

    /// The backend cut or stalled the body after its head: a failure of that backend
    /// for passive health, like one before the head.
    fn backend_failed(&mut self) {
        if let (Some(guard), Some(blame)) = (&mut self.in_flight, &self.blame)
            && guard.failed_late(blame.passive)
        {
            blame.local.shared.eject(guard.backend().clone());
        }
    }
}

/// Who hears of a backend body that fails: the worker's listener (which asks the control
/// plane for an ejection), with its passive-health threshold.
pub(crate) struct Blame {
    pub(crate) local: Rc<LocalListener>,
    pub(crate) passive: u32,
}

impl ResBody {
    /// A backend's body; `in_flight` is released when it ends, and `blame` told if the
    /// backend fails it.
    pub(crate) fn backend(body: BackendBody, in_flight: InFlight, blame: Blame) -> Self {
        ResBody {
            kind: Kind::Backend(body),
            tail: Tail {
                in_flight: Some(in_flight),
                blame: Some(blame),
                ..Tail::default()
            },
        }
    }

    /// An HTTP/2 backend's body on `slot`; otherwise as [`ResBody::backend`].
    pub(crate) fn h2(body: Incoming, slot: StreamSlot, in_flight: InFlight, blame: Blame) -> Self {
        ResBody {
            kind: Kind::H2(body, Some(slot)),
            tail: Tail {
                in_flight: Some(in_flight),
                blame: Some(blame),
                ..Tail::default()
            },
        }
    }

    /// A text body.
    pub(crate) fn text(text: impl Into<Bytes>) -> Self {
        ResBody {
            kind: Kind::Text(Some(text.into())),
            tail: Tail::default(),
        }
    }

    /// Whether trailers may still come: an HTTP/2 backend's stream that has not ended
    /// (an HTTP/1.1 backend's trailers are not forwarded).
    pub(crate) fn may_have_trailers(&self) -> bool {
        matches!(&self.kind, Kind::H2(b, _) if !b.is_end_stream())
    }

    /// The proxy's own text, if this is one (taken).
    pub(crate) fn into_text(self) -> Option<Bytes> {
        match self.kind {
            Kind::Text(t) => t,
            _ => None,
        }
    }

    /// A protocol switch to `conn`: no body, the connection itself is handed over.
    pub(crate) fn switch(conn: BackendConn, in_flight: InFlight) -> Self {
        ResBody {
            kind: Kind::Switch(Some(conn)),
            tail: Tail {
                in_flight: Some(in_flight),
                ..Tail::default()
            },
        }
    }

    /// The switched backend connection, and what keeps it counted in flight.
    pub(crate) fn take_switch(&mut self) -> Option<(BackendConn, Option<InFlight>)> {
        match &mut self.kind {
            Kind::Switch(conn) => Some((conn.take()?, self.tail.in_flight.take())),
            _ => None,
        }
    }

    /// Keeps the client connection marked busy until the body ends.
    pub(crate) fn attach(&mut self, activity: ActivityGuard) {
        self.tail.activity = Some(activity);
    }

    /// Writes the request's access-log line when the body ends, with the bytes it sent.
    pub(crate) fn log(&mut self, line: Pending) {
        self.tail.log = Some(Box::new(line));
    }

    fn ended(&self) -> bool {
        match &self.kind {
            Kind::Backend(b) => b.ended(),
            Kind::H2(b, _) => b.is_end_stream(),
            Kind::Text(t) => t.is_none(),
            Kind::Switch(_) => true,
        }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Backend(b) => {
                ready!(b.poll_next(cx)).map(|r| r.map(Frame::data).map_err(BoxError::from))
            }
            Kind::H2(b, slot) => {
                let mut polled =
                    ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(BoxError::from));
                match &mut polled {
                    Some(Ok(frame)) => {
                        // A report in the trailers (gRPC's `endpoint-load-metrics-bin`), and
                        // how a gRPC call ended.
                        if let (Some(t), Some(guard), Some(blame)) =
                            (frame.trailers_mut(), &this.tail.in_flight, &this.tail.blame)
                        {
                            orca::take_map(t, guard.backend(), &blame.local);
                            if let Some(code) = t.get("grpc-status") {
                                let local = &blame.local;
                                local
                                    .metrics
                                    .grpc_status(local.shared.index, code.as_bytes());
                            }
                        }
                    }
                    _ => drop(slot.take()), // ended or failed: the stream is closed
                }
                polled
            }
            Kind::Text(t) => t.take().map(|b| Ok(Frame::data(b))),
            Kind::Switch(_) => None,
        };
        if let (Some(line), Some(Ok(frame))) = (&mut this.tail.log, &polled)
            && let Some(data) = frame.data_ref()
        {
            line.sent += data.len() as u64;
        }
        match &polled {
            Some(Err(_)) => {
                if !matches!(&this.kind, Kind::Backend(b) if b.client_fault()) {
                    this.tail.backend_failed();
                }
                this.tail.release();
            }
            None => {
                this.tail.completed();
                this.tail.release();
            }
            Some(Ok(_)) if this.ended() => {
                this.tail.completed();
                this.tail.release();
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Backend(b) => b.size_hint(),
            Kind::H2(b, _) => b.size_hint(),
            Kind::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Switch(_) => SizeHint::with_exact(0),
        }
    }
}

/// A response as the proxy sends it to its client: a backend's head and body, or the
/// proxy's own answer. HTTP/1.1 clients get the backend's fields copied as they came;
/// HTTP/2 ones get them as a map ([`Reply::into_response`]).
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) fields: Fields,
    pub(crate) body: ResBody,
}

impl Reply {
    /// The proxy's own answer: `<code> <cause>` on one line.
    pub(crate) fn text(status: StatusCode, cause: String) -> Reply {
        let mut fields = HeaderMap::with_capacity(1);
        fields.insert(header::CONTENT_TYPE, TEXT);
        Reply {
            status,
            fields: Fields::Map(fields),
            body: ResBody::text(format!("{} {cause}\n", status.as_u16())),
        }
    }

    /// The response for hyper (HTTP/2 clients). A field the `http` crate refuses (httparse
    /// is a little more lenient with values) makes it a 502.
    pub(crate) fn into_response(self) -> Response<ResBody> {
        match self.fields.into_map() {
            Ok(headers) => {
                let mut res = Response::new(self.body);
                *res.status_mut() = self.status;
                *res.headers_mut() = headers;
                res
            }
            Err(why) => Reply::text(
                StatusCode::BAD_GATEWAY,
                format!("backend sent an unusable head: {why}"),
            )
            .into_response(),
        }
    }
}
