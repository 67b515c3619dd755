//! The experiments of the performance analysis, each against a live gateway it starts itself:
//! load per server (A-1, A-2, and A-4 per hash choice), every endpoint and a replica kill under
//! load (A-3), and ring movement when a server is added or removed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;

use super::gateway::{GatewaySpec, HashChoice, LabGateway};
use super::AnalysisError;
use crate::loadgen::{self, KeyPlan, LoadConfig, Report};
use crate::procs::signal;

/// Seed of the request keys: every run sends the same keys, so hash choices are compared fairly.
pub const KEY_SEED: u64 = 0x5eed_0001;

/// Load per server after one run.
#[derive(Debug, Clone)]
pub struct Distribution {
    pub hash: String,
    pub n: u32,
    /// `(server, successful requests)`, every replica of `/rep` listed (zero when it got none).
    pub servers: Vec<(String, u64)>,
    pub failed: u64,
    pub requests_per_sec: f64,
}

impl Distribution {
    pub fn counts(&self) -> impl Iterator<Item = f64> + '_ {
        self.servers.iter().map(|(_, c)| *c as f64)
    }
    pub fn total(&self) -> f64 {
        self.counts().sum()
    }
    pub fn mean(&self) -> f64 {
        if self.servers.is_empty() {
            0.0
        } else {
            self.total() / self.servers.len() as f64
        }
    }
    pub fn min(&self) -> f64 {
        self.counts().fold(f64::INFINITY, f64::min)
    }
    pub fn max(&self) -> f64 {
        self.counts().fold(0.0, f64::max)
    }
    /// Population standard deviation of the per-server counts.
    pub fn stddev(&self) -> f64 {
        let m = self.mean();
        let n = self.servers.len().max(1) as f64;
        (self.counts().map(|c| (c - m) * (c - m)).sum::<f64>() / n).sqrt()
    }
    /// Busiest server over the mean: 1.0 is perfectly even.
    pub fn max_over_mean(&self) -> f64 {
        let m = self.mean();
        if m > 0.0 {
            self.max() / m
        } else {
            0.0
        }
    }
    /// Coefficient of variation (stddev / mean).
    pub fn cv(&self) -> f64 {
        let m = self.mean();
        if m > 0.0 {
            self.stddev() / m
        } else {
            0.0
        }
    }
}

/// Per-server counts of a report, with every listed replica present.
pub fn distribution(hash: &str, n: u32, replicas: &[String], report: &Report) -> Distribution {
    let summary = report.summary();
    let mut servers: Vec<(String, u64)> = Vec::new();
    let names_match = replicas.iter().any(|r| summary.per_server.contains_key(r));
    if names_match {
        for r in replicas {
            servers.push((r.clone(), summary.per_server.get(r).copied().unwrap_or(0)));
        }
    }
    for (s, c) in &summary.per_server {
        if !servers.iter().any(|(name, _)| name == s) {
            servers.push((s.clone(), *c));
        }
    }
    servers.sort_by_key(|a| natural_key(&a.0));
    Distribution {
        hash: hash.to_string(),
        n,
        servers,
        failed: summary.failed,
        requests_per_sec: summary.requests_per_sec,
    }
}

/// Sorts `server-10` after `server-9`.
fn natural_key(s: &str) -> (String, u64) {
    let digits: String = s.chars().rev().take_while(char::is_ascii_digit).collect();
    let num: String = digits.chars().rev().collect();
    let prefix = s[..s.len() - num.len()].to_string();
    (prefix, num.parse().unwrap_or(0))
}

/// `requests` random-key requests at concurrency `c` to `/home` of a gateway.
async fn load(
    gw: &LabGateway,
    requests: u64,
    c: usize,
    keys: KeyPlan,
) -> Result<Report, AnalysisError> {
    let mut cfg = LoadConfig::new(gw.url("/home"), requests, c);
    cfg.keys = keys;
    cfg.progress = true;
    Ok(loadgen::run(&cfg).await?)
}

