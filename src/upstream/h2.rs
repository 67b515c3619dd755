//! HTTP/2 connections to the replicas, multiplexed, and the serving thread's set of them.
//!
//! Owns: [`H2Conn`] (one HTTP/2 connection made with prior knowledge over a [`Conn`]'s stream,
//! driven by the `h2` crate's client in one task of the serving thread, with PING keep-alive;
//! a request body still arriving from its client is piped on in that task too:
//! [`Opener::beside`], [`crate::in_task`]), [`H2Conn::connect`], [`SendBody`] (the one
//! request body type a connection carries), [`Opener`] and [`StreamGuard`] (a stream opened,
//! and counted on its connection until its response ends), and a serving thread's set, [`Conns`]:
//! [`Conns::take`] hands out the connection to a replica that has room for one more stream
//! ([`has_room`]: fewer open than the replica's `SETTINGS_MAX_CONCURRENT_STREAMS` and our own
//! cap), [`Conns::keep`] adds a new one, and [`Conns::turn`] lets one request at a time make
//! the next connection to a replica while the others wait for it. A connection the replica
//! sent GOAWAY on, one whose driver ended, one another TLS client made, or one unused for
//! [`IDLE_TIMEOUT`] is never handed out again and is dropped when met. Over TLS a replica may
//! choose HTTP/1.1 instead ([`H2Conn::negotiate`] hands that connection back); the thread
//! remembers it for [`ALPN_RECHECK`] ([`Conns::chose_http1`], [`Conns::note_alpn`]), so the
//! requests that fall back to HTTP/1.1 take pooled HTTP/1.1 connections meanwhile instead of
//! a handshake each.
//! Must not touch: what goes on a stream (the request head and the response body are
//! [`crate::wire::h2`]'s), routing, retries, or what a failure means for a replica.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::h2::client::SendRequest;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use rustc_hash::FxHashMap;
use tokio::time::Instant;

use super::pool::{Conn, ConnectError, Stream};
use crate::error::BoxError;
use crate::in_task::{InTask, Tasks};
use crate::tls::upstream::{Alpn, UpstreamTls};
use crate::wire::h2::stream::{with_limits, KeepAlive, Limits};

/// Streams one connection carries at most, whatever the replica allows: past it a new
/// connection is opened, so one connection's flow-control window and head-of-line blocking on
/// its socket are shared by at most this many calls. RFC 9113 recommends servers allow at least
/// 100; most default to 100 (grpc-go, Envoy) or more.
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// A connection with no stream for this long is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections kept per replica and serving thread (each carries up to
/// [`MAX_STREAMS_PER_CONN`] streams at once).
pub const MAX_CONNS_PER_REPLICA: usize = 16;
/// How long a serving thread remembers that a replica chose HTTP/1.1 over TLS (ALPN) when
/// offered `h2`: meanwhile its requests go over HTTP/1.1 without asking again (gRPC calls are
/// refused at once); after it, the next connection offers `h2` again, so a replica that learned
/// HTTP/2 gets it within this long.
pub const ALPN_RECHECK: Duration = Duration::from_secs(30);

/// A request body on an HTTP/2 stream to a replica: the client's (boxed, so every connection
/// carries one body type whatever the request's), or none; and whether it was sent whole
/// (a deadline that passes before it ended waited on the client, not on the replica).
pub struct SendBody {
    inner: Option<Pin<Box<dyn HttpBody<Data = Bytes, Error = BoxError> + Send>>>,
    progress: Arc<Progress>,
}

/// How far a [`SendBody`] got, for the one who sent it (the body itself may be piped on in the
/// connection's task).
#[derive(Default)]
pub struct Progress {
    /// All of it was taken from the client.
    ended: AtomicBool,
    /// The body's own error, kept here (the stream is reset, and its error, in which the
    /// body's kind, such as past `proxy.max_body`, is lost, is what the response reports).
    failed: std::sync::Mutex<Option<BoxError>>,
}

impl Progress {
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The body's error, if it failed (once).
    pub fn take_failure(&self) -> Option<BoxError> {
        crate::sync::lock(&self.failed).take()
    }
}

