//! Configuration: `conf/lb.toml`.
//!
//! Owns: the shape of the config (one struct per `[section]`) and its defaults; the submodules
//! own the rest: [`load`] (file and text to a valid `Config`, errors naming file, line and key),
//! [`source_file`] (reading an operator's file: regular files only, without blocking, capped),
//! [`validate`] (every problem at once, each naming its key) and [`values`] (durations, sizes,
//! address ranges). A `Config` that exists is valid.
//! Must not touch: anything running. Applying a config is the controller's job; watching the
//! file is the watcher's.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::hashing::{HashFunction, KeySource, KeySources};

mod load;
pub mod replica;
pub mod source_file;
mod validate;
mod values;

pub use load::{ConfigError, MAX_CONFIG_FILE};
pub use replica::{Mount, MountSource, PortMode};
pub use validate::Problem;
pub use values::parse_size;
use values::{byte_size, duration, expect_status, from_str, ip_nets, key_sources};

/// Largest ring we accept: the owner table is one entry per slot, kept small enough to stay in
/// cache.
pub const MAX_SLOTS: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gateway listens on. Changing it needs a restart.
    pub listen: SocketAddr,
    /// This gateway's name in `Via` headers, `/lb/status` and the ring record; empty means
    /// `$RINGGATE_NAME`, else the host name.
    pub name: String,
    pub ring: RingConfig,
    pub hashing: HashingConfig,
    pub replicas: ReplicasConfig,
    pub provider: ProviderConfig,
    pub health: HealthConfig,
    pub proxy: ProxyConfig,
    pub policy: PolicyConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub tunnels: TunnelsConfig,
    pub autoscale: AutoscaleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            name: String::new(),
            ring: RingConfig::default(),
            hashing: HashingConfig::default(),
            replicas: ReplicasConfig::default(),
            provider: ProviderConfig::default(),
            health: HealthConfig::default(),
            proxy: ProxyConfig::default(),
            policy: PolicyConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            tunnels: TunnelsConfig::default(),
            autoscale: AutoscaleConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    pub slots: u32,
    pub vnodes: u32,
    pub request_hash: HashFunction,
    pub vnode_hash: HashFunction,
    /// Consistent hashing with bounded loads: 0 is off; c ≥ 1 keeps every server under
    /// ⌈c · mean in flight⌉.
    pub balance_factor: f64,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            slots: 512,
            vnodes: 9,
            request_hash: HashFunction::Quadratic,
            vnode_hash: HashFunction::Quadratic,
            balance_factor: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashingConfig {
    #[serde(deserialize_with = "key_sources")]
    pub key: KeySources,
    /// A cookie the gateway sets on the answer to a request that has no key, with the random
    /// key it got, and reads first: a client without a key keeps one. Empty: off.
    pub set_cookie: String,
    /// The `Max-Age` of that cookie.
    #[serde(deserialize_with = "duration")]
    pub cookie_max_age: Duration,
}

