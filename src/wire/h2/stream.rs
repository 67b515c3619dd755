//! One HTTP/2 stream's bodies, the same on both legs: what arrives on a stream and what is sent
//! onto one, and a connection's PING keep-alive.
//!
//! Owns: [`Inbound`] (a body as it arrives: DATA frames, each given back to the stream's window
//! as it is taken, then trailers; the client's request body on the client's leg, the replica's
//! response body on the replica's), [`Pipe`] (a body sent onto a stream as the peer's window
//! allows, trailers included: a slow reader slows the body's source instead of the gateway
//! holding the difference), and [`KeepAlive`] (a PING every interval; one unanswered when the
//! next is due means the peer is gone), and [`Limits`] (the windows and limits a connection
//! is made with, one set for each leg, and [`with_limits!`] to set them on either side's
//! builder).
//! Must not touch: heads, routing, or what a connection does with its streams (the client's
//! leg is [`super::server`]'s, the replica's [`crate::upstream::h2`] and [`super`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::h2::{Reason, RecvStream, SendStream};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use crate::error::BoxError;

/// The windows and limits an HTTP/2 connection is made with: hyper's defaults for each side,
/// which the connections had when hyper drove them (windows larger than the protocol's
/// 64 KiB, so a large body is not held back a round trip at a time).
pub struct Limits {
    pub stream_window: u32,
    pub conn_window: u32,
    pub max_frame: u32,
    /// The largest head taken from the peer.
    pub max_header_list: u32,
    /// The most a stream buffers of a body beyond what the peer's window takes.
    pub max_send_buffer: usize,
    /// Streams reset for the peer's protocol errors before the connection is closed.
    pub max_local_error_resets: usize,
}

impl Limits {
    /// A connection to a replica (hyper's client defaults).
    pub const TO_REPLICAS: Limits = Limits {
        stream_window: 2 * 1024 * 1024,
        conn_window: 5 * 1024 * 1024,
        max_frame: 16 * 1024,
        max_header_list: 16 * 1024,
        max_send_buffer: 1024 * 1024,
        max_local_error_resets: 1024,
    };

    /// A client's connection (hyper's server defaults).
    pub const FROM_CLIENTS: Limits = Limits {
        stream_window: 1024 * 1024,
        conn_window: 1024 * 1024,
        max_frame: 16 * 1024,
        max_header_list: 16 * 1024,
        max_send_buffer: 400 * 1024,
        max_local_error_resets: 1024,
    };
}

/// Sets [`Limits`] on an `h2` client or server builder (two types with the same setters).
macro_rules! with_limits {
    ($builder:expr, $limits:expr) => {{
        let limits: &$crate::wire::h2::stream::Limits = &$limits;
        $builder
            .initial_window_size(limits.stream_window)
            .initial_connection_window_size(limits.conn_window)
            .max_frame_size(limits.max_frame)
            .max_header_list_size(limits.max_header_list)
            .max_send_buffer_size(limits.max_send_buffer)
            .max_local_error_reset_streams(Some(limits.max_local_error_resets))
    }};
}
pub(crate) use with_limits;

/// A body as it arrives on a stream: DATA frames (each given back to the stream's window as it
/// is taken), then trailers; with the length its head announced.
pub struct Inbound {
    recv: RecvStream,
    data_ended: bool,
    /// What is left of the announced `Content-Length`.
    remaining: Option<u64>,
    /// Dropped with the body: a body still piped the other way on the same stream stops
    /// ([`Pipe::stopped_by`]).
    _stop: Option<tokio::sync::oneshot::Sender<Infallible>>,
}

impl Inbound {
    /// The body on `recv` of a head that announced `length`.
    pub fn new(recv: RecvStream, length: Option<u64>) -> Inbound {
        Inbound {
            recv,
            data_ended: false,
            remaining: length,
            _stop: None,
        }
    }

