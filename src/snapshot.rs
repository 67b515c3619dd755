//! What one request sees.
//!
//! Owns: [`Snapshot`], the immutable bundle of config, ring, replicas, policy and the TLS client
//! the replicas are reached with, that the controller publishes and every request loads once, [`Shared`], the `ArcSwap` it is published
//! through, and [`current`], the load a request makes (through its thread's own handle).
//! Must not touch: anything mutable besides the per-replica counters, which are atomics shared
//! across snapshots so a count survives a ring rebuild.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance;
use crate::config::Config;
use crate::per_thread::PerThread;
use crate::policy::PolicySet;
use crate::ring::{Ring, ServerId};
use crate::routing::Router;
use crate::tls::upstream::UpstreamTls;

/// Counters for one replica, kept by the controller across snapshots and replacements.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Its answers by status class, per serving thread: read with [`ReplicaStats::answers`].
    answered: PerThread<[AtomicU64; 5]>,
    /// Requests to it that failed (connect errors, resets, timeouts).
    pub failures: AtomicU64,
    /// Responses cut because it sent none of the body for `proxy.read_timeout`.
    pub body_timeouts: AtomicU64,
    /// Requests in progress (response body not finished): `/rm` drains until this is 0, and
    /// bounded loads balance on it.
    pub in_flight: AtomicI64,
    /// The most requests it had in progress at once.
    pub peak_in_flight: AtomicI64,
    /// 5xx answers in a row (outlier ejection).
    pub consecutive_5xx: AtomicU64,
    /// Time to response headers of the requests sent to it.
    pub latency: crate::latency::LatencyHistogram,
    /// Requests waiting for a place under `proxy.max_requests_per_replica`
    /// (`crate::proxy::body::InFlight::admit`), and how they are woken when one ends.
    pub queued: std::sync::atomic::AtomicU32,
    pub room: tokio::sync::Notify,
    /// Tunnels open to it (each also counted in `in_flight` while it is open).
    pub tunnels: AtomicI64,
}

impl ReplicaStats {
    /// Counts a response; returns how many 5xx answers in a row it now has (0 for any other).
    pub fn record_response(&self, status: u16) -> u64 {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.answered.local()[class].fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            // A load before the store: no write (and no cache-line bounce) in the usual case.
            if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            0
        }
    }

    /// Its answers so far by status class, 1xx..5xx at index 0..4 (their sum: requests sent to
    /// it that got a response).
    pub fn answers(&self) -> [u64; 5] {
        crate::per_thread::sum_each(self.answered.iter())
    }

    /// Requests in progress now (never negative).
    pub fn load(&self) -> u64 {
        u64::try_from(self.in_flight.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// A replica's cumulative counters at one moment: what a roll carries from the replica's old
/// run (whose requests are still finishing on their own counters) to the new one, so
/// `/lb/status` and `/lb/metrics` never see a replica's counts go down.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub answers: [u64; 5],
    pub failures: u64,
    pub body_timeouts: u64,
    pub latency: Vec<u64>,
    pub latency_sum: std::time::Duration,
    pub peak_in_flight: i64,
}

impl Totals {
    /// What was counted since `earlier` (a reading of the same counters).
    pub fn since(&self, earlier: &Totals) -> Totals {
        let sub = |a: u64, b: u64| a.saturating_sub(b);
        let mut answers = self.answers;
        for (a, b) in answers.iter_mut().zip(earlier.answers) {
            *a = sub(*a, b);
        }
        Totals {
            answers,
            failures: sub(self.failures, earlier.failures),
            body_timeouts: sub(self.body_timeouts, earlier.body_timeouts),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, &n)| sub(n, earlier.latency.get(i).copied().unwrap_or(0)))
                .collect(),
            latency_sum: self.latency_sum.saturating_sub(earlier.latency_sum),
            peak_in_flight: self.peak_in_flight,
        }
    }
}

