//! Configuration: `conf/lb.toml`.
//!
//! Owns: the shape of the config, its defaults, parsing (unknown keys and wrong types rejected
//! with file, line and key named) and validation (every problem reported at once, each naming its
//! key). A `Config` that exists is valid.
//! Must not touch: anything running. Applying a config is the controller's job; watching the
//! file is the watcher's.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use crate::hashing::{HashFunction, KeySource};

/// Largest ring we accept: the owner table is one entry per slot, kept small enough to stay in
/// cache.
pub const MAX_SLOTS: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gateway listens on. Changing it needs a restart.
    pub listen: SocketAddr,
    pub ring: RingConfig,
    pub hashing: HashingConfig,
    pub replicas: ReplicasConfig,
    pub provider: ProviderConfig,
    pub health: HealthConfig,
    pub proxy: ProxyConfig,
    pub policy: PolicyConfig,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            ring: RingConfig::default(),
            hashing: HashingConfig::default(),
            replicas: ReplicasConfig::default(),
            provider: ProviderConfig::default(),
            health: HealthConfig::default(),
            proxy: ProxyConfig::default(),
            policy: PolicyConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    pub slots: u32,
    pub vnodes: u32,
    pub request_hash: HashFunction,
    pub vnode_hash: HashFunction,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            slots: 512,
            vnodes: 9,
            request_hash: HashFunction::Quadratic,
            vnode_hash: HashFunction::Quadratic,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashingConfig {
    #[serde(deserialize_with = "from_str")]
    pub key: KeySource,
}

