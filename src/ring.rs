//! The consistent-hash ring.
//!
//! Owns: where each server's virtual nodes sit ([`Placement`]) and the owner table that maps
//! every slot to the next routable server clockwise ([`Ring`]).
//! Must not touch: health, replicas, I/O, async, metrics, Lua. It is handed a membership, a
//! virtual-node hash and a "routable" predicate, and answers `owner(slot)`; everything else asks it.
//!
//! Two layers keep keys where they are:
//! - [`Placement`] changes only when membership changes (`/add`, `/rm`). It is incremental: a new
//!   server's virtual nodes probe forward past every slot already taken, and removing a server
//!   frees its slots without moving anyone else's. So adding a server moves only keys that now
//!   belong to it, and removing one moves only its own keys, even when virtual nodes collide.
//! - [`Ring`] is rebuilt from the placement on every change of membership *or health*: a down
//!   server keeps its slots in the placement but is skipped by the owner table, so when its
//!   replacement (same id) comes back it takes back exactly the same positions.

use std::fmt;
use std::num::NonZeroU32;

/// A server's small, stable id: a replacement for a dead replica reuses it, so its virtual nodes
/// land on the same slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(NonZeroU32);

impl ServerId {
    pub const MAX: ServerId = ServerId(NonZeroU32::MAX);

    pub fn new(id: u32) -> Option<ServerId> {
        NonZeroU32::new(id).map(ServerId)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring.slots must be at least 1 (got {0})")]
    NoSlots(u32),
    #[error("ring.vnodes must be between 1 and ring.slots ({slots}), got {vnodes}")]
    BadVnodes { vnodes: u32, slots: u32 },
    #[error(
        "the ring is full: {slots} slots hold at most {capacity} servers of {vnodes} virtual nodes; \
         raise ring.slots or lower ring.vnodes"
    )]
    Full {
        slots: u32,
        vnodes: u32,
        capacity: usize,
    },
    #[error("server {0} is already on the ring")]
    AlreadyMember(ServerId),
    #[error("server {id}: its recorded slots {slots:?} cannot be restored: {problem}")]
    BadRecord {
        id: ServerId,
        slots: Vec<u32>,
        problem: RecordProblem,
    },
}

/// Why recorded slots cannot be restored as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    #[error("{got} slots recorded, ring.vnodes is {vnodes}")]
    WrongCount { got: usize, vnodes: u32 },
    #[error("slot {slot} is outside the ring (ring.slots is {slots})")]
    OutOfRange { slot: u32, slots: u32 },
    #[error("slot {0} is recorded twice")]
    Duplicate(u32),
    #[error("slot {slot} is already held by server {holder}")]
    Taken { slot: u32, holder: ServerId },
}

/// Which virtual node of which server occupies each slot. Changes only with membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    slots: u32,
    vnodes: u32,
    occupant: Vec<Option<(ServerId, u32)>>,
    /// Servers in the order they joined: the order their virtual nodes were placed in.
    members: Vec<ServerId>,
}

impl Placement {
    pub fn new(slots: u32, vnodes: u32) -> Result<Placement, RingError> {
        if slots == 0 {
            return Err(RingError::NoSlots(slots));
        }
        if vnodes == 0 || vnodes > slots {
            return Err(RingError::BadVnodes { vnodes, slots });
        }
        Ok(Placement {
            slots,
            vnodes,
            occupant: vec![None; slots as usize],
            members: Vec::new(),
        })
    }

