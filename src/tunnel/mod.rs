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
//! The registry's lock is taken when a tunnel opens or ends and by the re-homing task a few
//! times a second, never per byte or per request.

pub mod frames;
pub mod rehome;
pub mod resting;
pub mod splice;
pub mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{oneshot, Notify};

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

/// Hears the gateway's close of one registered connection, and remembers it once heard: a
/// close heard by whoever watches an idle tunnel ([`resting`]) is still there for the task
/// that serves it again.
#[derive(Debug)]
pub struct Closer {
    rx: oneshot::Receiver<Close>,
    heard: Option<Close>,
}

impl Closer {
    /// The close, once it came; pending until then (and for good once no close can come: the
    /// registration went, or it was told already).
    pub fn poll_heard(&mut self, cx: &mut Context<'_>) -> Poll<Close> {
        if let Some(why) = self.heard {
            return Poll::Ready(why);
        }
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(why)) => {
                self.heard = Some(why);
                Poll::Ready(why)
            }
            _ => Poll::Pending,
        }
    }

    /// The close, if it was heard.
    pub fn heard(&self) -> Option<Close> {
        self.heard
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
    /// Tells the tunnel to close; taken by the first close.
    close: Option<oneshot::Sender<Close>>,
    /// Already scheduled for a re-homing close.
    scheduled: bool,
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

/// An open tunnel's entry in the registry, removed when this drops.
pub struct Registration {
    tunnels: Arc<Tunnels>,
    id: u64,
}

impl Registration {
    /// The registry it is in.
    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
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

    /// Registers an open tunnel; the [`Closer`] hears when the gateway closes it.
    pub fn register(self: &Arc<Self>, placed: Placed, kind: Kind) -> (Registration, Closer) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(
            id,
            Entry {
                placed,
                kind,
                close: Some(tx),
                scheduled: false,
            },
        );
        self.registered.fetch_add(1, Ordering::Relaxed);
        if kind == Kind::Tunnel {
            self.counters.opened.fetch_add(1, Ordering::Relaxed);
        }
        let registration = Registration {
            tunnels: Arc::clone(self),
            id,
        };
        (registration, Closer { rx, heard: None })
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
    /// when its turn comes: the ring may have moved back). `true` if it was told to close.
    fn close_if(&self, id: u64, why: Close, still: impl FnOnce(&Placed) -> bool) -> Option<Kind> {
        let mut open = lock(&self.open);
        let e = open.get_mut(&id)?;
        if !still(&e.placed) {
            e.scheduled = false;
            return None;
        }
        let sent = e.close.take().is_some_and(|tx| tx.send(why).is_ok());
        sent.then_some(e.kind)
    }

    /// Tells every open tunnel to close (a drain); returns how many were told.
    pub fn close_all(&self, why: Close) -> usize {
        let mut open = lock(&self.open);
        open.values_mut()
            .filter_map(|e| e.close.take())
            .filter(|tx| !tx.is_closed())
            .map(|tx| tx.send(why).is_ok())
            .filter(|sent| *sent)
            .count()
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
