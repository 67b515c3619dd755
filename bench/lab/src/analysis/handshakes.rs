//! A load generator of full TLS handshakes: every request is a new TCP connection, a TLS
//! handshake that resumes nothing, one `GET /home?id=<random 6 digits>` with `Connection: close`,
//! and the server's close. wrk and h2load cannot measure this: both resume the session of the
//! previous connection (NGINX logs `$ssl_session_reused` = `r` for all but the first handshake
//! of each connection slot), which skips the key exchange and the certificate signature.
//!
//! Owns: that client (rustls on ring, session resumption off, TLS 1.3 preferred), on one thread of
//! its own (like `wrk -t1`), and its figures (requests/s, p50, p99, errors). It checks the
//! handshake's signatures but not the certificate's chain (wrk's `SSL_VERIFY_NONE`): the bench
//! certificate is self-signed, and chain checks would only add client work.
//! Must not touch: the proxies (the caller starts them) or reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::proxies::RunFigures;
use super::AnalysisError;

/// Accepts any certificate, but verifies the handshake signatures made with it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<Arc<ClientConfig>, AnalysisError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| AnalysisError::Bench(format!("TLS client: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One request on a new connection; its latency, or what failed.
async fn one(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    rng: &mut fastrand::Rng,
) -> Result<Duration, String> {
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = format!(
        "GET /home?id={} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        rng.u32(100_000..=999_999)
    );
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::with_capacity(512);
    // Servers differ in whether they send close_notify before closing: the response is what counts.
    let _ = tls.read_to_end(&mut resp).await;
    if resp.starts_with(b"HTTP/1.1 200") {
        Ok(started.elapsed())
    } else {
        Err(format!(
            "answer: {:?}",
            String::from_utf8_lossy(&resp[..resp.len().min(80)])
        ))
    }
}

/// `connections` clients making new connections to `addr` for `duration`, on one thread.
pub fn run(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<RunFigures, AnalysisError> {
    let config = client_config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AnalysisError::io("starting the handshake client's runtime", e))?;
    let (latencies, errors, first_error) = runtime.block_on(async move {
        let connector = tokio_rustls::TlsConnector::from(config);
        let deadline = Instant::now() + duration;
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..connections {
            let connector = connector.clone();
            clients.spawn(async move {
                let mut rng = fastrand::Rng::with_seed(c as u64 + 1);
                let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0u64, None);
                while Instant::now() < deadline {
                    match one(addr, &connector, &mut rng).await {
                        Ok(d) => latencies.push(d),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                            // Do not spin on a refused port.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                (latencies, errors, first_error)
            });
        }
        let (mut all, mut errors, mut first_error) = (Vec::new(), 0, None);
        while let Some(Ok((l, e, f))) = clients.join_next().await {
            all.extend(l);
            errors += e;
            first_error = first_error.or(f);
        }
        (all, errors, first_error)
    });
    if latencies.is_empty() {
        return Err(AnalysisError::Bench(format!(
            "no TLS handshake to {addr} succeeded: {}",
            first_error.unwrap_or_default()
        )));
    }
    Ok(figures(latencies, errors, duration))
}

fn figures(mut latencies: Vec<Duration>, errors: u64, duration: Duration) -> RunFigures {
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    RunFigures {
        rps: latencies.len() as f64 / duration.as_secs_f64(),
        requests: latencies.len() as u64,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        errors,
        ..RunFigures::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rate() {
        let l: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let f = figures(l, 2, Duration::from_secs(10));
        assert_eq!((f.requests, f.errors), (100, 2));
        assert!((f.rps - 10.0).abs() < 1e-9);
        assert!((f.p50_ms - 50.0).abs() < 1e-9, "{}", f.p50_ms);
        assert!((f.p99_ms - 99.0).abs() < 1e-9, "{}", f.p99_ms);
    }
}
