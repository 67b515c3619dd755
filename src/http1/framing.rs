//! Message bodies on the wire: how a body is delimited and the decoder that takes it out of a
//! connection's read buffer, for both legs (the client's request bodies and the replicas'
//! response bodies are framed by the same rules, RFC 9112 §6 and §7.1).
//!
//! Owns: [`BodyFraming`] and [`Decoder`], a state machine over a buffer, and
//! [`Decoder::poll_piece`], which drives it over any [`Source`] (a connection's read side, with
//! its buffer): each leg reads its socket its own way, the decoding is the same and tested here.
//! Must not touch: heads, connections or what a body means.

use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (a request without one; HEAD, 1xx, 204, 304 responses).
    Empty,
    Length(u64),
    Chunked,
    /// Until the peer closes the connection (which then cannot be reused; responses only).
    UntilClose,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The body is complete; what follows in the buffer belongs to the next message.
    End,
    /// More bytes are needed: read into the buffer and call again (or [`Decoder::at_eof`]).
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the connection closed in the middle of the body")]
    Truncated,
    #[error("malformed chunked body")]
    BadChunk,
}

/// Why a body could not be read from its connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Framing(#[from] DecodeError),
    #[error("reading the body failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection's read side as a body is read from it: its buffer, and more read into it.
pub trait Source {
    fn buffer(&mut self) -> &mut BytesMut;
    /// Reads more into the buffer; `Ok(0)` at end of stream.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>>;
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    /// Inside a chunk with this many bytes left.
    ChunkData(u64),
    ChunkLine(Line),
    UntilClose,
    Done,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn new(framing: BodyFraming) -> Decoder {
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkLine(Line::Size),
            BodyFraming::UntilClose => State::UntilClose,
        };
        Decoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The bytes left when the framing says exactly (a length), else `None`.
    pub fn exact_remaining(&self) -> Option<u64> {
        match self.state {
            State::Done => Some(0),
            State::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The next piece of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(_) | State::ChunkData(_) | State::UntilClose if buf.is_empty() => {
                    return Ok(Decoded::NeedMore)
                }
                State::Length(left) => {
                    let data = take(buf, left);
                    let left = left - data.len() as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::UntilClose => return Ok(Decoded::Data(take(buf, u64::MAX))),
                State::ChunkData(left) => {
                    let data = take(buf, left);
                    let left = left - data.len() as u64;
                    self.state = if left == 0 {
                        State::ChunkLine(Line::DataEnd)
                    } else {
                        State::ChunkData(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::ChunkLine(step) => {
                    let Some(end) = line_end(buf) else {
                        if buf.len() > MAX_LINE {
                            return Err(DecodeError::BadChunk);
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let empty = end == 0;
                    self.state = match step {
                        Line::DataEnd if empty => State::ChunkLine(Line::Size),
                        Line::DataEnd => return Err(DecodeError::BadChunk),
                        Line::Size => match chunk_size(&buf[..end]) {
                            Some(0) => State::ChunkLine(Line::Trailers),
                            Some(n) => State::ChunkData(n),
                            None => return Err(DecodeError::BadChunk),
                        },
                        Line::Trailers if empty => State::Done,
                        Line::Trailers => State::ChunkLine(Line::Trailers),
                    };
                    buf.advance(end + 2);
                }
            }
        }
    }

    /// The peer closed the connection when [`Decoder::decode`] needed more: the end of a body
    /// read until close, else a truncated one.
    pub fn at_eof(&mut self) -> Result<Decoded, DecodeError> {
        match self.state {
            State::Done | State::UntilClose => {
                self.state = State::Done;
                Ok(Decoded::End)
            }
            _ => Err(DecodeError::Truncated),
        }
    }
}

impl Decoder {
    /// The body's next piece from `source`, reading it as needed; `None` once the body is whole
    /// (a body read until close: once the peer closed).
    pub fn poll_piece(
        &mut self,
        source: &mut impl Source,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, ReadError>> {
        loop {
            let decoded = match self.decode(source.buffer())? {
                Decoded::NeedMore => {
                    if ready!(source.poll_more(cx))? > 0 {
                        continue;
                    }
                    self.at_eof()?
                }
                decoded => decoded,
            };
            return Poll::Ready(Ok(match decoded {
                Decoded::Data(data) => Some(data),
                Decoded::End | Decoded::NeedMore => None,
            }));
        }
    }
}

/// Up to `limit` bytes from the front of `buf`, split off without copying. The connections'
/// buffers are shared already (their heads are split off them the same way), so this costs no
/// allocation; the piece is written on and dropped before the buffer is read into again, which
/// then reuses it whole.
fn take(buf: &mut BytesMut, limit: u64) -> Bytes {
    let n = usize::try_from(limit).unwrap_or(usize::MAX).min(buf.len());
    buf.split_to(n).freeze()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed `step` bytes at a time: the body, and what was left after it.
    fn decode_all(
        framing: BodyFraming,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), DecodeError> {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => return Ok((body, buf.to_vec())),
                Decoded::NeedMore if fed == wire.len() => match decoder.at_eof()? {
                    Decoded::End => return Ok((body, buf.to_vec())),
                    other => panic!("at_eof gave {other:?}"),
                },
                Decoded::NeedMore => {
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

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

    #[test]
    fn bodies_decode_the_same_however_the_bytes_arrive() {
        let chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 1000] {
            let (body, rest) = decode_all(BodyFraming::Chunked, chunked, step).expect("chunked");
            assert_eq!(body, b"hello world", "step {step}");
            assert_eq!(
                rest,
                b"NEXT"[..rest.len()],
                "step {step}: the next message is left"
            );
            let (body, rest) =
                decode_all(BodyFraming::Length(5), b"helloGET", step).expect("length");
            assert_eq!(body, b"hello");
            assert_eq!(rest, b"GET"[..rest.len()]);
            let (body, _) = decode_all(BodyFraming::UntilClose, b"all of it", step).expect("close");
            assert_eq!(body, b"all of it");
        }
        let (body, rest) = decode_all(BodyFraming::Empty, b"", 1).expect("empty");
        assert!(body.is_empty() && rest.is_empty());
    }

    #[test]
    fn broken_bodies_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            &[b'1'; 5000][..],
        ] {
            assert_eq!(
                decode_all(BodyFraming::Chunked, wire, 3),
                Err(DecodeError::BadChunk),
                "{}",
                String::from_utf8_lossy(&wire[..wire.len().min(40)])
            );
        }
        assert_eq!(
            decode_all(BodyFraming::Length(10), b"short", 2),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_all(BodyFraming::Chunked, b"5\r\nhel", 2),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn a_piece_is_split_off_the_buffer() {
        let mut buf = BytesMut::from(&[7u8; 10_000][..]);
        let mut decoder = Decoder::new(BodyFraming::Length(10_000));
        assert_eq!(decoder.exact_remaining(), Some(10_000));
        let Ok(Decoded::Data(d)) = decoder.decode(&mut buf) else {
            panic!("data expected");
        };
        assert_eq!(d.len(), 10_000);
        assert!(decoder.is_done());
        assert_eq!(decoder.exact_remaining(), Some(0));
    }
}
