//! Health: active `/heartbeat` probes and the rise/fall state machine.
//!
//! Owns: probing one replica ([`probe`]), the per-replica probe task ([`ProbeTask`]) that reports
//! to the controller, and [`Tracker`], the pure state machine that turns probe results and
//! passive failures into state changes.
//! Must not touch: the ring, the snapshot or the provider. It reports; the controller decides.
//!
//! States: `starting` (spawned, not yet answering) → `up` on its first good heartbeat;
//! `up` → `suspect` on a failed check (still routed) → `down` after `fall` consecutive failures
//! (out of the ring, replaced when the provider manages replicas); `down` → `up` after `rise`
//! consecutive good checks. A failed connect on the request path takes an up replica `down` at
//! once and probes it immediately. `draining` replicas are being removed and no longer probed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use crate::ring::ServerId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Starting,
    Up,
    Suspect,
    Down,
    Draining,
}

impl HealthState {
    /// Whether the ring routes to a replica in this state.
    pub fn routable(self) -> bool {
        matches!(self, HealthState::Up | HealthState::Suspect)
    }
}

/// What a state change means for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Answered for the first time (starting → up), or came back (down → up).
    Up,
    /// A check failed; still routed.
    Suspect,
    /// Out of the ring.
    Down,
    /// Down and `fall` consecutive failures: dead for sure, replace it.
    Dead,
}

/// The rise/fall counters of one replica.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub state: HealthState,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

