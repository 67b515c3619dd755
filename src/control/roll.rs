//! Rolling replicas in place: a new replica spec (a live edit of `[provider]`, or
//! `POST /lb/roll` for the same spec) replaces every replica's instance, `roll_batch` at a
//! time, without a key ever visiting a neighbour.
//!
//! Owns: the [`Roll`] (target spec generation, what was rolled, why it stopped), each replica's
//! [`Successor`] (the replacement instance started beside the serving one, with the same
//! hostname, id and slots, checked like a new replica), the swap (the successor becomes the
//! replica's instance in one publish once `rise` checks pass; the old one is drained, then
//! retired by the provider), and [`next_batch`], the pure choice of what to roll next. A
//! replacement that fails (does not start, exits, does not pass its checks within
//! `provider.start_timeout`) stops the roll: the replicas not rolled keep serving as they
//! were, and `/lb/status` and the log say which replica failed and why.
//! Must not touch: membership (a roll never adds or removes a replica) or placement (the
//! successor takes the replica's slots as they are).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use super::error::{RollError, StartFailure};
use super::handle::Internal;
use super::membership::Phase;
use super::Controller;
use crate::health::probe::{Check, ProbeReport, ProbeTarget, ProbeTask};
use crate::health::{describe_probe, probe_period, START_PROBE_PERIOD};
use crate::health::{HealthState, ProbeOutcome, Tracker, Transition};
use crate::provider::{Instance, ReplicaSpec};
use crate::ring::ServerId;
use crate::snapshot::{ReplicaStats, Totals};

/// A replica's replacement during a roll.
pub(super) struct Successor {
    pub incarnation: u64,
    /// The spec generation it runs.
    pub generation: u64,
    pub instance: Option<Instance>,
    pub tracker: Tracker,
    pub probe: Option<ProbeTask>,
    pub last_probe: Option<ProbeOutcome>,
    pub started: Instant,
}

/// Why a roll stopped.
#[derive(Debug, Clone, Serialize)]
pub(super) struct RollStop {
    pub replica: String,
    pub cause: String,
    /// The replacement's last lines of output, once the provider gave them.
    pub output: Vec<String>,
}

/// A roll: the replicas are brought to spec generation `target`.
pub(super) struct Roll {
    pub target: u64,
    pub reason: String,
    pub started: Instant,
    pub started_at: SystemTime,
    /// The replicas rolled so far, in order.
    pub rolled: Vec<String>,
    /// How long it ran, once every replica runs the target or it stopped.
    pub finished: Option<Duration>,
    pub stopped: Option<RollStop>,
}

impl Roll {
    fn running(&self) -> bool {
        self.finished.is_none() && self.stopped.is_none()
    }
}

/// The status of the last roll, for `/lb/status`.
#[derive(Serialize)]
pub(super) struct RollStatus<'a> {
    /// `rolling`, `done` or `stopped`.
    state: &'static str,
    reason: &'a str,
    generation: u64,
    started_ms: u64,
    elapsed_ms: u64,
    rolled: &'a [String],
    /// Replicas whose replacement is starting now.
    replacing: Vec<String>,
    /// Replicas still to roll (not counting those being replaced).
    pending: Vec<String>,
    stopped: Option<&'a RollStop>,
}

/// One member as the roll sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: ServerId,
    /// The spec generation its serving instance runs.
    pub generation: u64,
    /// In the ring now (a replica that is down or starting is left to its replacement, which
    /// starts from the current spec anyway).
    pub routable: bool,
    /// Its replacement is starting.
    pub replacing: bool,
}

/// The replicas to start replacements for now: those behind `target` and serving, in id
/// order, so that at most `batch` are being replaced at once.
pub fn next_batch(candidates: &[Candidate], target: u64, batch: usize) -> Vec<ServerId> {
    let busy = candidates.iter().filter(|c| c.replacing).count();
    let mut ids: Vec<ServerId> = candidates
        .iter()
        .filter(|c| c.generation < target && c.routable && !c.replacing)
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids.truncate(batch.saturating_sub(busy));
    ids
}

/// Whether the roll to `target` is over: every member runs it and none is being replaced.
pub fn complete(candidates: &[Candidate], target: u64) -> bool {
    candidates
        .iter()
        .all(|c| c.generation >= target && !c.replacing)
}

