//! Re-homing: which open tunnels a published snapshot moved, and when each is closed.
//!
//! Owns: [`verdict`] (pure: does a tunnel placed so still belong where it is on this
//! snapshot?), [`schedule`] (pure: when the closes of one change go, spread over
//! `[tunnels] rehome_window` with jitter, at most `rehome_per_second`), and [`run`], the task
//! that watches the published snapshot and closes the tunnels at their times. A key's home is
//! [`Snapshot::home`]: the owner of its slot, or, while a replica ramps up, the server slow
//! start gives the key to, so tunnels move to a ramping replica in the order its requests do.
//! Must not touch: the bytes of a tunnel (its splice puts the close in), routing's own rules.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Close, Placed, Tunnels};
use crate::ring::ServerId;
use crate::snapshot::{Shared, Snapshot};

/// How often the task looks at the published snapshot.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Why a tunnel is re-homed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its key's home is another replica now (an /add, an /rm, a replica back, a ring or
    /// policy edit, a slow start's turn).
    KeyMoved,
    /// Its replica left the ring (removed, or taken out by health checks or outlier ejection).
    ReplicaGone,
}

impl Reason {
    /// The `reason` label of `ringgate_tunnels_rehomed_total`.
    pub fn name(self) -> &'static str {
        match self {
            Reason::KeyMoved => "key_moved",
            Reason::ReplicaGone => "replica_gone",
        }
    }
}

/// Whether a tunnel placed as `t` must move on `snap` at `now`, and why: its replica is not
/// routable any more (or is another run of it), or its key's home changed since it opened and
/// is not where the tunnel is. A tunnel that bounded loads sent past its key's home stays while
/// that home stays.
pub fn verdict(t: &Placed, snap: &Snapshot, now: Instant) -> Option<Reason> {
    let alive = snap
        .upstream(t.replica)
        .is_some_and(|u| u.incarnation == t.incarnation);
    if !alive {
        return Some(Reason::ReplicaGone);
    }
    let slot = snap.router().request_slot(t.key);
    judge(t, true, snap.home(slot, t.key, now))
}

/// The rule of [`verdict`] on what any ring knows: whether the tunnel's replica is still
/// routable (`alive`), and where its key's home is now. The what-if (`crate::whatif`) asks it
/// of a ring that is not published.
pub fn judge(t: &Placed, alive: bool, home: Option<ServerId>) -> Option<Reason> {
    if !alive {
        return Some(Reason::ReplicaGone);
    }
    (home != t.home && home != Some(t.replica)).then_some(Reason::KeyMoved)
}

/// When each of `n` closes goes, as offsets from the change: the window (stretched so that no
/// more than `per_second` go in a second) cut in `n` equal shares, one close at a random point
/// of each (`jitter` gives numbers in [0, 1)). Ascending.
pub fn schedule(
    n: usize,
    window: Duration,
    per_second: u32,
    mut jitter: impl FnMut() -> f64,
) -> Vec<Duration> {
    if n == 0 {
        return Vec::new();
    }
    let least = n as f64 / f64::from(per_second.max(1));
    let span = window.as_secs_f64().max(least);
    let share = span / n as f64;
    (0..n)
        .map(|i| Duration::from_secs_f64(share * (i as f64 + jitter().clamp(0.0, 0.999_999))))
        .collect()
}

