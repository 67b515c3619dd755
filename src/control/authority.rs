//! Who decides membership: chosen once, when the controller is built, from the provider's
//! [`Mode`].
//!
//! Owns: the [`MembershipAuthority`] trait and its two implementations, [`Local`] (this
//! gateway's membership model is the truth: plans are validated and carried out here) and
//! [`SharedAuthority`] (membership lives in the engine's ring record, shared with other gateways:
//! every change is an optimistic write of the record), with the shared one's state
//! ([`SharedRecord`]). Each scaling step asks the authority, which answers with [`Effect`]s: what
//! to start, drain, write, answer. The loop carries them out (`scaling`), so the choice between
//! local and shared is made once, here, not at every step; under the local authority the shared
//! state does not exist, so no code can read it by mistake.
//! Must not touch: I/O. The membership model's rules are `membership`'s, the record's pure
//! decisions `shared`'s, their effects `scaling`'s and `shared_ops`'.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::error::ControlError;
use super::handle::{Reply, Scaled};
use super::membership::{
    check_autoscale_bounds, check_names, Limits, Membership, MembershipError, OpId, Phase,
    ScaleRequest,
};
use super::shared_ops::EngineState;
use crate::provider::{Instance, Mode, Proposals, SharedRing};
use crate::ring::ServerId;

/// What an authority decides from.
pub(super) struct Ctx<'a> {
    pub membership: &'a Membership,
    pub limits: Limits<'a>,
    /// `[autoscale]`'s `min..max` while it is on: an operator's `/add` and `/rm` stay within it
    /// (`None` for a `replicas.count` edit, which the autoscaler goes on from).
    pub autoscale: Option<(u32, u32)>,
    /// The id an `/add` that starts now is known by until it commits.
    pub op: OpId,
}

/// One thing the loop does for an authority.
pub(super) enum Effect {
    /// New replicas: inserted in `phase`, placed at once (their slots are decided when they
    /// are created), started.
    Start {
        replicas: Vec<(ServerId, String)>,
        phase: Phase,
    },
    /// `/add` `op` answers once all its replicas serve (or one fails).
    AwaitCommit { op: OpId, reply: Reply<Scaled> },
    /// `/add` `op`'s replicas all serve: they become members, ramp up, the caller is answered.
    Commit {
        op: OpId,
        ids: Vec<ServerId>,
        reply: Reply<Scaled>,
    },
    /// Forget these replicas, stop them, then answer `error` (an `/add` rolled back).
    Discard {
        ids: Vec<ServerId>,
        error: ControlError,
        reply: Reply<Scaled>,
    },
    /// Off the ring now, drained, stopped, then answered.
    Drain {
        ids: Vec<ServerId>,
        reply: Reply<Scaled>,
    },
    /// An operator set N: the autoscaler goes on from it.
    OperatorScaled(usize),
    /// Answer now.
    Reply(Reply<Scaled>, Result<Scaled, ControlError>),
    /// A write of the shared ring record (run in a task that reports back).
    Record(RecordStep),
}

/// The shared authority's steps, each an optimistic write of the record.
pub(super) enum RecordStep {
    /// Reserve `/add`'s replicas (then start them: `shared_ops::on_reserved`).
    Add {
        request: ScaleRequest,
        reply: Reply<Scaled>,
    },
    /// Members and reservations up to `target`.
    Grow { target: usize },
    /// Mark members leaving (then drain and stop them).
    Remove {
        request: ScaleRequest,
        reply: Reply<Scaled>,
    },
    /// `/add` `op`'s reservations become members.
    Commit {
        op: OpId,
        ids: Vec<ServerId>,
        reply: Reply<Scaled>,
    },
    /// `/add` `op` failed: its services deleted, its reservations removed, `error` answered.
    RollBack {
        op: OpId,
        ids: Vec<ServerId>,
        error: ControlError,
        reply: Reply<Scaled>,
    },
    /// Removed replicas are stopped: forget them in the record, then answer.
    Forget {
        ids: Vec<ServerId>,
        removed: Vec<String>,
        reply: Reply<Scaled>,
    },
}

