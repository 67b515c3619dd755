//! Load generator: drives N requests (or a time window) at concurrency C against one loopback URL
//! through a pooled hyper-util client, records every request (status, latency, answering server,
//! error kind, start offset) and summarises them (requests/s, percentiles, load per server).
//!
//! Used by `ringgate-lab load`, by the experiments in [`crate::analysis`] and by `make bench`.
//! It only ever talks to loopback addresses.
//!
//! Owns: the client side of a load run and its figures. Must not touch: the gateway's routing
//! (the random ids come from the product's own [`ringgate::hashing::mix64`], nothing here
//! decides where a key goes).

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ringgate::hashing::mix64;

/// Prefix of the `message` field a `ringgate-server` answers `/home` with.
pub const SERVER_MESSAGE_PREFIX: &str = "Hello from Server: ";

/// Errors of the load generator itself (not of individual requests, which are recorded).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("refusing to send load to {host:?}: only loopback targets are allowed")]
    NotLoopback { host: String },
    #[error("a run needs a request count or a duration")]
    Unbounded,
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
    #[error("key list is empty")]
    EmptyKeyList,
    #[error("load worker failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

/// Which `?id=` each request of a run sends (the gateway's own `hashing::KeySource` is where it
/// reads the key from; this is what the load puts there).
#[derive(Debug, Clone)]
pub enum KeyPlan {
    /// No `id` parameter is added.
    None,
    /// A 6-digit id, a deterministic function of `seed` and the request's sequence number.
    Random6 { seed: u64 },
    /// The same id on every request.
    Fixed(String),
    /// Request number `n` uses `keys[n % keys.len()]`.
    List(Arc<[String]>),
}

impl KeyPlan {
    /// The key request number `seq` uses, if any.
    pub fn key(&self, seq: u64) -> Option<String> {
        match self {
            KeyPlan::None => None,
            KeyPlan::Random6 { seed } => Some(random6(*seed, seq).to_string()),
            KeyPlan::Fixed(k) => Some(k.clone()),
            KeyPlan::List(keys) => {
                let len = keys.len() as u64;
                if len == 0 {
                    None
                } else {
                    keys.get((seq % len) as usize).cloned()
                }
            }
        }
    }
}

/// A deterministic pseudo-random 6-digit number (100000..=999999) for request `seq`.
pub fn random6(seed: u64, seq: u64) -> u64 {
    100_000 + mix64(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 900_000
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Target, e.g. `http://127.0.0.1:5000/home`. Must be a loopback address.
    pub url: String,
    /// Number of requests; `None` with a `duration` runs until the time is up.
    pub requests: Option<u64>,
    /// Time window; the run stops issuing requests when it has passed.
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub keys: KeyPlan,
    /// Per-request timeout (connect + response + body).
    pub timeout: Duration,
    /// Show a progress bar (only drawn when stdout is a terminal).
    pub progress: bool,
    /// Optional pause between two requests of one worker, to hold a steady rate.
    pub pace: Option<Duration>,
}

impl LoadConfig {
    pub fn new(url: impl Into<String>, requests: u64, concurrency: usize) -> Self {
        LoadConfig {
            url: url.into(),
            requests: Some(requests),
            duration: None,
            concurrency,
            keys: KeyPlan::Random6 { seed: 0x7269_6e67 },
            timeout: Duration::from_secs(10),
            progress: false,
            pace: None,
        }
    }
}

/// Why a request did not produce a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Request,
    Body,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Request => "request",
            ErrorKind::Body => "body",
        })
    }
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number (decides the key).
    pub seq: u64,
    /// When the request started, from the start of the run.
    pub offset: Duration,
    pub latency: Duration,
    pub status: Option<u16>,
    /// The `SERVER_ID` of the replica that answered, from the `/home` message.
    pub server: Option<String>,
    pub error: Option<ErrorKind>,
}

impl Record {
    /// A 2xx response was received in full.
    pub fn is_ok(&self) -> bool {
        self.error.is_none() && matches!(self.status, Some(s) if (200..300).contains(&s))
    }
}

/// All records of a run and its wall time.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub records: Vec<Record>,
    pub elapsed: Duration,
}

