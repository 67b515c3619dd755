//! Live reload, the decision: a config edit as a validated list of changes.
//!
//! Owns: [`plan`] (pure: the old and the new config in, the config to run with and the list of
//! [`ConfigChange`]s out, with keys that need a restart kept at their running value; a replica
//! spec edit is a change that rolls the replicas, see `roll`; the keys of the TLS client to the
//! replicas apply live). Must not touch: what runs (`reconfigure` applies a plan).

use std::fmt;

use crate::config::{Config, ProviderConfig};
use crate::provider::AppSpec;

/// One thing a config edit changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    /// A key that needs a restart: the running value stays.
    NeedsRestart(&'static str),
    /// `ring.slots`, `ring.vnodes` or `ring.vnode_hash`: every member is placed again.
    Placement,
    /// `ring.request_hash`, `ring.balance_factor` or `[hashing]`: new requests route with it.
    Routing,
    /// `replicas.count`: scale to it.
    ReplicaCount {
        from: u32,
        to: u32,
    },
    /// `replicas.max_replicas` or `replicas.name_prefix`: new limits for `/add`.
    ReplicaRules,
    /// `[health]`: checks use the new interval and timeout.
    Health,
    /// `[proxy]`: new requests use it.
    Proxy,
    /// `policy.*` limits: the watcher reloads the policy set with them.
    PolicyLimits,
    /// `[admin]`: the guard uses it from the next call.
    Admin,
    /// `[log]`: requests are logged with it from the next one.
    Log,
    Tunnels,
    /// `[autoscale]`: the next decision (at most a tick away) is made with it.
    Autoscale,
    /// `tls.http` (serve or redirect) or `tls.certificates`: new connections use it (the
    /// watcher loads the new certificate files).
    Tls,
    /// The replica spec (`image`, `command`, `env`, `mounts`…, named in `keys`): the replicas
    /// are rolled in place to it.
    ReplicaSpec {
        keys: Vec<&'static str>,
    },
    /// `provider.start_timeout` or `provider.roll_batch`: the next start or roll step uses it.
    ProviderTiming,
    /// `provider.upstream_tls`, `upstream_ca` or `upstream_server_name`: new connections to the
    /// replicas (requests and checks) are made with the new TLS client, built before the edit
    /// applies; pooled connections of the old one are not reused.
    UpstreamTls,
}

impl fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigChange::NeedsRestart(key) => write!(f, "{key} changed: needs a restart"),
            ConfigChange::Placement => f.write_str("ring placement (slots, vnodes or vnode_hash)"),
            ConfigChange::Routing => {
                f.write_str("request routing (ring.request_hash, ring.balance_factor or hashing)")
            }
            ConfigChange::ReplicaCount { from, to } => write!(f, "replicas.count {from} -> {to}"),
            ConfigChange::ReplicaRules => f.write_str("replica limits (max_replicas, name_prefix)"),
            ConfigChange::Health => f.write_str("[health]"),
            ConfigChange::Proxy => f.write_str("[proxy]"),
            ConfigChange::PolicyLimits => f.write_str("policy limits"),
            ConfigChange::Admin => f.write_str("[admin]"),
            ConfigChange::Log => f.write_str("[log]"),
            ConfigChange::Tunnels => f.write_str("[tunnels]"),
            ConfigChange::Autoscale => f.write_str("[autoscale]"),
            ConfigChange::Tls => f.write_str("[tls] (http or certificates)"),
            ConfigChange::ReplicaSpec { keys } => {
                write!(
                    f,
                    "the replica spec ({}): rolling the replicas",
                    keys.join(", ")
                )
            }
            ConfigChange::ProviderTiming => {
                f.write_str("provider.start_timeout or provider.roll_batch")
            }
            ConfigChange::UpstreamTls => f.write_str(
                "TLS to the replicas (provider.upstream_tls, upstream_ca or upstream_server_name)",
            ),
        }
    }
}

