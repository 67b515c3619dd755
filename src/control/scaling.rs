//! Scaling: the membership plans of `/add`, `/rm` and `replicas.count` carried out.
//!
//! Owns: `/add` as one unit (its replicas are placed at once, so their slots are decided when
//! they are created, and start in the `Joining` phase, which the owner table skips; the call
//! commits, routing to them all, only once every one answers, and rolls back whole, stopping them
//! all, if any fails), `/rm` (off the ring at once, drained, then stopped) and growing or
//! shrinking to a count. The membership authority (`authority`) decides each step and answers
//! with effects; this module carries them out (`execute`), so a refused call
//! changes nothing. It also carries out the autoscaler's decisions (`autoscale`, `shrink`).
//! Must not touch: how one replica starts or dies (`lifecycle`), the decisions themselves.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::agree;
use super::authority::{Ctx, Effect, RecordStep};
use super::autoscale::Direction;
use super::error::StartFailure;
use super::handle::Internal;
use super::handle::{Reply, Scaled};
use super::membership::{Limits, Membership, OpId, Phase, ScaleRequest};
use super::shrink::{least_loaded, Load};
use super::Controller;
use crate::control::error::ControlError;
use crate::ring::ServerId;

/// What the membership authority decides from: the membership, the config's limits, the
/// autoscaler's bounds for an operator's call (`bounded`), and the id a new `/add` gets. Built
/// from the controller's fields one by one, so the authority (another field) can be borrowed
/// mutably beside it.
fn ctx<'a>(
    config: &'a crate::config::Config,
    membership: &'a Membership,
    cannot_start: Option<&'static str>,
    bounded: bool,
    op: OpId,
) -> Ctx<'a> {
    let a = &config.autoscale;
    Ctx {
        membership,
        limits: Limits {
            max_replicas: config.replicas.max_replicas,
            name_prefix: &config.replicas.name_prefix,
            cannot_start,
        },
        autoscale: (bounded && a.enabled).then_some((a.min, a.max)),
        op,
    }
}