    /// The `Content-Length` a head announces, if it is one number.
    pub fn announced(headers: &http::HeaderMap) -> Option<u64> {
        headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// Stops `pipe` (resets its stream) once this body is dropped.
    pub fn stops(&mut self, stop: tokio::sync::oneshot::Sender<Infallible>) {
        self._stop = Some(stop);
    }
}

/// A reset that ends a body rather than breaking it (as hyper read them): the peer had nothing
/// more to say.
fn ends_the_body(e: &::h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

impl HttpBody for Inbound {
    type Data = Bytes;
    type Error = ::h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ::h2::Error>>> {
        let this = self.get_mut();
        if !this.data_ended {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = this.remaining.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) if ends_the_body(&e) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_ended = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Why a [`Pipe`] ended before its body did.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("the body failed: {0}")]
    Body(#[source] BoxError),
    #[error("the stream failed: {0}")]
    Stream(#[source] ::h2::Error),
    #[error("the peer reset the stream ({0:?})")]
    Reset(Reason),
    #[error("the stream was stopped: its other half was dropped")]
    Stopped,
}

/// How a stream whose body failed with `e` is reset: as the stream `e` came from was (a
/// replica's reset reaches the client with its reason, as hyper passed it on), else
/// `INTERNAL_ERROR`.
fn reset_for(e: &BoxError) -> Reason {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(c) = cause {
        if let Some(reason) = c
            .downcast_ref::<::h2::Error>()
            .and_then(::h2::Error::reason)
        {
            return reason;
        }
        cause = c.source();
    }
    Reason::INTERNAL_ERROR
}

/// `body` sent onto `tx` as the peer's window allows: a frame is taken from the body, then
/// waits for room on the stream before the next is taken (no room is claimed before a frame
/// is in hand, so an idle body pins nothing of the connection's window: hyper#4003). It ends
/// with the body's end or trailers; a body that fails resets the stream ([`reset_for`]), and a
/// pipe [`Pipe::stopped_by`] its other half resets it with `CANCEL`.
pub struct Pipe<B> {
    body: B,
    tx: SendStream<Bytes>,
    /// A frame taken from the body that waits for room on the stream, and whether it ends it.
    held: Option<(Bytes, bool)>,
    stopped: Option<tokio::sync::oneshot::Receiver<Infallible>>,
}

impl<B> Pipe<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(body: B, tx: SendStream<Bytes>) -> Pipe<B> {
        Pipe {
            body,
            tx,
            held: None,
            stopped: None,
        }
    }

    /// The pipe stops (its stream reset, `CANCEL`) once `stop`'s sender is dropped.
    pub fn stopped_by(mut self, stop: tokio::sync::oneshot::Receiver<Infallible>) -> Pipe<B> {
        self.stopped = Some(stop);
        self
    }

    fn fail(&mut self, reason: Reason, e: PipeError) -> Poll<Result<(), PipeError>> {
        self.tx.send_reset(reason);
        Poll::Ready(Err(e))
    }

    /// Sends what the pipe can; `Ready` once the body is all sent or the pipe ended early.
    pub fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            if let Some(stopped) = self.stopped.as_mut() {
                if Pin::new(stopped).poll(cx).is_ready() {
                    return self.fail(Reason::CANCEL, PipeError::Stopped);
                }
            }
            match self.tx.poll_reset(cx) {
                Poll::Ready(Ok(reason)) => return Poll::Ready(Err(PipeError::Reset(reason))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Stream(e))),
                Poll::Pending => {}
            }
            if let Some((_, end)) = self.held {
                while self.tx.capacity() == 0 {
                    match ready!(self.tx.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Poll::Ready(Err(PipeError::Stream(e))),
                        None => return Poll::Ready(Err(PipeError::Reset(Reason::STREAM_CLOSED))),
                    }
                }
                let Some((data, _)) = self.held.take() else {
                    continue;
                };
                if let Err(e) = self.tx.send_data(data, end) {
                    return Poll::Ready(Err(PipeError::Stream(e)));
                }
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    let e = e.into();
                    return self.fail(reset_for(&e), PipeError::Body(e));
                }
                None => {
                    return Poll::Ready(
                        self.tx
                            .send_data(Bytes::new(), true)
                            .map_err(PipeError::Stream),
                    )
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if data.is_empty() {
                        // Needs no room: an explicit end goes straight out.
                        if let Err(e) = self.tx.send_data(data, end) {
                            return Poll::Ready(Err(PipeError::Stream(e)));
                        }
                        if end {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // A byte's claim: h2 raises it to what is buffered when the frame is sent.
                    self.tx.reserve_capacity(1);
                    self.held = Some((data, end));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.tx.reserve_capacity(0);
                        return Poll::Ready(
                            self.tx.send_trailers(trailers).map_err(PipeError::Stream),
                        );
                    }
                }
            }
        }
    }