/// A-1 / A-2 / A-4: the load per server for each N, for one hash choice.
pub async fn load_per_server(
    bin: &Path,
    hash: &HashChoice,
    ns: &[u32],
    requests: u64,
    concurrency: usize,
) -> Result<Vec<Distribution>, AnalysisError> {
    let mut out = Vec::new();
    for &n in ns {
        eprintln!("  {} N={n}: {requests} requests", hash.label());
        let gw = LabGateway::start(bin, &GatewaySpec::new(n, hash.clone())).await?;
        let result = async {
            let replicas = gw.replicas().await?;
            let report = load(
                &gw,
                requests,
                concurrency,
                KeyPlan::Random6 { seed: KEY_SEED },
            )
            .await?;
            Ok::<_, AnalysisError>(distribution(hash.label(), n, &replicas, &report))
        }
        .await;
        gw.stop().await;
        out.push(result?);
    }
    Ok(out)
}

/// Ring movement for one hash choice.
#[derive(Debug, Clone)]
pub struct Movement {
    pub hash: String,
    pub keys: usize,
    /// 3 → 4 (`server-4` added): moved fraction, keys that moved elsewhere than to the new server.
    pub add_moved: f64,
    pub add_excess: f64,
    /// 4 → 3 (`server-2` removed).
    pub rm_moved: f64,
    pub rm_excess: f64,
    /// Keys that got no answer in some round (left out of the fractions).
    pub unanswered: usize,
}

/// Which server answers each key, in key order.
async fn route(
    gw: &LabGateway,
    keys: &Arc<[String]>,
) -> Result<Vec<Option<String>>, AnalysisError> {
    let report = load(gw, keys.len() as u64, 16, KeyPlan::List(keys.clone())).await?;
    Ok(report
        .records
        .into_iter()
        .map(|r| if r.is_ok() { r.server } else { None })
        .collect())
}

/// Fraction of keys that changed server, and of those that moved other than through `server`.
fn moved(
    before: &[Option<String>],
    after: &[Option<String>],
    server: &str,
    added: bool,
) -> (f64, f64, usize) {
    let (mut total, mut moved, mut excess, mut unanswered) = (0usize, 0usize, 0usize, 0usize);
    for (b, a) in before.iter().zip(after) {
        let (Some(b), Some(a)) = (b, a) else {
            unanswered += 1;
            continue;
        };
        total += 1;
        if a != b {
            moved += 1;
            let via = if added { a } else { b };
            if via != server {
                excess += 1;
            }
        }
    }
    let t = total.max(1) as f64;
    (moved as f64 / t, excess as f64 / t, unanswered)
}

pub async fn movement(
    bin: &Path,
    hash: &HashChoice,
    keys: usize,
) -> Result<Movement, AnalysisError> {
    eprintln!("  {}: ring movement over {keys} keys", hash.label());
    let keys: Arc<[String]> = (0..keys as u64)
        .map(|s| loadgen::random6(KEY_SEED ^ 0xabcd, s).to_string())
        .collect();
    let gw = LabGateway::start(bin, &GatewaySpec::new(3, hash.clone())).await?;
    let result = async {
        let m0 = route(&gw, &keys).await?;
        admin(
            &gw,
            Method::POST,
            "/add",
            r#"{"n": 1, "hostnames": ["server-4"]}"#,
        )
        .await?;
        gw.wait_ready(4, Duration::from_secs(30)).await?;
        let m1 = route(&gw, &keys).await?;
        admin(
            &gw,
            Method::DELETE,
            "/rm",
            r#"{"n": 1, "hostnames": ["server-2"]}"#,
        )
        .await?;
        gw.wait_ready(3, Duration::from_secs(30)).await?;
        let m2 = route(&gw, &keys).await?;
        let (add_moved, add_excess, u1) = moved(&m0, &m1, "server-4", true);
        let (rm_moved, rm_excess, u2) = moved(&m1, &m2, "server-2", false);
        Ok::<_, AnalysisError>(Movement {
            hash: hash.label().to_string(),
            keys: keys.len(),
            add_moved,
            add_excess,
            rm_moved,
            rm_excess,
            unanswered: u1 + u2,
        })
    }
    .await;
    gw.stop().await;
    result
}

