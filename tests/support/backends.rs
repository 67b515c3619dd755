//! Replicas the tests own, for behaviour `ringgate-server` does not have: one that echoes the
//! request head it received, one that resets every connection it gets a request on (a "query of
//! death"), one that answers after a delay, one that answers with as many bytes as asked for,
//! one that stops in the middle of its response body, one that refuses a request body unread,
//! one that answers with framing fields a test gives it (well-formed or not), one that switches
//! protocols (`101`) when nobody asked it to.
//! All answer `GET /heartbeat` with 200, so checks pass. Dropping one closes its listener and
//! every connection it has, as a dead process would.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with the received request head, lower-cased, as the body.
    Echo,
    /// Reads the request head, then closes the connection without a response.
    Reset,
    /// Answers with the backend's current `status` (see [`Backend::set_status`]) after
    /// `delay_ms`, with its name as the body.
    Answer { delay_ms: u64 },
    /// 200 with a body of as many bytes as the request's `bytes` query parameter says.
    Sized,
    /// 200 with `Content-Length: 10` and 3 bytes of the body, then nothing (the connection
    /// stays open).
    Stalls,
    /// 413 at once, before reading any of the request body, then the close (the kernel resets
    /// the connection over the unread body).
    RefusesBody,
    /// `200` with the `(field lines, body)` pair the request's `case` query parameter picks
    /// (`HTTP/1.1 200 OK\r\n{lines}connection: close\r\n\r\n{body}`), then the close, so a
    /// body read until close ends there.
    Framed(&'static [(&'static str, &'static str)]),
    /// A request for `/switch…`: `101 Switching Protocols`, then after a moment bytes of the
    /// other protocol, and the connection held open. Any other request: as [`Behaviour::Echo`].
    Switches,
    /// The answer the request's `case` query parameter picks, written exactly as it is (status
    /// line and all), then the close.
    Raw(&'static [&'static str]),
}