    /// Puts on the stream what the body has ready now, up to `at_most` bytes, without waiting
    /// for the stream's window (it is held already, so holding it in the stream's queue instead
    /// costs nothing, and the peer gets it with the head). `Ready(Ok(true))`: all of it, its
    /// end told; `Ready(Ok(false))`: the rest is still to come ([`Pipe::poll_send`] sends it).
    pub fn send_ready(&mut self, cx: &mut Context<'_>, at_most: usize) -> Result<bool, PipeError> {
        let mut sent = 0;
        while sent < at_most {
            let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
                return Ok(false);
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                None => {
                    self.tx
                        .send_data(Bytes::new(), true)
                        .map_err(PipeError::Stream)?;
                    return Ok(true);
                }
                Some(Err(e)) => {
                    self.tx.send_reset(Reason::CANCEL);
                    return Err(PipeError::Body(e.into()));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    sent += data.len();
                    self.tx.send_data(data, end).map_err(PipeError::Stream)?;
                    if end {
                        return Ok(true);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.tx.send_trailers(trailers).map_err(PipeError::Stream)?;
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

impl<B> Future for Pipe<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_send(cx).map(|sent| {
            if let Err(e) = sent {
                tracing::debug!(error = %e, "an HTTP/2 body was not sent whole");
            }
        })
    }
}

/// PING keep-alive: one ping every interval; one still unanswered when the next is due means
/// the peer (or the path to it) is gone.
pub struct KeepAlive {
    every: Duration,
    tick: Pin<Box<tokio::time::Sleep>>,
    ping: Option<::h2::PingPong>,
    awaiting: bool,
}

impl KeepAlive {
    pub fn new(every: Duration) -> KeepAlive {
        KeepAlive {
            every,
            tick: Box::pin(tokio::time::sleep(every)),
            ping: None,
            awaiting: false,
        }
    }

    /// Gives the keep-alive its connection's pings (once: the connection hands them out once).
    pub fn watch(&mut self, ping: impl FnOnce() -> Option<::h2::PingPong>) {
        if self.ping.is_none() {
            self.ping = ping();
        }
    }

    /// `false` once a ping went unanswered for a whole interval.
    pub fn poll_alive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(ping) = self.ping.as_mut() else {
            return true;
        };
        if let Poll::Ready(Ok(_)) = ping.poll_pong(cx) {
            self.awaiting = false;
        }
        while self.tick.as_mut().poll(cx).is_ready() {
            if self.awaiting {
                return false;
            }
            // Fails only when the connection is gone, which its own poll reports.
            self.awaiting = ping.send_ping(::h2::Ping::opaque()).is_ok();
            let next = Instant::now() + self.every;
            self.tick.as_mut().reset(next);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_body_resets_its_stream_as_the_stream_it_came_from_was() {
        let from_replica: BoxError = Box::new(::h2::Error::from(Reason::CANCEL));
        assert_eq!(reset_for(&from_replica), Reason::CANCEL);
        #[derive(Debug, thiserror::Error)]
        #[error("the replica's body broke")]
        struct Broke(#[source] ::h2::Error);
        let wrapped: BoxError = Box::new(Broke(Reason::REFUSED_STREAM.into()));
        assert_eq!(reset_for(&wrapped), Reason::REFUSED_STREAM);
        let ours: BoxError = "the replica stopped sending".into();
        assert_eq!(reset_for(&ours), Reason::INTERNAL_ERROR);
    }
}