/// The figures of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub total: u64,
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub requests_per_sec: f64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Successful responses per answering server.
    pub per_server: BTreeMap<String, u64>,
    /// Failures by kind (`connect`, `timeout`, `http 502`, ...).
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    pub fn summary(&self) -> Summary {
        let mut latencies: Vec<Duration> = self.records.iter().map(|r| r.latency).collect();
        latencies.sort_unstable();
        let mut per_server = BTreeMap::new();
        let mut errors = BTreeMap::new();
        let mut ok = 0;
        for r in &self.records {
            if r.is_ok() {
                ok += 1;
                if let Some(s) = &r.server {
                    *per_server.entry(s.clone()).or_insert(0) += 1;
                }
            } else {
                let kind = match (r.error, r.status) {
                    (Some(e), _) => e.to_string(),
                    (None, Some(s)) => format!("http {s}"),
                    (None, None) => "unknown".to_string(),
                };
                *errors.entry(kind).or_insert(0) += 1;
            }
        }
        let total = self.records.len() as u64;
        let secs = self.elapsed.as_secs_f64();
        Summary {
            total,
            ok,
            failed: total - ok,
            elapsed: self.elapsed,
            requests_per_sec: if secs > 0.0 { total as f64 / secs } else { 0.0 },
            p50: percentile(&latencies, 50.0),
            p90: percentile(&latencies, 90.0),
            p99: percentile(&latencies, 99.0),
            max: latencies.last().copied().unwrap_or_default(),
            per_server,
            errors,
        }
    }
}

/// Nearest-rank percentile of sorted values; zero for an empty slice.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// The server id in a `/home` body: `{"message": "Hello from Server: <id>", ...}`.
pub fn parse_server(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msg = v.get("message")?.as_str()?;
    let id = msg.strip_prefix(SERVER_MESSAGE_PREFIX)?.trim();
    (!id.is_empty()).then(|| id.to_string())
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests {}  ok {}  failed {}  in {:.2}s  ->  {:.0} req/s",
            self.total,
            self.ok,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.requests_per_sec
        )?;
        writeln!(
            f,
            "latency  p50 {}  p90 {}  p99 {}  max {}",
            fmt_ms(self.p50),
            fmt_ms(self.p90),
            fmt_ms(self.p99),
            fmt_ms(self.max)
        )?;
        if !self.per_server.is_empty() {
            writeln!(f, "{:<20} {:>9} {:>7}", "server", "requests", "share")?;
            for (s, n) in &self.per_server {
                let share = if self.ok > 0 {
                    100.0 * *n as f64 / self.ok as f64
                } else {
                    0.0
                };
                writeln!(f, "{s:<20} {n:>9} {share:>6.1}%")?;
            }
        }
        for (kind, n) in &self.errors {
            writeln!(f, "error {kind}: {n}")?;
        }
        Ok(())
    }
}

/// Milliseconds with three decimals, e.g. `1.234ms`.
pub fn fmt_ms(d: Duration) -> String {
    format!("{:.3}ms", d.as_secs_f64() * 1e3)
}

/// Checks that `url` is an `http://` URL whose host is a loopback address.
pub fn check_loopback(url: &str) -> Result<Uri, LoadError> {
    let uri: Uri =
        url.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| LoadError::InvalidUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
    if uri.scheme_str() != Some("http") {
        return Err(LoadError::InvalidUrl {
            url: url.to_string(),
            reason: "only http:// is supported".to_string(),
        });
    }
    let host = uri.host().ok_or_else(|| LoadError::InvalidUrl {
        url: url.to_string(),
        reason: "no host".to_string(),
    })?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if !loopback {
        return Err(LoadError::NotLoopback {
            host: host.to_string(),
        });
    }
    Ok(uri)
}

