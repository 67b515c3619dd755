//! A replica's response body, read straight from its connection by the task that writes it to
//! the client: no channel, no second task, no copy (bytes read are handed on as they are).
//!
//! Owns: decoding the body's framing (a length, chunked, or until close), counting the request
//! in flight at its replica until the body ends, and giving the connection back to the pool
//! when the body was read whole and the connection may be reused.
//! Must not touch: heads or routing.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::head::BodyFraming;
use super::pool::{self, Conn};
use crate::error::BoxError;
use crate::proxy::body::InFlight;

/// The line a chunked body's decoder expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A chunk-size line.
    Size,
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

enum State {
    Length(u64),
    /// Inside a chunk with this many bytes left.
    ChunkData(u64),
    ChunkLine(Line),
    UntilClose,
    Done,
}

pub struct UpstreamBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    _in_flight: InFlight,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the replica closed the connection in the middle of the response body")]
    Truncated,
    #[error("the replica sent a malformed chunked body")]
    BadChunk,
    #[error("reading the response body from the replica failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Largest read from a replica at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

impl UpstreamBody {
    pub fn new(conn: Conn, framing: BodyFraming, keep_alive: bool, in_flight: InFlight) -> Self {
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkLine(Line::Size),
            BodyFraming::UntilClose => State::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            keep_alive,
            _in_flight: in_flight,
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body ended: the connection goes back to the pool if it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                pool::put_back(conn);
            }
        }
    }

    /// Reads more from the replica into the connection's buffer; `Ok(0)` at end of stream.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, BodyError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.poll_fill(cx, READ_CHUNK).map_err(BodyError::Io)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        loop {
            let buffered = self.conn.as_ref().map_or(0, |c| c.buf.len());
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) => {
                    if buffered == 0 {
                        if ready!(self.fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(BodyError::Truncated)));
                        }
                        continue;
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buffered);
                    let data = self.take(take);
                    let left = left - take as u64;
                    if left == 0 {
                        self.finish();
                    } else {
                        self.state = State::Length(left);
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                State::UntilClose => {
                    if buffered == 0 {
                        if ready!(self.fill(cx))? == 0 {
                            self.keep_alive = false;
                            self.finish();
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    let data = self.take(buffered);
                    return Poll::Ready(Some(Ok(data)));
                }
                State::ChunkData(left) => {
                    if buffered == 0 {
                        if ready!(self.fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(BodyError::Truncated)));
                        }
                        continue;
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buffered);
                    let data = self.take(take);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::ChunkLine(Line::DataEnd)
                    } else {
                        State::ChunkData(left)
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
                State::ChunkLine(step) => {
                    let line = self.conn.as_ref().and_then(|c| line_end(&c.buf));
                    let Some(end) = line else {
                        if buffered > MAX_LINE {
                            return Poll::Ready(Some(Err(BodyError::BadChunk)));
                        }
                        if ready!(self.fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(BodyError::Truncated)));
                        }
                        continue;
                    };
                    let line = self.take(end + 2);
                    let text = &line[..end];
                    self.state = match step {
                        Line::DataEnd if text.is_empty() => State::ChunkLine(Line::Size),
                        Line::DataEnd => return Poll::Ready(Some(Err(BodyError::BadChunk))),
                        Line::Size => match chunk_size(text) {
                            Some(0) => State::ChunkLine(Line::Trailers),
                            Some(n) => State::ChunkData(n),
                            None => return Poll::Ready(Some(Err(BodyError::BadChunk))),
                        },
                        Line::Trailers if text.is_empty() => {
                            self.finish();
                            return Poll::Ready(None);
                        }
                        Line::Trailers => State::ChunkLine(Line::Trailers),
                    };
                }
            }
        }
    }

    /// The next `n` bytes of the body. A small piece is copied out, so the connection's buffer
    /// stays its own and the next response is read into it without allocating; a large one is
    /// split off without copying.
    fn take(&mut self, n: usize) -> Bytes {
        const COPY_UP_TO: usize = 4 * 1024;
        match self.conn.as_mut() {
            Some(c) if n <= COPY_UP_TO => {
                let piece = Bytes::copy_from_slice(&c.buf[..n]);
                c.buf.advance(n);
                piece
            }
            Some(c) => c.buf.split_to(n).freeze(),
            None => Bytes::new(),
        }
    }
}

/// Where the first CRLF in `buf` starts.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The size of a chunk-size line (hex, optionally followed by `;extensions`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let hex = line.split(|&b| b == b';').next()?.trim_ascii();
    if hex.is_empty() || hex.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

impl HttpBody for UpstreamBody {
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
                this.keep_alive = false;
                this.state = State::Done;
                this.conn = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Not read to its end (the client went away): the connection is dropped, not reused.
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"ff;name=value"), Some(255));
        assert_eq!(chunk_size(b" 5 "), Some(5));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"zz"), None);
        assert_eq!(chunk_size(b"1234567890abcdef0"), None, "too long");
        assert_eq!(line_end(b"ab\r\ncd"), Some(2));
        assert_eq!(line_end(b"ab\r"), None);
    }
}
