//! Bounded waits on peers that stop moving bytes: a client that takes none of its response for
//! `proxy.send_timeout` (it stopped reading, or advertises a window it never opens: a "slow
//! read" attack), and a replica that sends none of a response body for `proxy.read_timeout`.
//! Either would otherwise hold a client connection, a replica connection and the response
//! between them for as long as it likes.
//!
//! Owns: [`StallTimer`], the limit on one wait without progress, and [`SendTimeout`], an
//! `AsyncRead + AsyncWrite` around a client's stream that passes reads through and fails a
//! write, flush or shutdown with `TimedOut` once it has waited that long without the client
//! taking a byte. The limit is on each wait, not on the response (as NGINX's `send_timeout` and
//! `proxy_read_timeout`, and HAProxy's `timeout client` and `timeout server`): a slow reader
//! that keeps reading is served, however long the response. Nothing is armed while the bytes
//! move at once (every small response): the timer is made the first time something waits and
//! reset only when it waits again.
//! Must not touch: what is written or read (the HTTP/1 server, hyper's HTTP/2 and the
//! upstream body own the bytes); the deadlines on request heads are the listener's and the
//! HTTP/1 server's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// One wait without progress, bounded: fed with each poll's outcome, it says when the thing
/// polled has waited `limit` since it last moved.
pub struct StallTimer {
    limit: Duration,
    /// Made the first time something waits; what never waits has none.
    timer: Option<Pin<Box<Sleep>>>,
    /// Something waits and the timer runs for it.
    waiting: bool,
    /// The limit was reached: whatever waits from now on is over it at once (a close's own
    /// writes), and is not counted again.
    expired: bool,
}

/// What a poll's outcome comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// It moved, or waits within the limit (the caller returns its `Pending`; the timer wakes
    /// the task when the limit is up).
    Within,
    /// It waited `limit` without moving; `first` the first time this is said.
    Over { first: bool },
}

impl StallTimer {
    pub fn new(limit: Duration) -> StallTimer {
        StallTimer {
            limit,
            timer: None,
            waiting: false,
            expired: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// `moved`: the poll was `Ready` (progress stops the clock); else it waits, and the clock
    /// runs from the first of its waits.
    pub fn check(&mut self, cx: &mut Context<'_>, moved: bool) -> Stall {
        if moved {
            self.waiting = false;
            return Stall::Within;
        }
        if self.expired {
            return Stall::Over { first: false };
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Some(timer) = self.timer.as_mut() else {
            return Stall::Within;
        };
        match timer.as_mut().poll(cx) {
            Poll::Pending => Stall::Within,
            Poll::Ready(()) => {
                (self.waiting, self.expired) = (false, true);
                Stall::Over { first: true }
            }
        }
    }
}

/// A client stream whose writes give up after `limit` without progress.
pub struct SendTimeout<S> {
    stream: S,
    stall: StallTimer,
    metrics: Arc<Metrics>,
    /// Where the bytes written are counted, for a watch above this one (HTTP/2's).
    written: Option<Arc<AtomicU64>>,
}

impl<S> SendTimeout<S> {
    pub fn new(stream: S, limit: Duration, metrics: Arc<Metrics>) -> SendTimeout<S> {
        SendTimeout {
            stream,
            stall: StallTimer::new(limit),
            metrics,
            written: None,
        }
    }

    /// The stream, without the limit.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Counts every byte written from now on into `counter`.
    pub fn count_written(&mut self, counter: Arc<AtomicU64>) {
        self.written = Some(counter);
    }

    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        if let (Some(counter), Poll::Ready(Ok(n))) = (&self.written, polled) {
            counter.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }

    /// What a write that went on (`Ready`) or has to wait (`Pending`) comes to: a wait past the
    /// limit is an error.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.stall.check(cx, polled.is_ready()) {
            Stall::Within => polled,
            Stall::Over { first } => {
                if first {
                    self.metrics.send_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        limit = ?self.stall.limit(),
                        "closed: the client took no bytes for proxy.send_timeout"
                    );
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no bytes for proxy.send_timeout",
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(&polled);
        this.bound(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(&polled);
        this.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.bound(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.bound(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_is_cut_off_and_one_that_reads_is_not() {
        // A pipe of 1 KiB: writes wait as soon as the reader falls 1 KiB behind.
        let (near, mut far) = tokio::io::duplex(1024);
        let metrics = Arc::new(Metrics::default());
        let mut w = SendTimeout::new(near, Duration::from_secs(5), metrics.clone());
        let piece = vec![7u8; 4096];
        // A reader that takes 512 bytes every 4 s (each wait shorter than the limit): served.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 4096 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                got += far.read(&mut buf).await.expect("read");
            }
            far
        });
        w.write_all(&piece)
            .await
            .expect("a slow reader that reads is served");
        let _far = reader.await.expect("reader");
        assert_eq!(metrics.send_timeouts.load(Ordering::Relaxed), 0);
        // Now nobody reads: the write fails once it has waited 5 s.
        let started = Instant::now();
        let err = w
            .write_all(&piece)
            .await
            .expect_err("a reader that stopped");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        assert_eq!(metrics.send_timeouts.load(Ordering::Relaxed), 1);
        // Later writes (the close's own) fail at once, and the connection is counted once.
        let started = Instant::now();
        assert!(w.write_all(&piece).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(metrics.send_timeouts.load(Ordering::Relaxed), 1);
    }
}