impl ReplicaStats {
    /// The cumulative counters now.
    pub fn totals(&self) -> Totals {
        Totals {
            answers: self.answers(),
            failures: self.failures.load(Ordering::Relaxed),
            body_timeouts: self.body_timeouts.load(Ordering::Relaxed),
            latency: self.latency.counts(),
            latency_sum: self.latency.sum(),
            peak_in_flight: self.peak_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Adds `t` to these counters (from the thread that calls it; the per-thread copies are
    /// summed when read).
    pub fn add(&self, t: &Totals) {
        let local = self.answered.local();
        for (slot, n) in local.iter().zip(t.answers) {
            slot.fetch_add(n, Ordering::Relaxed);
        }
        self.failures.fetch_add(t.failures, Ordering::Relaxed);
        self.body_timeouts
            .fetch_add(t.body_timeouts, Ordering::Relaxed);
        self.latency.add(&t.latency, t.latency_sum);
        self.peak_in_flight
            .fetch_max(t.peak_in_flight, Ordering::Relaxed);
    }
}

/// A replica whose keys move gradually over `health.slow_start`: one that joined lately takes
/// them over; one the autoscaler removes hands them to their next owners before it stops (a
/// slow stop). Either way a key moves once, in the same stable per-key order, never back.
#[derive(Debug, Clone, Copy)]
pub struct Ramp {
    pub since: tokio::time::Instant,
    pub window: std::time::Duration,
    /// Handing its keys over (a slow stop) rather than taking them.
    pub down: bool,
}

impl Ramp {
    /// Whether it takes key `key` now.
    pub fn admits(&self, key: u64, now: tokio::time::Instant) -> bool {
        let taken = crate::balance::ramp_admits(key, self.progress(now));
        // Going down, the keys a ramp up would have taken by now are the ones already handed
        // over.
        taken != self.down
    }

    /// 0 when it joined, 1 once the window has passed.
    pub fn progress(&self, now: tokio::time::Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        (elapsed / self.window.as_secs_f64().max(f64::MIN_POSITIVE)).min(1.0)
    }
}

/// A replica the data plane may send requests to.
#[derive(Debug)]
pub struct Upstream {
    pub id: ServerId,
    pub name: String,
    pub addr: SocketAddr,
    /// `ip:port`, ready to put in a URI.
    pub authority: http::uri::Authority,
    /// Which run of the replica this is: passive-failure reports name it so a report about a
    /// replica that was already replaced is ignored.
    pub incarnation: u64,
    pub stats: Arc<ReplicaStats>,
    /// Set while it ramps up after joining.
    pub ramp: Option<Ramp>,
}

/// Everything a request needs, immutable. In-flight requests finish on the snapshot they loaded.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub ring: Ring,
    /// Routable replicas, indexed by server id.
    pub upstreams: Vec<Option<Arc<Upstream>>>,
    /// The membership `/rep` reports: every replica the gateway keeps (up or being recovered),
    /// in id order; not the ones being removed.
    pub members: Vec<String>,
    /// The active Lua policy (empty when there is none): hooks override the built-ins.
    pub policy: Arc<PolicySet>,
    /// When the last ramp ends (`None`: no replica ramps), so requests skip the check after.
    pub ramps_until: Option<tokio::time::Instant>,
    /// Every replica's address except `127.0.0.1`/`::1` (shared with the operator when replicas
    /// are local processes): never admin (see `crate::guard`).
    pub replica_ips: Vec<std::net::IpAddr>,
    /// The TLS client new connections to the replicas are made with (`[provider] upstream_tls`
    /// and `upstream_ca`; `None`: plain TCP). Built once per edit of those keys, not per
    /// publish: a request passes a reference down to the connector, and pooled connections
    /// remember which build made them.
    pub upstream_tls: Option<Arc<UpstreamTls>>,
    /// The autoscaler scaled N to zero and no replica serves yet: a request waits for one
    /// (`crate::proxy::hold`) instead of getting a 503 (which it gets when replicas are down).
    pub asleep: bool,
    /// The requests held now and how they learn of the next publish: the same for every
    /// snapshot one controller publishes.
    pub holds: Arc<Holds>,
}

/// Requests held while N is 0 (scale to zero): how many now (capped by `autoscale.hold_max`),
/// and the notice the controller gives after every publish so they look again.
#[derive(Debug, Default)]
pub struct Holds {
    pub holding: std::sync::atomic::AtomicU32,
    pub published: tokio::sync::Notify,
}

/// One held request's place under `autoscale.hold_max`, given back when dropped.
pub struct Held<'a>(&'a Holds);

impl Holds {
    /// A place for one more held request, if fewer than `max` are held.
    pub fn enter(&self, max: u32) -> Option<Held<'_>> {
        self.holding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Held(self))
    }

    /// Requests held now.
    pub fn now(&self) -> u32 {
        self.holding.load(Ordering::Relaxed)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Snapshot {
    /// The snapshot before the controller has published anything: no replica, so 503s.
    pub fn initial(config: Arc<Config>) -> Snapshot {
        Snapshot {
            policy: Arc::new(PolicySet::empty()),
            generation: 0,
            ring: Ring::empty(config.ring.slots),
            config,
            upstreams: Vec::new(),
            members: Vec::new(),
            ramps_until: None,
            replica_ips: Vec::new(),
            upstream_tls: None,
            asleep: false,
            holds: Arc::default(),
        }
    }

    /// The routing functions this snapshot serves with.
    #[inline]
    pub fn router(&self) -> Router<'_> {
        Router::new(&self.config, &self.policy)
    }

    #[inline]
    pub fn upstream(&self, id: ServerId) -> Option<&Arc<Upstream>> {
        self.upstreams
            .get(id.get() as usize)
            .and_then(Option::as_ref)
    }

    /// The servers clockwise of `slot` as the balancing decision sees them at `now` for key
    /// `key`: each with its load, and whether its slow start admits the key yet.
    pub fn candidates(
        &self,
        slot: u32,
        key: u64,
        now: tokio::time::Instant,
    ) -> impl Iterator<Item = balance::Candidate> + '_ {
        self.ring.successors(slot).filter_map(move |id| {
            let u = self.upstream(id)?;
            Some(balance::Candidate {
                id,
                load: u.stats.load(),
                admits: u.ramp.is_none_or(|r| r.admits(key, now)),
            })
        })
    }

    /// Where key `key` at `slot` belongs at `now`, loads aside: its owner, or the first server
    /// clockwise whose slow start admits it. What a request goes to when bounded loads are off,
    /// and where a tunnel is re-homed to (`crate::tunnel`): the same key order either way.
    pub fn home(&self, slot: u32, key: u64, now: tokio::time::Instant) -> Option<ServerId> {
        if self.ramps_until.is_none_or(|until| now >= until) {
            return self.ring.owner(slot);
        }
        balance::choose(self.candidates(slot, key, now), None).map(|(id, _)| id)
    }
}

