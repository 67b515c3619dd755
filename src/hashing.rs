//! Request keys and hash functions.
//!
//! Owns: where a request's key comes from (`hashing.key`), how a key becomes an integer, and the
//! built-in hash functions `H` (request → slot) and `Φ` (virtual node → slot).
//! Must not touch: the ring's layout, replicas, Lua (the policy module overrides these functions
//! from the outside), or anything that does I/O.
//!
//! Every function here is deterministic: routing must not depend on a randomly seeded hasher.
//! The only randomness is the documented fallback key for requests without one.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A built-in hash function, selectable in `[ring] request_hash` / `vnode_hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashFunction {
    /// The specified functions: `H(i) = i² + 2i + 17`, `Φ(i,j) = i² + j² + 2j + 25`.
    #[default]
    Quadratic,
    /// A 64-bit mixer (SplitMix64's finaliser): spreads consecutive keys over every slot.
    Mix64,
}

impl HashFunction {
    pub fn name(self) -> &'static str {
        match self {
            HashFunction::Quadratic => "quadratic",
            HashFunction::Mix64 => "mix64",
        }
    }

    /// The slot of request key `i` on a ring of `slots` positions.
    #[inline]
    pub fn request_slot(self, i: u64, slots: u32) -> u32 {
        match self {
            HashFunction::Quadratic => quadratic_request(i, slots),
            HashFunction::Mix64 => (mix64(i) % u64::from(slots)) as u32,
        }
    }

    /// The preferred slot of virtual node `j` of server `i` (before collision probing).
    #[inline]
    pub fn vnode_slot(self, i: u64, j: u32, slots: u32) -> u32 {
        match self {
            HashFunction::Quadratic => quadratic_vnode(i, j, slots),
            HashFunction::Mix64 => {
                let h = mix64(mix64(i) ^ u64::from(j).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                (h % u64::from(slots)) as u32
            }
        }
    }
}

impl fmt::Display for HashFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `H(i) = i² + 2i + 17 (mod slots)`.
///
/// `i² + 2i + 17` overflows even `u128` near `i = 2⁶⁴`, so the polynomial is evaluated on
/// `i mod slots`, which gives the same residue (polynomials commute with reduction) and keeps
/// every intermediate below `slots² + 2·slots + 17`.
#[inline]
pub fn quadratic_request(i: u64, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    ((r * r + 2 * r + 17) % s) as u32
}

/// `Φ(i, j) = i² + j² + 2j + 25 (mod slots)`, overflow-free for the same reason as `H`.
#[inline]
pub fn quadratic_vnode(i: u64, j: u32, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    let q = u128::from(j) % s;
    ((r * r + q * q + 2 * q + 25) % s) as u32
}

/// SplitMix64's output function: a bijection on `u64` with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Turns a request key into the integer the hash functions take: a decimal key (up to
/// `u64::MAX`) is its own value, anything else goes through 64-bit FNV-1a, which is fixed across
/// runs and machines.
pub fn key_to_int(key: &str) -> u64 {
    if !key.is_empty() && key.len() <= 20 && key.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = key.parse::<u64>() {
            return v;
        }
    }
    fnv1a64(key.as_bytes())
}

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The documented fallback for a request without a key: a random 6-digit id.
pub fn random_key() -> u64 {
    fastrand::u64(100_000..=999_999)
}

/// Where a request's key comes from (`[hashing] key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Query(String),
    Header(http::HeaderName),
    Cookie(String),
    ClientIp,
    Path,
    /// A gRPC call's method, `/package.Service/Method` (its path), present only on gRPC
    /// requests (`content-type: application/grpc*`), so a list can fall back for the rest.
    GrpcMethod,
    Random,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid key source {given:?}: expected query:<name>, header:<name>, cookie:<name>, client_ip, path, grpc_method or random")]
pub struct KeySourceError {
    pub given: String,
}

impl FromStr for KeySource {
    type Err = KeySourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || KeySourceError {
            given: s.to_owned(),
        };
        let named = |rest: &str| -> Result<String, KeySourceError> {
            if rest.is_empty() {
                Err(err())
            } else {
                Ok(rest.to_owned())
            }
        };
        match s.split_once(':') {
            Some(("query", rest)) => Ok(KeySource::Query(named(rest)?)),
            Some(("cookie", rest)) => Ok(KeySource::Cookie(named(rest)?)),
            Some(("header", rest)) => http::HeaderName::from_bytes(named(rest)?.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| err()),
            None if s == "client_ip" => Ok(KeySource::ClientIp),
            None if s == "path" => Ok(KeySource::Path),
            None if s == "grpc_method" => Ok(KeySource::GrpcMethod),
            None if s == "random" => Ok(KeySource::Random),
            _ => Err(err()),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Query(n) => write!(f, "query:{n}"),
            KeySource::Header(n) => write!(f, "header:{n}"),
            KeySource::Cookie(n) => write!(f, "cookie:{n}"),
            KeySource::ClientIp => f.write_str("client_ip"),
            KeySource::Path => f.write_str("path"),
            KeySource::GrpcMethod => f.write_str("grpc_method"),
            KeySource::Random => f.write_str("random"),
        }
    }
}

