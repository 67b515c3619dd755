//! The control plane: the one task that changes state.
//!
//! Owns: the [`Controller`] and its message loop. Admin calls, check results, provider events,
//! passive failures and reloads arrive as messages; the loop dispatches each to the module that
//! owns that concern, in order, so every decision is made in one place. Anything slow (starting,
//! stopping, draining a replica) runs in a spawned task that reports back with another message,
//! so the loop never waits on I/O.
//! Must not touch: client sockets. The data plane only reads the [`Snapshot`] published here.
//!
//! # Layout
//! - [`handle`]: [`ControllerHandle`] and the [`Command`] messages.
//! - [`membership`]: the pure membership model (ids, names, phases, `/add` and `/rm` plans).
//! - `scaling`: applying plans: `/add` commit and rollback, `/rm` drain, `replicas.count`.
//! - [`lifecycle`]: one replica's runs: start, replace with back-off, exits.
//! - `probes`: health evidence (checks with the Lua verdict, passive failures) → transitions.
//! - `reload`: config edits as a validated list of [`reload::ConfigChange`]s; policy swaps.
//! - `publish`: assembling and publishing the snapshot; readiness.
//! - `status`: `/lb/status` and `/lb/metrics`.
//!
//! [`Snapshot`]: crate::snapshot::Snapshot

pub mod handle;
pub mod lifecycle;
pub mod membership;
mod probes;
mod publish;
pub mod reload;
mod scaling;
mod status;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use handle::Reply;
pub use handle::{Command, ControllerHandle, ReloadKind};
use lifecycle::{Internal, Replica};
use membership::{Membership, OpId, Phase};

use crate::config::Config;
use crate::error::GatewayError;
use crate::health::probe::{ProbeReport, Prober};
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::provider::{Provider, ProviderEvent};
use crate::ring::{Placement, RingError};
use crate::routing::Router;
use crate::snapshot::Shared;

/// What a controller is built from.
pub struct Parts {
    pub config: Arc<Config>,
    /// The policy set loaded at start, or why it was rejected (the built-ins apply then).
    pub policy: Result<PolicySet, String>,
    pub provider: Arc<dyn Provider>,
    pub provider_events: mpsc::Receiver<ProviderEvent>,
    pub prober: Arc<dyn Prober>,
    pub shared: Shared,
    pub metrics: Arc<Metrics>,
}

/// Edits that were rejected or only partly applied, for `/lb/status`.
#[derive(Debug, Default)]
struct ReloadErrors {
    config: Option<String>,
    policy: Option<String>,
    restart_needed: Vec<&'static str>,
}

struct Channels {
    commands: mpsc::Receiver<Command>,
    probe_tx: mpsc::Sender<ProbeReport>,
    probes: mpsc::Receiver<ProbeReport>,
    provider: mpsc::Receiver<ProviderEvent>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
}

pub struct Controller {
    config: Arc<Config>,
    policy: Arc<PolicySet>,
    errors: ReloadErrors,
    provider: Arc<dyn Provider>,
    prober: Arc<dyn Prober>,
    shared: Shared,
    metrics: Arc<Metrics>,
    membership: Membership,
    placement: Placement,
    replicas: BTreeMap<crate::ring::ServerId, Replica>,
    generation: u64,
    next_incarnation: u64,
    next_op: OpId,
    add_ops: HashMap<OpId, Reply<Vec<String>>>,
    ready_waiters: Vec<oneshot::Sender<()>>,
    channels: Channels,
}

impl Controller {
    /// A controller over `parts.provider`, publishing into `parts.shared`. Run it with
    /// [`Controller::run`].
    pub fn new(parts: Parts) -> Result<(Controller, ControllerHandle), RingError> {
        let placement = Placement::new(parts.config.ring.slots, parts.config.ring.vnodes)?;
        let (tx, commands) = mpsc::channel(1024);
        let (probe_tx, probes) = mpsc::channel(1024);
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let (policy, policy_error) = match parts.policy {
            Ok(p) => (p, None),
            Err(e) => (PolicySet::empty(), Some(e)),
        };
        let controller = Controller {
            config: parts.config,
            policy: Arc::new(policy),
            errors: ReloadErrors {
                policy: policy_error,
                ..ReloadErrors::default()
            },
            provider: parts.provider,
            prober: parts.prober,
            shared: parts.shared,
            metrics: parts.metrics,
            membership: Membership::default(),
            placement,
            replicas: BTreeMap::new(),
            generation: 0,
            next_incarnation: 1,
            next_op: 1,
            add_ops: HashMap::new(),
            ready_waiters: Vec::new(),
            channels: Channels {
                commands,
                probe_tx,
                probes,
                provider: parts.provider_events,
                internal_tx,
                internal,
            },
        };
        Ok((controller, ControllerHandle { tx }))
    }