impl SendBody {
    pub fn new(body: impl HttpBody<Data = Bytes, Error = BoxError> + Send + 'static) -> SendBody {
        if body.is_end_stream() {
            return SendBody::empty();
        }
        SendBody {
            inner: Some(Box::pin(body)),
            progress: Arc::default(),
        }
    }

    pub fn empty() -> SendBody {
        let progress = Progress::default();
        progress.ended.store(true, Ordering::Release);
        SendBody {
            inner: None,
            progress: Arc::new(progress),
        }
    }

    /// Tells, once the body is on its way, whether all of it was taken from the client, or
    /// why not.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

impl HttpBody for SendBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            None => Poll::Ready(None),
            Some(body) => body.as_mut().poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Err(e))) => {
                *crate::sync::lock(&this.progress.failed) = Some(e);
                return Poll::Ready(Some(Err("the client's request body failed".into())));
            }
            Poll::Ready(None) => this.progress.ended.store(true, Ordering::Release),
            _ if this.is_end_stream() => this.progress.ended.store(true, Ordering::Release),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// What a connection's driver and its streams share.
#[derive(Default)]
struct State {
    /// Streams open on it (requests sent whose response has not ended).
    open: AtomicUsize,
    /// The replica's `SETTINGS_MAX_CONCURRENT_STREAMS` as last seen by the driver.
    max_streams: AtomicUsize,
    /// The driver ended: the connection is gone.
    ended: AtomicBool,
    /// The connection takes no new stream: the replica sent GOAWAY, or the connection failed.
    closing: AtomicBool,
    /// Every handle to the connection is gone (the set dropped it, no request holds it).
    abandoned: AtomicBool,
    /// The driver's task, woken when the last handle goes.
    driver: AtomicWaker,
}

/// Dropped with the last handle to a connection: its driver is told, so that the connection
/// closes once its streams end instead of at its next keep-alive ping.
struct Handles(Arc<State>);

impl Drop for Handles {
    fn drop(&mut self) {
        self.0.abandoned.store(true, Ordering::Release);
        self.0.driver.wake();
    }
}

/// One HTTP/2 connection to a replica (a handle: clones share the connection).
#[derive(Clone)]
pub struct H2Conn {
    send: SendRequest<Bytes>,
    state: Arc<State>,
    /// Declared after `send`, so a handle's sender is gone before the last one tells the
    /// driver.
    _handles: Arc<Handles>,
    /// What the connection's task runs beside the connection: request bodies still arriving
    /// from their clients.
    beside: InTask,
    addr: SocketAddr,
    /// The [`UpstreamTls::id`] of the client that made it (0: plain TCP).
    made_by: u64,
}

