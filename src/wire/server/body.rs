//! A client's request body, read from the client's connection by whoever forwards it (the
//! proxy's attempt, the admin API): no channel and no task between the socket and the reader.
//!
//! Owns: [`Http1Body`] and the hand-back of the connection's read side ([`Reader`]) to the
//! connection once the body is read to its end or dropped, with whether it was read whole (only
//! then can the connection carry another request). For `Expect: 100-continue` it asks the
//! connection, the first time it is polled, to send `100 Continue`.
//! Must not touch: what the body carries; the framing rules are [`super::framing`]'s.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf, ReadHalf};
use tokio::sync::oneshot;

use super::io::Transport;
use crate::error::BoxError;
use crate::wire::framing::{BodyFraming, Decoder, ReadError, Source};

/// Largest read of a request body at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Largest read of a request head at a time (into the stack): a typical head in one read.
const HEAD_LANDING: usize = 4 * 1024;

/// The read side of a client connection and what was read from it and not used yet.
pub struct Reader {
    pub io: ReadHalf<Transport>,
    pub buf: BytesMut,
}

impl Reader {
    /// Reads more into the buffer (with at least `room` bytes of space); `Ok(0)` at end of
    /// stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < room {
            self.buf.reserve(room);
        }
        // `read_buf` keeps no state between polls: a fresh one per poll is the same read.
        std::pin::pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    /// Reads the next bytes of a request head: into the stack, then only what came is kept in
    /// the buffer. An idle connection so holds no buffer while it waits (an empty one has no
    /// allocation), and one that sent part of a head holds that part.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut landing = [MaybeUninit::<u8>::uninit(); HEAD_LANDING];
        let mut read = ReadBuf::uninit(&mut landing);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        self.buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }

    /// Watches the connection while a request is served: `Ok(0)` when the client closed it, and
    /// what it sends meanwhile (its next request) kept in the buffer. Read into the stack, so
    /// that watching makes no room in the buffer: the buffer is still shared with the head of
    /// the request in progress, and room made now would be a new allocation every request.
    pub fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut landing = [0u8; 1024];
        let mut read = ReadBuf::new(&mut landing);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        self.buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }
}

/// What a body hands back to its connection.
pub struct Returned {
    pub reader: Reader,
    /// The body was read to its end: the next request can follow on the connection.
    pub complete: bool,
}

pub struct Http1Body {
    reader: Option<Reader>,
    decoder: Decoder,
    back: Option<oneshot::Sender<Returned>>,
    /// Tells the connection to send `100 Continue`, the first time the body is polled.
    continue_: Option<oneshot::Sender<()>>,
}

impl Http1Body {
    pub fn new(
        reader: Reader,
        framing: BodyFraming,
        back: oneshot::Sender<Returned>,
        continue_: Option<oneshot::Sender<()>>,
    ) -> Http1Body {
        Http1Body {
            reader: Some(reader),
            decoder: Decoder::new(framing),
            back: Some(back),
            continue_,
        }
    }

    fn give_back(&mut self) {
        if let (Some(reader), Some(back)) = (self.reader.take(), self.back.take()) {
            let complete = self.decoder.is_done();
            let _ = back.send(Returned { reader, complete });
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ReadError>>> {
        if let Some(go) = self.continue_.take() {
            let _ = go.send(());
        }
        let Some(reader) = self.reader.as_mut() else {
            return Poll::Ready(None);
        };
        let piece = ready!(self.decoder.poll_piece(reader, cx))?;
        if piece.is_none() || self.decoder.is_done() {
            self.give_back();
        }
        Poll::Ready(piece.map(Ok))
    }
}

impl Source for Reader {
    fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.poll_fill(cx, READ_CHUNK)
    }
}

impl HttpBody for Http1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match ready!(this.poll_next(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(e)) => {
                this.give_back();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            // The client's trailer fields, if it sent any, end the body.
            None => Poll::Ready(this.decoder.take_trailers().map(|t| Ok(Frame::trailers(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        (self.reader.is_none() || self.decoder.is_done()) && !self.decoder.has_trailers()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.exact_remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        self.give_back();
    }
}
