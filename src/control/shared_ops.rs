//! The controller's side of the shared ring: `/add`, `/rm` and `replicas.count` carried out
//! through the engine's ring record, and what the engine reports applied to this gateway.
//!
//! Owns: the shared variants of the scaling operations (reserve in the record, start, commit
//! in the record; mark leaving, drain, stop, forget in the record), every record edit run as
//! [`shared::update`] in a spawned task that reports back with an [`Internal`] message (the
//! loop never waits on the engine), applying an observed record ([`shared::reconcile`]'s
//! changes, in version order, a late observation ignored), the engine's running tasks, its
//! reachability, and cleaning up after gateways that died mid-call; with `[autoscale]` on,
//! writing this gateway's proposal and carrying out the N the gateways agree on (`agree`).
//! Growing to it and shrinking to it are targets, not steps, so every gateway may carry the
//! same agreement out and the record's optimistic writes make it happen once.
//! Must not touch: the pure decisions (`shared`) or one replica's runs (`lifecycle`).

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::oneshot;

use super::agree;
use super::handle::Internal;
use super::handle::{Reply, Scaled};
use super::membership::{Limits, OpId, Phase, ScaleRequest};
use super::shared::{self, Change, Cleanup, Reserved};
use super::Controller;
use crate::control::error::ControlError;
use crate::health::Tracker;
use crate::provider::{Instance, RingRecord, SharedRing};
use crate::ring::ServerId;
use crate::routing::Router;

/// What this gateway knows about the engine that holds the ring.
#[derive(Debug, Clone, Default)]
pub(super) struct EngineState {
    pub reachable: bool,
    pub since: Option<SystemTime>,
    pub detail: String,
}

impl Controller {
    fn ring(&self) -> Option<Arc<dyn SharedRing>> {
        self.authority.shared().map(|s| s.ring.clone())
    }

    /// Who this gateway is in the record (empty under the local authority, which never asks).
    fn me(&self) -> String {
        self.authority
            .shared()
            .map(|s| s.me.clone())
            .unwrap_or_default()
    }

    fn owned_limits(&self) -> (u32, String) {
        (
            self.config.replicas.max_replicas,
            self.config.replicas.name_prefix.clone(),
        )
    }