/// A short grace before a drained instance's in-flight count is trusted: a request that
/// loaded the snapshot just before the swap may not have counted itself yet.
const DRAIN_GRACE: Duration = Duration::from_millis(50);

impl Controller {
    fn candidates(&self) -> Vec<Candidate> {
        self.membership
            .members()
            .filter_map(|(id, _)| {
                let r = self.replicas.get(&id)?;
                Some(Candidate {
                    id,
                    generation: r.spec_generation,
                    routable: r.tracker.state.routable() && r.instance.is_some(),
                    replacing: r.successor.is_some(),
                })
            })
            .collect()
    }

    /// Whether this provider can run a replacement beside a replica (local processes and
    /// containers; Swarm restarts its tasks itself).
    fn rolls_in_place(&self) -> Result<(), RollError> {
        if !self.mode.starts_replicas() {
            return Err(RollError::NotManaged(self.provider.kind()));
        }
        if self.mode.restarts_replicas() {
            return Err(RollError::Unsupported(self.provider.kind()));
        }
        Ok(())
    }

    /// `POST /lb/roll`: every replica gets a new instance of the same spec (a new image under
    /// the same tag, a configuration file it reads at start).
    pub(super) fn roll_requested(&mut self) -> Result<serde_json::Value, RollError> {
        self.rolls_in_place()?;
        if let Some(roll) = self.roll.as_ref().filter(|r| r.running()) {
            return Err(RollError::InProgress {
                done: roll.rolled.len(),
                total: self.membership.desired(),
            });
        }
        self.spec_generation += 1;
        self.begin_roll("POST /lb/roll".to_owned());
        Ok(serde_json::json!({
            "roll": self.roll_status(),
        }))
    }

