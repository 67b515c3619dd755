//! Offline tools: `ringgate check`, `ringgate ring` and `ringgate simulate`.
//!
//! Owns: building the ring a config would build, without starting anything, and reporting on it;
//! the simulation primitives (sample keys, route them, count and compare owners) that the
//! what-if endpoint ([`crate::whatif`]) shares.
//! Every key is routed through [`Router`] and members are named by the membership model, so
//! the reports show exactly what the gateway would do.
//! Must not touch: the network or any running gateway.

use std::fmt::Write;

use crate::config::{Config, ProviderKind};
use crate::control::membership::Membership;
use crate::policy::{Hook, HookOutcome, KeyRequest, PolicySet, ProbeView};
use crate::ring::{Placement, Ring, RingError, ServerId};
use crate::routing::Router;

/// The members a config starts with: the static servers, or `<prefix>1..=count` as the
/// controller names them.
pub fn initial_members(config: &Config) -> Vec<(ServerId, String)> {
    if config.provider.kind == ProviderKind::Static {
        crate::provider::static_list::members(&config.provider.servers)
            .map(|(id, s)| (id, s.name.clone()))
            .collect()
    } else {
        Membership::default()
            .plan_grow(config.replicas.count as usize, &config.replicas.name_prefix)
            .replicas
    }
}

/// The placement and owner table a config builds with all its members up.
pub fn build_ring(
    config: &Config,
    policy: &PolicySet,
    members: &[(ServerId, String)],
) -> Result<(Placement, Ring), RingError> {
    let ids: Vec<ServerId> = members.iter().map(|(id, _)| *id).collect();
    Router::new(config, policy).ring_of(&ids)
}

/// A one-paragraph summary for `ringgate check`.
pub fn summary(config: &Config) -> String {
    format!(
        "ring {} slots x {} vnodes (request_hash {}, vnode_hash {}), key {}, provider {}, {} replicas (max {}), listen {}",
        config.ring.slots,
        config.ring.vnodes,
        config.ring.request_hash,
        config.ring.vnode_hash,
        config.hashing.key,
        config.provider.kind,
        initial_members(config).len(),
        config.replicas.max_replicas,
        config.listen
    )
}

/// `ringgate ring`: each server's virtual-node slots and the share of the ring it owns.
pub fn ring_report(config: &Config, policy: &PolicySet) -> Result<String, RingError> {
    let members = initial_members(config);
    let (placement, ring) = build_ring(config, policy, &members)?;
    let slots = config.ring.slots;
    let mut owned = vec![0u32; members.len()];
    for s in 0..slots {
        if let Some(i) = ring
            .owner(s)
            .and_then(|o| members.iter().position(|(id, _)| *id == o))
        {
            owned[i] += 1;
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}", summary(config));
    let _ = writeln!(
        out,
        "{:<4} {:<16} {:>7} {:>8}  virtual-node slots",
        "id", "server", "slots", "share"
    );
    for (i, (id, name)) in members.iter().enumerate() {
        let pos: Vec<String> = placement
            .positions(*id)
            .iter()
            .map(u32::to_string)
            .collect();
        let _ = writeln!(
            out,
            "{:<4} {:<16} {:>7} {:>7.2}%  {}",
            id.get(),
            name,
            owned[i],
            100.0 * f64::from(owned[i]) / f64::from(slots),
            pos.join(" ")
        );
    }
    Ok(out)
}

/// What `ringgate simulate` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Requests per server, in member order.
    pub counts: Vec<(String, u64)>,
    /// Fraction of keys that change server when one server is added (ideal: 1/(N+1)).
    pub moved_on_add: f64,
    /// Fraction of keys that change server when the last server is removed (ideal: 1/N).
    pub moved_on_remove: Option<f64>,
}

/// `n` random 6-digit keys, the same for the same `seed`: what `simulate` and the what-if
/// endpoint replay (the specified analysis sends random 6-digit ids).
pub fn sample_keys(n: u64, seed: u64) -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u64(100_000..=999_999)).collect()
}

/// Routing a sample of keys took longer than allowed (a slow Lua hook).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routing the keys took longer than {limit:?} (stopped after {routed} of {total} keys): the policy's hooks are too slow to simulate")]
pub struct TooLong {
    pub limit: std::time::Duration,
    pub routed: usize,
    pub total: usize,
}

/// How often [`route_keys`] asks its caller whether to go on.
pub const CHECK_EVERY: usize = 64;

