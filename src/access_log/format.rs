//! One access log line: a [`Record`] written as JSON or in the `combined` format.
//!
//! Owns: the fields of a line, their order and escaping (header values are raw bytes: any byte
//! outside printable ASCII is written `\xHH`, as NGINX does, in both formats), and the times in
//! them: UTC, RFC 3339 with milliseconds for JSON (the crate's [`crate::rfc3339`], milliseconds
//! added here), `[02/Dec/2026:06:01:33 +0000]` for combined. A JSON line is a
//! `#[derive(Serialize)]` struct written by `serde_json`; the combined format is NGINX's text,
//! laid out here. The dates are formatted by the `time` crate once per second ([`Dates`]).
//! Must not touch: I/O or time sources; the caller gives the record and its timestamp.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
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
    fn json_time(&mut self, t: SystemTime) -> JsonTime {
        let (dates, millis) = self.at(t);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let seconds = dates.rfc3339.as_bytes();
        if let Some(date) = seconds.strip_suffix(b"Z").filter(|d| d.len() == 19) {
            out[..19].copy_from_slice(date);
        }
        out[20..23].copy_from_slice(&itoa::Buffer::new().format(1000 + millis).as_bytes()[1..]);
        JsonTime(out)
    }
}

/// A line's `time` as JSON writes it.
struct JsonTime([u8; 24]);

impl Serialize for JsonTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.0).unwrap_or_default())
    }
}

/// A duration as a number of milliseconds (to the microsecond: `1.234`).
struct Millis(Duration);

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Whole microseconds over 1000: the nearest double prints back as the exact decimal
        // (below 2^53 µs, 285 years). Through u64: a u128 to f64 is a slow soft-float call.
        let micros = u64::try_from(self.0.as_micros()).unwrap_or(u64::MAX);
        s.serialize_f64(micros as f64 / 1000.0)
    }
}

/// The client's address with its port: `127.0.0.1:5555`, `[::1]:80`.
struct Client(SocketAddr);

impl Serialize for Client {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = Vec::with_capacity(48);
        client(&mut out, self.0);
        s.serialize_str(std::str::from_utf8(&out).unwrap_or_default())
    }
}

/// A header value: the same text the combined format shows (bytes outside printable ASCII and
/// `\` as `\xHH`), so a line is valid UTF-8 JSON whatever the client sent and the escape is
/// unambiguous; `"` is JSON's to escape.
struct Header<'a>(Option<&'a [u8]>);

impl Serialize for Header<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some(value) = self.0 else {
            return s.serialize_none();
        };
        let value = cut_bytes(value);
        match std::str::from_utf8(value) {
            // The common case, copied as it is.
            Ok(text) if value.iter().all(|&b| printable(b) && b != b'\\') => s.serialize_str(text),
            _ => {
                let mut shown = Vec::with_capacity(value.len() * 2);
                for &b in value {
                    if printable(b) && b != b'\\' {
                        shown.push(b);
                    } else {
                        hex_escape(&mut shown, b);
                    }
                }
                s.serialize_str(std::str::from_utf8(&shown).unwrap_or_default())
            }
        }
    }
}

/// One JSON line, field by field in the order they are written.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: JsonTime,
    client: Client,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    scheme: &'a str,
    status: u16,
    bytes: u64,
    duration_ms: Millis,
    upstream_ms: Option<Millis>,
    replica: Option<&'a str>,
    slot: Option<u32>,
    retries: u32,
    termination: &'a str,
    referer: Header<'a>,
    user_agent: Header<'a>,
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

/// `d` in seconds with six decimals (`0.001234`): exact, no floating point.
fn fixed(out: &mut Vec<u8>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    num(out, us / 1_000_000);
    out.push(b'.');
    padded(out, us % 1_000_000, 6);
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

/// Appends `r` as one JSON line.
pub fn json(out: &mut Vec<u8>, dates: &mut Dates, r: &Record<'_>) {
    let line = JsonLine {
        time: dates.json_time(r.time),
        client: Client(r.client),
        method: cut(r.method),
        path: cut(r.path),
        protocol: cut(r.protocol),
        scheme: cut(r.scheme),
        status: r.status,
        bytes: r.bytes,
        duration_ms: Millis(r.duration),
        upstream_ms: r.upstream.map(Millis),
        replica: r.replica.map(cut),
        slot: r.slot,
        retries: r.retries,
        termination: cut(r.termination),
        referer: Header(r.referer),
        user_agent: Header(r.user_agent),
    };
    // Into a Vec nothing fails: every field serialises as a string, a number or null.
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    }
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
    fixed(out, r.duration);
    out.extend_from_slice(b" urt=");
    match r.upstream {
        Some(u) => fixed(out, u),
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

    /// `t` in both formats' dates, through one cache as the serving threads use it.
    fn dates_of(dates: &mut Dates, t: SystemTime) -> (String, String) {
        let json = String::from_utf8_lossy(&dates.json_time(t).0).into_owned();
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
        fixed(&mut out, Duration::from_micros(5));
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "0 18446744073709551615 007 12345 0.000005"
        );
        // JSON's milliseconds are numbers serde writes: exact to the microsecond.
        let mut out = Vec::new();
        let long = Record {
            duration: Duration::from_micros(1_234_567),
            upstream: Some(Duration::from_micros(1)),
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
