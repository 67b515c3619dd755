//! Scale-down, the choice: which replicas go when N falls.
//!
//! Owns: [`least_loaded`] (pure: the replicas whose keys carried the least load recently, so a
//! scale-down moves the least traffic to other replicas and drops the least warm cache; ties go
//! to the one owning fewest slots, i.e. moving fewest keys, then to the newest, today's rule) and
//! [`RecentLoad`], the per-replica answered counts over the last window it measures "recently"
//! with. The load is what the gateway counted for each replica (its answers, its requests in
//! flight), not a model of it: with bounded loads or slow start on, what a replica answered is
//! exactly what removing it moves.
//! Must not touch: the ring, membership, I/O. The controller gathers the figures and carries
//! out the removal (`scaling`).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::ring::ServerId;

/// What one member carried, as the gateway counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub id: ServerId,
    /// Requests it answered over the recent window.
    pub recent: u64,
    /// Requests in flight to it now.
    pub in_flight: u64,
    /// Ring slots it owns (the keys its removal moves).
    pub slots: u32,
}

/// The `n` members whose removal moves the least load: least recent requests, then fewest in
/// flight, then fewest slots, then the highest id. Fewer than `n` when fewer are given.
pub fn least_loaded(loads: &[Load], n: usize) -> Vec<ServerId> {
    let mut order: Vec<&Load> = loads.iter().collect();
    order.sort_by_key(|l| (l.recent, l.in_flight, l.slots, std::cmp::Reverse(l.id)));
    order.into_iter().take(n).map(|l| l.id).collect()
}

/// Per-replica answered counts over the last window: marks taken once a tick, the oldest one
/// still inside the window being the base "recent" counts from.
#[derive(Debug, Default)]
pub struct RecentLoad {
    marks: VecDeque<(Instant, BTreeMap<ServerId, u64>)>,
}

impl RecentLoad {
    /// Records every replica's answered count now (cumulative), keeping one window of marks.
    pub fn observe(&mut self, now: Instant, window: Duration, counts: BTreeMap<ServerId, u64>) {
        self.marks.push_back((now, counts));
        // Keep the newest mark at least `window` old: it is the base of the whole window.
        while self.marks.len() > 1
            && self
                .marks
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= window)
        {
            self.marks.pop_front();
        }
    }

    /// Requests `id` answered between the oldest and the newest mark (all of them for a replica
    /// newer than the oldest mark).
    pub fn recent(&self, id: ServerId) -> u64 {
        let (Some((_, first)), Some((_, last))) = (self.marks.front(), self.marks.back()) else {
            return 0;
        };
        let now = last.get(&id).copied().unwrap_or(0);
        // A counter only grows; a replica started anew under the same id counts from 0 again.
        now.saturating_sub(first.get(&id).copied().filter(|&b| b <= now).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    fn load(n: u32, recent: u64, in_flight: u64, slots: u32) -> Load {
        Load {
            id: id(n),
            recent,
            in_flight,
            slots,
        }
    }

    #[test]
    fn the_least_loaded_go_not_the_newest() {
        let loads = [
            load(1, 900, 4, 170),
            load(2, 120, 1, 171),
            load(3, 800, 3, 171),
            load(4, 300, 0, 90),
        ];
        assert_eq!(least_loaded(&loads, 1), vec![id(2)]);
        assert_eq!(least_loaded(&loads, 2), vec![id(2), id(4)]);
        assert_eq!(least_loaded(&loads, 9).len(), 4);
        assert!(least_loaded(&loads, 0).is_empty());
    }

    #[test]
    fn ties_go_to_fewer_in_flight_then_fewer_keys_then_the_newest() {
        let loads = [load(1, 0, 0, 100), load(2, 0, 2, 50), load(3, 0, 0, 120)];
        assert_eq!(least_loaded(&loads, 1), vec![id(1)], "fewer keys move");
        let idle = [load(1, 0, 0, 100), load(2, 0, 0, 100), load(3, 0, 0, 100)];
        assert_eq!(least_loaded(&idle, 2), vec![id(3), id(2)], "newest first");
    }

    #[tokio::test(start_paused = true)]
    async fn recent_load_counts_one_window_back() {
        let window = Duration::from_secs(10);
        let mut r = RecentLoad::default();
        for s in 0..30u64 {
            // Replica 1 answers 10 a second; replica 2 50 a second until second 15, then none.
            let two = 50 * s.min(15);
            let counts = BTreeMap::from([(id(1), 10 * s), (id(2), two)]);
            r.observe(Instant::now(), window, counts);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(r.recent(id(1)), 100, "ten seconds of 10 a second");
        assert_eq!(r.recent(id(2)), 0, "idle for the whole window");
        assert_eq!(r.recent(id(3)), 0, "unknown");
        // A replica that restarted (its counter began again) counts from 0.
        r.observe(Instant::now(), window, BTreeMap::from([(id(1), 5)]));
        assert_eq!(r.recent(id(1)), 5);
    }
}
