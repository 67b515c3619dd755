//! One access log line: a [`Record`] written as JSON or in the `combined` format.
//!
//! Owns: the fields of a line, their order and escaping (header values are raw bytes: any byte
//! outside printable ASCII is written `\xHH`, as NGINX does, in both formats), and UTC timestamps (RFC 3339 for JSON,
//! `[02/Dec/2026:06:01:33 +0000]` for combined), all as pure functions appending to a buffer.
//! Must not touch: I/O or time sources; the caller gives the record and its timestamp.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AccessFormat;

/// Longest path (with query), user agent or referer written; longer ones are cut and marked.
pub const MAX_FIELD: usize = 4096;

/// What one line says about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: &'a str,
    /// Path and query, as the client sent them.
    pub path: &'a str,
    pub protocol: &'a str,
    /// `http` or `https` (TLS terminated by the gateway), like NGINX's `$scheme`.
    pub scheme: &'a str,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// From the request's arrival to its response's last byte (or the abort).
    pub duration: Duration,
    /// Time to the replica's response headers, when a replica answered.
    pub upstream: Option<Duration>,
    pub replica: Option<&'a str>,
    pub slot: Option<u32>,
    pub retries: u32,
    pub termination: &'a str,
    /// Header values as the client sent them: bytes, which need not be ASCII or UTF-8.
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
}

/// The calendar date and time (UTC) of `t`: year, month, day, hour, minute, second, millisecond.
pub fn utc(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
        d.subsec_millis(),
    )
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

// Lines are written by hand rather than through `core::fmt`, which costs about a microsecond a
// line: this runs on the serving thread for every request.

/// `n` in decimal.
fn num(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `n` in decimal, zero-padded to `width` digits (wider numbers are written whole).
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut m = n;
    while m > 0 {
        i -= 1;
        digits[i] = b'0' + (m % 10) as u8;
        m /= 10;
    }
    let start = i.min(digits.len() - width.min(20));
    out.extend_from_slice(&digits[start..]);
}

/// `d` as a decimal number of `unit`s (1000: milliseconds, 1: seconds) with three or six
/// decimals: exact, no floating point.
fn fixed(out: &mut Vec<u8>, d: Duration, seconds: bool) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    if seconds {
        num(out, us / 1_000_000);
        out.push(b'.');
        padded(out, us % 1_000_000, 6);
    } else {
        num(out, us / 1000);
        out.push(b'.');
        padded(out, us % 1000, 3);
    }
}

fn ip(out: &mut Vec<u8>, addr: std::net::IpAddr) {
    match addr.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                num(out, u64::from(octet));
            }
        }
        v6 => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn client(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => ip(out, std::net::IpAddr::V4(*a.ip())),
        SocketAddr::V6(a) => {
            out.push(b'[');
            let _ = write!(out, "{}", a.ip());
            out.push(b']');
        }
    }
    out.push(b':');
    num(out, u64::from(addr.port()));
}

/// `b` cut to [`MAX_FIELD`] bytes.
fn cut_bytes(b: &[u8]) -> &[u8] {
    &b[..b.len().min(MAX_FIELD)]
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `\xHH` for byte `b`.
fn hex_escape(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 15)],
    ]);
}