impl Controller {
    /// `None` when the provider starts replicas; else its name (the `static` provider).
    fn cannot_start(&self) -> Option<&'static str> {
        (!self.mode.starts_replicas()).then(|| self.provider.kind())
    }

    pub(super) fn add(&mut self, request: ScaleRequest, reply: Reply<Scaled>) {
        let op = self.next_op;
        self.next_op += 1;
        let cannot_start = self.cannot_start();
        let at = ctx(&self.config, &self.membership, cannot_start, true, op);
        let effects = self.authority.add(&at, request, reply);
        self.execute(effects);
    }

    /// `count` new members with generated names, placed at once and started (start-up,
    /// `replicas.count` edits, the autoscaler; `/add` instead commits its replicas only once
    /// they all answer).
    pub(super) fn grow(&mut self, count: usize) {
        let cannot_start = self.cannot_start();
        let at = ctx(&self.config, &self.membership, cannot_start, false, 0);
        let effects = self.authority.grow(&at, count);
        self.execute(effects);
    }

    /// Commits `/add` `op` once all its replicas are up.
    pub(super) fn maybe_commit_add(&mut self, op: OpId) {
        let ids = self.membership.joining(op);
        let all_up = ids.iter().all(|id| {
            self.replicas
                .get(id)
                .is_some_and(|r| r.tracker.state.routable())
        });
        if !all_up {
            return;
        }
        let Some(reply) = self.add_ops.remove(&op) else {
            return;
        };
        let effects = self.authority.commit(op, ids, reply);
        self.execute(effects);
    }

    /// Rolls `/add` `op` back whole because `replica` failed: every replica it started is
    /// forgotten and stopped, then the caller gets the failure.
    pub(super) fn fail_add(&mut self, op: OpId, replica: String, cause: StartFailure) {
        let Some(reply) = self.add_ops.remove(&op) else {
            return;
        };
        let error = ControlError::AddFailed { replica, cause };
        tracing::warn!(op, error = %error, "rolling back /add");
        let ids = self.membership.joining(op);
        let effects = self.authority.roll_back(op, ids, error, reply);
        self.execute(effects);
    }

    pub(super) fn remove(&mut self, request: ScaleRequest, reply: Reply<Scaled>) {
        let cannot_start = self.cannot_start();
        let at = ctx(&self.config, &self.membership, cannot_start, true, 0);
        let effects = self.authority.remove(&at, request, reply);
        self.execute(effects);
    }

    /// Carries out what the membership authority decided, in order.
    fn execute(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Start { replicas, phase } => {
                    if let Phase::Joining(op) = phase {
                        let names: Vec<&str> = replicas.iter().map(|(_, n)| n.as_str()).collect();
                        tracing::info!(op, replicas = ?names, "adding replicas");
                    }
                    for (id, name) in replicas {
                        // Placed now, so its slots are known when it is created (providers
                        // record them with it); the owner table skips a joining one until its
                        // call commits.
                        self.insert_replica(id, name, phase);
                        self.place(id);
                        self.start_instance(id);
                    }
                }
                Effect::AwaitCommit { op, reply } => {
                    self.add_ops.insert(op, reply);
                }
                Effect::Commit { op, ids, reply } => self.commit_add(op, ids, reply),
                Effect::Discard { ids, error, reply } => {
                    let names: Vec<String> =
                        ids.into_iter().filter_map(|id| self.forget(id)).collect();
                    let provider = self.provider.clone();
                    tokio::spawn(async move {
                        futures_util::future::join_all(names.iter().map(|n| provider.remove(n)))
                            .await;
                        let _ = reply.send(Err(error));
                    });
                }
                Effect::Drain { ids, reply } => self.drain_and_stop(ids, reply),
                Effect::OperatorScaled(n) => self.operator_scaled(n),
                Effect::Reply(reply, result) => {
                    let _ = reply.send(result);
                }
                Effect::Record(step) => match step {
                    RecordStep::Add { request, reply } => self.shared_add(request, reply),
                    RecordStep::Grow { target } => self.shared_grow(target),
                    RecordStep::Remove { request, reply } => self.shared_remove(request, reply),
                    RecordStep::Commit { op, ids, reply } => self.shared_commit(op, ids, reply),
                    RecordStep::RollBack {
                        op,
                        ids,
                        error,
                        reply,
                    } => {
                        self.op_done(op);
                        self.roll_back(ids, error, reply);
                    }
                    RecordStep::Forget {
                        ids,
                        removed,
                        reply,
                    } => self.shared_forget(ids, removed, reply),
                },
            }
        }
    }

    /// `/add` `op`'s replicas all serve: members now, ramping up, and the caller answered.
    fn commit_add(&mut self, op: OpId, ids: Vec<ServerId>, reply: Reply<Scaled>) {
        for &id in &ids {
            self.membership.set_phase(id, Phase::Member);
        }
        for &id in &ids {
            self.start_ramp(id);
        }
        self.publish();
        tracing::info!(op, n = ids.len(), "replicas added");
        let added = self.names_of(&ids);
        let _ = reply.send(Ok(Scaled {
            members: self.membership.member_names(),
            changed: added,
        }));
    }

    /// Takes `ids` off the ring now, lets their in-flight requests finish (up to
    /// `proxy.drain_timeout`), stops them, then answers `reply` with the new membership.
    pub(super) fn drain_and_stop(&mut self, ids: Vec<ServerId>, reply: Reply<Scaled>) {
        let drain_timeout = self.config.proxy.drain_timeout;
        let mut draining = Vec::new();
        for &id in &ids {
            self.placement.remove(id);
            self.membership.set_phase(id, Phase::Leaving);
            let name = self.membership.name(id).unwrap_or_default().to_owned();
            if let Some(r) = self.replicas.get_mut(&id) {
                r.probe = None;
                r.next_restart = None;
                // A roll's replacement stops with it (`remove` stops every instance of the
                // hostname).
                r.successor = None;
                tracing::info!(replica = %name, id = %id, "draining replica");
                draining.push((name, r.stats.clone()));
            }
        }
        self.publish();
        let provider = self.provider.clone();
        let tx = self.channels.internal_tx.clone();
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
            let _ = tx.send(Internal::Removed { ids, reply });
        });
    }

    pub(super) fn on_removed(&mut self, ids: Vec<ServerId>, reply: Reply<Scaled>) {
        let mut removed = Vec::new();
        for &id in &ids {
            if let Some(name) = self.forget(id) {
                tracing::info!(replica = %name, id = %id, "replica removed");
                removed.push(name);
            }
        }
        self.publish();
        let members = self.membership.member_names();
        let effects = self.authority.removed(ids, removed, members, reply);
        self.execute(effects);
    }

    /// The names of `ids`, in that order (ids without a name left out).
    pub(super) fn names_of(&self, ids: &[ServerId]) -> Vec<String> {
        ids.iter()
            .filter_map(|&id| self.membership.name(id).map(str::to_owned))
            .collect()
    }

    /// Adds or removes members until N = `n` (a `replicas.count` edit).
    pub(super) fn scale_to(&mut self, n: u32) {
        if !self.mode.starts_replicas() {
            return;
        }
        let have = self.membership.desired();
        let n = n as usize;
        self.operator_scaled(n);
        if n > have {
            let room =
                (self.config.replicas.max_replicas as usize).saturating_sub(self.membership.len());
            let add = (n - have).min(room);
            tracing::info!(from = have, to = have + add, "scaling up to replicas.count");
            self.grow(add);
            self.publish();
        } else if n < have {
            tracing::info!(from = have, to = n, "scaling down to replicas.count");
            let request = ScaleRequest {
                n: u32::try_from(have - n).unwrap_or(u32::MAX),
                hostnames: Vec::new(),
            };
            let (reply, _) = oneshot::channel();
            let cannot_start = self.cannot_start();
            let at = ctx(&self.config, &self.membership, cannot_start, false, 0);
            let effects = self.authority.remove(&at, request, reply);
            self.execute(effects);
        }
    }

    /// An operator (`/add`, `/rm`, a `replicas.count` edit) set N to `n`: the autoscaler goes
    /// on from it.
    pub(super) fn operator_scaled(&mut self, n: usize) {
        if self.config.autoscale.enabled {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            self.autoscaler.set_by_operator(Instant::now(), n);
        }
    }

    /// Once a tick while `[autoscale]` is on: samples the load, asks the autoscaler and carries
    /// its decision out; on a shared ring its decision is this gateway's proposal, and what is
    /// carried out is the N the gateways agree on ([`Self::agree_on`]).
    pub(super) fn autoscale_tick(&mut self, now: Instant) {
        if !self.autoscales() {
            self.metrics.autoscale_desired.store(0, Ordering::Relaxed);
            return;
        }
        let config = self.config.clone();
        let cfg = &config.autoscale;
        let n = u32::try_from(self.membership.member_ids().len()).unwrap_or(u32::MAX);
        // Requests in progress at a replica, those queued for a place at one
        // (`proxy.max_requests_per_replica`) and those held while N is 0: all are load a
        // replica more would take.
        let (in_flight, answered) = self.replicas.values().fold(
            (u64::from(self.holds.now()), 0u64),
            |(load, answered), r| {
                let s = &r.stats;
                (
                    load + u64::try_from(s.in_flight.load(Ordering::Relaxed)).unwrap_or(0)
                        + u64::from(s.queued.load(Ordering::Relaxed)),
                    answered + s.answers().iter().sum::<u64>(),
                )
            },
        );
        self.autoscaler.observe(now, in_flight, answered, n, cfg);
        let answered = self
            .membership
            .member_ids()
            .iter()
            .filter_map(|&id| Some((id, self.replicas.get(&id)?.stats.answers().iter().sum())))
            .collect();
        self.recent_load.observe(now, cfg.stable_window, answered);
        self.autoscale_decide(now);
    }

    /// Whether the autoscaler decides N (or, on a shared ring, proposes it): `[autoscale]` on,
    /// replicas the gateways start.
    fn autoscales(&self) -> bool {
        self.config.autoscale.enabled && self.mode.starts_replicas()
    }

    /// A request is held at N = 0 (`Command::Wake`): the autoscaler decides at once rather
    /// than at the next tick, and brings N back to at least 1.
    pub(super) fn wake(&mut self) {
        if !self.autoscales() || !self.zeroed || self.membership.desired() > 0 {
            return;
        }
        let now = Instant::now();
        self.autoscaler.wake(now);
        tracing::info!(
            held = self.holds.now(),
            "a request is held at zero replicas: waking up"
        );
        self.autoscale_decide(now);
    }

    /// Asks the autoscaler for a decision now and carries it out.
    fn autoscale_decide(&mut self, now: Instant) {
        let config = self.config.clone();
        let cfg = &config.autoscale;
        if self.authority.is_shared() {
            // N is what the record keeps: members and reservations, not removals (so a grow
            // under way does not read it short).
            let kept = self
                .membership
                .all()
                .filter(|(_, e)| e.phase != Phase::Leaving)
                .count();
            let n = u32::try_from(kept).unwrap_or(u32::MAX);
            let d = self.autoscaler.decide(now, n, cfg);
            self.agree_on(d);
            return;
        }
        // An /add not committed yet: its replicas are not members, so N would be read short.
        if !self.add_ops.is_empty() {
            return;
        }
        let n = u32::try_from(self.membership.member_ids().len()).unwrap_or(u32::MAX);
        let d = self.autoscaler.decide(now, n, cfg);
        self.metrics
            .autoscale_desired
            .store(u64::from(d.to), Ordering::Relaxed);
        // Replicas still draining count against replicas.max_replicas: an up decision waits
        // for them silently (it is made again each tick) rather than being logged each tick.
        let room = (config.replicas.max_replicas as usize).saturating_sub(self.membership.len());
        if d.direction == Direction::Hold || (d.direction == Direction::Up && room == 0) {
            return;
        }
        tracing::info!(
            direction = ?d.direction,
            from = d.from,
            to = d.to,
            wanted = d.wanted,
            stable_in_flight = d.stable_in_flight,
            panic_in_flight = d.panic_in_flight,
            panicking = d.panicking,
            target_in_flight = cfg.target_in_flight,
            "autoscale decision"
        );
        match d.direction {
            Direction::Up => {
                self.metrics.autoscale_up.fetch_add(1, Ordering::Relaxed);
                self.grow(((d.to - d.from) as usize).min(room));
                self.publish();
            }
            Direction::Down => {
                self.metrics.autoscale_down.fetch_add(1, Ordering::Relaxed);
                let ids = self.least_loaded_members((d.from - d.to) as usize);
                if d.to == 0 {
                    // Scale to zero: no next owner to hand keys to, so no slow stop; from
                    // now on a request waits for a replica instead of getting a 503.
                    tracing::info!(
                        idle_to_zero_ms = cfg.idle_to_zero.as_millis() as u64,
                        "no request for idle_to_zero: scaling to zero"
                    );
                    self.zeroed = true;
                    let (reply, _) = oneshot::channel();
                    self.drain_and_stop(ids, reply);
                } else if config.health.slow_start.is_zero() {
                    let (reply, _) = oneshot::channel();
                    self.drain_and_stop(ids, reply);
                } else {
                    self.retire(ids, now);
                }
            }
            Direction::Hold => {}
        }
    }

    /// On a shared ring: decision `d` is this gateway's proposal, written to the record when it
    /// changed (or is due for a refresh); the N carried out is the one the live proposals in
    /// the record agree on (`agree::agreed`: the largest), grown or shrunk to as a target. It
    /// acts only on a record that holds its own proposal as it is now, so no gateway moves N on
    /// an opinion the others cannot see yet, and only when nothing of an earlier move is under
    /// way.
    fn agree_on(&mut self, d: super::autoscale::Decision) {
        let Some(s) = self.authority.shared() else {
            return;
        };
        let now_ms = super::shared::unix_now_ms();
        let (me, proposing, shrinking) = (s.me.clone(), s.proposing, s.shrinking);
        let due = agree::due(&s.proposals, &me, d.to, now_ms);
        let agreed = agree::agreed(&s.proposals, now_ms, agree::PROPOSAL_TTL);
        let published = s.proposals.get(&me).is_some_and(|p| p.n == d.to);
        // Logged once when it moves, not at every refresh.
        if !published && !proposing {
            tracing::info!(
                proposal = d.to,
                from = d.from,
                wanted = d.wanted,
                stable_in_flight = d.stable_in_flight,
                panic_in_flight = d.panic_in_flight,
                panicking = d.panicking,
                "autoscale proposal"
            );
        }
        if due && !proposing {
            self.shared_propose(d.to);
        }
        let Some(agreed) = agreed else { return };
        self.metrics
            .autoscale_desired
            .store(u64::from(agreed), Ordering::Relaxed);
        if !published || self.authority.growing() || shrinking {
            return;
        }
        let agreed = agreed as usize;
        let kept = self
            .membership
            .all()
            .filter(|(_, e)| e.phase != Phase::Leaving)
            .count();
        let members = self.membership.desired();
        let room =
            (self.config.replicas.max_replicas as usize).saturating_sub(self.membership.len());
        if agreed > kept && room > 0 {
            tracing::info!(
                from = kept,
                to = agreed,
                "autoscale: the gateways agree on more replicas"
            );
            self.metrics.autoscale_up.fetch_add(1, Ordering::Relaxed);
            self.shared_grow(agreed);
        } else if agreed < members && kept == members {
            tracing::info!(
                from = members,
                to = agreed,
                "autoscale: every gateway agrees on fewer replicas"
            );
            self.metrics.autoscale_down.fetch_add(1, Ordering::Relaxed);
            let preference = self.least_loaded_members(members - agreed);
            self.shared_shrink(agreed, preference);
        }
    }

    /// A slow stop: `ids` leave the membership now (N falls, `/rep` no longer lists them) but
    /// stay on the ring, handing their keys to their next owners gradually over
    /// `health.slow_start` (in the stable per-key order a joining replica takes them), so the
    /// caches behind those owners warm up in order; then they drain and stop
    /// ([`Self::finish_retiring`]).
    fn retire(&mut self, ids: Vec<ServerId>, now: Instant) {
        for id in ids {
            self.membership.set_phase(id, Phase::Leaving);
            if let Some(r) = self.replicas.get_mut(&id) {
                r.retire_since = Some(now);
                r.ramp_since = None;
                r.next_restart = None;
            }
            tracing::info!(replica = ?self.membership.name(id), id = %id, over_ms = self.config.health.slow_start.as_millis() as u64, "handing its keys over before it stops");
        }
        self.publish();
    }

    /// Retiring replicas whose window has passed leave the ring, drain and stop.
    pub(super) fn finish_retiring(&mut self, now: Instant) {
        let window = self.config.health.slow_start;
        let done: Vec<ServerId> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.retire_since.is_some_and(|since| now >= since + window))
            .map(|(&id, _)| id)
            .collect();
        if done.is_empty() {
            return;
        }
        for id in &done {
            if let Some(r) = self.replicas.get_mut(id) {
                r.retire_since = None;
            }
        }
        let (reply, _) = oneshot::channel();
        self.drain_and_stop(done, reply);
    }

    /// The `n` members whose removal moves the least load, by what the gateway counted over
    /// the stable window; logged with the figures that chose them.
    fn least_loaded_members(&self, n: usize) -> Vec<ServerId> {
        let snap = self.shared.load();
        let mut slots: std::collections::HashMap<ServerId, u32> = Default::default();
        for slot in 0..snap.ring.slots() {
            if let Some(owner) = snap.ring.owner(slot) {
                *slots.entry(owner).or_default() += 1;
            }
        }
        let loads: Vec<Load> = self
            .membership
            .member_ids()
            .into_iter()
            .map(|id| Load {
                id,
                recent: self.recent_load.recent(id),
                in_flight: self.replicas.get(&id).map_or(0, |r| {
                    u64::try_from(r.stats.in_flight.load(Ordering::Relaxed)).unwrap_or(0)
                }),
                slots: slots.get(&id).copied().unwrap_or(0),
            })
            .collect();
        let chosen = least_loaded(&loads, n);
        for l in loads.iter().filter(|l| chosen.contains(&l.id)) {
            tracing::info!(
                replica = ?self.membership.name(l.id),
                id = %l.id,
                recent_requests = l.recent,
                in_flight = l.in_flight,
                slots = l.slots,
                "autoscale removes the least loaded replica"
            );
        }
        chosen
    }
}