impl KeySource {
    /// The key text this source finds in a request, or `None` when it is absent (the caller
    /// then uses [`random_key`]).
    pub fn extract<'a>(
        &self,
        parts: &'a http::request::Parts,
        client_ip: IpAddr,
    ) -> Option<Cow<'a, str>> {
        match self {
            KeySource::Query(name) => query_param(parts.uri.query()?, name),
            KeySource::Header(name) => parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(Cow::Borrowed),
            KeySource::Cookie(name) => cookie_key(parts, name).map(Cow::Borrowed),
            KeySource::ClientIp => Some(Cow::Owned(client_ip.to_string())),
            KeySource::Path => Some(Cow::Borrowed(parts.uri.path())),
            KeySource::GrpcMethod => {
                crate::grpc::is_grpc(&parts.headers).then(|| Cow::Borrowed(parts.uri.path()))
            }
            KeySource::Random => None,
        }
    }
}

/// The value of cookie `name` in a request, if it sent one.
pub fn cookie_key<'a>(parts: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| cookie_value(v, name))
}

/// `[hashing] key`: one source, or a list whose first present source gives the key
/// (`["header:x-user", "cookie:session", "client_ip"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySources(pub Vec<KeySource>);

impl KeySources {
    pub fn one(source: KeySource) -> KeySources {
        KeySources(vec![source])
    }

    /// The key text of the first source present in the request, or `None` when none is (the
    /// caller then uses [`random_key`]).
    pub fn extract<'a>(
        &self,
        parts: &'a http::request::Parts,
        client_ip: IpAddr,
    ) -> Option<Cow<'a, str>> {
        self.0.iter().find_map(|s| s.extract(parts, client_ip))
    }
}

impl fmt::Display for KeySources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => one.fmt(f),
            many => {
                let names: Vec<String> = many.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", names.join(", "))
            }
        }
    }
}

/// The first value of `name` in a query string, percent-decoded when it needs to be.
fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name && !v.is_empty()).then(|| percent_decode(v))
    })
}

