//! The controller: the one task that changes state.
//!
//! Owns: the desired membership, each replica's lifecycle (starting, up, suspect, down,
//! draining), virtual-node placement, replacement with back-off, and publishing a new
//! [`Snapshot`] after every change that affects routing.
//! Must not touch: sockets of clients. Admin calls, check results, provider events and passive
//! failures arrive as messages; anything slow (starting, stopping, draining a replica) runs in a
//! spawned task that reports back with another message, so the loop never waits on I/O and
//! every decision is made in one place, in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::config::{is_valid_hostname, Config};
use crate::error::GatewayError;
use crate::health::{self, HealthState, ProbeOutcome, ProbeReport, ProbeTask, Tracker, Transition};
use crate::metrics::Metrics;
use crate::policy::{Hook, HookOutcome, PolicySet, ProbeView};
use crate::provider::{Instance, Provider, ProviderEvent, ReplicaSpec};
use crate::ring::{Placement, Ring, ServerId};
use crate::snapshot::{ReplicaStats, Shared, Snapshot, Upstream};

/// How long a new replica has to answer its first heartbeat.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting replica is checked.
const START_PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Upper bound on the check period of a replica that is not up.
const FAST_PROBE_PERIOD: Duration = Duration::from_secs(1);
/// A replica that ran this long before dying starts a fresh back-off.
const STABLE_AFTER: Duration = Duration::from_secs(30);

type Reply<T> = oneshot::Sender<Result<T, GatewayError>>;

/// Requests to the controller.
#[derive(Debug)]
pub enum Command {
    Add {
        n: u32,
        hostnames: Vec<String>,
        reply: Reply<Vec<String>>,
    },
    Remove {
        n: u32,
        hostnames: Vec<String>,
        reply: Reply<Vec<String>>,
    },
    Status {
        reply: oneshot::Sender<serde_json::Value>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
    /// A connect to this replica failed on the request path.
    PassiveFailure {
        id: ServerId,
        incarnation: u64,
        detail: String,
    },
    /// Answered once every member is up (or immediately if they are).
    WaitReady {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// A new, valid config from the watcher.
    Reload {
        config: Box<Config>,
    },
    /// A new, loaded policy set from the watcher.
    PolicyLoaded {
        policy: Box<PolicySet>,
    },
    /// An edit that was rejected (invalid config, a policy that fails to load): nothing changes.
    ReloadFailed {
        what: ReloadKind,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
    Config,
    Policy,
}

/// Reports from the controller's own spawned tasks.
enum Internal {
    Spawned {
        id: ServerId,
        incarnation: u64,
        result: Result<Instance, crate::provider::ProviderError>,
    },
    StartTimeout {
        id: ServerId,
        incarnation: u64,
    },
    RespawnDue {
        id: ServerId,
        incarnation: u64,
    },
    Removed {
        ids: Vec<ServerId>,
        reply: Reply<Vec<String>>,
    },
}

/// The cheap, cloneable way to talk to the controller.
#[derive(Clone, Debug)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Command>,
}

impl ControllerHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GatewayError> {
        let (reply, rx) = oneshot::channel();
        let gone = || GatewayError::Unavailable("the gateway is shutting down".into());
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    pub async fn add(&self, n: u32, hostnames: Vec<String>) -> Result<Vec<String>, GatewayError> {
        self.ask(|reply| Command::Add {
            n,
            hostnames,
            reply,
        })
        .await?
    }

    pub async fn remove(
        &self,
        n: u32,
        hostnames: Vec<String>,
    ) -> Result<Vec<String>, GatewayError> {
        self.ask(|reply| Command::Remove {
            n,
            hostnames,
            reply,
        })
        .await?
    }

    pub async fn status(&self) -> Result<serde_json::Value, GatewayError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    pub async fn metrics(&self) -> Result<String, GatewayError> {
        self.ask(|reply| Command::Metrics { reply }).await
    }

    pub async fn wait_ready(&self) -> Result<(), GatewayError> {
        self.ask(|reply| Command::WaitReady { reply }).await
    }

    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| Command::Shutdown { reply }).await;
    }

    /// Sends a reload message (from the watcher); returns false once the controller is gone.
    pub async fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).await.is_ok()
    }

    /// Never waits: a full queue drops the hint (the next failure or check repeats it).
    pub fn passive_failure(&self, id: ServerId, incarnation: u64, detail: String) {
        let _ = self.tx.try_send(Command::PassiveFailure {
            id,
            incarnation,
            detail,
        });
    }
}

struct Managed {
    id: ServerId,
    name: String,
    tracker: Tracker,
    instance: Option<Instance>,
    /// Bumped on every start; reports about an older incarnation are stale.
    incarnation: u64,
    stats: Arc<ReplicaStats>,
    probe: Option<ProbeTask>,
    last_probe: Option<ProbeOutcome>,
    restarts: u32,
    /// Deaths in a row without a stable run: the back-off exponent.
    crash_streak: u32,
    up_since: Option<Instant>,
    next_restart: Option<Instant>,
    last_exit: Option<String>,
    /// The `/add` call this replica belongs to until that call commits.
    pending_add: Option<u64>,
}

