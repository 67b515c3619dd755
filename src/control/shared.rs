//! The shared ring: membership that lives in the engine's ring record (the `swarm` provider),
//! so that every gateway watching it routes every key the same way.
//!
//! Owns: the pure decisions over a [`RingRecord`]: the membership and placement it describes
//! ([`membership_of`], [`placement_of`]), the record edits `/add`, `/rm`, growing to
//! `replicas.count`, committing and rolling back are (planned with the same membership model
//! and virtual-node placement as for local providers, so ids are the smallest free, names
//! `<prefix><id>`, slots probed past every recorded one), what an observed record changes for
//! this gateway ([`reconcile`]), and which entries a dead gateway left behind ([`stale`]);
//! plus [`update`], the optimistic read–plan–write loop that serialises edits through the
//! engine: a write names the record version it was planned on, and a write that lost the race
//! is planned again on the newer record.
//! Must not touch: the engine itself (the provider's [`SharedRing`] does) or how replicas start
//! (`lifecycle`); applying the changes is `shared_ops`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::membership::{Limits, Membership, MembershipError, Phase, ScaleRequest};
use crate::control::error::ControlError;
use crate::provider::record::{Proposals, RecordedMember, RecordedPhase, RingRecord};
use crate::provider::{ProviderError, RecordWriteError, SharedRing};
use crate::ring::{Placement, RingError, ServerId};
use crate::routing::Router;

/// Conflicting writes a call survives before it answers "retry".
pub const MAX_ATTEMPTS: u32 = 12;
/// A reservation whose gateway has not committed or rolled back after this long was left by
/// a gateway that died mid-`/add`: any gateway rolls it back.
pub const STALE_JOINING: Duration = Duration::from_secs(90);
/// A removal not finished after this long (plus the drain timeout) was left by a gateway that
/// died mid-`/rm`: any gateway finishes it.
pub const STALE_LEAVING: Duration = Duration::from_secs(30);

pub type Members = BTreeMap<ServerId, RecordedMember>;

/// The membership model of a record: its members, other gateways' reservations and removals,
/// so a plan on it allocates ids and names exactly as a local plan would.
pub fn membership_of(record: &RingRecord) -> Membership {
    let mut m = Membership::default();
    for (&id, r) in &record.members {
        let phase = match r.phase {
            RecordedPhase::Member => Phase::Member,
            RecordedPhase::Joining { .. } => Phase::Reserved,
            RecordedPhase::Leaving { .. } => Phase::Leaving,
        };
        m.insert(id, r.hostname.clone(), phase);
    }
    m
}

/// Every recorded replica at its recorded slots (in id order; the result does not depend on
/// the order, see the ring's property tests).
pub fn placement_of(record: &RingRecord, slots: u32, vnodes: u32) -> Result<Placement, RingError> {
    let mut p = Placement::new(slots, vnodes)?;
    for (&id, r) in &record.members {
        p.restore(id, &r.slots)?;
    }
    Ok(p)
}

fn mismatch(e: RingError) -> ControlError {
    ControlError::RecordMismatch {
        detail: e.to_string(),
    }
}

/// New replicas reserved by one edit: id, hostname, slots.
pub type Reserved = Vec<(ServerId, String, Vec<u32>)>;

/// Reserves `plan`'s replicas in `record`: each placed past every recorded slot.
fn reserve(
    record: &RingRecord,
    plan: Vec<(ServerId, String)>,
    router: &Router<'_>,
    phase: &RecordedPhase,
) -> Result<(Members, Reserved), ControlError> {
    let mut placement = placement_of(record, router.slots(), router.vnodes()).map_err(mismatch)?;
    let mut members = record.members.clone();
    let mut reserved = Vec::with_capacity(plan.len());
    for (id, name) in plan {
        router.place(&mut placement, id).map_err(mismatch)?;
        let slots = placement.positions(id);
        members.insert(
            id,
            RecordedMember {
                hostname: name.clone(),
                slots: slots.clone(),
                phase: phase.clone(),
            },
        );
        reserved.push((id, name, slots));
    }
    Ok((members, reserved))
}