impl Default for HashingConfig {
    fn default() -> Self {
        HashingConfig {
            key: KeySources::one(KeySource::Query("id".into())),
            set_cookie: String::new(),
            cookie_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// `[tunnels]`: upgraded connections (WebSocket and the like) spliced to their replica.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelsConfig {
    /// A tunnel that carries no byte either way for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Tunnels open at once; 0 derives it (half of `proxy.max_requests`).
    pub max: u32,
    /// Whether a tunnel whose key's slot gets another owner is closed (so its client
    /// reconnects to the new owner); `false` leaves it until it ends.
    pub rehome: bool,
    /// The closes of one change are spread over this window, with jitter.
    #[serde(deserialize_with = "duration")]
    pub rehome_window: Duration,
    /// At most this many tunnels closed a second (the window stretches when more move).
    pub rehome_per_second: u32,
    /// A tunnel (plain TCP both ways) that carried nothing for this long rests without a task
    /// until either side sends, its close comes or its idle timeout; 0 keeps every tunnel in
    /// a task of its own.
    #[serde(deserialize_with = "duration")]
    pub rest_after: Duration,
}

impl Default for TunnelsConfig {
    fn default() -> Self {
        TunnelsConfig {
            idle_timeout: Duration::from_secs(3600),
            max: 0,
            rehome: true,
            rehome_window: Duration::from_secs(10),
            rehome_per_second: 200,
            rest_after: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasConfig {
    pub count: u32,
    pub max_replicas: u32,
    pub name_prefix: String,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        ReplicasConfig {
            count: 3,
            max_replicas: 50,
            name_prefix: "server-".into(),
        }
    }
}

/// `[autoscale]`: N follows the replicas' requests in flight (see `docs/autoscaling.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleConfig {
    pub enabled: bool,
    /// Fewest replicas the autoscaler keeps.
    pub min: u32,
    /// Most replicas the autoscaler starts (at most `replicas.max_replicas`).
    pub max: u32,
    /// Requests in flight per replica the autoscaler aims at.
    pub target_in_flight: f64,
    /// The window whose average in flight decides N in normal times.
    #[serde(deserialize_with = "duration")]
    pub stable_window: Duration,
    /// The short window: its average over 2x the target scales up at once (never down).
    #[serde(deserialize_with = "duration")]
    pub panic_window: Duration,
    /// How long lower load must hold before N goes down.
    #[serde(deserialize_with = "duration")]
    pub scale_down_delay: Duration,
    /// Most replicas added or removed by one decision.
    pub max_step: u32,
    /// With `min = 0`: no request for this long takes N to 0 (zero: off, N stays at least 1).
    #[serde(deserialize_with = "duration")]
    pub idle_to_zero: Duration,
    /// Requests held at once while N is 0 and the first replica starts; more get a 503.
    pub hold_max: u32,
    /// Longest a request is held for a replica to start; then it gets a 503.
    #[serde(deserialize_with = "duration")]
    pub hold_timeout: Duration,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        AutoscaleConfig {
            enabled: false,
            min: 1,
            max: 10,
            target_in_flight: 10.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            scale_down_delay: Duration::from_secs(300),
            max_step: 4,
            idle_to_zero: Duration::ZERO,
            hold_max: 100,
            hold_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Auto,
    Process,
    Docker,
    Static,
    Swarm,
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Auto => "auto",
            ProviderKind::Process => "process",
            ProviderKind::Docker => "docker",
            ProviderKind::Static => "static",
            ProviderKind::Swarm => "swarm",
        })
    }
}

/// How the `swarm` provider reaches a replica's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// At the task's address on `provider.network` (the gateway runs on that overlay network).
    Network,
    /// At its node's address and the port the engine published for it on that node (host-mode
    /// publishing; the gateway may run anywhere that reaches the nodes).
    Published,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticServer {
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub image: String,
    pub network: String,
    pub container_port: u16,
    /// Docker: memory a replica container may use, in bytes (swap included); 0 is no limit.
    #[serde(deserialize_with = "byte_size")]
    pub memory_limit: u64,
    /// Docker: processes and threads a replica container may have at once; 0 is no limit.
    pub pids_limit: u32,
    /// Docker: CPU time a replica container may use, in CPUs (a CFS quota); 0 is no limit.
    pub cpus: f64,
    /// Docker: a replica's json-file log is rotated at this size; 0 leaves logging to the
    /// engine's defaults.
    #[serde(deserialize_with = "byte_size")]
    pub log_max_size: u64,
    /// Docker: rotated log files kept per replica (with `log_max_size`).
    pub log_max_files: u32,
    /// Process provider: the `ringgate-server` binary. Empty: the one beside `ringgate`.
    pub server_binary: Option<PathBuf>,
    /// Static provider: the fixed replicas.
    pub servers: Vec<StaticServer>,
    /// Swarm provider: how the gateway reaches a replica's task.
    pub reach: Reach,
    /// Talk TLS to the replicas (requests and health checks), verified against `upstream_ca`.
    pub upstream_tls: bool,
    /// The CA certificates (PEM) a replica's certificate must chain to.
    pub upstream_ca: Option<PathBuf>,
    /// The name a replica's certificate must carry (and the SNI sent); unset: its IP address.
    pub upstream_server_name: Option<String>,
    /// The replica spec (every provider that starts replicas). The program and its first
    /// arguments: a process replica's whole command line (unset: `server_binary`), a
    /// container's entrypoint (unset: the image's). Placeholders: `{port}`, `{hostname}`, `{id}`.
    pub command: Vec<String>,
    /// More arguments: after `command` for processes; a container's command (the image's CMD).
    pub args: Vec<String>,
    /// The replica's environment besides `PORT` and `SERVER_ID` (placeholders allowed).
    pub env: BTreeMap<String, String>,
    /// The working directory of a process replica (a container's, overriding the image's).
    pub workdir: Option<PathBuf>,
    /// Process replicas: how the port is decided (see [`PortMode`]).
    pub port: PortMode,
    /// Containers: bind mounts and named volumes, `SOURCE:TARGET[:ro|:rw]`, read-only unless
    /// `:rw`.
    pub mounts: Vec<Mount>,
    /// Containers: labels of their own (ours, `ringgate.*`, are added and cannot be set here).
    pub labels: BTreeMap<String, String>,
    /// Containers: the user the app runs as (`"1000:1000"`, `"nobody"`); unset: the image's.
    pub user: Option<String>,
    /// Containers: a read-only root file system (the default); false for apps that must write
    /// outside their mounts.
    pub read_only_root: bool,
    /// How long a new replica has to pass `rise` checks (an `/add` answers with its error after
    /// this).
    #[serde(deserialize_with = "duration")]
    pub start_timeout: Duration,
    /// How many replicas a roll (a live spec edit, `POST /lb/roll`) replaces at once.
    pub roll_batch: u32,
}

impl ProviderConfig {
    /// Relative bind-mount sources and `workdir` made absolute against `base`, the config file's
    /// directory (as docker-compose resolves `./data`): the file means the same directories
    /// wherever the gateway was started from.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let base = if base.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            base
        };
        self.mounts = std::mem::take(&mut self.mounts)
            .into_iter()
            .map(|m| m.resolved(base))
            .collect();
        if let Some(w) = self.workdir.as_mut().filter(|w| w.is_relative()) {
            let joined = base.join(&*w);
            *w = std::path::absolute(&joined).unwrap_or(joined);
        }
    }
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            kind: ProviderKind::Auto,
            image: "ringgate-server:latest".into(),
            network: "net1".into(),
            container_port: 5000,
            memory_limit: 128 * 1024 * 1024,
            pids_limit: 64,
            cpus: 1.0,
            log_max_size: 10 * 1024 * 1024,
            log_max_files: 3,
            server_binary: None,
            servers: Vec::new(),
            reach: Reach::Network,
            upstream_tls: false,
            upstream_ca: None,
            upstream_server_name: None,
            command: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            port: PortMode::Auto,
            mounts: Vec::new(),
            labels: BTreeMap::new(),
            user: None,
            read_only_root: true,
            start_timeout: Duration::from_secs(30),
            roll_batch: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    #[serde(deserialize_with = "duration")]
    pub recovery_delay: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
    /// Largest share (percent) of the members that failed connects on the request path may take
    /// out of the ring at once; one may always be taken out. Active checks are not capped.
    pub max_ejection_percent: u32,
    /// The path active checks GET.
    pub path: String,
    /// The statuses that pass a check.
    #[serde(deserialize_with = "expect_status")]
    pub expect_status: ExpectStatus,
    /// A replica that joins takes its keys over gradually during this window; 0 is off.
    #[serde(deserialize_with = "duration")]
    pub slow_start: Duration,
    /// Outlier ejection: this many 5xx answers in a row take a replica out; 0 is off.
    pub eject_after_5xx: u32,
    /// Outlier ejection: this percent or more of 5xx answers over `eject_window` takes a
    /// replica out (with at least `eject_min_requests` answers); 0 is off.
    pub eject_failure_percent: u32,
    #[serde(deserialize_with = "duration")]
    pub eject_window: Duration,
    pub eject_min_requests: u32,
    /// How long an ejected replica stays out, times the ejections it had in a row (capped by
    /// `max_backoff`); it returns once this has passed and its checks pass.
    #[serde(deserialize_with = "duration")]
    pub eject_time: Duration,
    /// How active checks ask: `GET path` over HTTP, or `grpc.health.v1.Health/Check`.
    pub protocol: HealthProtocol,
    /// The service a gRPC check names (`""`: the server as a whole).
    pub grpc_service: String,
}

