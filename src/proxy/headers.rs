//! Request normalisation: what the gateway refuses, removes and adds before a request goes to a
//! replica, and what it removes from the response.
//!
//! Owns: the request checks (one `Host`, RFC 9112 §3.2; no `CONNECT` tunnels), hop-by-hop
//! headers (RFC 9110 §7.6.1, including the ones `Connection` names, except the fields the
//! gateway itself relies on), headers a client must not be able to set for the replica
//! (`Proxy`, the httpoxy vector; `Forwarded` and `X-Real-IP`, which replicas would trust as the
//! gateway's), and the `X-Forwarded-*` headers the gateway sets.
//! Must not touch: routing or bodies.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

use crate::error::GatewayError;

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

/// Refuses what a gateway must not forward.
pub fn check_request(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), GatewayError> {
    if method == Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_owned(),
            allowed: ALLOWED_METHODS,
        });
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err(GatewayError::BadHost);
    }
    Ok(())
}

/// Removes hop-by-hop headers, including those named in `Connection` (but never the protected
/// ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| !PROTECTED.contains(n))
            .collect();
        for h in &named {
            headers.remove(h);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("proxy-connection");
}

/// Removes what only the gateway may tell a replica.
pub fn strip_client_only(headers: &mut HeaderMap) {
    for h in &CLIENT_MAY_NOT_SET {
        headers.remove(h);
    }
}

/// `X-Forwarded-For` (appended to the client's chain), `-Proto` and `-Host`.
pub fn set_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: Option<HeaderValue>) {
    let ip = client.ip().to_canonical().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = host {
        headers.insert("x-forwarded-host", h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_including_connection_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn connection_cannot_strip_host_or_framing() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, content-length, content-type, x-forwarded-for"),
        );
        h.insert(header::HOST, HeaderValue::from_static("example.test"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::HOST], "example.test");
        assert_eq!(h[header::CONTENT_LENGTH], "3");
        assert_eq!(h[header::CONTENT_TYPE], "text/plain");
        assert!(
            !h.contains_key("x-forwarded-for"),
            "the gateway sets its own chain"
        );
    }

    #[test]
    fn what_only_the_gateway_may_say_is_removed() {
        let mut h = HeaderMap::new();
        h.insert("proxy", HeaderValue::from_static("http://evil:8080"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x-real-ip", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_client_only(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn connect_and_two_hosts_are_refused() {
        let mut h = HeaderMap::new();
        assert!(check_request(&Method::GET, "/", &h).is_ok());
        let e = check_request(&Method::CONNECT, "/", &h).expect_err("no tunnels");
        assert_eq!(e.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        h.append(header::HOST, HeaderValue::from_static("a"));
        assert!(check_request(&Method::GET, "/", &h).is_ok());
        h.append(header::HOST, HeaderValue::from_static("b"));
        let e = check_request(&Method::GET, "/", &h).expect_err("two hosts");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn forwarded_headers_append_to_an_existing_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        set_forwarded(
            &mut h,
            "[::ffff:10.0.0.7]:999".parse().expect("addr"),
            Some(HeaderValue::from_static("example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }
}