/// The published snapshot: written by the controller only, read lock-free by everyone.
pub type Shared = Arc<ArcSwap<Snapshot>>;

/// The published snapshot as a request holds it, from [`Cache::current`]: a reference counted by the
/// serving thread alone. Loading `Arc<Snapshot>` itself for each request would add to and take
/// from one count that every serving thread shares, two cache-line transfers between cores a
/// request; this thread's own wrapper around the snapshot keeps that count on this core.
#[derive(Clone)]
// The second allocation is the point: its count is this thread's, the inner one is everyone's.
#[allow(clippy::redundant_allocation)]
pub struct Current(Arc<Arc<Snapshot>>);

impl std::ops::Deref for Current {
    type Target = Arc<Snapshot>;

    fn deref(&self) -> &Arc<Snapshot> {
        &self.0
    }
}

/// What a serving thread loaded last from its gateway's [`Shared`]: a cache that revalidates
/// with one atomic load, and the thread's wrapper around its value. One per serving thread, in
/// its worker ([`crate::worker::Worker`]); behind a lock that only its own thread ever takes
/// (request futures must be `Send`: their connection's task is spawned on the runtime).
pub struct Cache {
    loaded: std::sync::Mutex<Loaded>,
}

struct Loaded {
    cache: arc_swap::Cache<Shared, Arc<Snapshot>>,
    current: Current,
}

impl Cache {
    pub fn new(shared: &Shared) -> Cache {
        let mut cache = arc_swap::Cache::new(shared.clone());
        let current = Current(Arc::new(cache.load().clone()));
        Cache {
            loaded: std::sync::Mutex::new(Loaded { cache, current }),
        }
    }

    /// The snapshot published now. The cache keeps the last one it loaded (and so keeps it
    /// alive) until it loads again after a publish: one snapshot a thread at most.
    pub fn current(&self) -> Current {
        let mut loaded = crate::sync::lock(&self.loaded);
        let Loaded { cache, current } = &mut *loaded;
        let now = cache.load();
        if !Arc::ptr_eq(now, &current.0) {
            *current = Current(Arc::new(now.clone()));
        }
        current.clone()
    }
}

/// One request in progress at a replica (`/rm` drains until its count is 0).
pub struct InFlight(Arc<ReplicaStats>);

