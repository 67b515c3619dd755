//! The client's side of HTTP/2: a client's connection served on the `h2` crate directly, each
//! of its streams answered in the connection's own task.
//!
//! Owns: [`Connection`] (the handshake with the gateway's settings, the streams accepted and
//! handed to the handler as requests whose bodies are [`Inbound`], PING keep-alive, a graceful
//! close on [`Connection::graceful_shutdown`]) and each stream's answer: the handler's future
//! raced against the client's `RST_STREAM` (a reset stream's future is dropped), its response
//! head sent (connection-specific fields cut, `Date` added when missing, the length of a body
//! that knows it), its body piped as the client's window allows ([`Pipe`]), or the stream
//! refused ([`Answer::Refuse`]). A stream still running when its connection ends is dropped
//! with it: nobody is left to answer.
//! Must not touch: what a request means or whether it is admitted (the handler's), or the
//! watches over the connection (idle, stalled: [`crate::http2`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::h2::server::{Handshake, SendResponse};
use ::h2::Reason;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncWrite};

use super::stream::{with_limits, Inbound, KeepAlive, Limits, Pipe};
use crate::error::BoxError;
use crate::wire::server::response::date_value;

/// How a connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (`proxy.http2_max_streams`).
    pub max_streams: u32,
    /// A PING this often; unanswered when the next is due, the connection is closed
    /// (`proxy.http2_keepalive`).
    pub keepalive: Duration,
}

/// What the handler makes of a request.
pub enum Answer<B> {
    Respond(Response<B>),
    /// Not processed at all: the stream is refused (`REFUSED_STREAM`), so the client may send
    /// it again at once.
    Refuse,
}

/// Why a connection ended other than by its close.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP/2: {0}")]
    H2(#[from] ::h2::Error),
    #[error("the client answered no keep-alive ping for proxy.http2_keepalive")]
    KeepAliveTimedOut,
}

// A connection spends its life serving: the connection inline (not boxed) is one allocation
// less a connection and no pointer to follow at every poll; the short handshake is boxed.
#[allow(clippy::large_enum_variant)]
enum State<T> {
    Handshaking(Pin<Box<Handshake<T, Bytes>>>),
    Serving(::h2::server::Connection<T, Bytes>),
    Closed,
}

/// A client's HTTP/2 connection: each request it opens is handed to `handler`, whose future
/// runs in this connection's task until its stream is answered.
pub struct Connection<T, F, Fut, B> {
    state: State<T>,
    handler: F,
    streams: FuturesUnordered<Respond<Fut, B>>,
    keepalive: KeepAlive,
}

impl<T, F, Fut, B> Connection<T, F, Fut, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Serves HTTP/2 on `io` (its preface not yet read) with `settings`.
    pub fn new(io: T, settings: Settings, handler: F) -> Self {
        let mut builder = ::h2::server::Builder::new();
        with_limits!(builder, Limits::FROM_CLIENTS).max_concurrent_streams(settings.max_streams);
        Connection {
            state: State::Handshaking(Box::pin(builder.handshake(io))),
            handler,
            streams: FuturesUnordered::new(),
            keepalive: KeepAlive::new(settings.keepalive),
        }
    }

    /// Starts a graceful close: a GOAWAY, then the streams open finish and the connection
    /// ends. A connection still in its handshake just ends.
    pub fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Serving(conn) => conn.graceful_shutdown(),
            _ => self.state = State::Closed,
        }
    }
}

impl<T, F, Fut, B> Future for Connection<T, F, Fut, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<Inbound>) -> Fut + Unpin,
    Fut: Future<Output = Answer<B>> + Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), ServeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let conn = match &mut this.state {
                State::Handshaking(handshake) => {
                    let conn = ready!(handshake.as_mut().poll(cx))?;
                    this.state = State::Serving(conn);
                    continue;
                }
                State::Serving(conn) => conn,
                State::Closed => return Poll::Ready(Ok(())),
            };
            this.keepalive.watch(|| conn.ping_pong());
            if !this.keepalive.poll_alive(cx) {
                this.state = State::Closed;
                return Poll::Ready(Err(ServeError::KeepAliveTimedOut));
            }
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, reply)))) => {
                        let (head, recv) = req.into_parts();
                        let length = Inbound::announced(&head.headers);
                        let req = Request::from_parts(head, Inbound::new(recv, length));
                        this.streams.push(Respond::Answering {
                            answer: (this.handler)(req),
                            reply,
                        });
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.state = State::Closed;
                        return Poll::Ready(Err(e.into()));
                    }
                    // Closed (the streams' work is done: the connection waits for them).
                    Poll::Ready(None) => {
                        this.state = State::Closed;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            return Poll::Pending;
        }
    }
}

