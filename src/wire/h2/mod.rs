//! HTTP/2 on the wire, on the `h2` crate directly. Here, the replica's side: one request as a
//! stream on a multiplexed connection.
//!
//! Owns: [`request`] (the client's request as the gateway forwards it over HTTP/2: the same
//! fields cut and `X-Forwarded-*` set as on HTTP/1.1, `te: trailers` kept, the target as
//! `:scheme`/`:authority`/`:path`), [`exchange`] (the stream sent and its response head awaited
//! by the request's deadline, each failure told apart: a stream the replica did not process, a
//! GOAWAY's or a `REFUSED_STREAM`, is [`SendError::Unprocessed`], safe to send again), the
//! request body (what its client sent already goes with the head; the rest is piped on as the
//! replica's window allows, in the connection's task), [`H2Body`] (the response body as the
//! gateway forwards it, trailers included, counting the request in flight at its
//! replica and the stream on its connection until it ends, cut after `proxy.read_timeout`
//! without a frame and ended with `DEADLINE_EXCEEDED` trailers past a gRPC call's deadline),
//! and [`grpc_check`] (a `grpc.health.v1` check sent the same way). The client's side is
//! [`server`]; what both sides do with a stream's bodies (received, piped) is [`stream`]'s. The
//! protocol itself (frames, HPACK, flow control) is the `h2` crate's, driven here directly: no
//! task, channel or future of a library's between a request and its stream.
//! Must not touch: which connection (the connector in [`crate::upstream`] gives one), routing,
//! retries, or what a failure means for a replica (the proxy decides).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Response, Uri, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{timeout_at, Instant};

use crate::admission::RequestPlace;
use crate::error::BoxError;
use crate::snapshot::InFlight;
use crate::stall::{Stall, StallTimer};
use crate::upstream::h2::{Opener, SendBody, StreamGuard};
use crate::wire::client::body::BodyError;
use crate::wire::client::head::write_ip;
use crate::wire::client::{Forwarded, SendError};
use crate::wire::headers::{is_client_only, is_hop_by_hop, is_protected};

pub mod grpc_check;
pub mod server;
pub mod stream;

pub use stream::Inbound;
use stream::{Pipe, PipeError};

/// The request `f` as an HTTP/2 request to the replica at `replica` (its address is the
/// authority when the client named none), over `scheme` (`http` for h2c), with `body`.
pub fn request(
    f: &Forwarded<'_>,
    scheme: Scheme,
    replica: SocketAddr,
    body: SendBody,
) -> Result<http::Request<SendBody>, http::Error> {
    let parts = f.parts;
    // The client's Host field as it came (shared, not copied), else its target's authority: an
    // HTTP/2 client's `:authority`, parsed already, is shared as it is (only its copy as
    // `X-Forwarded-Host` is made).
    let (host, authority) = match parts.headers.get(header::HOST) {
        Some(h) if h.to_str().is_ok() => (Some(h.clone()), Authority::try_from(h.as_bytes()).ok()),
        _ => match parts.uri.authority() {
            Some(a) => (HeaderValue::from_str(a.as_str()).ok(), Some(a.clone())),
            None => (None, None),
        },
    };
    // The client's host if it is an authority, else the replica.
    let authority = match authority {
        Some(a) => a,
        None => Authority::try_from(replica.to_string())?,
    };
    // The client's target as hyper parsed it, shared: parsing it again from its text copied it.
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut target = http::uri::Parts::default();
    target.scheme = Some(scheme);
    target.authority = Some(authority);
    target.path_and_query = Some(path);
    let uri = Uri::from_parts(target).map_err(http::Error::from)?;
    let mut req = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(Version::HTTP_2)
        .body(body)?;
    *req.headers_mut() = forwarded_fields(f, host)?;
    Ok(req)
}

/// What an `X-Forwarded-For` value is made in first.
const XFF_ROOM: usize = 64;