/// `/add` on the record: validated like a local `/add`, then reserved as joining by `me`.
pub fn plan_add(
    record: &RingRecord,
    request: &ScaleRequest,
    limits: &Limits<'_>,
    router: &Router<'_>,
    me: &str,
    now: u64,
) -> Result<(Members, Reserved), ControlError> {
    let plan = membership_of(record).plan_add(request, limits)?;
    let phase = RecordedPhase::Joining {
        by: me.to_owned(),
        since: now,
    };
    reserve(record, plan.replicas, router, &phase)
}

/// Enough reservations that members and reservations make `count` (none when they do).
pub fn plan_grow(
    record: &RingRecord,
    count: usize,
    prefix: &str,
    max: usize,
    router: &Router<'_>,
    me: &str,
    now: u64,
) -> Result<(Members, Reserved), ControlError> {
    let m = membership_of(record);
    let kept = m.all().filter(|(_, e)| e.phase != Phase::Leaving).count();
    let missing = count.saturating_sub(kept).min(max.saturating_sub(m.len()));
    let plan = m.plan_grow(missing, prefix);
    let phase = RecordedPhase::Joining {
        by: me.to_owned(),
        since: now,
    };
    reserve(record, plan.replicas, router, &phase)
}

/// `/rm` on the record: validated like a local `/rm`, then marked leaving by `me`.
pub fn plan_remove(
    record: &RingRecord,
    request: &ScaleRequest,
    me: &str,
    now: u64,
) -> Result<(Members, Vec<ServerId>), MembershipError> {
    let plan = membership_of(record).plan_remove(request)?;
    let mut members = record.members.clone();
    for id in &plan.ids {
        if let Some(m) = members.get_mut(id) {
            m.phase = RecordedPhase::Leaving {
                by: me.to_owned(),
                since: now,
            };
        }
    }
    Ok((members, plan.ids))
}

/// An agreed scale-down on the record: members beyond `target` (counting members and
/// reservations, not removals) marked leaving by `me`, chosen in `preference` order (this
/// gateway's least loaded first) and then the newest. Nothing when the record is at `target`
/// or below already (another gateway carried the same agreement out first), so every gateway
/// may try it: it never removes twice. Only members go, never reservations.
pub fn plan_shrink(
    record: &RingRecord,
    target: usize,
    preference: &[ServerId],
    me: &str,
    now: u64,
) -> (Members, Vec<ServerId>) {
    let kept = record
        .members
        .values()
        .filter(|m| !matches!(m.phase, RecordedPhase::Leaving { .. }))
        .count();
    let is_member = |id: &ServerId| {
        record
            .members
            .get(id)
            .is_some_and(|m| m.phase == RecordedPhase::Member)
    };
    let newest_first = record.members.keys().rev();
    let mut ids: Vec<ServerId> = Vec::new();
    for &id in preference.iter().chain(newest_first) {
        if ids.len() >= kept.saturating_sub(target) {
            break;
        }
        if is_member(&id) && !ids.contains(&id) {
            ids.push(id);
        }
    }
    let mut members = record.members.clone();
    for id in &ids {
        if let Some(m) = members.get_mut(id) {
            m.phase = RecordedPhase::Leaving {
                by: me.to_owned(),
                since: now,
            };
        }
    }
    (members, ids)
}

/// The reservations `ids` become members; an id no longer reserved (rolled back by another
/// gateway) fails the commit.
pub fn plan_commit(record: &RingRecord, ids: &[ServerId]) -> Result<Members, ControlError> {
    let mut members = record.members.clone();
    for id in ids {
        match members.get_mut(id) {
            Some(m) if matches!(m.phase, RecordedPhase::Joining { .. }) => {
                m.phase = RecordedPhase::Member
            }
            Some(m) if m.phase == RecordedPhase::Member => {}
            other => {
                return Err(ControlError::ReservationLost {
                    replica: other.map_or_else(|| id.to_string(), |m| m.hostname.clone()),
                })
            }
        }
    }
    Ok(members)
}

/// `ids` out of the record (a finished removal, a rolled-back reservation).
pub fn plan_forget(record: &RingRecord, ids: &[ServerId]) -> Members {
    let mut members = record.members.clone();
    for id in ids {
        members.remove(id);
    }
    members
}