impl Managed {
    fn new(id: ServerId, name: String) -> Managed {
        Managed {
            id,
            name,
            tracker: Tracker::starting(),
            instance: None,
            incarnation: 0,
            stats: Arc::new(ReplicaStats::default()),
            probe: None,
            last_probe: None,
            restarts: 0,
            crash_streak: 0,
            up_since: None,
            next_restart: None,
            last_exit: None,
            pending_add: None,
        }
    }

    /// Part of the membership `/rep` reports and the ring places.
    fn is_member(&self) -> bool {
        self.pending_add.is_none() && self.tracker.state != HealthState::Draining
    }
}

struct AddOp {
    ids: Vec<ServerId>,
    reply: Reply<Vec<String>>,
}

pub struct Controller {
    config: Arc<Config>,
    policy: Arc<PolicySet>,
    policy_error: Option<String>,
    config_error: Option<String>,
    restart_needed: Vec<&'static str>,
    provider: Arc<dyn Provider>,
    shared: Shared,
    metrics: Arc<Metrics>,
    placement: Placement,
    replicas: BTreeMap<ServerId, Managed>,
    generation: u64,
    next_incarnation: u64,
    next_op: u64,
    add_ops: HashMap<u64, AddOp>,
    ready_waiters: Vec<oneshot::Sender<()>>,
    probe_client: health::ProbeClient,
    cmd_rx: mpsc::Receiver<Command>,
    probe_tx: mpsc::Sender<ProbeReport>,
    probe_rx: mpsc::Receiver<ProbeReport>,
    provider_rx: mpsc::Receiver<ProviderEvent>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
}

impl Controller {
    /// A controller over `provider`, publishing into `shared`. Run it with [`Controller::run`].
    pub fn new(
        config: Arc<Config>,
        policy: Result<PolicySet, String>,
        provider: Arc<dyn Provider>,
        provider_rx: mpsc::Receiver<ProviderEvent>,
        shared: Shared,
        metrics: Arc<Metrics>,
    ) -> Result<(Controller, ControllerHandle), crate::ring::RingError> {
        let placement = Placement::new(config.ring.slots, config.ring.vnodes)?;
        let (tx, cmd_rx) = mpsc::channel(1024);
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (policy, policy_error) = match policy {
            Ok(p) => (p, None),
            Err(e) => (PolicySet::empty(), Some(e)),
        };
        let c = Controller {
            config,
            policy: Arc::new(policy),
            policy_error,
            config_error: None,
            restart_needed: Vec::new(),
            provider,
            shared,
            metrics,
            placement,
            replicas: BTreeMap::new(),
            generation: 0,
            next_incarnation: 1,
            next_op: 1,
            add_ops: HashMap::new(),
            ready_waiters: Vec::new(),
            probe_client: health::probe_client(),
            cmd_rx,
            probe_tx,
            probe_rx,
            provider_rx,
            internal_tx,
            internal_rx,
        };
        Ok((c, ControllerHandle { tx }))
    }