/// What a config edit does.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadPlan {
    /// The config to run with: the new one, with the restart-only keys at their old value.
    pub config: Config,
    pub changes: Vec<ConfigChange>,
}

/// The changes from `old` to `new`, in the order they are applied.
pub fn plan(old: &Config, mut new: Config) -> ReloadPlan {
    let mut changes = Vec::new();
    if new.listen != old.listen {
        changes.push(ConfigChange::NeedsRestart("listen"));
        new.listen = old.listen;
    }
    if new.name != old.name {
        changes.push(ConfigChange::NeedsRestart("name"));
        new.name = old.name.clone();
    }
    // The replica spec and the timing keys apply live; the rest of [provider] (which provider,
    // its network and port, how replicas are reached) needs a restart.
    let kept = with_live_keys_of(&old.provider, &new.provider);
    if kept != new.provider {
        changes.push(ConfigChange::NeedsRestart("provider"));
        new.provider = kept;
    }
    let (old_app, new_app) = (
        AppSpec::from_config(&old.provider),
        AppSpec::from_config(&new.provider),
    );
    let keys = old_app.changed_keys(&new_app);
    if !keys.is_empty() {
        changes.push(ConfigChange::ReplicaSpec { keys });
    }
    if (new.provider.start_timeout, new.provider.roll_batch)
        != (old.provider.start_timeout, old.provider.roll_batch)
    {
        changes.push(ConfigChange::ProviderTiming);
    }
    if upstream_tls_keys(&new.provider) != upstream_tls_keys(&old.provider) {
        changes.push(ConfigChange::UpstreamTls);
    }
    if new.policy.dir != old.policy.dir {
        changes.push(ConfigChange::NeedsRestart("policy.dir"));
        new.policy.dir = old.policy.dir.clone();
    }
    if new.tls.enabled != old.tls.enabled {
        changes.push(ConfigChange::NeedsRestart("tls.enabled"));
        new.tls.enabled = old.tls.enabled;
    }
    if new.tls.listen != old.tls.listen {
        changes.push(ConfigChange::NeedsRestart("tls.listen"));
        new.tls.listen = old.tls.listen;
    }
    if new.tls.min_version != old.tls.min_version {
        changes.push(ConfigChange::NeedsRestart("tls.min_version"));
        new.tls.min_version = old.tls.min_version;
    }
    // Whether a plain listener exists is decided at start; serve <-> redirect is live.
    let off = crate::config::PlainHttp::Off;
    if new.tls.http != old.tls.http && (new.tls.http == off || old.tls.http == off) {
        changes.push(ConfigChange::NeedsRestart("tls.http"));
        new.tls.http = old.tls.http;
    }
    if new.tls != old.tls {
        changes.push(ConfigChange::Tls);
    }
    let (o, n) = (&old.ring, &new.ring);
    if n.slots != o.slots || n.vnodes != o.vnodes || n.vnode_hash != o.vnode_hash {
        changes.push(ConfigChange::Placement);
    }
    if n.request_hash != o.request_hash
        || n.balance_factor != o.balance_factor
        || new.hashing != old.hashing
    {
        changes.push(ConfigChange::Routing);
    }
    let (o, n) = (&old.replicas, &new.replicas);
    if n.max_replicas != o.max_replicas || n.name_prefix != o.name_prefix {
        changes.push(ConfigChange::ReplicaRules);
    }
    if new.health != old.health {
        changes.push(ConfigChange::Health);
    }
    if new.proxy != old.proxy {
        changes.push(ConfigChange::Proxy);
    }
    if new.policy != old.policy {
        changes.push(ConfigChange::PolicyLimits);
    }
    if new.admin != old.admin {
        changes.push(ConfigChange::Admin);
    }
    if new.log != old.log {
        changes.push(ConfigChange::Log);
    }
    if new.tunnels != old.tunnels {
        changes.push(ConfigChange::Tunnels);
    }
    if new.autoscale != old.autoscale {
        changes.push(ConfigChange::Autoscale);
    }
    // Last: scaling runs after the rest is in place.
    if n.count != o.count {
        changes.push(ConfigChange::ReplicaCount {
            from: o.count,
            to: n.count,
        });
    }
    ReloadPlan {
        config: new,
        changes,
    }
}