/// Why a request found no place at its replica (`proxy.max_requests_per_replica`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoPlace {
    #[error("as many requests as may run are already waiting for it")]
    QueueFull,
    #[error("no place came free within proxy.queue_timeout ({0:?})")]
    Timeout(std::time::Duration),
}

impl InFlight {
    /// The replica it is counted at.
    pub fn stats(&self) -> &ReplicaStats {
        &self.0
    }

    pub fn start(stats: &Arc<ReplicaStats>) -> InFlight {
        let now = stats.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        InFlight::counted(stats, now)
    }

    /// Counts the request only if the replica carries fewer than `bound` now, in one atomic
    /// step: two threads that both saw room below the bound cannot both take the last place.
    pub fn reserve(stats: &Arc<ReplicaStats>, bound: u64) -> Option<InFlight> {
        let bound = i64::try_from(bound).unwrap_or(i64::MAX);
        let before = stats
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < bound).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight::counted(stats, before + 1))
    }

    /// Counts the request if the replica carries fewer than `cap`, else waits in its queue
    /// (at most `cap` wait) up to `wait` for a place. The usual case is one atomic step.
    pub async fn admit(
        stats: &Arc<ReplicaStats>,
        cap: u64,
        wait: std::time::Duration,
    ) -> Result<InFlight, NoPlace> {
        if let Some(counted) = InFlight::reserve(stats, cap) {
            return Ok(counted);
        }
        let cap32 = u32::try_from(cap).unwrap_or(u32::MAX);
        if stats
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap32).then_some(n + 1)
            })
            .is_err()
        {
            return Err(NoPlace::QueueFull);
        }
        let _leave = Queued(stats);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let room = stats.room.notified();
            if let Some(counted) = InFlight::reserve(stats, cap) {
                return Ok(counted);
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return InFlight::reserve(stats, cap).ok_or(NoPlace::Timeout(wait));
            }
        }
    }

    fn counted(stats: &Arc<ReplicaStats>, now: i64) -> InFlight {
        if now > stats.peak_in_flight.load(Ordering::Relaxed) {
            stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        }
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        // A load, not a write, in the usual case: nobody waits.
        if self.0.queued.load(Ordering::Acquire) > 0 {
            self.0.room.notify_one();
        }
    }
}

