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