fn cut(s: &str) -> &str {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A JSON string; text that needs no escaping (the common case) is copied as it is.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let s = cut(s);
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A header value as a JSON string: the same text the combined format shows (bytes outside
/// printable ASCII and `\` as `\xHH`), so a line is valid UTF-8 JSON whatever the client sent
/// and the escape is unambiguous; `"` is JSON's to escape.
fn json_header(out: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(value) = value else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    for &b in cut_bytes(value) {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            // The backslash of `\xHH`, escaped for JSON.
            b'\\' | 0..=0x1f | 0x7f..=0xff => {
                out.push(b'\\');
                hex_escape(out, b);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Appends `r` as one JSON line.
pub fn json(out: &mut Vec<u8>, r: &Record<'_>) {
    let (y, mo, d, h, mi, s, ms) = utc(r.time);
    out.extend_from_slice(b"{\"time\":\"");
    padded(out, y.max(0) as u64, 4);
    out.push(b'-');
    padded(out, u64::from(mo), 2);
    out.push(b'-');
    padded(out, u64::from(d), 2);
    out.push(b'T');
    padded(out, u64::from(h), 2);
    out.push(b':');
    padded(out, u64::from(mi), 2);
    out.push(b':');
    padded(out, u64::from(s), 2);
    out.push(b'.');
    padded(out, u64::from(ms), 3);
    out.extend_from_slice(b"Z\",\"client\":\"");
    client(out, r.client);
    out.extend_from_slice(b"\",\"method\":");
    json_str(out, r.method);
    out.extend_from_slice(b",\"path\":");
    json_str(out, r.path);
    out.extend_from_slice(b",\"protocol\":");
    json_str(out, r.protocol);
    out.extend_from_slice(b",\"scheme\":");
    json_str(out, r.scheme);
    out.extend_from_slice(b",\"status\":");
    num(out, u64::from(r.status));
    out.extend_from_slice(b",\"bytes\":");
    num(out, r.bytes);
    out.extend_from_slice(b",\"duration_ms\":");
    fixed(out, r.duration, false);
    out.extend_from_slice(b",\"upstream_ms\":");
    match r.upstream {
        Some(u) => fixed(out, u, false),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"replica\":");
    json_opt(out, r.replica);
    out.extend_from_slice(b",\"slot\":");
    match r.slot {
        Some(s) => num(out, u64::from(s)),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"retries\":");
    num(out, u64::from(r.retries));
    out.extend_from_slice(b",\"termination\":");
    json_str(out, r.termination);
    out.extend_from_slice(b",\"referer\":");
    json_header(out, r.referer);
    out.extend_from_slice(b",\"user_agent\":");
    json_header(out, r.user_agent);
    out.extend_from_slice(b"}\n");
}

/// `s` escaped for a quoted field of the combined format: `"`, `\` and bytes outside printable
/// ASCII as `\xHH`, as NGINX writes them, so a client cannot forge a line or a field.
fn escaped(out: &mut Vec<u8>, s: &[u8]) {
    for &b in cut_bytes(s) {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            hex_escape(out, b);
        } else {
            out.push(b);
        }
    }
}

fn quoted(out: &mut Vec<u8>, s: Option<&[u8]>) {
    out.push(b'"');
    match s {
        None | Some(b"") => out.push(b'-'),
        Some(s) => escaped(out, s),
    }
    out.push(b'"');
}

/// Appends `r` in NGINX's `combined` format, then ringgate's fields as `key=value`.
pub fn combined(out: &mut Vec<u8>, r: &Record<'_>) {
    let (y, mo, d, h, mi, s, _) = utc(r.time);
    let month = MONTHS[(mo as usize).saturating_sub(1).min(11)];
    ip(out, r.client.ip());
    out.extend_from_slice(b" - - [");
    padded(out, u64::from(d), 2);
    out.push(b'/');
    out.extend_from_slice(month.as_bytes());
    out.push(b'/');
    padded(out, y.max(0) as u64, 4);
    out.push(b':');
    padded(out, u64::from(h), 2);
    out.push(b':');
    padded(out, u64::from(mi), 2);
    out.push(b':');
    padded(out, u64::from(s), 2);
    out.extend_from_slice(b" +0000] \"");
    escaped(out, r.method.as_bytes());
    out.push(b' ');
    escaped(out, r.path.as_bytes());
    out.push(b' ');
    escaped(out, r.protocol.as_bytes());
    out.extend_from_slice(b"\" ");
    num(out, u64::from(r.status));
    out.push(b' ');
    num(out, r.bytes);
    out.push(b' ');
    quoted(out, r.referer);
    out.push(b' ');
    quoted(out, r.user_agent);
    out.extend_from_slice(b" rt=");
    fixed(out, r.duration, true);
    out.extend_from_slice(b" urt=");
    match r.upstream {
        Some(u) => fixed(out, u, true),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" replica=");
    escaped(out, r.replica.unwrap_or("-").as_bytes());
    out.extend_from_slice(b" slot=");
    match r.slot {
        Some(s) => num(out, u64::from(s)),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" retries=");
    num(out, u64::from(r.retries));
    out.extend_from_slice(b" term=");
    out.extend_from_slice(r.termination.as_bytes());
    out.extend_from_slice(b" scheme=");
    out.extend_from_slice(r.scheme.as_bytes());
    out.push(b'\n');
}

/// Appends `r` in `format`.
pub fn write(out: &mut Vec<u8>, format: AccessFormat, r: &Record<'_>) {
    match format {
        AccessFormat::Json => json(out, r),
        AccessFormat::Combined => combined(out, r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            // 2026-12-02T06:01:33.250Z
            time: UNIX_EPOCH + Duration::from_millis(1_796_191_293_250),
            client: "127.0.0.1:5555".parse().expect("addr"),
            method: "GET",
            path: "/home?id=42",
            protocol: "HTTP/1.1",
            scheme: "http",
            status: 200,
            bytes: 52,
            duration: Duration::from_micros(1234),
            upstream: Some(Duration::from_micros(900)),
            replica: Some("server-1"),
            slot: Some(137),
            retries: 0,
            termination: "ok",
            referer: None,
            user_agent: Some(b"curl/8.5.0"),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(utc(UNIX_EPOCH), (1970, 1, 1, 0, 0, 0, 0));
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            (2000, 2, 29, 0, 0, 0, 0)
        );
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_millis(1_796_191_293_250)),
            (2026, 12, 2, 6, 1, 33, 250)
        );
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(4_107_542_399)),
            (2100, 2, 28, 23, 59, 59, 0)
        );
    }

    #[test]
    fn a_json_line_has_every_field() {
        let mut out = Vec::new();
        json(&mut out, &record());
        let line = String::from_utf8(out).expect("utf-8");
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2026-12-02T06:01:33.250Z", "client": "127.0.0.1:5555", "method": "GET",
                "path": "/home?id=42", "protocol": "HTTP/1.1", "scheme": "http", "status": 200,
                "bytes": 52,
                "duration_ms": 1.234, "upstream_ms": 0.9, "replica": "server-1", "slot": 137,
                "retries": 0, "termination": "ok", "referer": null, "user_agent": "curl/8.5.0"
            })
        );
        let mut out = Vec::new();
        json(
            &mut out,
            &Record {
                path: "/x\"\n{\"forged\":1}",
                upstream: None,
                replica: None,
                slot: None,
                ..record()
            },
        );
        let line = String::from_utf8(out).expect("utf-8");
        assert_eq!(line.matches('\n').count(), 1, "no line forged: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["path"], "/x\"\n{\"forged\":1}");
        assert!(v["upstream_ms"].is_null() && v["replica"].is_null() && v["slot"].is_null());
    }

    #[test]
    fn a_combined_line_reads_like_nginx_and_cannot_be_forged() {
        let mut out = Vec::new();
        combined(&mut out, &record());
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "127.0.0.1 - - [02/Dec/2026:06:01:33 +0000] \"GET /home?id=42 HTTP/1.1\" 200 52 \"-\" \
             \"curl/8.5.0\" rt=0.001234 urt=0.000900 replica=server-1 slot=137 retries=0 term=ok \
             scheme=http\n"
        );
        let mut out = Vec::new();
        combined(
            &mut out,
            &Record {
                user_agent: Some(b"evil\"\n127.0.0.1 - - fake"),
                upstream: None,
                replica: None,
                slot: None,
                termination: "no_replica",
                status: 503,
                ..record()
            },
        );
        let line = String::from_utf8(out).expect("utf-8");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(
            line.contains("\"evil\\x22\\x0A127.0.0.1 - - fake\""),
            "{line}"
        );
        assert!(
            line.ends_with("urt=- replica=- slot=- retries=0 term=no_replica scheme=http\n"),
            "{line}"
        );
    }

    #[test]
    fn header_values_with_any_byte_are_escaped_alike_in_both_formats() {
        // Latin-1 (not UTF-8), UTF-8, a control byte, DEL, a backslash and a quote.
        let agent: &[u8] = b"caf\xe9 \xe2\x9c\x93 \x01\x7f a\\b \"q\"";
        let shown = r#"caf\xE9 \xE2\x9C\x93 \x01\x7F a\x5Cb "q""#;
        let r = Record {
            user_agent: Some(agent),
            referer: Some(b"http://ex.test/\xff"),
            ..record()
        };
        let mut out = Vec::new();
        json(&mut out, &r);
        let line = String::from_utf8(out).expect("a JSON line is UTF-8 whatever the client sent");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["user_agent"], shown, "{line}");
        assert_eq!(v["referer"], r"http://ex.test/\xFF", "{line}");
        let mut out = Vec::new();
        combined(&mut out, &r);
        let line = String::from_utf8(out).expect("UTF-8");
        let shown_combined = shown.replace('"', r"\x22");
        assert!(
            line.contains(&format!("\"http://ex.test/\\xFF\" \"{shown_combined}\"")),
            "{line}"
        );
        // Plain ASCII is copied as it is; an empty or absent value is `-` / null.
        let mut out = Vec::new();
        json(
            &mut out,
            &Record {
                user_agent: Some(b""),
                ..record()
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(
            (v["user_agent"].as_str(), v["referer"].is_null()),
            (Some(""), true)
        );
        // A long value is cut before it is escaped.
        let long = vec![0xffu8; 3 * MAX_FIELD];
        let mut out = Vec::new();
        json(
            &mut out,
            &Record {
                user_agent: Some(&long),
                ..record()
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(v["user_agent"].as_str().map(str::len), Some(4 * MAX_FIELD));
    }

    #[test]
    fn numbers_are_written_exactly() {
        let mut out = Vec::new();
        num(&mut out, 0);
        out.push(b' ');
        num(&mut out, u64::MAX);
        out.push(b' ');
        padded(&mut out, 7, 3);
        out.push(b' ');
        padded(&mut out, 12345, 3);
        out.push(b' ');
        fixed(&mut out, Duration::from_micros(1_234_567), false);
        out.push(b' ');
        fixed(&mut out, Duration::from_micros(5), true);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "0 18446744073709551615 007 12345 1234.567 0.000005"
        );
        let mut out = Vec::new();
        client(&mut out, "[::1]:80".parse().expect("v6"));
        out.push(b' ');
        client(&mut out, "[::ffff:10.0.0.1]:8".parse().expect("mapped"));
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "[::1]:80 [::ffff:10.0.0.1]:8"
        );
    }

    #[test]
    fn long_fields_are_cut() {
        let long = "/".repeat(3 * MAX_FIELD);
        let mut out = Vec::new();
        json(
            &mut out,
            &Record {
                path: &long,
                ..record()
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(v["path"].as_str().map(str::len), Some(MAX_FIELD));
    }
}
