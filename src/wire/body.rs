//! The bodies every handler sees: the request body it is given and the response body it
//! returns.
//!
//! Owns: [`RequestBody`]: none, a client's body read from its HTTP/1 connection
//! ([`crate::wire::server`]), or an HTTP/2 stream's ([`Inbound`]). [`Body`]: a whole body in
//! memory (the gateway's own answers), a replica's response streamed from its connection, or
//! any other body, boxed. The first two of each are nearly every request and response; they
//! cost no allocation of their own and no dynamic call per frame.
//! A replica's head forwarded as bytes rides in its body ([`Body::take_head`]) to the client's
//! HTTP/1 connection; whatever wraps a replica's body first lifts that head into the
//! response's extensions ([`lift_head`]), or its fields would be lost with the body.
//! Must not touch: what a body carries; the proxy, the admin API, the UI and the access log
//! make them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::admission::RequestPlace;
use crate::error::BoxError;
use crate::wire::client::head::RawHead;
use crate::wire::client::UpstreamBody;
use crate::wire::h2::{H2Body, Inbound};
use crate::wire::server::body::Http1Body;

/// A request body.
pub struct RequestBody(Request);

enum Request {
    Empty,
    Http1(Http1Body),
    Http2(Inbound),
    /// Frames in memory, for the tests of what reads request bodies.
    #[cfg(test)]
    Frames(std::collections::VecDeque<Frame<Bytes>>),
}

impl RequestBody {
    pub fn empty() -> RequestBody {
        RequestBody(Request::Empty)
    }

    pub fn http1(body: Http1Body) -> RequestBody {
        RequestBody(Request::Http1(body))
    }

    pub fn http2(body: Inbound) -> RequestBody {
        RequestBody(Request::Http2(body))
    }

    /// A body of these data frames, for tests.
    #[cfg(test)]
    pub fn frames(chunks: &[&'static [u8]]) -> RequestBody {
        let frames = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c)))
            .collect();
        RequestBody(Request::Frames(frames))
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Request::Empty => Poll::Ready(None),
            Request::Http1(body) => Pin::new(body).poll_frame(cx),
            Request::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            #[cfg(test)]
            Request::Frames(frames) => Poll::Ready(frames.pop_front().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Request::Empty => true,
            Request::Http1(body) => body.is_end_stream(),
            Request::Http2(body) => body.is_end_stream(),
            #[cfg(test)]
            Request::Frames(frames) => frames.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Request::Empty => SizeHint::with_exact(0),
            Request::Http1(body) => body.size_hint(),
            Request::Http2(body) => body.size_hint(),
            #[cfg(test)]
            Request::Frames(_) => SizeHint::default(),
        }
    }
}

/// A replica's response body, of the kind of connection it came on. Boxed: a response is moved
/// from layer to layer of the request path on its way out, and inline each move copied the
/// body's whole state with the head (264 bytes of body for HTTP/1.1, 376 for the response).
pub enum ReplicaBody {
    H1(Box<UpstreamBody>),
    H2(Box<H2Body>),
}

impl ReplicaBody {
    /// The connection of a `101` with the request's counts ([`UpstreamBody::into_switched`]);
    /// `None` for any other response, and for HTTP/2, which forwards no upgrade.
    pub fn into_switched(
        self,
    ) -> Option<(
        crate::upstream::pool::Conn,
        crate::snapshot::InFlight,
        Option<RequestPlace>,
    )> {
        match self {
            ReplicaBody::H1(b) => (*b).into_switched(),
            ReplicaBody::H2(_) => None,
        }
    }

    /// Keeps the request counted in the gateway's budgets until this body is done with.
    pub fn hold(&mut self, place: RequestPlace) {
        match self {
            ReplicaBody::H1(b) => b.hold(place),
            ReplicaBody::H2(b) => b.hold(place),
        }
    }

    /// Ends a gRPC call's response by `deadline`, its `grpc-timeout` of `timeout` from its
    /// start ([`H2Body::end_by`]); gRPC goes over HTTP/2 only, so an HTTP/1.1 body is left as
    /// it is.
    pub fn end_by(&mut self, deadline: tokio::time::Instant, timeout: std::time::Duration) {
        if let ReplicaBody::H2(b) = self {
            b.end_by(deadline, timeout);
        }
    }
}

impl HttpBody for ReplicaBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReplicaBody::H1(b) => Pin::new(b).poll_frame(cx),
            ReplicaBody::H2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplicaBody::H1(b) => b.is_end_stream(),
            ReplicaBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplicaBody::H1(b) => b.size_hint(),
            ReplicaBody::H2(b) => b.size_hint(),
        }
    }
}

/// A response body.
pub struct Body(Kind);

enum Kind {
    /// All of it, sent in one frame (`None` once sent, or when empty).
    Full(Option<Bytes>),
    /// Boxed as in [`ReplicaBody`].
    Upstream(Box<UpstreamBody>),
    Upstream2(Box<H2Body>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// A body that is all in memory.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    /// A replica's response body, read from its connection as the client takes it.
    pub fn upstream(body: UpstreamBody) -> Body {
        Body(Kind::Upstream(Box::new(body)))
    }

    /// A replica's response body, from either kind of connection.
    pub fn replica(body: ReplicaBody) -> Body {
        match body {
            ReplicaBody::H1(b) => Body(Kind::Upstream(b)),
            ReplicaBody::H2(b) => Body(Kind::Upstream2(b)),
        }
    }

    /// Any other body (one that wraps another, like the access log's byte count).
    pub fn boxed<B>(body: B) -> Body
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body(Kind::Boxed(body.map_err(Into::into).boxed_unsync()))
    }
}

impl Body {
    /// The replica's head whose fields go to an HTTP/1 client as bytes, when this body
    /// carries one (`crate::wire::client::response`).
    pub fn take_head(&mut self) -> Option<Box<RawHead>> {
        match &mut self.0 {
            Kind::Upstream(body) => body.take_head(),
            _ => None,
        }
    }
}

/// `resp` with the replica's head its body carries (if any) moved into its extensions, where
/// the client's connection finds it too ([`take_head`]). For what wraps the body (the access
/// log's byte count), after which the head in it could not be reached.
pub fn lift_head(resp: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, mut body) = resp.into_parts();
    if let Some(head) = body.take_head() {
        parts.extensions.insert(head);
    }
    http::Response::from_parts(parts, body)
}

/// The replica's head to write as bytes for the response of `parts` and `body`: carried by the
/// body, or lifted out of it ([`lift_head`]).
pub fn take_head(parts: &mut http::response::Parts, body: &mut Body) -> Option<Box<RawHead>> {
    body.take_head()
        .or_else(|| parts.extensions.remove::<Box<RawHead>>())
}

impl Default for Body {
    /// No body: the response ends with its head (a gRPC trailers-only answer).
    fn default() -> Body {
        Body(Kind::Full(None))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Upstream2(body) => Pin::new(body).poll_frame(cx),
            Kind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Upstream2(body) => body.is_end_stream(),
            Kind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
            Kind::Upstream2(body) => body.size_hint(),
            Kind::Boxed(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    #[tokio::test]
    async fn a_full_body_is_one_frame_of_its_exact_size() {
        let body = Body::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.expect("in memory").to_bytes();
        assert_eq!(&bytes[..], b"hello");
        let empty = Body::full("");
        assert!(empty.is_end_stream(), "an empty body ends at once");
        assert_eq!(empty.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_boxed_body_passes_through() {
        let body = Body::boxed(Empty::<Bytes>::new());
        assert!(body.is_end_stream());
        assert!(body.collect().await.expect("empty").to_bytes().is_empty());
    }
}