/// A stream counted on its connection until dropped (with the response body, or with the
/// request that failed).
pub struct StreamGuard(Arc<State>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one request needs of its connection: the sender its stream is opened with, and the
/// connection's task, to run the rest of a request body there ([`Opener::beside`]).
pub struct Opener {
    pub send: SendRequest<Bytes>,
    beside: InTask,
}

impl Opener {
    /// Runs `f` in the connection's task (a request body piped on as its client sends it):
    /// not a task of its own, and it ends with the connection at the latest.
    pub fn beside(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.beside.spawn(f);
    }
}

/// What a connection made for HTTP/2 became.
pub enum Negotiated {
    H2(H2Conn),
    /// Over TLS the replica chose another protocol than `h2` (HTTP/1.1, or no ALPN protocol,
    /// which means HTTP/1.1): the connection, for HTTP/1.1, and the choice.
    Http1(Conn, Alpn),
}

impl H2Conn {
    /// Connects to `addr` within `timeout` (TCP, and TLS with `tls`, ALPN `h2`) and starts
    /// HTTP/2 on it (with prior knowledge over TCP); a PING every `keepalive` (unanswered by
    /// the next, the connection is closed). The connection is driven by a task on this
    /// thread's runtime. A TLS replica that does not choose `h2` is
    /// [`ConnectError::NotHttp2`].
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&UpstreamTls>,
        keepalive: Duration,
    ) -> Result<H2Conn, ConnectError> {
        match H2Conn::negotiate(addr, timeout, tls, keepalive).await? {
            Negotiated::H2(c) => Ok(c),
            Negotiated::Http1(_, chosen) => Err(ConnectError::NotHttp2(chosen)),
        }
    }

    /// [`H2Conn::connect`], except that a TLS replica that chose HTTP/1.1 (ALPN `http/1.1`
    /// or none, both offered with `h2`) hands its connection back for HTTP/1.1.
    pub async fn negotiate(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&UpstreamTls>,
        keepalive: Duration,
    ) -> Result<Negotiated, ConnectError> {
        let conn = Conn::connect_for(addr, timeout, tls, true).await?;
        if let Some(chosen) = conn.alpn().filter(|a| !a.is_h2()) {
            return Ok(Negotiated::Http1(conn, chosen));
        }
        Self::handshake(conn, addr, timeout, tls, keepalive)
            .await
            .map(Negotiated::H2)
    }

    async fn handshake(
        conn: Conn,
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&UpstreamTls>,
        keepalive: Duration,
    ) -> Result<H2Conn, ConnectError> {
        let (stream, counted) = conn.into_stream();
        let mut builder = ::h2::client::Builder::new();
        with_limits!(builder, Limits::TO_REPLICAS)
            .enable_push(false)
            // The replica's own setting takes over once it arrives.
            .initial_max_send_streams(MAX_STREAMS_PER_CONN);
        let handshake = builder.handshake::<_, Bytes>(stream);
        let (send, connection) = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(ConnectError::Http2(e)),
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        };
        let state = Arc::new(State {
            max_streams: AtomicUsize::new(MAX_STREAMS_PER_CONN),
            ..State::default()
        });
        let tasks = Tasks::default();
        let beside = tasks.executor();
        let driver = Driver {
            connection: Some(connection),
            watch: Some(send.clone()),
            keepalive: KeepAlive::new(keepalive),
            tasks,
            state: state.clone(),
            addr,
        };
        tokio::spawn(async move {
            let _counted = counted;
            driver.await;
        });
        Ok(H2Conn {
            send,
            _handles: Arc::new(Handles(state.clone())),
            state,
            beside,
            addr,
            made_by: tls.map_or(0, UpstreamTls::id),
        })
    }

    /// This handle as the opener of one more stream, counted on the connection until the
    /// guard is dropped.
    pub fn open_stream(self) -> (Opener, StreamGuard) {
        self.state.open.fetch_add(1, Ordering::AcqRel);
        let guard = StreamGuard(self.state);
        let opener = Opener {
            send: self.send,
            beside: self.beside,
        };
        (opener, guard)
    }

    /// The connection can take new streams: its driver runs and the replica did not send
    /// GOAWAY.
    pub fn is_open(&self) -> bool {
        !self.state.ended.load(Ordering::Acquire) && !self.state.closing.load(Ordering::Acquire)
    }

    fn has_room(&self) -> bool {
        let open = self.state.open.load(Ordering::Acquire);
        has_room(open, self.state.max_streams.load(Ordering::Relaxed))
    }

    fn is_idle(&self) -> bool {
        self.state.open.load(Ordering::Acquire) == 0
    }
}

/// A connection's task: the connection itself, its keep-alive, and the request bodies it
/// carries ([`Opener::beside`]).
struct Driver {
    /// Gone once the connection ended.
    connection: Option<::h2::client::Connection<Stream, Bytes>>,
    /// A sender of the driver's own, to learn that the connection takes no new stream (its
    /// GOAWAY is seen there); dropped once every handle is gone, so the connection can close.
    watch: Option<SendRequest<Bytes>>,
    keepalive: KeepAlive,
    tasks: Tasks,
    state: Arc<State>,
    addr: SocketAddr,
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.tasks.begin();
        if let Some(connection) = this.connection.as_mut() {
            this.keepalive.watch(|| connection.ping_pong());
            this.state.driver.register(cx.waker());
            if this.state.abandoned.load(Ordering::Acquire) {
                this.watch = None;
            }
            let polled = match this.keepalive.poll_alive(cx) {
                true => Pin::new(&mut *connection).poll(cx),
                false => {
                    tracing::debug!(replica = %this.addr, "the HTTP/2 connection to the replica did not answer its keep-alive ping: closed");
                    Poll::Ready(Ok(()))
                }
            };
            // Each time the connection makes progress (a SETTINGS frame among others), the
            // replica's current stream limit is noted for `has_room`.
            this.state
                .max_streams
                .store(connection.max_concurrent_send_streams(), Ordering::Relaxed);
            if let Some(watch) = this.watch.as_mut() {
                if let Poll::Ready(Err(_)) = watch.poll_ready(cx) {
                    this.state.closing.store(true, Ordering::Release);
                }
            }
            if let Poll::Ready(ended) = polled {
                if let Err(e) = ended {
                    tracing::debug!(replica = %this.addr, error = %e, "the HTTP/2 connection to the replica ended");
                }
                this.state.ended.store(true, Ordering::Release);
                this.watch = None;
                // Dropped, it tells the streams still waiting on it that it is gone.
                this.connection = None;
            }
        }
        // The request bodies among them: they end soon after the connection does.
        let left = this.tasks.run(cx);
        match this.connection.is_some() || left {
            true => Poll::Pending,
            false => Poll::Ready(()),
        }
    }
}

