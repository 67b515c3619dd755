//! Bodies on the request path: the client's request body, held so a failed attempt can hand it
//! to the next one, and the replica's response body, counted in flight until it is finished.
//!
//! Owns: [`ProxyBody`] and [`BodySlot`] (which also record why a body broke: past
//! `proxy.max_body`, or broken by the client; and whether it waits for the client), and
//! [`InFlight`], which counts a request at its replica until its response body ends.
//! Must not touch: routing, retries or the upstream connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::wire::body::RequestBody;

use crate::error::BoxError;
use crate::snapshot::ReplicaStats;
use crate::sync::lock;

/// A request body that can be handed back if the attempt failed before reading any of it.
pub enum ProxyBody {
    Empty,
    Streaming {
        slot: Arc<BodySlot>,
        taken: Option<Unsent>,
        hint: SizeHint,
    },
}

/// The client's body as no attempt has sent it yet: the frame [`ProxyBody::started`] read ahead
/// (if any), then the rest, still at the client.
pub struct Unsent {
    first: Option<Bytes>,
    rest: Limited<RequestBody>,
}

impl ProxyBody {
    pub fn new(body: RequestBody, limit: u64) -> ProxyBody {
        if body.is_end_stream() {
            return ProxyBody::Empty;
        }
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        ProxyBody::Streaming {
            hint: body.size_hint(),
            slot: Arc::new(BodySlot::new(Unsent {
                first: None,
                rest: Limited::new(body, limit),
            })),
            taken: None,
        }
    }

    /// The slot behind a streamed body, for the next attempt and for failure causes.
    pub fn slot(&self) -> Option<(Arc<BodySlot>, SizeHint)> {
        match self {
            ProxyBody::Streaming { slot, hint, .. } => Some((slot.clone(), *hint)),
            ProxyBody::Empty => None,
        }
    }

    /// Nothing of the body has been read yet (by this attempt or an earlier one).
    pub fn untouched(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Streaming { slot, taken, .. } => taken.is_none() && slot.is_untouched(),
        }
    }

    /// Waits until the client's body has started: its first frame has arrived (kept for the
    /// first attempt to send) or the body ended. A replica connection is only taken after this,
    /// so a request whose body never comes holds none. A body that ended with nothing becomes
    /// [`ProxyBody::Empty`]. The error is the body's (the slot's flags say whose it was).
    pub async fn started(&mut self) -> Result<(), BoxError> {
        let first = loop {
            if matches!(self, ProxyBody::Empty) {
                return Ok(());
            }
            match std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await {
                None => {
                    *self = ProxyBody::Empty;
                    return Ok(());
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => break data,
                    // Trailers and empty frames carry nothing to send (trailers are not
                    // forwarded): the body has not started yet.
                    _ => continue,
                },
            }
        };
        if let ProxyBody::Streaming { slot, taken, .. } = self {
            if let Some(mut unsent) = taken.take() {
                unsent.first = Some(first);
                *lock(&slot.body) = Some(unsent);
            }
        }
        Ok(())
    }

    /// A body for the next attempt over the same slot (empty stays empty).
    pub fn again(slot: Option<(Arc<BodySlot>, SizeHint)>) -> ProxyBody {
        match slot {
            None => ProxyBody::Empty,
            Some((slot, hint)) => ProxyBody::Streaming {
                slot,
                taken: None,
                hint,
            },
        }
    }
}

/// Holds the client's body until an attempt first polls it. A failed attempt that never polled
/// it leaves it here, and the next attempt takes it: that is what makes a request with a body
/// retryable. The flags record why a body broke, because hyper boxes body errors in a way that
/// hides their type from the error chain of the failed attempt.
pub struct BodySlot {
    body: Mutex<Option<Unsent>>,
    over_limit: AtomicBool,
    client_error: AtomicBool,
    /// The last read of the body waits for the client to send more.
    waiting_on_client: AtomicBool,
}

impl BodySlot {
    fn new(body: Unsent) -> BodySlot {
        BodySlot {
            body: Mutex::new(Some(body)),
            over_limit: AtomicBool::new(false),
            client_error: AtomicBool::new(false),
            waiting_on_client: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<Unsent> {
        lock(&self.body).take()
    }

    /// No attempt has read from the body yet.
    pub fn is_untouched(&self) -> bool {
        lock(&self.body).is_some()
    }

    /// The body ran past `proxy.max_body`.
    pub fn over_limit(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }

    /// Reading the body from the client failed (malformed chunks, the client went away).
    pub fn client_error(&self) -> bool {
        self.client_error.load(Ordering::Relaxed)
    }

    /// The attempt's last read of the body waits for the client (rather than the replica
    /// for the bytes already read: a replica that does not read holds the body's reads back).
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Ordering::Relaxed)
    }
}

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Streaming { slot, taken, .. } => {
                if taken.is_none() {
                    *taken = slot.take();
                }
                let Some(unsent) = taken else {
                    return Poll::Ready(None);
                };
                if let Some(data) = unsent.first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                let polled = Pin::new(&mut unsent.rest).poll_frame(cx);
                slot.waiting_on_client
                    .store(polled.is_pending(), Ordering::Relaxed);
                if let Poll::Ready(Some(Err(e))) = &polled {
                    let flag = if e.is::<LengthLimitError>() {
                        &slot.over_limit
                    } else {
                        &slot.client_error
                    };
                    flag.store(true, Ordering::Relaxed);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ProxyBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Streaming { hint, .. } => *hint,
        }
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
mod tests {
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
