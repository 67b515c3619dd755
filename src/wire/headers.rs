//! Which header fields never cross the gateway (the replica-side head writer and response
//! parser apply these classes).
//!
//! Owns: hop-by-hop headers (RFC 9110 §7.6.1, including the ones `Connection` names, except the fields the
//! gateway itself relies on; told apart by `HeaderName` and, for a head forwarded as bytes, by
//! the name as it came, in any case), headers a client must not be able to set for the replica
//! (`Proxy`, the httpoxy vector; `Forwarded` and `X-Real-IP`, which replicas would trust as the
//! gateway's).
//! Must not touch: routing or bodies.

use http::header::{self, HeaderName};

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Fields a client may not strip by naming them in `Connection`: the request would reach the
/// replica without its host or its framing.
const PROTECTED: [HeaderName; 3] = [header::HOST, header::CONTENT_LENGTH, header::CONTENT_TYPE];

/// Fields only the gateway may set for a replica.
const CLIENT_MAY_NOT_SET: [HeaderName; 3] = [
    HeaderName::from_static("proxy"),
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
];

/// The methods a replica can be sent.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE";

/// A header that describes one hop, not the message (never forwarded either way).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str() == "proxy-connection"
}

/// [`is_hop_by_hop`] for a field name as it came on the wire, in any case (a response head
/// forwarded as bytes is cut by it).
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    let one_of = |names: &[&str]| {
        names
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
    };
    // By length first: most fields are none of these, and are told so by one comparison.
    match name.len() {
        2 => one_of(&["te"]),
        7 => one_of(&["trailer", "upgrade"]),
        10 => one_of(&["connection", "keep-alive"]),
        16 => one_of(&["proxy-connection"]),
        17 => one_of(&["transfer-encoding"]),
        18 => one_of(&["proxy-authenticate"]),
        19 => one_of(&["proxy-authorization"]),
        _ => false,
    }
}

/// A header a client may not set for the replica.
pub fn is_client_only(name: &HeaderName) -> bool {
    CLIENT_MAY_NOT_SET.contains(name)
}

/// A header that `Connection` may not remove.
pub fn is_protected(name: &HeaderName) -> bool {
    PROTECTED.contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_classes() {
        for h in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "proxy-authorization",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(h)), "{h}");
        }
        assert!(!is_hop_by_hop(&header::HOST));
        for h in ["proxy", "forwarded", "x-real-ip"] {
            assert!(is_client_only(&HeaderName::from_static(h)), "{h}");
        }
        assert!(is_protected(&header::HOST) && is_protected(&header::CONTENT_LENGTH));
        assert!(!is_protected(&HeaderName::from_static("x-forwarded-for")));
    }

    #[test]
    fn a_name_as_it_came_is_hop_by_hop_as_its_header_name_is() {
        // The wire's spelling, in any case, is told apart as the map's is.
        let names = [
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "host",
            "date",
            "content-length",
            "x-keep-alive",
            "tee",
            "upgraded",
            "proxy",
            "set-cookie",
        ];
        for h in names {
            let hop = is_hop_by_hop(&HeaderName::from_static(h));
            assert_eq!(is_hop_by_hop_name(h.as_bytes()), hop, "{h}");
            let upper = h.to_ascii_uppercase();
            assert_eq!(is_hop_by_hop_name(upper.as_bytes()), hop, "{upper}");
        }
    }
}