/// Whether a connection with `open` streams may carry one more, the replica allowing
/// `replica_max` at once: under both its limit and [`MAX_STREAMS_PER_CONN`].
pub fn has_room(open: usize, replica_max: usize) -> bool {
    open < replica_max.min(MAX_STREAMS_PER_CONN)
}

struct Kept {
    conn: H2Conn,
    used: Instant,
}

/// A serving thread's HTTP/2 connections to the replicas (one set per thread, in its worker:
/// [`crate::worker::Worker`]), and what TLS replicas chose instead of `h2`. Behind locks only
/// its own thread ever takes: request futures must be `Send` (their connection's task is
/// spawned on the runtime).
#[derive(Default)]
pub struct Conns {
    /// By replica address (the provider's, never a client's: a fast hash).
    kept: std::sync::Mutex<FxHashMap<SocketAddr, Vec<Kept>>>,
    /// The replicas that chose HTTP/1.1 over TLS when offered `h2`: the TLS client that asked,
    /// the choice, and when.
    http1_only: std::sync::Mutex<FxHashMap<SocketAddr, (u64, Alpn, Instant)>>,
    /// Connections this thread is making, by replica: a burst of requests to a replica with no
    /// connection with room waits for the one being made instead of each making its own.
    making: std::sync::Mutex<FxHashMap<SocketAddr, Arc<tokio::sync::Notify>>>,
}

/// What a request that found no connection with room does.
pub enum Turn<'a> {
    /// Make one: this request is the one making it ([`Making`] says when it is done).
    Make(Making<'a>),
    /// Another request of this thread is making one: wait for it, then look again.
    Wait(Arc<tokio::sync::Notify>),
    /// The replica has [`MAX_CONNS_PER_REPLICA`] kept already, none with room: a connection
    /// made now is not kept, so it carries this request alone and no other waits for it.
    Alone,
}

/// The connection to a replica this request is making; dropped (made or failed), the requests
/// waiting for it look again.
pub struct Making<'a> {
    conns: &'a Conns,
    addr: SocketAddr,
    done: Arc<tokio::sync::Notify>,
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        crate::sync::lock(&self.conns.making).remove(&self.addr);
        self.done.notify_waiters();
    }
}

