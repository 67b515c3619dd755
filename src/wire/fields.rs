//! The header fields that delimit an HTTP/1 message body (`Content-Length`,
//! `Transfer-Encoding`), read by one set of strict rules for both legs: the client's request
//! heads ([`super::request`]) and the replicas' response heads
//! (`crate::wire::client::head`). Two parsers that read these fields differently are how
//! requests get smuggled, so neither leg has its own reading of them.
//!
//! Owns: [`FramingFields`], which takes each field line's value as it comes and keeps what
//! the lines said together; [`FramingError`], what can be wrong with them; and the RFC 9112
//! §6.3 decisions each leg makes from them ([`FramingFields::request_framing`],
//! [`FramingFields::response_framing`]). `Content-Length` is digits only (`+5`, `0x5`, `5 5`,
//! `-5` are refused; a list of the same value, `5, 5`, is that value, RFC 9110 §8.6);
//! `Transfer-Encoding` is a list of bare codings, `chunked` at most once and last.
//! Must not touch: anything but these two fields' values. It sees bytes, never a connection,
//! a header map or a status code.

use http::Version;

use super::framing::BodyFraming;
use super::syntax::is_token;

/// What is wrong with a message's framing fields. The texts are what a refused client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("Content-Length is not a number")]
    LengthNotANumber,
    #[error("conflicting Content-Length values")]
    ConflictingLengths,
    #[error("Transfer-Encoding lists something that is not a transfer coding")]
    NotACoding,
    #[error("Transfer-Encoding applies chunked more than once")]
    ChunkedTwice,
    #[error("Transfer-Encoding does not end in chunked")]
    NotChunkedLast,
    #[error("both Transfer-Encoding and Content-Length")]
    LengthAndCoding,
    #[error("Transfer-Encoding in HTTP/1.0")]
    CodingInHttp10,
    /// A request coded with something besides `chunked` (`gzip, chunked`): the gateway decodes
    /// only chunked, and forwarding the rest undecoded under a new framing would change the
    /// message (501, RFC 9112 §6.1, as NGINX and HAProxy answer).
    #[error("Transfer-Encoding names a coding the gateway does not implement (only chunked)")]
    UnsupportedCoding,
}

/// A message's `Content-Length` and `Transfer-Encoding`, as its field lines give them.
#[derive(Debug, Clone, Copy, Default)]
pub struct FramingFields {
    length: Option<u64>,
    /// How many `Content-Length` lines there were.
    length_lines: u32,
    /// The only `Content-Length` line is written the way the gateway writes a length (digits,
    /// no leading zero, one value).
    length_canonical: bool,
    /// A `Transfer-Encoding` line was there.
    coded: bool,
    /// `chunked` was listed (it may be, once).
    chunked_seen: bool,
    /// The last coding listed is `chunked`.
    chunked_last: bool,
    /// A coding other than `chunked` was listed.
    others: bool,
}

impl FramingFields {
    /// Takes the value of one `Content-Length` field line.
    pub fn content_length(&mut self, value: &[u8]) -> Result<(), FramingError> {
        self.length_lines += 1;
        // What nearly every message has, one plain number, read in one pass (every response
        // from a replica comes through here).
        if let Some(n) = decimal(value) {
            self.length_canonical =
                self.length_lines == 1 && (value == b"0" || value.first() != Some(&b'0'));
            return self.take_length(n);
        }
        self.length_canonical = false;
        for element in value.split(|&b| b == b',') {
            let n = decimal(trim_ows(element)).ok_or(FramingError::LengthNotANumber)?;
            self.take_length(n)?;
        }
        Ok(())
    }

    fn take_length(&mut self, n: u64) -> Result<(), FramingError> {
        if self.length.is_some_and(|l| l != n) {
            return Err(FramingError::ConflictingLengths);
        }
        self.length = Some(n);
        Ok(())
    }

