//! Response heads to clients: the framing a response gets on the wire and its head, written
//! into a buffer.
//!
//! Owns: [`framing_of`] (how a response body is delimited for this request: its
//! `Content-Length`, the body's exact size, chunked, or until close for an HTTP/1.0 client),
//! [`write_head`], and the `Date` every response carries (RFC 9110 §6.6.1), formatted once a
//! second per thread. A response's fields are its `HeaderMap`, and before them, for a replica's
//! head forwarded as bytes, the [`RawHead`]'s fields ([`Fields`]): copied as the replica wrote
//! them, its hop-by-hop and framing fields already cut where it was read. Pure but for the
//! clock.
//! Must not touch: the response's meaning, or the connection; which of a replica's fields are
//! forwarded (`crate::wire::client::head` decides as it reads them).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::wire::client::head::RawHead;
use crate::wire::fields::FramingFields;

/// A response's fields: the replica's as it sent them (a head forwarded as bytes), then its
/// `HeaderMap` (all of them, or what the gateway added to the replica's).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub raw: Option<&'a RawHead>,
    pub map: &'a HeaderMap,
}

impl<'a> Fields<'a> {
    /// The fields of a `HeaderMap` alone.
    pub fn map(map: &'a HeaderMap) -> Fields<'a> {
        Fields { raw: None, map }
    }

    /// The `Content-Length` the response states, read by the rules the parsers apply (a
    /// replica's length reaches here as the gateway framed it); a length those rules refuse
    /// is no length.
    fn content_length(&self) -> Option<u64> {
        if let Some(n) = self.raw.and_then(RawHead::content_length) {
            return Some(n);
        }
        self.map.get(header::CONTENT_LENGTH).and_then(|v| {
            let mut fields = FramingFields::default();
            fields.content_length(v.as_bytes()).ok()?;
            fields.length()
        })
    }

    fn states_length(&self) -> bool {
        self.raw.is_some_and(|r| r.content_length().is_some())
            || self.map.contains_key(header::CONTENT_LENGTH)
    }

    fn has_date(&self) -> bool {
        self.raw.is_some_and(RawHead::has_date) || self.map.contains_key(header::DATE)
    }
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body is sent (HEAD, 1xx, 204, 304), whatever the body holds.
    None,
    /// Exactly this many bytes; `declared` when the response named it, else it is added.
    Length {
        n: u64,
        declared: bool,
    },
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    UntilClose,
}

/// The framing of a response with `status` and `headers` to a `method` request of `version`,
/// whose body says its exact size is `exact` (when it knows).
pub fn framing_of(
    method: &Method,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    exact: Option<u64>,
) -> Framing {
    framing_for(method, version, status, Fields::map(headers), exact)
}

/// [`framing_of`] for a response's [`Fields`].
pub fn framing_for(
    method: &Method,
    version: Version,
    status: StatusCode,
    fields: Fields<'_>,
    exact: Option<u64>,
) -> Framing {
    // A length the parsers' rules refuse is no length, and is not written either.
    let declared = fields.content_length();
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Framing::None;
    }
    match (declared, exact) {
        (Some(n), _) => Framing::Length { n, declared: true },
        (None, Some(n)) => Framing::Length { n, declared: false },
        (None, None) if version == Version::HTTP_10 => Framing::UntilClose,
        (None, None) => Framing::Chunked,
    }
}

/// What the `Connection` header of a response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1's default: nothing is written.
    KeepAlive,
    /// An HTTP/1.0 client that asked for keep-alive is told it is kept.
    KeepAlive10,
    /// The connection closes after this response.
    Close,
    /// A `101`: the connection switches to the protocol the response's `Upgrade` names.
    Upgrade,
}

/// Writes the head of a response into `out`. The response's own `Transfer-Encoding` and
/// `Connection` are replaced by what this connection does, `Content-Length` is added when the
/// body knows its size and the response did not say it, and `Date` when it has none.
pub fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    persistence: Persistence,
    head_request: bool,
    exact: Option<u64>,
) {
    let framed = (framing, persistence);
    write_fields_head(
        out,
        status,
        Fields::map(headers),
        framed,
        head_request,
        exact,
    );
}