fn percent_decode(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name && !v.is_empty()).then_some(v.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn specified_h_values() {
        // H(i) = i² + 2i + 17 mod 512, computed by hand.
        assert_eq!(quadratic_request(0, 512), 17);
        assert_eq!(quadratic_request(1, 512), 20);
        assert_eq!(quadratic_request(10, 512), 137);
        assert_eq!(quadratic_request(100, 512), (10_000 + 200 + 17) % 512);
        assert_eq!(
            quadratic_request(123_456, 512),
            ((123_456u128 * 123_458 + 17) % 512) as u32
        );
    }

    #[test]
    fn specified_phi_values() {
        // Φ(i, j) = i² + j² + 2j + 25 mod 512.
        assert_eq!(quadratic_vnode(1, 0, 512), 26);
        assert_eq!(quadratic_vnode(1, 1, 512), 29);
        assert_eq!(quadratic_vnode(3, 8, 512), 9 + 64 + 16 + 25);
        assert_eq!(quadratic_vnode(30, 8, 512), (900 + 64 + 16 + 25) % 512);
    }

    #[test]
    fn quadratic_is_overflow_free_at_the_extremes() {
        for i in [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 32) + 7] {
            let exact = {
                // Exact value of i² + 2i + 17 mod 512 via (i mod 512).
                let r = u128::from(i % 512);
                ((r * r + 2 * r + 17) % 512) as u32
            };
            assert_eq!(quadratic_request(i, 512), exact);
            assert!(quadratic_vnode(i, u32::MAX, 512) < 512);
        }
    }

    proptest! {
        #[test]
        fn slots_are_in_range(i in any::<u64>(), j in 0u32..1000, slots in 1u32..100_000) {
            for f in [HashFunction::Quadratic, HashFunction::Mix64] {
                prop_assert!(f.request_slot(i, slots) < slots);
                prop_assert!(f.vnode_slot(i, j, slots) < slots);
            }
        }

        #[test]
        fn quadratic_matches_big_integer_arithmetic(i in any::<u64>(), slots in 1u32..4096) {
            // (i+1)² + 16 computed exactly as two 128-bit halves would overflow; compare with
            // the residue computed by repeated modular multiplication.
            let s = u128::from(slots);
            let im = u128::from(i) % s;
            let expected = ((im * im) % s + (2 * im) % s + 17) % s;
            prop_assert_eq!(u128::from(quadratic_request(i, slots)), expected);
        }
    }

    #[test]
    fn decimal_keys_are_their_own_value() {
        assert_eq!(key_to_int("123456"), 123_456);
        assert_eq!(key_to_int("18446744073709551615"), u64::MAX);
        // Overflowing or non-decimal text is hashed, deterministically.
        assert_eq!(
            key_to_int("18446744073709551616"),
            fnv1a64(b"18446744073709551616")
        );
        assert_eq!(key_to_int("alice"), fnv1a64(b"alice"));
        assert_eq!(key_to_int(""), fnv1a64(b""));
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn random_keys_are_six_digits() {
        for _ in 0..1000 {
            let k = random_key();
            assert!((100_000..=999_999).contains(&k));
        }
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid test request").into_parts().0
    }

    #[test]
    fn key_sources_parse_and_print() {
        for s in [
            "query:id",
            "header:x-user",
            "cookie:session",
            "client_ip",
            "path",
            "grpc_method",
            "random",
        ] {
            let k: KeySource = s.parse().expect("valid source");
            assert_eq!(k.to_string(), s);
        }
        for bad in ["", "query", "query:", "header:bad header", "ip", "cookie:"] {
            assert!(
                bad.parse::<KeySource>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn the_first_present_source_of_a_list_is_the_key() {
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let list = KeySources(
            ["header:x-user", "cookie:session", "client_ip"]
                .iter()
                .map(|s| s.parse().expect("source"))
                .collect(),
        );
        let p = parts("/", &[("cookie", "session=s-1"), ("x-user", "bob")]);
        assert_eq!(list.extract(&p, ip).as_deref(), Some("bob"));
        let p = parts("/", &[("cookie", "session=s-1")]);
        assert_eq!(list.extract(&p, ip).as_deref(), Some("s-1"));
        assert_eq!(
            list.extract(&parts("/", &[]), ip).as_deref(),
            Some("10.1.2.3")
        );
        let none = KeySources(vec!["query:id".parse().expect("source"), KeySource::Random]);
        assert_eq!(none.extract(&parts("/", &[]), ip), None, "then a random id");
        assert_eq!(
            list.to_string(),
            "[header:x-user, cookie:session, client_ip]"
        );
        assert_eq!(KeySources::one(KeySource::Path).to_string(), "path");
    }

    #[test]
    fn key_extraction() {
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let p = parts(
            "/home?x=1&id=42&id=43",
            &[("x-user", "bob"), ("cookie", "a=1; session=\"s-9\"; b=2")],
        );
        let get = |s: &str| {
            s.parse::<KeySource>()
                .expect("source")
                .extract(&p, ip)
                .map(|c| c.into_owned())
        };
        assert_eq!(get("query:id").as_deref(), Some("42"));
        assert_eq!(get("query:nope"), None);
        assert_eq!(get("header:x-user").as_deref(), Some("bob"));
        assert_eq!(get("cookie:session").as_deref(), Some("s-9"));
        assert_eq!(get("cookie:zzz"), None);
        assert_eq!(get("client_ip").as_deref(), Some("10.1.2.3"));
        assert_eq!(get("path").as_deref(), Some("/home"));
        assert_eq!(get("random"), None);
        let enc = parts("/?id=a%20b+c%2", &[]);
        let k: KeySource = "query:id".parse().expect("source");
        assert_eq!(k.extract(&enc, ip).as_deref(), Some("a b c%2"));
        let empty = parts("/?id=", &[]);
        assert_eq!(k.extract(&empty, ip), None);
    }

    #[test]
    fn the_grpc_method_is_a_key_of_grpc_calls_only() {
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let m: KeySource = "grpc_method".parse().expect("source");
        let call = parts(
            "/demo.Demo/Who",
            &[("content-type", "application/grpc+proto")],
        );
        assert_eq!(m.extract(&call, ip).as_deref(), Some("/demo.Demo/Who"));
        let call = parts("/demo.Demo/Who", &[("content-type", "Application/GRPC")]);
        assert_eq!(m.extract(&call, ip).as_deref(), Some("/demo.Demo/Who"));
        for ct in [
            "application/json",
            "application/grpc-web",
            "application/grpcx",
        ] {
            let p = parts("/demo.Demo/Who", &[("content-type", ct)]);
            assert_eq!(m.extract(&p, ip), None, "{ct}");
        }
        assert_eq!(m.extract(&parts("/home", &[]), ip), None);
    }
}
