//! HTTP/1.1 message heads on the upstream side: the request head written from the client's
//! request in one pass, and the replica's response head parsed (httparse), its fields left in
//! the replica's bytes ([`RawHead`]) with a `HeaderMap` built from them only when asked.
//!
//! Owns: serialising the forwarded request (the client's method, target and headers minus
//! hop-by-hop and client-only ones, plus `X-Forwarded-*` and our own framing) into one buffer
//! that a retry reuses as it is; parsing a response head and deciding how its body is framed
//! and whether the connection can be reused (RFC 9112 §6, §9.3), with the `Content-Length` it
//! relays being the length it framed; which of its fields are forwarded (hop-by-hop ones, the
//! ones its `Connection` names and the framing fields cut as the head is read), kept as spans
//! of the head, and the one way they become a `HeaderMap` ([`RawHead::headers`]).
//! Must not touch: sockets. It turns bytes into heads and back. How `Content-Length` and
//! `Transfer-Encoding` read is `crate::wire::fields`' (the client leg reads them the same way);
//! how a head is written to a client is `crate::wire::server::response`'s.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::wire::fields::{FramingError, FramingFields};
use crate::wire::headers::{is_client_only, is_hop_by_hop, is_hop_by_hop_name, is_protected};
use crate::wire::scratch::{header_slots, with_spans, Span};

/// How the request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

/// Upper bound of a response head; a replica sending more is broken.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers a response head may have.
pub const MAX_HEADERS: usize = 128;
/// Longest field name a `HeaderName` holds.
const MAX_NAME: usize = (1 << 16) - 1;

/// What a replica is sent of a client's request: its head as the gateway forwards it (hop-by-hop
/// fields cut, `X-Forwarded-*` set) and its body's framing.
pub struct Forwarded<'a> {
    pub parts: &'a http::request::Parts,
    /// The client's address (`X-Forwarded-For`).
    pub client: SocketAddr,
    /// The client's scheme, `http` or `https` (`X-Forwarded-Proto`).
    pub proto: &'static str,
    pub framing: RequestFraming,
    /// The protocols the client asked to switch to (its `Upgrade`), when the request is
    /// forwarded as an upgrade: the replica is asked for them, and its `101` is the answer.
    pub upgrade: Option<&'a HeaderValue>,
}

/// Writes the head of `f` to send upstream. The host is the client's `Host`, else the target's
/// authority (HTTP/2's `:authority`, or an HTTP/1.0 request).
pub fn request_head(f: &Forwarded<'_>) -> BytesMut {
    let Forwarded {
        parts,
        client,
        proto,
        framing,
        upgrade,
    } = *f;
    let (method, headers) = (&parts.method, &parts.headers);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = parts.uri.authority().map(|a| a.as_str());
    // Sized once for all that is written, so it never grows: the client's headers as they are,
    // the host a second time (x-forwarded-host), and room for the request line's version, the
    // client's address and our framing.
    let from_client: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let host_len = headers
        .get(header::HOST)
        .map(HeaderValue::len)
        .or(authority.map(str::len))
        .unwrap_or(0);
    let mut out = BytesMut::with_capacity(
        method.as_str().len() + target.len() + from_client + 2 * host_len + 192,
    );
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");

    let named_in_connection = connection_tokens(headers);
    let mut host: Option<&[u8]> = None;
    let mut xff: Option<BytesMut> = None;
    for (name, value) in headers {
        if *name == header::HOST {
            if host.is_none() {
                host = Some(value.as_bytes());
            }
            continue;
        }
        if *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
            continue; // our own framing below
        }
        if name.as_str() == "x-forwarded-for" {
            let chain = xff.get_or_insert_with(|| BytesMut::with_capacity(64));
            let v = value.as_bytes().trim_ascii();
            if !v.is_empty() {
                if !chain.is_empty() {
                    chain.put_slice(b", ");
                }
                chain.put_slice(v);
            }
            continue;
        }
        if matches!(name.as_str(), "x-forwarded-proto" | "x-forwarded-host")
            || is_hop_by_hop(name)
            || is_client_only(name)
            || (!is_protected(name) && named_in_connection.iter().any(|n| n == name.as_str()))
        {
            continue;
        }
        put_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    let host = host.or(authority.map(str::as_bytes));
    if let Some(h) = host {
        put_header(&mut out, b"host", h);
        put_header(&mut out, b"x-forwarded-host", h);
    }
    out.put_slice(b"x-forwarded-for: ");
    if let Some(chain) = xff.filter(|c| !c.is_empty()) {
        out.put_slice(&chain);
        out.put_slice(b", ");
    }
    write_ip(&mut out, client);
    out.put_slice(b"\r\n");
    put_header(&mut out, b"x-forwarded-proto", proto.as_bytes());
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa::Buffer::new().format(n).as_bytes());
            out.put_slice(b"\r\n");
        }
        RequestFraming::Chunked => put_header(&mut out, b"transfer-encoding", b"chunked"),
    }
    // `Upgrade` and `Connection` are hop-by-hop: a request forwarded as an upgrade asks this
    // hop for the protocols the client asked for.
    if let Some(protocols) = upgrade {
        put_header(&mut out, b"connection", b"upgrade");
        put_header(&mut out, b"upgrade", protocols.as_bytes());
    }
    out.put_slice(b"\r\n");
    out
}

fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Writes the client's address as `X-Forwarded-For` carries it (HTTP/1.1's head and HTTP/2's
/// field alike).
pub(crate) fn write_ip(out: &mut BytesMut, client: SocketAddr) {
    use std::fmt::Write;
    struct W<'a>(&'a mut BytesMut);
    impl Write for W<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.put_slice(s.as_bytes());
            Ok(())
        }
    }
    match client.ip().to_canonical() {
        // Every request writes one: IPv4 by hand, without the formatting machinery (about 500
        // instructions a request went to `Display` here).
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.put_u8(b'.');
                }
                out.put_slice(digits.format(octet).as_bytes());
            }
        }
        v6 => {
            let _ = write!(W(out), "{v6}");
        }
    }
}

/// The lower-cased header names a `Connection` header lists.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    if !headers.contains_key(header::CONNECTION) {
        return Vec::new();
    }
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

pub use crate::wire::framing::BodyFraming;

/// A parsed response head, its fields in a `HeaderMap`.
#[derive(Debug)]
pub struct ResponseHead {
    pub parts: http::response::Parts,
    pub framing: BodyFraming,
    /// The connection may carry another request once this body is read.
    pub keep_alive: bool,
}

/// A parsed response head whose fields are still the replica's bytes ([`RawHead`]): what the
/// exchange reads. Its `HeaderMap` is built only for a consumer that needs one
/// ([`RawResponse::into_head`]); an HTTP/1 client is written the bytes.
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    /// Boxed: the response it goes with is moved from function to function on its way to the
    /// client, and the head in place cost more in copies (about 500 instructions a request)
    /// than its one allocation.
    pub raw: Box<RawHead>,
    pub framing: BodyFraming,
    /// The connection may carry another request once this body is read.
    pub keep_alive: bool,
}

impl RawResponse {
    /// The head with its fields in a `HeaderMap` (what a client over HTTP/2 and a `101`'s
    /// tunnel are given).
    pub fn into_head(self) -> ResponseHead {
        ResponseHead {
            parts: self.raw.parts(self.status),
            framing: self.framing,
            keep_alive: self.keep_alive,
        }
    }
}

/// Where a forwarded field lies in its head: its name's start and length, its value's.
type FieldAt = [u32; 4];

/// As many fields' places as a [`RawHead`] holds in itself (a replica's answer has a few;
/// more go to a `Vec`).
const FEW: usize = 8;

/// The places of a head's forwarded fields, in order.
#[derive(Debug, Clone)]
enum Places {
    Few(u8, [FieldAt; FEW]),
    Many(Vec<FieldAt>),
}

impl Places {
    /// Adds the place of a field of a head of `fields` fields (a list past [`FEW`] is made
    /// for all of them at once).
    fn push(&mut self, at: FieldAt, fields: usize) {
        match self {
            Places::Few(n, few) if usize::from(*n) < FEW => {
                few[usize::from(*n)] = at;
                *n += 1;
            }
            Places::Few(n, few) => {
                let mut many = Vec::with_capacity(fields.max(FEW + 1));
                many.extend_from_slice(&few[..usize::from(*n)]);
                many.push(at);
                *self = Places::Many(many);
            }
            Places::Many(many) => many.push(at),
        }
    }

