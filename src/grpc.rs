//! gRPC as the gateway sees it: which requests are calls, their deadline, the statuses the
//! gateway answers with, and the few messages it writes itself.
//!
//! Owns: [`is_grpc`] (`content-type: application/grpc*`), [`timeout`] (the `grpc-timeout`
//! header, parsed), [`TimeLimit`] (which limit bounds a request: `proxy.request_timeout` or the
//! call's own shorter `grpc-timeout`, named as such in messages), [`Code`] (the status codes the gateway produces), [`trailers_only`] (a
//! gateway error as a gRPC client expects it: HTTP 200, `grpc-status` and `grpc-message` in a
//! headers-only response), [`frame`] (the 5-byte message prefix) and the
//! `grpc.health.v1.Health/Check` messages ([`health_request`], [`health_serving`]), encoded by
//! hand: two one-field messages do not need a protobuf crate.
//! Must not touch: connections, routing or which error maps to which code (the rescue module
//! decides that); it is all pure.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

/// Whether a request is a gRPC call: its `content-type` is `application/grpc` or one of its
/// subtypes (`application/grpc+proto`); `application/grpc-web` is not (it works over HTTP/1).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
}

fn is_grpc_content_type(v: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    v.len() >= GRPC.len()
        && v[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The call's deadline from its `grpc-timeout` header (`<at most 8 digits><unit>`, units
/// `H M S m u n`), or `None` when it has none or it is malformed (then it does not bound the
/// call, as gRPC servers treat it).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time limit a request runs under, and which one it is, so a message names what ran
/// out: `proxy.request_timeout`, or a gRPC call's own `grpc-timeout` where it is shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimit {
    /// `proxy.request_timeout`.
    RequestTimeout(Duration),
    /// The call's `grpc-timeout`.
    GrpcTimeout(Duration),
}

impl TimeLimit {
    /// The shorter of `request_timeout` and the call's `grpc_timeout` (the request timeout
    /// when they are equal).
    pub fn of(request_timeout: Duration, grpc_timeout: Option<Duration>) -> TimeLimit {
        match grpc_timeout {
            Some(t) if t < request_timeout => TimeLimit::GrpcTimeout(t),
            _ => TimeLimit::RequestTimeout(request_timeout),
        }
    }

    pub fn duration(self) -> Duration {
        match self {
            TimeLimit::RequestTimeout(d) | TimeLimit::GrpcTimeout(d) => d,
        }
    }
}

impl std::fmt::Display for TimeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeLimit::RequestTimeout(d) => write!(f, "proxy.request_timeout ({d:?})"),
            TimeLimit::GrpcTimeout(d) => write!(f, "the call's grpc-timeout ({d:?})"),
        }
    }
}

/// The gRPC status codes the gateway answers with (the rest are the replicas').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// A headers-only ("trailers-only") gRPC response with status `code` and `message`: HTTP 200,
/// `content-type: application/grpc`, and `grpc-status`/`grpc-message` in the one header block
/// that ends the stream, so the client sees a status, never an HTTP error.
pub fn trailers_only<B: Default>(code: Code, message: &str) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::OK;
    *resp.headers_mut() = status_fields(code, message);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// `grpc-status` and `grpc-message` fields for `code` and `message` (trailers, or the head of a
/// trailers-only answer).
pub fn status_fields(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(m) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", m);
    }
    h
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 spec): every byte outside printable ASCII,
/// and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One gRPC message on the wire: not compressed, its length, then itself.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The first whole message in `buf` (a body's bytes), if one is there.
pub fn first_message(buf: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
    buf.get(5..5 + usize::try_from(len).ok()?)
}

/// `grpc.health.v1.HealthCheckRequest { service }`, framed.
pub fn health_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    frame(&msg)
}

/// Whether a `grpc.health.v1.HealthCheckResponse` says `SERVING` (its field 1, an enum, is 1).
/// Unknown fields are skipped, as protobuf readers do.
pub fn health_serving(msg: &[u8]) -> bool {
    let mut status = 0;
    let mut rest = msg;
    while let Some((key, after)) = varint(rest) {
        let (field, wire) = (key >> 3, key & 7);
        rest = match wire {
            0 => {
                let Some((v, after)) = varint(after) else {
                    return false;
                };
                if field == 1 {
                    status = v;
                }
                after
            }
            1 => after.get(8..).unwrap_or_default(),
            2 => {
                let Some((len, after)) = varint(after) else {
                    return false;
                };
                let Some(next) = usize::try_from(len).ok().and_then(|l| after.get(l..)) else {
                    return false;
                };
                next
            }
            5 => after.get(4..).unwrap_or_default(),
            _ => return false,
        };
    }
    status == 1
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &buf[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn grpc_calls_are_told_by_content_type() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
        ] {
            assert!(is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpcx",
            "application/json",
        ] {
            assert!(!is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        assert!(!is_grpc(&headers(&[])));
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_malformed_ones_do_not_bound() {
        let t = |v| timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "1 S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(timeout(&headers(&[])), None);
    }

    #[test]
    fn the_time_limit_is_the_shorter_one_and_says_which() {
        let (thirty, half) = (Duration::from_secs(30), Duration::from_millis(500));
        let call = TimeLimit::of(thirty, Some(half));
        assert_eq!(call, TimeLimit::GrpcTimeout(half));
        assert_eq!(call.to_string(), "the call's grpc-timeout (500ms)");
        let request = TimeLimit::of(half, Some(thirty));
        assert_eq!(request, TimeLimit::RequestTimeout(half));
        assert_eq!(request.to_string(), "proxy.request_timeout (500ms)");
        assert_eq!(
            TimeLimit::of(thirty, None),
            TimeLimit::RequestTimeout(thirty)
        );
        assert_eq!(call.duration(), half);
    }

    #[test]
    fn a_gateway_status_is_a_trailers_only_200() {
        let resp: Response<()> = trailers_only(Code::Unavailable, "no replica: 100% down\n");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["grpc-message"], "no replica: 100%25 down%0A");
    }

    #[test]
    fn health_messages_round_trip_by_hand() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        let r = health_request("demo");
        assert_eq!(&r[..], &[0, 0, 0, 0, 6, 0x0a, 4, b'd', b'e', b'm', b'o']);
        assert_eq!(
            first_message(&r),
            Some(&[0x0a, 4, b'd', b'e', b'm', b'o'][..])
        );
        assert_eq!(first_message(&r[..7]), None, "cut short");
        assert!(health_serving(&[0x08, 1]));
        assert!(!health_serving(&[0x08, 2]), "NOT_SERVING");
        assert!(!health_serving(&[]), "UNKNOWN");
        assert!(
            health_serving(&[0x12, 2, b'x', b'y', 0x08, 1]),
            "unknown fields skipped"
        );
        assert!(!health_serving(&[0x08]), "cut short");
    }
}