impl Default for HashingConfig {
    fn default() -> Self {
        HashingConfig {
            key: KeySource::Query("id".into()),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Auto,
    Process,
    Docker,
    Static,
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Auto => "auto",
            ProviderKind::Process => "process",
            ProviderKind::Docker => "docker",
            ProviderKind::Static => "static",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticServer {
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub image: String,
    pub network: String,
    pub container_port: u16,
    /// Process provider: the `ringgate-server` binary. Empty: the one beside `ringgate`.
    pub server_binary: Option<PathBuf>,
    /// Static provider: the fixed replicas.
    pub servers: Vec<StaticServer>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            kind: ProviderKind::Auto,
            image: "ringgate-server:latest".into(),
            network: "net1".into(),
            container_port: 5000,
            server_binary: None,
            servers: Vec::new(),
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
        }
    }
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
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    #[serde(deserialize_with = "byte_size")]
    pub max_body: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            retries: 2,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            max_body: 10 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub dir: PathBuf,
    #[serde(deserialize_with = "byte_size")]
    pub memory_limit: u64,
    pub instruction_budget: u32,
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
}

impl Default for AdminConfig {
    fn default() -> Self {
        let allow = [
            "127.0.0.0/8",
            "::1/128",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
        ]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
        AdminConfig { allow, token: None }
    }
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

/// One thing wrong with a config, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (check the path given to --config)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}, column {column}: {table}{message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        table: String,
        message: String,
    },
    #[error("{}: invalid configuration:\n{}", path.display(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let (line, column) = line_col(text, offset);
            let table = table_at(text, line)
                .map(|t| format!("in [{t}]: "))
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                table,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        let mut problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        for p in &mut problems {
            p.line = locate_key(text, &p.key);
        }
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Everything wrong with this config, all at once.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| {
            out.push(Problem {
                key: key.to_owned(),
                line: None,
                message,
            })
        };
        let r = &self.ring;
        if r.slots == 0 || r.slots > MAX_SLOTS {
            bad(
                "ring.slots",
                format!("must be between 1 and {MAX_SLOTS}, got {}", r.slots),
            );
        }
        if r.vnodes == 0 || r.vnodes > r.slots {
            bad(
                "ring.vnodes",
                format!(
                    "must be between 1 and ring.slots ({}), got {}",
                    r.slots, r.vnodes
                ),
            );
        }
        let capacity = r.slots.checked_div(r.vnodes).unwrap_or(0);
        let rep = &self.replicas;
        if rep.max_replicas == 0 {
            bad("replicas.max_replicas", "must be at least 1".into());
        } else if r.vnodes > 0 && rep.max_replicas > capacity {
            bad(
                "replicas.max_replicas",
                format!(
                    "{} exceeds what the ring holds: {capacity} servers (ring.slots / ring.vnodes = {} / {})",
                    rep.max_replicas, r.slots, r.vnodes
                ),
            );
        }
        if rep.count > rep.max_replicas {
            bad(
                "replicas.count",
                format!(
                    "{} is more than replicas.max_replicas ({})",
                    rep.count, rep.max_replicas
                ),
            );
        }
        if !is_valid_hostname(&format!("{}1", rep.name_prefix)) {
            bad(
                "replicas.name_prefix",
                format!(
                    "{:?} does not make valid replica names: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}}",
                    rep.name_prefix
                ),
            );
        }
        let p = &self.provider;
        if p.container_port == 0 {
            bad(
                "provider.container_port",
                "must be between 1 and 65535".into(),
            );
        }
        if p.image.is_empty() {
            bad(
                "provider.image",
                "must name an image, e.g. \"ringgate-server:latest\"".into(),
            );
        }
        if p.network.is_empty() {
            bad(
                "provider.network",
                "must name a Docker network, e.g. \"net1\"".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for s in &p.servers {
            if !is_valid_hostname(&s.name) {
                bad(
                    "provider.servers",
                    format!(
                        "name {:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}}",
                        s.name
                    ),
                );
            }
            if !seen.insert(s.name.as_str()) {
                bad(
                    "provider.servers",
                    format!("name {:?} appears more than once", s.name),
                );
            }
        }
        if p.servers.len() > rep.max_replicas as usize {
            bad(
                "provider.servers",
                format!(
                    "{} servers is more than replicas.max_replicas ({})",
                    p.servers.len(),
                    rep.max_replicas
                ),
            );
        }
        if !p.servers.is_empty() && p.kind != ProviderKind::Static {
            bad(
                "provider.servers",
                format!(
                    "only used with provider.kind = \"static\" (kind is \"{}\")",
                    p.kind
                ),
            );
        }
        let h = &self.health;
        for (key, d) in [
            ("health.interval", h.interval),
            ("health.timeout", h.timeout),
            ("proxy.connect_timeout", self.proxy.connect_timeout),
            ("proxy.request_timeout", self.proxy.request_timeout),
            ("proxy.header_read_timeout", self.proxy.header_read_timeout),
        ] {
            if d.is_zero() {
                bad(key, "must be more than 0".into());
            }
        }
        if h.rise == 0 {
            bad("health.rise", "must be at least 1".into());
        }
        if h.fall == 0 {
            bad("health.fall", "must be at least 1".into());
        }
        if h.max_backoff < h.recovery_delay {
            bad(
                "health.max_backoff",
                "must be at least health.recovery_delay".into(),
            );
        }
        if self.proxy.retries > 10 {
            bad(
                "proxy.retries",
                format!("must be at most 10, got {}", self.proxy.retries),
            );
        }
        if self.proxy.max_body == 0 {
            bad("proxy.max_body", "must be more than 0".into());
        }
        if self.policy.memory_limit < 256 * 1024 {
            bad("policy.memory_limit", "must be at least 256KiB".into());
        }
        if self.policy.instruction_budget < 1000 {
            bad("policy.instruction_budget", "must be at least 1000".into());
        }
        if self.policy.hook_timeout.is_zero() || self.policy.hook_timeout > Duration::from_secs(1) {
            bad(
                "policy.hook_timeout",
                "must be more than 0 and at most 1s".into(),
            );
        }
        out
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map(|n| before.len() - n)
        .unwrap_or(before.len() + 1);
    (line, column)
}

/// The `[table]` header in force at `line` (1-based), if any.
fn table_at(text: &str, line: usize) -> Option<String> {
    text.lines().take(line).filter_map(header_name).last()
}

fn header_name(l: &str) -> Option<String> {
    let t = l.trim();
    let inner = t.strip_prefix('[')?.split(']').next()?;
    Some(inner.trim_start_matches('[').trim().to_owned())
}

/// The line where `section.key` is set, for validation messages.
fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (n, l) in text.lines().enumerate() {
        if let Some(h) = header_name(l) {
            current = h;
            continue;
        }
        let t = l.trim_start();
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if current == section && k.trim() == key {
            return Some(n + 1);
        }
    }
    None
}

fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a duration as a string, like \"10s\", \"500ms\" or \"1m\"",
        )
    })?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}): write it like \"10s\", \"500ms\" or \"1m\""
        ))
    })
}

