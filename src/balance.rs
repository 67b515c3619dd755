//! Balancing decisions on top of the ring: bounded loads and slow start.
//!
//! Owns: [`choose`], a pure function that picks the server for one request from the servers
//! clockwise of its slot (the owner first), given each one's requests in flight and whether a
//! server that is still ramping up admits this key:
//! - **Consistent hashing with bounded loads** (Mirrokni, Thorup, Zadimoghaddam 2018; HAProxy's
//!   `hash-balance-factor`, Envoy's `hash_balance_factor`): with `ring.balance_factor` c ≥ 1, no
//!   server takes a request while it carries ⌈c · (in flight + 1) / servers⌉ or more; the
//!   request goes to the next server clockwise under that bound. A key stays with its owner
//!   whenever the owner is under it.
//! - **Slow start on the ring** (`health.slow_start`): a replica that joined takes its keys over
//!   gradually. Key `i` moves to it once [`ramp_admits`] says so: when a stable hash of `i`
//!   falls below the ramp's progress. Progress only grows, so each key moves once, in order of
//!   that hash, and never back; the others stay with the server clockwise that had them.
//!
//! Must not touch: the ring's placement, health, I/O. The proxy calls it with the snapshot's
//! facts; with both features off it is never called.

use crate::hashing::mix64;
use crate::ring::ServerId;

/// Why the chosen server is not the slot's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Owner,
    /// The owner (or an earlier server) was at the load bound.
    OverBound,
    /// The owner is ramping up and this key's turn has not come.
    Ramping,
}

/// One server clockwise of the slot, as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: ServerId,
    /// Requests in flight at it now.
    pub load: u64,
    /// It takes this key (false while it ramps up and the key's turn has not come).
    pub admits: bool,
}

/// The most requests a server may carry when a new one arrives: ⌈c · (in flight + 1) / n⌉.
pub fn load_bound(factor: f64, in_flight: u64, servers: usize) -> u64 {
    if servers == 0 {
        return u64::MAX;
    }
    let mean = (in_flight + 1) as f64 / servers as f64;
    (factor * mean).ceil().max(1.0) as u64
}

/// The server for a request among `candidates` (clockwise, the owner first). `bound` is
/// [`load_bound`]'s answer when bounded loads are on. Falls back to the first admitting
/// candidate, then to the owner, so there is always an answer when there is a candidate.
pub fn choose(
    candidates: impl IntoIterator<Item = Candidate>,
    bound: Option<u64>,
) -> Option<(ServerId, Choice)> {
    let mut owner: Option<ServerId> = None;
    let mut first_admitting: Option<(ServerId, Choice)> = None;
    let mut ramping_seen = false;
    for c in candidates {
        let why = if ramping_seen {
            Choice::Ramping
        } else {
            Choice::OverBound
        };
        let is_owner = owner.is_none();
        owner.get_or_insert(c.id);
        if !c.admits {
            ramping_seen = true;
            continue;
        }
        let choice = if is_owner { Choice::Owner } else { why };
        if first_admitting.is_none() {
            first_admitting = Some((c.id, choice));
        }
        match bound {
            Some(b) if c.load >= b => continue,
            _ => return Some((c.id, choice)),
        }
    }
    first_admitting.or(owner.map(|o| (o, Choice::Owner)))
}

/// Whether a ramping server takes key `i` at `progress` (0 at the start of its window, 1 at the
/// end). The key's place in the ramp is a stable hash of it, so the same key always gets the
/// same answer at the same progress, and a key admitted once is admitted from then on.
pub fn ramp_admits(i: u64, progress: f64) -> bool {
    if progress >= 1.0 {
        return true;
    }
    // The top 53 bits as a fraction in [0, 1).
    let place = (mix64(i ^ RAMP_SALT) >> 11) as f64 / (1u64 << 53) as f64;
    place < progress
}

/// Keeps the ramp's order independent of the built-in `mix64` request hash's own use of it.
const RAMP_SALT: u64 = 0x5157_4152_5453_4c4f;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    fn c(n: u32, load: u64, admits: bool) -> Candidate {
        Candidate {
            id: id(n),
            load,
            admits,
        }
    }

    #[test]
    fn bounds() {
        assert_eq!(load_bound(1.25, 0, 3), 1, "⌈1.25 · 1/3⌉");
        assert_eq!(load_bound(1.25, 11, 3), 5, "⌈1.25 · 12/3⌉");
        assert_eq!(load_bound(1.0, 5, 3), 2);
        assert_eq!(load_bound(2.0, 0, 0), u64::MAX);
    }

    #[test]
    fn the_owner_keeps_its_keys_under_the_bound() {
        assert_eq!(
            choose([c(1, 3, true), c(2, 0, true)], Some(4)),
            Some((id(1), Choice::Owner))
        );
        assert_eq!(
            choose([c(1, 4, true), c(2, 0, true)], Some(4)),
            Some((id(2), Choice::OverBound))
        );
        assert_eq!(
            choose([c(1, 4, true), c(2, 4, true), c(3, 1, true)], Some(4)),
            Some((id(3), Choice::OverBound))
        );
        assert_eq!(
            choose([c(1, 4, true), c(2, 4, true)], Some(4)),
            Some((id(1), Choice::Owner)),
            "everyone full: the owner"
        );
        assert_eq!(choose([], Some(4)), None);
    }

    #[test]
    fn a_ramping_owner_hands_keys_it_does_not_take_yet_to_the_next_server() {
        assert_eq!(
            choose([c(1, 0, false), c(2, 0, true)], None),
            Some((id(2), Choice::Ramping))
        );
        assert_eq!(
            choose([c(1, 0, true), c(2, 0, true)], None),
            Some((id(1), Choice::Owner))
        );
        assert_eq!(
            choose([c(1, 0, false)], None),
            Some((id(1), Choice::Owner)),
            "nobody else: the owner"
        );
    }

    #[test]
    fn the_ramp_admits_its_share() {
        let admitted = (0..100_000u64).filter(|&i| ramp_admits(i, 0.3)).count();
        assert!((28_000..32_000).contains(&admitted), "{admitted}");
        assert!((0..1000u64).all(|i| ramp_admits(i, 1.0)));
        assert!(!(0..1000u64).any(|i| ramp_admits(i, 0.0)));
    }

    proptest! {
        #[test]
        fn no_server_takes_a_request_at_the_bound_while_another_has_room(
            loads in proptest::collection::vec(0u64..20, 1..10),
            factor in 1.0f64..3.0,
        ) {
            let total: u64 = loads.iter().sum();
            let bound = load_bound(factor, total, loads.len());
            let cands: Vec<Candidate> = loads
                .iter()
                .enumerate()
                .map(|(i, &l)| c(i as u32 + 1, l, true))
                .collect();
            let (chosen, _) = choose(cands.clone(), Some(bound)).expect("a choice");
            let load_of = |s: ServerId| cands.iter().find(|c| c.id == s).map(|c| c.load).unwrap_or(0);
            let room = cands.iter().any(|c| c.load < bound);
            if room {
                prop_assert!(load_of(chosen) < bound);
                // And it is the first such server clockwise.
                let first = cands.iter().find(|c| c.load < bound).map(|c| c.id);
                prop_assert_eq!(Some(chosen), first);
            }
        }

        #[test]
        fn the_ramp_is_monotone(i in any::<u64>(), a in 0.0f64..1.0, b in 0.0f64..1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            if ramp_admits(i, lo) {
                prop_assert!(ramp_admits(i, hi), "admitted at {} but not at {}", lo, hi);
            }
        }
    }
}