/// Watches the snapshot `shared` publishes and closes the tunnels each change moved, paced by
/// [`schedule`]; while a replica ramps up it looks again every [`LOOK_EVERY`], since its keys
/// move with time. Runs until aborted.
pub async fn run(tunnels: Arc<Tunnels>, shared: Shared) {
    let mut seen = 0u64;
    let mut due: VecDeque<(Instant, u64, Reason)> = VecDeque::new();
    let mut ticker = tokio::time::interval(LOOK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let snap = shared.load_full();
        let now = Instant::now();
        let cfg = &snap.config.tunnels;
        let ramping = snap.ramps_until.is_some_and(|until| now < until);
        let changed = snap.generation != seen;
        seen = snap.generation;
        if !cfg.rehome || !tunnels.any_registered() {
            due.clear();
            continue;
        }
        if changed || ramping {
            let moved = tunnels.take_moved(|p| verdict(p, &snap, now));
            if !moved.is_empty() {
                // A change while closes of the last one are still due queues behind them, so
                // the per-second cap holds across changes.
                let start = due.back().map_or(now, |(at, _, _)| (*at).max(now));
                let offsets = schedule(
                    moved.len(),
                    cfg.rehome_window,
                    cfg.rehome_per_second,
                    fastrand::f64,
                );
                tracing::info!(tunnels = moved.len(), over = ?offsets.last().copied().unwrap_or_default(), generation = snap.generation, "re-homing the tunnels whose key moved");
                let mut order = moved;
                fastrand::shuffle(&mut order);
                due.extend(
                    order
                        .into_iter()
                        .zip(offsets)
                        .map(|((id, why), at)| (start + at, id, why)),
                );
            }
        }
        while due.front().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, id, why)) = due.pop_front() else {
                break;
            };
            // Asked again at its turn: the ring may have moved the key back meanwhile.
            let still = |p: &Placed| verdict(p, &snap, now).is_some();
            if let Some(kind) = tunnels.close_if(id, Close::Rehome(why), still) {
                tunnels.count_rehomed(why, kind);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ring::{Placement, Ring};
    use crate::snapshot::{Ramp, ReplicaStats, Upstream};

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    /// A snapshot routing to servers `members` (run 1 of each unless `runs` says otherwise),
    /// with `ramping` joined at `since` for a 10 s slow start.
    fn snapshot(members: &[u32], runs: &[(u32, u64)], ramping: Option<(u32, Instant)>) -> Snapshot {
        let config = Arc::new(Config::default());
        let policy = crate::policy::PolicySet::empty();
        let router = crate::routing::Router::new(&config, &policy);
        let mut placement = Placement::new(config.ring.slots, config.ring.vnodes).expect("ring");
        for &m in members {
            router.place(&mut placement, id(m)).expect("room");
        }
        let mut snap = Snapshot::initial(Arc::clone(&config));
        snap.generation = 1;
        snap.ring = Ring::build(&placement, |_| true);
        let top = members.iter().copied().max().unwrap_or(0) as usize;
        snap.upstreams = (0..=top).map(|_| None).collect();
        for &m in members {
            let addr: std::net::SocketAddr = ([127, 0, 0, 1], 1000 + m as u16).into();
            let ramp = ramping.filter(|(r, _)| *r == m).map(|(_, since)| Ramp {
                since,
                window: Duration::from_secs(10),
                down: false,
            });
            snap.upstreams[m as usize] = Some(Arc::new(Upstream {
                id: id(m),
                name: format!("s{m}"),
                addr,
                authority: addr.to_string().parse().expect("authority"),
                incarnation: runs.iter().find(|(r, _)| *r == m).map_or(1, |(_, i)| *i),
                stats: Arc::new(ReplicaStats::default()),
                ramp,
            }));
        }
        if let Some((_, since)) = ramping {
            snap.ramps_until = Some(since + Duration::from_secs(10));
        }
        snap
    }

    /// Tunnels for keys 0..n opened on `snap`, each on its key's home.
    fn open_on(snap: &Snapshot, n: u64, now: Instant) -> Vec<Placed> {
        (0..n)
            .map(|key| {
                let slot = snap.router().request_slot(key);
                let home = snap.home(slot, key, now);
                let replica = home.expect("a home");
                Placed {
                    key,
                    replica,
                    incarnation: 1,
                    home,
                }
            })
            .collect()
    }

    #[test]
    fn an_added_server_moves_exactly_the_keys_it_takes_over() {
        let now = Instant::now();
        let before = snapshot(&[1, 2, 3], &[], None);
        let tunnels = open_on(&before, 2000, now);
        assert!(
            tunnels.iter().all(|t| verdict(t, &before, now).is_none()),
            "nothing moved yet"
        );
        let after = snapshot(&[1, 2, 3, 4], &[], None);
        let mut moved = 0;
        for t in &tunnels {
            let new_home = after.home(after.router().request_slot(t.key), t.key, now);
            let v = verdict(t, &after, now);
            if new_home == Some(t.replica) {
                assert_eq!(v, None, "key {} stayed home", t.key);
            } else {
                assert_eq!(new_home, Some(id(4)), "only the new server takes keys");
                assert_eq!(v, Some(Reason::KeyMoved), "key {}", t.key);
                moved += 1;
            }
        }
        // How many depends on the hash functions (the quadratic defaults are uneven); that
        // some move, and only to the new server, is the point.
        assert!(
            moved > 0 && moved < tunnels.len(),
            "{moved} of 2000 keys moved"
        );
    }

    #[test]
    fn a_removed_or_restarted_replica_moves_its_tunnels_and_only_those() {
        let now = Instant::now();
        let before = snapshot(&[1, 2, 3], &[], None);
        let tunnels = open_on(&before, 600, now);
        let without_2 = snapshot(&[1, 3], &[], None);
        for t in &tunnels {
            let expected = (t.replica == id(2)).then_some(Reason::ReplicaGone);
            assert_eq!(verdict(t, &without_2, now), expected, "key {}", t.key);
        }
        let restarted_3 = snapshot(&[1, 2, 3], &[(3, 2)], None);
        for t in &tunnels {
            let expected = (t.replica == id(3)).then_some(Reason::ReplicaGone);
            assert_eq!(verdict(t, &restarted_3, now), expected, "key {}", t.key);
        }
    }

    #[test]
    fn a_tunnel_bounded_loads_sent_past_its_home_stays_while_the_home_stays() {
        let now = Instant::now();
        let snap = snapshot(&[1, 2, 3], &[], None);
        let mut t = open_on(&snap, 1, now)[0];
        let elsewhere = [1, 2, 3].into_iter().map(id).find(|s| Some(*s) != t.home);
        t.replica = elsewhere.expect("another server");
        assert_eq!(verdict(&t, &snap, now), None);
    }

    #[test]
    fn a_ramping_server_takes_tunnels_in_the_order_slow_start_gives_it_keys() {
        let start = Instant::now();
        let before = snapshot(&[1, 2, 3], &[], None);
        let tunnels = open_on(&before, 2000, start);
        let ramping = snapshot(&[1, 2, 3, 4], &[], Some((4, start)));
        let moved_at = |at: Instant| {
            tunnels
                .iter()
                .filter(|t| verdict(t, &ramping, at).is_some())
                .map(|t| t.key)
                .collect::<std::collections::BTreeSet<_>>()
        };
        let (early, half, done) = (
            moved_at(start + Duration::from_secs(1)),
            moved_at(start + Duration::from_secs(5)),
            moved_at(start + Duration::from_secs(10)),
        );
        assert!(
            early.len() < half.len() && half.len() < done.len(),
            "{} {} {}",
            early.len(),
            half.len(),
            done.len()
        );
        assert!(
            early.is_subset(&half) && half.is_subset(&done),
            "a key moved once stays moved"
        );
        for key in &half {
            let slot = ramping.router().request_slot(*key);
            assert!(
                crate::balance::ramp_admits(*key, 0.5),
                "key {key} (slot {slot}) moved before its turn"
            );
        }
    }

    #[test]
    fn closes_are_spread_over_the_window_one_in_each_share() {
        let at = schedule(10, Duration::from_secs(10), 200, || 0.5);
        assert_eq!(at.len(), 10);
        for (i, d) in at.iter().enumerate() {
            assert_eq!(*d, Duration::from_secs_f64(i as f64 + 0.5));
        }
        let mut seed = 7u64;
        let jittered = schedule(1000, Duration::from_secs(10), 200, || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        });
        assert!(jittered.windows(2).all(|w| w[0] <= w[1]), "ascending");
        assert!(*jittered.last().expect("some") < Duration::from_secs(10));
        for second in 0..10 {
            let in_it = jittered.iter().filter(|d| d.as_secs() == second).count();
            assert!((99..=101).contains(&in_it), "second {second}: {in_it}");
        }
    }

    #[test]
    fn more_closes_than_the_cap_allows_stretch_the_window() {
        let at = schedule(1000, Duration::from_secs(2), 100, || 0.0);
        // 1000 at 100 a second take 10 s, not 2.
        assert_eq!(at[999], Duration::from_secs_f64(9.99));
        for second in 0..10 {
            let in_it = at.iter().filter(|d| d.as_secs() == second).count();
            assert!(in_it <= 101, "second {second}: {in_it}");
        }
        assert!(schedule(0, Duration::from_secs(1), 1, || 0.0).is_empty());
        assert_eq!(schedule(1, Duration::ZERO, 0, || 0.0), vec![Duration::ZERO]);
    }
}