    /// Adopts existing replicas, starts the missing ones, then serves messages until shutdown.
    pub async fn run(mut self) {
        self.start_up().await;
        loop {
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.shut_down().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => {
                        self.shut_down().await;
                        return;
                    }
                },
                Some(report) = self.probe_rx.recv() => self.on_probe(report),
                Some(event) = self.provider_rx.recv() => self.on_provider_event(event),
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal),
            }
        }
    }

    async fn start_up(&mut self) {
        match self.provider.list().await {
            Ok(existing) => {
                for inst in existing {
                    if self.replicas.contains_key(&inst.id) || self.name_in_use(&inst.hostname) {
                        tracing::warn!(replica = %inst.hostname, id = %inst.id, "skipping a duplicate replica reported by the provider");
                        continue;
                    }
                    tracing::info!(replica = %inst.hostname, id = %inst.id, addr = %inst.addr, "adopting existing replica");
                    let mut m = Managed::new(inst.id, inst.hostname.clone());
                    m.incarnation = self.bump_incarnation();
                    self.replicas.insert(inst.id, m);
                    self.place(inst.id);
                    self.attach(inst.id, inst);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list existing replicas"),
        }
        if self.provider.manages_replicas() {
            let missing =
                (self.config.replicas.count as usize).saturating_sub(self.members().count());
            for _ in 0..missing {
                self.start_member();
            }
        }
        self.publish();
    }

    async fn shut_down(&mut self) {
        for m in self.replicas.values_mut() {
            m.probe = None;
        }
        self.provider.shutdown().await;
        for op in self.add_ops.drain().map(|(_, op)| op) {
            let _ = op.reply.send(Err(GatewayError::Unavailable(
                "the gateway is shutting down".into(),
            )));
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Add {
                n,
                hostnames,
                reply,
            } => self.add(n, hostnames, reply),
            Command::Remove {
                n,
                hostnames,
                reply,
            } => self.remove(n, hostnames, reply),
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Metrics { reply } => {
                let stats: Vec<_> = self
                    .replicas
                    .values()
                    .map(|m| (m.name.clone(), m.stats.clone()))
                    .collect();
                let _ = reply.send(self.metrics.render(&self.shared.load(), &stats));
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
            Command::ReloadFailed { what, error } => {
                tracing::error!(what = ?what, error = %error, "edit rejected; keeping the last good one");
                match what {
                    ReloadKind::Config => {
                        self.metrics
                            .config_reload_errors
                            .fetch_add(1, Ordering::Relaxed);
                        self.config_error = Some(error);
                    }
                    ReloadKind::Policy => {
                        self.metrics
                            .policy_reload_errors
                            .fetch_add(1, Ordering::Relaxed);
                        self.policy_error = Some(error);
                    }
                }
            }
        }
    }

    // ---- membership -------------------------------------------------------------------------

    fn members(&self) -> impl Iterator<Item = &Managed> {
        self.replicas.values().filter(|m| m.is_member())
    }

    fn member_names(&self) -> Vec<String> {
        self.members().map(|m| m.name.clone()).collect()
    }

    fn name_in_use(&self, name: &str) -> bool {
        self.replicas.values().any(|m| m.name == name)
    }

    /// The smallest id no replica holds (ids stay small and stable).
    fn free_id(&self) -> ServerId {
        let mut n = 1u32;
        loop {
            match ServerId::new(n) {
                Some(id) if !self.replicas.contains_key(&id) => return id,
                _ => n += 1,
            }
        }
    }

    /// `<name_prefix><id>`, or the next free `<name_prefix><k>` if a hostname took it.
    fn generated_name(&self, id: ServerId, also_taken: &HashSet<String>) -> String {
        let prefix = &self.config.replicas.name_prefix;
        (id.get()..)
            .map(|k| format!("{prefix}{k}"))
            .find(|n| !self.name_in_use(n) && !also_taken.contains(n))
            .unwrap_or_else(|| format!("{prefix}{id}"))
    }

    fn place(&mut self, id: ServerId) {
        let vnode_slot = vnode_hash(&self.config, &self.policy);
        if let Err(e) = self.placement.add(id, |j| vnode_slot(id, j)) {
            tracing::error!(id = %id, error = %e, "cannot place replica on the ring");
        }
    }

    /// Places every member again from scratch (in id order): after the ring's parameters or
    /// the virtual-node hash changed, old positions mean nothing.
    fn rebuild_placement(&self, config: &Config) -> Result<Placement, crate::ring::RingError> {
        let ids: Vec<ServerId> = self.members().map(|m| m.id).collect();
        let vnode_slot = vnode_hash(config, &self.policy);
        Placement::build(config.ring.slots, config.ring.vnodes, &ids, vnode_slot)
    }

    fn apply_policy(&mut self, policy: PolicySet) {
        let vnodes_involved =
            policy.has_hook(Hook::VnodeHash) || self.policy.has_hook(Hook::VnodeHash);
        let policy = policy.with_stats(self.policy.stats().clone());
        tracing::info!(generation = policy.generation(), files = ?policy.files(), hooks = ?policy.hooks(), "policy loaded");
        self.policy = Arc::new(policy);
        self.policy_error = None;
        self.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
        if vnodes_involved {
            match self.rebuild_placement(&self.config) {
                Ok(p) => self.placement = p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild the ring with the new vnode_hash")
                }
            }
        }
        self.publish();
    }

    fn apply_config(&mut self, mut new: Config) {
        let old = self.config.clone();
        let mut restart = Vec::new();
        if new.listen != old.listen {
            restart.push("listen");
            new.listen = old.listen;
        }
        if new.provider != old.provider {
            restart.push("provider");
            new.provider = old.provider.clone();
        }
        if new.policy.dir != old.policy.dir {
            restart.push("policy.dir");
            new.policy.dir = old.policy.dir.clone();
        }
        let ring_changed = new.ring.slots != old.ring.slots
            || new.ring.vnodes != old.ring.vnodes
            || new.ring.vnode_hash != old.ring.vnode_hash;
        let placement = if ring_changed {
            match self.rebuild_placement(&new) {
                Ok(p) => Some(p),
                Err(e) => {
                    let error = format!(
                        "the new [ring] cannot hold the {} replicas that run: {e}",
                        self.members().count()
                    );
                    tracing::error!(error = %error, "config edit rejected; nothing changed");
                    self.metrics
                        .config_reload_errors
                        .fetch_add(1, Ordering::Relaxed);
                    self.config_error = Some(error);
                    return;
                }
            }
        } else {
            None
        };
        let changed: Vec<&str> = [
            ("ring", new.ring != old.ring),
            ("hashing", new.hashing != old.hashing),
            ("replicas", new.replicas != old.replicas),
            ("health", new.health != old.health),
            ("proxy", new.proxy != old.proxy),
            ("policy", new.policy != old.policy),
            ("admin", new.admin != old.admin),
        ]
        .iter()
        .filter(|(_, c)| *c)
        .map(|(n, _)| *n)
        .collect();
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "these changes need a restart; everything else is applied");
        }
        tracing::info!(changed = ?changed, "config reloaded");
        self.restart_needed = restart;
        self.config_error = None;
        self.metrics.config_reloads.fetch_add(1, Ordering::Relaxed);
        let scale_to = (new.replicas.count != old.replicas.count).then_some(new.replicas.count);
        self.config = Arc::new(new);
        if let Some(p) = placement {
            self.placement = p;
        }
        for m in self.replicas.values() {
            if let Some(p) = &m.probe {
                p.set_period(
                    self.probe_period(m.tracker.state),
                    self.config.health.timeout,
                );
            }
        }
        self.publish();
        if let Some(n) = scale_to {
            self.scale_to(n);
        }
    }

    /// A new member with a generated name, placed on the ring at once and started (start-up and
    /// `replicas.count` edits; `/add` instead commits its replicas only once they all answer).
    fn start_member(&mut self) {
        let id = self.free_id();
        let name = self.generated_name(id, &HashSet::new());
        self.replicas.insert(id, Managed::new(id, name));
        self.place(id);
        self.start_instance(id);
    }

    /// Adds or removes replicas until N = `n` (a `replicas.count` edit).
    fn scale_to(&mut self, n: u32) {
        if !self.provider.manages_replicas() {
            return;
        }
        let have = self.members().count() as u32;
        if n > have {
            let room =
                (self.config.replicas.max_replicas as usize).saturating_sub(self.replicas.len());
            let add = ((n - have) as usize).min(room);
            tracing::info!(
                from = have,
                to = have as usize + add,
                "scaling up to replicas.count"
            );
            for _ in 0..add {
                self.start_member();
            }
            self.publish();
        } else if n < have {
            tracing::info!(from = have, to = n, "scaling down to replicas.count");
            let (reply, _) = oneshot::channel();
            self.remove(have - n, Vec::new(), reply);
        }
    }

    fn probe_period(&self, state: HealthState) -> Duration {
        let interval = self.config.health.interval;
        match state {
            HealthState::Starting => START_PROBE_PERIOD,
            HealthState::Up => interval,
            _ => interval.min(FAST_PROBE_PERIOD),
        }
    }

    fn add(&mut self, n: u32, hostnames: Vec<String>, reply: Reply<Vec<String>>) {
        match self.validate_add(n, &hostnames) {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(()) => {
                let op = self.next_op;
                self.next_op += 1;
                let mut taken: HashSet<String> = hostnames.iter().cloned().collect();
                let mut ids = Vec::new();
                let mut names = hostnames.into_iter();
                for _ in 0..n {
                    let id = self.free_id();
                    let name = names
                        .next()
                        .unwrap_or_else(|| self.generated_name(id, &taken));
                    taken.insert(name.clone());
                    let mut m = Managed::new(id, name);
                    m.pending_add = Some(op);
                    self.replicas.insert(id, m);
                    ids.push(id);
                }
                tracing::info!(op, replicas = ?ids.iter().filter_map(|id| self.replicas.get(id)).map(|m| m.name.as_str()).collect::<Vec<_>>(), "adding replicas");
                for &id in &ids {
                    self.start_instance(id);
                }
                self.add_ops.insert(op, AddOp { ids, reply });
            }
        }
    }

    fn validate_add(&self, n: u32, hostnames: &[String]) -> Result<(), GatewayError> {
        if hostnames.len() > n as usize {
            return Err(GatewayError::TooManyHostnamesToAdd);
        }
        if !self.provider.manages_replicas() {
            return Err(GatewayError::BadRequest(format!(
                "The {} provider cannot start replicas: list them in provider.servers in the config",
                self.provider.kind()
            )));
        }
        check_names(hostnames)?;
        if let Some(h) = hostnames.iter().find(|h| self.name_in_use(h)) {
            return Err(GatewayError::BadRequest(format!(
                "Hostname '{h}' is already in use"
            )));
        }
        let kept = self.replicas.len();
        let max = self.config.replicas.max_replicas as usize;
        if kept + n as usize > max {
            return Err(GatewayError::BadRequest(format!(
                "Adding {n} replicas would make {}, more than replicas.max_replicas ({max})",
                kept + n as usize
            )));
        }
        Ok(())
    }

    fn remove(&mut self, n: u32, hostnames: Vec<String>, reply: Reply<Vec<String>>) {
        let chosen = match self.validate_remove(n, &hostnames) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let drain_timeout = self.config.proxy.drain_timeout;
        let mut draining = Vec::new();
        for &id in &chosen {
            self.placement.remove(id);
            if let Some(m) = self.replicas.get_mut(&id) {
                m.tracker.state = HealthState::Draining;
                m.probe = None;
                m.next_restart = None;
                tracing::info!(replica = %m.name, id = %id, "draining replica");
                draining.push((m.name.clone(), m.stats.clone()));
            }
        }
        self.publish();
        let provider = self.provider.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            futures_util::future::join_all(draining.into_iter().map(|(name, stats)| {
                let provider = provider.clone();
                async move {
                    let deadline = Instant::now() + drain_timeout;
                    while stats.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if let Err(e) = provider.remove(&name).await {
                        tracing::error!(replica = %name, error = %e, "cannot stop removed replica");
                    }
                }
            }))
            .await;
            let _ = tx.send(Internal::Removed { ids: chosen, reply });
        });
    }

    fn validate_remove(&self, n: u32, hostnames: &[String]) -> Result<Vec<ServerId>, GatewayError> {
        if hostnames.len() > n as usize {
            return Err(GatewayError::TooManyHostnamesToRemove);
        }
        check_names(hostnames)?;
        let members: Vec<&Managed> = self.members().collect();
        if n as usize > members.len() {
            return Err(GatewayError::BadRequest(format!(
                "Cannot remove {n} replicas: only {} exist",
                members.len()
            )));
        }
        let mut chosen = Vec::new();
        for h in hostnames {
            match members.iter().find(|m| &m.name == h) {
                Some(m) => chosen.push(m.id),
                None => {
                    return Err(GatewayError::BadRequest(format!(
                        "Hostname '{h}' does not exist"
                    )))
                }
            }
        }
        // The rest: the most recently added (highest ids) first.
        for m in members.iter().rev() {
            if chosen.len() == n as usize {
                break;
            }
            if !chosen.contains(&m.id) {
                chosen.push(m.id);
            }
        }
        Ok(chosen)
    }

    // ---- replica lifecycle ------------------------------------------------------------------

    fn bump_incarnation(&mut self) -> u64 {
        let i = self.next_incarnation;
        self.next_incarnation += 1;
        i
    }

    /// Starts a new incarnation of replica `id` (first start or replacement).
    fn start_instance(&mut self, id: ServerId) {
        let incarnation = self.bump_incarnation();
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        m.incarnation = incarnation;
        m.tracker = Tracker::starting();
        m.instance = None;
        m.probe = None;
        m.next_restart = None;
        let spec = ReplicaSpec {
            id,
            hostname: m.name.clone(),
        };
        let provider = self.provider.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = provider.spawn(spec).await;
            let _ = tx.send(Internal::Spawned {
                id,
                incarnation,
                result,
            });
        });
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(START_TIMEOUT).await;
            let _ = tx.send(Internal::StartTimeout { id, incarnation });
        });
    }

    /// Records a running instance and starts checking it.
    fn attach(&mut self, id: ServerId, inst: Instance) {
        let timeout = self.config.health.timeout;
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        m.probe = Some(ProbeTask::start(
            id,
            m.incarnation,
            inst.addr,
            START_PROBE_PERIOD,
            timeout,
            self.probe_client.clone(),
            self.probe_tx.clone(),
        ));
        m.instance = Some(inst);
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Spawned {
                id,
                incarnation,
                result,
            } => {
                let current = self.replicas.get(&id).is_some_and(|m| {
                    m.incarnation == incarnation && m.tracker.state != HealthState::Draining
                });
                match result {
                    Ok(inst) if current => self.attach(id, inst),
                    Ok(inst) => {
                        // Removed while it was starting: stop what was started.
                        let provider = self.provider.clone();
                        tokio::spawn(async move {
                            let _ = provider.remove(&inst.hostname).await;
                        });
                    }
                    Err(e) if current => self.on_start_failed(id, e.detail()),
                    Err(_) => {}
                }
            }
            Internal::StartTimeout { id, incarnation } => {
                let stuck = self.replicas.get(&id).is_some_and(|m| {
                    m.incarnation == incarnation && m.tracker.state == HealthState::Starting
                });
                if stuck {
                    self.on_start_failed(
                        id,
                        format!("it did not answer /heartbeat within {START_TIMEOUT:?}"),
                    );
                }
            }
            Internal::RespawnDue { id, incarnation } => {
                let due = self.replicas.get(&id).is_some_and(|m| {
                    m.incarnation == incarnation && m.tracker.state == HealthState::Down
                });
                if due {
                    if let Some(m) = self.replicas.get_mut(&id) {
                        m.restarts += 1;
                        tracing::info!(replica = %m.name, id = %id, restarts = m.restarts, "starting replacement");
                    }
                    self.metrics.respawns.fetch_add(1, Ordering::Relaxed);
                    self.start_instance(id);
                }
            }
            Internal::Removed { ids, reply } => {
                for id in ids {
                    if let Some(m) = self.replicas.remove(&id) {
                        tracing::info!(replica = %m.name, id = %id, "replica removed");
                    }
                }
                self.publish();
                let _ = reply.send(Ok(self.member_names()));
            }
        }
    }

    /// A start failed (provider error, exit before answering, start timeout).
    fn on_start_failed(&mut self, id: ServerId, reason: String) {
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        tracing::warn!(replica = %m.name, id = %id, reason = %reason, "replica failed to start");
        m.last_exit = Some(reason.clone());
        if let Some(op) = m.pending_add {
            let message = format!(
                "Replica '{}' failed to start: {reason}; nothing was added",
                m.name
            );
            self.fail_add(op, message);
        } else {
            self.replace(id);
            self.notify_ready();
        }
    }

    /// Takes replica `id` out and schedules its replacement with back-off.
    fn replace(&mut self, id: ServerId) {
        let recovery = self.config.health.recovery_delay;
        let cap = self.config.health.max_backoff;
        let manages = self.provider.manages_replicas();
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        m.tracker.state = HealthState::Down;
        if !manages {
            // Not ours to restart (static): keep checking it; `rise` good checks bring it back.
            return;
        }
        m.probe = None;
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        let stable = m.up_since.is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        m.crash_streak = if stable {
            1
        } else {
            m.crash_streak.saturating_add(1)
        };
        let delay = backoff(recovery, cap, m.crash_streak);
        m.up_since = None;
        m.incarnation = incarnation;
        m.next_restart = Some(Instant::now() + delay);
        let old = m.instance.take();
        let name = m.name.clone();
        tracing::info!(replica = %name, id = %id, delay_ms = delay.as_millis() as u64, crash_streak = m.crash_streak, "replacement scheduled");
        let provider = self.provider.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            if old.is_some() {
                if let Err(e) = provider.remove(&name).await {
                    tracing::warn!(replica = %name, error = %e, "cannot stop the failed instance");
                }
            }
            tokio::time::sleep(delay).await;
            let _ = tx.send(Internal::RespawnDue { id, incarnation });
        });
    }

    fn on_probe(&mut self, report: ProbeReport) {
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        let timeout = self.config.health.timeout;
        let policy = self.policy.clone();
        let Some(m) = self.replicas.get_mut(&report.id) else {
            return;
        };
        if m.incarnation != report.incarnation || m.tracker.state == HealthState::Draining {
            return;
        }
        let mut ok = report.outcome.ok;
        if policy.has_hook(Hook::Health) {
            let o = &report.outcome;
            let view = ProbeView {
                status: o.status,
                latency_ms: o.latency_ms,
                error: o.error.as_deref(),
            };
            if let HookOutcome::Value(verdict) = policy.health(&m.name, &view) {
                ok = verdict;
            }
        }
        if !ok && m.tracker.state != HealthState::Starting {
            tracing::debug!(replica = %m.name, error = ?report.outcome.error, "check failed");
        }
        m.last_probe = Some(report.outcome);
        let was = m.tracker.state;
        let transition = m.tracker.on_probe(ok, rise, fall);
        let state = m.tracker.state;
        let (id, name) = (m.id, m.name.clone());
        let period = self.probe_period(state);
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        if let Some(p) = &m.probe {
            p.set_period(period, timeout);
        }
        match transition {
            Transition::None => {}
            Transition::Up => {
                m.up_since = Some(Instant::now());
                m.next_restart = None;
                if was == HealthState::Down {
                    tracing::info!(replica = %name, id = %id, "replica recovered");
                } else {
                    tracing::info!(replica = %name, id = %id, "replica up");
                }
                if let Some(op) = m.pending_add {
                    self.maybe_commit_add(op);
                } else {
                    self.publish();
                }
            }
            Transition::Suspect => {
                tracing::info!(replica = %name, id = %id, "replica suspect: a check failed");
            }
            Transition::Down => {}
            Transition::Dead => {
                tracing::warn!(replica = %name, id = %id, failures = fall, "replica down: checks failed");
                self.metrics
                    .ejections
                    .fetch_add(u64::from(was.routable()), Ordering::Relaxed);
                self.replace(id);
                self.publish();
            }
        }
    }

    fn on_passive_failure(&mut self, id: ServerId, incarnation: u64, detail: String) {
        let fall = self.config.health.fall;
        let Some(m) = self.replicas.get_mut(&id) else {
            return;
        };
        if m.incarnation != incarnation {
            return;
        }
        match m.tracker.on_passive_failure(fall) {
            Transition::None => {}
            t => {
                tracing::warn!(replica = %m.name, id = %id, error = %detail, "replica ejected: a request could not connect");
                self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = &m.probe {
                    p.probe_now();
                }
                if t == Transition::Dead {
                    self.replace(id);
                }
                self.publish();
            }
        }
    }

    fn on_provider_event(&mut self, event: ProviderEvent) {
        let ProviderEvent::Exited {
            hostname,
            instance_id,
            detail,
        } = event;
        let Some(m) = self.replicas.values_mut().find(|m| {
            m.name == hostname
                && m.instance
                    .as_ref()
                    .is_some_and(|i| i.instance_id == instance_id)
        }) else {
            return;
        };
        if m.tracker.state == HealthState::Draining {
            return;
        }
        let (id, was) = (m.id, m.tracker.state);
        tracing::warn!(replica = %hostname, id = %id, detail = %detail, "replica exited");
        m.last_exit = Some(detail.clone());
        m.instance = None;
        if let Some(op) = m.pending_add {
            self.fail_add(
                op,
                format!("Replica '{hostname}' exited while starting ({detail}); nothing was added"),
            );
            return;
        }
        if was.routable() {
            self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        }
        self.replace(id);
        self.publish();
    }

    // ---- /add commit and rollback -----------------------------------------------------------

    fn maybe_commit_add(&mut self, op: u64) {
        let Some(add) = self.add_ops.get(&op) else {
            return;
        };
        let all_up = add.ids.iter().all(|id| {
            self.replicas
                .get(id)
                .is_some_and(|m| m.tracker.state.routable())
        });
        if !all_up {
            return;
        }
        let Some(add) = self.add_ops.remove(&op) else {
            return;
        };
        for &id in &add.ids {
            self.place(id);
            if let Some(m) = self.replicas.get_mut(&id) {
                m.pending_add = None;
            }
        }
        self.publish();
        tracing::info!(op, n = add.ids.len(), "replicas added");
        let _ = add.reply.send(Ok(self.member_names()));
    }

    fn fail_add(&mut self, op: u64, message: String) {
        let Some(add) = self.add_ops.remove(&op) else {
            return;
        };
        let mut names = Vec::new();
        for id in &add.ids {
            if let Some(m) = self.replicas.remove(id) {
                names.push(m.name);
            }
        }
        tracing::warn!(op, error = %message, "rolling back /add");
        let provider = self.provider.clone();
        tokio::spawn(async move {
            futures_util::future::join_all(names.iter().map(|n| provider.remove(n))).await;
            let _ = add.reply.send(Err(GatewayError::Internal(message)));
        });
    }

    // ---- publishing ---------------------------------------------------------------------------

    fn publish(&mut self) {
        let routable = |id: ServerId| {
            self.replicas.get(&id).is_some_and(|m| {
                m.is_member() && m.tracker.state.routable() && m.instance.is_some()
            })
        };
        let ring = Ring::build(&self.placement, routable);
        let max_id = self
            .replicas
            .keys()
            .next_back()
            .map(|id| id.get() as usize)
            .unwrap_or(0);
        let mut upstreams: Vec<Option<Arc<Upstream>>> = vec![None; max_id + 1];
        for m in self.replicas.values().filter(|m| routable(m.id)) {
            let Some(inst) = &m.instance else { continue };
            let Ok(authority) = http::uri::Authority::try_from(inst.addr.to_string()) else {
                continue;
            };
            upstreams[m.id.get() as usize] = Some(Arc::new(Upstream {
                id: m.id,
                name: m.name.clone(),
                addr: inst.addr,
                authority,
                incarnation: m.incarnation,
                stats: m.stats.clone(),
            }));
        }
        self.generation += 1;
        self.metrics
            .replicas_up
            .store(ring.servers() as u64, Ordering::Relaxed);
        self.metrics
            .replicas_desired
            .store(self.members().count() as u64, Ordering::Relaxed);
        self.metrics.ring_rebuilds.fetch_add(1, Ordering::Relaxed);
        let snapshot = Snapshot {
            generation: self.generation,
            config: self.config.clone(),
            ring,
            upstreams,
            members: self.member_names(),
            policy: self.policy.clone(),
        };
        self.shared.store(Arc::new(snapshot));
        self.notify_ready();
    }

    fn notify_ready(&mut self) {
        if self.ready_waiters.is_empty() {
            return;
        }
        // Ready when every member answers or has already failed to start (it is being retried
        // with back-off; waiting for it would only delay the others).
        let settled = self
            .members()
            .all(|m| m.tracker.state.routable() || m.crash_streak > 0);
        if settled {
            for w in self.ready_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let snap = self.shared.load();
        let now = Instant::now();
        let replicas: Vec<_> = self
            .replicas
            .values()
            .map(|m| {
                let s = &m.stats;
                json!({
                    "id": m.id.get(),
                    "name": m.name,
                    "address": m.instance.as_ref().map(|i| i.addr.to_string()),
                    "instance": m.instance.as_ref().map(|i| i.instance_id.clone()),
                    "state": if m.pending_add.is_some() { json!("starting") } else { json!(m.tracker.state) },
                    "in_ring": snap.upstream(m.id).is_some(),
                    "requests": s.requests.load(Ordering::Relaxed),
                    "responses": {
                        "1xx": s.by_class[0].load(Ordering::Relaxed),
                        "2xx": s.by_class[1].load(Ordering::Relaxed),
                        "3xx": s.by_class[2].load(Ordering::Relaxed),
                        "4xx": s.by_class[3].load(Ordering::Relaxed),
                        "5xx": s.by_class[4].load(Ordering::Relaxed),
                    },
                    "failures": s.failures.load(Ordering::Relaxed),
                    "in_flight": s.in_flight.load(Ordering::Relaxed),
                    "consecutive_failures": m.tracker.consecutive_failures,
                    "restarts": m.restarts,
                    "crash_streak": m.crash_streak,
                    "next_restart_in_ms": m.next_restart.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    "last_exit": m.last_exit,
                    "last_probe": m.last_probe,
                    "slots": self.placement.positions(m.id),
                })
            })
            .collect();
        let c = &self.config;
        json!({
            "generation": snap.generation,
            "provider": self.provider.kind(),
            "desired": self.members().count(),
            "up": snap.ring.servers(),
            "ring": {
                "slots": c.ring.slots,
                "vnodes": c.ring.vnodes,
                "request_hash": c.ring.request_hash,
                "vnode_hash": c.ring.vnode_hash,
                "key": c.hashing.key.to_string(),
                "capacity": self.placement.capacity(),
            },
            "health": {
                "interval_ms": c.health.interval.as_millis() as u64,
                "timeout_ms": c.health.timeout.as_millis() as u64,
                "rise": c.health.rise,
                "fall": c.health.fall,
                "recovery_delay_ms": c.health.recovery_delay.as_millis() as u64,
            },
            "replicas": replicas,
            "config": {
                "last_error": self.config_error,
                "restart_needed": self.restart_needed,
            },
            "policy": self.policy_status(),
        })
    }
}