pub struct Backend {
    pub addr: SocketAddr,
    /// Requests other than `/heartbeat` received.
    pub hits: Arc<AtomicUsize>,
    status: Arc<std::sync::atomic::AtomicU16>,
    /// Requests in progress now, and the most at once.
    pub in_flight: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    /// Connections accepted (the gateway's and health checks' alike).
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// A backend on `ip` (any loopback address) and a free port.
    pub async fn start(ip: &str, behaviour: Behaviour) -> Backend {
        let ip: IpAddr = ip.parse().expect("ip");
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (st, inf, pk) = (status.clone(), in_flight.clone(), peak.clone());
        let accepts = accepted.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so stopping the backend closes them too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                let counter = counter.clone();
                let (st, inf, pk) = (st.clone(), inf.clone(), pk.clone());
                let name = addr.to_string();
                connections.spawn(async move {
                    loop {
                        let mut got = Vec::new();
                        let mut buf = vec![0u8; 8192];
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let head = String::from_utf8_lossy(&got).to_lowercase();
                        let mut code = 200;
                        let body = if head.starts_with("get /heartbeat") {
                            String::new()
                        } else if head.starts_with("get /healthz") {
                            code = 204;
                            String::new()
                        } else {
                            counter.fetch_add(1, Ordering::SeqCst);
                            match behaviour {
                                Behaviour::Reset => return,
                                Behaviour::RefusesBody => {
                                    let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large";
                                    let _ = s.write_all(answer).await;
                                    return;
                                }
                                Behaviour::Stalls => {
                                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhel";
                                    if s.write_all(head).await.is_err() {
                                        return;
                                    }
                                    std::future::pending::<()>().await;
                                    return;
                                }
                                Behaviour::Framed(cases) => {
                                    let (lines, body) = cases
                                        .get(query_number(&head, "case"))
                                        .copied()
                                        .unwrap_or(("", "no such case"));
                                    let answer = format!(
                                        "HTTP/1.1 200 OK\r\n{lines}connection: close\r\n\r\n{body}"
                                    );
                                    let _ = s.write_all(answer.as_bytes()).await;
                                    return;
                                }
                                Behaviour::Raw(answers) => {
                                    let answer = answers
                                        .get(query_number(&head, "case"))
                                        .copied()
                                        .unwrap_or("HTTP/1.1 404 Not Found\r\n\r\n");
                                    let _ = s.write_all(answer.as_bytes()).await;
                                    return;
                                }
                                Behaviour::Switches if head.starts_with("get /switch") => {
                                    let switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x-other\r\nconnection: upgrade\r\n\r\n";
                                    if s.write_all(switch).await.is_err() {
                                        return;
                                    }
                                    // Later than the head: a gateway that took the 101 for a
                                    // final answer has pooled the connection by then.
                                    tokio::time::sleep(std::time::Duration::from_millis(200))
                                        .await;
                                    let _ = s.write_all(b"\x00\x01 other protocol \x02").await;
                                    std::future::pending::<()>().await;
                                    return;
                                }
                                Behaviour::Echo | Behaviour::Switches => head,
                                Behaviour::Sized => "x".repeat(query_number(&head, "bytes")),
                                Behaviour::Answer { delay_ms } => {
                                    let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                                    pk.fetch_max(now, Ordering::SeqCst);
                                    tokio::time::sleep(std::time::Duration::from_millis(delay_ms))
                                        .await;
                                    inf.fetch_sub(1, Ordering::SeqCst);
                                    code = st.load(Ordering::SeqCst);
                                    name.clone()
                                }
                            }
                        };
                        let resp = format!(
                            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nx-hop: 1\r\n\r\n{}",
                            body.len(),
                            body
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            hits,
            status,
            in_flight,
            peak,
            accepted,
            task,
        }
    }

    /// A backend on `ip` that speaks HTTP/2 (h2c, prior knowledge) beside HTTP/1.1 (hyper's
    /// server, for `proxy.upstream_protocol = "h2c"`), with `behaviour`: `Sized` (a body of
    /// `bytes` bytes, sent in 16 KiB pieces as the gateway's flow-control window takes them),
    /// `Stalls` (`content-length: 10`, 3 bytes, then nothing) or `Answer` (an empty 200 after
    /// the delay). `/heartbeat` answers 200.
    pub async fn start_h2(ip: &str, behaviour: Behaviour) -> Backend {
        use http_body_util::BodyExt;
        use hyper::body::Frame;
        let ip: IpAddr = ip.parse().expect("ip");
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepts = accepted.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                let counter = counter.clone();
                connections.spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let counter = counter.clone();
                            async move {
                                let target = req.uri().to_string();
                                let (tx, rx) = tokio::sync::mpsc::channel::<Frame<bytes::Bytes>>(1);
                                let body = http_body_util::StreamBody::new(Frames(rx)).boxed();
                                let mut resp = http::Response::new(body);
                                if req.uri().path() == "/heartbeat" {
                                    return Ok::<_, std::convert::Infallible>(resp);
                                }
                                counter.fetch_add(1, Ordering::SeqCst);
                                match behaviour {
                                    Behaviour::Answer { delay_ms } => {
                                        let delay = std::time::Duration::from_millis(delay_ms);
                                        tokio::time::sleep(delay).await;
                                        drop(tx);
                                    }
                                    Behaviour::Stalls => {
                                        resp.headers_mut().insert("content-length", 10.into());
                                        tokio::spawn(async move {
                                            let _ = tx.send(Frame::data("hel".into())).await;
                                            std::future::pending::<()>().await;
                                        });
                                    }
                                    _ => {
                                        let n = query_number(&format!("get {target} "), "bytes");
                                        resp.headers_mut().insert("content-length", n.into());
                                        tokio::spawn(async move {
                                            let piece = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
                                            let mut left = n;
                                            while left > 0 {
                                                let k = left.min(piece.len());
                                                if tx
                                                    .send(Frame::data(piece.slice(..k)))
                                                    .await
                                                    .is_err()
                                                {
                                                    return;
                                                }
                                                left -= k;
                                            }
                                        });
                                    }
                                }
                                Ok(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                });
            }
        });
        Backend {
            addr,
            hits,
            status: Arc::new(std::sync::atomic::AtomicU16::new(200)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
            accepted,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Forgets the most requests in progress at once seen so far.
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::SeqCst);
    }

    /// The status an `Answer` backend gives from now on.
    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }
}

/// The number a query parameter of the request line in `head` gives, or 0.
fn query_number(head: &str, name: &str) -> usize {
    let target = head.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A channel's frames as a body stream.
struct Frames(tokio::sync::mpsc::Receiver<hyper::body::Frame<bytes::Bytes>>);

impl futures_util::Stream for Frames {
    type Item = Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
