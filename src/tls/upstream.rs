//! TLS towards the replicas (`[provider] upstream_tls`): the client configuration, verified
//! against the configured CA.
//!
//! Owns: [`UpstreamTls`] (the connector, the name each replica's certificate must carry: the
//! configured `upstream_server_name`, else the replica's IP address; and which build of the
//! client it is), built from `[provider]` by [`UpstreamTls::from_config`], which reads the CA
//! file; and [`Alpn`], the application protocol a replica chose in the handshake. The controller keeps the one in force and publishes it in the snapshot; every
//! connection to a replica (requests and health checks, `crate::upstream::connect`) is given it
//! explicitly.
//! Must not touch: HTTP (the wire codec owns it), connections and pools (`crate::upstream`), or
//! when a client is built (start-up and config edits decide). It imports nothing of the
//! gateway's TLS termination (`super`): the snapshot names this type, and the termination side
//! reaches the metrics, which read the snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::config::source_file::read_source_file;
use crate::config::ProviderConfig;

/// A TLS connection to a replica.
pub type UpstreamStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Largest CA file read: a bundle of a few hundred certificates fits.
pub const MAX_CA_FILE: u64 = 1 << 20;

/// Why no client could be built from `[provider]` (the message names the key and the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UpstreamTlsError(String);

/// How the gateway talks TLS to its replicas.
pub struct UpstreamTls {
    /// Offers ALPN `http/1.1`: HTTP/1.1 connections.
    connector: tokio_rustls::TlsConnector,
    /// Offers ALPN `h2` and `http/1.1`: connections for HTTP/2 (`proxy.upstream_protocol`),
    /// which the replica may accept or not (RFC 9113 section 3.2: HTTP/2 over TLS is chosen by
    /// ALPN, never assumed); the caller reads its choice ([`Alpn::of`]).
    h2: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
    id: u64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The last [`UpstreamTls::id`] given: every build gets a new one, never 0 (a plain
/// connection's), never one an earlier build had (as an address could be).
static BUILDS: AtomicU64 = AtomicU64::new(0);

impl UpstreamTls {
    /// The client for `[provider]` on `provider`'s cryptography, or None when `upstream_tls` is
    /// off. The CA file (a regular file of at most [`MAX_CA_FILE`] bytes, read without blocking
    /// on a FIFO or a device) must hold at least one usable certificate.
    pub fn from_config(
        p: &ProviderConfig,
        provider: Arc<CryptoProvider>,
    ) -> Result<Option<UpstreamTls>, UpstreamTlsError> {
        if !p.upstream_tls {
            return Ok(None);
        }
        let fail = |m: String| UpstreamTlsError(m);
        let Some(ca) = &p.upstream_ca else {
            return Err(fail("provider.upstream_ca is not set".into()));
        };
        let pem = read_source_file(ca, MAX_CA_FILE).map_err(|e| {
            fail(format!(
                "provider.upstream_ca: cannot read {}: {e}",
                ca.display()
            ))
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                fail(format!(
                    "provider.upstream_ca: {}: broken PEM ({e})",
                    ca.display()
                ))
            })?;
            roots.add(cert).map_err(|e| {
                fail(format!(
                    "provider.upstream_ca: {}: not a usable CA certificate ({e})",
                    ca.display()
                ))
            })?;
        }
        if roots.is_empty() {
            return Err(fail(format!(
                "provider.upstream_ca: {}: no PEM certificate in it",
                ca.display()
            )));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(format!("cannot build the TLS client: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = match &p.upstream_server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| fail(format!("provider.upstream_server_name {n:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Some(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            h2: tokio_rustls::TlsConnector::from(Arc::new(h2)),
            server_name,
            id: BUILDS.fetch_add(1, Ordering::Relaxed) + 1,
        }))
    }

    /// Which build of the client this is (never 0): a connection remembers the one that made
    /// it, so one made before an edit is not handed out again after it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The TLS handshake with the replica at `addr` over `tcp`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<UpstreamStream> {
        self.connector.connect(self.name_of(addr), tcp).await
    }

    /// The TLS handshake for HTTP/2 with the replica at `addr` over `tcp`: ALPN `h2` and
    /// `http/1.1` offered; what the replica chose is the caller's to read ([`Alpn::of`]): a
    /// replica that did not choose `h2` does not speak HTTP/2 on this connection.
    pub async fn connect_h2(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<UpstreamStream> {
        self.h2.connect(self.name_of(addr), tcp).await
    }

    /// The name the replica at `addr` is verified as: `provider.upstream_server_name`, else its
    /// IP address.
    fn name_of(&self, addr: SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

/// The application protocol a replica chose in its TLS handshake (ALPN), as it is named in
/// messages: `http/1.1`, or no protocol at all (which means HTTP/1.1, RFC 7301).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alpn(Option<String>);

impl Alpn {
    /// The choice made on `stream`.
    pub fn of(stream: &UpstreamStream) -> Alpn {
        Alpn(
            stream
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        )
    }

    /// Whether the replica chose HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.0.as_deref() == Some("h2")
    }
}

impl std::fmt::Display for Alpn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(p) => write!(f, "ALPN {p}"),
            None => f.write_str("no ALPN protocol"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(ca: Option<std::path::PathBuf>) -> ProviderConfig {
        ProviderConfig {
            upstream_tls: true,
            upstream_ca: ca,
            ..ProviderConfig::default()
        }
    }

    fn build(p: &ProviderConfig) -> Result<Option<UpstreamTls>, UpstreamTlsError> {
        UpstreamTls::from_config(p, crate::tls::provider())
    }

    #[test]
    fn off_is_none_and_every_build_is_a_new_client() {
        assert!(matches!(build(&ProviderConfig::default()), Ok(None)));
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        std::fs::write(&ca, cert.pem()).expect("write");
        let p = provider(Some(ca));
        let a = build(&p).expect("builds").expect("on");
        let b = build(&p).expect("builds").expect("on");
        assert!(a.id() != 0 && b.id() != 0 && a.id() != b.id());
    }

    #[test]
    fn the_replicas_alpn_choice_is_named_as_it_was() {
        assert_eq!(Alpn(None).to_string(), "no ALPN protocol");
        assert_eq!(Alpn(Some("http/1.1".into())).to_string(), "ALPN http/1.1");
        assert!(Alpn(Some("h2".into())).is_h2());
        assert!(!Alpn(Some("http/1.1".into())).is_h2() && !Alpn(None).is_h2());
    }

    #[test]
    fn a_ca_file_that_is_missing_empty_or_not_a_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let e = build(&provider(Some(missing))).expect_err("missing");
        assert!(
            e.to_string().contains("provider.upstream_ca") && e.to_string().contains("missing.pem"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = build(&provider(Some(empty))).expect_err("no PEM");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = build(&provider(Some(dir.path().to_owned()))).expect_err("a directory");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = build(&provider(None)).expect_err("unset");
        assert!(e.to_string().contains("not set"), "{e}");
    }
}