impl Controller {
    fn policy_status(&self) -> serde_json::Value {
        let p = &self.policy;
        let stats = p.stats();
        let hooks: serde_json::Map<String, serde_json::Value> = Hook::ALL
            .iter()
            .map(|&h| {
                (
                    h.name().to_owned(),
                    json!({"defined": p.has_hook(h), "calls": stats.calls(h), "errors": stats.errors(h)}),
                )
            })
            .collect();
        json!({
            "generation": p.generation(),
            "files": p.files(),
            "hooks": hooks,
            "last_load_error": self.policy_error,
            "last_hook_error": stats.last_error().map(|e| json!({
                "hook": e.hook.name(),
                "message": e.message,
                "at": e.at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            })),
        })
    }
}

/// The virtual-node hash in force: the Lua `vnode_hash` hook where it answers, else
/// `ring.vnode_hash`.
fn vnode_hash<'a>(config: &'a Config, policy: &'a PolicySet) -> impl Fn(ServerId, u32) -> u32 + 'a {
    let (f, slots) = (config.ring.vnode_hash, config.ring.slots);
    move |id, j| {
        let i = u64::from(id.get());
        if policy.has_hook(Hook::VnodeHash) {
            if let HookOutcome::Value(s) = policy.vnode_hash(i, j, slots) {
                return s;
            }
        }
        f.vnode_slot(i, j, slots)
    }
}

