//! Tunnels: upgraded connections (WebSocket, or any protocol a replica switches to with `101`),
//! each spliced to the replica its key routed to, registered with that key so the gateway can
//! close exactly the tunnels whose key's home moved.
//!
//! Owns: [`Tunnels`], the registry of open tunnels (each with its key, its replica and the
//! home the key had when it opened, and the sender that tells it to close), its place count
//! under `[tunnels] max` ([`Tunnels::reserve`]), the counters of `/lb/metrics`, and the closes
//! of a drain ([`Tunnels::close_all`]). [`splice`] moves the bytes, [`ws`] reads WebSocket frame
//! headers, [`rehome`] decides which tunnels moved and paces their closes.
//! Must not touch: routing (a tunnel's key and home come from the snapshot's own functions,
//! the ones requests use) or the request path's budgets (the proxy holds a tunnel's places).
//! The registry's lock is taken when a tunnel opens, rests or ends, by the re-homing task a few
//! times a second, and by a tunnel's next poll after a close was told to any of them (each
//! [`Registration`] looks at its entry only then, or when the task polling it changed), never
//! per byte or per request.

pub mod frames;
pub mod rehome;
pub mod resting;
pub mod splice;
pub mod ws;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::{mpsc, Notify};

use crate::parking::Ticket;
use crate::ring::ServerId;
use crate::sync::lock;

/// Why the gateway closes a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Its key's home moved to another replica.
    Rehome(rehome::Reason),
    /// The gateway is draining.
    Shutdown,
}

impl Close {
    /// The WebSocket close code and reason that say it.
    pub fn websocket_close(self) -> (u16, &'static str) {
        match self {
            Close::Rehome(rehome::Reason::KeyMoved) => (
                ws::CLOSE_SERVICE_RESTART,
                "ringgate: the key moved to another replica",
            ),
            Close::Rehome(rehome::Reason::ReplicaGone) => (
                ws::CLOSE_SERVICE_RESTART,
                "ringgate: the replica left the ring",
            ),
            Close::Shutdown => (
                ws::CLOSE_GOING_AWAY,
                "ringgate: the gateway is shutting down",
            ),
        }
    }
}

/// Where an open tunnel stands on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// The request's key.
    pub key: u64,
    /// The replica it is spliced to, and which run of it.
    pub replica: ServerId,
    pub incarnation: u64,
    /// Where the key belonged when the tunnel opened ([`crate::snapshot::Snapshot::home`]); a
    /// tunnel that bounded loads sent elsewhere is not moved for that alone.
    pub home: Option<ServerId>,
}

/// What a registered connection is: a tunnel, or a gRPC call's stream (`crate::proxy::stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tunnel,
    Stream,
}

struct Entry {
    placed: Placed,
    kind: Kind,
    /// The close it was told, once told.
    told: Option<Close>,
    /// Who is woken when it is told.
    hearer: Option<Hearer>,
    /// Already scheduled for a re-homing close.
    scheduled: bool,
}

/// Who hears a registered connection's close: the task serving it, or, while a tunnel rests
/// without a task, its serving thread's table ([`resting`]), by the ticket of its record. Kept
/// in the registry's entry, so that hearing a close allocates nothing of a connection's own:
/// a small record left on the heap among the pages its first task freed would keep them
/// resident for as long as the tunnel is open.
enum Hearer {
    Task(Waker),
    Table {
        closes: mpsc::UnboundedSender<Ticket>,
        ticket: Ticket,
    },
}

impl Hearer {
    fn wake(self) {
        match self {
            Hearer::Task(waker) => waker.wake(),
            // The table is gone (its thread ended): so are its records.
            Hearer::Table { closes, ticket } => {
                let _ = closes.send(ticket);
            }
        }
    }
}

/// Tunnels closed by the gateway, by reason, and the bytes they carried: `/lb/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub opened: AtomicU64,
    /// Upgrades answered 503 for `[tunnels] max`.
    pub refused: AtomicU64,
    pub rehomed_key_moved: AtomicU64,
    pub rehomed_replica_gone: AtomicU64,
    /// gRPC streams ended with `UNAVAILABLE` for the same reasons.
    pub streams_rehomed_key_moved: AtomicU64,
    pub streams_rehomed_replica_gone: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Tunnels resting without a task now ([`resting`]).
    pub resting: AtomicU64,
    /// Bytes from clients to replicas, and back.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// The open tunnels of one gateway.
#[derive(Default)]
pub struct Tunnels {
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    /// Closes told so far: a registration that saw this unchanged need not look at its entry.
    told: AtomicU64,
    /// Places taken under `[tunnels] max` (a tunnel takes one when its upgrade is routed, before
    /// the replica answers).
    places: AtomicU64,
    /// Entries in the registry (tunnels, and gRPC streams).
    registered: AtomicU64,
    pub counters: Counters,
    /// Woken whenever a tunnel ends (a drain waits on it).
    ended: Notify,
}

