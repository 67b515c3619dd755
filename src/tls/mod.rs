//! TLS termination: the handshake's configuration, the certificates and their live swap.
//!
//! Owns: [`Tls`], the rustls server configuration (TLS 1.2 and 1.3 with rustls's safe defaults
//! on the `ring` provider, ALPN `h2` and `http/1.1`, the certificate chosen by SNI), the set of
//! certificates serving now and what `/lb/status` and `/lb/metrics` say about it
//! ([`TlsReport`], published by [`Tls::report`]); the parts live in the submodules: [`certs`]
//! (PEM files to a validated certificate), [`sni`] (which certificate a handshake gets) and
//! [`redirect`] (plain HTTP sent to HTTPS) and [`upstream`] (TLS towards the replicas).
//! Must not touch: connections (the listener runs the handshake with [`Tls::acceptor`], under its
//! first-bytes deadline) or when files are read (the watcher settles them, validates them with
//! [`Tls::validate`], then calls [`Tls::apply`] or [`Tls::reject`]).

pub mod certs;
pub mod redirect;
pub mod sni;
pub mod upstream;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;
use serde::Serialize;

use crate::config::{CertificatePair, TlsConfig, TlsVersion};
use crate::metrics::Metrics;
use certs::{CertError, CertInfo, PairBytes};
use sni::{CertSet, Resolver};

/// The ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Marks a request that came over TLS (a request extension set by the listener): the proxy then
/// sends `X-Forwarded-Proto: https`. Absent on plain HTTP, so the plain path carries nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Https;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("tls.enabled needs at least one certificate in tls.certificates")]
    NoCertificate,
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("[provider] upstream_tls: {0}")]
    UpstreamCa(String),
}

/// What `/lb/status` shows under `tls`, and what the certificate metrics are rendered from.
#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    pub certificates: Vec<CertInfo>,
    /// Why the last edit of a certificate or key file was rejected (the certificates above keep
    /// serving); None once the files are valid again.
    pub last_error: Option<String>,
    /// When the certificates above were applied (RFC 3339).
    pub applied_at: String,
}

impl TlsReport {
    /// The report as JSON, with each certificate's seconds to expiry at `now`.
    pub fn status(&self, now: SystemTime) -> serde_json::Value {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let certificates: Vec<serde_json::Value> = self
            .certificates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("default".into(), (i == 0).into());
                    o.insert("not_after_utc".into(), certs::rfc3339(c.not_after).into());
                    o.insert("expires_in_seconds".into(), (c.not_after - now).into());
                }
                v
            })
            .collect();
        serde_json::json!({
            "certificates": certificates,
            "last_error": self.last_error,
            "applied_at": self.applied_at,
        })
    }
}

/// TLS termination for the HTTPS listener: one per gateway, shared by every serving thread.
pub struct Tls {
    server: Arc<ServerConfig>,
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
    metrics: Arc<Metrics>,
    /// What `/lb/status` and `/lb/metrics` show: replaced whole on every apply or reject, read
    /// by a scrape without a lock.
    report: ArcSwap<TlsReport>,
    /// The files' content the gateway started with (the watcher's first "last read").
    started_with: Vec<PairBytes>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// The crypto provider every TLS part of the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and validates every pair (for `ringgate check` and start-up): the set and the files'
/// content, or the first problem found.
pub fn load_all(
    pairs: &[CertificatePair],
    provider: &CryptoProvider,
) -> Result<(CertSet, Vec<PairBytes>), TlsError> {
    let bytes = pairs
        .iter()
        .map(certs::read)
        .collect::<Result<Vec<_>, _>>()?;
    let set = validate(pairs, &bytes, provider)?;
    Ok((set, bytes))
}

/// Validates the content of `pairs`' files at the current time.
pub fn validate(
    pairs: &[CertificatePair],
    bytes: &[PairBytes],
    provider: &CryptoProvider,
) -> Result<CertSet, TlsError> {
    let now = SystemTime::now();
    let certs = pairs
        .iter()
        .zip(bytes)
        .map(|(p, b)| certs::from_pem(p, b, provider, now))
        .collect::<Result<Vec<_>, _>>()?;
    CertSet::new(certs).ok_or(TlsError::NoCertificate)
}

impl Tls {
    /// Loads the certificates (every problem is an error: a gateway does not start on a bad
    /// certificate) and builds the server configuration.
    pub fn new(config: &TlsConfig, metrics: Arc<Metrics>) -> Result<Arc<Tls>, TlsError> {
        let provider = provider();
        let (set, started_with) = load_all(&config.certificates, &provider)?;
        let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let resolver = Arc::new(Resolver::new(set));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let report = ArcSwap::from_pointee(TlsReport {
            certificates: resolver.current().infos().cloned().collect(),
            last_error: None,
            applied_at: crate::rfc3339::seconds(SystemTime::now()),
        });
        let tls = Arc::new(Tls {
            server: Arc::new(server),
            resolver,
            provider,
            metrics,
            report,
            started_with,
        });
        for c in tls.resolver.current().infos() {
            tracing::info!(cert = %c.cert_file, subject = %c.subject, names = ?c.dns_names, not_after = %certs::rfc3339(c.not_after), "TLS certificate loaded");
        }
        Ok(tls)
    }

    /// The acceptor for one handshake (a reference to the shared configuration).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Validates the content of `pairs`' files (read by the caller) at the current time.
    pub fn validate(
        &self,
        pairs: &[CertificatePair],
        bytes: &[PairBytes],
    ) -> Result<CertSet, TlsError> {
        validate(pairs, bytes, &self.provider)
    }

    /// The files' content the gateway started with.
    pub fn started_with(&self) -> &[PairBytes] {
        &self.started_with
    }

    /// New handshakes use `set` from now on; established connections keep theirs.
    pub fn apply(&self, set: CertSet) {
        for c in set.infos() {
            tracing::info!(cert = %c.cert_file, subject = %c.subject, names = ?c.dns_names, not_after = %certs::rfc3339(c.not_after), "TLS certificate applied");
        }
        self.resolver.swap(set);
        self.metrics.tls_reloads.fetch_add(1, Ordering::Relaxed);
        self.publish(None);
    }

    /// Records a rejected edit: nothing changes but the error shown in `/lb/status`.
    pub fn reject(&self, error: &str) {
        tracing::error!(error = %error, "TLS certificate edit rejected; the current certificates keep serving");
        self.metrics
            .tls_reload_errors
            .fetch_add(1, Ordering::Relaxed);
        self.publish(Some(error.to_owned()));
    }

    /// The certificates serving now.
    pub fn current(&self) -> Vec<CertInfo> {
        self.resolver.current().infos().cloned().collect()
    }

    /// The certificates serving now and the last rejected edit, for `/lb/status` and
    /// `/lb/metrics`.
    pub fn report(&self) -> Arc<TlsReport> {
        self.report.load_full()
    }

    fn publish(&self, last_error: Option<String>) {
        // A rejected edit changes nothing that serves: the certificates keep their time.
        let applied_at = match &last_error {
            Some(_) => self.report.load().applied_at.clone(),
            None => crate::rfc3339::seconds(SystemTime::now()),
        };
        self.report.store(Arc::new(TlsReport {
            certificates: self.current(),
            last_error,
            applied_at,
        }));
    }
}