/// `recovery_delay · 2^(streak-1)`, capped.
pub fn backoff(base: Duration, cap: Duration, streak: u32) -> Duration {
    let factor = 1u32
        .checked_shl(streak.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// Shared hostname rules of `/add` and `/rm`: valid names, no duplicates.
fn check_names(hostnames: &[String]) -> Result<(), GatewayError> {
    if let Some(h) = hostnames.iter().find(|h| !is_valid_hostname(h)) {
        return Err(GatewayError::BadRequest(format!(
            "Hostname '{h}' is not a valid container name: use [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}}"
        )));
    }
    let mut seen = HashSet::new();
    if let Some(h) = hostnames.iter().find(|h| !seen.insert(h.as_str())) {
        return Err(GatewayError::BadRequest(format!(
            "Hostname '{h}' appears more than once"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (b, cap) = (Duration::from_secs(2), Duration::from_secs(60));
        assert_eq!(backoff(b, cap, 1), Duration::from_secs(2));
        assert_eq!(backoff(b, cap, 2), Duration::from_secs(4));
        assert_eq!(backoff(b, cap, 3), Duration::from_secs(8));
        assert_eq!(backoff(b, cap, 6), Duration::from_secs(60));
        assert_eq!(backoff(b, cap, 1000), Duration::from_secs(60));
        assert_eq!(backoff(b, cap, 0), Duration::from_secs(2));
    }

    #[test]
    fn hostname_rules() {
        assert!(check_names(&["a".into(), "b".into()]).is_ok());
        let e = check_names(&["a".into(), "a".into()]).expect_err("dup");
        assert!(e.to_string().contains("more than once"));
        let e = check_names(&["bad name".into()]).expect_err("invalid");
        assert!(e.to_string().contains("not a valid container name"));
    }
}
