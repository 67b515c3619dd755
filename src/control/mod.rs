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
//! - `authority`: who decides membership, a trait chosen once from the provider's
//!   [`Mode`](crate::provider::Mode): this gateway's model, or the engine's shared record (with
//!   its state). Its methods answer with effects (start, drain, write the record, reply) that
//!   `scaling` carries out.
//! - `scaling`: applying plans: `/add` commit and rollback, `/rm` drain, `replicas.count`,
//!   and what the autoscaler decides.
//! - [`autoscale`]: the autoscaler's decision (pure: how many replicas the load asks for).
//! - [`agree`]: several gateways on one shared ring agreeing on N from the proposals they
//!   publish in the record (pure: the largest live proposal).
//! - `shrink`: which replicas a scale-down removes (pure: those whose keys carried the least).
//! - [`lifecycle`]: one replica's runs ([`lifecycle::Replicas`]): start, replace with back-off,
//!   exits.
//! - `outliers`: outlier ejection for what replicas answer (5xx in a row, a failure percentage).
//! - `probes`: health evidence (checks with the Lua verdict, passive failures) → transitions.
//! - `reload`: config edits as a validated list of [`reload::ConfigChange`]s; policy swaps.
//! - [`roll`]: a new replica spec (or `POST /lb/roll`) rolled over the replicas in place,
//!   `roll_batch` at a time, each replacement beside the instance it replaces.
//! - `publish`: assembling and publishing the snapshot; readiness.
//! - [`shared`]: the shared ring record's pure decisions (plans as record edits, reconciling
//!   an observed record, stale entries) and the optimistic write loop; `shared_ops` applies
//!   them (the `swarm` provider, where membership lives in the engine).
//! - `status`: `/lb/status`, and what `/lb/metrics` reads ([`MetricsSources`], rendered by
//!   [`crate::exposition`]).
//!
//! [`Snapshot`]: crate::snapshot::Snapshot

pub mod agree;
mod authority;
pub mod autoscale;
pub mod error;
pub mod handle;
pub mod lifecycle;
pub mod membership;
mod outliers;
mod probes;
mod publish;
mod reconfigure;
pub mod reload;
pub mod roll;
mod scaling;
pub mod shared;
mod shared_ops;
mod shrink;
mod status;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use handle::Internal;
use handle::Reply;
pub use handle::{Command, ControllerHandle, ReloadKind, Scaled};
use lifecycle::Replicas;
use membership::{Membership, OpId, Phase};
use outliers::Outliers;
pub use status::{MetricsSources, Published};

use crate::config::Config;
use crate::health::probe::{ProbeReport, Prober};
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::provider::{Provider, ProviderEvent};
use crate::ring::{Placement, RingError};
use crate::routing::Router;
use crate::snapshot::Shared;
use error::ControlError;

/// What a controller is built from.
pub struct Parts {
    pub config: Arc<Config>,
    /// The policy set loaded at start, or why it was rejected (the built-ins apply then).
    pub policy: Result<PolicySet, String>,
    pub provider: Arc<dyn Provider>,
    pub provider_events: mpsc::Receiver<ProviderEvent>,
    pub prober: Arc<dyn Prober>,
    /// The TLS client the replicas are reached with, built from the config at start (`None`:
    /// plain TCP); the controller publishes it and gives it to `prober`.
    pub upstream_tls: Option<Arc<crate::tls::upstream::UpstreamTls>>,
    pub shared: Shared,
    pub metrics: Arc<Metrics>,
    /// What other parts publish for `/lb/status` and `/lb/metrics` (TLS, serving threads).
    pub published: Published,
    /// This gateway's name (`Via`, `/lb/status`, the ring record).
    pub name: String,
}

/// Edits that were rejected or only partly applied, for `/lb/status`.
#[derive(Debug, Default)]
struct ReloadErrors {
    config: Option<String>,
    policy: Option<String>,
    restart_needed: Vec<&'static str>,
    /// The shared ring record could not be applied as it is (see `/lb/status`).
    ring: Option<String>,
}

struct Channels {
    commands: mpsc::Receiver<Command>,
    probe_tx: mpsc::Sender<ProbeReport>,
    probes: mpsc::Receiver<ProbeReport>,
    provider: mpsc::Receiver<ProviderEvent>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
}

