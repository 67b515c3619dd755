//! One access log line: a [`Record`] written as JSON or in the `combined` format.
//!
//! Owns: the fields of a line, their order and escaping (header values are raw bytes: any byte
//! outside printable ASCII is written `\xHH`, as NGINX does, in both formats), and the times in
//! them: UTC, RFC 3339 with milliseconds for JSON (the crate's [`crate::rfc3339`], milliseconds
//! added here), `[02/Dec/2026:06:01:33 +0000]` for combined, formatted by the `time` crate once
//! per second ([`Dates`]). JSON strings are escaped by `serde_json`'s escaper; numbers are
//! written by `itoa`.
//! Must not touch: I/O or time sources; the caller gives the record and its timestamp.
//!
//! Why the JSON line is laid out here rather than derived (`#[derive(Serialize)]` and
//! `serde_json::to_writer` was tried): serde_json escapes every key of every line again, and
//! the line cost 6,400 instructions instead of 3,300, +2,100 a logged request end to end
//! (callgrind, `docs/performance.md`), on a path whose whole budget is 5 % of an unlogged
//! request. The keys are constants here; every value still goes through serde_json's escaper
//! unless it has nothing to escape.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

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
    /// Response body bytes sent to the client (for a tunnel: its bytes to the client).
    pub bytes: u64,
    /// A tunnel's bytes from the client to the replica (`None` for a request).
    pub bytes_up: Option<u64>,
    /// From the request's arrival to its response's last byte (or the abort).
    pub duration: Duration,
    /// Time to the replica's response headers, when a replica answered.
    pub upstream: Option<Duration>,
    /// How long the request was held for a replica to start (N was 0), when it was.
    pub held: Option<Duration>,
    pub replica: Option<&'a str>,
    pub slot: Option<u32>,
    pub retries: u32,
    pub termination: &'a str,
    /// Header values as the client sent them: bytes, which need not be ASCII or UTF-8.
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
}

