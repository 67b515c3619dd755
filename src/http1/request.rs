//! Request heads from clients: parsed from the connection's buffer into `http` parts, with
//! the framing of the body that follows, under strict RFC 9112 rules (a message whose length
//! two parties could read differently is refused, not guessed at).
//!
//! Owns: [`parse_request`], [`RequestHead`] and [`HeadError`] (what is wrong with a head and
//! the status it is answered with), and the scratch space of a head's parse that the replica's
//! side shares ([`header_slots`], [`with_spans`]). Pure: it reads a buffer, never a socket.
//! Must not touch: what the request asks for (the service decides) or the connection.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use super::framing::BodyFraming;

/// Largest request head (request line and header fields) accepted. Larger than NGINX's 8 KiB
/// and HAProxy's 16 KiB buffers, so big cookies pass; bounded, so a client cannot make the
/// gateway hold more than this for it before a request exists.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one request (hyper's and HAProxy's default alike).
pub const MAX_HEADERS: usize = 100;

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub parts: http::request::Parts,
    pub framing: BodyFraming,
    /// The client may send another request on this connection after this one.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request is not valid HTTP/1.1: {0}")]
    Malformed(String),
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("the request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("the request's body length is ambiguous: {0} (RFC 9112 section 6.3)")]
    Framing(&'static str),
}

impl HeadError {
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::Malformed(_) | HeadError::Framing(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Where a piece of the head lies in the buffer.
pub type Span = (usize, usize);

/// Runs `f` with this thread's list for the spans of a head's fields, emptied. One list a thread,
/// reused for every head parsed on it (both legs): a head neither allocates one nor zeroes a
/// fixed array of [`MAX_HEADERS`] for it, which the instruction profile showed to be the largest
/// single cost of parsing.
pub fn with_spans<R>(f: impl FnOnce(&mut Vec<(Span, Span)>) -> R) -> R {
    thread_local! {
        static SPANS: std::cell::RefCell<Vec<(Span, Span)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SPANS.with(|spans| {
        let mut spans = spans.borrow_mut();
        spans.clear();
        f(&mut spans)
    })
}

/// `N` slots for httparse's header fields, left uninitialised: httparse writes the ones it
/// fills (zeroing them all, 32 bytes a slot, was done for every head).
pub fn header_slots<'b, const N: usize>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; N] {
    [const { std::mem::MaybeUninit::uninit() }; N]
}

/// Parses a request head at the start of `buf`: `Ok(None)` when more bytes are needed. A
/// complete head is split off the buffer (what follows stays: the body or the next request)
/// and its fields point into it, so parsing copies nothing and allocates only the header map
/// (and names that are not standard).
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    with_spans(|spans| parse_request_with(buf, spans))
}

fn parse_request_with(
    buf: &mut BytesMut,
    spans: &mut Vec<(Span, Span)>,
) -> Result<Option<RequestHead>, HeadError> {
    let mut slots = header_slots::<MAX_HEADERS>();
    let (len, method, target, version) = {
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        };
        if len > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
        let method = req
            .method
            .ok_or_else(|| HeadError::Malformed("no method".into()))?;
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| HeadError::Malformed(format!("bad method {method:?}")))?;
        let target = span(
            req.path
                .ok_or_else(|| HeadError::Malformed("no request target".into()))?
                .as_bytes(),
        );
        let version = match req.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        spans.extend(
            req.headers
                .iter()
                .map(|h| (span(h.name.as_bytes()), span(h.value))),
        );
        (len, method, target, version)
    };
    let head = buf.split_to(len).freeze();
    let piece = |(start, n): Span| head.slice(start..start + n);
    let uri = Uri::from_maybe_shared(piece(target))
        .map_err(|e| HeadError::Malformed(format!("bad request target: {e}")))?;

    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut keep_alive = version == Version::HTTP_11;
    let (mut chunked, mut codings, mut length) = (false, false, None::<u64>);
    let mut expect_continue = false;
    for &(name, value) in spans.iter() {
        let name = HeaderName::from_bytes(&head[name.0..name.0 + name.1])
            .map_err(|_| HeadError::Malformed("bad header name".into()))?;
        let value = HeaderValue::from_maybe_shared(piece(value))
            .map_err(|_| HeadError::Malformed(format!("bad value of {name}")))?;
        if name == header::CONNECTION {
            for token in tokens(&value) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    keep_alive = true;
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            codings = true;
            // Chunked must be the last coding, and only once (RFC 9112 §6.3, §7).
            chunked = tokens(&value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        } else if name == header::CONTENT_LENGTH {
            for token in value.as_bytes().split(|&b| b == b',') {
                let n = std::str::from_utf8(token)
                    .ok()
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or(HeadError::Framing("Content-Length is not a number"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Framing("conflicting Content-Length values"));
                }
                length = Some(n);
            }
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    let framing = match (codings, length) {
        (true, Some(_)) => {
            return Err(HeadError::Framing(
                "both Transfer-Encoding and Content-Length",
            ))
        }
        (true, None) if version == Version::HTTP_10 => {
            return Err(HeadError::Framing("Transfer-Encoding in HTTP/1.0"))
        }
        (true, None) if !chunked => {
            return Err(HeadError::Framing(
                "Transfer-Encoding does not end in chunked",
            ))
        }
        (true, None) => BodyFraming::Chunked,
        (false, Some(0) | None) => BodyFraming::Empty,
        (false, Some(n)) => BodyFraming::Length(n),
    };
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let (parts, ()) = request.into_parts();
    Ok(Some(RequestHead {
        parts,
        expect_continue: expect_continue
            && version == Version::HTTP_11
            && framing != BodyFraming::Empty,
        framing,
        keep_alive,
    }))
}

/// The comma-separated tokens of a header value.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// The parsed head and what stayed in the buffer after it.
    fn parse(wire: &[u8]) -> Result<Option<(RequestHead, Bytes)>, HeadError> {
        let mut buf = BytesMut::from(wire);
        let head = parse_request(&mut buf)?;
        Ok(head.map(|h| (h, buf.freeze())))
    }

    fn ok(wire: &str) -> (RequestHead, Bytes) {
        match parse(wire.as_bytes()) {
            Ok(Some(parsed)) => parsed,
            other => panic!("{wire:?} gave {other:?}"),
        }
    }

    fn refused(wire: &str) -> HeadError {
        match parse(wire.as_bytes()) {
            Err(e) => e,
            other => panic!("{wire:?} should be refused, gave {other:?}"),
        }
    }

    #[test]
    fn a_request_head_is_split_off_and_what_follows_stays() {
        let (head, rest) =
            ok("GET /home?id=42 HTTP/1.1\r\nHost: a\r\nX-Custom: v\r\n\r\nGET /next");
        assert_eq!(head.parts.method, Method::GET);
        assert_eq!(head.parts.uri, "/home?id=42");
        assert_eq!(head.parts.version, Version::HTTP_11);
        assert_eq!(head.parts.headers["host"], "a");
        assert_eq!(head.parts.headers["x-custom"], "v");
        assert_eq!(head.framing, BodyFraming::Empty);
        assert!(head.keep_alive && !head.expect_continue);
        assert_eq!(&rest[..], b"GET /next");
        assert!(
            matches!(parse(b"GET /home HTTP/1.1\r\nHost: a\r\n"), Ok(None)),
            "partial"
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        assert!(
            !ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !ok("GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn body_framing_is_strict() {
        let length = ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").0;
        assert_eq!(length.framing, BodyFraming::Length(5));
        let same = ok("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n").0;
        assert_eq!(same.framing, BodyFraming::Length(5));
        let chunked = ok("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").0;
        assert_eq!(chunked.framing, BodyFraming::Chunked);
        let expect = ok("POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").0;
        assert!(expect.expect_continue);
        for wire in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        ] {
            assert_eq!(refused(wire).status(), StatusCode::BAD_REQUEST, "{wire:?}");
        }
    }

    #[test]
    fn malformed_and_oversized_heads_are_refused_with_their_status() {
        for wire in [
            "\x00\x01\x02garbage\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nFolded: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        ] {
            assert_eq!(refused(wire).status(), StatusCode::BAD_REQUEST, "{wire:?}");
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        let too_many = refused(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
        assert_eq!(too_many, HeadError::TooManyHeaders);
        let big = format!("GET / HTTP/1.1\r\nCookie: {}", "c".repeat(MAX_HEAD));
        assert_eq!(
            refused(&big).status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let (under, _) = ok(&format!(
            "GET / HTTP/1.1\r\nCookie: {}\r\n\r\n",
            "c".repeat(32 * 1024)
        ));
        assert_eq!(under.parts.headers["cookie"].len(), 32 * 1024);
    }
}