/// The owner of each of `keys` on `ring`, routed by `router` exactly as the request path
/// routes a request with that key. Every [`CHECK_EVERY`] keys `go_on(routed)` may stop it
/// with an error (a deadline, a failing hook).
pub fn route_keys<E>(
    router: &Router<'_>,
    ring: &Ring,
    keys: &[u64],
    mut go_on: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<Option<ServerId>>, E> {
    let mut owners = Vec::with_capacity(keys.len());
    for (n, &k) in keys.iter().enumerate() {
        if n % CHECK_EVERY == 0 && n > 0 {
            go_on(n)?;
        }
        owners.push(router.owner(ring, k));
    }
    go_on(keys.len())?;
    Ok(owners)
}

/// How many of `owners` each of `ids` owns, in the order of `ids`.
pub fn key_counts(owners: &[Option<ServerId>], ids: &[ServerId]) -> Vec<u64> {
    ids.iter()
        .map(|id| owners.iter().filter(|o| **o == Some(*id)).count() as u64)
        .collect()
}

fn owners_of(
    config: &Config,
    policy: &PolicySet,
    members: &[(ServerId, String)],
    keys: &[u64],
) -> Result<Vec<Option<ServerId>>, RingError> {
    let (_, ring) = build_ring(config, policy, members)?;
    let router = Router::new(config, policy);
    route_keys(&router, &ring, keys, |_| Ok(()))
}

/// The share of keys whose owner differs between `a` and `b` (the same keys in the same order).
pub fn moved_share(a: &[Option<ServerId>], b: &[Option<ServerId>]) -> f64 {
    let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
    if a.is_empty() {
        0.0
    } else {
        n as f64 / a.len() as f64
    }
}

/// Replays `keys` random 6-digit keys (deterministic for a seed) through the ring a config and a
/// policy build, and through the same ring with one server more and one less.
pub fn simulate(
    config: &Config,
    policy: &PolicySet,
    keys: u64,
    seed: u64,
) -> Result<Simulation, RingError> {
    let members = initial_members(config);
    let keys = sample_keys(keys, seed);
    let base = owners_of(config, policy, &members, &keys)?;
    let ids: Vec<ServerId> = members.iter().map(|(id, _)| *id).collect();
    let counts = members
        .iter()
        .map(|(_, name)| name.clone())
        .zip(key_counts(&base, &ids))
        .collect();
    let next = members.iter().map(|(id, _)| id.get()).max().unwrap_or(0) + 1;
    let mut more = members.clone();
    if let Some(id) = ServerId::new(next) {
        more.push((id, format!("{}{next}", config.replicas.name_prefix)));
    }
    let moved_on_add = match owners_of(config, policy, &more, &keys) {
        Ok(o) => moved_share(&base, &o),
        Err(_) => f64::NAN,
    };
    let moved_on_remove = (members.len() >= 2)
        .then(|| owners_of(config, policy, &members[..members.len() - 1], &keys))
        .transpose()?
        .map(|o| moved_share(&base, &o));
    Ok(Simulation {
        counts,
        moved_on_add,
        moved_on_remove,
    })
}

/// `ringgate simulate` as a table, with the spread and the key movement.
pub fn simulate_report(
    config: &Config,
    policy: &PolicySet,
    keys: u64,
    seed: u64,
) -> Result<String, RingError> {
    let sim = simulate(config, policy, keys, seed)?;
    let counts = &sim.counts;
    let mut out = String::new();
    let _ = writeln!(out, "{}", summary(config));
    if !policy.hooks().is_empty() {
        let _ = writeln!(out, "policy hooks: {}", policy.hooks().join(", "));
    }
    let _ = writeln!(out, "{keys} random 6-digit keys (seed {seed})");
    let _ = writeln!(out, "{:<16} {:>9} {:>8}", "server", "requests", "share");
    for (name, c) in counts {
        let share = if keys > 0 {
            100.0 * *c as f64 / keys as f64
        } else {
            0.0
        };
        let bar = "#".repeat((share / 2.0).round() as usize);
        let _ = writeln!(out, "{name:<16} {c:>9} {share:>7.2}%  {bar}");
    }
    if !counts.is_empty() {
        let n = counts.len() as f64;
        let mean = keys as f64 / n;
        let max = counts.iter().map(|(_, c)| *c).max().unwrap_or(0) as f64;
        let var = counts
            .iter()
            .map(|(_, c)| (*c as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let pct = |x: f64| if mean > 0.0 { 100.0 * x / mean } else { 0.0 };
        let _ = writeln!(
            out,
            "mean {mean:.1}, std dev {:.1} ({:.1}% of mean), max/mean {:.2}",
            var.sqrt(),
            pct(var.sqrt()),
            if mean > 0.0 { max / mean } else { 0.0 }
        );
        let _ = writeln!(
            out,
            "keys moved adding a server: {:.1}% (ideal {:.1}%)",
            100.0 * sim.moved_on_add,
            100.0 / (n + 1.0)
        );
        if let Some(r) = sim.moved_on_remove {
            let _ = writeln!(
                out,
                "keys moved removing a server: {:.1}% (ideal {:.1}%)",
                100.0 * r,
                100.0 / n
            );
        }
    }
    Ok(out)
}

/// A policy set from one file, for `simulate --policy FILE`.
pub fn load_policy_file(path: &std::path::Path, config: &Config) -> Result<PolicySet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    PolicySet::from_sources(vec![(name, text)], config.policy.limits(), 1)
        .map_err(|e| e.to_string())
}

/// `ringgate check`'s policy part: loads `policy.dir` and dry-runs every defined hook on sample
/// input. Returns a report, or every problem found.
/// `ringgate check` for `[tls]`: every certificate/key pair read and validated as the gateway
/// would (key matches, chain parses, valid now), one line per certificate; nothing when TLS is
/// off.
pub fn check_tls(config: &Config) -> Result<String, String> {
    if !config.tls.enabled {
        return Ok(String::new());
    }
    let provider = crate::tls::provider();
    let (set, _) =
        crate::tls::load_all(&config.tls.certificates, &provider).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let http = match config.tls.http {
        crate::config::PlainHttp::Serve => format!("also served on {}", config.listen),
        crate::config::PlainHttp::Redirect => format!("redirected from {}", config.listen),
        crate::config::PlainHttp::Off => "off".to_owned(),
    };
    let version = match config.tls.min_version {
        crate::config::TlsVersion::Tls12 => "1.2 and 1.3",
        crate::config::TlsVersion::Tls13 => "1.3",
    };
    let mut out = format!(
        "tls on {} (TLS {version}; plain HTTP {http}), {} certificate(s):\n",
        config.tls.listen,
        config.tls.certificates.len()
    );
    for (i, c) in set.infos().enumerate() {
        let _ = writeln!(
            out,
            "  {}{}: {} names {:?}, expires {} (in {} days)",
            c.cert_file,
            if i == 0 { " (default)" } else { "" },
            c.subject,
            c.dns_names,
            crate::tls::certs::rfc3339(c.not_after),
            (c.not_after - now) / 86_400
        );
    }
    Ok(out)
}

/// `ringgate check` for the replica spec: what can be known before a replica starts (the
/// program and `workdir` of process replicas, bind-mount sources, the image on the engine),
/// every problem with the line of `text` (the config file `path`) that sets its key. Returns a
/// line saying what replicas will run, or every problem.
pub fn check_replicas(
    path: &std::path::Path,
    text: &str,
    config: &Config,
) -> Result<String, String> {
    let mut problems = crate::provider::preflight::local_problems(config);
    let mut notes = String::new();
    let engine = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime to ask the Docker engine: {e}"))?
        .block_on(crate::provider::preflight::engine_problems(config));
    match engine {
        Ok(found) => problems.extend(found),
        Err(why) => {
            let _ = writeln!(
                notes,
                "replicas: the image {} was not looked up: {why}",
                config.provider.image
            );
        }
    }
    if !problems.is_empty() {
        Config::locate(text, &mut problems);
        return Err(crate::config::ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        }
        .to_string());
    }
    let p = &config.provider;
    let app = crate::provider::AppSpec::from_config(p);
    let what = match p.kind {
        ProviderKind::Static => format!("{} static server(s)", p.servers.len()),
        ProviderKind::Docker | ProviderKind::Swarm => format!(
            "image {}{}, port {}, {} mount(s)",
            p.image,
            if p.command.is_empty() {
                String::new()
            } else {
                format!(", command {:?}", p.command)
            },
            p.container_port,
            p.mounts.len()
        ),
        _ if p.command.is_empty() => "the built-in ringgate-server".to_owned(),
        _ => format!(
            "command {:?} (port: {})",
            p.command,
            app.process_port().name()
        ),
    };
    let _ = writeln!(
        notes,
        "replicas ({}): {what}, {} env variable(s); ready after health.rise = {} passing checks of {} within provider.start_timeout = {:?}",
        p.kind,
        p.env.len(),
        config.health.rise,
        config.health.path,
        p.start_timeout
    );
    Ok(notes)
}

pub fn check_policy(config: &Config) -> Result<String, String> {
    let policy = PolicySet::load_dir(&config.policy.dir, config.policy.limits(), 1)
        .map_err(|e| e.to_string())?;
    let mut out = format!(
        "policy {}: {} file(s) {:?}, hooks {:?}\n",
        config.policy.dir.display(),
        policy.files().len(),
        policy.files(),
        policy.hooks()
    );
    let slots = config.ring.slots;
    let headers: [(&str, &[u8]); 2] = [("host", b"localhost:5000"), ("cookie", b"session=abc123")];
    let req = KeyRequest {
        method: "GET",
        path: "/home",
        query: "id=123456",
        headers: &headers,
        client_ip: "127.0.0.1",
    };
    let probe = ProbeView {
        status: Some(200),
        latency_ms: 1.5,
        error: None,
    };
    let mut problems = Vec::new();
    let mut report = |hook: Hook, outcome: Result<String, String>| match outcome {
        Ok(v) => out.push_str(&format!("  {} on sample input -> {v}\n", hook.name())),
        Err(e) => problems.push(format!("{} fails on sample input: {e}", hook.name())),
    };
    fn show<T: std::fmt::Debug>(o: HookOutcome<T>) -> Option<Result<String, String>> {
        match o {
            HookOutcome::Absent => None,
            HookOutcome::Value(v) => Some(Ok(format!("{v:?}"))),
            HookOutcome::Failed(e) => Some(Err(e.to_string())),
        }
    }
    for (hook, outcome) in [
        (Hook::RequestKey, show(policy.request_key(&req))),
        (Hook::RequestHash, show(policy.request_hash(123_456, slots))),
        (Hook::VnodeHash, show(policy.vnode_hash(1, 0, slots))),
        (Hook::Health, show(policy.health("server-1", &probe))),
    ] {
        if policy.has_hook(hook) {
            report(
                hook,
                outcome.unwrap_or_else(|| Ok("nil (the built-in default)".into())),
            );
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_counts_every_key_once() {
        let c = Config::default();
        let p = PolicySet::empty();
        let sim = simulate(&c, &p, 10_000, 1).expect("ring");
        assert_eq!(sim.counts.len(), 3);
        assert_eq!(sim.counts.iter().map(|(_, n)| n).sum::<u64>(), 10_000);
        assert_eq!(
            sim,
            simulate(&c, &p, 10_000, 1).expect("ring"),
            "deterministic for a seed"
        );
        // Consistent hashing: adding a server moves only the keys it takes, far fewer than all.
        assert!(sim.moved_on_add > 0.0 && sim.moved_on_add < 0.6, "{sim:?}");
        assert!(
            sim.moved_on_remove.is_some_and(|r| r > 0.0 && r < 1.0),
            "{sim:?}"
        );
    }

    #[test]
    fn ring_report_lists_every_server() {
        let r = ring_report(&Config::default(), &PolicySet::empty()).expect("ring");
        for name in ["server-1", "server-2", "server-3"] {
            assert!(r.contains(name), "{r}");
        }
        assert!(
            r.contains("26 29 34 41 50 61 74 89 106"),
            "server 1's specified Φ positions: {r}"
        );
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn a_spreading_policy_changes_the_simulation() {
        let c = Config::default();
        let spread = load_policy_file(
            std::path::Path::new("policies/examples/spread_hash.lua"),
            &c,
        )
        .expect("example loads");
        let plain = simulate(&c, &PolicySet::empty(), 20_000, 3).expect("ring");
        let with = simulate(&c, &spread, 20_000, 3).expect("ring");
        assert_ne!(plain.counts, with.counts);
        let report = simulate_report(&c, &spread, 1000, 3).expect("report");
        assert!(report.contains("policy hooks: request_hash"), "{report}");
    }

    #[test]
    fn check_dry_runs_hooks_and_reports_failures() {
        let dir = tempfile::tempdir().expect("dir");
        let mut c = Config::default();
        c.policy.dir = dir.path().to_owned();
        std::fs::write(
            dir.path().join("a.lua"),
            "function request_hash(i, s) return 5 end",
        )
        .expect("write");
        let r = check_policy(&c).expect("good policy");
        assert!(r.contains("request_hash on sample input -> 5"), "{r}");
        std::fs::write(
            dir.path().join("b.lua"),
            "function health(s, p) error('nope') end",
        )
        .expect("write");
        let e = check_policy(&c).expect_err("failing hook");
        assert!(e.contains("health fails on sample input"), "{e}");
        std::fs::write(dir.path().join("c.lua"), "function (").expect("write");
        let e = check_policy(&c).expect_err("syntax error");
        assert!(e.contains("c.lua"), "{e}");
    }
}
