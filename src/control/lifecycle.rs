//! Replica lifecycle: one replica's runs, from start to exit, and its replacement.
//!
//! Owns: [`Replica`] (what the controller knows about one replica's current run: its tracker,
//! instance, incarnation, check task, counters, back-off), starting an incarnation, attaching
//! its checks, replacing a dead one with exponential back-off (same hostname and id, so the
//! same ring positions), and the provider's exit events. The back-off rules are pure functions
//! ([`backoff`], [`next_crash_streak`]) tested below.
//! Must not touch: membership decisions (`scaling`) or health verdicts (`probes`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::error::StartFailure;
use super::handle::Internal;
use super::membership::Phase;
use super::Controller;
use crate::health::probe::{Check, ProbeTarget, ProbeTask};
use crate::health::{describe_probe, HealthState, ProbeOutcome, Tracker, START_PROBE_PERIOD};
use crate::provider::{Instance, ProviderEvent, ReplicaSpec};
use crate::ring::ServerId;
use crate::snapshot::ReplicaStats;

/// A replica that ran this long before dying starts a fresh back-off.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The controller's record of one replica's current run.
pub(super) struct Replica {
    pub tracker: Tracker,
    pub instance: Option<Instance>,
    /// Bumped on every start; reports about an older incarnation are stale.
    pub incarnation: u64,
    pub stats: Arc<ReplicaStats>,
    pub probe: Option<ProbeTask>,
    pub last_probe: Option<ProbeOutcome>,
    pub restarts: u32,
    /// Deaths in a row without a stable run: the back-off exponent.
    pub crash_streak: u32,
    pub up_since: Option<Instant>,
    pub next_restart: Option<Instant>,
    pub last_exit: Option<String>,
    /// When it last joined the ring, if it is to take its keys over gradually.
    pub ramp_since: Option<Instant>,
    /// When the autoscaler began to remove it, if it hands its keys over gradually first (a
    /// slow stop): it stays on the ring, off the membership, until `health.slow_start` passed.
    pub retire_since: Option<Instant>,
    /// Outlier ejections in a row (the back-off multiplier); reset by a clean window.
    pub ejections: u32,
    /// While ejected: until when (its checks bring it back after this).
    pub ejected_until: Option<Instant>,
    /// Answers and 5xx answers counted at the last outlier window.
    pub window_base: (u64, u64),
    /// The spec generation its serving instance was started from (a roll brings it to the
    /// controller's).
    pub spec_generation: u64,
    /// Its replacement while a roll replaces it.
    pub successor: Option<super::roll::Successor>,
}

impl Replica {
    fn new() -> Replica {
        Replica {
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
            ramp_since: None,
            retire_since: None,
            ejections: 0,
            ejected_until: None,
            window_base: (0, 0),
            spec_generation: 0,
            successor: None,
        }
    }
}

/// Every replica's current run, by id, and the incarnation counter: the state this module
/// owns. The controller reaches a run only through it.
pub(super) struct Replicas {
    runs: BTreeMap<ServerId, Replica>,
    next_incarnation: u64,
}

impl Replicas {
    pub fn new() -> Replicas {
        Replicas {
            runs: BTreeMap::new(),
            next_incarnation: 1,
        }
    }

    /// A fresh incarnation number: reports about an older one are stale.
    pub fn bump_incarnation(&mut self) -> u64 {
        let i = self.next_incarnation;
        self.next_incarnation += 1;
        i
    }

    pub fn get(&self, id: &ServerId) -> Option<&Replica> {
        self.runs.get(id)
    }

    pub fn get_mut(&mut self, id: &ServerId) -> Option<&mut Replica> {
        self.runs.get_mut(id)
    }

    fn insert(&mut self, id: ServerId, r: Replica) {
        self.runs.insert(id, r);
    }