async fn admin(
    gw: &LabGateway,
    method: Method,
    path: &str,
    body: &str,
) -> Result<(), AnalysisError> {
    let (status, resp) = gw.call(method.clone(), path, Some(body)).await?;
    if status != 200 {
        return Err(AnalysisError::Gateway(format!(
            "{method} {path} {body} answered {status}: {}",
            String::from_utf8_lossy(&resp)
        )));
    }
    Ok(())
}

/// One endpoint call of A-3.
#[derive(Debug, Clone)]
pub struct EndpointCheck {
    pub call: String,
    pub expected: u16,
    pub got: Option<u16>,
    pub body: String,
}

/// A-3's results.
#[derive(Debug, Clone)]
pub struct Resilience {
    pub endpoints: Vec<EndpointCheck>,
    pub killed: Option<String>,
    pub kill_at: f64,
    /// First `/lb/status` sample after the kill with fewer servers in the ring.
    pub detected_after: Option<f64>,
    /// First later sample that lists N again.
    pub restored_after: Option<f64>,
    pub requests: u64,
    pub failed: u64,
    pub errors: Vec<(String, u64)>,
    pub timeline: super::charts::Timeline,
}

/// A-3: every endpoint, then a replica killed under a steady load.
pub async fn resilience(bin: &Path, load_secs: u64) -> Result<Resilience, AnalysisError> {
    eprintln!("  A-3: endpoints and a replica killed under load");
    let mut spec = GatewaySpec::new(3, HashChoice::Default);
    spec.health_interval = "250ms";
    spec.recovery_delay = "1s";
    let gw = LabGateway::start(bin, &spec).await?;
    let result = resilience_on(&gw, load_secs).await;
    gw.stop().await;
    result
}

