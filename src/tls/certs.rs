//! Certificate and key files: PEM in, a validated certificate out.
//!
//! Owns: reading a certificate chain and its private key (PEM), and every check a pair must pass
//! before it may serve a handshake: the chain parses (each certificate is X.509), the key is one
//! the crypto provider can sign with and belongs to the first certificate, and no certificate of
//! the chain is expired or not yet valid. Also the details `/lb/status` and `/lb/metrics` show:
//! subject, issuer, names (SANs) and validity.
//! Must not touch: which certificate a handshake gets (`sni`) or when files are read again (the
//! watcher). [`from_pem`] is pure: bytes and a clock in, a certificate or an error out.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use x509_parser::extensions::GeneralName;

use crate::config::source_file::{read_source_file, FileReadError};
use crate::config::CertificatePair;

/// Largest certificate or key file read: a chain with its intermediates is a few KiB, a file
/// that also holds a CA bundle a few hundred.
pub const MAX_CERT_FILE: u64 = 1 << 20;

/// Why a certificate/key pair cannot serve. Each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source} (check tls.certificates and the file's permissions)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: FileReadError,
    },
    #[error("{}: no PEM certificate in it (expected -----BEGIN CERTIFICATE----- blocks: the server's certificate first, then its intermediates)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: broken PEM ({detail}); a file cut off while it was written looks like this: write the new file beside it and rename it over the old one", path.display())]
    BadPem { path: PathBuf, detail: String },
    #[error("{}: no private key in it (expected -----BEGIN PRIVATE KEY-----, -----BEGIN EC PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: certificate {index} of the chain is not valid X.509: {detail}", path.display())]
    BadCertificate {
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("{}: the private key cannot be used: {detail} (ECDSA P-256/P-384, Ed25519 and RSA keys are supported)", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("{}: this private key does not belong to the certificate in {} (their public keys differ): install the key that was issued with this certificate", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: certificate {index} of the chain ({subject}) expired at {at}: renew it", path.display())]
    Expired {
        path: PathBuf,
        index: usize,
        subject: String,
        at: String,
    },
    #[error("{}: certificate {index} of the chain ({subject}) is not valid before {at}: check the clock, or install it once it is valid", path.display())]
    NotYetValid {
        path: PathBuf,
        index: usize,
        subject: String,
        at: String,
    },
}

impl CertError {
    /// A key that does not match its certificate: what a pair looks like half-way through being
    /// replaced file by file.
    pub fn is_key_mismatch(&self) -> bool {
        matches!(self, CertError::KeyMismatch { .. })
    }

    /// A read that failed for the process's own shortage of descriptors, not for the file.
    pub fn is_local_resource(&self) -> bool {
        matches!(self, CertError::Read { source, .. } if source.is_local_resource())
    }
}

/// What `/lb/status` shows of one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    pub cert_file: String,
    pub key_file: String,
    pub subject: String,
    pub issuer: String,
    /// DNS names (SANs), which SNI is matched against.
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    /// Validity of the server's certificate, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// Certificates in the file: the server's and its intermediates.
    pub chain_length: usize,
}

/// A validated pair, ready for handshakes.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// The raw content of a pair's files (the watcher compares these between reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairBytes {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// Reads a pair's files: regular files of at most [`MAX_CERT_FILE`] bytes, opened without
/// blocking (see [`read_source_file`]).
pub fn read(pair: &CertificatePair) -> Result<PairBytes, CertError> {
    let read = |path: &Path| {
        read_source_file(path, MAX_CERT_FILE).map_err(|source| CertError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert = read(&pair.cert)?;
    let key = match &pair.key {
        Some(k) => read(k)?,
        None => cert.clone(),
    };
    Ok(PairBytes { cert, key })
}

/// A certificate's time (Unix seconds) in RFC 3339, as the whole crate writes times
/// ([`crate::rfc3339`]).
pub fn rfc3339(secs: i64) -> String {
    crate::rfc3339::unix(secs)
}

fn pem_error(path: &Path, e: pem::Error) -> CertError {
    let detail = match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(&end_marker);
            let label = label.trim().trim_matches('-').trim_start_matches("END ");
            format!("a -----BEGIN {label}----- block has no -----END {label}----- line")
        }
        other => other.to_string(),
    };
    CertError::BadPem {
        path: path.to_owned(),
        detail,
    }
}

/// Validates a pair from its files' content at time `now`.
pub fn from_pem(
    pair: &CertificatePair,
    bytes: &PairBytes,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Certificate, CertError> {
    let (cert_path, key_path) = (pair.cert.as_path(), pair.key_file());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(cert_path, e))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let now = crate::rfc3339::unix_seconds(now);
    let mut info = None;
    for (i, der) in chain.iter().enumerate() {
        let index = i + 1;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::BadCertificate {
                path: cert_path.to_owned(),
                index,
                detail: e.to_string(),
            })?;
        let subject = cert.subject().to_string();
        let (not_before, not_after) = (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        );
        if not_after < now {
            return Err(CertError::Expired {
                path: cert_path.to_owned(),
                index,
                subject,
                at: rfc3339(not_after),
            });
        }
        if not_before > now {
            return Err(CertError::NotYetValid {
                path: cert_path.to_owned(),
                index,
                subject,
                at: rfc3339(not_before),
            });
        }
        if i == 0 {
            let (mut dns_names, mut ip_addresses) = (Vec::new(), Vec::new());
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for name in &san.value.general_names {
                    match name {
                        GeneralName::DNSName(n) => dns_names.push(n.to_ascii_lowercase()),
                        GeneralName::IPAddress(b) => {
                            let ip = match b.len() {
                                4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                                16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                                _ => None,
                            };
                            ip_addresses.extend(ip.map(|ip| ip.to_string()));
                        }
                        _ => {}
                    }
                }
            }
            info = Some(CertInfo {
                cert_file: cert_path.display().to_string(),
                key_file: key_path.display().to_string(),
                subject,
                issuer: cert.issuer().to_string(),
                dns_names,
                ip_addresses,
                not_before,
                not_after,
                chain_length: chain.len(),
            });
        }
    }
    let key_der = PrivateKeyDer::from_pem_slice(&bytes.key).map_err(|e| match e {
        pem::Error::NoItemsFound => CertError::NoKey {
            path: key_path.to_owned(),
        },
        other => pem_error(key_path, other),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| CertError::BadKey {
            path: key_path.to_owned(),
            detail: e.to_string(),
        })?;
    let key = CertifiedKey::new(chain, signing_key);
    match key.keys_match() {
        // A key type whose public half the provider cannot derive: nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(e) => {
            return Err(CertError::BadCertificate {
                path: cert_path.to_owned(),
                index: 1,
                detail: e.to_string(),
            })
        }
    }
    let info = info.ok_or_else(|| CertError::NoCertificate {
        path: cert_path.to_owned(),
    })?;
    Ok(Certificate {
        key: Arc::new(key),
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    fn pair() -> CertificatePair {
        CertificatePair {
            cert: "c.pem".into(),
            key: Some("k.pem".into()),
        }
    }

    /// A self-signed ECDSA P-256 certificate for `names`, valid from `from` to `to` (days
    /// relative to now), and its key.
    fn generate(names: &[&str], from: i64, to: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(from);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(to);
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    fn check(cert: &str, key: &str) -> Result<Certificate, CertError> {
        from_pem(
            &pair(),
            &PairBytes {
                cert: cert.as_bytes().to_vec(),
                key: key.as_bytes().to_vec(),
            },
            &provider(),
            SystemTime::now(),
        )
    }

    #[test]
    fn a_valid_pair_loads_with_its_details() {
        let (cert, key) = generate(&["example.test", "*.example.test"], -1, 30);
        let c = check(&cert, &key).expect("valid");
        assert_eq!(c.info.dns_names, ["example.test", "*.example.test"]);
        assert!(c.info.subject.contains("CN=example.test"), "{:?}", c.info);
        assert_eq!(c.info.chain_length, 1);
        let left = c.info.not_after - crate::rfc3339::unix_seconds(SystemTime::now());
        assert!((29 * 86400..=31 * 86400).contains(&left), "{left}");
        // A combined file: certificate and key in one.
        let both = format!("{cert}{key}");
        assert!(check(&both, &both).is_ok());
    }

    #[test]
    fn bad_pairs_are_rejected_with_what_is_wrong() {
        let (cert, key) = generate(&["a.test"], -1, 30);
        let (_, other_key) = generate(&["b.test"], -1, 30);
        let e = check(&cert, &other_key).expect_err("mismatch");
        assert!(e.is_key_mismatch(), "{e}");
        assert!(
            e.to_string().contains("does not belong to the certificate"),
            "{e}"
        );

        let cut = &cert[..cert.len() / 2];
        let e = check(cut, &key).expect_err("truncated").to_string();
        assert!(
            e.contains("broken PEM") && e.contains("END CERTIFICATE"),
            "{e}"
        );
        let e = check(&cert, &key[..key.len() / 2])
            .expect_err("truncated key")
            .to_string();
        assert!(e.contains("k.pem: broken PEM"), "{e}");

        let (old, old_key) = generate(&["old.test"], -30, -1);
        let e = check(&old, &old_key).expect_err("expired").to_string();
        assert!(e.contains("expired at") && e.contains("CN=old.test"), "{e}");
        let (new, new_key) = generate(&["new.test"], 2, 30);
        let e = check(&new, &new_key).expect_err("not yet").to_string();
        assert!(e.contains("not valid before"), "{e}");

        let e = check("", &key).expect_err("empty").to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = check(&cert, &cert).expect_err("no key").to_string();
        assert!(e.contains("no private key"), "{e}");
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = check(garbage, &key).expect_err("not x509").to_string();
        assert!(
            e.contains("certificate 1 of the chain is not valid X.509"),
            "{e}"
        );
    }

    #[test]
    fn a_key_path_that_is_a_fifo_is_an_error_not_a_hung_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _) = generate(&["a.test"], -1, 30);
        let pair = CertificatePair {
            cert: dir.path().join("c.pem"),
            key: Some(dir.path().join("k.pem")),
        };
        std::fs::write(&pair.cert, cert).expect("write");
        let made = std::process::Command::new("mkfifo")
            .arg(pair.key_file())
            .status()
            .map(|s| s.success());
        assert!(matches!(made, Ok(true)), "mkfifo");
        let e = read(&pair).expect_err("a FIFO key is an error");
        assert!(!e.is_local_resource());
        let text = e.to_string();
        assert!(text.contains("k.pem") && text.contains("FIFO"), "{text}");
    }

    #[test]
    fn times_render_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            crate::rfc3339::unix_seconds(UNIX_EPOCH + Duration::from_secs(5)),
            5
        );
    }
}