/// A size: an integer number of bytes, or a string with a unit (`"10MiB"`, `"512KiB"`, `"1GB"`).
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a size: bytes as an integer, or a string like \"10MiB\""))?
    {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {s:?}: write bytes as an integer or a string like \"512KiB\", \"10MiB\", \"1GB\""
            ))
        }),
    }
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn ip_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{s:?} is not an address or CIDR range (e.g. \"127.0.0.1\", \"10.0.0.0/8\")"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lb.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("should be rejected").to_string()
    }

    #[test]
    fn shipped_config_parses_and_sets_every_key() {
        let text = include_str!("../conf/lb.toml");
        let c = parse(text).expect("conf/lb.toml is valid");
        assert_eq!(c.ring.slots, 512);
        assert_eq!(c.ring.vnodes, 9);
        assert_eq!(c.hashing.key, KeySource::Query("id".into()));
        // The shipped file documents every key: each default-valued field appears in it.
        for key in [
            "listen",
            "slots",
            "vnodes",
            "request_hash",
            "vnode_hash",
            "key",
            "count",
            "max_replicas",
            "name_prefix",
            "kind",
            "image",
            "network",
            "container_port",
            "server_binary",
            "servers",
            "interval",
            "timeout",
            "rise",
            "fall",
            "recovery_delay",
            "max_backoff",
            "retries",
            "connect_timeout",
            "request_timeout",
            "header_read_timeout",
            "drain_timeout",
            "max_body",
            "dir",
            "memory_limit",
            "instruction_budget",
            "allow",
            "token",
        ] {
            assert!(
                text.lines().any(|l| l
                    .trim_start()
                    .trim_start_matches('#')
                    .trim_start()
                    .starts_with(&format!("{key} ="))),
                "conf/lb.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").expect("defaults"), Config::default());
    }

    #[test]
    fn every_key_parses() {
        let c = parse(
            r#"
listen = "127.0.0.1:6000"
[ring]
slots = 1024
vnodes = 4
request_hash = "mix64"
vnode_hash = "quadratic"
[hashing]
key = "header:x-user"
[replicas]
count = 2
max_replicas = 10
name_prefix = "web-"
[provider]
kind = "static"
image = "x:1"
network = "n2"
container_port = 8080
server_binary = "/bin/true"
servers = [{ name = "a", address = "127.0.0.1:9000" }]
[health]
interval = "1s"
timeout = "500ms"
rise = 3
fall = 4
recovery_delay = "3s"
max_backoff = "30s"
[proxy]
retries = 1
connect_timeout = "200ms"
request_timeout = "5s"
header_read_timeout = "2s"
drain_timeout = "1s"
max_body = "1MiB"
[policy]
dir = "/tmp/p"
memory_limit = "8MiB"
instruction_budget = 5000
[admin]
allow = ["10.0.0.0/8", "127.0.0.1"]
token = "s3cret"
"#,
        )
        .expect("valid");
        assert_eq!(c.listen, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(c.ring.request_hash, HashFunction::Mix64);
        assert_eq!(c.proxy.max_body, 1 << 20);
        assert_eq!(c.health.timeout, Duration::from_millis(500));
        assert_eq!(c.provider.servers[0].name, "a");
        assert_eq!(c.admin.token(), Some("s3cret"));
        assert!(c.admin.allows("127.0.0.1".parse().expect("ip")));
        assert!(!c.admin.allows("127.0.0.2".parse().expect("ip")));
        assert_eq!(c.policy.instruction_budget, 5000);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err("[ring]\nslots = 512\nslotz = 3\n");
        assert!(e.starts_with("lb.toml: line 3"), "{e}");
        assert!(e.contains("in [ring]"), "{e}");
        assert!(e.contains("slotz"), "{e}");
        let e = err("listen = \"0.0.0.0:5000\"\nbogus = 1\n");
        assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
        let e = err("[nope]\nx = 1\n");
        assert!(e.contains("line 1") && e.contains("nope"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err("[ring]\nslots = \"many\"\n");
        assert!(e.contains("line 2") && e.contains("[ring]"), "{e}");
        let e = err("[health]\ninterval = 10\n");
        assert!(e.contains("line 2") && e.contains("duration"), "{e}");
        let e = err("[health]\ninterval = \"ten\"\n");
        assert!(e.contains("\"ten\""), "{e}");
        let e = err("[hashing]\nkey = \"ip\"\n");
        assert!(e.contains("line 2") && e.contains("query:<name>"), "{e}");
        let e = err("listen = \"nowhere\"\n");
        assert!(e.contains("line 1"), "{e}");
        let e = err("[provider]\nkind = \"kubernetes\"\n");
        assert!(e.contains("line 2") && e.contains("kubernetes"), "{e}");
        let e = err("[admin]\nallow = [\"10.0.0.0/99\"]\n");
        assert!(e.contains("10.0.0.0/99"), "{e}");
        let e = err("[proxy]\nmax_body = \"10 parsecs\"\n");
        assert!(e.contains("10 parsecs"), "{e}");
        let e = err("[ring\nslots = 1\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn semantic_errors_name_key_and_line_and_come_together() {
        let e = err("[ring]\nslots = 0\nvnodes = 9\n");
        assert!(e.contains("line 2: ring.slots"), "{e}");
        assert!(e.contains("ring.vnodes"), "{e}");
        let e = err("[ring]\nslots = 8\nvnodes = 9\n");
        assert!(
            e.contains("line 3: ring.vnodes: must be between 1 and ring.slots (8)"),
            "{e}"
        );
        let e = err("[replicas]\nmax_replicas = 60\n");
        assert!(
            e.contains("replicas.max_replicas") && e.contains("56"),
            "{e}"
        );
        let e = err("[replicas]\ncount = 5\nmax_replicas = 4\n");
        assert!(e.contains("line 2: replicas.count"), "{e}");
        let e = err("[replicas]\nname_prefix = \"-bad\"\n");
        assert!(e.contains("replicas.name_prefix"), "{e}");
        let e = err("[health]\nrise = 0\nfall = 0\ninterval = \"0s\"\n");
        assert!(
            e.contains("health.rise") && e.contains("health.fall") && e.contains("health.interval"),
            "{e}"
        );
        let e = err("[proxy]\nmax_body = 0\nretries = 11\n");
        assert!(
            e.contains("proxy.max_body") && e.contains("proxy.retries"),
            "{e}"
        );
        let e = err("[provider]\nkind = \"static\"\nservers = [{name = \"a\", address = \"127.0.0.1:1\"}, {name = \"a\", address = \"127.0.0.1:2\"}]\n");
        assert!(e.contains("appears more than once"), "{e}");
        let e = err("[provider]\nkind = \"process\"\nservers = [{name = \"a\", address = \"127.0.0.1:1\"}]\n");
        assert!(e.contains("only used with provider.kind"), "{e}");
    }

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
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn mapped_ipv4_clients_match_ipv4_ranges() {
        let a = AdminConfig::default();
        assert!(a.allows("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(a.allows("192.168.1.9".parse().expect("ip")));
        assert!(!a.allows("8.8.8.8".parse().expect("ip")));
        assert!(!a.allows("::ffff:8.8.8.8".parse().expect("ip")));
    }
}