/// The client's fields as they are forwarded: hop-by-hop ones (and those `Connection` names)
/// cut, `te: trailers` kept (gRPC servers require it), `Content-Length` kept (the body goes on
/// as the client sent it, and the client's framing was checked: an HTTP/1.1 request with both
/// it and `Transfer-Encoding` is refused, an HTTP/2 one whose DATA does not add up to it is
/// reset), and `X-Forwarded-For`/`-Host`/`-Proto` set.
fn forwarded_fields(
    f: &Forwarded<'_>,
    host: Option<HeaderValue>,
) -> Result<HeaderMap, http::Error> {
    let headers = &f.parts.headers;
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len() + 4);
    // Room for the client's address (an IPv6 one is at most 45 bytes) after a list it may have
    // brought: grown from empty a byte or a number at a time, it was reallocated three times
    // for `127.0.0.1`.
    let mut xff = BytesMut::with_capacity(XFF_ROOM);
    let mut trailers = false;
    for (name, value) in headers {
        if *name == header::TE {
            trailers |= value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
            continue;
        }
        if *name == header::HOST
            || is_hop_by_hop(name)
            || is_client_only(name)
            || matches!(name.as_str(), "x-forwarded-proto" | "x-forwarded-host")
            || (!is_protected(name) && named.iter().any(|n| n == name.as_str()))
        {
            continue;
        }
        if name.as_str() == "x-forwarded-for" {
            if let Ok(v) = value.to_str() {
                let v = v.trim();
                if !v.is_empty() {
                    if !xff.is_empty() {
                        xff.put_slice(b", ");
                    }
                    xff.put_slice(v.as_bytes());
                }
            }
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if trailers {
        out.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(h) = host {
        out.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    if !xff.is_empty() {
        xff.put_slice(b", ");
    }
    // Written by hand, like HTTP/1.1's: no formatting machinery, no string for it.
    write_ip(&mut xff, f.client);
    out.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_maybe_shared(xff.freeze())?,
    );
    out.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(f.proto),
    );
    Ok(out)
}

/// Sends `req` on a stream `opener` opens and waits for the response head by `deadline`; a
/// deadline that passes before the client's body was all taken is the client's
/// ([`SendError::RequestBodyTimeout`]).
pub async fn exchange(
    opener: Opener,
    req: http::Request<SendBody>,
    deadline: Instant,
) -> Result<Response<Inbound>, SendError> {
    let progress = req.body().progress();
    match timeout_at(deadline, open(opener, req)).await {
        // Still waiting for the client's body: its time ran out, not the replica's.
        Err(_) if !progress.ended() => Err(SendError::RequestBodyTimeout),
        Err(_) => Err(SendError::Timeout),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(failed)) => match progress.take_failure() {
            // The client's body failed (past `proxy.max_body`, broken): its error, not the
            // stream's reset that followed.
            Some(cause) => Err(SendError::RequestBody(cause)),
            None => Err(failed),
        },
    }
}

/// How much of a request body is put on its stream at once, before the stream is open and
/// without waiting for the replica's window, when its client sent it already: a gRPC call's
/// message goes with its head. The rest waits for the window, piped on in the connection's
/// task ([`Pipe`]).
const SENT_AT_ONCE: usize = 64 * 1024;

/// Opens the stream, sends the request on it and waits for the response head.
async fn open(
    mut opener: Opener,
    req: http::Request<SendBody>,
) -> Result<Response<Inbound>, SendError> {
    let (head, body) = req.into_parts();
    // Errors before the stream was made: nothing of the request reached the replica.
    std::future::poll_fn(|cx| opener.send.poll_ready(cx))
        .await
        .map_err(SendError::Unprocessed)?;
    let end = body.is_end_stream();
    let (response, tx) = opener
        .send
        .send_request(http::Request::from_parts(head, ()), end)
        .map_err(SendError::Unprocessed)?;
    // What the client sent already goes now; a body still arriving is piped on beside the
    // connection, told to stop (its stream reset) if the response is dropped first.
    let mut stop = None;
    if !end {
        let mut pipe = Pipe::new(body, tx);
        let sent = std::future::poll_fn(|cx| Poll::Ready(pipe.send_ready(cx, SENT_AT_ONCE))).await;
        match sent {
            Ok(true) => {}
            Ok(false) => {
                let (stopper, stopped) = tokio::sync::oneshot::channel();
                stop = Some(stopper);
                opener.beside(pipe.stopped_by(stopped));
            }
            // The body's own error is kept in its progress, for the caller.
            Err(PipeError::Stream(e)) => return Err(stream_error(e)),
            Err(_) => return Err(SendError::Stream(::h2::Reason::CANCEL.into())),
        }
    }
    let resp = response.await.map_err(stream_error)?;
    let length = Inbound::announced(resp.headers());
    Ok(resp.map(|recv| {
        let mut body = Inbound::new(recv, length);
        if let Some(stop) = stop {
            body.stops(stop);
        }
        body
    }))
}

/// A stream's failure: one the replica did not process is [`SendError::Unprocessed`].
fn stream_error(e: ::h2::Error) -> SendError {
    match is_unprocessed(&e) {
        true => SendError::Unprocessed(e),
        false => SendError::Stream(e),
    }
}

