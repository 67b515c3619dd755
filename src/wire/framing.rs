//! Message bodies on the wire: how a body is delimited and the decoder that takes it out of a
//! connection's read buffer, for both legs (the client's request bodies and the replicas'
//! response bodies are framed by the same rules, RFC 9112 §6 and §7.1).
//!
//! Owns: [`BodyFraming`] and [`Decoder`], a state machine over a buffer, and
//! [`Decoder::poll_piece`], which drives it over any [`Source`] (a connection's read side, with
//! its buffer): each leg reads its socket its own way, the decoding is the same and tested here.
//! Chunk lines are read to RFC 9112 §7.1's grammar and nothing else ([`ChunkError`]): a line
//! ends at CRLF only (a bare LF or CR is refused, never taken as a line end or as content),
//! extensions are tokens and quoted strings, trailer fields are checked like header fields, and
//! lines and the body's extensions and trailers are capped.
//! Must not touch: heads, connections or what a body means.

use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};

use super::syntax::is_tchar;

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
    #[error("malformed chunked body: {0}")]
    BadChunk(#[from] ChunkError),
}

/// What is wrong with a chunked body's lines (RFC 9112 §7.1). Each of these is a way two
/// parsers of the same bytes could end a body in different places, so none is guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("a chunk line ends in a bare LF or holds a CR")]
    BareLineEnd,
    #[error("a chunk line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("the chunk size is not 1 to 15 hex digits")]
    BadSize,
    #[error("a chunk extension is not `;name` or `;name=value` (a token or a quoted string)")]
    BadExtension,
    #[error("a trailer field is not `name: value` of visible characters")]
    BadTrailer,
    #[error("chunk data is not followed by CRLF")]
    NoDataEnd,
    #[error("the body's chunk extensions and trailer fields pass {MAX_METADATA} bytes")]
    TooMuchMetadata,
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
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    /// Inside a chunk with this many bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    ChunkLine(Line),
    UntilClose,
    Done,
}

/// Longest chunk-size or trailer line accepted (without its CRLF).
const MAX_LINE: usize = 4096;
/// Most bytes of chunk extensions and trailer fields one body may carry: none of them counts
/// against `proxy.max_body`, so without a cap a peer could keep the gateway parsing (and, for
/// trailers, holding) them as long as it liked.
const MAX_METADATA: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// Bytes of chunk extensions and trailer fields so far (capped by [`MAX_METADATA`]).
    metadata: usize,
    /// The trailer fields read after the last chunk, until [`Decoder::take_trailers`] (boxed:
    /// nearly every body has none, and a decoder lives in every body).
    trailers: Option<Box<http::HeaderMap>>,
}

impl Decoder {
    pub fn new(framing: BodyFraming) -> Decoder {
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkLine(Line::Size),
            BodyFraming::UntilClose => State::UntilClose,
        };
        Decoder {
            state,
            metadata: 0,
            trailers: None,
        }
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
                        State::DataEnd
                    } else {
                        State::ChunkData(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => match &buf[..buf.len().min(2)] {
                    b"\r\n" => {
                        buf.advance(2);
                        self.state = State::ChunkLine(Line::Size);
                    }
                    b"" | b"\r" => return Ok(Decoded::NeedMore),
                    _ => return Err(ChunkError::NoDataEnd.into()),
                },
                State::ChunkLine(step) => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let line = &buf[..end];
                    self.state = match step {
                        Line::Size => {
                            let (size, extensions) = chunk_size(line)?;
                            self.count_metadata(extensions)?;
                            match size {
                                0 => State::ChunkLine(Line::Trailers),
                                n => State::ChunkData(n),
                            }
                        }
                        Line::Trailers if line.is_empty() => State::Done,
                        Line::Trailers => {
                            let (name, value) = trailer_field(line)?;
                            self.count_metadata(line.len())?;
                            // A field http cannot hold (it checks more than RFC 9110 asks)
                            // is dropped, not the body.
                            if let (Ok(n), Ok(v)) = (
                                http::HeaderName::from_bytes(name),
                                http::HeaderValue::from_bytes(value.trim_ascii()),
                            ) {
                                self.trailers.get_or_insert_default().append(n, v);
                            }
                            State::ChunkLine(Line::Trailers)
                        }
                    };
                    buf.advance(end + 2);
                }
            }
        }
    }

    /// Whether trailer fields were read and not taken yet.
    pub fn has_trailers(&self) -> bool {
        self.trailers.is_some()
    }

    /// The trailer fields read after the last chunk (once the body is done), once.
    pub fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        self.trailers.take().map(|t| *t)
    }

    fn count_metadata(&mut self, n: usize) -> Result<(), ChunkError> {
        self.metadata += n;
        match self.metadata > MAX_METADATA {
            true => Err(ChunkError::TooMuchMetadata),
            false => Ok(()),
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

/// Where the line at the front of `buf` ends (the index of its CR), once its CRLF is there.
/// A line ends at its first LF, and that LF must follow a CR: RFC 9112 lets a recipient end a
/// line at a bare LF, so a proxy in front of the gateway may read `5;\nx` as two lines where
/// a CRLF-only reader sees one, and the two then disagree on where the body ends (the
/// smuggling of issue 23). A bare LF, or a CR anywhere but before the LF, is refused instead.
fn line_end(buf: &[u8]) -> Result<Option<usize>, ChunkError> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return match buf.len() > MAX_LINE + 1 {
            true => Err(ChunkError::LineTooLong),
            false => Ok(None),
        };
    };
    let end = lf.checked_sub(1).filter(|&cr| buf[cr] == b'\r');
    match end {
        Some(end) if !buf[..end].contains(&b'\r') => Ok(Some(end)),
        _ => Err(ChunkError::BareLineEnd),
    }
}

