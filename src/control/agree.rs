//! Several gateways autoscaling one shared ring (the `swarm` provider): how they agree on N.
//!
//! Owns: the pure rules over the [`Proposals`] the gateways publish in the ring record (each
//! gateway's own autoscaler's N, with its name and when it said so): which proposals are live
//! ([`live`]: refreshed within [`PROPOSAL_TTL`], so a gateway that died stops counting),
//! the N they agree on ([`agreed`]: the largest live proposal, so scale-up takes the largest
//! and N falls only when every live gateway proposes less), when a gateway writes its own
//! proposal again ([`due`]) and what its write leaves in the record ([`with_mine`]: its own
//! entry, others' entries, long-dead gateways' entries dropped). A single gateway is the
//! local autoscaler: its own proposal is the agreed N.
//! Must not touch: I/O, the clock, the record's engine or membership. The controller passes
//! the time and the record in and carries the agreed N out (`scaling`, `shared_ops`).

use std::time::Duration;

use crate::provider::{Proposal, Proposals};

/// How long a proposal counts after it was written: a gateway refreshes its own every
/// [`REFRESH`], so three refreshes in a row must be missed (the gateway stopped, or cannot
/// reach the engine) before its proposal stops holding N up. Wall-clock times compared across
/// gateways: clocks must agree to well within this (NTP does).
pub const PROPOSAL_TTL: Duration = Duration::from_secs(15);

/// How often a gateway writes its proposal even when it did not change.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Entries of gateways silent for this long are dropped from the record by the next write
/// (until then `/lb/status` shows them, not live).
pub const FORGET: Duration = Duration::from_secs(60);

fn age_ms(p: &Proposal, now_ms: u64) -> u64 {
    now_ms.saturating_sub(p.at_ms)
}

/// Whether `p` still counts at `now_ms`.
pub fn is_live(p: &Proposal, now_ms: u64, ttl: Duration) -> bool {
    u128::from(age_ms(p, now_ms)) <= ttl.as_millis()
}

/// The proposals that still count at `now_ms`.
pub fn live(proposals: &Proposals, now_ms: u64, ttl: Duration) -> impl Iterator<Item = &Proposal> {
    proposals.values().filter(move |p| is_live(p, now_ms, ttl))
}

/// The N the live proposals agree on: the largest. Up takes the largest proposal at once;
/// N falls only when every live gateway proposes less than N now, and then to the largest of
/// them, so no gateway's proposal is ever undercut by another's. `None` when no proposal
/// counts (nobody autoscales: N stays as it is).
pub fn agreed(proposals: &Proposals, now_ms: u64, ttl: Duration) -> Option<u32> {
    live(proposals, now_ms, ttl).map(|p| p.n).max()
}

/// Whether gateway `me` should write its proposal `n` now: it is not in the record yet, says
/// another N, or is [`REFRESH`] old.
pub fn due(proposals: &Proposals, me: &str, n: u32, now_ms: u64) -> bool {
    proposals
        .get(me)
        .is_none_or(|p| p.n != n || u128::from(age_ms(p, now_ms)) >= REFRESH.as_millis())
}