/// `[health] protocol`: how a replica is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProtocol {
    /// `GET [health] path`, a status in `expect_status` passes.
    #[default]
    Http,
    /// `grpc.health.v1.Health/Check` over HTTP/2 (h2c, or TLS with ALPN `h2`): `SERVING` passes.
    Grpc,
}

/// `[health] expect_status`: status codes and inclusive ranges a check may answer with
/// (HAProxy's `http-check expect status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectStatus(pub Vec<(u16, u16)>);

impl ExpectStatus {
    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl Default for ExpectStatus {
    fn default() -> Self {
        ExpectStatus(vec![(200, 200)])
    }
}

impl fmt::Display for ExpectStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        f.write_str(&parts.join(", "))
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            rise: 2,
            fall: 2,
            recovery_delay: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            max_ejection_percent: 50,
            path: "/heartbeat".into(),
            expect_status: ExpectStatus::default(),
            slow_start: Duration::ZERO,
            eject_after_5xx: 0,
            eject_failure_percent: 0,
            eject_window: Duration::from_secs(10),
            eject_min_requests: 20,
            eject_time: Duration::from_secs(30),
            protocol: HealthProtocol::Http,
            grpc_service: String::new(),
        }
    }
}

/// What a failed attempt may be retried on (`proxy.retry_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection to the replica could not be made: nothing was sent, any request may be
    /// retried.
    ConnectFailure,
    /// The connection broke before any response byte: idempotent requests whose body was not
    /// sent may be retried (a request that kills its replica is then tried on the next too).
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub retries: u32,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A response body its replica sends nothing of for this long is cut.
    #[serde(deserialize_with = "duration")]
    pub read_timeout: Duration,
    /// A client that takes no bytes of its response for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub send_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    #[serde(deserialize_with = "byte_size")]
    pub max_body: u64,
    pub retry_on: Vec<RetryOn>,
    /// Retries in progress may be at most this percent of the requests in progress …
    pub retry_budget_percent: u32,
    /// … or this many, whichever is more.
    pub retry_budget_min: u32,
    /// Client connections open at once; 0 derives it from the file-descriptor limit.
    pub max_connections: u32,
    /// Client connections open at once from one IP address; 0 is no per-address limit.
    pub max_connections_per_ip: u32,
    /// An HTTP/2 connection with no open stream for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 keep-alive: a ping this often; no answer within the same time closes it.
    #[serde(deserialize_with = "duration")]
    pub http2_keepalive: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_streams: u32,
    /// Proxied requests in flight at once (HTTP/2 streams included); 0 derives it from the
    /// file-descriptor limit.
    pub max_requests: u32,
    /// Proxied requests in flight at once from one IP address; 0 derives it (a quarter of
    /// `max_requests`).
    pub max_requests_per_ip: u32,
    /// Requests in flight at once to one replica; more wait up to `queue_timeout` for a
    /// place. 0 derives it (half of `max_requests`).
    pub max_requests_per_replica: u32,
    /// How long a request may wait for a place at its replica.
    #[serde(deserialize_with = "duration")]
    pub queue_timeout: Duration,
    /// The protocol spoken to the replicas.
    pub upstream_protocol: UpstreamProtocol,
}