    fn as_slice(&self) -> &[FieldAt] {
        match self {
            Places::Few(n, few) => &few[..usize::from(*n)],
            Places::Many(many) => many,
        }
    }
}

/// The fields of a replica's response head as the gateway forwards them, still in the bytes
/// the replica sent: the head, where each forwarded field's name and value lie in it (in the
/// replica's order and case), and the `Content-Length` relayed after them. Hop-by-hop fields,
/// the fields its `Connection` names and the framing fields are not among them (cut as the
/// parse reads them). Carried with the response (in its body, `super::UpstreamBody`) to a
/// client's HTTP/1 connection, whose writer copies the fields
/// (`crate::wire::server::response`); or turned into a `HeaderMap` ([`RawHead::headers`]) by
/// the same rules.
#[derive(Debug, Clone)]
pub struct RawHead {
    head: Bytes,
    fields: Places,
    /// The length relayed (the one the body is framed by), and where it lies in `head` when
    /// the replica wrote it as the gateway writes a length.
    length: Option<(u64, Option<[u32; 2]>)>,
    /// One of the fields is `Date`.
    date: bool,
}

impl RawHead {
    fn piece(&self, at: u32, len: u32) -> &[u8] {
        let (at, len) = (at as usize, len as usize);
        self.head.get(at..at + len).unwrap_or_default()
    }

    /// The forwarded fields, name and value, as the replica wrote them (the name in its case).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields
            .as_slice()
            .iter()
            .map(|&[n, nl, v, vl]| (self.piece(n, nl), self.piece(v, vl)))
    }

    /// The `Content-Length` relayed, as a number (it goes after the other fields).
    pub fn content_length(&self) -> Option<u64> {
        self.length.map(|(n, _)| n)
    }

    /// The replica sent a `Date`.
    pub fn has_date(&self) -> bool {
        self.date
    }

    /// The fields in a `HeaderMap`, as the parse gave them before heads were forwarded as
    /// bytes: names lower-cased, values slices of the head, the relayed `Content-Length` last,
    /// room for the service's `Via`.
    pub fn headers(&self) -> HeaderMap {
        let slice = |at: u32, len: u32| {
            let at = at as usize;
            self.head.slice(at..at + len as usize)
        };
        let places = self.fields.as_slice();
        let mut headers = HeaderMap::with_capacity(places.len() + 2);
        for &[n, nl, v, vl] in places {
            // Both were checked when the head was read; one that fails here is not added.
            let Ok(name) = HeaderName::from_bytes(self.piece(n, nl)) else {
                continue;
            };
            if let Ok(value) = HeaderValue::from_maybe_shared(slice(v, vl)) {
                headers.append(name, value);
            }
        }
        if let Some((n, at)) = self.length {
            let value = at
                .and_then(|[at, len]| HeaderValue::from_maybe_shared(slice(at, len)).ok())
                // `5, 5` or `005`: the value, as the gateway writes a length (a rare allocation).
                .unwrap_or_else(|| HeaderValue::from(n));
            headers.append(header::CONTENT_LENGTH, value);
        }
        headers
    }

    /// The parts of a response of `status` with these fields in its `HeaderMap`.
    pub fn parts(&self, status: StatusCode) -> http::response::Parts {
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = Version::HTTP_11;
        parts.headers = self.headers();
        parts
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the replica sent a malformed response head: {0}")]
    Malformed(String),
    #[error("the replica's response head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    /// `Content-Length` or `Transfer-Encoding` that the strict rules both legs share refuse.
    #[error("the replica's response states its body length wrongly: {0}")]
    Framing(#[from] FramingError),
    /// `101 Switching Protocols` to a request that asked for no upgrade: what follows on the
    /// connection is another protocol's, and no HTTP/1 response.
    #[error("the replica switched protocols (101) for a request that asked for no upgrade")]
    UnaskedSwitch,
}

/// Parses a response head at the start of `buf`: `Ok(None)` when more bytes are needed. A
/// complete head is split off the buffer (the body follows in it) and the header values are
/// slices of it: no copy of the head, no allocation for the values.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, HeadError> {
    with_spans(|spans| {
        let mut headers: Option<HeaderMap> = None;
        let keep = |head: &Bytes, fields: usize, (n, nl): Span, (v, vl): Span| {
            let raw_name = &head[n..n + nl];
            let name = HeaderName::from_bytes(raw_name).map_err(|_| {
                HeadError::Malformed(format!(
                    "bad header name {:?}",
                    String::from_utf8_lossy(raw_name)
                ))
            })?;
            let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
                .map_err(|_| HeadError::Malformed(format!("bad value of {name}")))?;
            // One more than the replica sent: the service adds `Via` without growing the map.
            headers
                .get_or_insert_with(|| HeaderMap::with_capacity(fields + 1))
                .append(name, value);
            Ok(())
        };
        let Some(p) = parse_response_with(buf, method, spans, keep)? else {
            return Ok(None);
        };
        let mut headers = headers.unwrap_or_default();
        if let Some((n, at)) = p.length {
            let value = match at {
                Some((at, len)) => HeaderValue::from_maybe_shared(p.head.slice(at..at + len))
                    .map_err(|_| HeadError::Malformed("bad value of content-length".into()))?,
                // `5, 5` or `005`: the value, as the gateway writes a length (a rare allocation).
                None => HeaderValue::from(n),
            };
            headers.append(header::CONTENT_LENGTH, value);
        }
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = p.status;
        parts.version = Version::HTTP_11;
        parts.headers = headers;
        Ok(Some(ResponseHead {
            parts,
            framing: p.framing,
            keep_alive: p.keep_alive,
        }))
    })
}