/// One stream's answer: the handler's future, then the response's body piped to the client.
enum Respond<Fut, B> {
    Answering {
        answer: Fut,
        reply: SendResponse<Bytes>,
    },
    Piping(Pipe<B>),
    Done,
}

impl<Fut, B> Future for Respond<Fut, B>
where
    Fut: Future<Output = Answer<B>> + Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Respond::Answering { answer, reply } => {
                    let Poll::Ready(answer) = Pin::new(answer).poll(cx) else {
                        // The client may reset the stream meanwhile: its request is dropped.
                        if let Poll::Ready(reset) = reply.poll_reset(cx) {
                            tracing::debug!(
                                ?reset,
                                "the client reset its stream before the answer"
                            );
                            *this = Respond::Done;
                            return Poll::Ready(());
                        }
                        return Poll::Pending;
                    };
                    let response = match answer {
                        Answer::Respond(response) => response,
                        Answer::Refuse => {
                            reply.send_reset(Reason::REFUSED_STREAM);
                            *this = Respond::Done;
                            return Poll::Ready(());
                        }
                    };
                    let (mut head, body) = response.into_parts();
                    let end = body.is_end_stream();
                    complete_head(&mut head.headers, &body, end);
                    match reply.send_response(Response::from_parts(head, ()), end) {
                        Ok(tx) if !end => *this = Respond::Piping(Pipe::new(body, tx)),
                        Ok(_) => {
                            *this = Respond::Done;
                            return Poll::Ready(());
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "an HTTP/2 response head could not be sent");
                            reply.send_reset(Reason::INTERNAL_ERROR);
                            *this = Respond::Done;
                            return Poll::Ready(());
                        }
                    }
                }
                Respond::Piping(pipe) => {
                    ready!(Pin::new(pipe).poll(cx));
                    *this = Respond::Done;
                    return Poll::Ready(());
                }
                Respond::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Whether `name` is a field HTTP/2 forbids (RFC 9113 section 8.2.2; `h2` refuses a head with
/// one): `TE` is, unless it is `trailers` (`value`).
fn connection_specific(name: &header::HeaderName, value: &HeaderValue) -> bool {
    match name.as_str() {
        "connection" | "transfer-encoding" | "keep-alive" | "proxy-connection" | "upgrade" => true,
        "te" => value != "trailers",
        _ => false,
    }
}

/// A response head as HTTP/2 sends it: connection-specific fields cut, `Date` added when
/// missing, and the length of a body that knows it. One pass over the fields (the proxy's
/// heads have none to cut): a look-up by name for each forbidden field cost about 1,000
/// instructions a response.
fn complete_head<B: HttpBody>(headers: &mut HeaderMap, body: &B, end: bool) {
    let (mut forbidden, mut dated, mut sized) = (false, false, false);
    for (name, value) in headers.iter() {
        if *name == header::DATE {
            dated = true;
        } else if *name == header::CONTENT_LENGTH {
            sized = true;
        } else {
            forbidden |= connection_specific(name, value);
        }
    }
    if forbidden {
        let cut: Vec<header::HeaderName> = headers
            .iter()
            .filter(|(name, value)| connection_specific(name, value))
            .map(|(name, _)| name.clone())
            .collect();
        for name in cut {
            headers.remove(name);
        }
    }
    if !dated {
        headers.insert(header::DATE, date_value());
    }
    if !end && !sized {
        if let Some(len) = body.size_hint().exact() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn a_response_head_loses_what_http2_forbids_and_gains_a_date_and_its_length() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "5"),
            ("proxy-connection", "x"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ] {
            h.insert(
                http::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let body = Full::new(Bytes::from_static(b"hello"));
        complete_head(&mut h, &body, false);
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "date", "x-kept"]);
        assert_eq!(h["content-length"], "5");
        let mut kept = HeaderMap::new();
        kept.insert(header::TE, HeaderValue::from_static("trailers"));
        kept.insert(header::DATE, HeaderValue::from_static("then"));
        complete_head(&mut kept, &body, true);
        assert_eq!(kept["te"], "trailers");
        assert_eq!(kept["date"], "then", "a date the response has is its own");
        assert!(
            !kept.contains_key("content-length"),
            "an ended body frames nothing"
        );
    }
}
