//! A replica's response body, read straight from its connection by the task that writes it to
//! the client: no channel, no second task, no copy (bytes read are handed on as they are).
//!
//! Owns: reading the body (its framing is decoded by [`crate::wire::framing`]), counting the
//! request in flight at its replica until the body ends, cutting a body the replica stops
//! sending for `proxy.read_timeout` or frames wrongly (counted as the replica's failure), and
//! giving the connection back to the pool when the body was read whole and the connection may
//! be reused; and, for a client of HTTP/1, the replica's head whose fields go to it as bytes
//! ([`UpstreamBody::take_head`]: the body is what reaches the client's connection unwrapped,
//! where an extension of the response would cost an allocation or three).
//! Must not touch: reading or writing heads, or routing.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::admission::RequestPlace;
use crate::error::BoxError;
use crate::snapshot::InFlight;
use crate::stall::{Stall, StallTimer};
use crate::upstream::pool::{self, Conn};
use crate::wire::client::head::RawHead;
use crate::wire::framing::{BodyFraming, ChunkError, DecodeError, Decoder, ReadError, Source};

/// A body not read to its end (the client went away) drops its connection with it: only
/// [`UpstreamBody::finish`] gives one back to the pool.
pub struct UpstreamBody {
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    /// `proxy.read_timeout`: the longest the replica may send nothing in the middle of it.
    stall: StallTimer,
    in_flight: InFlight,
    /// The request's place in the gateway's request budgets, given back with the body.
    place: Option<RequestPlace>,
    /// The response's head, its fields as the replica sent them, for the client's HTTP/1
    /// connection to write (`None` once taken, and for a client that got a `HeaderMap`).
    head: Option<Box<RawHead>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the replica closed the connection in the middle of the response body")]
    Truncated,
    #[error("the replica sent a malformed chunked body: {0}")]
    BadChunk(#[source] ChunkError),
    #[error("reading the response body from the replica failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the replica sent no byte of the response body for {0:?} (proxy.read_timeout)")]
    Stalled(std::time::Duration),
}

impl From<ReadError> for BodyError {
    fn from(e: ReadError) -> BodyError {
        match e {
            ReadError::Framing(DecodeError::Truncated) => BodyError::Truncated,
            ReadError::Framing(DecodeError::BadChunk(e)) => BodyError::BadChunk(e),
            ReadError::Io(e) => BodyError::Io(e),
        }
    }
}

/// Largest read from a replica at a time.
const READ_CHUNK: usize = 16 * 1024;

impl UpstreamBody {
    pub fn new(
        conn: Conn,
        framing: BodyFraming,
        keep_alive: bool,
        read_timeout: std::time::Duration,
        in_flight: InFlight,
    ) -> Self {
        let mut body = UpstreamBody {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            keep_alive,
            stall: StallTimer::new(read_timeout),
            in_flight,
            place: None,
            head: None,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// Carries `head` (the response's fields as bytes) to the client's connection.
    pub fn keep_head(&mut self, head: Box<RawHead>) {
        self.head = Some(head);
    }

    /// The response's head as bytes, when the body carries it: what an HTTP/1 client is
    /// written before the response's `HeaderMap` (`crate::wire::server::response`).
    pub fn take_head(&mut self) -> Option<Box<RawHead>> {
        self.head.take()
    }

    /// Keeps the request counted in the gateway's budgets until this body is done with.
    pub fn hold(&mut self, place: RequestPlace) {
        self.place = Some(place);
    }

    /// The body of a `101`: none; the connection, which now speaks the protocol switched to, is
    /// kept for [`UpstreamBody::into_switched`].
    pub fn switched(conn: Conn, in_flight: InFlight) -> Self {
        UpstreamBody {
            conn: Some(conn),
            decoder: Decoder::new(BodyFraming::Empty),
            keep_alive: false,
            stall: StallTimer::new(std::time::Duration::MAX),
            in_flight,
            place: None,
            head: None,
        }
    }

    /// The connection of a `101` (with the bytes the replica already sent past its head), and
    /// the request's counts at its replica and in the budgets, which the switched connection
    /// carries on; `None` for any other response.
    pub fn into_switched(self) -> Option<(Conn, InFlight, Option<RequestPlace>)> {
        if !self.decoder.is_done() || self.keep_alive {
            return None;
        }
        Some((self.conn?, self.in_flight, self.place))
    }

    /// The body ended: the connection goes back to the pool if it can carry another request.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                pool::put_back(conn);
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let piece = ready!(self.decoder.poll_piece(conn, cx))?;
        if piece.is_none() || self.decoder.is_done() {
            // A body read until close ends with its connection: it was never to be reused.
            self.finish();
        }
        Poll::Ready(piece.map(Ok))
    }
}

impl Source for Conn {
    fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.poll_fill(cx, READ_CHUNK)
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        if let Stall::Over { first } = this.stall.check(cx, polled.is_ready()) {
            if first {
                this.in_flight
                    .stats()
                    .body_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
            let e = BodyError::Stalled(this.stall.limit());
            tracing::debug!(error = %e, "cut a response short");
            (this.keep_alive, this.conn) = (false, None);
            return Poll::Ready(Some(Err(Box::new(e))));
        }
        match ready!(polled) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(e)) => {
                // A body the replica framed wrongly is its failure (the head was fine, so
                // nothing counted it yet); the client's response is cut.
                if matches!(e, BodyError::BadChunk(_)) {
                    let stats = this.in_flight.stats();
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "cut a response short");
                }
                this.keep_alive = false;
                this.conn = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            // The replica's trailer fields, if it sent any, end the body.
            None => Poll::Ready(this.decoder.take_trailers().map(|t| Ok(Frame::trailers(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        (self.conn.is_none() || self.decoder.is_done()) && !self.decoder.has_trailers()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.exact_remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
