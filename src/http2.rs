//! What the gateway watches on a client's HTTP/2 connection: its streams, so that a
//! connection without any is closed after `proxy.idle_timeout`, and one whose client holds a
//! response back is closed after `proxy.send_timeout`.
//!
//! Owns: [`Activity`] (the streams open on one connection and whether a response waits on the
//! client), [`StreamBody`] (a response body that keeps its stream counted until it is
//! finished), [`idle_for`] and [`stalled`], the two watches the listener races against the
//! connection. A client that stops reading altogether is caught below this, on the connection's
//! bytes ([`crate::stall`]); this catches the one that keeps reading, answers pings, and
//! never opens the stream's flow-control window, which no byte-level timer sees.
//! Must not touch: the protocol ([`crate::wire::h2::server`]'s) or what a request means (the
//! service's).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::BoxError;
use crate::metrics::Metrics;
use crate::wire::body::Body;

/// The streams of one HTTP/2 connection whose response is not finished.
#[derive(Default)]
pub struct Activity {
    open: AtomicUsize,
    /// Woken when `open` goes from 0 to 1 or from 1 to 0.
    changed: Notify,
    /// Response bodies the connection has not come back to since their last piece (or since
    /// their head): it takes the next piece only once the client's flow-control window and the
    /// connection let it, so while it stays away the response waits on the client.
    waiting_on_client: AtomicUsize,
    /// Bumped whenever the connection takes from any response body: it moves.
    progress: AtomicU64,
    /// Bytes written to the client's socket ([`crate::stall::SendTimeout::count_written`]): a
    /// slow link drains what h2 buffered without the connection coming back to a body for a while,
    /// and that is the response moving too.
    written: Arc<AtomicU64>,
}

/// Fewer bytes than this written in one look are the protocol's own frames (a PING is 17
/// bytes, a SETTINGS or WINDOW_UPDATE acknowledgement 9 to 13), not a response moving.
const MOVING: u64 = 1024;

/// Counts its stream as open while it lives.
pub struct StreamGuard(Arc<Activity>);

impl Activity {
    /// The counter the connection's socket writes are counted into.
    pub fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    pub fn open_stream(self: &Arc<Self>) -> StreamGuard {
        // The watches care whether any stream is open, not how many: only the first one wakes
        // them (a wake re-polls the connection's task, the connection with it).
        if self.open.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_waiters();
        }
        StreamGuard(self.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // Only the last one out wakes the watches ([`Activity::open_stream`]).
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// Completes once the connection has had no open stream for `timeout`.
pub async fn idle_for(activity: Arc<Activity>, timeout: Duration, metrics: Arc<Metrics>) {
    loop {
        let changed = activity.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if activity.open.load(Ordering::Acquire) == 0 {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    metrics.idle_closes.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ = changed => {}
            }
        } else {
            changed.await;
        }
    }
}

/// Completes once a response on the connection has waited on the client for `limit` while
/// nothing on the connection moved (it took from no body, and less than [`MOVING`] bytes
/// went to the socket in each look): the client withholds its window (or reads nothing).
/// It looks every quarter of `limit` while a stream is open, so it fires between `limit` and
/// 1.25 × `limit` after the last progress; with no stream open it only waits for one.
pub async fn stalled(activity: Arc<Activity>, limit: Duration, metrics: Arc<Metrics>) {
    let period = (limit / 4).max(Duration::from_millis(10));
    let mut seen = activity.progress.load(Ordering::Relaxed);
    let mut written = activity.written.load(Ordering::Relaxed);
    let mut moved_at = Instant::now();
    loop {
        if activity.open.load(Ordering::Acquire) == 0 {
            // Registered before the second look, so a stream opened in between is not missed.
            let changed = activity.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if activity.open.load(Ordering::Acquire) == 0 {
                changed.await;
            }
            moved_at = Instant::now();
            continue;
        }
        tokio::time::sleep(period).await;
        let now = activity.progress.load(Ordering::Relaxed);
        let written_now = activity.written.load(Ordering::Relaxed);
        let sent = written_now.wrapping_sub(written);
        written = written_now;
        if now != seen || sent >= MOVING || activity.waiting_on_client.load(Ordering::Acquire) == 0
        {
            (seen, moved_at) = (now, Instant::now());
        } else if moved_at.elapsed() >= limit {
            metrics.send_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                ?limit,
                "closed: an HTTP/2 response waited on the client for proxy.send_timeout"
            );
            return;
        }
    }
}

