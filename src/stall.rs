//! The write side of a client connection, bounded: a client that takes none of the bytes the
//! gateway has for it for `proxy.send_timeout` (it stopped reading, or advertises a window it
//! never opens: a "slow read" attack) gets its connection closed, and with it the response it
//! was holding and the replica connection that response came on.
//!
//! Owns: [`SendTimeout`], an `AsyncRead + AsyncWrite` around the client's stream that passes
//! reads through and fails a write, flush or shutdown with `TimedOut` once it has waited that
//! long without the client taking a byte. The limit is on each wait, not on the response (as
//! NGINX's `send_timeout` and HAProxy's `timeout client`): a slow reader that keeps reading is
//! served, however long the response. Nothing is armed while writes go through at once (every
//! small response): the timer is made the first time a write has to wait and reset only when
//! one waits again.
//! Must not touch: what is written (the HTTP/1 server and hyper's HTTP/2 own the bytes); the
//! read side's deadlines are the listener's and the HTTP/1 server's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// A client stream whose writes give up after `limit` without progress.
pub struct SendTimeout<S> {
    stream: S,
    limit: Duration,
    /// Made the first time a write waits; a connection whose writes never wait has none.
    timer: Option<Pin<Box<Sleep>>>,
    /// A write is waiting and the timer runs for it.
    waiting: bool,
    /// The limit was reached: whatever else waits (the close's own writes) fails at once and
    /// is not counted again.
    expired: bool,
    metrics: Arc<Metrics>,
}

impl<S> SendTimeout<S> {
    pub fn new(stream: S, limit: Duration, metrics: Arc<Metrics>) -> SendTimeout<S> {
        SendTimeout {
            stream,
            limit,
            timer: None,
            waiting: false,
            expired: false,
            metrics,
        }
    }

    /// What a write that went on (`Ready`) or has to wait (`Pending`) comes to: a wait past the
    /// limit is an error; progress stops the clock.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        if self.expired {
            return Poll::Ready(Err(timed_out()));
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
            return Poll::Pending;
        };
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                (self.waiting, self.expired) = (false, true);
                self.metrics.send_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    limit = ?self.limit,
                    "closed: the client took no bytes for proxy.send_timeout"
                );
                Poll::Ready(Err(timed_out()))
            }
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client took no bytes for proxy.send_timeout",
    )
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
        this.bound(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
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