/// What an observed record changes for this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A replica this gateway did not know: placed at its recorded slots; routed when it is a
    /// member (and answers), only reserved when another gateway's `/add` has not committed.
    Appeared {
        id: ServerId,
        hostname: String,
        slots: Vec<u32>,
        member: bool,
    },
    /// Another gateway's reservation committed: route to it.
    Joined { id: ServerId },
    /// Being removed (by whichever gateway): off the ring now.
    Leaving { id: ServerId },
    /// Gone from the record: forgotten (an uncommitted `/add` of this gateway fails).
    Gone { id: ServerId },
}

/// The changes that make this gateway's membership (`local`, placed as `placement`) the
/// record's. Reservations of this gateway (`me`) it does not know are its own calls in flight
/// (their reply adds them) or leftovers of an earlier run (see [`stale`]).
pub fn reconcile(
    local: &Membership,
    placement: &Placement,
    record: &RingRecord,
    me: &str,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (&id, r) in &record.members {
        let appeared = |member| Change::Appeared {
            id,
            hostname: r.hostname.clone(),
            slots: r.slots.clone(),
            member,
        };
        let Some(entry) = local.get(id) else {
            match &r.phase {
                RecordedPhase::Member => changes.push(appeared(true)),
                RecordedPhase::Joining { by, .. } if by != me => changes.push(appeared(false)),
                RecordedPhase::Joining { .. } | RecordedPhase::Leaving { .. } => {}
            }
            continue;
        };
        let same = entry.name == r.hostname
            && (entry.phase == Phase::Leaving || placement.positions(id) == r.slots);
        if !same {
            // The id was reused for another replica between two observations.
            changes.push(Change::Gone { id });
            match &r.phase {
                RecordedPhase::Member => changes.push(appeared(true)),
                RecordedPhase::Joining { by, .. } if by != me => changes.push(appeared(false)),
                _ => {}
            }
            continue;
        }
        match (entry.phase, &r.phase) {
            (Phase::Reserved, RecordedPhase::Member) => changes.push(Change::Joined { id }),
            (Phase::Member | Phase::Reserved, RecordedPhase::Leaving { .. }) => {
                changes.push(Change::Leaving { id })
            }
            _ => {}
        }
    }
    // Removals included: the record forgets a replica only once its service is gone.
    for (id, _) in local.all() {
        if !record.members.contains_key(&id) {
            changes.push(Change::Gone { id });
        }
    }
    changes
}

/// What to do with an entry a gateway left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// A reservation never committed: delete its service and forget it.
    RollBack(ServerId),
    /// A removal never finished: delete its service and forget it.
    Finish(ServerId),
}

/// Entries left behind: reservations older than [`STALE_JOINING`] and removals older than
/// [`STALE_LEAVING`] + `drain`, and reservations of this gateway (`me`) that no call of its
/// own knows (`mine`) — an earlier run of it died mid-`/add`.
pub fn stale(
    record: &RingRecord,
    now: u64,
    drain: Duration,
    me: &str,
    mine: &dyn Fn(ServerId) -> bool,
) -> Vec<Cleanup> {
    let older = |since: u64, limit: Duration| now.saturating_sub(since) >= limit.as_secs();
    record
        .members
        .iter()
        .filter_map(|(&id, r)| match &r.phase {
            RecordedPhase::Joining { by, since } => {
                let orphan = by.split('/').next() == me.split('/').next() && by != me;
                (older(*since, STALE_JOINING) && !mine(id) || orphan)
                    .then_some(Cleanup::RollBack(id))
            }
            RecordedPhase::Leaving { since, .. } => {
                older(*since, STALE_LEAVING + drain).then_some(Cleanup::Finish(id))
            }
            RecordedPhase::Member => None,
        })
        .collect()
}

fn engine_unavailable(e: ProviderError) -> ControlError {
    ControlError::EngineUnavailable {
        detail: e.to_string(),
    }
}