/// Who decides membership. Every method only decides: it answers with the effects to carry out.
pub(super) trait MembershipAuthority: Send {
    /// `/add`.
    fn add(&mut self, at: &Ctx<'_>, request: ScaleRequest, reply: Reply<Scaled>) -> Vec<Effect>;
    /// `count` more members with generated names (start-up, `replicas.count`, the autoscaler).
    fn grow(&mut self, at: &Ctx<'_>, count: usize) -> Vec<Effect>;
    /// `/rm`, and scale-downs (their request names the replicas to go).
    fn remove(&mut self, at: &Ctx<'_>, request: ScaleRequest, reply: Reply<Scaled>) -> Vec<Effect>;
    /// Every replica of `/add` `op` serves.
    fn commit(&mut self, op: OpId, ids: Vec<ServerId>, reply: Reply<Scaled>) -> Vec<Effect>;
    /// `/add` `op` failed with `error`: undo it whole.
    fn roll_back(
        &mut self,
        op: OpId,
        ids: Vec<ServerId>,
        error: ControlError,
        reply: Reply<Scaled>,
    ) -> Vec<Effect>;
    /// Removed replicas are stopped and forgotten here; `members` is N's names now.
    fn removed(
        &mut self,
        ids: Vec<ServerId>,
        removed: Vec<String>,
        members: Vec<String>,
        reply: Reply<Scaled>,
    ) -> Vec<Effect>;

    /// The shared authority's state (`None` under the local one).
    fn shared(&self) -> Option<&SharedRecord> {
        None
    }

    fn shared_mut(&mut self) -> Option<&mut SharedRecord> {
        None
    }

    fn is_shared(&self) -> bool {
        self.shared().is_some()
    }

    /// Whether a grow through the record is pending (readiness waits for it).
    fn growing(&self) -> bool {
        self.shared().is_some_and(|s| !s.grows.is_empty())
    }
}

/// The authority `mode` calls for; `name` is this gateway's name.
pub(super) fn for_mode(mode: &Mode, name: &str) -> Box<dyn MembershipAuthority> {
    match mode.record() {
        None => Box::new(Local),
        Some(ring) => Box::new(SharedAuthority(SharedRecord {
            ring: ring.clone(),
            me: format!("{name}/{:08x}", fastrand::u32(..)),
            version: None,
            tasks: HashMap::new(),
            engine: EngineState::default(),
            cleaning: HashSet::new(),
            grows: HashSet::new(),
            proposals: Proposals::new(),
            proposing: false,
            shrinking: false,
        })),
    }
}

/// This gateway's membership model is the truth.
pub(super) struct Local;

impl MembershipAuthority for Local {
    fn add(&mut self, at: &Ctx<'_>, request: ScaleRequest, reply: Reply<Scaled>) -> Vec<Effect> {
        let members = at.membership.desired();
        let planned = at
            .membership
            .plan_add(&request, &at.limits)
            .and_then(|plan| {
                check_autoscale_bounds(members, request.n, true, at.autoscale)?;
                Ok(plan)
            });
        match planned {
            Ok(plan) => vec![
                Effect::OperatorScaled(members + plan.replicas.len()),
                Effect::Start {
                    replicas: plan.replicas,
                    phase: Phase::Joining(at.op),
                },
                Effect::AwaitCommit { op: at.op, reply },
            ],
            Err(e) => vec![Effect::Reply(reply, Err(e.into()))],
        }
    }

    fn grow(&mut self, at: &Ctx<'_>, count: usize) -> Vec<Effect> {
        let plan = at.membership.plan_grow(count, at.limits.name_prefix);
        vec![Effect::Start {
            replicas: plan.replicas,
            phase: Phase::Member,
        }]
    }

    fn remove(&mut self, at: &Ctx<'_>, request: ScaleRequest, reply: Reply<Scaled>) -> Vec<Effect> {
        let members = at.membership.desired();
        let planned = at.membership.plan_remove(&request).and_then(|plan| {
            check_autoscale_bounds(members, request.n, false, at.autoscale)?;
            Ok(plan)
        });
        match planned {
            Ok(plan) => vec![
                Effect::OperatorScaled(members.saturating_sub(plan.ids.len())),
                Effect::Drain {
                    ids: plan.ids,
                    reply,
                },
            ],
            Err(e) => vec![Effect::Reply(reply, Err(e.into()))],
        }
    }

    fn commit(&mut self, op: OpId, ids: Vec<ServerId>, reply: Reply<Scaled>) -> Vec<Effect> {
        vec![Effect::Commit { op, ids, reply }]
    }

    fn roll_back(
        &mut self,
        _op: OpId,
        ids: Vec<ServerId>,
        error: ControlError,
        reply: Reply<Scaled>,
    ) -> Vec<Effect> {
        vec![Effect::Discard { ids, error, reply }]
    }

    fn removed(
        &mut self,
        _ids: Vec<ServerId>,
        removed: Vec<String>,
        members: Vec<String>,
        reply: Reply<Scaled>,
    ) -> Vec<Effect> {
        vec![Effect::Reply(
            reply,
            Ok(Scaled {
                members,
                changed: removed,
            }),
        )]
    }
}

/// Membership lives in the engine's ring record.
pub(super) struct SharedAuthority(SharedRecord);

impl MembershipAuthority for SharedAuthority {
    fn add(&mut self, at: &Ctx<'_>, request: ScaleRequest, reply: Reply<Scaled>) -> Vec<Effect> {
        // The rest is checked against the engine's record, not this gateway's copy of it.
        if let Err(e) = check_names(&request.hostnames) {
            return vec![Effect::Reply(reply, Err(e.into()))];
        }
        if request.hostnames.len() > request.n as usize {
            let e = MembershipError::TooManyHostnamesToAdd;
            return vec![Effect::Reply(reply, Err(e.into()))];
        }
        // `[autoscale]`'s bounds, against this gateway's copy of the record (the last one it
        // applied): a call racing another gateway's change may see N one change late.
        let members = at.membership.desired();
        if let Err(e) = check_autoscale_bounds(members, request.n, true, at.autoscale) {
            return vec![Effect::Reply(reply, Err(e.into()))];
        }
        vec![Effect::Record(RecordStep::Add { request, reply })]
    }

    fn grow(&mut self, at: &Ctx<'_>, count: usize) -> Vec<Effect> {
        let target = at.membership.desired() + count;
        vec![Effect::Record(RecordStep::Grow { target })]
    }

    fn remove(&mut self, at: &Ctx<'_>, request: ScaleRequest, reply: Reply<Scaled>) -> Vec<Effect> {
        let members = at.membership.desired();
        if let Err(e) = check_autoscale_bounds(members, request.n, false, at.autoscale) {
            return vec![Effect::Reply(reply, Err(e.into()))];
        }
        vec![Effect::Record(RecordStep::Remove { request, reply })]
    }

    fn commit(&mut self, op: OpId, ids: Vec<ServerId>, reply: Reply<Scaled>) -> Vec<Effect> {
        vec![Effect::Record(RecordStep::Commit { op, ids, reply })]
    }

    fn roll_back(
        &mut self,
        op: OpId,
        ids: Vec<ServerId>,
        error: ControlError,
        reply: Reply<Scaled>,
    ) -> Vec<Effect> {
        vec![Effect::Record(RecordStep::RollBack {
            op,
            ids,
            error,
            reply,
        })]
    }

    fn removed(
        &mut self,
        ids: Vec<ServerId>,
        removed: Vec<String>,
        _members: Vec<String>,
        reply: Reply<Scaled>,
    ) -> Vec<Effect> {
        vec![Effect::Record(RecordStep::Forget {
            ids,
            removed,
            reply,
        })]
    }

    fn shared(&self) -> Option<&SharedRecord> {
        Some(&self.0)
    }

    fn shared_mut(&mut self) -> Option<&mut SharedRecord> {
        Some(&mut self.0)
    }
}

/// The shared-record authority's state.
pub(super) struct SharedRecord {
    pub ring: Arc<dyn SharedRing>,
    /// Who this run of the gateway is in the ring record: its name and a nonce, so that a
    /// restarted gateway recognises the reservations its earlier run left.
    pub me: String,
    /// The version of the last record applied; older observations are ignored.
    pub version: Option<u64>,
    /// The tasks the engine runs, by hostname: attached when their replica is a member,
    /// whichever event came first.
    pub tasks: HashMap<String, Instance>,
    pub engine: EngineState,
    /// Stale record entries being cleaned up by this gateway.
    pub cleaning: HashSet<ServerId>,
    /// Grows to `replicas.count` through the record not finished yet: readiness waits for
    /// them, so a gateway that starts a ring serves once its replicas do.
    pub grows: HashSet<OpId>,
    /// The gateways' autoscaling proposals in the last record applied (`agree`).
    pub proposals: Proposals,
    /// A write of this gateway's proposal is under way.
    pub proposing: bool,
    /// An agreed scale-down is being written to the record.
    pub shrinking: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testkit::MemoryRecord;

    fn ctx(m: &Membership, autoscale: Option<(u32, u32)>) -> Ctx<'_> {
        Ctx {
            membership: m,
            limits: Limits {
                max_replicas: 10,
                name_prefix: "server-",
                cannot_start: None,
            },
            autoscale,
            op: 7,
        }
    }

    fn three() -> Membership {
        let mut m = Membership::default();
        for (id, name) in m.plan_grow(3, "server-").replicas {
            m.insert(id, name, Phase::Member);
        }
        m
    }

    fn req(n: u32) -> ScaleRequest {
        ScaleRequest {
            n,
            hostnames: Vec::new(),
        }
    }

    fn reply() -> Reply<Scaled> {
        tokio::sync::oneshot::channel().0
    }

    #[test]
    fn the_mode_chooses_the_authority_once() {
        assert!(!for_mode(&Mode::Owned, "gw").is_shared());
        assert!(!for_mode(&Mode::Fixed, "gw").is_shared());
        let local = for_mode(&Mode::Owned, "gw");
        assert!(local.shared().is_none() && !local.growing());
        let record: Arc<dyn SharedRing> = Arc::new(MemoryRecord::default());
        let mut shared = for_mode(&Mode::Shared(record), "gw-a");
        let s = shared.shared_mut().expect("shared");
        // Its name and a nonce: a restarted gateway tells its earlier run's reservations apart.
        assert!(
            s.me.starts_with("gw-a/") && s.me.len() == "gw-a/".len() + 8,
            "{}",
            s.me
        );
        assert_eq!(s.version, None);
        s.grows.insert(7);
        assert!(
            shared.growing(),
            "readiness waits for a grow through the record"
        );
    }

    #[test]
    fn the_local_authority_starts_drains_and_answers_itself() {
        let m = three();
        let e = Local.add(&ctx(&m, None), req(2), reply());
        assert!(matches!(
            e.as_slice(),
            [
                Effect::OperatorScaled(5),
                Effect::Start { replicas, phase: Phase::Joining(7) },
                Effect::AwaitCommit { op: 7, .. },
            ] if replicas.len() == 2
        ));
        let e = Local.add(&ctx(&m, Some((1, 4))), req(2), reply());
        assert!(
            matches!(e.as_slice(), [Effect::Reply(_, Err(_))]),
            "over autoscale.max: answered, nothing started"
        );
        let e = Local.remove(&ctx(&m, None), req(1), reply());
        assert!(matches!(
            e.as_slice(),
            [Effect::OperatorScaled(2), Effect::Drain { ids, .. }] if ids.len() == 1
        ));
        let e = Local.grow(&ctx(&m, None), 2);
        assert!(matches!(
            e.as_slice(),
            [Effect::Start { replicas, phase: Phase::Member }] if replicas.len() == 2
        ));
    }

    #[test]
    fn the_shared_authority_turns_every_change_into_a_record_write() {
        let record: Arc<dyn SharedRing> = Arc::new(MemoryRecord::default());
        let mut a = for_mode(&Mode::Shared(record), "gw");
        let m = three();
        assert!(matches!(
            a.add(&ctx(&m, None), req(1), reply()).as_slice(),
            [Effect::Record(RecordStep::Add { .. })]
        ));
        let bad = ScaleRequest {
            n: 1,
            hostnames: vec!["a".into(), "b".into()],
        };
        assert!(
            matches!(
                a.add(&ctx(&m, None), bad, reply()).as_slice(),
                [Effect::Reply(_, Err(_))]
            ),
            "what needs no record is refused at once"
        );
        assert!(matches!(
            a.grow(&ctx(&m, None), 2).as_slice(),
            [Effect::Record(RecordStep::Grow { target: 5 })]
        ));
        assert!(matches!(
            a.remove(&ctx(&m, None), req(1), reply()).as_slice(),
            [Effect::Record(RecordStep::Remove { .. })]
        ));
        // With autoscale on, an operator's call stays within min..max, as on one gateway.
        assert!(
            matches!(
                a.add(&ctx(&m, Some((1, 4))), req(2), reply()).as_slice(),
                [Effect::Reply(_, Err(_))]
            ),
            "3 + 2 is over autoscale.max: answered, nothing written"
        );
        assert!(matches!(
            a.remove(&ctx(&m, Some((3, 4))), req(1), reply()).as_slice(),
            [Effect::Reply(_, Err(_))]
        ));
        assert!(matches!(
            a.add(&ctx(&m, Some((1, 4))), req(1), reply()).as_slice(),
            [Effect::Record(RecordStep::Add { .. })]
        ));
    }
}