    /// Takes the value of one `Transfer-Encoding` field line (the lines of a message make one
    /// list, in order, RFC 9110 §5.3).
    pub fn transfer_encoding(&mut self, value: &[u8]) -> Result<(), FramingError> {
        self.coded = true;
        // Empty elements are allowed in a list and mean nothing (RFC 9110 §5.6.1).
        for coding in value.split(|&b| b == b',').map(trim_ows) {
            if coding.is_empty() {
                continue;
            }
            // Parameters (`chunked;x=1`) are refused with the rest: no coding the gateway
            // knows has any, and a bare token is all a sender of them writes.
            if !is_token(coding) {
                return Err(FramingError::NotACoding);
            }
            self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            if self.chunked_last {
                if self.chunked_seen {
                    return Err(FramingError::ChunkedTwice);
                }
                self.chunked_seen = true;
            } else {
                self.others = true;
            }
        }
        Ok(())
    }

    /// The body length the fields state, if they state one.
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// There was exactly one `Content-Length` line, written as the gateway writes a length: it
    /// can be relayed as it is.
    pub fn length_is_canonical(&self) -> bool {
        self.length_canonical
    }

    /// A `Transfer-Encoding` line was there.
    pub fn transfer_coded(&self) -> bool {
        self.coded
    }

    /// How a client's request body of `version` is delimited (RFC 9112 §6.3): a length and a
    /// coding together, a coding in HTTP/1.0, or codings that do not end in chunked are refused
    /// (400); codings besides chunked are not implemented (501).
    pub fn request_framing(&self, version: Version) -> Result<BodyFraming, FramingError> {
        match self.length {
            _ if !self.coded => Ok(match self.length {
                None | Some(0) => BodyFraming::Empty,
                Some(n) => BodyFraming::Length(n),
            }),
            Some(_) => Err(FramingError::LengthAndCoding),
            None if version == Version::HTTP_10 => Err(FramingError::CodingInHttp10),
            None if !self.chunked_last => Err(FramingError::NotChunkedLast),
            None if self.others => Err(FramingError::UnsupportedCoding),
            None => Ok(BodyFraming::Chunked),
        }
    }

    /// How a replica's response body is delimited, when its status and the request's method
    /// let it have one (RFC 9112 §6.3): a coding overrides a length; codings that end in
    /// chunked are chunked, any other is read until the replica closes; else the length, else
    /// until close.
    pub fn response_framing(&self) -> BodyFraming {
        match self.length {
            _ if self.coded && self.chunked_last => BodyFraming::Chunked,
            _ if self.coded => BodyFraming::UntilClose,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    }
}

/// Optional whitespace (SP, HTAB) trimmed off both ends; never any other byte.
fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// `1*DIGIT` as a number; `None` for anything else (a sign, a prefix, inner space) or past
/// `u64`.
fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The framing cases both legs' parsers are tested on, beside each parser: one table, so the
/// legs cannot drift apart again.
#[cfg(test)]
pub(crate) mod cases {
    use super::FramingError::*;
    use super::*;

    pub struct Case {
        /// Field lines, each ending in CRLF.
        pub lines: &'static str,
        /// What a client's HTTP/1.1 request head with them comes to.
        pub request: Result<BodyFraming, FramingError>,
        /// What a replica's `200` to a `GET` with them comes to.
        pub response: Result<BodyFraming, FramingError>,
    }

    const fn case(
        lines: &'static str,
        request: Result<BodyFraming, FramingError>,
        response: Result<BodyFraming, FramingError>,
    ) -> Case {
        Case {
            lines,
            request,
            response,
        }
    }

    use BodyFraming::{Chunked, Empty, Length, UntilClose};

