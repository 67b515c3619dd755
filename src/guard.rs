//! The admin guard: who may call `/add`, `/rm`, `/lb/status`, `/lb/metrics` (and the status page).
//!
//! Owns: [`check`], a pure function of the request's client address and headers, the `[admin]`
//! config and the replicas' addresses, with a typed [`Denied`] reason. The rules, in order:
//! - the client address must be in `admin.allow` (loopback only by default);
//! - a replica's own address is never admin, whatever `admin.allow` says (with the `process`
//!   provider replicas share `127.0.0.1` with the operator, so the rule cannot tell them apart:
//!   use `admin.token` there);
//! - what only a browser tricked into a cross-site request sends is refused: an `Origin` that
//!   is not this gateway, `Sec-Fetch-Site: cross-site` (`curl -d` sends neither);
//! - `Host` must name this gateway: an IP address, `localhost`, or a name in `admin.hosts`
//!   (a DNS-rebinding page names the attacker's domain);
//! - with `admin.token` set, `Authorization: Bearer <token>`, compared exactly and in constant
//!   time; or HTTP Basic with the token as the password (any user name), which is what a
//!   browser can send for the operator page: it asks once and resends it to this origin only
//!   (the origin rules above stop another site from riding on it).
//!
//! Must not touch: anything else; `admin` calls it and `error.rs` turns a refusal into 403/401.

use std::fmt;
use std::net::IpAddr;

use http::header::{self, HeaderMap};

use crate::config::AdminConfig;

/// Why an admin call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The client address is not in `admin.allow`.
    NotAllowed,
    /// The client is one of the replicas.
    Replica,
    /// A browser's cross-site request (the origin it came from).
    CrossSite(String),
    /// `Host` does not name this gateway (the host it named).
    ForeignHost(String),
    /// No or a wrong bearer token (401, not 403).
    Token,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::NotAllowed => f.write_str("admin.allow does not include it"),
            Denied::Replica => {
                f.write_str("it is a replica's address, and replicas are never admin")
            }
            Denied::CrossSite(origin) => write!(
                f,
                "cross-site requests are refused (the request came from {origin:?}, not from this gateway)"
            ),
            Denied::ForeignHost(host) => write!(
                f,
                "Host {host:?} does not name this gateway: use its IP address or localhost, or list the name in admin.hosts"
            ),
            Denied::Token => f.write_str("a bearer token is needed"),
        }
    }
}

/// Checks one admin call.
pub fn check(
    admin: &AdminConfig,
    replica_ips: &[IpAddr],
    client: IpAddr,
    headers: &HeaderMap,
    authority: Option<&str>,
) -> Result<(), Denied> {
    let client = client.to_canonical();
    if !admin.allows(client) {
        return Err(Denied::NotAllowed);
    }
    if replica_ips.contains(&client) {
        return Err(Denied::Replica);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(authority);
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("(not text)");
        let same = host.is_some_and(|h| origin_authority(origin).eq_ignore_ascii_case(h));
        if !same {
            return Err(Denied::CrossSite(origin.to_owned()));
        }
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes().eq_ignore_ascii_case(b"cross-site") {
            return Err(Denied::CrossSite("another site (Sec-Fetch-Site)".into()));
        }
    }
    if let Some(h) = host {
        if !names_this_gateway(h, &admin.hosts) {
            return Err(Denied::ForeignHost(h.to_owned()));
        }
    }
    if let Some(token) = admin.token() {
        let given = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(credential);
        if !given.is_some_and(|g| constant_time_eq(&g, token.as_bytes())) {
            return Err(Denied::Token);
        }
    }
    Ok(())
}

/// `https://host:port` → `host:port` (an opaque origin such as `null` stays as it is).
fn origin_authority(origin: &str) -> &str {
    origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .unwrap_or(origin)
}