/// The keys the TLS client to the replicas is built from.
fn upstream_tls_keys(p: &ProviderConfig) -> (bool, Option<&std::path::Path>, Option<&str>) {
    (
        p.upstream_tls,
        p.upstream_ca.as_deref(),
        p.upstream_server_name.as_deref(),
    )
}

/// `base` with the keys of `from` that apply live: the replica spec (what replicas run),
/// `start_timeout` and `roll_batch`, and how replicas are spoken to over TLS.
fn with_live_keys_of(base: &ProviderConfig, from: &ProviderConfig) -> ProviderConfig {
    ProviderConfig {
        image: from.image.clone(),
        command: from.command.clone(),
        args: from.args.clone(),
        env: from.env.clone(),
        workdir: from.workdir.clone(),
        port: from.port,
        server_binary: from.server_binary.clone(),
        mounts: from.mounts.clone(),
        labels: from.labels.clone(),
        user: from.user.clone(),
        read_only_root: from.read_only_root,
        memory_limit: from.memory_limit,
        pids_limit: from.pids_limit,
        cpus: from.cpus,
        log_max_size: from.log_max_size,
        log_max_files: from.log_max_files,
        start_timeout: from.start_timeout,
        roll_batch: from.roll_batch,
        upstream_tls: from.upstream_tls,
        upstream_ca: from.upstream_ca.clone(),
        upstream_server_name: from.upstream_server_name.clone(),
        ..base.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::HashFunction;

    #[test]
    fn no_edit_no_change() {
        let c = Config::default();
        assert!(plan(&c, c.clone()).changes.is_empty());
    }

    #[test]
    fn restart_keys_keep_their_running_value() {
        let old = Config::default();
        let mut new = old.clone();
        new.listen = "127.0.0.1:9".parse().expect("addr");
        new.provider.network = "other-net".into();
        new.policy.dir = "elsewhere".into();
        new.proxy.retries = 5;
        let p = plan(&old, new);
        assert_eq!(
            p.changes,
            vec![
                ConfigChange::NeedsRestart("listen"),
                ConfigChange::NeedsRestart("provider"),
                ConfigChange::NeedsRestart("policy.dir"),
                ConfigChange::Proxy,
            ]
        );
        assert_eq!(p.config.listen, old.listen);
        assert_eq!(p.config.provider, old.provider);
        assert_eq!(p.config.policy.dir, old.policy.dir);
        assert_eq!(p.config.proxy.retries, 5, "the rest applies");
    }

    #[test]
    fn a_spec_edit_rolls_and_the_rest_of_provider_still_needs_a_restart() {
        let old = Config::default();
        let mut new = old.clone();
        new.provider.image = "app:2".into();
        new.provider.env.insert("LOG_LEVEL".into(), "debug".into());
        new.provider.roll_batch = 2;
        let p = plan(&old, new.clone());
        assert_eq!(
            p.changes,
            vec![
                ConfigChange::ReplicaSpec {
                    keys: vec!["provider.image", "provider.env"]
                },
                ConfigChange::ProviderTiming,
            ]
        );
        assert_eq!(p.config.provider, new.provider, "applied whole");

        let mut both = new.clone();
        both.provider.container_port = 8080;
        both.provider.kind = crate::config::ProviderKind::Docker;
        let p = plan(&old, both);
        assert_eq!(p.changes[0], ConfigChange::NeedsRestart("provider"));
        assert!(matches!(p.changes[1], ConfigChange::ReplicaSpec { .. }));
        assert_eq!(
            p.config.provider.container_port, 5000,
            "kept until a restart"
        );
        assert_eq!(p.config.provider.kind, old.provider.kind);
        assert_eq!(p.config.provider.image, "app:2", "the spec rolls anyway");
        assert_eq!(
            ConfigChange::ReplicaSpec {
                keys: vec!["provider.env"]
            }
            .to_string(),
            "the replica spec (provider.env): rolling the replicas"
        );
    }

    #[test]
    fn the_tls_client_keys_apply_live_and_the_rest_of_provider_still_needs_a_restart() {
        let mut old = Config::default();
        old.provider.upstream_tls = true;
        old.provider.upstream_ca = Some("a.pem".into());
        let mut new = old.clone();
        new.provider.upstream_ca = Some("b.pem".into());
        new.provider.upstream_server_name = Some("replicas.internal".into());
        let p = plan(&old, new.clone());
        assert_eq!(p.changes, vec![ConfigChange::UpstreamTls]);
        assert_eq!(p.config.provider, new.provider, "applied whole");

        let mut plain = new.clone();
        plain.provider.upstream_tls = false;
        plain.provider.upstream_ca = None;
        plain.provider.upstream_server_name = None;
        plain.provider.network = "other-net".into();
        let p = plan(&new, plain);
        assert_eq!(
            p.changes,
            vec![
                ConfigChange::NeedsRestart("provider"),
                ConfigChange::UpstreamTls
            ]
        );
        assert!(!p.config.provider.upstream_tls && p.config.provider.upstream_ca.is_none());
        assert_eq!(p.config.provider.network, new.provider.network, "kept");
    }

    #[test]
    fn each_section_maps_to_its_change_and_scaling_comes_last() {
        let old = Config::default();
        let mut new = old.clone();
        new.replicas.count = 5;
        new.ring.vnode_hash = HashFunction::Mix64;
        new.ring.request_hash = HashFunction::Mix64;
        new.health.rise = 4;
        new.admin.token = Some("t".into());
        new.replicas.max_replicas = 20;
        new.policy.instruction_budget = 10;
        let p = plan(&old, new);
        assert_eq!(
            p.changes,
            vec![
                ConfigChange::Placement,
                ConfigChange::Routing,
                ConfigChange::ReplicaRules,
                ConfigChange::Health,
                ConfigChange::PolicyLimits,
                ConfigChange::Admin,
                ConfigChange::ReplicaCount { from: 3, to: 5 },
            ]
        );
        assert_eq!(
            ConfigChange::ReplicaCount { from: 3, to: 5 }.to_string(),
            "replicas.count 3 -> 5"
        );
    }

    #[test]
    fn tls_listeners_need_a_restart_and_the_rest_applies() {
        let old = Config::default();
        let mut new = old.clone();
        new.tls.enabled = true;
        new.tls.listen = "127.0.0.1:8443".parse().expect("addr");
        new.tls.http = crate::config::PlainHttp::Off;
        let p = plan(&old, new);
        assert_eq!(
            p.changes,
            vec![
                ConfigChange::NeedsRestart("tls.enabled"),
                ConfigChange::NeedsRestart("tls.listen"),
                ConfigChange::NeedsRestart("tls.http"),
            ]
        );
        assert_eq!(p.config.tls, old.tls);

        let mut new = old.clone();
        new.tls.http = crate::config::PlainHttp::Redirect;
        new.tls.certificates = vec![crate::config::CertificatePair {
            cert: "a.pem".into(),
            key: None,
        }];
        let p = plan(&old, new.clone());
        assert_eq!(p.changes, vec![ConfigChange::Tls]);
        assert_eq!(p.config.tls, new.tls);
    }

    #[test]
    fn a_key_source_edit_is_a_routing_change() {
        let old = Config::default();
        let mut new = old.clone();
        new.hashing.key = crate::hashing::KeySources::one("header:x-user".parse().expect("source"));
        assert_eq!(plan(&old, new).changes, vec![ConfigChange::Routing]);
    }
}
