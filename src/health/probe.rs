//! Active checks: one `GET <health.path>` ([`HttpProber`]) and the per-replica check loop
//! ([`ProbeTask`]) that reports every result to the controller.
//!
//! Owns: how a replica is checked and how often. A check goes through the stack traffic goes
//! through: a new connection from [`crate::upstream::connect`] (plain TCP, or TLS with the client
//! the controller last gave the prober: the one the snapshot carries), never pooled, and the
//! request written and its whole response read by [`crate::wire::client::check`], so a replica
//! is judged by the same codec with the same rules whether a check or a client asks. [`Prober`]
//! is the seam: the gateway checks over HTTP; the control plane's unit tests script the answers.
//! Must not touch: verdicts (a report is a fact; the controller applies the Lua `health` hook
//! and the rise/fall rules), or HTTP on the wire (the codec's).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, Notify};

use super::ProbeOutcome;
use crate::config::{ExpectStatus, HealthProtocol};
use crate::error::local_resource_cause;
use crate::ring::ServerId;
use crate::tls::upstream::UpstreamTls;
use crate::upstream::pool::ConnectError;
use crate::upstream::{self, Upstream};
use crate::wire::client::check;
use crate::wire::h2::grpc_check;

/// What a check asks and what passes (`[health] path` and `expect_status`, or with
/// `protocol = "grpc"` the service `grpc.health.v1` is asked about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub path: String,
    pub expect: ExpectStatus,
    /// `Some(service)`: a gRPC check of `service` (`""`: the whole server).
    pub grpc: Option<String>,
}

impl Check {
    pub fn of(health: &crate::config::HealthConfig) -> Check {
        Check {
            path: health.path.clone(),
            expect: health.expect_status.clone(),
            grpc: (health.protocol == HealthProtocol::Grpc).then(|| health.grpc_service.clone()),
        }
    }
}

/// Checks one replica address.
pub trait Prober: Send + Sync + 'static {
    fn probe(
        &self,
        addr: SocketAddr,
        check: Arc<Check>,
        timeout: Duration,
    ) -> BoxFuture<'_, ProbeOutcome>;

    /// Reaches the replicas with `tls` from the next check on (`None`: plain TCP): the
    /// controller gives it the client it publishes, at start and on every edit of
    /// `[provider] upstream_tls` or `upstream_ca`. A prober that makes no connection (the
    /// control plane's scripted one) has nothing to do with it.
    fn use_tls(&self, _tls: Option<Arc<UpstreamTls>>) {}
}

/// `GET <path>` over a fresh connection each time (no pooling, so every check proves the
/// replica still accepts connections, and a TLS one still passes the handshake), with a
/// deadline covering connect, handshake and the whole response; a status the check expects is
/// healthy. One prober for plain and TLS replicas: the client it was given decides.
#[derive(Default)]
pub struct HttpProber {
    tls: ArcSwapOption<UpstreamTls>,
}

impl Prober for HttpProber {
    fn probe(
        &self,
        addr: SocketAddr,
        check: Arc<Check>,
        timeout: Duration,
    ) -> BoxFuture<'_, ProbeOutcome> {
        Box::pin(self.check(addr, check, timeout))
    }

    fn use_tls(&self, tls: Option<Arc<UpstreamTls>>) {
        self.tls.store(tls);
    }
}

impl HttpProber {
    async fn check(&self, addr: SocketAddr, check: Arc<Check>, timeout: Duration) -> ProbeOutcome {
        let started = Instant::now();
        let at = SystemTime::now();
        let tls = self.tls.load_full();
        let deadline = tokio::time::Instant::now() + timeout;
        let result = match &check.grpc {
            None => {
                let asked = ask(addr, &check.path, tls.as_deref(), timeout, deadline);
                tokio::time::timeout_at(deadline, asked)
                    .await
                    .ok()
                    .flatten()
            }
            Some(service) => {
                let asked = ask_grpc(addr, service, tls.as_deref(), timeout, deadline);
                tokio::time::timeout_at(deadline, asked)
                    .await
                    .ok()
                    .flatten()
            }
        };
        judge(&check, timeout, started, at, result)
    }
}