/// The proposals after gateway `me` writes `n` at `now_ms`: its entry replaced, the others
/// kept, those silent for [`FORGET`] dropped (a restarted gateway has a new name, so its old
/// run's entry would otherwise stay forever).
pub fn with_mine(proposals: &Proposals, me: &str, n: u32, now_ms: u64) -> Proposals {
    let mut out: Proposals = proposals
        .iter()
        .filter(|(g, p)| g.as_str() != me && is_live(p, now_ms, FORGET))
        .map(|(g, p)| (g.clone(), p.clone()))
        .collect();
    let mine = Proposal {
        gateway: me.to_owned(),
        n,
        at_ms: now_ms,
    };
    out.insert(me.to_owned(), mine);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;
    const TTL: Duration = PROPOSAL_TTL;

    fn of(entries: &[(&str, u32, u64)]) -> Proposals {
        entries
            .iter()
            .map(|&(g, n, at_ms)| {
                let p = Proposal {
                    gateway: g.into(),
                    n,
                    at_ms,
                };
                (g.to_owned(), p)
            })
            .collect()
    }

    #[test]
    fn a_single_gateway_is_the_local_autoscaler() {
        for n in [0, 1, 3, 10] {
            assert_eq!(agreed(&of(&[("a", n, T0)]), T0 + 1000, TTL), Some(n));
        }
        assert_eq!(agreed(&Proposals::new(), T0, TTL), None, "nobody asks");
    }

    #[test]
    fn scale_up_takes_the_largest_proposal() {
        let p = of(&[("a", 2, T0), ("b", 5, T0 + 10), ("c", 3, T0 - 10)]);
        assert_eq!(agreed(&p, T0 + 1000, TTL), Some(5));
    }

    #[test]
    fn scale_down_only_when_every_live_gateway_proposes_less() {
        // N is 5 (b asked for it). a wants 2, b still 5: N stays.
        let p = of(&[("a", 2, T0), ("b", 5, T0)]);
        assert_eq!(agreed(&p, T0, TTL), Some(5));
        // b comes down to 3: N falls, but only to what b still needs.
        let p = of(&[("a", 2, T0), ("b", 3, T0)]);
        assert_eq!(agreed(&p, T0, TTL), Some(3));
        // Both at 2: N is 2.
        let p = of(&[("a", 2, T0), ("b", 2, T0)]);
        assert_eq!(agreed(&p, T0, TTL), Some(2));
    }

    #[test]
    fn a_stale_proposal_stops_counting_after_the_bound() {
        // b died proposing 8 at T0; a refreshes its 2.
        let p = of(&[("a", 2, T0 + 20_000), ("b", 8, T0)]);
        let ttl_ms = TTL.as_millis() as u64;
        assert_eq!(
            agreed(&p, T0 + ttl_ms, TTL),
            Some(8),
            "still live at the bound"
        );
        assert_eq!(
            agreed(&p, T0 + ttl_ms + 1, TTL),
            Some(2),
            "past it: ignored"
        );
        assert_eq!(live(&p, T0 + ttl_ms + 1, TTL).count(), 1);
        // Every proposal stale: nobody asks, N stays.
        assert_eq!(agreed(&p, T0 + 20_000 + ttl_ms + 1, TTL), None);
        // A clock ahead of ours: counted until the bound after its own time.
        let p = of(&[("a", 2, T0), ("b", 4, T0 + 3_000)]);
        assert_eq!(agreed(&p, T0, TTL), Some(4));
    }

    #[test]
    fn a_proposal_is_written_when_new_changed_or_due_for_refresh() {
        let p = of(&[("a", 2, T0)]);
        assert!(due(&p, "b", 2, T0), "not in the record yet");
        assert!(!due(&p, "a", 2, T0 + 1000), "unchanged and fresh");
        assert!(due(&p, "a", 3, T0 + 1000), "changed");
        let refresh = REFRESH.as_millis() as u64;
        assert!(!due(&p, "a", 2, T0 + refresh - 1));
        assert!(
            due(&p, "a", 2, T0 + refresh),
            "refreshed well within the TTL"
        );
        assert!(REFRESH * 3 <= PROPOSAL_TTL);
    }

    #[test]
    fn a_write_replaces_its_own_entry_keeps_others_and_drops_the_long_dead() {
        let forget = FORGET.as_millis() as u64;
        let now = T0 + forget + 1;
        let p = of(&[("a", 2, T0 + forget), ("b", 5, now - 100), ("old", 9, T0)]);
        let after = with_mine(&p, "a", 3, now);
        assert_eq!(after, of(&[("a", 3, now), ("b", 5, now - 100)]));
        let fresh = with_mine(&Proposals::new(), "c", 1, now);
        assert_eq!(fresh, of(&[("c", 1, now)]));
    }
}
