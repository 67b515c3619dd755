//! Where a request goes first: its key, the key's slot, the slot's owner, and the server bounded
//! loads or a replica's slow start choose instead (with its place under the bound taken).
//!
//! Owns: [`route`] and [`Route`]. The key and the slot come from [`crate::routing`] (the same
//! code the tools and the what-if endpoint use); the choices are [`crate::balance`]'s.
//! Must not touch: connections, bodies, or what a failure means.

use std::sync::atomic::Ordering;

use http::request::Parts;

use crate::balance;
use crate::metrics::Metrics;
use crate::rescue::GatewayError;
use crate::ring::ServerId;
use crate::snapshot::{InFlight, Snapshot};

/// Where a request goes first.
pub struct Route {
    /// The slot of the request's key (retries go on clockwise from it).
    pub slot: u32,
    /// The server the first attempt goes to.
    pub first: ServerId,
    /// Its place under the bounded-load bound, when one was taken with the choice.
    pub reserved: Option<InFlight>,
}

/// Routes a request with head `parts` from `client_ip`: no server in the ring is a 503.
pub fn route(
    snap: &Snapshot,
    metrics: &Metrics,
    parts: &Parts,
    client_ip: std::net::IpAddr,
) -> Result<Route, GatewayError> {
    let router = snap.router();
    let key = router.key(parts, client_ip);
    let slot = router.request_slot(key);
    let owner = snap.ring.owner(slot).ok_or(GatewayError::NoReplica)?;
    let (first, reserved) = balanced(snap, metrics, slot, key, owner);
    Ok(Route {
        slot,
        first,
        reserved,
    })
}

/// The first server for key `key` at `slot`: its owner, unless bounded loads or a replica's
/// slow start say otherwise (`crate::balance`). Off by default, and then only the owner.
/// Under bounded loads the place under the bound is taken in the same step as the choice
/// ([`InFlight::reserve`]), so concurrent requests cannot push a server past it; the count
/// comes back with the server.
fn balanced(
    snap: &Snapshot,
    metrics: &Metrics,
    slot: u32,
    key: u64,
    owner: ServerId,
) -> (ServerId, Option<InFlight>) {
    // A choice lost to a concurrent request is made again on the new loads, a few times.
    const ROUNDS: usize = 4;
    let factor = snap.config.ring.balance_factor;
    if factor == 0.0 && snap.ramps_until.is_none() {
        return (owner, None); // the usual case: not even the clock is read
    }
    let now = tokio::time::Instant::now();
    let ramping = snap.ramps_until.is_some_and(|until| now < until);
    if factor == 0.0 && !ramping {
        return (owner, None);
    }
    let mut round = 0;
    loop {
        round += 1;
        let bound = (factor > 0.0).then(|| {
            let in_flight: u64 = snap
                .upstreams
                .iter()
                .flatten()
                .map(|u| u.stats.load())
                .sum();
            balance::load_bound(factor, in_flight, snap.ring.servers())
        });
        let candidates = snap.ring.successors(slot).filter_map(|id| {
            let u = snap.upstream(id)?;
            Some(balance::Candidate {
                id,
                load: u.stats.load(),
                admits: u.ramp.is_none_or(|r| r.admits(key, now)),
            })
        });
        let Some((id, why)) = balance::choose(candidates, bound) else {
            return (owner, None);
        };
        let reserved = match (bound, snap.upstream(id)) {
            (Some(b), Some(u)) => match InFlight::reserve(&u.stats, b) {
                Some(counted) => Some(counted),
                None if round < ROUNDS => continue,
                // Every server is at the bound: the choice stands, over it.
                None => None,
            },
            _ => None,
        };
        if id != owner {
            let counter = match why {
                balance::Choice::Ramping => &metrics.diverted_slow_start,
                _ => &metrics.diverted_load,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        return (id, reserved);
    }
}