/// One check of the replica at `addr`: the status it answered `GET path` with, or why there was
/// none (and whether the cause was the gateway's own); `None` when the deadline passed first,
/// whichever wait it was (the verdict then says the check timed out, as it always has).
async fn ask(
    addr: SocketAddr,
    path: &str,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Option<Result<u16, (String, bool)>> {
    let target: http::Uri = match format!("http://{addr}{path}").parse() {
        Ok(t) => t,
        Err(e) => return Some(Err((format!("health.path {path:?}: {e}"), false))),
    };
    let conn = match upstream::connect(addr, timeout, tls, upstream::Kind::H1).await {
        Ok(c) => c,
        Err(ConnectError::Timeout(_)) => return None,
        Err(e) => return Some(Err(cause(&e))),
    };
    // Dropped at the end of the check, whatever it found: a check's connection is never reused.
    match conn {
        Upstream::H1(mut conn) => match check::check(&mut conn, &target, deadline).await {
            Ok(status) => Some(Ok(status.as_u16())),
            Err(e) if e.is_timeout() => None,
            Err(e) => Some(Err(cause(&e))),
        },
        Upstream::H2(_) => Some(Err((
            "an HTTP check got an HTTP/2 connection".into(),
            false,
        ))),
    }
}

/// One `grpc.health.v1.Health/Check` of `service` at `addr` over a new HTTP/2 connection (h2c,
/// or TLS with ALPN `h2` with `tls`; never pooled, like an HTTP check's): `Ok(200)` when it
/// answered `SERVING`, else why not.
async fn ask_grpc(
    addr: SocketAddr,
    service: &str,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Option<Result<u16, (String, bool)>> {
    // The connection pings only while a check could last: it is dropped with the check.
    let kind = upstream::Kind::H2 { keepalive: timeout };
    let conn = match upstream::connect(addr, timeout, tls, kind).await {
        Ok(Upstream::H2(c)) => c,
        Ok(Upstream::H1(_)) => {
            return Some(Err(("a gRPC check got an HTTP/1 connection".into(), false)))
        }
        Err(ConnectError::Timeout(_)) => return None,
        Err(e) => return Some(Err(cause(&e))),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match grpc_check::check(&conn, scheme, addr, service, deadline).await {
        Ok(()) => Some(Ok(200)),
        Err(e) if e.is_timeout() => None,
        Err(e) => Some(Err(cause(&e))),
    }
}

/// An error as a check reports it: its message (which names its cause already), and whether the
/// cause is the gateway's own shortage (out of descriptors, memory or ports): then the check
/// says nothing about the replica.
fn cause(e: &(dyn std::error::Error + 'static)) -> (String, bool) {
    (e.to_string(), local_resource_cause(e).is_some())
}

/// The verdict on one check: `result` is the status the replica answered, or why there was none
/// and whether the cause was the gateway's own (inconclusive), or `None` when the deadline passed.
pub(crate) fn judge(
    check: &Check,
    timeout: Duration,
    started: Instant,
    at: SystemTime,
    result: Option<Result<u16, (String, bool)>>,
) -> ProbeOutcome {
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (ok, inconclusive, status, error) = match result {
        // A gRPC check passes on SERVING only, which its asker reports as 200.
        Some(Ok(s)) if check.grpc.is_some() || check.expect.matches(s) => {
            (true, false, Some(s), None)
        }
        Some(Ok(s)) => (
            false,
            false,
            Some(s),
            Some(format!("status {s}, expected {}", check.expect)),
        ),
        Some(Err((e, local))) => (false, local, None, Some(e)),
        None => (
            false,
            false,
            None,
            Some(format!("timed out after {timeout:?}")),
        ),
    };
    ProbeOutcome {
        ok,
        inconclusive,
        status,
        latency_ms,
        error,
        at,
    }
}

/// A check result for the controller.
#[derive(Debug)]
pub struct ProbeReport {
    pub id: ServerId,
    pub incarnation: u64,
    pub outcome: ProbeOutcome,
}

/// The check loop of one replica incarnation. Dropping it stops the loop.
pub struct ProbeTask {
    period_ms: Arc<AtomicU64>,
    timeout_ms: Arc<AtomicU64>,
    check: Arc<ArcSwap<Check>>,
    now: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// Where and how often one replica incarnation is checked.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTarget {
    pub id: ServerId,
    pub incarnation: u64,
    pub addr: SocketAddr,
    pub period: Duration,
    pub timeout: Duration,
}

impl ProbeTask {
    pub fn start(
        target: ProbeTarget,
        check: Arc<Check>,
        prober: Arc<dyn Prober>,
        reports: mpsc::Sender<ProbeReport>,
    ) -> ProbeTask {
        let period_ms = Arc::new(AtomicU64::new(millis(target.period)));
        let timeout_ms = Arc::new(AtomicU64::new(millis(target.timeout)));
        let check = Arc::new(ArcSwap::new(check));
        let now = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (period_ms, timeout_ms, now) = (period_ms.clone(), timeout_ms.clone(), now.clone());
            let check = check.clone();
            async move {
                loop {
                    let timeout = Duration::from_millis(timeout_ms.load(Ordering::Relaxed).max(1));
                    let outcome = prober.probe(target.addr, check.load_full(), timeout).await;
                    let report = ProbeReport {
                        id: target.id,
                        incarnation: target.incarnation,
                        outcome,
                    };
                    if reports.send(report).await.is_err() {
                        return;
                    }
                    let period = Duration::from_millis(period_ms.load(Ordering::Relaxed).max(1));
                    tokio::select! {
                        _ = tokio::time::sleep(period) => {}
                        _ = now.notified() => {}
                    }
                }
            }
        });
        ProbeTask {
            period_ms,
            timeout_ms,
            check,
            now,
            task,
        }
    }

    /// Changes the check period and timeout; takes effect after the current wait.
    pub fn set_period(&self, period: Duration, timeout: Duration) {
        self.period_ms.store(millis(period), Ordering::Relaxed);
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }

    /// Changes what the check asks (a `[health] path` or `expect_status` edit).
    pub fn set_check(&self, check: Arc<Check>) {
        self.check.store(check);
    }

    /// Checks now instead of waiting for the period.
    pub fn probe_now(&self) {
        self.now.notify_one();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> Arc<Check> {
        Arc::new(Check::of(&crate::config::HealthConfig::default()))
    }

    #[tokio::test]
    async fn probing_a_closed_port_fails_with_the_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let out = HttpProber::default()
            .probe(addr, heartbeat(), Duration::from_secs(2))
            .await;
        assert!(!out.ok);
        assert!(
            out.error.as_deref().unwrap_or("").contains("onnect"),
            "{:?}",
            out.error
        );
    }

    #[tokio::test]
    async fn probing_a_silent_server_times_out() {
        // Accepts connections but never answers: the check must not hang.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let out = HttpProber::default()
            .probe(addr, heartbeat(), Duration::from_millis(200))
            .await;
        assert!(!out.ok);
        assert!(
            out.error.as_deref().unwrap_or("").contains("timed out"),
            "{:?}",
            out.error
        );
        hold.abort();
    }

    #[tokio::test]
    async fn the_check_asks_its_path_and_passes_the_statuses_it_expects() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if head.starts_with("GET /healthz ") {
                    "204 No Content"
                } else {
                    "404 Not Found"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let check = |path: &str, expect: Vec<(u16, u16)>| {
            Arc::new(Check {
                path: path.into(),
                expect: ExpectStatus(expect),
                grpc: None,
            })
        };
        let p = HttpProber::default();
        let t = Duration::from_secs(2);
        assert!(
            p.probe(addr, check("/healthz", vec![(200, 299)]), t)
                .await
                .ok
        );
        let out = p.probe(addr, check("/healthz", vec![(200, 200)]), t).await;
        assert!(!out.ok);
        assert!(out
            .error
            .is_some_and(|e| e.contains("status 204, expected 200")));
        assert!(
            !p.probe(addr, check("/heartbeat", vec![(200, 299)]), t)
                .await
                .ok,
            "404"
        );
        server.abort();
    }
}