/// [`parse_response`] without the `HeaderMap`: the fields stay where they are in the head
/// (split off the buffer), the ones not forwarded cut by the same rules.
pub fn parse_raw_response(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<RawResponse>, HeadError> {
    with_spans(|spans| {
        let mut kept = Places::Few(0, [[0; 4]; FEW]);
        let keep = |_: &Bytes, fields: usize, name: Span, value: Span| {
            kept.push(place(name, value)?, fields);
            Ok(())
        };
        let Some(p) = parse_response_with(buf, method, spans, keep)? else {
            return Ok(None);
        };
        let length = match p.length {
            Some((n, Some((at, len)))) => Some((n, Some([narrow(at)?, narrow(len)?]))),
            Some((n, None)) => Some((n, None)),
            None => None,
        };
        let raw = Box::new(RawHead {
            head: p.head,
            fields: kept,
            length,
            date: p.date,
        });
        Ok(Some(RawResponse {
            status: p.status,
            raw,
            framing: p.framing,
            keep_alive: p.keep_alive,
        }))
    })
}

/// A response head read, its forwarded fields given to the parse's caller one by one.
struct Parsed {
    status: StatusCode,
    /// The head, split off the buffer.
    head: Bytes,
    framing: BodyFraming,
    keep_alive: bool,
    /// The length relayed (the one the body is framed by), and where it lies in `head` when
    /// the replica wrote it as the gateway writes a length.
    length: Option<(u64, Option<Span>)>,
    /// One of the forwarded fields is `Date`.
    date: bool,
}

/// What httparse reads of a response head (its fields' spans go to the caller's list).
struct Scanned {
    /// The head's length in the buffer.
    len: usize,
    status: StatusCode,
    version: Version,
    /// The fields its `Connection` names, lower-cased.
    named: Vec<String>,
}

/// Reads the response head at the start of `buf` with httparse; `None` while it is not whole.
fn scan_response(
    buf: &BytesMut,
    spans: &mut Vec<(Span, Span)>,
) -> Result<Option<Scanned>, HeadError> {
    let mut slots = header_slots::<MAX_HEADERS>();
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| HeadError::Malformed("no valid status code".into()))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let named: Vec<String> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    spans.extend(
        resp.headers
            .iter()
            .map(|h| (span(h.name.as_bytes()), span(h.value))),
    );
    Ok(Some(Scanned {
        len,
        status,
        version,
        named,
    }))
}

/// A place in a head as a [`RawHead`] keeps it (a head is far shorter than 4 GiB).
fn narrow(n: usize) -> Result<u32, HeadError> {
    u32::try_from(n).map_err(|_| HeadError::TooLarge)
}

/// A field's place in a head as a [`RawHead`] keeps it.
fn place((n, nl): Span, (v, vl): Span) -> Result<FieldAt, HeadError> {
    Ok([narrow(n)?, narrow(nl)?, narrow(v)?, narrow(vl)?])
}

