//! The one line a ringgate process prints on stdout once it serves: `listening on http://ADDR`
//! (and, for a gateway with TLS on, `listening on https://ADDR` right after it, or alone when
//! it serves no plain HTTP).
//!
//! Owns: those lines' format. `ringgate serve` and `ringgate-server` print them; the process
//! provider, the tests, the lab and scripts wait for them and read the address from them, all
//! through [`parse`] and [`parse_https`], so the format lives in one place.
//! Must not touch: anything else.

use std::io::Write;
use std::net::SocketAddr;

const PREFIX: &str = "listening on http://";
const TLS_PREFIX: &str = "listening on https://";

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

/// Prints the lines of a gateway, plain first, in one write (a reader that has the first line
/// has the second one too).
pub fn announce_gateway(
    plain: Option<SocketAddr>,
    https: Option<SocketAddr>,
) -> std::io::Result<()> {
    let mut text = String::new();
    if let Some(a) = plain {
        text.push_str(&line(a));
        text.push('\n');
    }
    if let Some(a) = https {
        text.push_str(&format!("{TLS_PREFIX}{a}\n"));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The address in a `listening on http://ADDR` line (surrounding whitespace ignored).
pub fn parse(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix(PREFIX)?.parse().ok()
}

/// The address in a `listening on https://ADDR` line.
pub fn parse_https(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix(TLS_PREFIX)?.parse().ok()
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
        assert_eq!(
            parse_https("listening on https://127.0.0.1:4321"),
            Some(addr)
        );
        assert_eq!(parse("listening on https://127.0.0.1:4321"), None);
        assert_eq!(parse_https(&line(addr)), None);
    }
}