/// `proxy.upstream_protocol`: what the gateway speaks to the replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 to every replica (gRPC calls are refused: they need HTTP/2).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge to every replica (ALPN `h2` with `upstream_tls`).
    H2c,
    /// The client's own: an HTTP/2 client's requests go over HTTP/2, HTTP/1 clients' over
    /// HTTP/1.1 (Envoy's `USE_DOWNSTREAM_PROTOCOL`).
    Match,
}

impl UpstreamProtocol {
    /// Whether a request that came over `version` goes to its replica over HTTP/2.
    pub fn uses_h2(self, version: http::Version) -> bool {
        match self {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::H2c => true,
            UpstreamProtocol::Match => version == http::Version::HTTP_2,
        }
    }
}

impl fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Match => "match",
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            retries: 2,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_body: 10 * 1024 * 1024,
            retry_on: vec![RetryOn::ConnectFailure],
            retry_budget_percent: 20,
            retry_budget_min: 3,
            max_connections: 0,
            max_connections_per_ip: 0,
            idle_timeout: Duration::from_secs(60),
            http2_keepalive: Duration::from_secs(20),
            http2_max_streams: 100,
            max_requests: 0,
            max_requests_per_ip: 0,
            max_requests_per_replica: 0,
            queue_timeout: Duration::from_secs(1),
            upstream_protocol: UpstreamProtocol::Http1,
        }
    }
}