    /// Adopts existing replicas, starts the missing ones, then serves messages until shutdown.
    pub async fn run(mut self) {
        self.start_up().await;
        loop {
            tokio::select! {
                cmd = self.channels.commands.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.shut_down().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(cmd) => self.dispatch(cmd),
                    None => {
                        self.shut_down().await;
                        return;
                    }
                },
                Some(report) = self.channels.probes.recv() => self.on_probe(report),
                Some(event) = self.channels.provider.recv() => self.on_provider_event(event),
                Some(internal) = self.channels.internal.recv() => self.on_internal(internal),
            }
        }
    }

    fn dispatch(&mut self, cmd: Command) {
        match cmd {
            Command::Add { request, reply } => self.add(request, reply),
            Command::Remove { request, reply } => self.remove(request, reply),
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.render_metrics());
            }
            Command::WhatIfBase { reply } => {
                let _ = reply.send(self.whatif_base());
            }
            Command::PassiveFailure {
                id,
                incarnation,
                detail,
            } => self.on_passive_failure(id, incarnation, detail),
            Command::WaitReady { reply } => {
                self.ready_waiters.push(reply);
                self.notify_ready();
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
            Command::Reload { config } => self.apply_config(*config),
            Command::PolicyLoaded { policy } => self.apply_policy(*policy),
            Command::ReloadFailed { what, error } => self.reload_failed(what, error),
        }
    }

    async fn start_up(&mut self) {
        match self.provider.list().await {
            Ok(existing) => {
                for inst in existing {
                    let (id, name) = (inst.id, inst.hostname.clone());
                    if self.membership.get(id).is_some() || self.membership.id_of(&name).is_some() {
                        tracing::warn!(replica = %name, id = %id, "skipping a duplicate replica reported by the provider");
                        continue;
                    }
                    tracing::info!(replica = %name, id = %id, addr = %inst.addr, "adopting existing replica");
                    self.insert_replica(id, name, Phase::Member);
                    self.place(id);
                    let incarnation = self.bump_incarnation();
                    if let Some(r) = self.replicas.get_mut(&id) {
                        r.incarnation = incarnation;
                    }
                    self.attach(id, inst);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list existing replicas"),
        }
        if self.provider.manages_replicas() {
            let missing =
                (self.config.replicas.count as usize).saturating_sub(self.membership.desired());
            self.grow(missing);
        }
        self.publish();
    }

    async fn shut_down(&mut self) {
        for r in self.replicas.values_mut() {
            r.probe = None;
        }
        self.provider.shutdown().await;
        for (_, reply) in self.add_ops.drain() {
            let _ = reply.send(Err(GatewayError::ShuttingDown));
        }
    }

    fn reload_failed(&mut self, what: ReloadKind, error: String) {
        tracing::error!(what = ?what, error = %error, "edit rejected; keeping the last good one");
        let (counter, slot) = match what {
            ReloadKind::Config => (&self.metrics.config_reload_errors, &mut self.errors.config),
            ReloadKind::Policy => (&self.metrics.policy_reload_errors, &mut self.errors.policy),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        *slot = Some(error);
    }

    /// Places replica `id`'s virtual nodes (membership changes only; health never moves them).
    fn place(&mut self, id: crate::ring::ServerId) {
        let router = Router::new(&self.config, &self.policy);
        if let Err(e) = router.place(&mut self.placement, id) {
            tracing::error!(id = %id, error = %e, "cannot place replica on the ring");
        }
    }

    /// Every member placed again from scratch, in id order: after the ring's parameters or the
    /// virtual-node hash changed, old positions mean nothing.
    fn rebuild_placement(&self, config: &Config) -> Result<Placement, RingError> {
        Router::new(config, &self.policy).placement(&self.membership.member_ids())
    }
}
