//! TLS towards the replicas (`[provider] upstream_tls`): the client configuration, verified
//! against the configured CA, and the health check over it.
//!
//! Owns: [`UpstreamTls`] (the connector and the name each replica's certificate must carry: the
//! configured `upstream_server_name`, else the replica's IP address) and [`TlsProber`], the
//! `GET /heartbeat` of [`crate::health::probe::HttpProber`] over TLS. The request path's
//! connections take the connector from their serving thread (`upstream::pool`).
//! Must not touch: HTTP on the request path (the upstream client owns it) or verdicts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::TlsError;
use crate::config::ProviderConfig;
use crate::error::{error_chain, local_resource_cause};
use crate::health::probe::{judge, Check, Prober};
use crate::health::ProbeOutcome;

/// A TLS connection to a replica.
pub type UpstreamStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How the gateway talks TLS to its replicas.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The client for `[provider]`, or None when `upstream_tls` is off. The CA file must hold at
    /// least one certificate.
    pub fn from_config(p: &ProviderConfig) -> Result<Option<UpstreamTls>, TlsError> {
        if !p.upstream_tls {
            return Ok(None);
        }
        let Some(ca) = &p.upstream_ca else {
            return Err(TlsError::UpstreamCa(
                "provider.upstream_ca is not set".into(),
            ));
        };
        let pem = std::fs::read(ca)
            .map_err(|e| TlsError::UpstreamCa(format!("cannot read {}: {e}", ca.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert
                .map_err(|e| TlsError::UpstreamCa(format!("{}: broken PEM ({e})", ca.display())))?;
            roots.add(cert).map_err(|e| {
                TlsError::UpstreamCa(format!(
                    "{}: not a usable CA certificate ({e})",
                    ca.display()
                ))
            })?;
        }
        if roots.is_empty() {
            return Err(TlsError::UpstreamCa(format!(
                "{}: no PEM certificate in it",
                ca.display()
            )));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = match &p.upstream_server_name {
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| {
                TlsError::UpstreamCa(format!("provider.upstream_server_name {n:?}: {e}"))
            })?),
            None => None,
        };
        Ok(Some(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        }))
    }

    /// The TLS handshake with the replica at `addr` over `tcp`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<UpstreamStream> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, tcp).await
    }
}

/// `GET <health.path>` over a new TLS connection each time, with a deadline covering connect,
/// handshake and the whole response; a status `health.expect_status` accepts is healthy.
pub struct TlsProber {
    tls: UpstreamTls,
}

impl TlsProber {
    pub fn new(tls: UpstreamTls) -> TlsProber {
        TlsProber { tls }
    }

    async fn check(&self, addr: SocketAddr, path: &str) -> Result<u16, (String, bool)> {
        let plain = |e: std::io::Error| {
            let local = local_resource_cause(&e).is_some();
            (error_chain(&e), local)
        };
        let tcp = TcpStream::connect(addr).await.map_err(plain)?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(tcp, addr)
            .await
            .map_err(|e| (format!("TLS handshake: {}", error_chain(&e)), false))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| (error_chain(&e), false))?;
        let conn = tokio::spawn(conn);
        let req = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| (e.to_string(), false))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| (error_chain(&e), false))?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| (e.to_string(), false))?;
        conn.abort();
        Ok(status)
    }
}

impl Prober for TlsProber {
    fn probe(
        &self,
        addr: SocketAddr,
        check: Arc<Check>,
        timeout: Duration,
    ) -> BoxFuture<'_, ProbeOutcome> {
        Box::pin(async move {
            let started = Instant::now();
            let at = SystemTime::now();
            let result = tokio::time::timeout(timeout, self.check(addr, &check.path))
                .await
                .ok();
            judge(&check, timeout, started, at, result)
        })
    }
}
