//! RFC 9110's token grammar, which both the framing fields and chunk lines are read by.
//!
//! Owns: [`is_tchar`], [`is_token`]. A leaf of the wire layer. Must not touch: what a token
//! means.

/// A `tchar` (RFC 9110 §5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `1*tchar`.
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}