impl ProxyConfig {
    pub fn retries_on(&self, what: RetryOn) -> bool {
        self.retry_on.contains(&what)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub dir: PathBuf,
    #[serde(deserialize_with = "byte_size")]
    pub memory_limit: u64,
    pub instruction_budget: u32,
    /// Wall-clock deadline of one per-request hook call (`vnode_hash` and `health` get
    /// [`crate::policy::OFF_PATH_FACTOR`] times this).
    #[serde(deserialize_with = "duration")]
    pub hook_timeout: Duration,
}

impl PolicyConfig {
    pub fn limits(&self) -> crate::policy::PolicyLimits {
        crate::policy::PolicyLimits {
            memory_limit: usize::try_from(self.memory_limit).unwrap_or(usize::MAX),
            instruction_budget: self.instruction_budget,
            hook_timeout: self.hook_timeout,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: PathBuf::from("policies"),
            memory_limit: 16 * 1024 * 1024,
            instruction_budget: 1_000_000,
            hook_timeout: Duration::from_millis(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    #[serde(deserialize_with = "ip_nets")]
    pub allow: Vec<IpNet>,
    pub token: Option<String>,
    /// Host names admin calls may name in `Host`, besides IP addresses and `localhost`.
    pub hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        let allow = ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        AdminConfig {
            allow,
            token: None,
            hosts: Vec::new(),
        }
    }
}

impl Config {
    /// The gateway's name: `name`, else `$RINGGATE_NAME`, else the host name, else
    /// `ringgate`. Only characters a `Via` header and a label carry safely are kept.
    pub fn gateway_name(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        gateway_name(
            &self.name,
            std::env::var("RINGGATE_NAME").ok().as_deref(),
            &host,
        )
    }
}

/// The first non-empty of `configured`, `env` and `host`, reduced to `[A-Za-z0-9._-]`.
pub fn gateway_name(configured: &str, env: Option<&str>, host: &str) -> String {
    let clean = |s: &str| -> String {
        s.trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(63)
            .collect()
    };
    [configured, env.unwrap_or(""), host]
        .into_iter()
        .map(clean)
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "ringgate".to_owned())
}

impl AdminConfig {
    /// Whether `ip` may call `/add` and `/rm`. IPv4 clients seen through an IPv6 socket
    /// (`::ffff:a.b.c.d`) are matched as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&ip))
    }