impl Tracker {
    pub fn starting() -> Tracker {
        Tracker {
            state: HealthState::Starting,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }

    pub fn up() -> Tracker {
        Tracker {
            state: HealthState::Up,
            ..Tracker::starting()
        }
    }

    /// Feeds one check result.
    pub fn on_probe(&mut self, ok: bool, rise: u32, fall: u32) -> Transition {
        if ok {
            self.consecutive_failures = 0;
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
        } else {
            self.consecutive_successes = 0;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
        let failed_enough = self.consecutive_failures >= fall;
        match (self.state, ok) {
            (HealthState::Starting, true) => self.set(HealthState::Up, Transition::Up),
            (HealthState::Starting, false) => Transition::None,
            (HealthState::Up | HealthState::Suspect, true) => {
                self.set(HealthState::Up, Transition::None)
            }
            (HealthState::Up | HealthState::Suspect, false) if failed_enough => {
                self.state = HealthState::Down;
                Transition::Dead
            }
            (HealthState::Up, false) => self.set(HealthState::Suspect, Transition::Suspect),
            (HealthState::Suspect, false) => Transition::None,
            (HealthState::Down, true) if self.consecutive_successes >= rise => {
                self.set(HealthState::Up, Transition::Up)
            }
            (HealthState::Down, true) => Transition::None,
            // Only the failure that reaches `fall` confirms death; later ones change nothing.
            (HealthState::Down, false) if self.consecutive_failures == fall => Transition::Dead,
            (HealthState::Down, false) => Transition::None,
            (HealthState::Draining, _) => Transition::None,
        }
    }

    /// A failed connect on the request path: out of the ring at once, counted as one failure.
    pub fn on_passive_failure(&mut self, fall: u32) -> Transition {
        if !self.state.routable() {
            return Transition::None;
        }
        self.consecutive_successes = 0;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.state = HealthState::Down;
        if self.consecutive_failures >= fall {
            Transition::Dead
        } else {
            Transition::Down
        }
    }

    fn set(&mut self, state: HealthState, t: Transition) -> Transition {
        if state == HealthState::Up {
            self.consecutive_failures = 0;
        }
        self.state = state;
        t
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeOutcome {
    pub ok: bool,
    pub status: Option<u16>,
    pub latency_ms: f64,
    pub error: Option<String>,
    #[serde(with = "unix_ms")]
    pub at: SystemTime,
}

mod unix_ms {
    use std::time::SystemTime;
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.serialize_u64(ms)
    }
}

pub type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// A client for checks: no pooling, so every check proves the replica still accepts connections.
pub fn probe_client() -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// `GET /heartbeat` with a deadline covering connect and response headers; 200 is healthy.
pub async fn probe(client: &ProbeClient, addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    let started = Instant::now();
    let at = SystemTime::now();
    let uri = format!("http://{addr}/heartbeat");
    let result = tokio::time::timeout(timeout, async {
        let resp = client
            .get(
                uri.parse()
                    .map_err(|e: http::uri::InvalidUri| e.to_string())?,
            )
            .await
            .map_err(|e| error_chain(&e))?;
        let status = resp.status().as_u16();
        // Read the (empty) body so the check covers a whole response.
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<u16, String>(status)
    })
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (ok, status, error) = match result {
        Ok(Ok(200)) => (true, Some(200), None),
        Ok(Ok(s)) => (false, Some(s), Some(format!("status {s}"))),
        Ok(Err(e)) => (false, None, Some(e)),
        Err(_) => (false, None, Some(format!("timed out after {timeout:?}"))),
    };
    ProbeOutcome {
        ok,
        status,
        latency_ms,
        error,
        at,
    }
}

/// An error and its causes on one line ("client error (Connect): tcp connect error: Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
    now: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ProbeTask {
    pub fn start(
        id: ServerId,
        incarnation: u64,
        addr: SocketAddr,
        period: Duration,
        timeout: Duration,
        client: ProbeClient,
        reports: mpsc::Sender<ProbeReport>,
    ) -> ProbeTask {
        let period_ms = Arc::new(AtomicU64::new(period.as_millis() as u64));
        let timeout_ms = Arc::new(AtomicU64::new(timeout.as_millis() as u64));
        let now = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (period_ms, timeout_ms, now) = (period_ms.clone(), timeout_ms.clone(), now.clone());
            async move {
                loop {
                    let timeout = Duration::from_millis(timeout_ms.load(Ordering::Relaxed).max(1));
                    let outcome = probe(&client, addr, timeout).await;
                    let report = ProbeReport {
                        id,
                        incarnation,
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
            now,
            task,
        }
    }

    /// Changes the check period; takes effect after the current wait.
    pub fn set_period(&self, period: Duration, timeout: Duration) {
        self.period_ms
            .store(period.as_millis() as u64, Ordering::Relaxed);
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Checks now instead of waiting for the period.
    pub fn probe_now(&self) {
        self.now.notify_one();
    }
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_joins_on_first_success() {
        let mut t = Tracker::starting();
        assert_eq!(t.on_probe(false, 2, 2), Transition::None);
        assert_eq!(t.state, HealthState::Starting);
        assert_eq!(t.on_probe(true, 2, 2), Transition::Up);
        assert_eq!(t.state, HealthState::Up);
    }

    #[test]
    fn fall_consecutive_failures_take_it_down() {
        let mut t = Tracker::up();
        assert_eq!(t.on_probe(false, 2, 3), Transition::Suspect);
        assert!(t.state.routable());
        assert_eq!(t.on_probe(false, 2, 3), Transition::None);
        assert_eq!(t.on_probe(false, 2, 3), Transition::Dead);
        assert_eq!(t.state, HealthState::Down);
        assert!(!t.state.routable());
        // Further failures do not re-announce death.
        assert_eq!(t.on_probe(false, 2, 3), Transition::None);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut t = Tracker::up();
        t.on_probe(false, 2, 2);
        assert_eq!(t.on_probe(true, 2, 2), Transition::None);
        assert_eq!(t.state, HealthState::Up);
        assert_eq!(t.on_probe(false, 2, 2), Transition::Suspect);
    }

    #[test]
    fn rise_consecutive_successes_bring_it_back() {
        let mut t = Tracker::up();
        t.on_probe(false, 3, 1);
        assert_eq!(t.state, HealthState::Down);
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        t.on_probe(false, 3, 1);
        assert_eq!(t.state, HealthState::Down, "the streak broke");
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        assert_eq!(t.on_probe(true, 3, 1), Transition::Up);
    }

    #[test]
    fn passive_failure_ejects_at_once_and_a_failed_probe_confirms() {
        let mut t = Tracker::up();
        assert_eq!(t.on_passive_failure(2), Transition::Down);
        assert!(!t.state.routable());
        assert_eq!(t.on_passive_failure(2), Transition::None, "already out");
        assert_eq!(t.on_probe(false, 2, 2), Transition::Dead);
        let mut t = Tracker::up();
        t.on_passive_failure(2);
        t.on_probe(true, 2, 2);
        assert_eq!(
            t.on_probe(true, 2, 2),
            Transition::Up,
            "a false alarm recovers after rise"
        );
        let mut t = Tracker::up();
        assert_eq!(t.on_passive_failure(1), Transition::Dead);
    }

    #[tokio::test]
    async fn probing_a_closed_port_fails_with_the_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let out = probe(&probe_client(), addr, Duration::from_secs(2)).await;
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
        let out = probe(&probe_client(), addr, Duration::from_millis(200)).await;
        assert!(!out.ok);
        assert!(
            out.error.as_deref().unwrap_or("").contains("timed out"),
            "{:?}",
            out.error
        );
        hold.abort();
    }
}
