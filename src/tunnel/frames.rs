//! Where a byte stream of length-prefixed frames is: in a frame's header, in its payload, or
//! between two frames. The one tracker behind WebSocket frames ([`super::ws::WebSocket`]) and
//! gRPC messages (`crate::proxy::stream`), so that a gateway's close can be put in at a
//! boundary, never inside a frame.
//!
//! Owns: [`Boundaries`], fed the bytes that are forwarded, reading headers only and skipping
//! payloads by their length (no work per payload byte), and the [`Format`] a protocol gives it
//! (how long a header is, how long its payload).
//! Must not touch: sockets, or what a frame means beyond its header.

/// A protocol's frame headers.
pub trait Format: Default {
    /// The whole header's length, known from its first `seen` bytes (`None`: more are needed).
    fn header_len(&self, seen: &[u8]) -> Option<usize>;
    /// The payload length of a whole `header`; the format may note what the header says.
    fn header_done(&mut self, header: &[u8]) -> u64;
}

/// The longest header a format may have.
const MAX_HEADER: usize = 14;

/// Where a stream of `F`'s frames is.
#[derive(Debug, Clone, Default)]
pub struct Boundaries<F> {
    /// The header of the frame being read, so far.
    header: [u8; MAX_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    pub format: F,
}

impl<F: Format> Boundaries<F> {
    /// Between two frames: a frame put in here is a frame of its own.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Follows `bytes` through the stream. With `stop`, it stops at the first frame boundary
    /// after the first byte and returns how many bytes lie before it (all of them if there is
    /// none); without, it takes them all.
    pub fn advance(&mut self, bytes: &[u8], stop: bool) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.payload_left > 0 {
                let take = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                i += take;
                self.payload_left -= take as u64;
            } else {
                self.header[self.have] = bytes[i];
                self.have += 1;
                i += 1;
                let seen = &self.header[..self.have];
                let whole = self.format.header_len(seen).map(|n| n.min(MAX_HEADER));
                if whole == Some(self.have) {
                    self.payload_left = self.format.header_done(&self.header[..self.have]);
                    self.have = 0;
                }
            }
            if stop && self.at_boundary() {
                return i;
            }
        }
        i
    }
}