    /// A placement of `ids`, added in the given order with the virtual-node hash `vnode_slot(i, j)`.
    pub fn build(
        slots: u32,
        vnodes: u32,
        ids: &[ServerId],
        mut vnode_slot: impl FnMut(ServerId, u32) -> u32,
    ) -> Result<Placement, RingError> {
        let mut p = Placement::new(slots, vnodes)?;
        for &id in ids {
            p.add(id, |j| vnode_slot(id, j))?;
        }
        Ok(p)
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// How many servers fit: every server needs `vnodes` distinct slots.
    pub fn capacity(&self) -> usize {
        (self.slots / self.vnodes) as usize
    }

    pub fn members(&self) -> &[ServerId] {
        &self.members
    }

    pub fn contains(&self, id: ServerId) -> bool {
        self.members.contains(&id)
    }

    /// Places server `id`'s virtual nodes: node `j` at `preferred(j) mod slots`, or, when that slot
    /// is taken, the next free slot clockwise. Nothing already placed moves.
    pub fn add(
        &mut self,
        id: ServerId,
        mut preferred: impl FnMut(u32) -> u32,
    ) -> Result<(), RingError> {
        if self.contains(id) {
            return Err(RingError::AlreadyMember(id));
        }
        if self.members.len() >= self.capacity() {
            return Err(RingError::Full {
                slots: self.slots,
                vnodes: self.vnodes,
                capacity: self.capacity(),
            });
        }
        for j in 0..self.vnodes {
            let start = preferred(j) % self.slots;
            // Capacity was checked above, so a free slot exists and the probe terminates.
            let free = (0..self.slots)
                .map(|k| (start + k) % self.slots)
                .find(|&s| self.occupant[s as usize].is_none());
            if let Some(s) = free {
                self.occupant[s as usize] = Some((id, j));
            }
        }
        self.members.push(id);
        Ok(())
    }

    /// Puts server `id`'s virtual nodes back at the slots recorded for it (node `j` at
    /// `slots[j]`), as they were placed when it was created. Checked first, all or nothing: as
    /// many slots as `vnodes`, each on the ring, none twice, none held by another server.
    pub fn restore(&mut self, id: ServerId, slots: &[u32]) -> Result<(), RingError> {
        if self.contains(id) {
            return Err(RingError::AlreadyMember(id));
        }
        if self.members.len() >= self.capacity() {
            return Err(RingError::Full {
                slots: self.slots,
                vnodes: self.vnodes,
                capacity: self.capacity(),
            });
        }
        let bad = |problem| RingError::BadRecord {
            id,
            slots: slots.to_vec(),
            problem,
        };
        if slots.len() != self.vnodes as usize {
            return Err(bad(RecordProblem::WrongCount {
                got: slots.len(),
                vnodes: self.vnodes,
            }));
        }
        for (k, &slot) in slots.iter().enumerate() {
            if slot >= self.slots {
                return Err(bad(RecordProblem::OutOfRange {
                    slot,
                    slots: self.slots,
                }));
            }
            if slots[..k].contains(&slot) {
                return Err(bad(RecordProblem::Duplicate(slot)));
            }
            if let Some((holder, _)) = self.occupant[slot as usize] {
                return Err(bad(RecordProblem::Taken { slot, holder }));
            }
        }
        for (j, &slot) in (0u32..).zip(slots) {
            self.occupant[slot as usize] = Some((id, j));
        }
        self.members.push(id);
        Ok(())
    }

    /// Frees server `id`'s slots; every other virtual node stays where it is.
    pub fn remove(&mut self, id: ServerId) -> bool {
        let Some(pos) = self.members.iter().position(|&m| m == id) else {
            return false;
        };
        self.members.remove(pos);
        for o in &mut self.occupant {
            if matches!(o, Some((s, _)) if *s == id) {
                *o = None;
            }
        }
        true
    }

    /// The server and virtual-node index at `slot`, if any.
    pub fn occupant(&self, slot: u32) -> Option<(ServerId, u32)> {
        self.occupant.get(slot as usize).copied().flatten()
    }

    /// The slots server `id`'s virtual nodes occupy, in vnode order.
    pub fn positions(&self, id: ServerId) -> Vec<u32> {
        let mut v: Vec<(u32, u32)> = (0..self.slots)
            .filter_map(|s| match self.occupant[s as usize] {
                Some((o, j)) if o == id => Some((j, s)),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, s)| s).collect()
    }
}

/// The routing table: for every slot, the next routable server clockwise. Immutable; built when
/// membership or health changes, then only read.
#[derive(Debug, Clone)]
pub struct Ring {
    slots: u32,
    owner: Box<[Option<ServerId>]>,
    /// The routable server whose virtual node sits exactly at each slot (for successor walks).
    at: Box<[Option<ServerId>]>,
    servers: usize,
}

impl Ring {
    /// A ring with no server: every lookup answers `None`.
    pub fn empty(slots: u32) -> Ring {
        Ring {
            slots: slots.max(1),
            owner: vec![None; slots.max(1) as usize].into(),
            at: vec![None; slots.max(1) as usize].into(),
            servers: 0,
        }
    }