    /// Starts rolling to the current spec generation; a roll still running is superseded
    /// (replacements started for an older spec are stopped and started again from this one).
    pub(super) fn begin_roll(&mut self, reason: String) {
        if let Err(e) = self.rolls_in_place() {
            if matches!(e, RollError::NotManaged(_)) {
                return;
            }
            // Said where an operator looks: the log and `/lb/status`.
            tracing::warn!(reason = %reason, error = %e, "replicas are not rolled");
            self.roll = Some(Roll {
                target: self.spec_generation,
                reason,
                started: Instant::now(),
                started_at: SystemTime::now(),
                rolled: Vec::new(),
                finished: None,
                stopped: Some(RollStop {
                    replica: String::new(),
                    cause: e.to_string(),
                    output: Vec::new(),
                }),
            });
            return;
        }
        let target = self.spec_generation;
        let outdated: Vec<ServerId> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.successor.as_ref().is_some_and(|s| s.generation < target))
            .map(|(&id, _)| id)
            .collect();
        for id in outdated {
            self.drop_successor(id);
        }
        tracing::info!(reason = %reason, generation = target, batch = self.config.provider.roll_batch, "rolling the replicas in place");
        self.roll = Some(Roll {
            target,
            reason,
            started: Instant::now(),
            started_at: SystemTime::now(),
            rolled: Vec::new(),
            finished: None,
            stopped: None,
        });
        self.roll_step();
    }

    /// Starts the next replacements, or notes that the roll is done.
    pub(super) fn roll_step(&mut self) {
        let Some(roll) = self.roll.as_ref().filter(|r| r.running()) else {
            return;
        };
        let target = roll.target;
        let candidates = self.candidates();
        if complete(&candidates, target) {
            if let Some(roll) = self.roll.as_mut() {
                let took = roll.started.elapsed();
                roll.finished = Some(took);
                tracing::info!(
                    generation = target,
                    replicas = roll.rolled.len(),
                    took_ms = took.as_millis() as u64,
                    "roll done: every replica runs the current spec"
                );
            }
            return;
        }
        let batch = self.config.provider.roll_batch.max(1) as usize;
        for id in next_batch(&candidates, target, batch) {
            self.start_successor(id);
        }
    }

    /// Starts replica `id`'s replacement beside it.
    fn start_successor(&mut self, id: ServerId) {
        let incarnation = self.bump_incarnation();
        let generation = self.spec_generation;
        let Some(name) = self.membership.name(id).map(str::to_owned) else {
            return;
        };
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        r.successor = Some(Successor {
            incarnation,
            generation,
            instance: None,
            tracker: Tracker::starting(),
            probe: None,
            last_probe: None,
            started: Instant::now(),
        });
        tracing::info!(replica = %name, id = %id, generation, "rolling: starting its replacement beside it");
        let spec = ReplicaSpec {
            id,
            hostname: name,
            slots: self.placement.positions(id),
            app: self.app.clone(),
            beside: true,
        };
        let provider = self.provider.clone();
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = provider.spawn(spec).await;
            let _ = tx.send(Internal::SuccessorSpawned {
                id,
                incarnation,
                result,
            });
        });
        let tx = self.channels.internal_tx.clone();
        let timeout = self.config.provider.start_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Internal::SuccessorTimeout { id, incarnation });
        });
    }

    fn successor_mut(&mut self, id: ServerId, incarnation: u64) -> Option<&mut Successor> {
        self.replicas
            .get_mut(&id)?
            .successor
            .as_mut()
            .filter(|s| s.incarnation == incarnation)
    }

    pub(super) fn on_successor_spawned(
        &mut self,
        id: ServerId,
        incarnation: u64,
        result: Result<Instance, crate::provider::ProviderError>,
    ) {
        let timeout = self.config.health.timeout;
        let check = Arc::new(Check::of(&self.config.health));
        let (prober, probe_tx) = (self.prober.clone(), self.channels.probe_tx.clone());
        let Some(s) = self.successor_mut(id, incarnation) else {
            // Dropped meanwhile (the roll moved on, the replica was removed): stop it.
            if let Ok(inst) = result {
                let provider = self.provider.clone();
                tokio::spawn(async move {
                    let _ = provider.retire(&inst).await;
                });
            }
            return;
        };
        match result {
            Ok(inst) => {
                s.probe = Some(ProbeTask::start(
                    ProbeTarget {
                        id,
                        incarnation,
                        addr: inst.addr,
                        period: START_PROBE_PERIOD,
                        timeout,
                    },
                    check,
                    prober,
                    probe_tx,
                ));
                s.instance = Some(inst);
            }
            Err(e) => self.successor_failed(id, StartFailure::Provider(e.detail())),
        }
    }

    pub(super) fn on_successor_timeout(&mut self, id: ServerId, incarnation: u64) {
        let timeout = self.config.provider.start_timeout;
        let check = self.check_description();
        let Some(s) = self.successor_mut(id, incarnation) else {
            return;
        };
        if s.tracker.state != HealthState::Starting {
            return;
        }
        let last = s
            .last_probe
            .as_ref()
            .map(describe_probe)
            .unwrap_or_else(|| "none yet (it has no address)".to_owned());
        self.successor_failed(
            id,
            StartFailure::NotReady {
                check,
                timeout,
                last,
            },
        );
    }

    /// A check of replica `id`'s replacement; false when the report is not about one.
    pub(super) fn on_successor_probe(&mut self, report: &ProbeReport) -> bool {
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        let name = self
            .membership
            .name(report.id)
            .unwrap_or_default()
            .to_owned();
        let policy = self.policy.clone();
        let Some(s) = self.successor_mut(report.id, report.incarnation) else {
            return false;
        };
        s.last_probe = Some(report.outcome.clone());
        if report.outcome.inconclusive {
            return true;
        }
        let ok = super::probes::verdict(&policy, &name, &report.outcome);
        if s.tracker.on_probe(ok, rise, fall) == Transition::Up {
            self.swap_in(report.id);
        }
        true
    }

    /// The replacement of `id` passed `rise` checks: it becomes the replica's instance in one
    /// publish, and the old instance drains and is retired.
    fn swap_in(&mut self, id: ServerId) {
        let (interval, timeout) = (self.config.health.interval, self.config.health.timeout);
        let drain_timeout = self.config.proxy.drain_timeout;
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        let Some(s) = r.successor.take() else { return };
        let Some(new) = s.instance else { return };
        let waited = s.started.elapsed();
        let old = r.instance.replace(new);
        r.probe = s.probe;
        if let Some(p) = &r.probe {
            p.set_period(probe_period(HealthState::Up, interval), timeout);
        }
        r.incarnation = s.incarnation;
        r.tracker = s.tracker;
        r.last_probe = s.last_probe;
        r.spec_generation = s.generation;
        r.up_since = Some(Instant::now());
        r.last_exit = None;
        r.window_base = (0, 0);
        // The old instance finishes its requests on its own counters (the drain below waits
        // for them); the replica's counts carry on from where they were.
        let old_stats = std::mem::replace(&mut r.stats, Arc::new(ReplicaStats::default()));
        let at_swap = old_stats.totals();
        r.stats.add(&at_swap);
        tracing::info!(replica = %name, id = %id, generation = s.generation, ready_after_ms = waited.as_millis() as u64, "rolled: the replacement serves the replica's keys; draining the old instance");
        if let Some(roll) = self.roll.as_mut() {
            roll.rolled.push(name.clone());
        }
        self.start_ramp(id);
        self.publish();
        if let Some(old) = old {
            let provider = self.provider.clone();
            let tx = self.channels.internal_tx.clone();
            tokio::spawn(async move {
                drain(&old_stats, drain_timeout).await;
                if let Err(e) = provider.retire(&old).await {
                    tracing::warn!(replica = %old.hostname, error = %e, "cannot stop the rolled-out instance");
                }
                let _ = tx.send(Internal::Retired {
                    id,
                    since_swap: old_stats.totals().since(&at_swap),
                });
            });
        }
        self.roll_step();
    }

    /// The rolled-out instance of `id` is stopped: what it counted while draining joins the
    /// replica's counters.
    pub(super) fn on_retired(&mut self, id: ServerId, since_swap: Totals) {
        if let Some(r) = self.replicas.get(&id) {
            r.stats.add(&since_swap);
        }
    }

    /// The replacement of `id` failed: it is stopped, the roll stops, the replica keeps its
    /// serving instance.
    pub(super) fn successor_failed(&mut self, id: ServerId, cause: StartFailure) {
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        let Some(s) = self.replicas.get_mut(&id).and_then(|r| r.successor.take()) else {
            return;
        };
        let target = s.generation;
        tracing::error!(replica = %name, id = %id, cause = %cause, "roll stopped: the replacement did not become ready; the replicas not rolled keep serving as they were");
        if let Some(roll) = self.roll.as_mut().filter(|r| r.target == target) {
            roll.finished = Some(roll.started.elapsed());
            roll.stopped = Some(RollStop {
                replica: name.clone(),
                cause: cause.to_string(),
                output: Vec::new(),
            });
        }
        let Some(inst) = s.instance else { return };
        let provider = self.provider.clone();
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let output = provider.recent_output(&inst).await;
            if let Err(e) = provider.retire(&inst).await {
                tracing::warn!(replica = %inst.hostname, error = %e, "cannot stop the failed replacement");
            }
            let _ = tx.send(Internal::RollOutput {
                target,
                replica: inst.hostname.clone(),
                output,
            });
        });
    }

    /// The failed replacement's last lines of output, for the stopped roll's status and log.
    pub(super) fn on_roll_output(&mut self, target: u64, replica: String, output: Vec<String>) {
        if output.is_empty() {
            return;
        }
        tracing::warn!(replica = %replica, output = ?output, "the failed replacement's last output");
        if let Some(stop) = self
            .roll
            .as_mut()
            .filter(|r| r.target == target)
            .and_then(|r| r.stopped.as_mut())
            .filter(|s| s.replica == replica)
        {
            stop.output = output;
        }
    }

    /// Stops replica `id`'s replacement without a verdict on it (the replica died and is
    /// replaced anyway, or was removed, or a newer spec supersedes it).
    pub(super) fn drop_successor(&mut self, id: ServerId) {
        let Some(s) = self.replicas.get_mut(&id).and_then(|r| r.successor.take()) else {
            return;
        };
        if let Some(inst) = s.instance {
            let provider = self.provider.clone();
            tokio::spawn(async move {
                let _ = provider.retire(&inst).await;
            });
        }
    }

    /// The provider saw an instance exit: if it is a replacement, that fails it. False when
    /// it is not one.
    pub(super) fn on_successor_exit(
        &mut self,
        hostname: &str,
        instance_id: &str,
        detail: &str,
    ) -> bool {
        let Some(id) = self.membership.id_of(hostname) else {
            return false;
        };
        let is_successor = self
            .replicas
            .get(&id)
            .and_then(|r| r.successor.as_ref())
            .and_then(|s| s.instance.as_ref())
            .is_some_and(|i| i.instance_id == instance_id);
        if is_successor {
            if let Some(s) = self
                .replicas
                .get_mut(&id)
                .and_then(|r| r.successor.as_mut())
            {
                // Gone already: nothing to retire.
                s.instance = None;
            }
            self.successor_failed(id, StartFailure::Exited(detail.to_owned()));
        }
        is_successor
    }

    /// `GET <path>` as a start error names it.
    pub(super) fn check_description(&self) -> String {
        format!(
            "GET {} answering {}, {} in a row",
            self.config.health.path, self.config.health.expect_status, self.config.health.rise
        )
    }

    pub(super) fn roll_status(&self) -> Option<RollStatus<'_>> {
        let roll = self.roll.as_ref()?;
        let mut replacing = Vec::new();
        let mut pending = Vec::new();
        for (id, name) in self.membership.members() {
            let Some(r) = self.replicas.get(&id) else {
                continue;
            };
            if r.successor.is_some() {
                replacing.push(name.to_owned());
            } else if r.spec_generation < roll.target {
                pending.push(name.to_owned());
            }
        }
        let state = if roll.stopped.is_some() {
            "stopped"
        } else if roll.finished.is_some() {
            "done"
        } else {
            "rolling"
        };
        let elapsed = roll.finished.unwrap_or_else(|| roll.started.elapsed());
        Some(RollStatus {
            state,
            reason: &roll.reason,
            generation: roll.target,
            started_ms: roll
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            elapsed_ms: elapsed.as_millis() as u64,
            rolled: &roll.rolled,
            replacing,
            pending,
            stopped: roll.stopped.as_ref(),
        })
    }

    /// Members whose phase is `Member` and who run an older spec than the current one.
    pub(super) fn behind(&self) -> usize {
        self.membership
            .all()
            .filter(|(_, e)| e.phase == Phase::Member)
            .filter(|(id, _)| {
                self.replicas
                    .get(id)
                    .is_some_and(|r| r.spec_generation < self.spec_generation)
            })
            .count()
    }
}