/// NGINX's `$time_local` in UTC.
const COMBINED_DATE: &[BorrowedFormatItem<'_>] =
    format_description!("[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000");

/// The dates of the second the last line was written in, in both formats: lines come by the
/// thousand a second, and a date costs the `time` crate more than the rest of a line, so it is
/// formatted once a second (per serving thread, each keeps its own).
#[derive(Debug, Default)]
pub struct Dates {
    /// The Unix second the dates below are of; None before the first line.
    second: Option<u64>,
    /// `2026-12-02T06:01:33Z`.
    rfc3339: String,
    /// `02/Dec/2026:06:01:33 +0000`.
    combined: String,
}

impl Dates {
    /// The dates of `t`'s second, and its milliseconds.
    fn at(&mut self, t: SystemTime) -> (&Dates, u32) {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.second != Some(since.as_secs()) {
            let t = UNIX_EPOCH + Duration::from_secs(since.as_secs());
            self.second = Some(since.as_secs());
            self.rfc3339 = crate::rfc3339::seconds(t);
            self.combined = OffsetDateTime::from(t)
                .format(COMBINED_DATE)
                .unwrap_or_default();
        }
        (self, since.subsec_millis())
    }

    /// RFC 3339 with milliseconds, `2026-12-02T06:01:33.250Z`: the second's form with the
    /// milliseconds put before its `Z`.
    fn json_time(&mut self, t: SystemTime) -> [u8; 24] {
        let (dates, millis) = self.at(t);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let seconds = dates.rfc3339.as_bytes();
        if let Some(date) = seconds.strip_suffix(b"Z").filter(|d| d.len() == 19) {
            out[..19].copy_from_slice(date);
        }
        out[20..23].copy_from_slice(&itoa::Buffer::new().format(1000 + millis).as_bytes()[1..]);
        out
    }
}

fn printable(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

/// `n` in decimal.
fn num(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` in decimal, zero-padded to `width` digits (wider numbers are written whole).
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    out.resize(out.len() + width.saturating_sub(digits.len()), b'0');
    out.extend_from_slice(digits.as_bytes());
}

/// `d` as a decimal number of milliseconds with three decimals (`1.234`), or of seconds with
/// six (`0.001234`): exact, no floating point.
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
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

fn client(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => ip(out, std::net::IpAddr::V4(*a.ip())),
        SocketAddr::V6(a) => {
            use std::io::Write;
            let _ = write!(out, "[{}]", a.ip());
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

/// A JSON string: text with nothing to escape (the common case) is copied as it is, anything
/// else goes through serde_json's escaper.
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
pub fn json(out: &mut Vec<u8>, dates: &mut Dates, r: &Record<'_>) {
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(&dates.json_time(r.time));
    out.extend_from_slice(b"\",\"client\":\"");
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
    if let Some(up) = r.bytes_up {
        out.extend_from_slice(b",\"bytes_up\":");
        num(out, up);
    }
    out.extend_from_slice(b",\"duration_ms\":");
    fixed(out, r.duration, false);
    out.extend_from_slice(b",\"upstream_ms\":");
    match r.upstream {
        Some(u) => fixed(out, u, false),
        None => out.extend_from_slice(b"null"),
    }
    if let Some(h) = r.held {
        out.extend_from_slice(b",\"held_ms\":");
        fixed(out, h, false);
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
        if b == b'"' || b == b'\\' || !printable(b) {
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
pub fn combined(out: &mut Vec<u8>, dates: &mut Dates, r: &Record<'_>) {
    ip(out, r.client.ip());
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(dates.at(r.time).0.combined.as_bytes());
    out.extend_from_slice(b"] \"");
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
    if let Some(h) = r.held {
        out.extend_from_slice(b" held=");
        fixed(out, h, true);
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

/// Appends `r` in `format`, with `dates` (the caller's, kept from line to line).
pub fn write(out: &mut Vec<u8>, dates: &mut Dates, format: AccessFormat, r: &Record<'_>) {
    match format {
        AccessFormat::Json => json(out, dates, r),
        AccessFormat::Combined => combined(out, dates, r),
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
            bytes_up: None,
            duration: Duration::from_micros(1234),
            upstream: Some(Duration::from_micros(900)),
            held: None,
            replica: Some("server-1"),
            slot: Some(137),
            retries: 0,
            termination: "ok",
            referer: None,
            user_agent: Some(b"curl/8.5.0"),
        }
    }

    /// `t` in both formats' dates, through one cache as the serving threads use it.
    fn dates_of(dates: &mut Dates, t: SystemTime) -> (String, String) {
        let json = String::from_utf8_lossy(&dates.json_time(t)).into_owned();
        (json, dates.at(t).0.combined.clone())
    }

    #[test]
    fn dates() {
        let mut d = Dates::default();
        let mut at = |t| dates_of(&mut d, t);
        let date = |json: &str, combined: &str| (json.to_owned(), combined.to_owned());
        assert_eq!(
            at(UNIX_EPOCH),
            date("1970-01-01T00:00:00.000Z", "01/Jan/1970:00:00:00 +0000")
        );
        assert_eq!(
            at(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            date("2000-02-29T00:00:00.000Z", "29/Feb/2000:00:00:00 +0000")
        );
        assert_eq!(
            at(UNIX_EPOCH + Duration::from_millis(1_796_191_293_250)),
            date("2026-12-02T06:01:33.250Z", "02/Dec/2026:06:01:33 +0000")
        );
        // The same second again (from the cache), then the next one.
        assert_eq!(
            at(UNIX_EPOCH + Duration::from_millis(1_796_191_293_999)),
            date("2026-12-02T06:01:33.999Z", "02/Dec/2026:06:01:33 +0000")
        );
        assert_eq!(
            at(UNIX_EPOCH + Duration::from_millis(1_796_191_294_007)),
            date("2026-12-02T06:01:34.007Z", "02/Dec/2026:06:01:34 +0000")
        );
        assert_eq!(
            at(UNIX_EPOCH + Duration::from_secs(4_107_542_399)),
            date("2100-02-28T23:59:59.000Z", "28/Feb/2100:23:59:59 +0000")
        );
    }

    #[test]
    fn a_json_line_has_every_field() {
        let mut out = Vec::new();
        json(&mut out, &mut Dates::default(), &record());
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
            &mut Dates::default(),
            &Record {
                path: "/x\"\n{\"forged\":1}",
                upstream: None,
                held: None,
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
        combined(&mut out, &mut Dates::default(), &record());
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "127.0.0.1 - - [02/Dec/2026:06:01:33 +0000] \"GET /home?id=42 HTTP/1.1\" 200 52 \"-\" \
             \"curl/8.5.0\" rt=0.001234 urt=0.000900 replica=server-1 slot=137 retries=0 term=ok \
             scheme=http\n"
        );
        let mut out = Vec::new();
        combined(
            &mut out,
            &mut Dates::default(),
            &Record {
                user_agent: Some(b"evil\"\n127.0.0.1 - - fake"),
                upstream: None,
                held: None,
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
        json(&mut out, &mut Dates::default(), &r);
        let line = String::from_utf8(out).expect("a JSON line is UTF-8 whatever the client sent");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["user_agent"], shown, "{line}");
        assert_eq!(v["referer"], r"http://ex.test/\xFF", "{line}");
        let mut out = Vec::new();
        combined(&mut out, &mut Dates::default(), &r);
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
            &mut Dates::default(),
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
            &mut Dates::default(),
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
        // In a line: milliseconds with three decimals, exact to the microsecond.
        let mut out = Vec::new();
        let long = Record {
            duration: Duration::from_micros(1_234_567),
            upstream: Some(Duration::from_micros(1)),
            held: None,
            ..record()
        };
        json(&mut out, &mut Dates::default(), &long);
        let line = String::from_utf8(out).expect("utf-8");
        assert!(
            line.contains("\"duration_ms\":1234.567,\"upstream_ms\":0.001,"),
            "{line}"
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
            &mut Dates::default(),
            &Record {
                path: &long,
                ..record()
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(v["path"].as_str().map(str::len), Some(MAX_FIELD));
    }
}