    /// Builds the owner table over the servers of `placement` for which `routable` holds.
    pub fn build(placement: &Placement, routable: impl Fn(ServerId) -> bool) -> Ring {
        let n = placement.slots as usize;
        let at: Box<[Option<ServerId>]> = placement
            .occupant
            .iter()
            .map(|o| o.map(|(s, _)| s).filter(|&s| routable(s)))
            .collect();
        let servers = placement.members.iter().filter(|&&m| routable(m)).count();
        let mut owner = vec![None; n];
        // Walk counter-clockwise twice so each slot sees the nearest occupied slot at or after it,
        // including across the wrap from the last slot to the first.
        let mut next = None;
        for k in (0..2 * n).rev() {
            let s = k % n;
            if at[s].is_some() {
                next = at[s];
            }
            if k < n {
                owner[s] = next;
            }
        }
        Ring {
            slots: placement.slots,
            owner: owner.into(),
            at,
            servers,
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// How many routable servers the table routes to.
    pub fn servers(&self) -> usize {
        self.servers
    }

    /// A fingerprint of the owner table: FNV-1a (64 bits, fixed parameters) over every slot's
    /// owner id in slot order (0 for none). Two gateways that route every key identically show
    /// the same fingerprint; any difference in who owns what changes it.
    pub fn fingerprint(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = OFFSET;
        for owner in self.owner.iter() {
            for b in owner.map_or(0, ServerId::get).to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(PRIME);
            }
        }
        h
    }

    /// The server owning `slot`: one array index.
    #[inline]
    pub fn owner(&self, slot: u32) -> Option<ServerId> {
        self.owner.get(slot as usize).copied().flatten()
    }

    /// Distinct routable servers clockwise from `slot`, the owner first: the retry order.
    pub fn successors(&self, slot: u32) -> impl Iterator<Item = ServerId> + '_ {
        let n = self.slots as usize;
        let start = slot as usize % n;
        let mut seen: Vec<ServerId> = Vec::with_capacity(4);
        (0..n).filter_map(move |k| {
            let s = self.at[(start + k) % n]?;
            if seen.contains(&s) {
                None
            } else {
                seen.push(s);
                Some(s)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::HashFunction;
    use proptest::prelude::*;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero id")
    }

    fn quadratic(slots: u32) -> impl FnMut(ServerId, u32) -> u32 {
        move |i, j| HashFunction::Quadratic.vnode_slot(u64::from(i.get()), j, slots)
    }

    /// The definition, slot by slot: walk clockwise until a routable virtual node.
    fn naive_owner(
        p: &Placement,
        routable: &dyn Fn(ServerId) -> bool,
        slot: u32,
    ) -> Option<ServerId> {
        (0..p.slots())
            .map(|k| (slot + k) % p.slots())
            .find_map(|s| p.occupant(s).map(|(o, _)| o).filter(|&o| routable(o)))
    }

    #[test]
    fn specified_placement_for_three_servers() {
        // Φ(i,j) = i² + j² + 2j + 25: server 1's vnodes prefer 26, 29, 34, 41, 50, 61, 74, 89, 106.
        let p =
            Placement::build(512, 9, &[id(1), id(2), id(3)], quadratic(512)).expect("placement");
        assert_eq!(
            p.positions(id(1)),
            vec![26, 29, 34, 41, 50, 61, 74, 89, 106]
        );
        // Server 2 prefers 29, 32, 37, ...: 29 is taken by server 1, so it probes to 30.
        assert_eq!(p.positions(id(2))[..3], [30, 32, 37]);
        let ring = Ring::build(&p, |_| true);
        assert_eq!(ring.owner(26), Some(id(1)));
        assert_eq!(ring.owner(27), Some(id(1))); // next clockwise is 29 (server 1)
        assert_eq!(ring.owner(30), Some(id(2)));
        assert_eq!(ring.servers(), 3);
    }

    #[test]
    fn wraps_around_past_the_last_slot() {
        let mut p = Placement::new(16, 1).expect("placement");
        p.add(id(1), |_| 3).expect("add");
        p.add(id(2), |_| 10).expect("add");
        let ring = Ring::build(&p, |_| true);
        assert_eq!(
            ring.owner(11),
            Some(id(1)),
            "slots after the last vnode wrap to the first"
        );
        assert_eq!(ring.owner(15), Some(id(1)));
        assert_eq!(ring.owner(0), Some(id(1)));
        assert_eq!(ring.owner(4), Some(id(2)));
        assert_eq!(ring.successors(11).collect::<Vec<_>>(), vec![id(1), id(2)]);
    }

    #[test]
    fn probes_forward_across_the_end() {
        let mut p = Placement::new(4, 2).expect("placement");
        p.add(id(1), |_| 3).expect("add");
        assert_eq!(p.positions(id(1)), vec![3, 0]);
    }

    #[test]
    fn full_ring_is_a_clear_error() {
        let mut p = Placement::new(8, 3).expect("placement");
        p.add(id(1), |j| j).expect("add");
        p.add(id(2), |j| j).expect("add");
        let err = p.add(id(3), |j| j).expect_err("full");
        assert_eq!(
            err,
            RingError::Full {
                slots: 8,
                vnodes: 3,
                capacity: 2
            }
        );
        assert!(err
            .to_string()
            .contains("raise ring.slots or lower ring.vnodes"));
        assert_eq!(p.members(), &[id(1), id(2)], "a failed add changes nothing");
        assert_eq!(p.add(id(1), |j| j), Err(RingError::AlreadyMember(id(1))));
    }

    #[test]
    fn bad_parameters() {
        assert_eq!(Placement::new(0, 1), Err(RingError::NoSlots(0)));
        assert_eq!(
            Placement::new(4, 5),
            Err(RingError::BadVnodes {
                vnodes: 5,
                slots: 4
            })
        );
        assert_eq!(
            Placement::new(4, 0),
            Err(RingError::BadVnodes {
                vnodes: 0,
                slots: 4
            })
        );
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let ring = Ring::empty(512);
        assert_eq!(ring.owner(0), None);
        assert_eq!(ring.successors(0).count(), 0);
        let p = Placement::build(512, 9, &[id(1)], quadratic(512)).expect("placement");
        assert_eq!(Ring::build(&p, |_| false).owner(7), None);
    }

    #[test]
    fn restore_puts_a_server_back_at_its_recorded_slots() {
        let mut p = Placement::new(16, 3).expect("placement");
        p.restore(id(4), &[9, 2, 15]).expect("valid record");
        assert_eq!(p.positions(id(4)), vec![9, 2, 15], "in vnode order");
        assert_eq!(p.occupant(2), Some((id(4), 1)));
        let ring = Ring::build(&p, |_| true);
        assert_eq!(ring.owner(3), Some(id(4)));
    }

    #[test]
    fn a_bad_record_is_refused_whole() {
        let mut p = Placement::new(16, 3).expect("placement");
        p.restore(id(1), &[0, 1, 2]).expect("valid record");
        let before = p.clone();
        let problem = |r: Result<(), RingError>| match r {
            Err(RingError::BadRecord { problem, .. }) => problem,
            other => panic!("expected a bad record, got {other:?}"),
        };
        assert_eq!(
            problem(p.restore(id(2), &[5, 6])),
            RecordProblem::WrongCount { got: 2, vnodes: 3 }
        );
        assert_eq!(
            problem(p.restore(id(2), &[5, 6, 16])),
            RecordProblem::OutOfRange {
                slot: 16,
                slots: 16
            }
        );
        assert_eq!(
            problem(p.restore(id(2), &[5, 6, 5])),
            RecordProblem::Duplicate(5)
        );
        assert_eq!(
            problem(p.restore(id(2), &[5, 2, 7])),
            RecordProblem::Taken {
                slot: 2,
                holder: id(1)
            }
        );
        assert_eq!(
            p.restore(id(1), &[7, 8, 9]),
            Err(RingError::AlreadyMember(id(1)))
        );
        assert_eq!(p, before, "a refused record changes nothing");
        let e = p.restore(id(2), &[5, 2, 7]).expect_err("taken");
        assert!(e.to_string().contains("already held by server 1"), "{e}");
    }

    #[test]
    fn the_fingerprint_follows_the_owner_table() {
        let p = Placement::build(512, 9, &[id(1), id(2), id(3)], quadratic(512)).expect("p");
        let all = Ring::build(&p, |_| true);
        let again = Ring::build(&p, |_| true);
        assert_eq!(all.fingerprint(), again.fingerprint());
        let without = Ring::build(&p, |s| s != id(2));
        assert_ne!(all.fingerprint(), without.fingerprint());
        assert_ne!(Ring::empty(512).fingerprint(), all.fingerprint());
        // Fixed parameters (FNV-1a of four zero bytes, computed independently): the same table has
        // the same fingerprint in every process.
        assert_eq!(Ring::empty(1).fingerprint(), 0x4d25_767f_9dce_13f5);
    }

    /// Membership changes as they happen: `(true, id)` adds `id`, `(false, id)` removes it.
    fn history() -> impl Strategy<Value = (u32, u32, Vec<(bool, u32)>)> {
        (8u32..200, 1u32..10).prop_flat_map(|(slots, vnodes)| {
            let vnodes = vnodes.min(slots);
            (
                Just(slots),
                Just(vnodes),
                proptest::collection::vec((proptest::bool::weighted(0.7), 1u32..=40), 0..60),
            )
        })
    }

    /// Applies `ops` one by one, as a long-running gateway would (skipping adds past capacity
    /// and removes of non-members).
    fn incremental(slots: u32, vnodes: u32, ops: &[(bool, u32)]) -> Placement {
        let mut p = Placement::new(slots, vnodes).expect("placement");
        for &(add, n) in ops {
            if add && !p.contains(id(n)) && p.members().len() < p.capacity() {
                p.add(id(n), |j| quadratic(slots)(id(n), j)).expect("room");
            } else if !add {
                p.remove(id(n));
            }
        }
        p
    }

    fn owners(ring: &Ring) -> Vec<Option<ServerId>> {
        (0..ring.slots()).map(|s| ring.owner(s)).collect()
    }

    fn membership() -> impl Strategy<Value = (u32, u32, Vec<u32>, Vec<bool>)> {
        (1u32..200, 1u32..10).prop_flat_map(|(slots, vnodes)| {
            let vnodes = vnodes.min(slots);
            let cap = (slots / vnodes) as usize;
            (
                Just(slots),
                Just(vnodes),
                proptest::sample::subsequence((1u32..=60).collect::<Vec<_>>(), 0..=cap.min(60))
                    .prop_shuffle(),
                proptest::collection::vec(any::<bool>(), 60),
            )
        })
    }

    proptest! {
        #[test]
        fn owner_table_equals_naive_scan((slots, vnodes, ids, up) in membership(), mix in any::<bool>()) {
            let f = if mix { HashFunction::Mix64 } else { HashFunction::Quadratic };
            let ids: Vec<ServerId> = ids.into_iter().map(id).collect();
            let p = Placement::build(slots, vnodes, &ids, |i, j| f.vnode_slot(u64::from(i.get()), j, slots))
                .expect("within capacity");
            let routable = |s: ServerId| up[(s.get() - 1) as usize];
            let ring = Ring::build(&p, routable);
            for slot in 0..slots {
                prop_assert_eq!(ring.owner(slot), naive_owner(&p, &routable, slot));
            }
            // Every member holds exactly `vnodes` slots.
            for &m in &ids {
                prop_assert_eq!(p.positions(m).len(), vnodes as usize);
            }
        }

        #[test]
        fn a_rebuild_from_recorded_slots_equals_the_incremental_table((slots, vnodes, ops) in history()) {
            let live = incremental(slots, vnodes, &ops);
            let mut rebuilt = Placement::new(slots, vnodes).expect("placement");
            for &m in live.members() {
                rebuilt.restore(m, &live.positions(m)).expect("a recorded placement restores");
            }
            prop_assert_eq!(owners(&Ring::build(&rebuilt, |_| true)), owners(&Ring::build(&live, |_| true)));
            for &m in live.members() {
                prop_assert_eq!(rebuilt.positions(m), live.positions(m));
            }
        }

        #[test]
        fn any_order_of_observing_a_membership_gives_the_same_table((slots, vnodes, ops) in history(), seed in any::<u64>()) {
            let live = incremental(slots, vnodes, &ops);
            let mut order: Vec<ServerId> = live.members().to_vec();
            // A deterministic shuffle from the seed: another gateway lists the engine's
            // replicas in another order.
            let mut rng = seed;
            for i in (1..order.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let mut seen = Placement::new(slots, vnodes).expect("placement");
            for &m in &order {
                seen.restore(m, &live.positions(m)).expect("restores");
            }
            let ring = Ring::build(&seen, |_| true);
            prop_assert_eq!(owners(&ring), owners(&Ring::build(&live, |_| true)));
            prop_assert_eq!(ring.fingerprint(), Ring::build(&live, |_| true).fingerprint());
        }

        #[test]
        fn adding_moves_only_keys_to_the_new_server((slots, vnodes, ids, _up) in membership(), extra in 61u32..100) {
            let ids: Vec<ServerId> = ids.into_iter().map(id).collect();
            prop_assume!(ids.len() < (slots / vnodes) as usize);
            let mut p = Placement::build(slots, vnodes, &ids, quadratic(slots)).expect("placement");
            let before = Ring::build(&p, |_| true);
            p.add(id(extra), |j| quadratic(slots)(id(extra), j)).expect("room for one more");
            let after = Ring::build(&p, |_| true);
            for slot in 0..slots {
                let (b, a) = (before.owner(slot), after.owner(slot));
                prop_assert!(a == b || a == Some(id(extra)), "slot {} moved {:?} -> {:?}", slot, b, a);
            }
        }

        #[test]
        fn removing_moves_only_the_removed_servers_keys((slots, vnodes, ids, _up) in membership(), pick in any::<proptest::sample::Index>()) {
            let ids: Vec<ServerId> = ids.into_iter().map(id).collect();
            prop_assume!(!ids.is_empty());
            let gone = ids[pick.index(ids.len())];
            let mut p = Placement::build(slots, vnodes, &ids, quadratic(slots)).expect("placement");
            let before = Ring::build(&p, |_| true);
            prop_assert!(p.remove(gone));
            let after = Ring::build(&p, |_| true);
            for slot in 0..slots {
                let (b, a) = (before.owner(slot), after.owner(slot));
                prop_assert!(a == b || b == Some(gone), "slot {} moved {:?} -> {:?}", slot, b, a);
            }
        }

        #[test]
        fn a_down_server_comes_back_to_the_same_slots((slots, vnodes, ids, _up) in membership(), pick in any::<proptest::sample::Index>()) {
            let ids: Vec<ServerId> = ids.into_iter().map(id).collect();
            prop_assume!(!ids.is_empty());
            let down = ids[pick.index(ids.len())];
            let p = Placement::build(slots, vnodes, &ids, quadratic(slots)).expect("placement");
            let all = Ring::build(&p, |_| true);
            let without = Ring::build(&p, |s| s != down);
            for slot in 0..slots {
                let (b, a) = (all.owner(slot), without.owner(slot));
                prop_assert!(a == b || b == Some(down));
            }
            let again = Ring::build(&p, |_| true);
            for slot in 0..slots {
                prop_assert_eq!(all.owner(slot), again.owner(slot));
            }
        }

        #[test]
        fn successors_are_distinct_and_start_with_the_owner((slots, vnodes, ids, up) in membership(), slot in any::<u32>()) {
            let ids: Vec<ServerId> = ids.into_iter().map(id).collect();
            let p = Placement::build(slots, vnodes, &ids, quadratic(slots)).expect("placement");
            let routable = |s: ServerId| up[(s.get() - 1) as usize];
            let ring = Ring::build(&p, routable);
            let slot = slot % slots;
            let succ: Vec<ServerId> = ring.successors(slot).collect();
            prop_assert_eq!(succ.first().copied(), ring.owner(slot));
            prop_assert_eq!(succ.len(), ring.servers());
            let mut dedup = succ.clone();
            dedup.sort();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), succ.len());
        }
    }
}