    /// `/add` through the record: reserve, then start (see [`Controller::on_reserved`]).
    pub(super) fn shared_add(&mut self, request: ScaleRequest, reply: Reply<Scaled>) {
        let Some(ring) = self.ring() else { return };
        let op = self.next_op;
        self.next_op += 1;
        let (config, policy, me) = (self.config.clone(), self.policy.clone(), self.me());
        let (max, prefix) = self.owned_limits();
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = shared::update(&*ring, |record| {
                let limits = Limits {
                    max_replicas: max,
                    name_prefix: &prefix,
                    cannot_start: None,
                };
                let router = Router::new(&config, &policy);
                shared::plan_add(record, &request, &limits, &router, &me, shared::unix_now())
            })
            .await;
            let _ = tx.send(Internal::Reserved { op, result, reply });
        });
    }

    /// Members and reservations up to `count` through the record (start-up, `replicas.count`).
    pub(super) fn shared_grow(&mut self, count: usize) {
        let Some(ring) = self.ring() else { return };
        let op = self.next_op;
        self.next_op += 1;
        if let Some(s) = self.authority.shared_mut() {
            s.grows.insert(op);
        }
        let (config, policy, me) = (self.config.clone(), self.policy.clone(), self.me());
        let (max, prefix) = self.owned_limits();
        let tx = self.channels.internal_tx.clone();
        // Nobody waits for a grow's answer; the outcome is logged.
        let (reply, _) = oneshot::channel();
        tokio::spawn(async move {
            let result = shared::update(&*ring, |record| {
                let router = Router::new(&config, &policy);
                let now = shared::unix_now();
                shared::plan_grow(record, count, &prefix, max as usize, &router, &me, now)
            })
            .await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, count, "cannot grow the shared ring to replicas.count");
            }
            let _ = tx.send(Internal::Reserved { op, result, reply });
        });
    }

    /// The record now holds `op`'s reservations: place them where they were reserved and
    /// start them; the call commits once every one answers.
    pub(super) fn on_reserved(
        &mut self,
        op: OpId,
        result: Result<(RingRecord, Reserved), ControlError>,
        reply: Reply<Scaled>,
    ) {
        let (record, reserved) = match result {
            Ok(r) => r,
            Err(e) => {
                self.op_done(op);
                let _ = reply.send(Err(e));
                return;
            }
        };
        self.apply_record(record);
        if reserved.is_empty() {
            self.op_done(op);
            let _ = reply.send(Ok(Scaled {
                members: self.membership.member_names(),
                changed: Vec::new(),
            }));
            return;
        }
        let names: Vec<&str> = reserved.iter().map(|(_, n, _)| n.as_str()).collect();
        tracing::info!(op, replicas = ?names, "reserved in the shared ring; starting them");
        for (id, name, slots) in reserved {
            if self.membership.get(id).is_some() {
                // Seen first as someone's reservation in a record that raced ahead: it is ours.
                self.forget(id);
            }
            self.insert_replica(id, name, Phase::Joining(op));
            if let Err(e) = self.placement.restore(id, &slots) {
                tracing::error!(id = %id, error = %e, "cannot place a reservation at its slots");
            }
            self.start_instance(id);
        }
        self.add_ops.insert(op, reply);
    }

    /// Commits `op` in the record once all its replicas answer.
    pub(super) fn shared_commit(&mut self, op: OpId, ids: Vec<ServerId>, reply: Reply<Scaled>) {
        let Some(ring) = self.ring() else { return };
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = shared::update(&*ring, |record| {
                Ok((shared::plan_commit(record, &ids)?, ()))
            })
            .await
            .map(|(record, ())| record);
            let _ = tx.send(Internal::Committed {
                op,
                ids,
                result,
                reply,
            });
        });
    }

    pub(super) fn on_committed(
        &mut self,
        op: OpId,
        ids: Vec<ServerId>,
        result: Result<RingRecord, ControlError>,
        reply: Reply<Scaled>,
    ) {
        let operator = self
            .authority
            .shared()
            .is_some_and(|s| !s.grows.contains(&op));
        self.op_done(op);
        match result {
            Ok(record) => {
                for &id in &ids {
                    if self.membership.phase(id) == Some(Phase::Joining(op)) {
                        self.membership.set_phase(id, Phase::Member);
                    }
                }
                self.apply_record(record);
                self.publish();
                tracing::info!(op, n = ids.len(), "replicas added to the shared ring");
                // An operator's /add: this gateway's proposal holds the new N for a scale-down
                // delay (the largest proposal wins, so the others' cannot undo it sooner).
                if operator {
                    self.operator_scaled(self.membership.desired());
                }
                let _ = reply.send(Ok(Scaled {
                    members: self.membership.member_names(),
                    changed: self.names_of(&ids),
                }));
            }
            Err(error) => {
                tracing::warn!(op, error = %error, "cannot commit /add in the shared ring; rolling it back");
                self.roll_back(ids, error, reply);
            }
        }
    }

    /// `op` finished (committed, rolled back or refused): readiness no longer waits for it.
    pub(super) fn op_done(&mut self, op: OpId) {
        if self
            .authority
            .shared_mut()
            .is_some_and(|s| s.grows.remove(&op))
        {
            self.notify_ready();
        }
    }

    /// Forgets `ids`, deletes their services and their reservations, then answers `error`.
    pub(super) fn roll_back(
        &mut self,
        ids: Vec<ServerId>,
        error: ControlError,
        reply: Reply<Scaled>,
    ) {
        let names: Vec<String> = ids.iter().filter_map(|&id| self.forget(id)).collect();
        self.publish();
        let provider = self.provider.clone();
        let ring = self.ring();
        tokio::spawn(async move {
            futures_util::future::join_all(names.iter().map(|n| provider.remove(n))).await;
            if let Some(ring) = ring {
                let forgot =
                    shared::update(&*ring, |r| Ok((shared::plan_forget(r, &ids), ()))).await;
                if let Err(e) = forgot {
                    tracing::warn!(error = %e, "cannot remove rolled-back reservations from the ring record; a later look cleans them");
                }
            }
            let _ = reply.send(Err(error));
        });
    }

    /// `/rm` through the record: mark leaving (every gateway stops routing to them), then
    /// drain, stop and forget.
    pub(super) fn shared_remove(&mut self, request: ScaleRequest, reply: Reply<Scaled>) {
        let Some(ring) = self.ring() else { return };
        let me = self.me();
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = shared::update(&*ring, |record| {
                Ok(shared::plan_remove(
                    record,
                    &request,
                    &me,
                    shared::unix_now(),
                )?)
            })
            .await;
            let _ = tx.send(Internal::RemovalPlanned { result, reply });
        });
    }

    /// Writes this gateway's autoscaling proposal `n` in the record (the others' kept).
    pub(super) fn shared_propose(&mut self, n: u32) {
        let Some(ring) = self.ring() else { return };
        let me = self.me();
        if let Some(s) = self.authority.shared_mut() {
            s.proposing = true;
        }
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = shared::update_proposals(&*ring, |record| {
                agree::with_mine(&record.proposals, &me, n, shared::unix_now_ms())
            })
            .await;
            let _ = tx.send(Internal::Proposed { result });
        });
    }

    pub(super) fn on_proposed(&mut self, result: Result<RingRecord, ControlError>) {
        if let Some(s) = self.authority.shared_mut() {
            s.proposing = false;
        }
        match result {
            Ok(record) => self.apply_record(record),
            // Written again at the next tick; until then the last one written counts.
            Err(e) => {
                tracing::warn!(error = %e, "cannot write this gateway's autoscaling proposal")
            }
        }
    }

    /// The gateways agreed on `target` below N: members past it leave (this gateway's least
    /// loaded first, `preference`), drain and stop; nothing if another gateway did it first.
    pub(super) fn shared_shrink(&mut self, target: usize, preference: Vec<ServerId>) {
        let Some(ring) = self.ring() else { return };
        let me = self.me();
        if let Some(s) = self.authority.shared_mut() {
            s.shrinking = true;
        }
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            let result = shared::update(&*ring, |record| {
                let now = shared::unix_now();
                Ok(shared::plan_shrink(record, target, &preference, &me, now))
            })
            .await;
            let _ = tx.send(Internal::Shrunk { result });
        });
    }

    pub(super) fn on_shrunk(&mut self, result: Result<(RingRecord, Vec<ServerId>), ControlError>) {
        if let Some(s) = self.authority.shared_mut() {
            s.shrinking = false;
        }
        match result {
            Ok((record, ids)) => {
                if !ids.is_empty() {
                    let names = self.names_of(&ids);
                    tracing::info!(replicas = ?names, "agreed scale-down: draining and stopping them");
                }
                self.apply_record(record);
                if !ids.is_empty() {
                    let (reply, _) = oneshot::channel();
                    self.drain_and_stop(ids, reply);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the agreed scale-down; tried again at the next tick")
            }
        }
    }

    pub(super) fn on_removal_planned(
        &mut self,
        result: Result<(RingRecord, Vec<ServerId>), ControlError>,
        reply: Reply<Scaled>,
    ) {
        match result {
            Ok((record, ids)) => {
                self.apply_record(record);
                self.operator_scaled(self.membership.desired());
                self.drain_and_stop(ids, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The removed replicas' services are gone: forget them in the record, then answer.
    pub(super) fn shared_forget(
        &mut self,
        ids: Vec<ServerId>,
        removed: Vec<String>,
        reply: Reply<Scaled>,
    ) {
        let members = Scaled {
            members: self.membership.member_names(),
            changed: removed,
        };
        let Some(ring) = self.ring() else {
            let _ = reply.send(Ok(members));
            return;
        };
        let tx = self.channels.internal_tx.clone();
        tokio::spawn(async move {
            match shared::update(&*ring, |r| Ok((shared::plan_forget(r, &ids), ()))).await {
                Ok((record, ())) => {
                    let _ = tx.send(Internal::RecordWritten { record });
                }
                // The replicas are stopped and nobody routes to a leaving entry; a later look
                // forgets them (see `shared::stale`).
                Err(e) => {
                    tracing::warn!(error = %e, "cannot forget removed replicas in the ring record yet")
                }
            }
            let _ = reply.send(Ok(members));
        });
    }

    /// Makes this gateway's membership the record's, if `record` is newer than the last one
    /// applied.
    pub(super) fn apply_record(&mut self, record: RingRecord) {
        let Some(s) = self.authority.shared_mut() else {
            return;
        };
        if s.version.is_some_and(|v| record.version < v) {
            return;
        }
        s.version = Some(record.version);
        s.proposals = record.proposals.clone();
        let changes = shared::reconcile(&self.membership, &self.placement, &record, &s.me);
        let changed = !changes.is_empty();
        for change in changes {
            self.apply_change(change);
        }
        self.clean_up_after_others(&record);
        if changed {
            self.publish();
        }
    }

    fn apply_change(&mut self, change: Change) {
        match change {
            Change::Appeared {
                id,
                hostname,
                slots,
                member,
            } => {
                let phase = if member {
                    Phase::Member
                } else {
                    Phase::Reserved
                };
                tracing::info!(replica = %hostname, id = %id, ?phase, "replica seen in the shared ring");
                self.insert_replica(id, hostname, phase);
                if let Err(e) = self.placement.restore(id, &slots) {
                    tracing::error!(id = %id, error = %e, "cannot place a replica of the ring record at its slots; it is not routed here");
                    self.errors.ring = Some(e.to_string());
                }
                if member {
                    self.attach_engine_task(id);
                }
            }
            Change::Joined { id } => {
                tracing::info!(replica = ?self.membership.name(id), id = %id, "replica joined the shared ring");
                self.membership.set_phase(id, Phase::Member);
                self.attach_engine_task(id);
            }
            Change::Leaving { id } => {
                tracing::info!(replica = ?self.membership.name(id), id = %id, "replica leaving the shared ring");
                self.membership.set_phase(id, Phase::Leaving);
                self.placement.remove(id);
                if let Some(r) = self.replicas.get_mut(&id) {
                    r.probe = None;
                    r.next_restart = None;
                }
            }
            Change::Gone { id } => {
                if let Some(Phase::Joining(op)) = self.membership.phase(id) {
                    let name = self.membership.name(id).unwrap_or_default().to_owned();
                    self.op_done(op);
                    if let Some(reply) = self.add_ops.remove(&op) {
                        let ids = self.membership.joining(op);
                        self.roll_back(ids, ControlError::ReservationLost { replica: name }, reply);
                    }
                    return;
                }
                if let Some(name) = self.forget(id) {
                    tracing::info!(replica = %name, id = %id, "replica gone from the shared ring");
                }
            }
        }
    }

    /// Checks member `id` on the task the engine runs for it, if it runs one this gateway has
    /// not attached yet.
    fn attach_engine_task(&mut self, id: ServerId) {
        let Some(name) = self.membership.name(id) else {
            return;
        };
        let Some(inst) = self
            .authority
            .shared()
            .and_then(|s| s.tasks.get(name))
            .filter(|i| i.id == id)
            .cloned()
        else {
            return;
        };
        let current = self
            .replicas
            .get(&id)
            .and_then(|r| r.instance.as_ref())
            .is_some_and(|i| i.instance_id == inst.instance_id && i.addr == inst.addr);
        if current {
            return;
        }
        let incarnation = self.bump_incarnation();
        if let Some(r) = self.replicas.get_mut(&id) {
            r.incarnation = incarnation;
            r.tracker = Tracker::starting();
            r.probe = None;
        }
        tracing::debug!(replica = %inst.hostname, id = %id, addr = %inst.addr, "checking its task");
        self.attach(id, inst);
    }

    /// The engine runs `instance` (a restart, a new task, another gateway's replica).
    pub(super) fn on_running(&mut self, instance: Instance) {
        let name = instance.hostname.clone();
        if let Some(s) = self.authority.shared_mut() {
            s.tasks.insert(name.clone(), instance);
        }
        if let Some(id) = self.membership.id_of(&name) {
            if self.membership.phase(id) == Some(Phase::Member) {
                self.attach_engine_task(id);
            }
        }
    }

    pub(super) fn on_engine(&mut self, reachable: bool, detail: String) {
        let Some(s) = self.authority.shared_mut() else {
            return;
        };
        let engine = &mut s.engine;
        if engine.reachable != reachable || engine.since.is_none() {
            engine.since = Some(SystemTime::now());
        }
        if reachable && !engine.reachable {
            tracing::info!("the engine answers again");
        }
        engine.reachable = reachable;
        engine.detail = detail;
    }

    /// Entries gateways left behind when they died mid-call: any gateway finishes them (the
    /// record's concurrency control makes a second cleaner find nothing to do).
    fn clean_up_after_others(&mut self, record: &RingRecord) {
        let mine = |id: ServerId| matches!(self.membership.phase(id), Some(Phase::Joining(_)));
        let me = self.me();
        let cleanups = shared::stale(
            record,
            shared::unix_now(),
            self.config.proxy.drain_timeout,
            &me,
            &mine,
        );
        let Some(ring) = self.ring() else { return };
        for c in cleanups {
            let (Cleanup::RollBack(id) | Cleanup::Finish(id)) = c;
            let first = self
                .authority
                .shared_mut()
                .is_some_and(|s| s.cleaning.insert(id));
            if !first {
                continue;
            }
            let Some(hostname) = record.members.get(&id).map(|m| m.hostname.clone()) else {
                continue;
            };
            tracing::warn!(replica = %hostname, id = %id, cleanup = ?c, "finishing what a gateway left in the ring record");
            let (ring, provider, tx) = (
                ring.clone(),
                self.provider.clone(),
                self.channels.internal_tx.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = provider.remove(&hostname).await {
                    tracing::warn!(replica = %hostname, error = %e, "cannot delete its service");
                }
                let result =
                    shared::update(&*ring, |r| Ok((shared::plan_forget(r, &[id]), ()))).await;
                let _ = tx.send(Internal::CleanedUp {
                    id,
                    record: result.ok().map(|(r, ())| r),
                });
            });
        }
    }
}