    pub const FRAMING: &[Case] = &[
        case("", Ok(Empty), Ok(UntilClose)),
        case("Content-Length: 0\r\n", Ok(Empty), Ok(Length(0))),
        case("Content-Length: 5\r\n", Ok(Length(5)), Ok(Length(5))),
        case("Content-Length: 005\r\n", Ok(Length(5)), Ok(Length(5))),
        case("Content-Length: 5, 5\r\n", Ok(Length(5)), Ok(Length(5))),
        case(
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            Ok(Length(5)),
            Ok(Length(5)),
        ),
        case(
            "Content-Length: +5\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: -5\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: 0x5\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: 5 5\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: 5,\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: \r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: 18446744073709551616\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Content-Length: 5, 6\r\n",
            Err(ConflictingLengths),
            Err(ConflictingLengths),
        ),
        case(
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            Err(ConflictingLengths),
            Err(ConflictingLengths),
        ),
        case("Transfer-Encoding: chunked\r\n", Ok(Chunked), Ok(Chunked)),
        case("Transfer-Encoding: Chunked ,\r\n", Ok(Chunked), Ok(Chunked)),
        case(
            "Transfer-Encoding: gzip, chunked\r\n",
            Err(UnsupportedCoding),
            Ok(Chunked),
        ),
        case(
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            Err(UnsupportedCoding),
            Ok(Chunked),
        ),
        case(
            "Transfer-Encoding: gzip\r\n",
            Err(NotChunkedLast),
            Ok(UntilClose),
        ),
        case(
            "Transfer-Encoding: chunked, gzip\r\n",
            Err(NotChunkedLast),
            Ok(UntilClose),
        ),
        case(
            "Transfer-Encoding: gzip\r\nContent-Length: 5\r\n",
            Err(LengthAndCoding),
            Ok(UntilClose),
        ),
        case(
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            Err(LengthAndCoding),
            Ok(Chunked),
        ),
        case(
            "Transfer-Encoding: chunked\r\nContent-Length: +5\r\n",
            Err(LengthNotANumber),
            Err(LengthNotANumber),
        ),
        case(
            "Transfer-Encoding: chunked, chunked\r\n",
            Err(ChunkedTwice),
            Err(ChunkedTwice),
        ),
        case(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            Err(ChunkedTwice),
            Err(ChunkedTwice),
        ),
        case(
            "Transfer-Encoding: chunked;x=1\r\n",
            Err(NotACoding),
            Err(NotACoding),
        ),
        case(
            "Transfer-Encoding: \"chunked\"\r\n",
            Err(NotACoding),
            Err(NotACoding),
        ),
    ];

    /// The (name, value) pairs of a case's lines.
    pub fn fields(lines: &str) -> impl Iterator<Item = (&str, &str)> {
        lines
            .split_terminator("\r\n")
            .map(|l| l.split_once(':').map_or((l, ""), |(n, v)| (n, v.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::cases::{fields, FRAMING};
    use super::*;

    /// The fields of `lines` as a parser feeds them; the first error is the answer.
    fn read(lines: &str) -> Result<FramingFields, FramingError> {
        let mut f = FramingFields::default();
        for (name, value) in fields(lines) {
            if name.eq_ignore_ascii_case("content-length") {
                f.content_length(value.as_bytes())?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                f.transfer_encoding(value.as_bytes())?;
            }
        }
        Ok(f)
    }

    #[test]
    fn both_legs_read_the_framing_fields_by_one_table() {
        for case in FRAMING {
            let read = read(case.lines);
            let request = read.and_then(|f| f.request_framing(Version::HTTP_11));
            let response = read.map(|f| f.response_framing());
            assert_eq!(request, case.request, "request with {:?}", case.lines);
            assert_eq!(response, case.response, "response with {:?}", case.lines);
        }
    }

    #[test]
    fn http10_requests_may_not_be_coded() {
        let f = read("Transfer-Encoding: chunked\r\n").expect("reads");
        assert_eq!(
            f.request_framing(Version::HTTP_10),
            Err(FramingError::CodingInHttp10)
        );
    }

    #[test]
    fn only_a_lone_plain_length_is_relayed_as_written() {
        for (lines, canonical) in [
            ("Content-Length: 5\r\n", true),
            ("Content-Length: 0\r\n", true),
            ("Content-Length: 123456\r\n", true),
            ("Content-Length: 05\r\n", false),
            ("Content-Length: 5, 5\r\n", false),
            ("Content-Length: 5\r\nContent-Length: 5\r\n", false),
        ] {
            let f = read(lines).expect("reads");
            assert_eq!(f.length_is_canonical(), canonical, "{lines:?}");
        }
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(trim_ows(b" \t5\t "), b"5");
        assert_eq!(
            trim_ows(b"\x0b5"),
            b"\x0b5",
            "only SP and HTAB are whitespace"
        );
    }
}