/// How often the controller does its time-driven work.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Controller {
    config: Arc<Config>,
    policy: Arc<PolicySet>,
    errors: ReloadErrors,
    provider: Arc<dyn Provider>,
    prober: Arc<dyn Prober>,
    /// The TLS client to the replicas in force, and the config edits that may replace it.
    upstream: reconfigure::UpstreamClient,
    shared: Shared,
    metrics: Arc<Metrics>,
    published: Published,
    membership: Membership,
    placement: Placement,
    /// Every replica's current run (`lifecycle` owns it).
    replicas: Replicas,
    generation: u64,
    next_op: OpId,
    add_ops: HashMap<OpId, Reply<Scaled>>,
    ready_waiters: Vec<oneshot::Sender<()>>,
    /// The outlier windows (`outliers` owns them).
    outliers: Outliers,
    /// Set once the replicas of the start-up have settled: from then on a joining replica ramps
    /// up (`health.slow_start`); at start-up nobody had its keys before.
    ramps_enabled: bool,
    channels: Channels,
    /// This gateway's name.
    name: String,
    /// What the provider does with replicas, asked once at construction.
    mode: crate::provider::Mode,
    /// Who decides membership (this gateway, or the engine's shared record), chosen once from
    /// `mode`.
    authority: Box<dyn authority::MembershipAuthority>,
    /// What replicas run now (from `[provider]`), and its generation: bumped by every spec
    /// edit and `POST /lb/roll`; a replica whose instance runs an older one is rolled.
    app: Arc<crate::provider::AppSpec>,
    spec_generation: u64,
    /// The last roll (kept once done or stopped, for `/lb/status`).
    roll: Option<roll::Roll>,
    /// What the autoscaler remembers (`autoscale` owns it), and each replica's recent load
    /// (`shrink` owns it); sampled only while `[autoscale]` is on.
    autoscaler: autoscale::Autoscaler,
    recent_load: shrink::RecentLoad,
    /// The autoscaler took N to zero (scale to zero) and no replica has served since: the
    /// published snapshot says so, and requests wait in `holds` rather than get a 503.
    zeroed: bool,
    holds: Arc<crate::snapshot::Holds>,
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
        let app = Arc::new(crate::provider::AppSpec::from_config(
            &parts.config.provider,
        ));
        parts.prober.use_tls(parts.upstream_tls.clone());
        let mode = parts.provider.mode();
        let authority = authority::for_mode(&mode, &parts.name);
        let controller = Controller {
            app,
            spec_generation: 1,
            roll: None,
            autoscaler: autoscale::Autoscaler::default(),
            recent_load: shrink::RecentLoad::default(),
            zeroed: false,
            holds: Arc::default(),
            config: parts.config,
            policy: Arc::new(policy),
            errors: ReloadErrors {
                policy: policy_error,
                ..ReloadErrors::default()
            },
            provider: parts.provider.clone(),
            prober: parts.prober,
            upstream: reconfigure::UpstreamClient::new(parts.upstream_tls),
            shared: parts.shared,
            metrics: parts.metrics,
            published: parts.published,
            membership: Membership::default(),
            placement,
            replicas: Replicas::new(),
            generation: 0,
            next_op: 1,
            add_ops: HashMap::new(),
            ready_waiters: Vec::new(),
            outliers: Outliers::new(tokio::time::Instant::now()),
            ramps_enabled: false,
            name: parts.name,
            mode,
            authority,
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
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick(),
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
                let _ = reply.send(self.metrics_sources());
            }
            Command::WhatIfBase { reply } => {
                let _ = reply.send(self.whatif_base());
            }
            Command::PassiveFailure {
                id,
                incarnation,
                detail,
            } => self.on_passive_failure(id, incarnation, detail),
            Command::Outlier {
                id,
                incarnation,
                consecutive,
            } => self.on_outlier(id, incarnation, consecutive),
            Command::Wake => self.wake(),
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
            Command::Roll { reply } => {
                let _ = reply.send(self.roll_requested().map_err(ControlError::from));
            }
        }
    }

    async fn start_up(&mut self) {
        if let Some(ring) = self.authority.shared().map(|s| s.ring.clone()) {
            return self.start_up_shared(&*ring).await;
        }
        match self.provider.list().await {
            Ok(mut existing) => {
                // Replicas with recorded slots go back there first; the others are placed
                // around them.
                existing.sort_by_key(|i| (i.slots.is_none(), i.id));
                for inst in existing {
                    let (id, name) = (inst.id, inst.hostname.clone());
                    if self.membership.get(id).is_some() || self.membership.id_of(&name).is_some() {
                        tracing::warn!(replica = %name, id = %id, "skipping a duplicate replica reported by the provider");
                        continue;
                    }
                    tracing::info!(replica = %name, id = %id, addr = %inst.addr, "adopting existing replica");
                    self.insert_replica(id, name, Phase::Member);
                    self.place_as_recorded(id, inst.slots.as_deref());
                    let incarnation = self.bump_incarnation();
                    // A replica started from another spec than this config's (edited while
                    // the gateway was down) is rolled once it serves; one without a record of
                    // its spec (an older gateway's) is taken as it is.
                    let current = self.app.fingerprint();
                    let generation = match &inst.spec {
                        Some(fp) if *fp != current => 0,
                        _ => self.spec_generation,
                    };
                    if let Some(r) = self.replicas.get_mut(&id) {
                        r.incarnation = incarnation;
                        r.spec_generation = generation;
                    }
                    self.attach(id, inst);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list existing replicas"),
        }
        if self.mode.starts_replicas() {
            let missing =
                (self.config.replicas.count as usize).saturating_sub(self.membership.desired());
            self.grow(missing);
        }
        // `replicas.count = 0` with scale to zero: the gateway starts asleep, and the first
        // request wakes it.
        let a = &self.config.autoscale;
        if a.enabled && a.min == 0 && !a.idle_to_zero.is_zero() && self.membership.desired() == 0 {
            self.zeroed = true;
        }
        self.publish();
        let behind = self.behind();
        if behind > 0 {
            self.begin_roll(format!(
                "{behind} adopted replica(s) run another spec than the config's"
            ));
        }
    }

    /// Shared ring: the tasks the engine runs, then the record (placing every replica at its
    /// recorded slots), then growing to `replicas.count` through the record.
    async fn start_up_shared(&mut self, ring: &dyn crate::provider::SharedRing) {
        match self.provider.list().await {
            Ok(running) => {
                if let Some(s) = self.authority.shared_mut() {
                    s.tasks
                        .extend(running.into_iter().map(|i| (i.hostname.clone(), i)));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the running replica tasks"),
        }
        match ring.read().await {
            Ok(record) => {
                self.on_engine(true, String::new());
                tracing::info!(
                    version = record.version,
                    replicas = record.members.len(),
                    "read the shared ring record"
                );
                self.apply_record(record);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the shared ring record; waiting for the engine");
                self.on_engine(false, e.to_string());
            }
        }
        self.shared_grow(self.config.replicas.count as usize);
        self.publish();
    }

    async fn shut_down(&mut self) {
        for r in self.replicas.values_mut() {
            r.probe = None;
        }
        self.provider.shutdown().await;
        for (_, reply) in self.add_ops.drain() {
            let _ = reply.send(Err(ControlError::ShuttingDown));
        }
    }

    /// Time-driven work: the outlier window, and republishing when a ramp ends (so the data
    /// plane stops checking it).
    fn on_tick(&mut self) {
        // A replica the roll skipped while it was out of the ring is taken once it is back.
        self.roll_step();
        let now = tokio::time::Instant::now();
        self.outliers_tick(now);
        self.autoscale_tick(now);
        self.finish_retiring(now);
        if self
            .shared
            .load()
            .ramps_until
            .is_some_and(|until| now >= until)
        {
            self.publish();
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

    /// Places replica `id` at the slots recorded for it, when it has a valid record; else
    /// computes its place and says why.
    fn place_as_recorded(&mut self, id: crate::ring::ServerId, slots: Option<&[u32]>) {
        let Some(slots) = slots else {
            return self.place(id);
        };
        if let Err(e) = self.placement.restore(id, slots) {
            tracing::warn!(id = %id, error = %e, "placing it anew instead");
            self.place(id);
        }
    }

    /// Every member (and joining replica) placed again from scratch, in id order: after the ring's parameters or the
    /// virtual-node hash changed, old positions mean nothing.
    fn rebuild_placement(&self, config: &Config) -> Result<Placement, RingError> {
        let ids: Vec<_> = self
            .membership
            .all()
            .filter(|(_, e)| e.phase != Phase::Leaving)
            .map(|(id, _)| id)
            .collect();
        Router::new(config, &self.policy).placement(&ids)
    }
}
