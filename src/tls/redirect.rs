//! Plain HTTP redirected to HTTPS (`tls.http = "redirect"`).
//!
//! Owns: which requests are redirected (all but the gateway's own `/lb/` endpoints, so health
//! checks and scrapers on the plain port keep working), the `https://` location built from the
//! request's own host and target, and the 308 response (308 keeps the method and body, so a
//! redirected `POST /add` stays a POST).
//! Must not touch: connections or anything the request is about; the listener asks, this answers.

use http::{HeaderValue, Response, StatusCode};

use crate::answer::full;
use crate::rescue::GatewayError;
use crate::wire::body::Body;

/// Whether a plain-HTTP request for `path` is redirected.
pub fn redirects(path: &str) -> bool {
    !(path == "/lb" || path.starts_with("/lb/"))
}

/// `https://HOST[:PORT]TARGET` for a request that named `host` (its `Host` header or URI
/// authority, with or without a port) and `target` (path and query); the port is left out when
/// it is 443. None for a host that is not a plain host name or IP address.
pub fn location(host: &str, target: &str, https_port: u16) -> Option<String> {
    let name = host_without_port(host)?;
    let plain_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let ipv6 = name.len() > 2
        && name.starts_with('[')
        && name.ends_with(']')
        && name[1..name.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok();
    if !(plain_name || ipv6) {
        return None;
    }
    let target = if target.starts_with('/') { target } else { "/" };
    Some(if https_port == 443 {
        format!("https://{name}{target}")
    } else {
        format!("https://{name}:{https_port}{target}")
    })
}

fn host_without_port(host: &str) -> Option<&str> {
    let port_ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        return (rest.is_empty() || rest.strip_prefix(':').is_some_and(port_ok))
            .then_some(&host[..=end]);
    }
    match host.split_once(':') {
        None => Some(host),
        Some((name, port)) => port_ok(port).then_some(name),
    }
}

/// The answer on the plain listener: a 308 to `location`, or a 400 without a usable host.
pub fn response(location: Option<String>) -> Response<Body> {
    let Some(url) = location.and_then(|l| HeaderValue::from_str(&l).ok()) else {
        return GatewayError::NoHostToRedirect.into_response();
    };
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(http::header::LOCATION, url);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_location_is_the_request_on_https() {
        assert_eq!(
            location("example.test:5000", "/home?id=1", 5443).as_deref(),
            Some("https://example.test:5443/home?id=1")
        );
        assert_eq!(
            location("example.test", "/", 443).as_deref(),
            Some("https://example.test/")
        );
        assert_eq!(
            location("[::1]:5000", "/x", 5443).as_deref(),
            Some("https://[::1]:5443/x")
        );
        assert_eq!(
            location("127.0.0.1", "*", 5443).as_deref(),
            Some("https://127.0.0.1:5443/")
        );
    }

    #[test]
    fn hosts_that_are_not_names_get_no_location() {
        for bad in [
            "",
            "evil.test/path",
            "user@evil.test",
            "a b",
            "x:port",
            "[::1",
            "[nope]",
            "[::1]x",
        ] {
            assert_eq!(location(bad, "/", 5443), None, "{bad:?}");
        }
    }

    #[test]
    fn the_gateways_own_endpoints_stay_on_plain_http() {
        for p in ["/lb", "/lb/health", "/lb/metrics"] {
            assert!(!redirects(p), "{p}");
        }
        for p in ["/", "/home", "/rep", "/add", "/lbx"] {
            assert!(redirects(p), "{p}");
        }
        assert_eq!(
            response(None).status(),
            StatusCode::BAD_REQUEST,
            "no host, no redirect"
        );
        let r = response(Some("https://a.test:5443/".into()));
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[http::header::LOCATION], "https://a.test:5443/");
    }
}