/// The replica did not process the request: it refused the stream (`REFUSED_STREAM`), or its
/// GOAWAY said the stream was past the last one it processes (RFC 9113 sections 6.8 and 8.7).
/// (A request whose stream could not be made at all, its connection closed or closing, is
/// unprocessed too: [`exchange`] tells that apart before the stream.)
pub fn is_unprocessed(e: &::h2::Error) -> bool {
    e.reason() == Some(::h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// A replica's HTTP/2 response body, trailers included.
pub struct H2Body {
    inner: Inbound,
    _stream: StreamGuard,
    /// `proxy.read_timeout`: the longest the replica may send nothing in the middle of it.
    stall: StallTimer,
    in_flight: InFlight,
    /// The request's place in the gateway's request budgets, given back with the body.
    place: Option<RequestPlace>,
    done: bool,
    /// A gRPC call's deadline (`grpc-timeout`, kept for the message): past it the call ends
    /// with `DEADLINE_EXCEEDED` in trailers and the stream to the replica is reset.
    call_deadline: Option<(Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
}

impl H2Body {
    pub fn new(
        inner: Inbound,
        stream: StreamGuard,
        read_timeout: std::time::Duration,
        in_flight: InFlight,
    ) -> H2Body {
        H2Body {
            done: inner.is_end_stream(),
            inner,
            _stream: stream,
            stall: StallTimer::new(read_timeout),
            in_flight,
            place: None,
            call_deadline: None,
        }
    }

    /// Ends the call by `deadline` (a gRPC call's `grpc-timeout` of `timeout`): a response
    /// still streaming then ends with trailers `grpc-status: 4` (`DEADLINE_EXCEEDED`).
    pub fn end_by(&mut self, deadline: Instant, timeout: std::time::Duration) {
        self.call_deadline = Some((Box::pin(tokio::time::sleep_until(deadline)), timeout));
    }

    /// Keeps the request counted in the gateway's budgets until this body is done with.
    pub fn hold(&mut self, place: RequestPlace) {
        self.place = Some(place);
    }
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            if let Some((deadline, timeout)) = this.call_deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    this.done = true;
                    let limit = crate::grpc::TimeLimit::GrpcTimeout(*timeout);
                    let message = format!("{limit} passed at the gateway");
                    let fields =
                        crate::grpc::status_fields(crate::grpc::Code::DeadlineExceeded, &message);
                    return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                }
            }
        }
        if let Stall::Over { first } = this.stall.check(cx, polled.is_ready()) {
            if first {
                let stats = this.in_flight.stats();
                stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            this.done = true;
            let e = BodyError::Stalled(this.stall.limit());
            tracing::debug!(error = %e, "cut a response short");
            return Poll::Ready(Some(Err(Box::new(e))));
        }
        match ready!(polled) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(e)) => {
                this.done = true;
                tracing::debug!(error = %e, "the replica's HTTP/2 response broke");
                Poll::Ready(Some(Err(Box::new(e))))
            }
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::client::head::RequestFraming;

    fn forwarded(parts: &http::request::Parts) -> Forwarded<'_> {
        Forwarded {
            parts,
            client: "10.0.0.7:4000".parse().expect("addr"),
            proto: "http",
            framing: RequestFraming::None,
            upgrade: None,
        }
    }

    #[test]
    fn the_forwarded_request_keeps_the_message_and_trailers_and_drops_the_hop() {
        let parts = http::Request::post("/demo.Demo/Who?x=1")
            .header("host", "api.test")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "5")
            .header("content-length", "12")
            .header("x-forwarded-for", "1.1.1.1")
            .header("forwarded", "for=evil")
            .header("x-user", "bob")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let replica = "127.0.0.1:9".parse().expect("addr");
        let req =
            request(&forwarded(&parts), Scheme::HTTP, replica, SendBody::empty()).expect("valid");
        assert_eq!(req.uri().to_string(), "http://api.test/demo.Demo/Who?x=1");
        assert_eq!(req.version(), Version::HTTP_2);
        let h = req.headers();
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["x-user"], "bob");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.0.0.7");
        assert_eq!(h["x-forwarded-host"], "api.test");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["content-length"], "12", "the client's length goes on");
        for gone in ["host", "connection", "keep-alive", "x-hop", "forwarded"] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
    }

    #[test]
    fn an_http2_clients_authority_is_the_targets_and_the_forwarded_host() {
        let parts = http::Request::get("https://api.test:8443/home?id=7")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let replica = "127.0.0.1:9".parse().expect("addr");
        let req =
            request(&forwarded(&parts), Scheme::HTTP, replica, SendBody::empty()).expect("valid");
        assert_eq!(req.uri().to_string(), "http://api.test:8443/home?id=7");
        assert_eq!(req.headers()["x-forwarded-host"], "api.test:8443");
        assert_eq!(req.headers()["x-forwarded-for"], "10.0.0.7");
    }

    #[test]
    fn a_request_without_a_usable_host_names_the_replica() {
        let parts = http::Request::get("/home")
            .header("te", "gzip")
            .header("host", "bad host")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let replica = "127.0.0.1:9".parse().expect("addr");
        let req =
            request(&forwarded(&parts), Scheme::HTTP, replica, SendBody::empty()).expect("valid");
        assert_eq!(req.uri().to_string(), "http://127.0.0.1:9/home");
        assert!(
            !req.headers().contains_key("te"),
            "only te: trailers goes on"
        );
    }
}