/// The cap of `[tunnels] max` was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} tunnels are open ([tunnels] max)")]
pub struct Full(pub u64);

/// A place under `[tunnels] max`, held from the upgrade's routing to the tunnel's end.
pub struct Place {
    tunnels: Arc<Tunnels>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.tunnels.places.fetch_sub(1, Ordering::Relaxed);
        self.tunnels.ended.notify_waiters();
    }
}

/// A tunnel counted as resting ([`Counters::resting`]) until this drops.
pub struct RestingCount(Arc<Tunnels>);

impl RestingCount {
    pub fn new(tunnels: &Arc<Tunnels>) -> RestingCount {
        tunnels.counters.resting.fetch_add(1, Ordering::Relaxed);
        RestingCount(Arc::clone(tunnels))
    }
}

impl Drop for RestingCount {
    fn drop(&mut self) {
        self.0.counters.resting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open tunnel's (or gRPC stream's) entry in the registry, removed when this drops, and
/// where it hears the gateway's close: once heard, a close is remembered, so a close heard by
/// the table an idle tunnel rests in is still there for the task that serves it again.
pub struct Registration {
    tunnels: Arc<Tunnels>,
    id: u64,
    heard: Option<Close>,
    /// The registry's [`Tunnels::told`] when this last looked at its entry, and the waker it
    /// left there: while neither changed, nothing was told to anyone, and a poll takes no lock.
    seen: u64,
    waker: Option<Waker>,
}

impl Registration {
    /// The registry it is in.
    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// The close, once it came; pending until then.
    pub fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<Close> {
        if let Some(why) = self.heard {
            return Poll::Ready(why);
        }
        let told = self.tunnels.told.load(Ordering::Acquire);
        let waker = cx.waker();
        if told == self.seen && self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            return Poll::Pending;
        }
        let mut open = lock(&self.tunnels.open);
        let Some(entry) = open.get_mut(&self.id) else {
            return Poll::Pending; // never: the entry goes with this
        };
        if let Some(why) = entry.told {
            drop(open);
            self.heard = Some(why);
            self.waker = None;
            return Poll::Ready(why);
        }
        entry.hearer = Some(Hearer::Task(waker.clone()));
        drop(open);
        self.seen = told;
        self.waker = Some(waker.clone());
        Poll::Pending
    }

    /// The close, if it was heard.
    pub fn closed(&self) -> Option<Close> {
        self.heard
    }

    /// From now on its close is heard by a table of resting tunnels: `ticket` is sent to
    /// `closes`. `Some` (and nothing sent) if it was told already.
    pub(crate) fn rest(
        &mut self,
        closes: &mpsc::UnboundedSender<Ticket>,
        ticket: Ticket,
    ) -> Option<Close> {
        // The task that served it is gone; its waker would keep the task's memory.
        self.waker = None;
        if self.heard.is_some() {
            return self.heard;
        }
        let mut open = lock(&self.tunnels.open);
        let entry = open.get_mut(&self.id)?;
        if let Some(why) = entry.told {
            self.heard = Some(why);
            return self.heard;
        }
        entry.hearer = Some(Hearer::Table {
            closes: closes.clone(),
            ticket,
        });
        None
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.tunnels.open).remove(&self.id);
        self.tunnels.registered.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("open", &self.open())
            .finish()
    }
}

impl Tunnels {
    pub fn new() -> Arc<Tunnels> {
        Arc::new(Tunnels::default())
    }