/// A place in a replica's queue, left when dropped (also when the waiting request is
/// cancelled).
struct Queued<'a>(&'a ReplicaStats);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    #[test]
    fn a_reservation_takes_a_place_under_the_bound_and_gives_it_back() {
        let stats = Arc::new(ReplicaStats::default());
        let a = InFlight::reserve(&stats, 2).expect("room for one");
        let b = InFlight::reserve(&stats, 2).expect("room for two");
        assert!(InFlight::reserve(&stats, 2).is_none(), "the bound is full");
        assert_eq!(stats.load(), 2, "a refused reservation counts nothing");
        drop(a);
        let c = InFlight::reserve(&stats, 2).expect("a place came back");
        assert_eq!(stats.peak_in_flight.load(Ordering::Relaxed), 2);
        drop((b, c));
        assert_eq!(stats.load(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_replica_queues_a_request_until_a_place_comes_free_or_the_wait_ends() {
        let stats = Arc::new(ReplicaStats::default());
        let wait = std::time::Duration::from_secs(1);
        let first = InFlight::admit(&stats, 1, wait).await.expect("a place");
        // One waits (the queue holds as many as may run), the next is refused at once.
        let waiting = tokio::spawn({
            let stats = stats.clone();
            async move { InFlight::admit(&stats, 1, wait).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(stats.queued.load(Ordering::Relaxed), 1);
        assert_eq!(
            InFlight::admit(&stats, 1, wait).await.err(),
            Some(NoPlace::QueueFull)
        );
        drop(first);
        let second = waiting.await.expect("joined").expect("the freed place");
        assert_eq!(stats.load(), 1);
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
        // Nothing comes free: the wait ends, and the queue is left.
        assert_eq!(
            InFlight::admit(&stats, 1, wait).await.err(),
            Some(NoPlace::Timeout(wait))
        );
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
        drop(second);
        assert_eq!(stats.load(), 0);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_bound() {
        const BOUND: u64 = 13;
        const THREADS: usize = 8;
        const TRIES: usize = 50;
        for _ in 0..100 {
            let stats = Arc::new(ReplicaStats::default());
            let start = Arc::new(std::sync::Barrier::new(THREADS));
            let held: Vec<Vec<InFlight>> = std::thread::scope(|s| {
                let racers: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let (stats, start) = (stats.clone(), start.clone());
                        s.spawn(move || {
                            start.wait();
                            (0..TRIES)
                                .filter_map(|_| InFlight::reserve(&stats, BOUND))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                racers
                    .into_iter()
                    .map(|r| r.join().expect("a racer finished"))
                    .collect()
            });
            let taken: usize = held.iter().map(Vec::len).sum();
            assert_eq!(taken as u64, BOUND, "exactly the bound's places were taken");
            assert_eq!(stats.peak_in_flight.load(Ordering::Relaxed), BOUND as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(generation: u64) -> Shared {
        let mut snap = Snapshot::initial(Arc::new(Config::default()));
        snap.generation = generation;
        Arc::new(ArcSwap::from_pointee(snap))
    }

    fn publish(shared: &Shared, generation: u64) {
        let mut snap = Snapshot::initial(Arc::new(Config::default()));
        snap.generation = generation;
        shared.store(Arc::new(snap));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_stop_hands_keys_over_in_the_order_a_ramp_up_takes_them() {
        let window = std::time::Duration::from_secs(10);
        let start = tokio::time::Instant::now();
        let up = Ramp {
            since: start,
            window,
            down: false,
        };
        let down = Ramp { down: true, ..up };
        let keys = 0..20_000u64;
        assert!(
            keys.clone().all(|k| down.admits(k, start)),
            "keeps every key at first"
        );
        let mut kept_before = keys.clone().count();
        for s in 1..=10 {
            let now = start + std::time::Duration::from_secs(s);
            // Exactly the keys a joining replica would have taken by now have left.
            assert!(keys
                .clone()
                .all(|k| down.admits(k, now) != up.admits(k, now)));
            let kept = keys.clone().filter(|&k| down.admits(k, now)).count();
            assert!(kept <= kept_before, "a key handed over never comes back");
            kept_before = kept;
        }
        assert_eq!(kept_before, 0, "none left once the window has passed");
    }

    #[test]
    fn totals_carry_over_and_never_go_down() {
        let old = ReplicaStats::default();
        old.record_response(200);
        old.record_response(503);
        old.failures.fetch_add(2, Ordering::Relaxed);
        old.latency.observe(std::time::Duration::from_millis(3));
        let at_swap = old.totals();
        let new = ReplicaStats::default();
        new.add(&at_swap);
        assert_eq!(
            new.totals(),
            at_swap,
            "the new run starts where the old one was"
        );
        old.record_response(200);
        new.record_response(404);
        new.add(&old.totals().since(&at_swap));
        let t = new.totals();
        assert_eq!(t.answers, [0, 2, 0, 1, 1]);
        assert_eq!((t.failures, t.latency.iter().sum::<u64>()), (2, 1));
    }

    #[test]
    fn a_cache_sees_each_publish_and_shares_its_handle_until_then() {
        let a = shared(1);
        let cache = Cache::new(&a);
        let first = cache.current();
        let again = cache.current();
        assert_eq!(again.generation, 1);
        assert!(
            Arc::ptr_eq(&first.0, &again.0),
            "one handle while nothing is published"
        );
        publish(&a, 2);
        let after = cache.current();
        assert_eq!(after.generation, 2);
        assert_eq!(
            first.generation, 1,
            "a request keeps the snapshot it loaded"
        );
    }

    #[test]
    fn caches_of_two_gateways_never_mix_their_snapshots() {
        let (a, b) = (shared(10), shared(20));
        let (ca, cb) = (Cache::new(&a), Cache::new(&b));
        assert_eq!(ca.current().generation, 10);
        assert_eq!(cb.current().generation, 20);
        publish(&b, 21);
        assert_eq!(ca.current().generation, 10);
        assert_eq!(cb.current().generation, 21);
    }

    #[test]
    fn the_old_snapshot_is_let_go_at_the_next_load_after_a_publish() {
        let a = shared(1);
        let cache = Cache::new(&a);
        let old = Arc::downgrade(&cache.current());
        publish(&a, 2);
        assert!(old.upgrade().is_some(), "kept until the cache loads again");
        assert_eq!(cache.current().generation, 2);
        assert!(
            old.upgrade().is_none(),
            "nothing holds the old snapshot any more"
        );
    }
}