impl Conns {
    /// For a request that found no connection to `addr` with room: whether it makes the next
    /// one, waits for the one being made, or (the replica has the most kept already) makes
    /// one for itself alone.
    pub fn turn(&self, addr: SocketAddr) -> Turn<'_> {
        let kept = crate::sync::lock(&self.kept)
            .get(&addr)
            .map_or(0, |kept| kept.len());
        if kept >= MAX_CONNS_PER_REPLICA {
            return Turn::Alone;
        }
        let mut m = crate::sync::lock(&self.making);
        if let Some(done) = m.get(&addr) {
            return Turn::Wait(done.clone());
        }
        let done = Arc::new(tokio::sync::Notify::new());
        m.insert(addr, done.clone());
        Turn::Make(Making {
            conns: self,
            addr,
            done,
        })
    }

    /// A connection to `addr`, made with `tls`, with room for one more stream; the ones found
    /// closed, idle too long or made by another TLS client are dropped on the way.
    pub fn take(&self, addr: SocketAddr, tls: Option<&UpstreamTls>) -> Option<H2Conn> {
        let client = tls.map_or(0, UpstreamTls::id);
        let mut conns = crate::sync::lock(&self.kept);
        let kept = conns.get_mut(&addr)?;
        let now = Instant::now();
        kept.retain(|k| {
            k.conn.made_by == client
                && k.conn.is_open()
                && !(k.conn.is_idle() && now.duration_since(k.used) >= IDLE_TIMEOUT)
        });
        let found = kept.iter_mut().find(|k| k.conn.has_room()).map(|k| {
            k.used = now;
            k.conn.clone()
        });
        if kept.is_empty() {
            conns.remove(&addr);
        }
        found
    }

    /// Keeps a new connection (unless the replica has the most already). Connections unused
    /// for [`IDLE_TIMEOUT`] or closed, to any replica, are dropped on the way (replicas that
    /// went away, or that this thread stopped sending to, leave theirs here; new connections
    /// are rare, so the sweep is too).
    pub fn keep(&self, conn: &H2Conn) {
        let mut conns = crate::sync::lock(&self.kept);
        let now = Instant::now();
        conns.retain(|_, kept| {
            kept.retain(|k| {
                k.conn.is_open()
                    && !(k.conn.is_idle() && now.duration_since(k.used) >= IDLE_TIMEOUT)
            });
            !kept.is_empty()
        });
        let kept = conns.entry(conn.addr).or_default();
        if kept.len() < MAX_CONNS_PER_REPLICA {
            kept.push(Kept {
                conn: conn.clone(),
                used: Instant::now(),
            });
        }
    }

    /// What the replica at `addr` chose instead of `h2` when this thread's last connection to
    /// it with `tls` offered both, if that was less than [`ALPN_RECHECK`] ago. Plain TCP has no
    /// ALPN: nothing is looked up (every h2c request asks).
    pub fn chose_http1(&self, addr: SocketAddr, tls: Option<&UpstreamTls>) -> Option<Alpn> {
        let client = tls?.id();
        let m = crate::sync::lock(&self.http1_only);
        let (by, chosen, at) = m.get(&addr)?;
        (*by == client && at.elapsed() < ALPN_RECHECK).then(|| chosen.clone())
    }

    /// Notes what the replica at `addr` chose when offered `h2` by `tls` (`None`: it chose
    /// `h2`); a replica that newly chose HTTP/1.1, or newly chose `h2` again, is logged (once a
    /// thread).
    pub fn note_alpn(&self, addr: SocketAddr, tls: Option<&UpstreamTls>, http1: Option<&Alpn>) {
        let client = tls.map_or(0, UpstreamTls::id);
        let mut m = crate::sync::lock(&self.http1_only);
        match http1 {
            Some(chosen) => {
                let before = m.insert(addr, (client, chosen.clone(), Instant::now()));
                if before.is_none() {
                    tracing::info!(replica = %addr, alpn = %chosen, "the replica chose HTTP/1.1 over TLS, not h2: its requests go over HTTP/1.1, its gRPC calls are refused");
                }
            }
            None => {
                if m.remove(&addr).is_some() {
                    tracing::info!(replica = %addr, "the replica chose h2 over TLS again");
                }
            }
        }
    }

    /// Drops the connection to `addr` that `stream` was opened on: it refused a stream it
    /// should have taken (a GOAWAY raced the request), so the next request makes a new one.
    pub fn forget(&self, addr: SocketAddr, stream: &StreamGuard) {
        if let Some(kept) = crate::sync::lock(&self.kept).get_mut(&addr) {
            kept.retain(|k| !Arc::ptr_eq(&k.conn.state, &stream.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_the_smaller_of_the_replicas_limit_and_ours() {
        assert!(has_room(0, 100));
        assert!(has_room(99, 100));
        assert!(!has_room(100, 100));
        assert!(!has_room(1, 1), "a replica allowing one stream gets one");
        assert!(!has_room(0, 0), "a replica allowing none gets none");
        assert!(
            !has_room(MAX_STREAMS_PER_CONN, 1000),
            "ours caps a generous replica"
        );
    }
}
