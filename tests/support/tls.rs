//! TLS for the tests: a test CA that issues ECDSA P-256 certificates (rcgen, generated here,
//! nothing fetched), files replaced the way operators should (write, then rename over), and a
//! rustls client that reports which certificate the gateway presented: one request per
//! handshake ([`get`]) or a kept-alive connection ([`Connection`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;

/// A certificate and its key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

/// The test CA.
pub struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub dir: PathBuf,
}

impl Pki {
    /// A new CA; its certificate is written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Pki {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ringgate test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
        Pki {
            ca,
            dir: dir.to_owned(),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate with common name `cn` for `names`, valid from `from` to `to` days from now.
    pub fn issue_valid(&self, cn: &str, names: &[&str], from: i64, to: i64) -> Issued {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(to);
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A certificate valid from yesterday for 30 days.
    pub fn issue(&self, cn: &str, names: &[&str]) -> Issued {
        self.issue_valid(cn, names, -1, 30)
    }

    /// Writes `issued` as `<name>.crt` and `<name>.key` in the CA's directory (each by a rename
    /// over the old file, key first), and returns the two paths.
    pub fn install(&self, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        let (cert, key) = self.paths(name);
        replace(&key, issued.key.as_bytes());
        replace(&cert, issued.cert.as_bytes());
        (cert, key)
    }

    pub fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }
}

/// Writes `content` beside `path` and renames it over `path`.
pub fn replace(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write the new file");
    std::fs::rename(&tmp, path).expect("rename it over the old one");
}

/// The `[tls]` body for certificate files `pairs` (TLS on 127.0.0.1:0), plus `extra` lines.
pub fn section(pairs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let certs: Vec<String> = pairs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect();
    format!(
        "enabled = true\nlisten = \"127.0.0.1:0\"\ncertificates = [{}]\n{extra}",
        certs.join(", ")
    )
}

/// A client trusting `ca_pem` and offering `alpn`, without session resumption.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        let cert: CertificateDer<'static> = cert.expect("CA PEM");
        roots.add(cert).expect("CA certificate");
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every handshake a full one: a resumed session carries no certificate, so it could not
    // tell which one the gateway serves now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The common name of the first certificate the server presented.
fn peer_cn(conn: &rustls::ClientConnection) -> String {
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return String::new();
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return String::new();
    };
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    cn
}

pub type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS handshake from `from` (a loopback address) to `addr`.
/// A TLS connection to `addr` (SNI `sni`), its handshake done within 10 s.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    config: &Arc<ClientConfig>,
) -> Result<Stream, String> {
    Ok(connect_from("127.0.0.1", addr, sni, config).await?.0)
}

/// [`connect`] from the loopback address `from`, with the common name of the certificate the
/// gateway presented.
async fn connect_from(
    from: &str,
    addr: SocketAddr,
    sni: &str,
    config: &Arc<ClientConfig>,
) -> Result<(Stream, String), String> {
    let handshake = handshake(from, addr, sni, config);
    tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| "the TLS handshake hung".to_string())?
}

async fn handshake(
    from: &str,
    addr: SocketAddr,
    sni: &str,
    config: &Arc<ClientConfig>,
) -> Result<(Stream, String), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    let from: std::net::IpAddr = from.parse().map_err(|e| format!("source address: {e}"))?;
    socket
        .bind((from, 0).into())
        .map_err(|e| format!("bind {from}: {e}"))?;
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| format!("server name: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let cn = peer_cn(tls.get_ref().1);
    Ok((tls, cn))
}

/// One HTTP/1.1 request on a new TLS connection (a full handshake).
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// The common name of the certificate the gateway presented.
    pub cn: String,
}

/// `GET path` on a new TLS connection to `addr` naming `sni`; errors say which step failed.
pub async fn get(
    addr: SocketAddr,
    sni: &str,
    path: &str,
    config: &Arc<ClientConfig>,
) -> Result<Answer, String> {
    get_from("127.0.0.1", addr, sni, path, config).await
}

/// [`get`] from the loopback address `from`.
pub async fn get_from(
    from: &str,
    addr: SocketAddr,
    sni: &str,
    path: &str,
    config: &Arc<ClientConfig>,
) -> Result<Answer, String> {
    let mut conn = Connection::open_from(from, addr, sni, config).await?;
    let (status, body) = conn.get(path).await?;
    Ok(Answer {
        status,
        body,
        cn: conn.cn.clone(),
    })
}

/// One kept-alive HTTP/1.1 connection over TLS, used for every request.
pub struct Connection {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    authority: String,
    /// The common name of the certificate the gateway presented at the handshake.
    pub cn: String,
}

impl Connection {
    pub async fn open(
        addr: SocketAddr,
        sni: &str,
        config: &Arc<ClientConfig>,
    ) -> Result<Connection, String> {
        Connection::open_from("127.0.0.1", addr, sni, config).await
    }

    /// [`Connection::open`] from the loopback address `from`.
    pub async fn open_from(
        from: &str,
        addr: SocketAddr,
        sni: &str,
        config: &Arc<ClientConfig>,
    ) -> Result<Connection, String> {
        let (tls, cn) = connect_from(from, addr, sni, config).await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Connection {
            send,
            authority: format!("{sni}:{}", addr.port()),
            cn,
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        let req = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let send = async {
            self.send.ready().await?;
            self.send.send_request(req).await
        };
        let resp = tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .map_err(|_| format!("GET {path} hung"))?
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {path} body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