async fn resilience_on(gw: &LabGateway, load_secs: u64) -> Result<Resilience, AnalysisError> {
    let calls: [(Method, &str, Option<&str>, u16); 13] = [
        (Method::GET, "/home?id=123456", None, 200),
        (Method::GET, "/rep", None, 200),
        (
            Method::POST,
            "/add",
            Some(r#"{"n": 1, "hostnames": ["S5"]}"#),
            200,
        ),
        (
            Method::DELETE,
            "/rm",
            Some(r#"{"n": 1, "hostnames": ["S5"]}"#),
            200,
        ),
        (
            Method::POST,
            "/add",
            Some(r#"{"n": 1, "hostnames": ["a", "b"]}"#),
            400,
        ),
        (
            Method::DELETE,
            "/rm",
            Some(r#"{"n": 1, "hostnames": ["nope"]}"#),
            400,
        ),
        (Method::POST, "/add", Some("not json"), 400),
        (Method::DELETE, "/rm", Some(r#"{"n": 0}"#), 400),
        (Method::GET, "/heartbeat", None, 200),
        (Method::GET, "/no/such/path", None, 404),
        (Method::GET, "/lb/health", None, 200),
        (Method::GET, "/lb/status", None, 200),
        (Method::GET, "/lb/metrics", None, 200),
    ];
    let mut endpoints = Vec::new();
    for (method, path, body, expected) in calls {
        let call = match body {
            Some(b) => format!("{method} {path} {b}"),
            None => format!("{method} {path}"),
        };
        let (got, text) = match gw.call(method, path, body).await {
            Ok((s, b)) => (
                Some(s),
                String::from_utf8_lossy(&b).chars().take(120).collect(),
            ),
            Err(e) => (None, e.to_string()),
        };
        endpoints.push(EndpointCheck {
            call,
            expected,
            got,
            body: text,
        });
    }
    gw.wait_ready(3, Duration::from_secs(30)).await?;

    // Steady load (paced so the /rep poller keeps its rhythm on a small machine).
    let mut cfg = LoadConfig::new(gw.url("/home"), u64::MAX, 8);
    cfg.requests = None;
    cfg.duration = Some(Duration::from_secs(load_secs));
    cfg.keys = KeyPlan::Random6 { seed: KEY_SEED };
    cfg.pace = Some(Duration::from_millis(4));
    cfg.timeout = Duration::from_secs(5);
    let start = Instant::now();
    let load_task = tokio::spawn(async move { loadgen::run(&cfg).await });

    let kill_at = load_secs as f64 / 4.0;
    let mut killed = None;
    let mut samples = Vec::new();
    let mut desired = Vec::new();
    let end = start + Duration::from_secs(load_secs);
    while Instant::now() < end {
        let t = start.elapsed().as_secs_f64();
        if killed.is_none() && t >= kill_at {
            let victims = gw.replica_processes();
            if let Some((pid, id)) = victims
                .iter()
                .find(|(_, id)| id == "server-2")
                .or(victims.first())
            {
                signal(*pid, "KILL");
                killed = Some(id.clone());
            } else {
                killed = Some("(no replica process found)".to_string());
            }
        }
        if let Ok((d, u)) = gw.up_counts().await {
            let t = start.elapsed().as_secs_f64();
            samples.push((t, u as f64));
            desired.push((t, d as f64));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = load_task.await.map_err(loadgen::LoadError::from)??;
    let summary = report.summary();

    let bucket = 0.1;
    let nb = (load_secs as f64 / bucket).ceil() as usize + 1;
    let mut buckets: Vec<(f64, u64, u64)> = (0..nb).map(|i| (i as f64 * bucket, 0, 0)).collect();
    for r in &report.records {
        let i = ((r.offset.as_secs_f64() / bucket) as usize).min(nb - 1);
        if let Some(b) = buckets.get_mut(i) {
            b.2 += 1;
            if !r.is_ok() {
                b.1 += 1;
            }
        }
    }
    let detected_after = samples
        .iter()
        .find(|(t, n)| *t >= kill_at && *n < 3.0)
        .map(|(t, _)| t - kill_at);
    let restored_after = detected_after.and_then(|d| {
        samples
            .iter()
            .find(|(t, n)| *t >= kill_at + d && *n >= 3.0)
            .map(|(t, _)| t - kill_at)
    });
    Ok(Resilience {
        endpoints,
        killed,
        kill_at,
        detected_after,
        restored_after,
        requests: summary.total,
        failed: summary.failed,
        errors: summary.errors.into_iter().collect(),
        timeline: super::charts::Timeline {
            replicas: samples,
            desired,
            buckets,
            bucket_secs: bucket,
            kill_at,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(counts: &[u64]) -> Distribution {
        Distribution {
            hash: "h".into(),
            n: counts.len() as u32,
            servers: counts
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("server-{}", i + 1), *c))
                .collect(),
            failed: 0,
            requests_per_sec: 0.0,
        }
    }

    #[test]
    fn spread_statistics() {
        let d = dist(&[10, 20, 30]);
        assert_eq!(d.mean(), 20.0);
        assert_eq!((d.min(), d.max()), (10.0, 30.0));
        assert!((d.stddev() - (200.0_f64 / 3.0).sqrt()).abs() < 1e-9);
        assert_eq!(d.max_over_mean(), 1.5);
        assert_eq!(dist(&[5, 5]).cv(), 0.0);
    }

    #[test]
    fn movement_counts_only_answered_keys() {
        let s = |x: &str| Some(x.to_string());
        let before = vec![s("a"), s("b"), s("c"), None];
        let after = vec![s("a"), s("n"), s("a"), s("a")];
        let (m, e, u) = moved(&before, &after, "n", true);
        assert!((m - 2.0 / 3.0).abs() < 1e-9);
        assert!((e - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(u, 1);
    }

    #[test]
    fn servers_sort_naturally() {
        let mut v = vec!["server-10", "server-9", "server-1"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, ["server-1", "server-9", "server-10"]);
    }
}

/// One kill of the failover run.
#[derive(Debug, Clone)]
pub struct Kill {
    pub victim: String,
    /// Seconds into the run.
    pub at: f64,
    /// Milliseconds from the kill to the first `/lb/status` sample with the victim out of the ring.
    pub detected_ms: Option<f64>,
    /// Milliseconds from the kill to the first sample with N servers in the ring again.
    pub restored_ms: Option<f64>,
}

/// The failover run: one replica SIGKILLed every few seconds under steady load.
#[derive(Debug, Clone)]
pub struct Failover {
    pub secs: u64,
    pub every: u64,
    pub concurrency: usize,
    pub requests: u64,
    pub failed: u64,
    pub rps: f64,
    pub kills: Vec<Kill>,
    /// The gateway's `proxy.retry_on` in this run.
    pub retry_on: &'static str,
    /// Failed requests by kind (`http 502`, `timeout`, …).
    pub errors: std::collections::BTreeMap<String, u64>,
}

/// `proxy.retry_on` as the gateway ships it: only failed connects are retried.
pub const RETRY_ON_DEFAULT: &str = r#"["connect-failure"]"#;
/// Also a connection that broke before a response (idempotent requests whose body was not sent).
pub const RETRY_ON_RESET: &str = r#"["connect-failure", "reset"]"#;

/// Kills server-1, server-2, server-3, … in turn, every `every` seconds, for `secs` seconds,
/// under a steady load at concurrency 16. Checks run at the default 10 s interval, so detection
/// comes from the fast signals (the provider's exit report, failed connects).
/// `retry_on` is the gateway's `proxy.retry_on` ([`RETRY_ON_DEFAULT`] or [`RETRY_ON_RESET`]).
pub async fn failover(
    bin: &Path,
    secs: u64,
    every: u64,
    retry_on: &'static str,
) -> Result<Failover, AnalysisError> {
    eprintln!("  failover: a replica killed every {every} s for {secs} s under load, retry_on = {retry_on}");
    let mut spec = GatewaySpec::new(3, HashChoice::Default);
    spec.health_interval = "10s";
    spec.recovery_delay = "1s";
    spec.proxy_extra = format!("retry_on = {retry_on}\n");
    let gw = LabGateway::start(bin, &spec).await?;
    let result = failover_on(&gw, secs, every.max(1), retry_on).await;
    gw.stop().await;
    result
}

async fn failover_on(
    gw: &LabGateway,
    secs: u64,
    every: u64,
    retry_on: &'static str,
) -> Result<Failover, AnalysisError> {
    gw.wait_ready(3, Duration::from_secs(30)).await?;
    let concurrency = 16;
    let mut cfg = LoadConfig::new(gw.url("/home"), u64::MAX, concurrency);
    cfg.requests = None;
    cfg.duration = Some(Duration::from_secs(secs));
    cfg.keys = KeyPlan::Random6 { seed: KEY_SEED };
    cfg.timeout = Duration::from_secs(5);
    let start = Instant::now();
    let load_task = tokio::spawn(async move { loadgen::run(&cfg).await });

    let mut kills: Vec<Kill> = Vec::new();
    let mut next_kill = every as f64 / 2.0;
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        let t = start.elapsed().as_secs_f64();
        let settled = kills.last().is_none_or(|k| k.restored_ms.is_some());
        if t >= next_kill && settled && t < secs as f64 - 3.0 {
            let name = format!("server-{}", kills.len() % 3 + 1);
            if let Some((pid, _)) = gw
                .replica_processes()
                .into_iter()
                .find(|(_, id)| *id == name)
            {
                signal(pid, "KILL");
                kills.push(Kill {
                    victim: name,
                    at: start.elapsed().as_secs_f64(),
                    detected_ms: None,
                    restored_ms: None,
                });
            }
            next_kill += every as f64;
        }
        if let Ok((_, up)) = gw.up_counts().await {
            let now = start.elapsed().as_secs_f64();
            if let Some(k) = kills.last_mut() {
                let ms = (now - k.at) * 1000.0;
                if k.detected_ms.is_none() && up < 3 {
                    k.detected_ms = Some(ms);
                } else if k.detected_ms.is_some() && k.restored_ms.is_none() && up >= 3 {
                    k.restored_ms = Some(ms);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = load_task.await.map_err(loadgen::LoadError::from)??;
    let summary = report.summary();
    Ok(Failover {
        secs,
        every,
        concurrency,
        requests: summary.total,
        failed: summary.failed,
        rps: summary.requests_per_sec,
        kills,
        retry_on,
        errors: summary.errors,
    })
}
