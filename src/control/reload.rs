//! Live reload: a config edit as a validated list of changes, and policy swaps.
//!
//! Owns: [`plan`] (pure: the old and the new config in, the config to run with and the list of
//! [`ConfigChange`]s out, with keys that need a restart kept at their running value; a replica
//! spec edit is a change that rolls the replicas, see `roll`), checking
//! the plan against what runs (a new `[ring]` must hold the members, a new TLS client to the
//! replicas must build from its CA file), logging each change once and applying them with one
//! `match`; the TLS client in force (`UpstreamClient`); and swapping in a new policy set.
//! Must not touch: files from the loop. The watcher reads and validates the config; the one
//! file an edit names that only the controller can check, `provider.upstream_ca`, is read by
//! `UpstreamTls::from_config` on a thread of its own and its result comes back as a message, so
//! the loop never waits on a file system.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::lifecycle::{probe_period, Internal};
use super::Controller;
use crate::config::{Config, ProviderConfig};
use crate::health::probe::Check;
use crate::policy::{Hook, PolicySet};
use crate::provider::AppSpec;
use crate::tls::upstream::UpstreamTls;

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
    ReplicaCount { from: u32, to: u32 },
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
    /// `tls.http` (serve or redirect) or `tls.certificates`: new connections use it (the
    /// watcher loads the new certificate files).
    Tls,
    /// The replica spec (`image`, `command`, `env`, `mounts`…, named in `keys`): the replicas
    /// are rolled in place to it.
    ReplicaSpec { keys: Vec<&'static str> },
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

/// How long the CA file of an edit may take to read before the edit is rejected (a file system
/// that stopped answering).
const CA_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The TLS client the replicas are reached with (`None`: plain TCP), and the config edits that
/// may replace it.
pub(super) struct UpstreamClient {
    /// In force: published in every snapshot and given to the prober.
    pub(super) tls: Option<Arc<UpstreamTls>>,
    /// Config edits received so far. An edit whose CA file is being read applies only if no
    /// later edit came meanwhile (the later one holds the whole file as it is now).
    edits: u64,
}

impl UpstreamClient {
    pub(super) fn new(tls: Option<Arc<UpstreamTls>>) -> UpstreamClient {
        UpstreamClient { tls, edits: 0 }
    }
}

impl Controller {
    pub(super) fn apply_config(&mut self, new: Config) {
        self.upstream.edits += 1;
        let plan = plan(&self.config, new);
        if !plan.changes.contains(&ConfigChange::UpstreamTls) {
            let tls = self.upstream.tls.clone();
            return self.apply_plan(plan, tls);
        }
        if !plan.config.provider.upstream_tls {
            return self.apply_plan(plan, None);
        }
        self.build_upstream_client(plan);
    }

    /// Builds the TLS client `plan` asks for on a thread of its own (reading its CA file may
    /// block on a file system; the loop must not), bounded by [`CA_READ_TIMEOUT`]; the plan
    /// applies when the client comes back ([`Controller::on_upstream_client`]), or is rejected
    /// whole.
    fn build_upstream_client(&mut self, plan: ReloadPlan) {
        let edit = self.upstream.edits;
        let provider = plan.config.provider.clone();
        let (built_tx, built) = tokio::sync::oneshot::channel();
        let reader = std::thread::Builder::new()
            .name("ringgate-upstream-ca".into())
            .spawn(move || {
                let _ = built_tx.send(UpstreamTls::from_config(&provider, crate::tls::provider()));
            });
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = match reader {
                Err(e) => Err(format!("no thread to read provider.upstream_ca: {e}")),
                Ok(_) => match tokio::time::timeout(CA_READ_TIMEOUT, built).await {
                    Ok(Ok(built)) => built.map(|t| t.map(Arc::new)).map_err(|e| e.to_string()),
                    Ok(Err(_)) => Err("reading provider.upstream_ca failed".into()),
                    Err(_) => Err(format!(
                        "provider.upstream_ca could not be read within {CA_READ_TIMEOUT:?}"
                    )),
                },
            };
            let _ = tx.send(Internal::UpstreamClientBuilt {
                edit,
                plan: Box::new(plan),
                result,
            });
        });
    }

    /// The TLS client of config edit `edit` was built, or not: its plan applies with it, or the
    /// edit is rejected, changing nothing. A later edit supersedes it either way.
    pub(super) fn on_upstream_client(
        &mut self,
        edit: u64,
        plan: ReloadPlan,
        result: Result<Option<Arc<UpstreamTls>>, String>,
    ) {
        if edit != self.upstream.edits {
            tracing::debug!("a TLS client for a superseded config edit was dropped");
            return;
        }
        match result {
            Ok(tls) => self.apply_plan(plan, tls),
            Err(error) => self.reject_config(error),
        }
    }

    /// A config edit that cannot apply: nothing changes, and `/lb/status` says why.
    fn reject_config(&mut self, error: String) {
        tracing::error!(error = %error, "config edit rejected; nothing changed");
        self.metrics
            .config_reload_errors
            .fetch_add(1, Ordering::Relaxed);
        self.errors.config = Some(error);
    }

    /// Applies `plan`, the replicas reached with `tls` from now on, unless what runs cannot take
    /// it (then nothing changes).
    fn apply_plan(&mut self, plan: ReloadPlan, tls: Option<Arc<UpstreamTls>>) {
        // Checked against what runs before anything changes: all or nothing.
        let mut placement = None;
        if plan.changes.contains(&ConfigChange::Placement) && self.record.is_some() {
            let error = "ring.slots, ring.vnodes and ring.vnode_hash are fixed by the shared ring \
                         record while gateways share it (provider swarm): every replica keeps the \
                         slots it was created with; change [ring] for a new ring only"
                .to_owned();
            return self.reject_config(error);
        }
        if plan.changes.contains(&ConfigChange::Placement) {
            match self.rebuild_placement(&plan.config) {
                Ok(p) => placement = Some(p),
                Err(e) => {
                    let error = format!(
                        "the new [ring] cannot hold the {} replicas that run: {e}",
                        self.membership.desired()
                    );
                    return self.reject_config(error);
                }
            }
        }
        self.upstream.tls = tls;
        self.config = Arc::new(plan.config);
        self.errors.config = None;
        self.errors.restart_needed.clear();
        self.metrics.config_reloads.fetch_add(1, Ordering::Relaxed);
        if plan.changes.is_empty() {
            tracing::info!("config reloaded: no change");
        }
        let mut scale_to = None;
        let mut roll = None;
        for change in plan.changes {
            match &change {
                ConfigChange::NeedsRestart(_) => tracing::warn!(change = %change, "config change"),
                _ => tracing::info!(change = %change, "config change"),
            }
            match change {
                ConfigChange::NeedsRestart(key) => self.errors.restart_needed.push(key),
                ConfigChange::Placement => {
                    if let Some(p) = placement.take() {
                        self.placement = p;
                    }
                }
                ConfigChange::Health => self.reset_probe_periods(),
                ConfigChange::UpstreamTls => self.prober.use_tls(self.upstream.tls.clone()),
                ConfigChange::ReplicaCount { to, .. } => scale_to = Some(to),
                ConfigChange::ReplicaSpec { keys } => {
                    self.app = Arc::new(AppSpec::from_config(&self.config.provider));
                    self.spec_generation += 1;
                    roll = Some(format!("{} changed", keys.join(", ")));
                }
                // Read from the snapshot's config by the data plane, the watcher and `/add`.
                ConfigChange::Routing
                | ConfigChange::ReplicaRules
                | ConfigChange::Proxy
                | ConfigChange::PolicyLimits
                | ConfigChange::Admin
                | ConfigChange::Log
                | ConfigChange::Tls
                | ConfigChange::ProviderTiming => {}
            }
        }
        self.publish();
        // Scaling first: a replica it starts runs the new spec already.
        if let Some(n) = scale_to {
            self.scale_to(n);
        }
        if let Some(reason) = roll {
            self.begin_roll(reason);
        }
    }

    fn reset_probe_periods(&self) {
        let (interval, timeout) = (self.config.health.interval, self.config.health.timeout);
        let check = Arc::new(Check::of(&self.config.health));
        for r in self.replicas.values() {
            if let Some(p) = &r.probe {
                p.set_period(probe_period(r.tracker.state, interval), timeout);
                p.set_check(check.clone());
            }
        }
    }

    pub(super) fn apply_policy(&mut self, policy: PolicySet) {
        let vnodes_involved =
            policy.has_hook(Hook::VnodeHash) || self.policy.has_hook(Hook::VnodeHash);
        let policy = policy.with_stats(self.policy.stats().clone());
        tracing::info!(generation = policy.generation(), files = ?policy.files(), hooks = ?policy.hooks(), "policy loaded");
        self.policy = Arc::new(policy);
        self.errors.policy = None;
        self.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
        if vnodes_involved && self.record.is_some() {
            tracing::warn!("vnode_hash changed: with a shared ring record the recorded slots stand; it applies to replicas added from now on");
        } else if vnodes_involved {
            match self.rebuild_placement(&self.config) {
                Ok(p) => self.placement = p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild the ring with the new vnode_hash")
                }
            }
        }
        self.publish();
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