/// Waits until no request is in progress on (or waiting for) the old instance, at most
/// `timeout`.
async fn drain(stats: &ReplicaStats, timeout: Duration) {
    tokio::time::sleep(DRAIN_GRACE).await;
    let deadline = Instant::now() + timeout;
    while (stats.in_flight.load(Ordering::Acquire) > 0 || stats.queued.load(Ordering::Acquire) > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u32, generation: u64, routable: bool, replacing: bool) -> Candidate {
        Candidate {
            id: ServerId::new(id).expect("id"),
            generation,
            routable,
            replacing,
        }
    }

    fn ids(v: &[ServerId]) -> Vec<u32> {
        v.iter().map(|i| i.get()).collect()
    }

    #[test]
    fn one_at_a_time_in_id_order() {
        let all = [
            c(3, 1, true, false),
            c(1, 1, true, false),
            c(2, 1, true, false),
        ];
        assert_eq!(ids(&next_batch(&all, 2, 1)), [1]);
        assert_eq!(ids(&next_batch(&all, 2, 2)), [1, 2]);
        assert_eq!(ids(&next_batch(&all, 2, 10)), [1, 2, 3]);
        assert!(!complete(&all, 2));
    }

    #[test]
    fn a_batch_counts_the_replacements_in_progress() {
        let all = [
            c(1, 2, true, false),
            c(2, 1, true, true),
            c(3, 1, true, false),
        ];
        assert!(
            next_batch(&all, 2, 1).is_empty(),
            "server 2 is being replaced"
        );
        assert_eq!(ids(&next_batch(&all, 2, 2)), [3]);
        assert!(!complete(&all, 2));
    }

    #[test]
    fn replicas_out_of_the_ring_are_left_to_their_replacement() {
        let all = [c(1, 1, false, false), c(2, 1, true, false)];
        assert_eq!(ids(&next_batch(&all, 2, 5)), [2]);
        let done = [c(1, 2, true, false), c(2, 3, true, false)];
        assert!(complete(&done, 2), "a newer spec counts as rolled");
        assert!(next_batch(&done, 2, 5).is_empty());
    }

    #[test]
    fn a_check_is_described_in_words() {
        let mut p = ProbeOutcome {
            ok: false,
            inconclusive: false,
            status: Some(503),
            latency_ms: 2.14,
            error: None,
            at: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(describe_probe(&p), "answered 503 after 2.1 ms");
        p.error = Some("status 503, expected 200".into());
        assert_eq!(describe_probe(&p), "answered 503 after 2.1 ms");
        p.status = None;
        p.error = Some("connection refused".into());
        assert_eq!(describe_probe(&p), "connection refused");
    }
}
