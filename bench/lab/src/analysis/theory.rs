//! Why the specified functions skew the load, computed with the gateway's own
//! [`ringgate::hashing`] and [`ringgate::ring`] rather than asserted: which slots the
//! default request hash `H(i) = i² + 2i + 17` can reach modulo the slot count, where the default
//! vnode hash `Φ(i,j) = i² + j² + 2j + 25` places the virtual nodes, and the share of uniformly
//! random keys each server is therefore expected to own.
//!
//! `H(i) mod 2^k` depends only on `i mod 2^k` (a polynomial with integer coefficients, and 2^k
//! divides 2^64, so wrapping arithmetic gives the same residue), so walking one period of residues
//! gives the exact distribution for uniformly random keys.

use std::collections::BTreeMap;

use ringgate::hashing::HashFunction;
use ringgate::ring::{Placement, Ring, ServerId};

/// The specified default request hash, reduced to a slot.
pub fn h_slot(i: u64, slots: u32) -> u32 {
    HashFunction::Quadratic.request_slot(i, slots)
}

/// How the default `H` spreads uniformly random keys over `slots` (a power of two).
#[derive(Debug, Clone)]
pub struct Reach {
    pub slots: u32,
    /// Keys (of one period of `slots` residues) landing on each reachable slot.
    pub hits: BTreeMap<u32, u32>,
}

impl Reach {
    pub fn of_default(slots: u32) -> Reach {
        let mut hits = BTreeMap::new();
        for i in 0..u64::from(slots) {
            *hits.entry(h_slot(i, slots)).or_insert(0) += 1;
        }
        Reach { slots, hits }
    }

    pub fn reachable(&self) -> usize {
        self.hits.len()
    }

    /// The largest share of keys a single slot receives.
    pub fn top_share(&self) -> f64 {
        let max = self.hits.values().copied().max().unwrap_or(0);
        f64::from(max) / f64::from(self.slots.max(1))
    }
}

/// The default placement of servers `1..=n` (`vnodes` each), as the gateway builds it.
fn placement(n: u32, vnodes: u32, slots: u32) -> Option<Placement> {
    let ids: Vec<ServerId> = (1..=n).filter_map(ServerId::new).collect();
    Placement::build(slots, vnodes, &ids, |i, j| {
        HashFunction::Quadratic.vnode_slot(u64::from(i.get()), j, slots)
    })
    .ok()
}

/// Vnode slots of servers `1..=n` under the default `Φ` (collisions probed forward, as the ring
/// does): `(slot, server)` sorted by slot.
pub fn vnode_layout(n: u32, vnodes: u32, slots: u32) -> Vec<(u32, u32)> {
    let Some(p) = placement(n, vnodes, slots) else {
        return Vec::new();
    };
    (0..slots)
        .filter_map(|s| p.occupant(s).map(|(id, _)| (s, id.get())))
        .collect()
}

/// Expected share of uniformly random keys per server `1..=n` under the default functions.
pub fn predicted_shares(n: u32, vnodes: u32, slots: u32) -> Vec<f64> {
    let mut shares = vec![0.0; n as usize];
    let Some(p) = placement(n, vnodes, slots) else {
        return shares;
    };
    let ring = Ring::build(&p, |_| true);
    let reach = Reach::of_default(slots);
    for (slot, hits) in &reach.hits {
        if let Some(id) = ring.owner(*slot) {
            if let Some(x) = shares.get_mut(id.get() as usize - 1) {
                *x += f64::from(*hits) / f64::from(slots);
            }
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h_reaches_a_small_part_of_the_ring() {
        let r = Reach::of_default(512);
        // (i+1)² + 16: the squares modulo 512 are few.
        assert!(r.reachable() < 512 / 4);
        assert_eq!(r.hits.values().sum::<u32>(), 512);
        assert_eq!(h_slot(u64::MAX, 512), h_slot(511, 512));
    }

    #[test]
    fn phi_packs_vnodes_low_on_the_ring() {
        let layout = vnode_layout(3, 9, 512);
        assert_eq!(layout.len(), 27);
        assert!(layout.iter().all(|(s, _)| *s < 200));
        let shares = predicted_shares(3, 9, 512);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
