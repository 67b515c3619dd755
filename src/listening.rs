//! The one line a ringgate process prints on stdout once it serves: `listening on http://ADDR`.
//!
//! Owns: that line's format. `ringgate serve` and `ringgate-server` print it; the process
//! provider, the tests, the lab and scripts wait for it and read the address from it, all through
//! [`parse`], so the format lives in one place.
//! Must not touch: anything else.

use std::io::Write;
use std::net::SocketAddr;

const PREFIX: &str = "listening on http://";

/// The line for `addr`, without a newline.
pub fn line(addr: SocketAddr) -> String {
    format!("{PREFIX}{addr}")
}

/// Prints the line on stdout and flushes it (scripts read stdout through a pipe).
pub fn announce(addr: SocketAddr) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", line(addr))?;
    out.flush()
}

/// The address in a `listening on http://ADDR` line (surrounding whitespace ignored).
pub fn parse(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix(PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let addr: SocketAddr = "127.0.0.1:4321".parse().expect("addr");
        assert_eq!(parse(&format!("{}\n", line(addr))), Some(addr));
        let v6: SocketAddr = "[::1]:80".parse().expect("addr");
        assert_eq!(parse(&line(v6)), Some(v6));
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("listening on http://nope"), None);
    }
}