/// The size of a chunk-size line and the length of its extensions:
/// `1*HEXDIG *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )`, the size at
/// most 15 hex digits (2^60 bytes, past any body). Whitespace after the size or a value, with
/// no `;` after it, is tolerated: it cannot end a line for any reader, and some senders pad.
fn chunk_size(line: &[u8]) -> Result<(u64, usize), ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(ChunkError::BadSize);
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| {
        // Hex digits only (checked above); 15 of them cannot overflow.
        let digit = (b as char).to_digit(16).unwrap_or(0);
        n << 4 | u64::from(digit)
    });
    let extensions = &line[digits..];
    let mut rest = skip_ows(extensions);
    while let Some(after) = rest.strip_prefix(b";") {
        let after = skip_ows(after);
        let name = after.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return Err(ChunkError::BadExtension);
        }
        rest = skip_ows(&after[name..]);
        if let Some(value) = rest.strip_prefix(b"=") {
            rest = skip_ows(extension_value(skip_ows(value))?);
        }
    }
    match rest.is_empty() {
        true => Ok((size, extensions.len())),
        false => Err(ChunkError::BadExtension),
    }
}

/// What follows a chunk extension's value (a token or a quoted string) at the front of `s`.
fn extension_value(s: &[u8]) -> Result<&[u8], ChunkError> {
    let Some(mut rest) = s.strip_prefix(b"\"") else {
        let token = s.iter().take_while(|&&b| is_tchar(b)).count();
        return match token {
            0 => Err(ChunkError::BadExtension),
            n => Ok(&s[n..]),
        };
    };
    // quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE (RFC 9110 §5.6.4); no CTL, no
    // NUL, no DEL inside, escaped or not.
    loop {
        match rest {
            [b'"', after @ ..] => return Ok(after),
            [b'\\', escaped, after @ ..] if is_field_byte(*escaped) => rest = after,
            [b, after @ ..] if *b != b'\\' && is_field_byte(*b) => rest = after,
            _ => return Err(ChunkError::BadExtension),
        }
    }
}

/// A trailer field line, `field-name ":" OWS field-value OWS` with a token name and a value of
/// visible characters, spaces and tabs (RFC 9110 §5.5), as its name and value: a NUL or control
/// byte in one is no HTTP, and a line folded onto the next (obs-fold) is refused as in a head.
fn trailer_field(line: &[u8]) -> Result<(&[u8], &[u8]), ChunkError> {
    let name = line.iter().take_while(|&&b| is_tchar(b)).count();
    match line[name..].split_first() {
        Some((b':', value)) if name > 0 && value.iter().all(|&b| is_field_byte(b)) => {
            Ok((&line[..name], value))
        }
        _ => Err(ChunkError::BadTrailer),
    }
}

/// A byte a field value or a quoted string may hold: HTAB, SP, VCHAR, obs-text; never a
/// control byte (NUL, CR, LF, the rest) or DEL.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