/// A pooled HTTP/1 client for loopback targets.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the pooled client used by the load generator and the experiments.
pub fn client(max_idle_per_host: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Appends `id=<key>` to `base` (with `?` or `&`).
pub fn with_key(base: &str, key: Option<&str>) -> String {
    match key {
        None => base.to_string(),
        Some(k) if base.contains('?') => format!("{base}&id={k}"),
        Some(k) => format!("{base}?id={k}"),
    }
}

/// Sends one request and records what came back.
pub async fn send_one(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> (Option<u16>, Result<Bytes, ErrorKind>) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.unwrap_or_default()));
    let req = match req {
        Ok(r) => r,
        Err(_) => return (None, Err(ErrorKind::Request)),
    };
    let fut = async {
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() {
                ErrorKind::Connect
            } else {
                ErrorKind::Request
            }
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| ErrorKind::Body)?
            .to_bytes();
        Ok::<_, ErrorKind>((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => (None, Err(ErrorKind::Timeout)),
        Ok(Err(e)) => (None, Err(e)),
        Ok(Ok((status, body))) => (Some(status), Ok(body)),
    }
}

/// Runs the load described by `cfg` and returns every request's record, ordered by sequence.
pub async fn run(cfg: &LoadConfig) -> Result<Report, LoadError> {
    check_loopback(&cfg.url)?;
    if cfg.requests.is_none() && cfg.duration.is_none() {
        return Err(LoadError::Unbounded);
    }
    if cfg.concurrency == 0 {
        return Err(LoadError::ZeroConcurrency);
    }
    if let KeyPlan::List(k) = &cfg.keys {
        if k.is_empty() {
            return Err(LoadError::EmptyKeyList);
        }
    }
    let limit = cfg.requests.unwrap_or(u64::MAX);
    let client = client(cfg.concurrency);
    let progress = progress_bar(cfg);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let cfg = Arc::new(cfg.clone());

    let mut workers = Vec::with_capacity(cfg.concurrency);
    for _ in 0..cfg.concurrency {
        let (client, next, cfg, progress) =
            (client.clone(), next.clone(), cfg.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= limit {
                    break;
                }
                let url = with_key(&cfg.url, cfg.keys.key(seq).as_deref());
                let t0 = Instant::now();
                let (status, body) = send_one(&client, Method::GET, &url, None, cfg.timeout).await;
                let latency = t0.elapsed();
                let (server, error) = match body {
                    Ok(b) => (parse_server(&b), None),
                    Err(e) => (None, Some(e)),
                };
                out.push(Record {
                    seq,
                    offset: t0.duration_since(start),
                    latency,
                    status,
                    server,
                    error,
                });
                progress.inc(1);
                if let Some(p) = cfg.pace {
                    tokio::time::sleep(p).await;
                }
            }
            out
        }));
    }
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.await?);
    }
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    records.sort_unstable_by_key(|r| r.seq);
    Ok(Report { records, elapsed })
}

