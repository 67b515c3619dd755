//! Validation: everything wrong with a parsed [`Config`], all at once, each problem naming its
//! key (`ring.vnodes`), so `ringgate check` and a rejected live edit list every mistake in one go.
//!
//! Owns: the rules that relate keys to each other and the ranges TOML types cannot express.
//! Must not touch: text or files (the loader adds line numbers to the problems found here).

use std::fmt;
use std::time::Duration;

use super::{is_valid_hostname, Config, HealthProtocol, ProviderKind, MAX_SLOTS};

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

/// Docker refuses memory limits under 6 MiB.
const MIN_MEMORY_LIMIT: u64 = 6 * 1024 * 1024;
/// Docker's CPU quota granularity is a hundredth of a CPU.
const MIN_CPUS: f64 = 0.01;
/// Far above any host; the engine refuses more than the host has, naming its count.
const MAX_CPUS: f64 = 1024.0;
/// A log file smaller than this would rotate on every few lines.
const MIN_LOG_SIZE: u64 = 64 * 1024;
const MAX_LOG_FILES: u32 = 100;

impl Config {
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
        if p.memory_limit != 0 && p.memory_limit < MIN_MEMORY_LIMIT {
            bad(
                "provider.memory_limit",
                format!(
                    "must be 0 (no limit) or at least 6MiB, Docker's smallest limit; got {} bytes",
                    p.memory_limit
                ),
            );
        }
        if !(p.cpus == 0.0 || (MIN_CPUS..=MAX_CPUS).contains(&p.cpus)) {
            bad(
                "provider.cpus",
                format!(
                    "must be 0 (no limit) or between {MIN_CPUS} and {MAX_CPUS} CPUs (1.5 is one and a half), got {}",
                    p.cpus
                ),
            );
        }
        if p.log_max_size != 0 && p.log_max_size < MIN_LOG_SIZE {
            bad(
                "provider.log_max_size",
                format!(
                    "must be 0 (the engine's logging defaults) or at least 64KiB, got {} bytes",
                    p.log_max_size
                ),
            );
        }
        if p.log_max_size != 0 && !(1..=MAX_LOG_FILES).contains(&p.log_max_files) {
            bad(
                "provider.log_max_files",
                format!(
                    "must be between 1 and {MAX_LOG_FILES}, got {}",
                    p.log_max_files
                ),
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
        if p.upstream_tls && p.upstream_ca.is_none() {
            bad(
                "provider.upstream_ca",
                "provider.upstream_tls needs the CA that signed the replicas' certificates: upstream_ca = \"ca.pem\"".into(),
            );
        }
        if let Some(name) = &p.upstream_server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                bad(
                    "provider.upstream_server_name",
                    format!("{name:?} is not a DNS name or an IP address"),
                );
            }
        }
        if !p.upstream_tls && (p.upstream_ca.is_some() || p.upstream_server_name.is_some()) {
            bad(
                "provider.upstream_tls",
                "upstream_ca and upstream_server_name are only used with upstream_tls = true"
                    .into(),
            );
        }
        replica_spec_problems(self, &mut bad);
        let h = &self.health;
        for (key, d) in [
            ("health.interval", h.interval),
            ("health.timeout", h.timeout),
            ("proxy.connect_timeout", self.proxy.connect_timeout),
            ("proxy.request_timeout", self.proxy.request_timeout),
            ("proxy.header_read_timeout", self.proxy.header_read_timeout),
            ("proxy.send_timeout", self.proxy.send_timeout),
            ("proxy.read_timeout", self.proxy.read_timeout),
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
        if self.hashing.key.0.is_empty() {
            bad(
                "hashing.key",
                "an empty list names no source: give at least one, e.g. \"query:id\"".into(),
            );
        }
        let cookie = self.hashing.set_cookie.as_bytes();
        if !cookie.is_empty() && !crate::wire::syntax::is_token(cookie) {
            bad(
                "hashing.set_cookie",
                format!(
                    "a cookie name is a token (letters, digits, !#$%&'*+-.^_`|~), got {:?}",
                    self.hashing.set_cookie
                ),
            );
        }
        let t = &self.tunnels;
        for (key, d) in [
            ("tunnels.idle_timeout", t.idle_timeout),
            ("tunnels.rehome_window", t.rehome_window),
        ] {
            if d.is_zero() {
                bad(key, "must be more than 0".into());
            }
        }
        if t.rehome_per_second == 0 {
            bad("tunnels.rehome_per_second", "must be at least 1".into());
        }
        let px = &self.proxy;
        if px.retry_budget_percent > 100 {
            bad(
                "proxy.retry_budget_percent",
                format!("must be between 0 and 100, got {}", px.retry_budget_percent),
            );
        }
        if px.http2_max_streams == 0 {
            bad("proxy.http2_max_streams", "must be at least 1".into());
        }
        if self.health.protocol == HealthProtocol::Http && !self.health.grpc_service.is_empty() {
            bad(
                "health.grpc_service",
                "is only used by gRPC checks: set health.protocol = \"grpc\" too, or remove it"
                    .into(),
            );
        }
        if px.max_requests_per_ip > px.max_requests && px.max_requests != 0 {
            bad(
                "proxy.max_requests_per_ip",
                format!(
                    "must be at most proxy.max_requests ({}), got {}",
                    px.max_requests, px.max_requests_per_ip
                ),
            );
        }
        for (key, d) in [
            ("proxy.idle_timeout", px.idle_timeout),
            ("proxy.queue_timeout", px.queue_timeout),
            ("proxy.http2_keepalive", px.http2_keepalive),
        ] {
            if d.is_zero() {
                bad(key, "must be more than 0".into());
            }
        }
        let f = self.ring.balance_factor;
        if !(f == 0.0 || (1.0..=100.0).contains(&f)) {
            bad(
                "ring.balance_factor",
                format!("must be 0 (off) or between 1 and 100, got {f}: a factor under 1 would leave no server room"),
            );
        }
        if h.slow_start > Duration::from_secs(3600) {
            bad("health.slow_start", "must be at most 1h".into());
        }
        if h.eject_failure_percent > 100 {
            bad(
                "health.eject_failure_percent",
                format!("must be between 0 and 100, got {}", h.eject_failure_percent),
            );
        }
        for (key, d) in [
            ("health.eject_window", h.eject_window),
            ("health.eject_time", h.eject_time),
        ] {
            if d.is_zero() {
                bad(key, "must be more than 0".into());
            }
        }
        if !h.path.starts_with('/') || h.path.contains(char::is_whitespace) {
            bad(
                "health.path",
                format!(
                    "{:?} is not a request path: write it like \"/heartbeat\"",
                    h.path
                ),
            );
        }
        if h.expect_status.0.is_empty() {
            bad(
                "health.expect_status",
                "an empty list passes no check: give at least one status, e.g. 200".into(),
            );
        }
        if h.max_ejection_percent > 100 {
            bad(
                "health.max_ejection_percent",
                format!("must be between 0 and 100, got {}", h.max_ejection_percent),
            );
        }
        if let Some(host) = self.admin.hosts.iter().find(|h| {
            h.is_empty() || h.contains(|c: char| c == ':' || c == '/' || c.is_whitespace())
        }) {
            bad(
                "admin.hosts",
                format!("{host:?} is not a host name: list names like \"lb.example.com\", without port or scheme"),
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
        let tls = &self.tls;
        if tls.enabled && tls.certificates.is_empty() {
            bad(
                "tls.certificates",
                "tls.enabled needs at least one certificate: certificates = [{ cert = \"cert.pem\", key = \"key.pem\" }]".into(),
            );
        }
        if tls.enabled && tls.serves_plain() && tls.listen == self.listen && tls.listen.port() != 0
        {
            bad(
                "tls.listen",
                format!("{} is also `listen`: give HTTPS its own port (e.g. 5443), or set tls.http = \"off\"", tls.listen),
            );
        }
        if !tls.enabled && tls.http != super::PlainHttp::Serve {
            bad(
                "tls.http",
                "only used with tls.enabled = true (without TLS, `listen` serves plain HTTP)"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for pair in &tls.certificates {
            if pair.cert.as_os_str().is_empty()
                || pair.key.as_ref().is_some_and(|k| k.as_os_str().is_empty())
            {
                bad("tls.certificates", "cert and key must name files".into());
            }
            if !seen.insert(pair) {
                bad(
                    "tls.certificates",
                    format!("{} is listed more than once", pair.cert.display()),
                );
            }
        }
        let t = self.policy.hook_timeout;
        if t.is_zero() || t > Duration::from_secs(1) {
            bad(
                "policy.hook_timeout",
                format!("must be more than 0 and at most 1s, got {t:?}"),
            );
        }
        autoscale_problems(self, &mut bad);
        out
    }
}

/// Longest autoscale window or delay: beyond it the autoscaler would remember load too old to
/// mean anything.
const MAX_AUTOSCALE_WINDOW: Duration = Duration::from_secs(3600);

/// `[autoscale]`: its own keys checked whether or not it is enabled, so enabling it later cannot
/// surprise; how it fits the rest of the config (bounds, provider, replicas.count) once enabled.
fn autoscale_problems(c: &Config, bad: &mut impl FnMut(&str, String)) {
    let a = &c.autoscale;
    if a.min == 0 && a.idle_to_zero.is_zero() {
        bad(
            "autoscale.min",
            "0 needs autoscale.idle_to_zero: scale to zero happens after that long without a request".into(),
        );
    }
    if a.idle_to_zero > MAX_AUTOSCALE_WINDOW {
        bad("autoscale.idle_to_zero", "must be at most 1h".into());
    }
    if !a.idle_to_zero.is_zero() && a.idle_to_zero < Duration::from_secs(1) {
        bad(
            "autoscale.idle_to_zero",
            format!(
                "must be \"0s\" (off) or at least 1s (one decision a second), got {:?}",
                a.idle_to_zero
            ),
        );
    }
    if a.hold_max == 0 || a.hold_max > 100_000 {
        bad(
            "autoscale.hold_max",
            format!("must be at least 1 and at most 100000, got {}", a.hold_max),
        );
    }
    if a.hold_timeout.is_zero() || a.hold_timeout > Duration::from_secs(600) {
        bad(
            "autoscale.hold_timeout",
            format!(
                "must be more than 0 and at most 10m, got {:?}",
                a.hold_timeout
            ),
        );
    }
    if a.max < a.min {
        bad(
            "autoscale.max",
            format!("{} is less than autoscale.min ({})", a.max, a.min),
        );
    }
    let t = a.target_in_flight;
    if !(t.is_finite() && t > 0.0 && t <= 1e6) {
        bad(
            "autoscale.target_in_flight",
            format!("must be more than 0 and at most 1000000, got {t}"),
        );
    }
    if a.panic_window.is_zero() {
        bad("autoscale.panic_window", "must be more than 0".into());
    }
    if a.stable_window <= a.panic_window || a.stable_window > MAX_AUTOSCALE_WINDOW {
        bad(
            "autoscale.stable_window",
            format!(
                "must be longer than autoscale.panic_window ({:?}) and at most 1h, got {:?}",
                a.panic_window, a.stable_window
            ),
        );
    }
    if a.scale_down_delay > MAX_AUTOSCALE_WINDOW {
        bad("autoscale.scale_down_delay", "must be at most 1h".into());
    }
    if a.max_step == 0 {
        bad("autoscale.max_step", "must be at least 1".into());
    }
    // Relations to the rest of the config only while it is on: an unused default `max` must
    // not refuse a config whose replicas.max_replicas is smaller.
    if !a.enabled {
        return;
    }
    if a.max > c.replicas.max_replicas {
        bad(
            "autoscale.max",
            format!(
                "{} is more than replicas.max_replicas ({})",
                a.max, c.replicas.max_replicas
            ),
        );
    }
    if c.provider.kind == ProviderKind::Static {
        bad(
            "autoscale.enabled",
            "the static provider cannot start replicas: autoscaling needs process, docker or swarm"
                .into(),
        );
    }
    // Gateways sharing a swarm ring agree on N through the ring record (the largest live
    // proposal); scale to zero would need them to agree on holding requests as well.
    if c.provider.kind == ProviderKind::Swarm && a.min == 0 && !a.idle_to_zero.is_zero() {
        bad(
            "autoscale.idle_to_zero",
            "scale to zero is not available with the swarm provider yet: set min = 1 or idle_to_zero = \"0s\""
                .into(),
        );
    }
    let n = c.replicas.count;
    if n < a.min || n > a.max {
        bad(
            "replicas.count",
            format!(
                "{n} is outside [autoscale] min..max ({}..{}): it is the N the autoscaler starts from",
                a.min, a.max
            ),
        );
    }
}

/// Longest `provider.start_timeout`: a replica slower than this to pass its checks is broken.
const MAX_START_TIMEOUT: Duration = Duration::from_secs(3600);

/// The replica spec keys of `[provider]`: shapes TOML cannot say, and keys that mean nothing
/// for the chosen provider (so a `mounts` under `kind = "process"` is not silently ignored).
fn replica_spec_problems(c: &Config, bad: &mut impl FnMut(&str, String)) {
    let p = &c.provider;
    let placeholders = |key: &str, text: &str, bad: &mut dyn FnMut(&str, String)| {
        for token in super::replica::unknown_placeholders(text) {
            bad(
                key,
                format!(
                    "{text:?} names {token}, which is no placeholder: the placeholders are {{port}}, {{hostname}} and {{id}}"
                ),
            );
        }
    };
    if p.command.first().is_some_and(|c| c.trim().is_empty()) {
        bad(
            "provider.command",
            "the program (the first item) is empty: write it like [\"python3\", \"app.py\"]".into(),
        );
    }
    for (key, list) in [("provider.command", &p.command), ("provider.args", &p.args)] {
        for item in list {
            if item.contains('\0') {
                bad(key, format!("{item:?} contains a NUL byte"));
            }
            placeholders(key, item, &mut *bad);
        }
    }
    for (name, value) in &p.env {
        let key = format!("provider.env.{name}");
        let valid_name = !name.is_empty()
            && !name.contains(['=', '\0'])
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            bad(
                &key,
                format!("{name:?} is not an environment variable name (no '=', not empty, not starting with a digit)"),
            );
        }
        if matches!(name.as_str(), "PORT" | "SERVER_ID") {
            bad(
                &key,
                format!(
                    "{name} is set by the gateway (PORT: the replica's port, SERVER_ID: its hostname); use {{port}} or {{hostname}} in a variable of your own"
                ),
            );
        }
        if value.contains('\0') {
            bad(&key, "the value contains a NUL byte".into());
        }
        placeholders(&key, value, &mut *bad);
    }
    let mut targets = std::collections::HashSet::new();
    for m in &p.mounts {
        if !targets.insert(m.target.as_str()) {
            bad(
                "provider.mounts",
                format!("{} is mounted more than once", m.target),
            );
        }
    }
    for (name, value) in &p.labels {
        if name.is_empty() || name.starts_with("ringgate.") {
            bad(
                &format!("provider.labels.{name}"),
                format!("{name:?}: labels of your own may not be empty or start with \"ringgate.\" (the gateway's own labels: ringgate.managed, ringgate.server-id, …)"),
            );
        }
        if value.contains('\0') {
            bad(
                &format!("provider.labels.{name}"),
                "the value contains a NUL byte".into(),
            );
        }
    }
    if p.user
        .as_ref()
        .is_some_and(|u| u.is_empty() || u.contains(char::is_whitespace))
    {
        bad(
            "provider.user",
            "must name a user like \"1000:1000\" or \"nobody\" (no spaces), or be left out for the image's".into(),
        );
    }
    if p.start_timeout.is_zero() || p.start_timeout > MAX_START_TIMEOUT {
        bad(
            "provider.start_timeout",
            format!(
                "must be more than 0 and at most 1h, got {:?}",
                p.start_timeout
            ),
        );
    }
    if p.roll_batch == 0 || p.roll_batch > c.replicas.max_replicas {
        bad(
            "provider.roll_batch",
            format!(
                "must be between 1 and replicas.max_replicas ({}), got {}",
                c.replicas.max_replicas, p.roll_batch
            ),
        );
    }
    // Keys that mean nothing for the chosen provider. `auto` may pick either, so it takes all.
    let containers = matches!(p.kind, ProviderKind::Docker | ProviderKind::Swarm);
    let processes = p.kind == ProviderKind::Process;
    if p.kind == ProviderKind::Static {
        for (key, set) in [
            ("provider.command", !p.command.is_empty()),
            ("provider.args", !p.args.is_empty()),
            ("provider.env", !p.env.is_empty()),
            ("provider.workdir", p.workdir.is_some()),
            ("provider.mounts", !p.mounts.is_empty()),
            ("provider.labels", !p.labels.is_empty()),
            ("provider.user", p.user.is_some()),
        ] {
            if set {
                bad(
                    key,
                    "the static provider starts no replica (its servers run already): this key is only used with kind = \"process\", \"docker\" or \"swarm\"".into(),
                );
            }
        }
    }
    if p.port != super::PortMode::Auto && (containers || p.kind == ProviderKind::Static) {
        bad(
            "provider.port",
            format!(
                "only used by process replicas (kind is \"{}\"): containers listen on provider.container_port",
                p.kind
            ),
        );
    }
    if processes {
        for (key, set) in [
            ("provider.mounts", !p.mounts.is_empty()),
            ("provider.labels", !p.labels.is_empty()),
            ("provider.user", p.user.is_some()),
        ] {
            if set {
                bad(
                    key,
                    "only used by container replicas (kind = \"docker\" or \"swarm\"): a process replica runs as the gateway's user, in the host's file system".into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("lb.toml"))
            .expect_err("should be rejected")
            .to_string()
    }

    #[test]
    fn autoscale_is_checked_key_by_key_with_lines() {
        let e = err(
            "[autoscale]\nmin = 0\nmax = 60\ntarget_in_flight = 0\nmax_step = 0\nenabled = true\n",
        );
        assert!(
            e.contains("line 2: autoscale.min: 0 needs autoscale.idle_to_zero"),
            "{e}"
        );
        assert!(
            e.contains("line 3: autoscale.max: 60 is more than replicas.max_replicas (50)"),
            "{e}"
        );
        assert!(e.contains("line 4: autoscale.target_in_flight"), "{e}");
        assert!(e.contains("line 5: autoscale.max_step"), "{e}");
        let e = err("[autoscale]\nmin = 4\nmax = 3\npanic_window = \"60s\"\n");
        assert!(
            e.contains("autoscale.max: 3 is less than autoscale.min (4)"),
            "{e}"
        );
        assert!(
            e.contains("autoscale.stable_window: must be longer than autoscale.panic_window"),
            "{e}"
        );
        // Enabled: N starts within the bounds, and the provider must start replicas.
        let e = err("[replicas]\ncount = 3\n[autoscale]\nenabled = true\nmin = 4\n");
        assert!(
            e.contains("line 2: replicas.count: 3 is outside [autoscale] min..max (4..10)"),
            "{e}"
        );
        let e = err("[provider]\nkind = \"static\"\nservers = [{ name = \"a\", address = \"127.0.0.1:1\" }]\n[autoscale]\nenabled = true\n");
        assert!(
            e.contains("autoscale.enabled: the static provider cannot start replicas"),
            "{e}"
        );
        // Scale to zero: min = 0 with an idle window, and the hold's bounds.
        let e = err("[autoscale]\nidle_to_zero = \"500ms\"\nhold_max = 0\nhold_timeout = \"0s\"\n");
        assert!(e.contains("line 2: autoscale.idle_to_zero: must be"), "{e}");
        assert!(
            e.contains("line 3: autoscale.hold_max: must be at least 1"),
            "{e}"
        );
        assert!(
            e.contains("line 4: autoscale.hold_timeout: must be more than 0"),
            "{e}"
        );
        let zero = Config::parse(
            "[replicas]\ncount = 1\n[autoscale]\nenabled = true\nmin = 0\nidle_to_zero = \"2s\"\nhold_max = 2\n",
            Path::new("lb.toml"),
        )
        .expect("min = 0 with idle_to_zero is valid");
        assert_eq!(zero.autoscale.idle_to_zero, Duration::from_secs(2));
        assert_eq!(zero.autoscale.hold_max, 2);
        let ok = Config::parse(
            "[autoscale]\nenabled = true\nmax = 20\n",
            Path::new("lb.toml"),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
        // Swarm: the gateways sharing the ring agree on N, so autoscale is valid there (and
        // checked like anywhere else); scale to zero is not built for it.
        let swarm = "[provider]\nkind = \"swarm\"\nimage = \"ringgate-server:latest\"\n";
        let ok = Config::parse(
            &format!("{swarm}[autoscale]\nenabled = true\nmax = 6\n"),
            Path::new("lb.toml"),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
        let e = err(&format!("{swarm}[autoscale]\nenabled = true\nmax = 60\n"));
        assert!(e.contains("autoscale.max: 60 is more than"), "{e}");
        let e = err(&format!(
            "{swarm}[replicas]\ncount = 1\n[autoscale]\nenabled = true\nmin = 0\nidle_to_zero = \"2s\"\n"
        ));
        assert!(
            e.contains(
                "autoscale.idle_to_zero: scale to zero is not available with the swarm provider"
            ),
            "{e}"
        );
    }

    #[test]
    fn upstream_protocols_parse_and_grpc_service_needs_grpc_checks() {
        use crate::config::UpstreamProtocol;
        for (text, want) in [
            ("http1", UpstreamProtocol::Http1),
            ("h2c", UpstreamProtocol::H2c),
            ("match", UpstreamProtocol::Match),
        ] {
            let c = Config::parse(
                &format!("[proxy]\nupstream_protocol = \"{text}\"\n"),
                Path::new("lb.toml"),
            )
            .expect("valid");
            assert_eq!(c.proxy.upstream_protocol, want);
        }
        use http::Version;
        for v in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            assert!(!UpstreamProtocol::Http1.uses_h2(v));
            assert!(UpstreamProtocol::H2c.uses_h2(v));
            assert_eq!(UpstreamProtocol::Match.uses_h2(v), v == Version::HTTP_2);
        }
        let e = err("[proxy]\nupstream_protocol = \"h3\"\n");
        assert!(e.contains("upstream_protocol") || e.contains("h3"), "{e}");
        let e = err("[health]\ngrpc_service = \"x\"\n");
        assert!(e.contains("health.grpc_service"), "{e}");
        let c = Config::parse(
            "[health]\nprotocol = \"grpc\"\ngrpc_service = \"x\"\n",
            Path::new("lb.toml"),
        )
        .expect("valid");
        assert_eq!(c.health.protocol, HealthProtocol::Grpc);
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
        let e = err(
            "[proxy]\nretry_budget_percent = 101\nhttp2_max_streams = 0\nretry_on = [\"always\"]\n",
        );
        assert!(e.contains("retry_on") || e.contains("always"), "{e}");
        let e = err("[proxy]\nretry_budget_percent = 101\nhttp2_max_streams = 0\n");
        assert!(
            e.contains("proxy.retry_budget_percent") && e.contains("proxy.http2_max_streams"),
            "{e}"
        );
        for bad_factor in ["-1.0", "0.5", "101.0", "nan"] {
            let e = err(&format!("[ring]\nbalance_factor = {bad_factor}\n"));
            assert!(e.contains("ring.balance_factor"), "{bad_factor}: {e}");
        }
        assert!(Config::parse("[ring]\nbalance_factor = 1.25\n", Path::new("lb.toml")).is_ok());
        let e = err("[health]\neject_failure_percent = 101\neject_window = \"0s\"\n");
        assert!(
            e.contains("health.eject_failure_percent") && e.contains("health.eject_window"),
            "{e}"
        );
        let e = err("[health]\nexpect_status = \"399-200\"\n");
        assert!(
            e.contains("[health]") && e.contains("expect_status: range") && e.contains("backwards"),
            "{e}"
        );
        let e = err("[health]\nexpect_status = [200, \"2xx\"]\n");
        assert!(
            e.contains("expect_status") && e.contains("malformed"),
            "{e}"
        );
        let e = err("[health]\nexpect_status = 700\n");
        assert!(e.contains("not an HTTP status code"), "{e}");
        let e = err("[health]\nexpect_status = []\npath = \"heartbeat\"\n");
        assert!(
            e.contains("health.expect_status") && e.contains("health.path"),
            "{e}"
        );
        let ok = Config::parse(
            "[health]\nexpect_status = [204, \"200-299\", \"304\"]\npath = \"/healthz\"\n",
            Path::new("lb.toml"),
        )
        .expect("codes and ranges");
        assert!(ok.health.expect_status.matches(250) && ok.health.expect_status.matches(304));
        assert!(!ok.health.expect_status.matches(301));
        assert_eq!(ok.health.expect_status.to_string(), "204, 200-299, 304");
        let e = err("[hashing]\nkey = []\n");
        assert!(e.contains("hashing.key") && e.contains("empty list"), "{e}");
        let e = err("[hashing]\nkey = [\"header:x-user\", \"ip\"]\n");
        assert!(e.contains("invalid key source \"ip\""), "{e}");
        let ok = Config::parse(
            "[hashing]\nkey = [\"header:x-user\", \"cookie:session\", \"client_ip\"]\n",
            Path::new("lb.toml"),
        )
        .expect("a list of sources");
        assert_eq!(ok.hashing.key.0.len(), 3);
        let e = err("[health]\nmax_ejection_percent = 150\n[admin]\nhosts = [\"lb:5000\"]\n");
        assert!(
            e.contains("health.max_ejection_percent") && e.contains("admin.hosts"),
            "{e}"
        );
        let e = err("[provider]\nkind = \"process\"\nservers = [{name = \"a\", address = \"127.0.0.1:1\"}]\n");
        assert!(e.contains("only used with provider.kind"), "{e}");
    }

    #[test]
    fn the_replica_spec_is_checked_key_by_key_with_lines() {
        let e = err("[provider]\nkind = \"process\"\ncommand = [\"\", \"x\"]\nargs = [\"--port={prot}\"]\nenv = { PORT = \"1\", GOOD = \"{id}\", BAD = \"{hostnam}\" }\n");
        assert!(e.contains("line 3: provider.command: the program"), "{e}");
        assert!(
            e.contains("line 4: provider.args") && e.contains("{prot}"),
            "{e}"
        );
        assert!(
            e.contains("line 5: provider.env.PORT: PORT is set by the gateway"),
            "{e}"
        );
        assert!(
            e.contains("provider.env.BAD") && e.contains("{hostnam}"),
            "{e}"
        );
        assert!(!e.contains("provider.env.GOOD"), "{e}");
        let e = err("[provider]\nkind = \"process\"\nmounts = [\"/a:/b\"]\nuser = \"1000\"\n");
        assert!(
            e.contains("line 3: provider.mounts: only used by container"),
            "{e}"
        );
        assert!(e.contains("line 4: provider.user"), "{e}");
        let e = err("[provider]\nkind = \"docker\"\nport = \"pick\"\nlabels = { \"ringgate.managed\" = \"x\" }\nmounts = [\"/a:/b\", \"v:/b:rw\"]\nuser = \"a b\"\n");
        assert!(
            e.contains("line 3: provider.port: only used by process"),
            "{e}"
        );
        assert!(e.contains("provider.labels.ringgate.managed"), "{e}");
        assert!(e.contains("/b is mounted more than once"), "{e}");
        assert!(e.contains("line 6: provider.user"), "{e}");
        let e = err("[provider]\nmounts = [\"/a:b\"]\n");
        assert!(
            e.contains("line 2") && e.contains("absolute path inside the container"),
            "{e}"
        );
        let e = err("[provider]\nmounts = [\"/a:/b:rx\"]\n");
        assert!(e.contains("line 2") && e.contains(":rw"), "{e}");
        let e = err("[provider]\nstart_timeout = \"0s\"\nroll_batch = 0\n");
        assert!(e.contains("line 2: provider.start_timeout"), "{e}");
        assert!(e.contains("line 3: provider.roll_batch"), "{e}");
        let e = err("[provider]\nkind = \"static\"\ncommand = [\"x\"]\nenv = { A = \"1\" }\n");
        assert!(
            e.contains("line 3: provider.command: the static provider starts no replica"),
            "{e}"
        );
        assert!(e.contains("line 4: provider.env"), "{e}");
        let e = err("[provider]\nport = \"sometimes\"\n");
        assert!(e.contains("line 2") && e.contains("sometimes"), "{e}");

        let c = Config::parse(
            "[provider]\nkind = \"docker\"\ncommand = [\"/bin/busybox\", \"httpd\"]\nargs = [\"-p\", \"{port}\"]\nenv = { GREETING = \"hi {hostname}\", JSON = '{\"a\": 1}' }\nmounts = [\"./site:/www\", \"data:/d:rw\"]\nlabels = { team = \"web\" }\nuser = \"65534:65534\"\nread_only_root = false\nworkdir = \"app\"\nstart_timeout = \"5s\"\nroll_batch = 2\n",
            Path::new("/etc/rg/lb.toml"),
        )
        .expect("a whole spec");
        let p = &c.provider;
        assert_eq!(p.command, ["/bin/busybox", "httpd"]);
        assert_eq!(p.env["JSON"], r#"{"a": 1}"#);
        assert_eq!(
            p.mounts[0].source,
            crate::config::MountSource::Bind("/etc/rg/site".into()),
            "relative to the config file"
        );
        assert!(!p.mounts[0].writable && p.mounts[1].writable);
        assert_eq!(p.workdir.as_deref(), Some(Path::new("/etc/rg/app")));
        assert_eq!((p.roll_batch, p.read_only_root), (2, false));
        assert_eq!(p.start_timeout, Duration::from_secs(5));
    }

    #[test]
    fn tls_needs_a_certificate_and_a_port_of_its_own() {
        let e = err("[tls]\nenabled = true\n");
        assert!(
            e.contains("line 2: tls.certificates")
                || e.contains("tls.certificates: tls.enabled needs"),
            "{e}"
        );
        let e = err("listen = \"0.0.0.0:5443\"\n[tls]\nenabled = true\ncertificates = [{ cert = \"a.pem\" }, { cert = \"a.pem\" }]\n");
        assert!(e.contains("tls.listen") && e.contains("own port"), "{e}");
        assert!(e.contains("listed more than once"), "{e}");
        let e = err("[tls]\nhttp = \"redirect\"\n");
        assert!(
            e.contains("line 2: tls.http: only used with tls.enabled"),
            "{e}"
        );
        let e = err("[tls]\nmin_version = \"1.1\"\n");
        assert!(e.contains("line 2") && e.contains("1.1"), "{e}");
        let e = err("[tls]\ncertificates = [{ cert = \"a.pem\", chain = \"b.pem\" }]\n");
        assert!(e.contains("chain"), "{e}");
        let e = err("[provider]\nupstream_tls = true\nupstream_server_name = \"bad name\"\n");
        assert!(
            e.contains("provider.upstream_ca")
                && e.contains("line 3: provider.upstream_server_name"),
            "{e}"
        );
        let e = err("[provider]\nupstream_ca = \"ca.pem\"\n");
        assert!(e.contains("only used with upstream_tls = true"), "{e}");
        // HTTPS only may take `listen`'s port.
        let c = Config::parse(
            "listen = \"0.0.0.0:5443\"\n[tls]\nenabled = true\nhttp = \"off\"\ncertificates = [{ cert = \"a.pem\" }]\n",
            Path::new("lb.toml"),
        )
        .expect("valid");
        assert!(!c.tls.serves_plain());
        assert!(Config::default().tls.serves_plain());
    }

    #[test]
    fn container_limits_are_checked_and_zero_means_none() {
        let e = err("[provider]\nmemory_limit = \"1MiB\"\ncpus = 0.001\nlog_max_size = 100\n");
        assert!(
            e.contains("line 2: provider.memory_limit: must be 0 (no limit) or at least 6MiB"),
            "{e}"
        );
        assert!(e.contains("line 3: provider.cpus"), "{e}");
        assert!(e.contains("line 4: provider.log_max_size"), "{e}");
        let e = err("[provider]\ncpus = -1\n");
        assert!(e.contains("provider.cpus") && e.contains("got -1"), "{e}");
        let e = err("[provider]\ncpus = nan\n");
        assert!(e.contains("provider.cpus"), "{e}");
        let e = err("[provider]\nlog_max_files = 0\n");
        assert!(e.contains("line 2: provider.log_max_files"), "{e}");
        let e = err("[provider]\npids_limit = -1\n");
        assert!(e.contains("line 2") && e.contains("[provider]"), "{e}");

        let c = Config::parse(
            "[provider]\nmemory_limit = 0\npids_limit = 0\ncpus = 0\nlog_max_size = 0\nlog_max_files = 0\n",
            Path::new("lb.toml"),
        )
        .expect("0 turns each limit off");
        assert_eq!((c.provider.memory_limit, c.provider.cpus), (0, 0.0));
        let c = Config::parse("[provider]\ncpus = 2\n", Path::new("lb.toml"))
            .expect("a whole number of CPUs");
        assert_eq!(c.provider.cpus, 2.0);
        assert!(Config::default().problems().is_empty());
    }
}
