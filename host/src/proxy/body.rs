//! Bodies on both sides of the proxy, streamed frame by frame, never buffered.
//!
//! [`ResBody`] carries what must live exactly as long as a response is being streamed: the
//! backend's in-flight guard, the backend connection (returned to the worker's pool only if
//! the body ended cleanly), and the client connection's activity mark (idle timeout).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::client::Checkin;
use super::http::ActivityGuard;
use crate::pool::InFlight;

/// What is sent to a backend: the client's body as it arrives, or nothing (a retry of a
/// bodiless request).
pub(crate) enum ReqBody {
    /// Streamed from the client.
    Client(Incoming),
    /// No body.
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Client(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Client(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Client(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What is sent to a client: a backend's body, or the proxy's own one-line text.
pub(crate) struct ResBody {
    kind: Kind,
    tail: Tail,
}

enum Kind {
    Backend(Incoming),
    Text(Option<Bytes>),
}

/// Released when the response ends (or is dropped).
#[derive(Default)]
struct Tail {
    in_flight: Option<InFlight>,
    checkin: Option<Checkin>,
    activity: Option<ActivityGuard>,
}

impl Tail {
    fn release(&mut self, clean: bool) {
        if let Some(c) = self.checkin.take()
            && clean
        {
            c.release();
        }
        self.in_flight = None;
        self.activity = None;
    }
}

/// Boxed so that hyper can take any error.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ResBody {
    /// A backend's body; `in_flight` and `checkin` are released when it ends.
    pub(crate) fn backend(
        body: Incoming,
        in_flight: Option<InFlight>,
        checkin: Option<Checkin>,
    ) -> Self {
        ResBody {
            kind: Kind::Backend(body),
            tail: Tail {
                in_flight,
                checkin,
                activity: None,
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

    /// No body (a protocol switch).
    pub(crate) fn empty() -> Self {
        ResBody {
            kind: Kind::Text(None),
            tail: Tail::default(),
        }
    }

    /// Keeps the client connection marked busy until the body ends.
    pub(crate) fn attach(&mut self, activity: ActivityGuard) {
        self.tail.activity = Some(activity);
    }

    fn ended(&self) -> bool {
        match &self.kind {
            Kind::Backend(b) => b.is_end_stream(),
            Kind::Text(t) => t.is_none(),
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
                ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
            Kind::Text(t) => t.take().map(|b| Ok(Frame::data(b))),
        };
        match &polled {
            None => this.tail.release(true),
            Some(Err(_)) => this.tail.release(false),
            Some(Ok(_)) if this.ended() => this.tail.release(true),
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
            Kind::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for ResBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it has ended (HEAD, 204, 304, Content-Length
        // reached): that is a clean end too.
        let clean = self.ended();
        self.tail.release(clean);
    }
}