fn progress_bar(cfg: &LoadConfig) -> ProgressBar {
    if !cfg.progress || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match cfg.requests {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if cfg.requests.is_some() {
        "{bar:40.cyan/blue} {pos}/{len} {per_sec} eta {eta}"
    } else {
        "{spinner} {pos} requests {per_sec} {elapsed}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    bar
}

/// `ringgate-lab load`: run the load generator against a URL and print the summary.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Target URL (loopback only), e.g. http://127.0.0.1:5000/home
    #[arg(default_value = "http://127.0.0.1:5000/home")]
    pub url: String,
    /// Number of requests
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub requests: u64,
    /// Run for this long instead of a request count (e.g. 10s)
    #[arg(short = 'd', long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Concurrent requests in flight
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// Fixed `id` for every request (default: a random 6-digit id per request)
    #[arg(long, conflicts_with = "no_key")]
    pub key: Option<String>,
    /// Send no `id` parameter
    #[arg(long)]
    pub no_key: bool,
    /// Seed of the random ids
    #[arg(long, default_value_t = 0x7269_6e67)]
    pub seed: u64,
    /// Per-request timeout
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs `ringgate-lab load`.
pub async fn run_cli(args: LoadArgs) -> Result<Summary, LoadError> {
    let keys = match (&args.key, args.no_key) {
        (_, true) => KeyPlan::None,
        (Some(k), false) => KeyPlan::Fixed(k.clone()),
        (None, false) => KeyPlan::Random6 { seed: args.seed },
    };
    let cfg = LoadConfig {
        url: args.url,
        requests: if args.duration.is_some() {
            None
        } else {
            Some(args.requests)
        },
        duration: args.duration,
        concurrency: args.concurrency,
        keys,
        timeout: args.timeout,
        progress: true,
        pace: None,
    };
    let report = run(&cfg).await?;
    let summary = report.summary();
    print!("{summary}");
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rec(seq: u64, lat: u64, status: Option<u16>, server: Option<&str>) -> Record {
        Record {
            seq,
            offset: ms(seq),
            latency: ms(lat),
            status,
            server: server.map(str::to_string),
            error: if status.is_none() {
                Some(ErrorKind::Connect)
            } else {
                None
            },
        }
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&v, 50.0), ms(50));
        assert_eq!(percentile(&v, 90.0), ms(90));
        assert_eq!(percentile(&v, 99.0), ms(99));
        assert_eq!(percentile(&v, 100.0), ms(100));
        assert_eq!(percentile(&v, 0.0), ms(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
    }

    #[test]
    fn parses_server_from_home_message() {
        let body = br#"{"message": "Hello from Server: server-2", "status": "successful"}"#;
        assert_eq!(parse_server(body).as_deref(), Some("server-2"));
        assert_eq!(parse_server(br#"{"message": "nope"}"#), None);
        assert_eq!(parse_server(b"not json"), None);
        assert_eq!(
            parse_server(br#"{"message": "Hello from Server: ", "status": "successful"}"#),
            None
        );
        assert_eq!(parse_server(br#"{"message": {"N": 3}}"#), None);
    }

    #[test]
    fn summary_counts_servers_and_errors() {
        let report = Report {
            records: vec![
                rec(0, 1, Some(200), Some("a")),
                rec(1, 2, Some(200), Some("b")),
                rec(2, 3, Some(200), Some("a")),
                rec(3, 4, Some(502), None),
                rec(4, 5, None, None),
            ],
            elapsed: Duration::from_secs(1),
        };
        let s = report.summary();
        assert_eq!((s.total, s.ok, s.failed), (5, 3, 2));
        assert_eq!(s.per_server.get("a"), Some(&2));
        assert_eq!(s.per_server.get("b"), Some(&1));
        assert_eq!(s.errors.get("http 502"), Some(&1));
        assert_eq!(s.errors.get("connect"), Some(&1));
        assert_eq!(s.p50, ms(3));
        assert_eq!(s.max, ms(5));
        assert!((s.requests_per_sec - 5.0).abs() < 1e-9);
    }

    #[test]
    fn loopback_only() {
        assert!(check_loopback("http://127.0.0.1:5000/home").is_ok());
        assert!(check_loopback("http://localhost/home").is_ok());
        assert!(check_loopback("http://[::1]:80/").is_ok());
        assert!(matches!(
            check_loopback("http://10.0.0.1/home"),
            Err(LoadError::NotLoopback { .. })
        ));
        assert!(matches!(
            check_loopback("https://127.0.0.1/"),
            Err(LoadError::InvalidUrl { .. })
        ));
        assert!(check_loopback("not a url").is_err());
    }

    #[test]
    fn keys_are_deterministic_six_digits() {
        let k = KeyPlan::Random6 { seed: 1 };
        for seq in 0..1000 {
            let v: u64 = k.key(seq).and_then(|s| s.parse().ok()).unwrap_or(0);
            assert!((100_000..1_000_000).contains(&v));
            assert_eq!(k.key(seq), k.key(seq));
        }
        let list = KeyPlan::List(vec!["x".to_string(), "y".to_string()].into());
        assert_eq!(list.key(3).as_deref(), Some("y"));
        assert_eq!(with_key("http://h/home", Some("5")), "http://h/home?id=5");
        assert_eq!(
            with_key("http://h/home?a=1", Some("5")),
            "http://h/home?a=1&id=5"
        );
    }

    #[tokio::test]
    async fn unbounded_runs_are_rejected() {
        let mut cfg = LoadConfig::new("http://127.0.0.1:1/home", 1, 1);
        cfg.requests = None;
        assert!(matches!(run(&cfg).await, Err(LoadError::Unbounded)));
    }
}