/// [`write_head`] for a response's [`Fields`]: a replica's head forwarded as bytes has its
/// fields copied first, as the replica wrote them (its name case kept), then the relayed
/// `Content-Length`, then the `HeaderMap`'s.
pub fn write_fields_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    fields: Fields<'_>,
    (framing, persistence): (Framing, Persistence),
    head_request: bool,
    exact: Option<u64>,
) {
    let headers = fields.map;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // The response's own length is written only when it is the one the body is framed by (or
    // the one a bodiless answer states); else the framing's own is.
    let own_length = matches!(
        framing,
        Framing::Length { declared: true, .. } | Framing::None
    );
    let mut number = itoa::Buffer::new();
    if let Some(raw) = fields.raw {
        for (name, value) in raw.fields() {
            line(out, name, value);
        }
        // Where the map put it: after the replica's other fields.
        if let Some(n) = raw.content_length().filter(|_| own_length) {
            line(out, b"content-length", number.format(n).as_bytes());
        }
    }
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || (name == header::CONTENT_LENGTH && !own_length)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length { n, declared: false } => {
            line(out, b"content-length", number.format(n).as_bytes())
        }
        Framing::Chunked => line(out, b"transfer-encoding", b"chunked"),
        // A HEAD response tells the length a GET would have had, when it is known.
        Framing::None if head_request && !fields.states_length() => {
            if let Some(n) = exact {
                line(out, b"content-length", number.format(n).as_bytes());
            }
        }
        _ => {}
    }
    match persistence {
        Persistence::KeepAlive => {}
        Persistence::KeepAlive10 => line(out, b"connection", b"keep-alive"),
        Persistence::Close => line(out, b"connection", b"close"),
        Persistence::Upgrade => line(out, b"connection", b"upgrade"),
    }
    if !fields.has_date() {
        DATE.with(|d| {
            let mut d = d.borrow_mut();
            line(out, b"date", d.now().as_bytes());
        });
    }
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The HTTP date of the current second, formatted when the second changes.
struct CachedDate {
    second: u64,
    /// The date as a field value, its bytes shared with every response of the second.
    value: Option<HeaderValue>,
}

impl CachedDate {
    fn now(&mut self) -> &HeaderValue {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second || self.value.is_none() {
            self.second = second;
            let text = Bytes::from(httpdate::fmt_http_date(now));
            // An IMF-fixdate is visible ASCII; should the formatter ever say otherwise, the
            // epoch's date is still a date.
            self.value = Some(
                HeaderValue::from_maybe_shared(text)
                    .unwrap_or_else(|_| HeaderValue::from_static(EPOCH)),
            );
        }
        self.value.get_or_insert(HeaderValue::from_static(EPOCH))
    }
}

const EPOCH: &str = "Thu, 01 Jan 1970 00:00:00 GMT";

thread_local! {
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: 0, value: None })
    };
}