    /// The configured token, if any (an empty string means none).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }
}

/// Where access log records go (`log.access`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessTarget {
    /// No access log (the default).
    #[default]
    Off,
    /// The gateway's standard output.
    Stdout,
    /// A file, appended to, reopened on SIGHUP.
    File(PathBuf),
}

impl std::str::FromStr for AccessTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(AccessTarget::Off),
            "stdout" => Ok(AccessTarget::Stdout),
            "" => Err("log.access must be \"off\", \"stdout\" or a file path, not empty".into()),
            path => Ok(AccessTarget::File(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for AccessTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessTarget::Off => f.write_str("off"),
            AccessTarget::Stdout => f.write_str("stdout"),
            AccessTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The access log's line format (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// NGINX's and Apache's `combined` format, with ringgate's fields appended as `key=value`.
    Combined,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    #[serde(deserialize_with = "from_str")]
    pub access: AccessTarget,
    pub format: AccessFormat,
}

/// What the plain-HTTP listener on `listen` does while TLS is on (`tls.http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainHttp {
    /// HTTP and HTTPS side by side.
    Serve,
    /// Every request except the gateway's own `/lb/` endpoints gets a 308 to `https://`.
    Redirect,
    /// No plain listener: HTTPS only.
    Off,
}

/// The oldest TLS version accepted (`tls.min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// One certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    /// The chain: the server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// The private key; unset: it is in the `cert` file too (a combined PEM).
    pub key: Option<PathBuf>,
}

impl CertificatePair {
    /// The file the private key is read from.
    pub fn key_file(&self) -> &std::path::Path {
        self.key.as_deref().unwrap_or(&self.cert)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Terminate TLS on `tls.listen`. Changing it needs a restart.
    pub enabled: bool,
    /// Address of the HTTPS listener. Changing it needs a restart.
    pub listen: SocketAddr,
    /// The plain listener on `listen` while TLS is on.
    pub http: PlainHttp,
    pub min_version: TlsVersion,
    /// Chosen by SNI against each certificate's names; the first is the default.
    pub certificates: Vec<CertificatePair>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 5443)),
            http: PlainHttp::Serve,
            min_version: TlsVersion::Tls12,
            certificates: Vec::new(),
        }
    }
}

impl TlsConfig {
    /// Whether a plain-HTTP listener is bound on `listen`.
    pub fn serves_plain(&self) -> bool {
        !self.enabled || self.http != PlainHttp::Off
    }
}

/// The hostname rule of the replica API, which is Docker's container-name rule:
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}`.
pub fn is_valid_hostname(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["S5", "server-1", "a", "a.b_c-d", &"x".repeat(63)] {
            assert!(is_valid_hostname(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", ".a", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(!is_valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn the_gateway_name_comes_from_config_then_env_then_host() {
        assert_eq!(gateway_name("gw-1", Some("env"), "host"), "gw-1");
        assert_eq!(gateway_name("", Some("env-2"), "host"), "env-2");
        assert_eq!(gateway_name(" ", None, "web01\n"), "web01");
        assert_eq!(gateway_name("", Some(""), ""), "ringgate");
        assert_eq!(
            gateway_name("a b/c\"d", None, ""),
            "abcd",
            "only safe characters"
        );
    }

    #[test]
    fn mapped_ipv4_clients_match_ipv4_ranges() {
        let a = AdminConfig::default();
        assert!(a.allows("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(a.allows("127.0.0.2".parse().expect("ip")));
        assert!(
            !a.allows("192.168.1.9".parse().expect("ip")),
            "loopback only by default"
        );
        assert!(!a.allows("8.8.8.8".parse().expect("ip")));
        assert!(!a.allows("::ffff:8.8.8.8".parse().expect("ip")));
    }
}