fn skip_ows(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

/// The size line of a chunk of `n` bytes (`ff\r\n`), the one chunk encoder both legs write
/// with: the data follows it, then [`CHUNK_END`]; the body ends with [`LAST_CHUNK`].
pub struct ChunkLine {
    buf: [u8; 18],
    at: usize,
}

/// What ends a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk of a body with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The last chunk followed by `fields` as trailer lines (RFC 9112 section 7.1.2), for both
/// legs; fields that frame or route a message are not trailers and are left out.
pub fn write_last_chunk_with(out: &mut Vec<u8>, fields: &http::HeaderMap) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in fields {
        if crate::wire::headers::is_hop_by_hop(name)
            || matches!(
                *name,
                http::header::CONTENT_LENGTH | http::header::HOST | http::header::CONTENT_TYPE
            )
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

impl ChunkLine {
    pub fn of(n: usize) -> ChunkLine {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 18];
        let mut at = buf.len() - 2;
        buf[at..].copy_from_slice(b"\r\n");
        let mut n = n;
        loop {
            at -= 1;
            buf[at] = HEX[n & 0xf];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        ChunkLine { buf, at }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }
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

    use ChunkError::*;

    /// A body on the wire, and the data it decodes to or why it is refused.
    type Case = (&'static [u8], Result<&'static [u8], ChunkError>);

    /// Chunked bodies and what the decoder makes of them, fed any number of bytes at a time.
    /// It is the one decoder of both legs: a client's request body (refused with 400 and the
    /// connection closed) and a replica's response body (cut, and the replica's failure).
    const CHUNKED: &[Case] = &[
        (b"5\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (b"A\r\n0123456789\r\n0\r\n\r\n", Ok(b"0123456789")),
        (b"5;a\r\nhello\r\n0;b\r\n\r\n", Ok(b"hello")),
        (b"5 ; a = b ;c\t;d=e\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (b"5;a=\"q \\\" t;\"\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (b"5 \r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (
            b"5\r\nhello\r\n0\r\nx-t: 1\r\ny:\r\nz: a\tb \xff\r\n\r\n",
            Ok(b"hello"),
        ),
        // The smuggling shape: a bare LF inside a chunk extension.
        (b"2;\nxx\r\n45\r\n0\r\n\r\n", Err(BareLineEnd)),
        (b"5\nhello\r\n0\r\n\r\n", Err(BareLineEnd)),
        (b"5;a\rb\r\nhello\r\n0\r\n\r\n", Err(BareLineEnd)),
        (b"5\r\r\nhello\r\n0\r\n\r\n", Err(BareLineEnd)),
        (b"0\r\nx: a\nb\r\n\r\n", Err(BareLineEnd)),
        (b"0\r\n\n", Err(BareLineEnd)),
        (b"5;a=\x00\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;a\x00\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;a=\"\x01\"\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;a=\"\\\x7f\"\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;a=\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;a b\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5;a=\"open\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"5\x0b\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b"0x5\r\nhello\r\n0\r\n\r\n", Err(BadExtension)),
        (b" 5\r\nhello\r\n0\r\n\r\n", Err(BadSize)),
        (b"+5\r\nhello\r\n0\r\n\r\n", Err(BadSize)),
        (b"zz\r\nhello\r\n0\r\n\r\n", Err(BadSize)),
        (b"\r\nhello\r\n0\r\n\r\n", Err(BadSize)),
        (b"1234567890abcdef0\r\n", Err(BadSize)),
        (b"5\r\nhelloXX0\r\n\r\n", Err(NoDataEnd)),
        (b"5\r\nhello\n0\r\n\r\n", Err(NoDataEnd)),
        (b"5\r\nhello\rX0\r\n\r\n", Err(NoDataEnd)),
        (b"0\r\nx: \x00\r\n\r\n", Err(BadTrailer)),
        (b"0\r\nx: \x7f\r\n\r\n", Err(BadTrailer)),
        (b"0\r\n folded: x\r\n\r\n", Err(BadTrailer)),
        (b"0\r\nno colon\r\n\r\n", Err(BadTrailer)),
        (b"0\r\nx : a\r\n\r\n", Err(BadTrailer)),
        (b"0\r\n: a\r\n\r\n", Err(BadTrailer)),
    ];

    #[test]
    fn chunk_lines_are_written_in_hex() {
        assert_eq!(ChunkLine::of(0).as_bytes(), b"0\r\n");
        assert_eq!(ChunkLine::of(255).as_bytes(), b"ff\r\n");
        assert_eq!(ChunkLine::of(0x10000).as_bytes(), b"10000\r\n");
        assert_eq!(
            ChunkLine::of(usize::MAX).as_bytes(),
            b"ffffffffffffffff\r\n"
        );
        // What one leg writes, the other reads.
        let mut body = BytesMut::new();
        for piece in [&b"hello"[..], &[b'x'; 300][..]] {
            body.extend_from_slice(ChunkLine::of(piece.len()).as_bytes());
            body.extend_from_slice(piece);
            body.extend_from_slice(CHUNK_END);
        }
        body.extend_from_slice(LAST_CHUNK);
        let mut decoder = Decoder::new(BodyFraming::Chunked);
        let mut read = Vec::new();
        while let Decoded::Data(d) = decoder.decode(&mut body).expect("a valid body") {
            read.extend_from_slice(&d);
        }
        assert_eq!(read.len(), 305);
        assert!(decoder.is_done());
    }

    #[test]
    fn chunk_lines_are_read_to_the_grammar_and_nothing_else() {
        for (wire, want) in CHUNKED {
            for step in [1, 2, 3, 7, 1000] {
                let got = decode_all(BodyFraming::Chunked, wire, step);
                let got = got
                    .as_ref()
                    .map(|(body, _)| body.as_slice())
                    .map_err(|e| *e);
                assert_eq!(
                    got,
                    want.map_err(DecodeError::BadChunk),
                    "{} fed {step} at a time",
                    String::from_utf8_lossy(wire)
                );
            }
        }
    }

    #[test]
    fn chunk_lines_and_their_metadata_are_capped() {
        let long = [&b"5;"[..], &[b'a'; MAX_LINE][..], b"\r\nhello\r\n0\r\n\r\n"].concat();
        assert_eq!(
            decode_all(BodyFraming::Chunked, &long, 1000),
            Err(DecodeError::BadChunk(LineTooLong))
        );
        let at_limit = [
            &b"5;"[..],
            &[b'a'; MAX_LINE - 2][..],
            b"\r\nhello\r\n0\r\n\r\n",
        ]
        .concat();
        assert!(decode_all(BodyFraming::Chunked, &at_limit, 1000).is_ok());
        // Lines each under the cap, whose extensions add up past the body's allowance.
        let chunk = [&b"1;"[..], &[b'a'; 4000][..], b"\r\nx\r\n"].concat();
        let many = [chunk.repeat(MAX_METADATA / 4000 + 1), b"0\r\n\r\n".to_vec()].concat();
        assert_eq!(
            decode_all(BodyFraming::Chunked, &many, 1000),
            Err(DecodeError::BadChunk(TooMuchMetadata))
        );
        let fewer = [chunk.repeat(MAX_METADATA / 4000), b"0\r\n\r\n".to_vec()].concat();
        assert!(decode_all(BodyFraming::Chunked, &fewer, 1000).is_ok());
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
    fn trailer_fields_are_kept_for_the_body_to_hand_on() {
        let mut d = Decoder::new(BodyFraming::Chunked);
        let mut buf =
            BytesMut::from(&b"2\r\nhi\r\n0\r\ngrpc-status: 0 \r\nX-A: 1\r\nx-a: 2\r\n\r\n"[..]);
        assert!(matches!(d.decode(&mut buf), Ok(Decoded::Data(_))));
        assert!(matches!(d.decode(&mut buf), Ok(Decoded::End)));
        assert!(d.is_done() && d.has_trailers());
        let t = d.take_trailers().expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        let a: Vec<_> = t.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert!(
            !d.has_trailers() && d.take_trailers().is_none(),
            "taken once"
        );
        let mut d = Decoder::new(BodyFraming::Chunked);
        let mut buf = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert!(matches!(d.decode(&mut buf), Ok(Decoded::End)));
        assert!(!d.has_trailers());
    }

    #[test]
    fn truncated_bodies_are_errors() {
        assert_eq!(
            decode_all(BodyFraming::Length(10), b"short", 2),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_all(BodyFraming::Chunked, b"5\r\nhel", 2),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_all(BodyFraming::Chunked, b"5\r\nhello\r", 2),
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