/// An IP literal (with or without port, IPv6 in brackets), `localhost`, `*.localhost`, or one
/// of `extra`.
fn names_this_gateway(host: &str, extra: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port or [v6], and nothing else after the bracket: `[::1]evil.example` names
        // another host to whoever reads the bracket as ending only the address.
        return rest.split_once(']').is_some_and(|(ip, after)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (after.is_empty() || after.strip_prefix(':').is_some_and(is_port))
        });
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| is_port(port))
            .map(|(name, _)| name)
            .unwrap_or(host)
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || extra.iter().any(|e| e.eq_ignore_ascii_case(name))
}

/// `port = *DIGIT` (RFC 3986 §3.2.3: it may be empty).
fn is_port(port: &str) -> bool {
    port.bytes().all(|b| b.is_ascii_digit())
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1; the token is
/// taken exactly as sent).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

/// The secret of `Bearer <token>`, or the password of `Basic base64(user:password)`.
fn credential(value: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    if let Some(token) = bearer(value) {
        return Some(token.into());
    }
    let (scheme, encoded) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec().into())
}

/// Equal contents, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn local(pairs: &[(&str, &str)]) -> Result<(), Denied> {
        check(
            &AdminConfig::default(),
            &[],
            ip("127.0.0.1"),
            &headers(pairs),
            None,
        )
    }

    #[test]
    fn curl_from_this_host_passes() {
        assert_eq!(
            local(&[
                ("host", "localhost:5000"),
                ("content-type", "application/x-www-form-urlencoded")
            ]),
            Ok(())
        );
        assert_eq!(local(&[("host", "127.0.0.1:5000")]), Ok(()));
        assert_eq!(local(&[("host", "[::1]:5000")]), Ok(()));
        assert_eq!(local(&[]), Ok(()), "HTTP/1.0 without Host");
    }

    #[test]
    fn only_loopback_by_default() {
        let h = headers(&[("host", "10.0.0.1:5000")]);
        let a = AdminConfig::default();
        assert_eq!(
            check(&a, &[], ip("10.0.0.9"), &h, None),
            Err(Denied::NotAllowed)
        );
        assert_eq!(check(&a, &[], ip("::ffff:127.0.0.1"), &h, None), Ok(()));
    }

    #[test]
    fn replicas_are_never_admin() {
        let a = AdminConfig {
            allow: vec!["172.18.0.0/16".parse().expect("net")],
            ..AdminConfig::default()
        };
        let h = headers(&[("host", "172.18.0.1:5000")]);
        let replicas = [ip("172.18.0.3")];
        assert_eq!(
            check(&a, &replicas, ip("172.18.0.3"), &h, None),
            Err(Denied::Replica)
        );
        assert_eq!(check(&a, &replicas, ip("172.18.0.4"), &h, None), Ok(()));
    }

    #[test]
    fn cross_site_requests_are_refused() {
        assert!(matches!(
            local(&[
                ("host", "localhost:5000"),
                ("origin", "https://evil.example")
            ]),
            Err(Denied::CrossSite(_))
        ));
        assert!(matches!(
            local(&[("host", "localhost:5000"), ("origin", "null")]),
            Err(Denied::CrossSite(_))
        ));
        assert!(matches!(
            local(&[("host", "localhost:5000"), ("sec-fetch-site", "cross-site")]),
            Err(Denied::CrossSite(_))
        ));
        assert_eq!(
            local(&[
                ("host", "localhost:5000"),
                ("origin", "http://localhost:5000")
            ]),
            Ok(()),
            "the gateway's own page"
        );
        assert_eq!(
            local(&[
                ("host", "localhost:5000"),
                ("sec-fetch-site", "same-origin")
            ]),
            Ok(())
        );
    }

    #[test]
    fn dns_rebinding_hosts_are_refused() {
        assert_eq!(
            local(&[("host", "evil.example:5000")]),
            Err(Denied::ForeignHost("evil.example:5000".into()))
        );
        assert!(local(&[("host", "app.localhost")]).is_ok());
        for foreign in [
            "[::1]evil.example",
            "[::1].evil.example:5000",
            "[::1]:5000evil",
            "[::1]:5000:80",
            "[evil.example]",
        ] {
            assert_eq!(
                local(&[("host", foreign)]),
                Err(Denied::ForeignHost(foreign.into())),
                "{foreign}"
            );
        }
        assert_eq!(local(&[("host", "[::1]")]), Ok(()));
        assert_eq!(local(&[("host", "[::1]:")]), Ok(()), "an empty port");
        let a = AdminConfig {
            hosts: vec!["lb.internal".into()],
            ..AdminConfig::default()
        };
        let h = headers(&[("host", "LB.internal:5000")]);
        assert_eq!(check(&a, &[], ip("127.0.0.1"), &h, None), Ok(()));
        let h2 = HeaderMap::new();
        assert_eq!(
            check(&a, &[], ip("127.0.0.1"), &h2, Some("evil.example")),
            Err(Denied::ForeignHost("evil.example".into())),
            "HTTP/2 :authority counts as Host"
        );
    }

    #[test]
    fn the_token_is_exact() {
        let a = AdminConfig {
            token: Some("s3cret".into()),
            ..AdminConfig::default()
        };
        let call = |auth: Option<&str>| {
            let mut pairs = vec![("host", "localhost")];
            if let Some(v) = auth {
                pairs.push(("authorization", v));
            }
            check(&a, &[], ip("127.0.0.1"), &headers(&pairs), None)
        };
        assert_eq!(call(Some("Bearer s3cret")), Ok(()));
        assert_eq!(
            call(Some("bearer s3cret")),
            Ok(()),
            "the scheme is case-insensitive"
        );
        assert_eq!(call(None), Err(Denied::Token));
        assert_eq!(
            call(Some("Bearer s3cret ")),
            Err(Denied::Token),
            "no trimming"
        );
        assert_eq!(call(Some("Bearer  s3cret")), Err(Denied::Token));
        assert_eq!(call(Some("Bearer s3cre")), Err(Denied::Token));
        assert_eq!(
            call(Some("Basic s3cret")),
            Err(Denied::Token),
            "not base64 of user:password"
        );
    }

    #[test]
    fn a_browser_may_send_the_token_as_the_basic_password() {
        let a = AdminConfig {
            token: Some("s3cret".into()),
            ..AdminConfig::default()
        };
        let call = |auth: &str| {
            check(
                &a,
                &[],
                ip("127.0.0.1"),
                &headers(&[("host", "localhost"), ("authorization", auth)]),
                None,
            )
        };
        // base64("admin:s3cret"), base64(":s3cret"), base64("admin:s3cre"), base64("s3cret")
        assert_eq!(call("Basic YWRtaW46czNjcmV0"), Ok(()));
        assert_eq!(
            call("basic OnMzY3JldA=="),
            Ok(()),
            "any user name, even none"
        );
        assert_eq!(call("Basic YWRtaW46czNjcmU="), Err(Denied::Token));
        assert_eq!(call("Basic czNjcmV0"), Err(Denied::Token), "no colon");
        assert_eq!(call("Basic !!!"), Err(Denied::Token));
    }

    #[test]
    fn the_pages_own_fetches_pass() {
        // What Chromium sends for the page's fetch('status') and its POST to /lb/simulate.
        let get = [
            ("host", "127.0.0.1:5000"),
            ("sec-fetch-site", "same-origin"),
            ("sec-fetch-mode", "cors"),
            ("referer", "http://127.0.0.1:5000/lb/"),
        ];
        assert_eq!(local(&get), Ok(()));
        let post = [
            ("host", "127.0.0.1:5000"),
            ("origin", "http://127.0.0.1:5000"),
            ("sec-fetch-site", "same-origin"),
            ("content-type", "application/json"),
        ];
        assert_eq!(local(&post), Ok(()));
        let from_elsewhere = [
            ("host", "127.0.0.1:5000"),
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-site"),
        ];
        assert!(
            matches!(local(&from_elsewhere), Err(Denied::CrossSite(_))),
            "another port is another origin"
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