/// The current second's HTTP date as a field value (HTTP/2's responses), shared with the
/// HTTP/1.1 writer's: formatted once a second.
pub fn date_value() -> HeaderValue {
    DATE.with(|d| d.borrow_mut().now().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(status: StatusCode, headers: &HeaderMap, framing: Framing, p: Persistence) -> String {
        let mut out = Vec::new();
        write_head(&mut out, status, headers, framing, p, false, None);
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn framing_follows_the_method_the_status_and_what_the_body_knows() {
        let none = HeaderMap::new();
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        let (get, v11) = (Method::GET, Version::HTTP_11);
        let ok = StatusCode::OK;
        assert_eq!(
            framing_of(&Method::HEAD, v11, ok, &declared, Some(0)),
            Framing::None
        );
        assert_eq!(
            framing_of(&get, v11, StatusCode::NO_CONTENT, &none, None),
            Framing::None
        );
        assert_eq!(
            framing_of(&get, v11, StatusCode::NOT_MODIFIED, &declared, None),
            Framing::None
        );
        assert_eq!(
            framing_of(&get, v11, ok, &declared, None),
            Framing::Length {
                n: 12,
                declared: true
            }
        );
        assert_eq!(
            framing_of(&get, v11, ok, &none, Some(3)),
            Framing::Length {
                n: 3,
                declared: false
            }
        );
        assert_eq!(framing_of(&get, v11, ok, &none, None), Framing::Chunked);
        let mut signed = HeaderMap::new();
        signed.insert(header::CONTENT_LENGTH, HeaderValue::from_static("+12"));
        let framing = framing_of(&get, v11, ok, &signed, None);
        assert_eq!(framing, Framing::Chunked, "+12 is no length");
        let text = head(ok, &signed, framing, Persistence::KeepAlive);
        assert!(!text.contains("content-length"), "nor written: {text}");
        assert_eq!(
            framing_of(&get, Version::HTTP_10, ok, &none, None),
            Framing::UntilClose
        );
    }

    #[test]
    fn the_head_says_what_the_connection_does() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        let text = head(
            StatusCode::OK,
            &headers,
            Framing::Length {
                n: 5,
                declared: false,
            },
            Persistence::KeepAlive,
        );
        assert!(
            text.starts_with(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\r\ndate: ") && text.ends_with(" GMT\r\n\r\n"),
            "{text}"
        );
        assert!(!text.contains("gzip") && !text.contains("x-hop"), "{text}");
        let text = head(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            Framing::Chunked,
            Persistence::Close,
        );
        assert!(
            text.starts_with(
                "HTTP/1.1 502 Bad Gateway\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
            ),
            "{text}"
        );
        let text = head(
            StatusCode::OK,
            &HeaderMap::new(),
            Framing::UntilClose,
            Persistence::KeepAlive10,
        );
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
        let mut out = Vec::new();
        write_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            Framing::None,
            Persistence::KeepAlive,
            true,
            Some(7),
        );
        assert!(
            String::from_utf8_lossy(&out).contains("content-length: 7\r\n"),
            "HEAD tells the length"
        );
    }

    fn raw_head(wire: &str, method: &Method) -> Box<RawHead> {
        crate::wire::client::head::parse_raw_response(&mut bytes::BytesMut::from(wire), method)
            .expect("parses")
            .expect("complete")
            .raw
    }

    /// `raw` and what the gateway `added`, written as bytes and as one map.
    fn both_ways(raw: &RawHead, added: &HeaderMap, method: &Method) -> (String, String) {
        let ok = StatusCode::OK;
        let fields = Fields {
            raw: Some(raw),
            map: added,
        };
        let exact = None;
        let framing = framing_for(method, Version::HTTP_11, ok, fields, exact);
        let head_request = *method == Method::HEAD;
        let framed = (framing, Persistence::KeepAlive);
        let mut bytes = Vec::new();
        write_fields_head(&mut bytes, ok, fields, framed, head_request, exact);
        let mut map = raw.headers();
        for (name, value) in added {
            map.append(name, value.clone());
        }
        assert_eq!(
            framing_of(method, Version::HTTP_11, ok, &map, exact),
            framing
        );
        let mut mapped = Vec::new();
        write_head(
            &mut mapped,
            ok,
            &map,
            framing,
            Persistence::KeepAlive,
            head_request,
            exact,
        );
        let text = |b: Vec<u8>| String::from_utf8(b).expect("ascii");
        (text(bytes), text(mapped))
    }

    #[test]
    fn a_head_forwarded_as_bytes_is_the_one_its_map_writes_but_for_the_name_case() {
        let raw = raw_head(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: x-hop\r\nX-Hop: 1\r\n\
             Transfer-Encoding: chunked\r\nX-Id: 7\r\n\r\n",
            &Method::GET,
        );
        let mut added = HeaderMap::new();
        added.append(header::VIA, HeaderValue::from_static("1.1 gw"));
        let (bytes, mapped) = both_ways(&raw, &added, &Method::GET);
        assert!(
            bytes.starts_with(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Id: 7\r\nvia: 1.1 gw\r\n\
                 transfer-encoding: chunked\r\ndate: "
            ),
            "{bytes}"
        );
        assert_eq!(bytes.to_lowercase(), mapped.to_lowercase());
        // A length the replica stated goes after its fields, where the map had it; its own
        // `Date` is the one sent.
        let raw = raw_head(
            "HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\nContent-Length: 0012\r\n\
             X-Id: 7\r\n\r\n",
            &Method::GET,
        );
        let (bytes, mapped) = both_ways(&raw, &added, &Method::GET);
        assert_eq!(
            bytes,
            "HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\nX-Id: 7\r\n\
             content-length: 12\r\nvia: 1.1 gw\r\n\r\n"
        );
        assert_eq!(bytes.to_lowercase(), mapped.to_lowercase());
        // A HEAD answer's length is the replica's, not added a second time.
        let raw = raw_head(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: x\r\n\r\n",
            &Method::HEAD,
        );
        let (bytes, mapped) = both_ways(&raw, &HeaderMap::new(), &Method::HEAD);
        assert_eq!(
            bytes,
            "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 9\r\n\r\n"
        );
        assert_eq!(bytes, mapped);
    }
}