    /// A place for one more tunnel under `max`, or [`Full`].
    pub fn reserve(self: &Arc<Self>, max: u64) -> Result<Place, Full> {
        let taken = self.places.fetch_add(1, Ordering::Relaxed);
        let place = Place {
            tunnels: Arc::clone(self),
        };
        if taken >= max {
            drop(place);
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Full(max));
        }
        Ok(place)
    }

    /// Registers an open tunnel; its [`Registration`] hears when the gateway closes it.
    pub fn register(self: &Arc<Self>, placed: Placed, kind: Kind) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(
            id,
            Entry {
                placed,
                kind,
                told: None,
                hearer: None,
                scheduled: false,
            },
        );
        self.registered.fetch_add(1, Ordering::Relaxed);
        if kind == Kind::Tunnel {
            self.counters.opened.fetch_add(1, Ordering::Relaxed);
        }
        Registration {
            tunnels: Arc::clone(self),
            id,
            heard: None,
            seen: 0,
            waker: None,
        }
    }

    /// Tunnels open (or routed and waiting for their replica's answer) now.
    pub fn open(&self) -> u64 {
        self.places.load(Ordering::Relaxed)
    }

    /// Whether anything is registered (a tunnel or a gRPC stream) for re-homing to look at.
    pub fn any_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed) > 0
    }

    /// Every registered tunnel's place on the ring (the what-if's count; gRPC streams aside).
    pub fn placed(&self) -> Vec<Placed> {
        lock(&self.open)
            .values()
            .filter(|e| e.kind == Kind::Tunnel)
            .map(|e| e.placed)
            .collect()
    }

    /// The tunnels `moved` picks among those not scheduled yet, now marked scheduled.
    fn take_moved(
        &self,
        mut moved: impl FnMut(&Placed) -> Option<rehome::Reason>,
    ) -> Vec<(u64, rehome::Reason)> {
        let mut open = lock(&self.open);
        let mut out = Vec::new();
        for (id, e) in open.iter_mut() {
            if e.scheduled {
                continue;
            }
            if let Some(why) = moved(&e.placed) {
                e.scheduled = true;
                out.push((*id, why));
            }
        }
        out
    }

    /// Closes tunnel `id` for `why` if it is open and `still` says it should go (asked again
    /// when its turn comes: the ring may have moved back). Its kind if it was told to close.
    fn close_if(&self, id: u64, why: Close, still: impl FnOnce(&Placed) -> bool) -> Option<Kind> {
        let mut open = lock(&self.open);
        let e = open.get_mut(&id)?;
        if !still(&e.placed) {
            e.scheduled = false;
            return None;
        }
        let hearer = self.tell(e, why)?;
        let kind = e.kind;
        drop(open);
        if let Some(hearer) = hearer {
            hearer.wake();
        }
        Some(kind)
    }

    /// Tells every open tunnel to close (a drain); returns how many were told.
    pub fn close_all(&self, why: Close) -> usize {
        let mut open = lock(&self.open);
        let hearers: Vec<Option<Hearer>> = open
            .values_mut()
            .filter_map(|e| self.tell(e, why))
            .collect();
        drop(open);
        let told = hearers.len();
        hearers.into_iter().flatten().for_each(Hearer::wake);
        told
    }

    /// Tells `entry` to close, under the registry's lock; its hearer, to be woken once the lock
    /// is let go. `None` if it was told already.
    fn tell(&self, entry: &mut Entry, why: Close) -> Option<Option<Hearer>> {
        if entry.told.is_some() {
            return None;
        }
        entry.told = Some(why);
        // Before its hearer is woken: what it polls then sees a close was told.
        self.told.fetch_add(1, Ordering::Release);
        Some(entry.hearer.take())
    }

    /// Waits until no tunnel is open.
    pub async fn all_ended(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read: an end between the two still wakes it.
            ended.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            ended.await;
        }
    }

    /// The `tunnels` object of `/lb/status`.
    pub fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "open": self.open(),
            "opened": get(&c.opened),
            "refused": get(&c.refused),
            "rehomed": {
                "key_moved": get(&c.rehomed_key_moved),
                "replica_gone": get(&c.rehomed_replica_gone),
            },
            "streams_rehomed": {
                "key_moved": get(&c.streams_rehomed_key_moved),
                "replica_gone": get(&c.streams_rehomed_replica_gone),
            },
            "idle_timeouts": get(&c.idle_timeouts),
            "resting": get(&c.resting),
            "bytes_up": get(&c.bytes_up),
            "bytes_down": get(&c.bytes_down),
        })
    }

    pub fn count_rehomed(&self, why: rehome::Reason, kind: Kind) {
        let c = &self.counters;
        let counter = match (kind, why) {
            (Kind::Tunnel, rehome::Reason::KeyMoved) => &c.rehomed_key_moved,
            (Kind::Tunnel, rehome::Reason::ReplicaGone) => &c.rehomed_replica_gone,
            (Kind::Stream, rehome::Reason::KeyMoved) => &c.streams_rehomed_key_moved,
            (Kind::Stream, rehome::Reason::ReplicaGone) => &c.streams_rehomed_replica_gone,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A registration and what tells it to close, for tests of those who hear it.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Tells one registration to close, as re-homing would.
    pub(crate) struct Teller {
        tunnels: Arc<Tunnels>,
        id: u64,
    }

    impl Teller {
        /// `true` if it was open and not told before.
        pub(crate) fn tell(&self, why: Close) -> bool {
            self.tunnels.close_if(self.id, why, |_| true).is_some()
        }
    }

    /// A tunnel registered alone in a registry of its own.
    pub(crate) fn registered() -> (Registration, Teller) {
        let tunnels = Tunnels::new();
        let placed = Placed {
            key: 1,
            replica: ServerId::MAX,
            incarnation: 0,
            home: None,
        };
        let registration = tunnels.register(placed, Kind::Tunnel);
        let teller = Teller {
            id: registration.id,
            tunnels,
        };
        (registration, teller)
    }
}
