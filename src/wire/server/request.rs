//! Request heads from clients: parsed from the connection's buffer into `http` parts, with
//! the framing of the body that follows, under strict RFC 9112 rules (a message whose length
//! two parties could read differently is refused, not guessed at).
//!
//! Owns: [`parse_request`], [`RequestHead`] and [`HeadError`] (what is wrong with a head and
//! the status it is answered with), the request's host rules (an HTTP/1.1 `Host`, and a target
//! in absolute form that agrees with it), and the scratch space of a head's parse that the
//! replica's side shares ([`header_slots`], [`with_spans`]). Pure: it reads a buffer, never a
//! socket.
//! Must not touch: what the request asks for (the service decides) or the connection; how
//! `Content-Length` and `Transfer-Encoding` read is [`super::fields`]' (both legs share it).

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

pub use crate::wire::fields::FramingError;
use crate::wire::fields::FramingFields;
use crate::wire::framing::BodyFraming;
use crate::wire::scratch::{header_slots, with_spans, Span};

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
    Framing(FramingError),
    /// Not ambiguous, but coded in a way the gateway cannot forward (501, RFC 9112 §6.1).
    #[error("{0} (RFC 9112 section 6.1)")]
    NotImplemented(FramingError),
    #[error("the request's host is not stated right: {0} (RFC 9112 section 3.2)")]
    Host(&'static str),
}

impl HeadError {
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            HeadError::Malformed(_) | HeadError::Framing(_) | HeadError::Host(_) => {
                StatusCode::BAD_REQUEST
            }
        }
    }
}

impl From<FramingError> for HeadError {
    fn from(e: FramingError) -> HeadError {
        match e {
            FramingError::UnsupportedCoding => HeadError::NotImplemented(e),
            e => HeadError::Framing(e),
        }
    }
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
    let mut fields = FramingFields::default();
    let mut expect_continue = false;
    let mut host: Option<Span> = None;
    for &(name, at) in spans.iter() {
        let name = HeaderName::from_bytes(&head[name.0..name.0 + name.1])
            .map_err(|_| HeadError::Malformed("bad header name".into()))?;
        let value = HeaderValue::from_maybe_shared(piece(at))
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
            fields.transfer_encoding(value.as_bytes())?;
        } else if name == header::CONTENT_LENGTH {
            fields.content_length(value.as_bytes())?;
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST && host.is_none() {
            host = Some(at);
        }
        headers.append(name, value);
    }
    check_target(
        &method,
        version,
        &uri,
        host.map(|(at, n)| &head[at..at + n]),
    )?;
    let framing = fields.request_framing(version)?;
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

/// RFC 9112 §3.2: an HTTP/1.1 request names its host in a `Host` field (two of them are refused
/// for both protocols by `proxy::headers`). A target in absolute form (`GET http://a.example/x`)
/// names it a second time, and §3.2.2 has the target's authority win; we refuse a `Host` that
/// says otherwise instead (as HAProxy does since 2.1), so that everything after the parser —
/// the admin guard, the proxy's `Host` for the replica, the replica itself — reads the one
/// host both agree on, and no two readers of the request can disagree about it. The authority
/// form (`example.test:443`) is CONNECT's only (RFC 9110 §9.3.6), and user information in an
/// `http` target is refused (RFC 9110 §4.2.4).
fn check_target(
    method: &Method,
    version: Version,
    uri: &Uri,
    host: Option<&[u8]>,
) -> Result<(), HeadError> {
    if let Some(authority) = uri.authority() {
        match uri.scheme_str() {
            None if *method != Method::CONNECT => {
                return Err(HeadError::Host(
                    "the authority form of a request target is for CONNECT only",
                ))
            }
            None | Some("http" | "https") => {}
            Some(_) => {
                return Err(HeadError::Host(
                    "an absolute request target must be http or https",
                ))
            }
        }
        if authority.as_str().contains('@') {
            return Err(HeadError::Host(
                "the request target carries user information",
            ));
        }
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes())) {
            return Err(HeadError::Host(
                "Host does not match the authority of the request target",
            ));
        }
    }
    if host.is_none() && version == Version::HTTP_11 {
        return Err(HeadError::Host("an HTTP/1.1 request without a Host header"));
    }
    Ok(())
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
            !ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
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
            !ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade, close\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn the_framing_fields_follow_the_table_both_legs_share() {
        for case in crate::wire::fields::cases::FRAMING {
            let wire = format!("POST / HTTP/1.1\r\nHost: a\r\n{}\r\n", case.lines);
            let parsed = match parse(wire.as_bytes()) {
                Ok(Some((head, _))) => Ok(head.framing),
                Ok(None) => panic!("{wire:?} is whole"),
                Err(HeadError::Framing(e) | HeadError::NotImplemented(e)) => Err(e),
                Err(other) => panic!("{wire:?}: {other:?}"),
            };
            assert_eq!(parsed, case.request, "{wire:?}");
            if let Err(e) = parsed {
                let status = HeadError::from(e).status();
                let want = match e {
                    FramingError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
                    _ => StatusCode::BAD_REQUEST,
                };
                assert_eq!(status, want, "{wire:?}");
            }
        }
    }

    #[test]
    fn body_framing_is_strict() {
        let same =
            ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n").0;
        assert_eq!(same.framing, BodyFraming::Length(5));
        let expect =
            ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").0;
        assert!(expect.expect_continue);
        assert_eq!(
            refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HeadError::Framing(FramingError::CodingInHttp10)
        );
    }

    #[test]
    fn the_host_is_stated_once_and_agrees_with_the_target() {
        assert_eq!(
            refused("GET / HTTP/1.1\r\n\r\n"),
            HeadError::Host("an HTTP/1.1 request without a Host header")
        );
        assert!(ok("GET / HTTP/1.0\r\n\r\n").0.parts.headers.is_empty());
        let (abs, _) = ok("GET http://A.example:81/x?y=1 HTTP/1.1\r\nHost: a.example:81\r\n\r\n");
        assert_eq!(
            abs.parts.uri.path_and_query().map(|p| p.as_str()),
            Some("/x?y=1")
        );
        let (old, _) = ok("GET http://a.example/x HTTP/1.0\r\n\r\n");
        assert_eq!(
            old.parts.uri.authority().map(|a| a.as_str()),
            Some("a.example"),
            "without Host the target's authority is the host"
        );
        let (connect, _) = ok("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n");
        assert_eq!(
            connect.parts.method,
            Method::CONNECT,
            "refused later, with 405"
        );
        for wire in [
            "GET http://a.example/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "GET http://a.example/x HTTP/1.1\r\n\r\n",
            "GET http://a.example:80/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "GET http://u@a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "GET ftp://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "GET a.example:80 HTTP/1.1\r\nHost: a.example:80\r\n\r\n",
            "GET http://a.example/x HTTP/1.0\r\nHost: b.example\r\n\r\n",
        ] {
            let e = refused(wire);
            assert!(matches!(e, HeadError::Host(_)), "{wire:?}: {e:?}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
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
            "GET / HTTP/1.1\r\nHost: a\r\nCookie: {}\r\n\r\n",
            "c".repeat(32 * 1024)
        ));
        assert_eq!(under.parts.headers["cookie"].len(), 32 * 1024);
    }
}