/// Reads the record, plans an edit on it with `edit`, and writes it if nobody wrote the
/// record meanwhile; when somebody did, plans again on what they wrote, up to
/// [`MAX_ATTEMPTS`]. Returns the record as written and what `edit` returned. The written
/// record is tagged with the version after the one it was planned on: the engine's next version
/// after a successful write on `v` is this write, and every later one includes it, while any
/// observation at `v` or before is older than it.
pub async fn update<T>(
    ring: &dyn SharedRing,
    mut edit: impl FnMut(&RingRecord) -> Result<(Members, T), ControlError>,
) -> Result<(RingRecord, T), ControlError> {
    update_whole(ring, |record| {
        let (members, out) = edit(record)?;
        Ok((members, record.proposals.clone(), out))
    })
    .await
}

/// [`update`] of the proposals (the members as they are).
pub async fn update_proposals(
    ring: &dyn SharedRing,
    mut edit: impl FnMut(&RingRecord) -> Proposals,
) -> Result<RingRecord, ControlError> {
    update_whole(ring, |record| {
        Ok((record.members.clone(), edit(record), ()))
    })
    .await
    .map(|(record, ())| record)
}

/// [`update`] of the whole record: members and proposals.
async fn update_whole<T>(
    ring: &dyn SharedRing,
    mut edit: impl FnMut(&RingRecord) -> Result<(Members, Proposals, T), ControlError>,
) -> Result<(RingRecord, T), ControlError> {
    for attempt in 0..MAX_ATTEMPTS {
        let record = ring.read().await.map_err(engine_unavailable)?;
        let (members, proposals, out) = edit(&record)?;
        if members == record.members && proposals == record.proposals {
            return Ok((record, out));
        }
        match ring
            .write(record.version, members.clone(), proposals.clone())
            .await
        {
            Ok(()) => {
                return Ok((
                    RingRecord {
                        version: record.version + 1,
                        members,
                        proposals,
                    },
                    out,
                ))
            }
            Err(RecordWriteError::Conflict) => {
                // Someone else wrote first: back off a little (jittered, so racing gateways
                // spread out) and plan on what they wrote.
                let base = 5u64 << attempt.min(5);
                tokio::time::sleep(Duration::from_millis(base + fastrand::u64(0..=base))).await;
            }
            Err(RecordWriteError::Engine(e)) => return Err(engine_unavailable(e)),
        }
    }
    Err(ControlError::RingContended {
        attempts: MAX_ATTEMPTS,
    })
}

