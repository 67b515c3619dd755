//! Request data kept out of hook error texts: a `request_key` error message that quotes a
//! header value (`error("bad token " .. req.headers.authorization)`) would show it in
//! `/lb/status` and in the log.
//!
//! Owns: the rule "every run of the shown message that is covered by 4-byte pieces of some
//! request header value is replaced by `[redacted]`". Pieces, not whole values, so a value
//! quoted in part (`v:sub(1, 10)`) or cut by the message's length bound is masked too; the
//! price is that an innocent word that also occurs in a header value (four bytes in common)
//! is masked as well. Must not touch: Lua, the call path; it maps a string to a string.

use rustc_hash::FxHashSet;

/// Shorter runs are left alone: a secret is longer, and masking every two-letter word a
/// header shares would make messages unreadable.
const PIECE: usize = 4;
const MASK: &str = "[redacted]";

/// `message` with every run covered by [`PIECE`]-byte pieces of the `values` masked. Its work
/// is linear in the message and in the values' bytes (callers pass only the part of the message
/// that can be shown).
pub(super) fn redact(message: String, values: &[&[u8]]) -> String {
    let bytes = message.as_bytes();
    if bytes.len() < PIECE || values.iter().all(|v| v.len() < PIECE) {
        return message;
    }
    let pieces: FxHashSet<&[u8]> = values.iter().flat_map(|v| v.windows(PIECE)).collect();
    let mut covered = vec![false; bytes.len()];
    for (at, window) in bytes.windows(PIECE).enumerate() {
        if pieces.contains(window) {
            covered[at..at + PIECE].iter_mut().for_each(|c| *c = true);
        }
    }
    if !covered.contains(&true) {
        return message;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if covered[at] {
            out.extend_from_slice(MASK.as_bytes());
            while at < bytes.len() && covered[at] {
                at += 1;
            }
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    // A masked run may end inside a multi-byte character: show what is left of it as U+FFFD.
    String::from_utf8_lossy(&out).into_owned()
}
