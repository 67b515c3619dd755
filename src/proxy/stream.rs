//! A gRPC call's response, registered with its key like a tunnel, so that re-homing can end
//! exactly the calls whose key moved: with trailers `grpc-status: 14` (`UNAVAILABLE`), which
//! gRPC clients retry, put in between two messages, never inside one. Other calls on the same
//! client connection are untouched.
//!
//! Owns: [`Rehomable`] (the response body that listens for its close) and [`Grpc`], the
//! message-prefix format [`Messages`] follows the stream by (the tracker is the tunnels'
//! [`crate::tunnel::frames::Boundaries`]: prefixes only, payloads skipped by length). Dropping the replica's body resets its stream (`RST_STREAM`).
//! Must not touch: which calls move ([`crate::tunnel::rehome`] decides, as for tunnels).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::upgrade::At;
use crate::error::BoxError;
use crate::grpc::{status_fields, Code};
use crate::tunnel::frames::{Boundaries, Format};
use crate::tunnel::{Close, Kind, Registration, Tunnels};
use crate::wire::body::Body;

/// Where a stream of gRPC messages is: in a prefix, in a message, or between two.
pub type Messages = Boundaries<Grpc>;

/// gRPC's message prefix: a 1-byte flag, then the message's length (4 bytes, big-endian).
#[derive(Debug, Clone, Copy, Default)]
pub struct Grpc;

impl Format for Grpc {
    fn header_len(&self, _seen: &[u8]) -> Option<usize> {
        Some(5)
    }

    fn header_done(&mut self, prefix: &[u8]) -> u64 {
        u64::from(u32::from_be_bytes([
            prefix[1], prefix[2], prefix[3], prefix[4],
        ]))
    }
}

/// `resp`, a gRPC call's response from the replica `at` names, registered for re-homing: a
/// call may stream for long.
pub fn registered(resp: Response<Body>, at: &At<'_>, tunnels: &Arc<Tunnels>) -> Response<Body> {
    let registration = tunnels.register(at.placed(), Kind::Stream);
    resp.map(|body| Body::boxed(Rehomable::new(body, registration)))
}

/// A gRPC call's response body, ended with `UNAVAILABLE` at the next message boundary when its
/// close comes.
pub struct Rehomable {
    inner: Body,
    /// Where it hears its close; once the close came, the body ends at the next boundary.
    close: Registration,
    messages: Messages,
    done: bool,
}

impl Rehomable {
    pub fn new(inner: Body, close: Registration) -> Self {
        Rehomable {
            inner,
            close,
            messages: Messages::default(),
            done: false,
        }
    }

    /// The trailers that end a re-homed call, and the replica's stream reset.
    fn end(&mut self, why: Close) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.inner = Body::full(Bytes::new());
        let message = match why {
            Close::Rehome(crate::tunnel::rehome::Reason::KeyMoved) => {
                "ringgate: the key moved to another replica; retry"
            }
            Close::Rehome(crate::tunnel::rehome::Reason::ReplicaGone) => {
                "ringgate: the replica left the ring; retry"
            }
            Close::Shutdown => "ringgate: the gateway is shutting down; retry",
        };
        Poll::Ready(Some(Ok(Frame::trailers(status_fields(
            Code::Unavailable,
            message,
        )))))
    }
}

impl HttpBody for Rehomable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(why) = this.close.poll_closed(cx) {
            if this.messages.at_boundary() {
                return this.end(why);
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let frame = match polled {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.done = matches!(polled, Poll::Ready(None));
                return polled;
            }
            Poll::Pending => return Poll::Pending,
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let stop = this.close.closed().is_some();
                let keep = this.messages.advance(&data, stop);
                if keep < data.len() {
                    // Closing: what lies past the boundary is never sent.
                    data.truncate(keep);
                }
                Frame::data(data)
            }
            // The replica's own trailers: the call ended on its own.
            Err(trailers) => {
                this.done = true;
                trailers
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        // A trailers-only answer (a status in the head) ends with its head, as it came.
        self.done || (self.close.closed().is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match self.close.closed() {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn boundaries_are_found_whatever_the_pieces() {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for len in [0usize, 3, 300, 70_000] {
            stream.extend(message(len));
            ends.push(stream.len());
        }
        for piece in [1, 2, 5, 7, 999, stream.len()] {
            let mut m = Messages::default();
            let mut found = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let end = (at + piece).min(stream.len());
                let mut chunk = &stream[at..end];
                while !chunk.is_empty() {
                    let n = m.advance(chunk, true);
                    at += n;
                    chunk = &chunk[n..];
                    if m.at_boundary() {
                        found.push(at);
                    }
                }
            }
            assert_eq!(found, ends, "pieces of {piece}");
        }
    }
}