    fn remove(&mut self, id: &ServerId) -> Option<Replica> {
        self.runs.remove(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ServerId, &Replica)> {
        self.runs.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ServerId, &mut Replica)> {
        self.runs.iter_mut()
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &ServerId> {
        self.runs.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &Replica> {
        self.runs.values()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Replica> {
        self.runs.values_mut()
    }
}

/// `recovery_delay · 2^(streak-1)`, capped.
pub fn backoff(base: Duration, cap: Duration, streak: u32) -> Duration {
    let factor = 1u32
        .checked_shl(streak.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// The back-off exponent after a death: a replica that ran for [`STABLE_AFTER`] starts afresh.
pub fn next_crash_streak(streak: u32, ran_for: Option<Duration>) -> u32 {
    if ran_for.is_some_and(|d| d >= STABLE_AFTER) {
        1
    } else {
        streak.saturating_add(1)
    }
}

impl Controller {
    pub(super) fn bump_incarnation(&mut self) -> u64 {
        self.replicas.bump_incarnation()
    }

    /// A new replica record in `phase` (membership and runtime together).
    pub(super) fn insert_replica(&mut self, id: ServerId, name: String, phase: Phase) {
        self.membership.insert(id, name, phase);
        let mut r = Replica::new();
        // What it will run when it starts (an adopted one is corrected from its record).
        r.spec_generation = self.spec_generation;
        self.replicas.insert(id, r);
    }

    /// Forgets replica `id` entirely, freeing its slots; returns its name.
    pub(super) fn forget(&mut self, id: ServerId) -> Option<String> {
        self.placement.remove(id);
        self.replicas.remove(&id);
        self.membership.remove(id).map(|e| e.name)
    }

    /// Starts a new incarnation of replica `id` (first start or replacement).
    pub(super) fn start_instance(&mut self, id: ServerId) {
        let incarnation = self.bump_incarnation();
        let Some(name) = self.membership.name(id).map(str::to_owned) else {
            return;
        };
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        r.incarnation = incarnation;
        r.tracker = Tracker::starting();
        r.instance = None;
        r.probe = None;
        r.next_restart = None;
        r.spec_generation = self.spec_generation;
        let spec = ReplicaSpec {
            id,
            hostname: name,
            slots: self.placement.positions(id),
            app: self.app.clone(),
            beside: false,
        };
        let provider = self.provider.clone();
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = provider.spawn(spec).await;
            let _ = tx.send(Internal::Spawned {
                id,
                incarnation,
                result,
            });
        });
        let tx = self.channels.internal_tx.clone();
        let timeout = self.config.provider.start_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Internal::StartTimeout { id, incarnation });
        });
    }

    /// Records a running instance and starts checking it.
    pub(super) fn attach(&mut self, id: ServerId, inst: Instance) {
        let timeout = self.config.health.timeout;
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        let target = ProbeTarget {
            id,
            incarnation: r.incarnation,
            addr: inst.addr,
            period: START_PROBE_PERIOD,
            timeout,
        };
        r.probe = Some(ProbeTask::start(
            target,
            Arc::new(Check::of(&self.config.health)),
            self.prober.clone(),
            self.channels.probe_tx.clone(),
        ));
        r.instance = Some(inst);
    }

    /// Whether a report about `incarnation` of `id` is about its current run (and it is kept).
    fn is_current(&self, id: ServerId, incarnation: u64) -> bool {
        self.membership
            .phase(id)
            .is_some_and(|p| p != Phase::Leaving)
            && self
                .replicas
                .get(&id)
                .is_some_and(|r| r.incarnation == incarnation)
    }

    pub(super) fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Spawned {
                id,
                incarnation,
                result,
            } => {
                let current = self.is_current(id, incarnation);
                match result {
                    Ok(inst) if current => self.attach(id, inst),
                    // The engine's replica (its service outlives this start): nothing to stop.
                    Ok(_) if self.mode.restarts_replicas() => {}
                    Ok(inst) => {
                        // Removed or replaced while it was starting: stop what was started,
                        // and only that (a newer instance of the name may run by now).
                        let provider = self.provider.clone();
                        tokio::spawn(async move {
                            let _ = provider.retire(&inst).await;
                        });
                    }
                    Err(e) if current => {
                        self.on_start_failed(id, StartFailure::Provider(e.detail()))
                    }
                    Err(_) => {}
                }
            }
            Internal::StartTimeout { id, incarnation } => {
                let stuck = self.is_current(id, incarnation)
                    && self
                        .replicas
                        .get(&id)
                        .is_some_and(|r| r.tracker.state == HealthState::Starting);
                if stuck {
                    let last = self
                        .replicas
                        .get(&id)
                        .and_then(|r| r.last_probe.as_ref())
                        .map(describe_probe)
                        .unwrap_or_else(|| "none yet (it has no address)".to_owned());
                    let cause = StartFailure::NotReady {
                        check: self.check_description(),
                        timeout: self.config.provider.start_timeout,
                        last,
                    };
                    let instance = self.replicas.get(&id).and_then(|r| r.instance.clone());
                    self.start_failed(id, incarnation, cause, instance);
                }
            }
            Internal::StartFailed {
                id,
                incarnation,
                cause,
                output,
            } => {
                if self.is_current(id, incarnation) {
                    self.on_start_failed(id, cause.with_output(output));
                }
            }
            Internal::SuccessorSpawned {
                id,
                incarnation,
                result,
            } => self.on_successor_spawned(id, incarnation, result),
            Internal::SuccessorTimeout { id, incarnation } => {
                self.on_successor_timeout(id, incarnation)
            }
            Internal::Retired { id, since_swap } => self.on_retired(id, since_swap),
            Internal::RollOutput {
                target,
                replica,
                output,
            } => self.on_roll_output(target, replica, output),
            Internal::RespawnDue { id, incarnation } => {
                let due = self.is_current(id, incarnation)
                    && self
                        .replicas
                        .get(&id)
                        .is_some_and(|r| r.tracker.state == HealthState::Down);
                if due {
                    if let Some(r) = self.replicas.get_mut(&id) {
                        r.restarts += 1;
                        tracing::info!(replica = ?self.membership.name(id), id = %id, restarts = r.restarts, "starting replacement");
                    }
                    self.metrics.respawns.fetch_add(1, Ordering::Relaxed);
                    self.start_instance(id);
                }
            }
            Internal::Removed { ids, reply } => self.on_removed(ids, reply),
            Internal::Reserved { op, result, reply } => self.on_reserved(op, result, reply),
            Internal::Committed {
                op,
                ids,
                result,
                reply,
            } => self.on_committed(op, ids, result, reply),
            Internal::RemovalPlanned { result, reply } => self.on_removal_planned(result, reply),
            Internal::RecordWritten { record } => self.apply_record(record),
            Internal::Proposed { result } => self.on_proposed(result),
            Internal::Shrunk { result } => self.on_shrunk(result),
            Internal::CleanedUp { id, record } => {
                if let Some(s) = self.authority.shared_mut() {
                    s.cleaning.remove(&id);
                }
                if let Some(record) = record {
                    self.apply_record(record);
                }
            }
            Internal::UpstreamClientBuilt { edit, plan, result } => {
                self.on_upstream_client(edit, *plan, result)
            }
        }
    }

    /// A start failed: with the instance's last output when it has an instance to ask about
    /// (fetched off the loop, then reported as [`Internal::StartFailed`]).
    fn start_failed(
        &mut self,
        id: ServerId,
        incarnation: u64,
        cause: StartFailure,
        instance: Option<Instance>,
    ) {
        let Some(inst) = instance else {
            return self.on_start_failed(id, cause);
        };
        let provider = self.provider.clone();
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let output = provider.recent_output(&inst).await;
            let _ = tx.send(Internal::StartFailed {
                id,
                incarnation,
                cause,
                output,
            });
        });
    }

    /// A start failed (provider error, exit before answering, start timeout).
    fn on_start_failed(&mut self, id: ServerId, cause: StartFailure) {
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        tracing::warn!(replica = %name, id = %id, reason = %cause, "replica failed to start");
        if let Some(r) = self.replicas.get_mut(&id) {
            r.last_exit = Some(cause.to_string());
        }
        match self.membership.phase(id) {
            Some(Phase::Joining(op)) => self.fail_add(op, name, cause),
            _ => {
                self.replace(id);
                self.notify_ready();
            }
        }
    }

    /// Takes replica `id` out and schedules its replacement with back-off.
    pub(super) fn replace(&mut self, id: ServerId) {
        let (recovery, cap) = (
            self.config.health.recovery_delay,
            self.config.health.max_backoff,
        );
        let manages = self.mode.starts_replicas() && !self.mode.restarts_replicas();
        let incarnation = self.bump_incarnation();
        let Some(name) = self.membership.name(id).map(str::to_owned) else {
            return;
        };
        // A roll's replacement goes too: the replacement started below runs the current
        // spec anyway.
        self.drop_successor(id);
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        r.tracker.state = HealthState::Down;
        if !manages {
            // Not ours to restart (static; swarm, whose restart policy does it and reports the
            // new task): keep checking what runs; `rise` good checks bring it back.
            return;
        }
        r.probe = None;
        let now = Instant::now();
        r.crash_streak = next_crash_streak(r.crash_streak, r.up_since.map(|t| now - t));
        let delay = backoff(recovery, cap, r.crash_streak);
        r.up_since = None;
        r.incarnation = incarnation;
        r.next_restart = Some(now + delay);
        let old = r.instance.take();
        tracing::info!(replica = %name, id = %id, delay_ms = delay.as_millis() as u64, crash_streak = r.crash_streak, "replacement scheduled");
        let provider = self.provider.clone();
        let tx = self.channels.internal_tx.clone();
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

    /// The provider saw an instance exit: out of the ring at once, replaced after back-off.
    pub(super) fn on_provider_event(&mut self, event: ProviderEvent) {
        let (hostname, instance_id, detail) = match event {
            ProviderEvent::Exited {
                hostname,
                instance_id,
                detail,
            } => (hostname, instance_id, detail),
            ProviderEvent::Running { instance } => return self.on_running(instance),
            ProviderEvent::Ring(record) => return self.apply_record(record),
            ProviderEvent::Engine { reachable, detail } => {
                return self.on_engine(reachable, detail)
            }
        };
        if let Some(s) = self.authority.shared_mut() {
            if s.tasks
                .get(&hostname)
                .is_some_and(|i| i.instance_id == instance_id)
            {
                s.tasks.remove(&hostname);
            }
        }
        if self.on_successor_exit(&hostname, &instance_id, &detail) {
            return;
        }
        let Some(id) = self.membership.id_of(&hostname) else {
            return;
        };
        let phase = self.membership.phase(id);
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        let ours = r
            .instance
            .as_ref()
            .is_some_and(|i| i.instance_id == instance_id);
        if ours && r.retire_since.take().is_some() {
            // A retiring replica that dies hands the keys it still has over at once.
            tracing::warn!(replica = %hostname, id = %id, detail = %detail, "retiring replica exited");
            let (reply, _) = tokio::sync::oneshot::channel();
            return self.drain_and_stop(vec![id], reply);
        }
        if !ours || phase == Some(Phase::Leaving) {
            return;
        }
        let was = r.tracker.state;
        tracing::warn!(replica = %hostname, id = %id, detail = %detail, "replica exited");
        r.last_exit = Some(detail.clone());
        let exited = r.instance.take();
        if let Some(Phase::Joining(_)) = phase {
            // A container's log outlives it: its last lines go with the error.
            let incarnation = r.incarnation;
            self.start_failed(id, incarnation, StartFailure::Exited(detail), exited);
            return;
        }
        if was.routable() {
            self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        }
        self.replace(id);
        self.publish();
    }
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
    fn a_stable_run_resets_the_streak() {
        assert_eq!(next_crash_streak(0, None), 1);
        assert_eq!(next_crash_streak(3, None), 4, "died before it was ever up");
        assert_eq!(next_crash_streak(3, Some(Duration::from_secs(5))), 4);
        assert_eq!(next_crash_streak(3, Some(STABLE_AFTER)), 1);
        assert_eq!(next_crash_streak(u32::MAX, None), u32::MAX);
    }
}
