//! WebSocket frames as a tunnel sees them on the replica → client leg: headers only, so a
//! close can be put in at a frame boundary (RFC 6455 §5.2, §5.5.1), never inside a frame.
//!
//! Owns: [`WebSocket`], the frame-header format [`Frames`] follows the stream by (the tracker
//! is [`super::frames::Boundaries`]; payloads are skipped by length, never read), and
//! [`close_frame`] (the server's close frame with a code and a reason).
//! Must not touch: sockets. It is fed the bytes the tunnel forwards.

use super::frames::{Boundaries, Format};

/// Where a server-to-client WebSocket stream is.
pub type Frames = Boundaries<WebSocket>;

/// WebSocket frame headers (RFC 6455 §5.2), and whether a close frame went by.
#[derive(Debug, Clone, Default)]
pub struct WebSocket {
    /// A close frame went by: the server ended the WebSocket as the protocol says.
    saw_close: bool,
}

impl Format for WebSocket {
    /// Two bytes, then the length's extension and the mask the second one announces.
    fn header_len(&self, seen: &[u8]) -> Option<usize> {
        let second = *seen.get(1)?;
        let ext = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        Some(2 + ext + mask)
    }

    fn header_done(&mut self, h: &[u8]) -> u64 {
        self.saw_close |= h[0] & 0x0f == 0x8;
        match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        }
    }
}

impl Frames {
    /// Whether a close frame went by.
    pub fn saw_close(&self) -> bool {
        self.format.saw_close
    }
}

/// A server's close frame (unmasked) with `code` and `reason` (cut to fit a control frame's 125
/// bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut reason = reason.as_bytes();
    if reason.len() > 123 {
        reason = &reason[..123];
    }
    let mut f = Vec::with_capacity(4 + reason.len());
    f.push(0x88); // FIN, close
    f.push(2 + reason.len() as u8);
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

/// 1012, "Service Restart": the server asks the client to reconnect (RFC 6455 registry).
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
/// 1001, "Going Away": the server is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) with `payload`.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn boundaries_are_found_whatever_the_pieces_the_stream_comes_in() {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            stream.extend(frame(0x2, &vec![7u8; len]));
            ends.push(stream.len());
        }
        for piece in [1, 2, 3, 7, 1000, stream.len()] {
            let mut f = Frames::default();
            let mut at = 0;
            let mut found = Vec::new();
            while at < stream.len() {
                let end = (at + piece).min(stream.len());
                let mut chunk = &stream[at..end];
                while !chunk.is_empty() {
                    let n = f.advance(chunk, true);
                    at += n;
                    chunk = &chunk[n..];
                    if f.at_boundary() {
                        found.push(at);
                    }
                }
            }
            assert_eq!(found, ends, "pieces of {piece}");
        }
    }

    #[test]
    fn a_masked_header_and_a_header_split_across_reads_are_read_whole() {
        // A masked frame (as a client sends): 2 + 4 mask bytes, then 3 payload bytes.
        let masked = [0x81, 0x83, 1, 2, 3, 4, b'a', b'b', b'c'];
        let mut f = Frames::default();
        assert_eq!(f.advance(&masked[..1], true), 1);
        assert!(!f.at_boundary(), "inside a header");
        assert_eq!(f.advance(&masked[1..], true), 8);
        assert!(f.at_boundary());
    }

    #[test]
    fn without_stop_everything_is_taken() {
        let mut stream = frame(0x1, b"hello");
        stream.extend(frame(0x1, b"there"));
        let mut f = Frames::default();
        assert_eq!(f.advance(&stream, false), stream.len());
        assert!(f.at_boundary());
        assert!(!f.saw_close());
        f.advance(&close_frame(1000, "bye"), false);
        assert!(f.saw_close(), "a close frame is noticed");
    }

    #[test]
    fn a_close_frame_carries_its_code_and_a_bounded_reason() {
        let f = close_frame(CLOSE_SERVICE_RESTART, "moved");
        assert_eq!(f, [0x88, 7, 0x03, 0xf4, b'm', b'o', b'v', b'e', b'd']);
        let long = close_frame(1000, &"x".repeat(500));
        assert_eq!(
            long.len(),
            4 + 123,
            "a control frame's payload is at most 125 bytes"
        );
        let mut frames = Frames::default();
        assert_eq!(frames.advance(&long, true), long.len());
        assert!(frames.at_boundary());
    }
}
