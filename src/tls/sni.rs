//! Which certificate a handshake gets: the SNI resolver and the set it resolves from.
//!
//! Owns: [`CertSet`] (the validated certificates in config order, and the names each answers
//! to), [`CertSet::choose`] (pure: an SNI name in, a certificate out: an exact name first, then a
//! one-label wildcard, else the first certificate, the default) and [`Resolver`], which rustls
//! asks on every handshake and which reads the current set lock-free, so a swapped set serves
//! the very next handshake while established connections keep the certificate they started with.
//! Must not touch: files or validation (`certs`), or when a set is swapped (the watcher).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::{CertInfo, Certificate};

/// The certificates that serve, in config order: the first is the default.
#[derive(Debug)]
pub struct CertSet {
    certs: Vec<Certificate>,
}

impl CertSet {
    /// None for an empty list: a TLS listener always has a certificate to offer.
    pub fn new(certs: Vec<Certificate>) -> Option<CertSet> {
        (!certs.is_empty()).then_some(CertSet { certs })
    }

    pub fn infos(&self) -> impl Iterator<Item = &CertInfo> {
        self.certs.iter().map(|c| &c.info)
    }

    /// The index of the certificate for `server_name`: the first whose names contain it
    /// exactly, else the first whose wildcard (`*.example.com`) covers it, else the default.
    pub fn choose(&self, server_name: Option<&str>) -> usize {
        let Some(name) = server_name.map(|n| n.trim_end_matches('.')) else {
            return 0;
        };
        let names = |i: usize| self.certs[i].info.dns_names.iter();
        let exact = (0..self.certs.len()).find(|&i| names(i).any(|n| n.eq_ignore_ascii_case(name)));
        exact
            .or_else(|| {
                (0..self.certs.len())
                    .find(|&i| names(i).any(|pattern| wildcard_covers(pattern, name)))
            })
            .unwrap_or(0)
    }

    fn key(&self, i: usize) -> Arc<CertifiedKey> {
        self.certs[i].key.clone()
    }
}

/// Whether `*.example.com` covers `name`: exactly one label in place of the star (RFC 6125
/// §6.4.3), so it covers `a.example.com` but neither `example.com` nor `a.b.example.com`.
fn wildcard_covers(pattern: &str, name: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix("*.") else {
        return false;
    };
    name.split_once('.')
        .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
}

/// What rustls asks for a certificate on every handshake.
#[derive(Debug)]
pub struct Resolver {
    set: ArcSwap<CertSet>,
}

impl Resolver {
    pub fn new(set: CertSet) -> Resolver {
        Resolver {
            set: ArcSwap::from_pointee(set),
        }
    }

    /// New handshakes use `set` from now on.
    pub fn swap(&self, set: CertSet) {
        self.set.store(Arc::new(set));
    }

    pub fn current(&self) -> Arc<CertSet> {
        self.set.load_full()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        Some(set.key(set.choose(hello.server_name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&[&str]]) -> CertSet {
        let provider = rustls::crypto::ring::default_provider();
        let certs = names
            .iter()
            .map(|names| {
                let key =
                    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
                let params = rcgen::CertificateParams::new(
                    names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                )
                .expect("params");
                let cert = params.self_signed(&key).expect("cert");
                let pair = crate::config::CertificatePair {
                    cert: "c.pem".into(),
                    key: None,
                };
                let pem = format!("{}{}", cert.pem(), key.serialize_pem()).into_bytes();
                super::super::certs::from_pem(
                    &pair,
                    &super::super::certs::PairBytes {
                        cert: pem.clone(),
                        key: pem,
                    },
                    &provider,
                    std::time::SystemTime::now(),
                )
                .expect("valid")
            })
            .collect();
        CertSet::new(certs).expect("not empty")
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_default() {
        let s = set(&[
            &["default.test"],
            &["*.shop.test"],
            &["api.shop.test", "api.test"],
        ]);
        assert_eq!(s.choose(None), 0);
        assert_eq!(s.choose(Some("nobody.test")), 0);
        assert_eq!(s.choose(Some("default.test")), 0);
        assert_eq!(
            s.choose(Some("API.test")),
            2,
            "names compare case-insensitively"
        );
        assert_eq!(s.choose(Some("api.shop.test")), 2, "exact beats wildcard");
        assert_eq!(s.choose(Some("www.shop.test")), 1);
        assert_eq!(
            s.choose(Some("www.shop.test.")),
            1,
            "a trailing dot is the same name"
        );
        assert_eq!(s.choose(Some("shop.test")), 0, "a wildcard needs a label");
        assert_eq!(s.choose(Some("a.b.shop.test")), 0, "and only one");
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(wildcard_covers("*.a.test", "x.a.test"));
        assert!(!wildcard_covers("*.a.test", ".a.test"));
        assert!(!wildcard_covers("*.a.test", "a.test"));
        assert!(!wildcard_covers("a.test", "a.test"), "not a wildcard");
        assert!(CertSet::new(Vec::new()).is_none());
    }
}
