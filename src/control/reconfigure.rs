//! Live reload, the effects: a [`ReloadPlan`] checked against what runs and applied, and policy
//! swaps.
//!
//! Owns: checking a plan against what runs (a new `[ring]` must hold the members, a new TLS
//! client to the replicas must build from its CA file), logging each change once and applying
//! them with one `match`; the TLS client in force (`UpstreamClient`); and swapping in a new
//! policy set. Must not touch: files from the loop. The watcher reads and validates the config;
//! the one file an edit names that only the controller can check, `provider.upstream_ca`, is
//! read by `UpstreamTls::from_config` on a thread of its own and its result comes back as a
//! message ([`Internal::UpstreamClientBuilt`]), so the loop never waits on a file system.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::handle::Internal;
use super::reload::{plan, ConfigChange, ReloadPlan};
use super::Controller;
use crate::config::Config;
use crate::health::probe::Check;
use crate::health::probe_period;
use crate::policy::{Hook, PolicySet};
use crate::provider::AppSpec;
use crate::tls::upstream::UpstreamTls;

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
        if plan.changes.contains(&ConfigChange::Placement) && self.authority.is_shared() {
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
        let mut autoscale_edited = false;
        let was_zeroed = self.zeroed;
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
                ConfigChange::Autoscale => autoscale_edited = true,
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
                | ConfigChange::Tunnels
                | ConfigChange::Tls
                | ConfigChange::ProviderTiming => {}
            }
        }
        self.publish();
        // Scaling first: a replica it starts runs the new spec already.
        if let Some(n) = scale_to {
            self.scale_to(n);
        }
        // `[autoscale]` turned off while it had scaled to zero: N is replicas.count again. No
        // request is held from now on: until those replicas serve, the usual 503.
        if autoscale_edited && scale_to.is_none() && was_zeroed && !self.config.autoscale.enabled {
            self.scale_to(self.config.replicas.count);
            self.publish();
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
        if vnodes_involved && self.authority.is_shared() {
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