/// Reads the response head at the start of `buf` (`None` while it is not whole), splits it
/// off, and gives each field it forwards to `keep` (with the head, how many fields it has, and
/// where the field's name and value lie), in order: the one place that decides which fields
/// cross the gateway, for the map and for the bytes alike.
fn parse_response_with(
    buf: &mut BytesMut,
    method: &Method,
    spans: &mut Vec<(Span, Span)>,
    mut keep: impl FnMut(&Bytes, usize, Span, Span) -> Result<(), HeadError>,
) -> Result<Option<Parsed>, HeadError> {
    let Some(Scanned {
        len,
        status,
        version,
        named,
    }) = scan_response(buf, spans)?
    else {
        return Ok(None);
    };
    let head = buf.split_to(len).freeze();
    let mut keep_alive = match version {
        Version::HTTP_10 => named.iter().any(|t| t == "keep-alive"),
        _ => !named.iter().any(|t| t == "close"),
    };
    let mut fields = FramingFields::default();
    // Where the first `Content-Length` value lies: relayed as it is when it is written as the
    // gateway would write it (no allocation), else the gateway writes the length it framed.
    let mut length_at: Option<Span> = None;
    let mut date = false;
    for &(name_at @ (n, n_len), value_at @ (v, v_len)) in spans.iter() {
        let name = &head[n..n + n_len];
        let value = &head[v..v + v_len];
        // httparse takes only tokens for names and only what a `HeaderValue` may hold for
        // values (RFC 9110's field-vchar, SP, HTAB, obs-text), the rules `http` applies; a
        // name's length is the one thing left to check.
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(HeadError::Malformed(format!(
                "bad header name {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            fields.transfer_encoding(value)?;
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            fields.content_length(value)?;
            length_at.get_or_insert(value_at);
            continue;
        }
        // A `101` says which protocol it switched to: its `Upgrade` goes on to the client, whose
        // side of the tunnel switches too.
        let switched_to = status == http::StatusCode::SWITCHING_PROTOCOLS
            && name.eq_ignore_ascii_case(b"upgrade");
        if !switched_to
            && (is_hop_by_hop_name(name)
                || named
                    .iter()
                    .any(|t| t.as_bytes().eq_ignore_ascii_case(name)))
        {
            continue;
        }
        date |= name.eq_ignore_ascii_case(b"date");
        keep(&head, spans.len(), name_at, value_at)?;
    }
    // RFC 9112 §6.1: an HTTP/1.0 message with a coding is faulty framing, whatever it says.
    if version == Version::HTTP_10 && fields.transfer_coded() {
        return Err(FramingError::CodingInHttp10.into());
    }
    let code = status.as_u16();
    let bodiless =
        *method == Method::HEAD || (100..200).contains(&code) || code == 204 || code == 304;
    let framing = match bodiless {
        true => BodyFraming::Empty,
        false => fields.response_framing(),
    };
    // A coding that does not end in chunked is read until the replica closes (RFC 9112 §6.3),
    // so the connection cannot carry another request, whatever the method or status.
    if framing == BodyFraming::UntilClose
        || (fields.transfer_coded() && fields.response_framing() == BodyFraming::UntilClose)
    {
        keep_alive = false;
    }
    // The length relayed is the one the body is framed by (a HEAD or 304 answer states the
    // length a GET would have had); a coding overrides any length, which then never reaches
    // the client (RFC 9112 §6.3), and 1xx and 204 answers have none (RFC 9110 §8.6).
    let relayed = match framing {
        BodyFraming::Length(n) => Some(n),
        BodyFraming::Empty if !fields.transfer_coded() && code >= 200 && code != 204 => {
            fields.length()
        }
        _ => None,
    };
    let length_at = length_at.filter(|_| fields.length_is_canonical());
    Ok(Some(Parsed {
        status,
        head,
        framing,
        keep_alive,
        length: relayed.map(|n| (n, length_at)),
        date,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for ip in [
            "10.0.0.7",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "2001:db8::5",
            "::ffff:192.0.2.1",
        ] {
            let addr = SocketAddr::new(ip.parse().expect("an address"), 1);
            let mut out = BytesMut::new();
            write_ip(&mut out, addr);
            let expected = addr.ip().to_canonical().to_string();
            assert_eq!(std::str::from_utf8(&out).expect("ascii"), expected, "{ip}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn head(pairs: &[(&str, &str)], framing: RequestFraming) -> String {
        let (mut parts, ()) = http::Request::builder()
            .method(Method::GET)
            .uri("http://fallback.test/x?id=1")
            .body(())
            .expect("request")
            .into_parts();
        parts.headers = map(pairs);
        let b = request_head(&Forwarded {
            parts: &parts,
            client: "[::ffff:10.0.0.7]:999".parse().expect("addr"),
            proto: "http",
            framing,
            upgrade: None,
        });
        String::from_utf8(b.to_vec()).expect("utf8")
    }

    #[test]
    fn the_forwarded_head_keeps_the_message_and_drops_the_hop() {
        let h = head(
            &[
                ("host", "example.test"),
                ("connection", "keep-alive, x-secret, host"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("x-keep", "yes"),
                ("proxy", "http://evil"),
                ("forwarded", "for=1.2.3.4"),
                ("x-real-ip", "1.2.3.4"),
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
                ("transfer-encoding", "chunked"),
                ("content-length", "99"),
                ("te", "trailers"),
            ],
            RequestFraming::Length(3),
        );
        assert!(h.starts_with("GET /x?id=1 HTTP/1.1\r\n"), "{h}");
        assert!(h.ends_with("\r\n\r\n"));
        let lines: Vec<&str> = h.lines().collect();
        for want in [
            "x-keep: yes",
            "host: example.test",
            "x-forwarded-host: example.test",
            "x-forwarded-for: 203.0.113.9, 10.0.0.7",
            "x-forwarded-proto: http",
            "content-length: 3",
        ] {
            assert!(lines.contains(&want), "{want} missing in {h}");
        }
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "proxy:",
            "forwarded:",
            "x-real-ip",
            "te:",
            "transfer-encoding",
            "content-length: 99",
            "https",
        ] {
            assert!(!h.contains(gone), "{gone} forwarded in {h}");
        }
    }

    #[test]
    fn host_falls_back_to_the_authority_and_chains_join() {
        let h = head(
            &[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
            ],
            RequestFraming::Chunked,
        );
        assert!(h.contains("host: fallback.test\r\n"), "{h}");
        assert!(
            h.contains("x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.7\r\n"),
            "{h}"
        );
        assert!(h.contains("transfer-encoding: chunked\r\n"), "{h}");
        let h = head(&[], RequestFraming::None);
        assert!(h.contains("x-forwarded-for: 10.0.0.7\r\n"), "{h}");
        assert!(!h.contains("content-length"), "{h}");
    }

    #[test]
    fn response_framing_and_reuse() {
        let get = Method::GET;
        let p = |raw: &str| {
            parse_response(&mut BytesMut::from(raw), &get)
                .expect("parses")
                .expect("complete")
        };
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello");
        let r = parse_response(&mut buf, &get)
            .expect("parses")
            .expect("complete");
        assert_eq!(r.framing, BodyFraming::Length(5));
        assert!(r.keep_alive);
        assert_eq!(&buf[..], b"hello", "the head is split off, the body stays");
        assert_eq!(r.parts.headers["x-a"], "1");
        let r = p("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\nconnection: close, x-hop\r\nx-hop: 1\r\nkeep-alive: 5\r\n\r\n");
        assert_eq!(r.framing, BodyFraming::Chunked);
        assert!(!r.keep_alive);
        assert!(r.parts.headers.is_empty(), "{:?}", r.parts.headers);
        let r = p("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(r.framing, BodyFraming::UntilClose);
        assert!(!r.keep_alive);
        let r = p("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!r.keep_alive, "HTTP/1.0 closes by default");
        let r = p("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(r.framing, BodyFraming::Empty);
        assert!(r.keep_alive);
        let r = parse_response(
            &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..]),
            &Method::HEAD,
        )
        .expect("parses")
        .expect("complete");
        assert_eq!(r.framing, BodyFraming::Empty);
    }

    #[test]
    fn the_framing_fields_follow_the_table_both_legs_share() {
        for case in crate::wire::fields::cases::FRAMING {
            let wire = format!("HTTP/1.1 200 OK\r\n{}\r\n", case.lines);
            let parsed = parse_response(&mut BytesMut::from(wire.as_str()), &Method::GET);
            let framing = match parsed {
                Ok(Some(r)) => {
                    // The length relayed is the one framed, written as the gateway writes it.
                    let relayed = r.parts.headers.get_all(header::CONTENT_LENGTH);
                    let relayed: Vec<_> = relayed.iter().collect();
                    match r.framing {
                        BodyFraming::Length(n) => {
                            assert_eq!(relayed, [n.to_string().as_str()], "{wire:?}")
                        }
                        _ => assert!(relayed.is_empty(), "{wire:?}: {relayed:?}"),
                    }
                    if r.framing == BodyFraming::UntilClose {
                        assert!(!r.keep_alive, "{wire:?}");
                    }
                    Ok(r.framing)
                }
                Ok(None) => panic!("{wire:?} is whole"),
                Err(HeadError::Framing(e)) => Err(e),
                Err(other) => panic!("{wire:?}: {other:?}"),
            };
            assert_eq!(framing, case.response, "{wire:?}");
        }
    }

    #[test]
    fn a_bodiless_answer_keeps_the_length_it_states_when_it_may_state_one() {
        let parse = |raw: &str, method: &Method| {
            parse_response(&mut BytesMut::from(raw), method)
                .expect("parses")
                .expect("complete")
        };
        let head = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 01234\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(head.framing, BodyFraming::Empty);
        assert_eq!(head.parts.headers[header::CONTENT_LENGTH], "1234");
        let no_content = parse(
            "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(no_content.parts.headers.is_empty());
        assert_eq!(
            parse_response(
                &mut BytesMut::from("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
                &Method::GET
            )
            .err(),
            Some(HeadError::Framing(FramingError::CodingInHttp10))
        );
        let coded = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 5\r\n\r\n",
            &Method::HEAD,
        );
        assert!(
            !coded.keep_alive,
            "a body read until close would have followed"
        );
        assert!(coded.parts.headers.is_empty());
    }

    #[test]
    fn partial_malformed_and_oversized_heads() {
        let get = Method::GET;
        assert!(parse_response(
            &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]),
            &get
        )
        .expect("partial is fine")
        .is_none());
        assert!(matches!(
            parse_response(&mut BytesMut::from(&b"NOT HTTP\r\n\r\n"[..]), &get),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(
                &mut BytesMut::from(
                    &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..]
                ),
                &get
            ),
            Err(HeadError::Framing(FramingError::ConflictingLengths))
        ));
        let big = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            parse_response(&mut BytesMut::from(big.as_str()), &get).err(),
            Some(HeadError::TooLarge)
        );
    }

    fn raw(wire: &str, method: &Method) -> RawResponse {
        parse_raw_response(&mut BytesMut::from(wire), method)
            .expect("parses")
            .expect("complete")
    }

    /// A raw head's forwarded fields, as text.
    fn texts(raw: &RawHead) -> Vec<(String, String)> {
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("ascii");
        raw.fields().map(|(n, v)| (text(n), text(v))).collect()
    }

    #[test]
    fn a_raw_head_keeps_the_replica_fields_in_their_order_and_case_and_cuts_the_hop() {
        let wire = "HTTP/1.1 200 OK\r\n\
            X-Mixed-Case: Kept\r\n\
            Set-Cookie: a=1\r\n\
            CONNECTION: close, X-Hop\r\n\
            x-hop: cut\r\n\
            Keep-Alive: timeout=5\r\n\
            X-Between:   2  \r\n\
            Set-Cookie: b=2\r\n\
            Content-Length: 2\r\n\
            Proxy-Connection: keep-alive\r\n\
            Proxy-Authenticate: Basic\r\n\
            Trailer: x-t\r\n\
            Upgrade: h2c\r\n\
            TE: trailers\r\n\
            date: Mon, 07 Dec 2026 10:00:00 GMT\r\n\
            \r\n";
        let r = raw(wire, &Method::GET);
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.framing, BodyFraming::Length(2));
        assert!(!r.keep_alive, "its Connection said close");
        let fields = texts(&r.raw);
        let want = [
            ("X-Mixed-Case", "Kept"),
            ("Set-Cookie", "a=1"),
            ("X-Between", "2"),
            ("Set-Cookie", "b=2"),
            ("date", "Mon, 07 Dec 2026 10:00:00 GMT"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(fields, want);
        assert_eq!(r.raw.content_length(), Some(2));
        assert!(r.raw.has_date());
        // The map built from it is the one the parse builds: the same fields, lower-cased,
        // the length last.
        let map = parse_response(&mut BytesMut::from(wire), &Method::GET)
            .expect("parses")
            .expect("complete")
            .parts
            .headers;
        assert_eq!(r.raw.headers(), map);
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "x-mixed-case",
                "set-cookie",
                "x-between",
                "date",
                "content-length"
            ]
        );
        assert_eq!(map[header::CONTENT_LENGTH], "2");
    }

    #[test]
    fn a_raw_head_relays_the_length_it_framed_and_states_no_date_it_lacks() {
        // `005`: the length is relayed as the gateway writes it.
        let r = raw(
            "HTTP/1.1 200 OK\r\ncontent-length: 005\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(r.raw.content_length(), Some(5));
        assert_eq!(r.raw.headers()[header::CONTENT_LENGTH], "5");
        assert!(!r.raw.has_date());
        assert_eq!(r.raw.fields().count(), 0);
        // A coding overrides the length, which never reaches the client.
        let r = raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(r.framing, BodyFraming::Chunked);
        assert_eq!(r.raw.content_length(), None);
        // A HEAD answer states the length a GET would have had; a 204 none.
        let r = raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(
            (r.framing, r.raw.content_length()),
            (BodyFraming::Empty, Some(7))
        );
        let r = raw(
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(r.raw.content_length(), None);
        // A `101` keeps its `Upgrade`, for the client's side of the tunnel.
        let r = raw(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            &Method::GET,
        );
        let fields: Vec<_> = r.raw.fields().collect();
        assert_eq!(fields, [(&b"Upgrade"[..], &b"websocket"[..])]);
    }

    #[test]
    fn a_raw_head_with_more_fields_than_it_holds_in_itself_keeps_them_all_in_order() {
        let names: Vec<String> = (0..3 * FEW).map(|i| format!("X-Field-{i}")).collect();
        let mut wire = String::from("HTTP/1.1 200 OK\r\n");
        for (i, name) in names.iter().enumerate() {
            wire.push_str(&format!(
                "{name}: {i}\r\nconnection: x-cut-{i}\r\nx-cut-{i}: no\r\n"
            ));
        }
        wire.push_str("content-length: 0\r\n\r\n");
        let r = raw(&wire, &Method::GET);
        let got = texts(&r.raw);
        let want: Vec<(String, String)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i.to_string()))
            .collect();
        assert_eq!(got, want);
        let map = parse_response(&mut BytesMut::from(wire.as_str()), &Method::GET)
            .expect("parses")
            .expect("complete")
            .parts
            .headers;
        assert_eq!(r.raw.headers(), map);
        assert_eq!(map.len(), 3 * FEW + 1);
    }

    #[test]
    fn odd_heads_are_refused_as_bytes_as_they_were_as_a_map() {
        let cases: [&[u8]; 6] = [
            // obs-fold: a field continued on the next line.
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n  folded\r\ncontent-length: 0\r\n\r\n",
            // A space before the colon, a name that is no token, an empty name.
            b"HTTP/1.1 200 OK\r\nx-a : 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx(a): 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n: 1\r\n\r\n",
            // DEL and NUL in a value.
            b"HTTP/1.1 200 OK\r\nx-a: a\x7fb\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\n\r\n",
        ];
        for wire in cases {
            let raw = parse_raw_response(&mut BytesMut::from(wire), &Method::GET);
            assert!(
                matches!(raw, Err(HeadError::Malformed(_))),
                "{:?}: {raw:?}",
                String::from_utf8_lossy(wire)
            );
            let map = parse_response(&mut BytesMut::from(wire), &Method::GET);
            assert!(matches!(map, Err(HeadError::Malformed(_))), "{map:?}");
        }
        // obs-text (bytes past ASCII) is a value's as it was.
        let r = raw("HTTP/1.1 200 OK\r\nx-a: caf\u{e9}\r\n\r\n", &Method::GET);
        assert_eq!(r.raw.headers()["x-a"].as_bytes(), "caf\u{e9}".as_bytes());
    }
}