/// Seconds since the epoch, for reservation times (compared across gateways, so wall-clock).
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Milliseconds since the epoch, for autoscaling proposals (compared across gateways).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::policy::PolicySet;
    use std::sync::Mutex;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    const LIMITS: Limits<'static> = Limits {
        max_replicas: 10,
        name_prefix: "server-",
        cannot_start: None,
    };

    fn req(n: u32, hostnames: &[&str]) -> ScaleRequest {
        ScaleRequest {
            n,
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn with_router<T>(f: impl FnOnce(&Router<'_>) -> T) -> T {
        let (c, p) = (Config::default(), PolicySet::empty());
        f(&Router::new(&c, &p))
    }

    fn record_of(members: Members, version: u64) -> RingRecord {
        RingRecord {
            version,
            members,
            proposals: Proposals::new(),
        }
    }

    fn grown(n: usize) -> RingRecord {
        let (members, _) = with_router(|r| {
            plan_grow(&RingRecord::default(), n, "server-", 10, r, "gw/a", 1).expect("grow")
        });
        let ids: Vec<ServerId> = members.keys().copied().collect();
        record_of(
            plan_commit(&record_of(members, 1), &ids).expect("commit"),
            2,
        )
    }

    #[test]
    fn a_shared_plan_allocates_and_places_as_a_local_one() {
        let record = grown(3);
        // The same ids, names and slots a single gateway gives three replicas.
        let (c, p) = (Config::default(), PolicySet::empty());
        let (local, _) = Router::new(&c, &p)
            .ring_of(&[id(1), id(2), id(3)])
            .expect("ring");
        for (&i, m) in &record.members {
            assert_eq!(m.hostname, format!("server-{i}"));
            assert_eq!(m.slots, local.positions(i));
            assert_eq!(m.phase, RecordedPhase::Member);
        }
        let (members, reserved) = with_router(|r| {
            plan_add(&record, &req(2, &["S5"]), &LIMITS, r, "gw/b", 7).expect("add")
        });
        assert_eq!(
            reserved
                .iter()
                .map(|(i, n, _)| (*i, n.as_str()))
                .collect::<Vec<_>>(),
            vec![(id(4), "S5"), (id(5), "server-5")]
        );
        assert!(
            matches!(&members[&id(4)].phase, RecordedPhase::Joining { by, since: 7 } if by == "gw/b")
        );
        // Reserved slots are taken: a second plan on the new record probes past them.
        let next = record_of(members, 3);
        let (_, again) =
            with_router(|r| plan_add(&next, &req(1, &[]), &LIMITS, r, "gw/a", 8).expect("add"));
        assert_eq!(again[0].0, id(6));
        let taken: Vec<u32> = next
            .members
            .values()
            .flat_map(|m| m.slots.clone())
            .collect();
        assert!(again[0].2.iter().all(|s| !taken.contains(s)));
    }

    #[test]
    fn shared_plans_keep_the_api_rules() {
        let record = grown(3);
        let err = with_router(|r| plan_add(&record, &req(1, &["server-2"]), &LIMITS, r, "gw", 1))
            .expect_err("in use");
        assert!(matches!(
            err,
            ControlError::Membership(MembershipError::HostnameInUse(_))
        ));
        assert_eq!(
            plan_remove(&record, &req(1, &["nope"]), "gw", 1).map(|_| ()),
            Err(MembershipError::UnknownHostname("nope".into()))
        );
        let (members, ids) = plan_remove(&record, &req(1, &[]), "gw/r", 9).expect("rm");
        assert_eq!(ids, vec![id(3)], "the newest");
        assert!(matches!(
            members[&id(3)].phase,
            RecordedPhase::Leaving { .. }
        ));
        // A leaving replica cannot be removed twice, and counts against max_replicas.
        let leaving = record_of(members, 5);
        assert!(plan_remove(&leaving, &req(3, &[]), "gw", 1).is_err());
        // Grow counts members and reservations, not the leaving one.
        let (_, grow) =
            with_router(|r| plan_grow(&leaving, 3, "server-", 10, r, "gw", 1)).expect("grow");
        assert_eq!(grow.len(), 1);
        assert_eq!(grow[0].0, id(4), "id 3 is still taken while it drains");
    }

    #[test]
    fn a_commit_needs_its_reservation() {
        let record = grown(1);
        let (members, reserved) =
            with_router(|r| plan_add(&record, &req(1, &[]), &LIMITS, r, "gw", 1)).expect("add");
        let ids: Vec<ServerId> = reserved.iter().map(|(i, _, _)| *i).collect();
        let rec = record_of(members, 2);
        assert!(plan_commit(&rec, &ids).is_ok());
        let rolled_back = record_of(plan_forget(&rec, &ids), 3);
        assert!(matches!(
            plan_commit(&rolled_back, &ids),
            Err(ControlError::ReservationLost { .. })
        ));
    }

    #[test]
    fn a_record_from_a_different_ring_config_is_refused() {
        let record = grown(2);
        let mut c = Config::default();
        c.ring.vnodes = 5;
        let p = PolicySet::empty();
        let err = plan_add(
            &record,
            &req(1, &[]),
            &LIMITS,
            &Router::new(&c, &p),
            "gw",
            1,
        )
        .expect_err("9 recorded slots, 5 vnodes");
        assert!(matches!(err, ControlError::RecordMismatch { .. }), "{err}");
    }

    fn local_of(record: &RingRecord) -> (Membership, Placement) {
        (
            membership_of(record),
            placement_of(record, 512, 9).expect("placement"),
        )
    }

    #[test]
    fn reconcile_makes_the_local_view_the_records() {
        let three = grown(3);
        // A fresh gateway: everything appears.
        let changes = reconcile(
            &Membership::default(),
            &Placement::new(512, 9).expect("p"),
            &three,
            "me",
        );
        assert_eq!(changes.len(), 3);
        assert!(matches!(&changes[0], Change::Appeared { id: i, member: true, .. } if *i == id(1)));
        // The same record again: nothing.
        let (m, p) = local_of(&three);
        assert!(reconcile(&m, &p, &three, "me").is_empty());
        // Another gateway reserves S5 (id 4) and removes server-2.
        let (members, _) =
            with_router(|r| plan_add(&three, &req(1, &["S5"]), &LIMITS, r, "other", 1))
                .expect("add");
        let (members, _) =
            plan_remove(&record_of(members, 4), &req(1, &["server-2"]), "other", 1).expect("rm");
        let next = record_of(members, 5);
        let changes = reconcile(&m, &p, &next, "me");
        assert_eq!(changes[0], Change::Leaving { id: id(2) });
        assert!(
            matches!(&changes[1], Change::Appeared { id: i, member: false, .. } if *i == id(4))
        );
        // Its commit, then the removal finishing.
        let (m2, p2) = local_of(&next);
        let committed = record_of(plan_commit(&next, &[id(4)]).expect("commit"), 6);
        assert_eq!(
            reconcile(&m2, &p2, &committed, "me"),
            vec![Change::Joined { id: id(4) }]
        );
        let mut m3 = membership_of(&committed);
        m3.set_phase(id(4), Phase::Reserved);
        let done = record_of(plan_forget(&committed, &[id(2)]), 7);
        let (_, p3) = local_of(&committed);
        let changes = reconcile(&m3, &p3, &done, "me");
        assert_eq!(
            changes,
            vec![Change::Joined { id: id(4) }, Change::Gone { id: id(2) }]
        );
    }

    #[test]
    fn reconcile_leaves_this_gateways_calls_in_flight_alone() {
        let one = grown(1);
        let (members, _) =
            with_router(|r| plan_add(&one, &req(1, &[]), &LIMITS, r, "me", 1)).expect("add");
        let (m, p) = local_of(&one);
        assert!(
            reconcile(&m, &p, &record_of(members, 2), "me").is_empty(),
            "our own reservation"
        );
        // A removal the record finished is gone, whoever ran it.
        let mut m = membership_of(&one);
        m.set_phase(id(1), Phase::Leaving);
        let empty = record_of(BTreeMap::new(), 3);
        assert_eq!(
            reconcile(&m, &Placement::new(512, 9).expect("p"), &empty, "me"),
            vec![Change::Gone { id: id(1) }]
        );
    }

    #[test]
    fn an_id_reused_between_two_looks_is_a_new_replica() {
        let (m, p) = local_of(&grown(2));
        let mut other = grown(2);
        if let Some(e) = other.members.get_mut(&id(2)) {
            e.hostname = "S9".into();
        }
        let changes = reconcile(&m, &p, &other, "me");
        assert_eq!(changes[0], Change::Gone { id: id(2) });
        assert!(matches!(&changes[1], Change::Appeared { hostname, .. } if hostname == "S9"));
    }

    #[test]
    fn stale_entries_are_cleaned_by_anyone_and_orphans_by_their_gateways_next_run() {
        let one = grown(1);
        let (members, _) =
            with_router(|r| plan_add(&one, &req(1, &[]), &LIMITS, r, "gw-a/1", 100)).expect("add");
        let (members, _) = plan_remove(
            &record_of(members, 2),
            &req(1, &["server-1"]),
            "gw-b/1",
            100,
        )
        .expect("rm");
        let rec = record_of(members, 3);
        let none = |_: ServerId| false;
        let drain = Duration::from_secs(10);
        assert!(stale(&rec, 110, drain, "gw-c/1", &none).is_empty(), "young");
        assert_eq!(
            stale(&rec, 100 + 41, drain, "gw-c/1", &none),
            vec![Cleanup::Finish(id(1))]
        );
        assert_eq!(
            stale(&rec, 100 + 90, drain, "gw-c/1", &none),
            vec![Cleanup::Finish(id(1)), Cleanup::RollBack(id(2))]
        );
        let mine = |i: ServerId| i == id(2);
        assert_eq!(
            stale(&rec, 100 + 90, drain, "gw-a/1", &mine),
            vec![Cleanup::Finish(id(1))],
            "a call of ours still runs"
        );
        // gw-a restarted (another nonce): its old reservation is an orphan at once.
        assert_eq!(
            stale(&rec, 101, drain, "gw-a/2", &none),
            vec![Cleanup::RollBack(id(2))]
        );
    }

    /// A record in memory with the engine's optimistic concurrency.
    #[derive(Default)]
    struct Store {
        record: Mutex<RingRecord>,
        writes: Mutex<u32>,
    }

    impl SharedRing for Store {
        fn read(&self) -> crate::provider::BoxFuture<'_, Result<RingRecord, ProviderError>> {
            let r = crate::sync::lock(&self.record).clone();
            Box::pin(async move { Ok(r) })
        }

        fn write(
            &self,
            version: u64,
            members: Members,
            proposals: Proposals,
        ) -> crate::provider::BoxFuture<'_, Result<(), RecordWriteError>> {
            Box::pin(async move {
                // Yield first so that concurrent callers interleave between read and write.
                tokio::task::yield_now().await;
                let mut r = crate::sync::lock(&self.record);
                if r.version != version {
                    return Err(RecordWriteError::Conflict);
                }
                *crate::sync::lock(&self.writes) += 1;
                *r = RingRecord {
                    version: version + 1,
                    members,
                    proposals,
                };
                Ok(())
            })
        }
    }

    #[test]
    fn an_agreed_shrink_removes_the_preferred_members_once() {
        let record = grown(4);
        // Preferred: 2 (least loaded here), then the newest.
        let (members, ids) = plan_shrink(&record, 2, &[id(2)], "gw/a", 9);
        assert_eq!(ids, vec![id(2), id(4)]);
        for i in [2, 4] {
            assert!(
                matches!(&members[&id(i)].phase, RecordedPhase::Leaving { by, since: 9 } if by == "gw/a")
            );
        }
        // Another gateway with the same agreement, on the record the first one wrote: nothing.
        let after = record_of(members, 3);
        let (same, none) = plan_shrink(&after, 2, &[id(1)], "gw/b", 10);
        assert!(none.is_empty());
        assert_eq!(same, after.members);
        // A reservation is never removed, nor counted past the members available.
        let (members, _) =
            with_router(|r| plan_grow(&after, 3, "server-", 10, r, "gw/b", 11).expect("grow"));
        let joining = record_of(members, 4);
        let (_, ids) = plan_shrink(&joining, 2, &[], "gw/a", 12);
        assert_eq!(ids, vec![id(3)], "the newest member, not the reservation");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_adds_through_the_record_never_share_an_id_or_a_slot() {
        let store = std::sync::Arc::new(Store::default());
        let calls: Vec<_> = (0..4)
            .map(|k| {
                let store = store.clone();
                tokio::spawn(async move {
                    let (c, p) = (Config::default(), PolicySet::empty());
                    let me = format!("gw-{}", k % 2);
                    update(&*store, |rec| {
                        plan_add(rec, &req(1, &[]), &LIMITS, &Router::new(&c, &p), &me, 1)
                    })
                    .await
                })
            })
            .collect();
        let mut reserved = Vec::new();
        for c in calls {
            let (_, r) = c.await.expect("joined").expect("every call lands");
            reserved.extend(r);
        }
        let record = crate::sync::lock(&store.record).clone();
        assert_eq!(record.members.len(), 4, "all accounted for");
        assert_eq!(*crate::sync::lock(&store.writes), 4);
        let mut ids: Vec<ServerId> = reserved.iter().map(|(i, _, _)| *i).collect();
        ids.sort();
        assert_eq!(ids, vec![id(1), id(2), id(3), id(4)]);
        let mut slots: Vec<u32> = record
            .members
            .values()
            .flat_map(|m| m.slots.clone())
            .collect();
        let n = slots.len();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), n, "no slot twice");
        assert!(placement_of(&record, 512, 9).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_plan_writes_nothing() {
        let store = Store::default();
        let err = update(&store, |rec| {
            let m = membership_of(rec).plan_remove(&req(1, &[]))?;
            Ok((rec.members.clone(), m))
        })
        .await
        .expect_err("nothing to remove");
        assert!(matches!(
            err,
            ControlError::Membership(MembershipError::NotEnough { .. })
        ));
        assert_eq!(*crate::sync::lock(&store.writes), 0);
    }
}