/// A response body that keeps its HTTP/2 stream counted as open until it is finished, and says
/// when it waits on the client.
pub struct StreamBody {
    inner: Body,
    stream: StreamGuard,
    /// Counted in `waiting_on_client`.
    waiting: bool,
}

impl StreamBody {
    /// `inner` as the body of a response just handed to the connection: until it first takes
    /// from it, it waits on the client (a window of 0 holds even the first piece back).
    pub fn new(inner: Body, stream: StreamGuard) -> StreamBody {
        stream.0.waiting_on_client.fetch_add(1, Ordering::AcqRel);
        StreamBody {
            inner,
            stream,
            waiting: true,
        }
    }

    fn set_waiting(&mut self, waiting: bool) {
        if self.waiting != waiting {
            self.waiting = waiting;
            let count = &self.stream.0.waiting_on_client;
            match waiting {
                true => count.fetch_add(1, Ordering::AcqRel),
                false => count.fetch_sub(1, Ordering::AcqRel),
            };
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl HttpBody for StreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        self.stream.0.progress.fetch_add(1, Ordering::Relaxed);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // Pending: the replica's turn. A piece handed over: the client's, until the connection
        // is back for the next, which it is only once the client's window has room for this
        // one (or, after the last piece, until it has sent it and drops the body).
        let waiting = matches!(polled, Poll::Ready(Some(Ok(_))));
        self.set_waiting(waiting);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_response_held_back_with_nothing_moving_is_stalled_and_a_slow_link_is_not() {
        let activity = Arc::new(Activity::default());
        let metrics = Arc::new(Metrics::default());
        let _stream = activity.open_stream();
        // A response the connection holds and does not come back to for the whole test.
        activity.waiting_on_client.fetch_add(1, Ordering::AcqRel);
        let limit = Duration::from_secs(4);
        let watch = tokio::spawn(stalled(activity.clone(), limit, metrics.clone()));
        // A slow link: what h2 buffered drains, 2 KiB every half second.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            activity.written.fetch_add(2048, Ordering::Relaxed);
        }
        assert!(
            !watch.is_finished(),
            "a slow link that moves is not stalled"
        );
        // Nothing but a PING's 17 bytes a second from now on.
        let started = Instant::now();
        while !watch.is_finished() {
            assert!(started.elapsed() < 3 * limit, "never stalled");
            tokio::time::sleep(Duration::from_secs(1)).await;
            activity.written.fetch_add(17, Ordering::Relaxed);
        }
        let took = started.elapsed();
        assert!(took >= limit && took <= limit + limit / 2, "{took:?}");
        assert_eq!(metrics.send_timeouts.load(Ordering::Relaxed), 1);
    }

    /// The watches are woken only when the first stream opens and the last one closes: the idle
    /// time counts from the last stream's end, and a stream in between starts it again.
    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_stream_closed() {
        let activity = Arc::new(Activity::default());
        let metrics = Arc::new(Metrics::default());
        let (first, second) = (activity.open_stream(), activity.open_stream());
        let timeout = Duration::from_secs(5);
        let idle = tokio::spawn(idle_for(activity.clone(), timeout, metrics.clone()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!idle.is_finished(), "two streams open");
        drop(first);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!idle.is_finished(), "one stream still open");
        drop(second);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!idle.is_finished(), "4 s of 5 without a stream");
        let third = activity.open_stream();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(third);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!idle.is_finished(), "4 s since the last stream closed");
        tokio::time::timeout(Duration::from_secs(2), idle)
            .await
            .expect("closed 5 s after the last stream")
            .expect("the watch ran");
        assert_eq!(metrics.idle_closes.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_waiting_on_their_replica_are_not_stalled() {
        let activity = Arc::new(Activity::default());
        let metrics = Arc::new(Metrics::default());
        let _stream = activity.open_stream();
        let watch = tokio::spawn(stalled(
            activity.clone(),
            Duration::from_secs(1),
            metrics.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!watch.is_finished());
        assert_eq!(metrics.send_timeouts.load(Ordering::Relaxed), 0);
    }
}
