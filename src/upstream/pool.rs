//! Upstream connections and the serving thread's pool of idle HTTP/1.1 ones.
//!
//! Owns: [`Conn`] (a replica connection with its read buffer: plain TCP, or TLS with the client
//! it is given, ALPN `http/1.1` or, for HTTP/2, `h2` and `http/1.1` with the replica's choice
//! kept ([`Conn::alpn`]), see [`Conn::connect_for`]; HTTP/2 takes its byte stream,
//! [`Conn::into_stream`]), connecting with a deadline, and a serving thread's [`Pool`] of idle
//! keep-alive connections (last in, first out; at most [`MAX_IDLE_PER_REPLICA`] per replica;
//! closed after [`IDLE_TIMEOUT`]; a connection the replica closed, that has unsolicited bytes,
//! or that another TLS client than the caller's made, is never handed out; those that expired
//! or that their replica closed are closed when met or by the thread's [`sweep_every`]). Per
//! thread, because every request stays on its serving thread: no contended lock, no
//! cross-thread wake-up, no shared cache line.
//! Must not touch: HTTP, or which TLS client is in force (the caller passes the snapshot's). It
//! moves bytes and connections.

use std::io;
use std::net::SocketAddr;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::descriptors::ReplicaConnection;
use crate::tls::upstream::{Alpn, UpstreamStream, UpstreamTls};

/// Idle keep-alive connections kept per replica and serving thread: a bound for safety, not
/// the working limit, which is what the load needed within [`IDLE_TIMEOUT`] (and none while the
/// descriptors are short, `Admission::short_of_descriptors`). A bound below the requests a
/// replica gets at once closes the rest after every response and connects them again (eight
/// HTTP/2 clients of 16 streams are 128 at once; docs/performance.md). HAProxy keeps what it
/// opened (`pool-max-conn` unlimited by default).
pub const MAX_IDLE_PER_REPLICA: usize = 1024;
/// An idle connection older than this is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a serving thread closes its idle connections that expired or that their replica
/// closed ([`sweep_every`]): an idle gateway does not keep what its last burst opened, nor
/// sockets its replicas closed, for longer than [`IDLE_TIMEOUT`] and this.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Read buffers are kept for the next response (which then allocates nothing to be read into)
/// in a spare list per serving thread, not with the idle connections: a buffer is needed only
/// while a response is read, and idle connections are many after a burst while each kept
/// buffer is RSS. At most [`SPARE_BUFFERS`] of at most [`KEEP_BUFFER`] bytes each stay, 128 KiB
/// a serving thread.
const KEEP_BUFFER: usize = 4 * 1024;
const SPARE_BUFFERS: usize = 32;

/// The byte stream to a replica: plain TCP, or TLS (`[provider] upstream_tls`).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<UpstreamStream>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => {
                // Whatever an earlier write left in the TLS buffer goes first, so nothing
                // written stays behind once the caller turns to reading.
                ready!(Pin::new(&mut **s).poll_flush(cx))?;
                let n = ready!(Pin::new(&mut **s).poll_write(cx, buf))?;
                let _ = Pin::new(&mut **s).poll_flush(cx)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            tls => {
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &**b);
                Pin::new(tls).poll_write(cx, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, Stream::Plain(s) if s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A connection as a byte stream (a tunnel's, after `101`): what [`Conn::buf`] holds is read
/// first, then the socket. Still counted as a replica connection while it lives.
impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            let n = this.buf.len().min(buf.remaining());
            buf.put_slice(&this.buf.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One connection to a replica.
pub struct Conn {
    stream: Stream,
    /// Bytes read from the replica and not handed on yet.
    pub buf: BytesMut,
    addr: SocketAddr,
    /// The [`UpstreamTls::id`] of the client that made it (0: plain TCP).
    made_by: u64,
    idle_since: Instant,
    /// The pool it goes back to when its response was read whole: set while a request of a
    /// serving thread uses it, never while it is idle in the pool (which would make a cycle).
    home: Option<Arc<Pool>>,
    _counted: ReplicaConnection,
}

/// A plain connection whose socket was set aside ([`Conn::set_aside`]): still counted among the
/// replica's connections. Kept small (many rest at once): made by no TLS client, and in use,
/// so neither its maker nor an idle time is kept.
pub struct SetAside {
    addr: SocketAddr,
    home: Option<Arc<Pool>>,
    _counted: ReplicaConnection,
}

impl SetAside {
    /// The connection again, on `stream` (its socket, back in the runtime).
    pub fn resume(self, stream: TcpStream) -> Conn {
        let SetAside {
            addr,
            home,
            _counted,
        } = self;
        Conn {
            stream: Stream::Plain(stream),
            buf: BytesMut::new(),
            addr,
            made_by: client_id(None),
            idle_since: Instant::now(),
            home,
            _counted,
        }
    }
}

/// Which client a connection made with `tls` is of: its build's id, 0 for plain TCP.
fn client_id(tls: Option<&UpstreamTls>) -> u64 {
    tls.map_or(0, UpstreamTls::id)
}

impl Conn {
    /// Connects to `addr` within `timeout`: plain TCP, or TLS with `tls` (the handshake within
    /// the same `timeout`).
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&UpstreamTls>,
    ) -> Result<Conn, ConnectError> {
        Conn::connect_for(addr, timeout, tls, false).await
    }

    /// [`Conn::connect`] for HTTP/2 when `h2`: over TLS, ALPN `h2` and `http/1.1` are offered
    /// and the replica's choice is kept ([`Conn::alpn`]).
    pub async fn connect_for(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&UpstreamTls>,
        h2: bool,
    ) -> Result<Conn, ConnectError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        };
        let _ = stream.set_nodelay(true);
        let counted = ReplicaConnection::opened();
        let stream = match tls {
            None => Stream::Plain(stream),
            // The handshake is part of connecting: a replica that fails it got nothing yet.
            Some(tls) => match tokio::time::timeout(timeout, async {
                match h2 {
                    true => tls.connect_h2(stream, addr).await,
                    false => tls.connect(stream, addr).await,
                }
            })
            .await
            {
                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Err(_) => return Err(ConnectError::Timeout(timeout)),
            },
        };
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
            addr,
            made_by: client_id(tls),
            idle_since: Instant::now(),
            home: None,
            _counted: counted,
        })
    }

    /// What the replica chose in the TLS handshake (ALPN); `None` over plain TCP.
    pub fn alpn(&self) -> Option<Alpn> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(s) => Some(Alpn::of(s)),
        }
    }

    /// The byte stream, for a protocol that keeps the connection itself (HTTP/2), with the
    /// count of replica connections it stays in while it lives.
    pub fn into_stream(self) -> (Stream, ReplicaConnection) {
        (self.stream, self._counted)
    }

    pub fn stream(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// Whether it is plain TCP (its socket can be set aside: [`Conn::set_aside`]).
    pub fn is_plain(&self) -> bool {
        matches!(self.stream, Stream::Plain(_))
    }

    /// Takes the socket of a plain connection out of the runtime, to be held without a task (a
    /// resting tunnel's replica leg), with the rest of the connection to make it again; what
    /// was read and not handed on yet must have been.
    pub fn set_aside(self) -> io::Result<(std::net::TcpStream, SetAside)> {
        let Conn {
            stream,
            buf,
            addr,
            home,
            _counted,
            ..
        } = self;
        let Stream::Plain(stream) = stream else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a TLS connection cannot be set aside",
            ));
        };
        debug_assert!(buf.is_empty(), "bytes read would be lost");
        let rest = SetAside {
            addr,
            home,
            _counted,
        };
        Ok((stream.into_std()?, rest))
    }

    /// The gateway's own address on this connection (what the replica sees as its peer).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.stream {
            Stream::Plain(s) => s.local_addr(),
            Stream::Tls(s) => s.get_ref().0.local_addr(),
        }
    }

    /// Reads what the replica sent (up to `max` more bytes) into `buf`; `Ok(0)` at its end.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(max);
        }
        let stream = match &mut self.stream {
            Stream::Plain(s) => s,
            Stream::Tls(s) => return poll_fill_tls(s, &mut self.buf, cx),
        };
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let room = self.buf.capacity() - self.buf.len();
            match stream.try_read_buf(&mut self.buf) {
                Ok(n) => {
                    if n > 0 && n < room {
                        // A short read drained the socket: forget the readiness now (as tokio's
                        // own poll_read does), so neither the next read nor the pool's check
                        // spends a syscall on EAGAIN.
                        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Whether an idle connection can carry a request: not expired, and the replica has neither
    /// closed it nor sent anything unasked.
    fn usable(&mut self) -> bool {
        if self.idle_since.elapsed() >= IDLE_TIMEOUT {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let stream = match &mut self.stream {
            Stream::Plain(s) => s,
            Stream::Tls(s) => {
                // Records that carry no data (session tickets, a key update) are consumed here;
                // data or the end of the stream means the connection is not idle any more.
                let mut probe = [0u8; 1];
                let mut rb = ReadBuf::new(&mut probe);
                return matches!(
                    Pin::new(&mut **s).poll_read(&mut cx, &mut rb),
                    Poll::Pending
                );
            }
        };
        match stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            // Readiness can be left over from the last response: one read tells.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Poll::Ready(Err(_)) => false,
        }
    }
}

/// [`Conn::poll_fill`] over TLS: pending writes first, then what the replica sent, into the
/// buffer's free room (zeroed first: this crate has no unsafe code to skip that).
fn poll_fill_tls(
    s: &mut UpstreamStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    ready!(Pin::new(&mut *s).poll_flush(cx))?;
    let start = buf.len();
    let room = (buf.capacity() - start).max(512);
    buf.resize(start + room, 0);
    let mut rb = ReadBuf::new(&mut buf[start..]);
    let polled = Pin::new(&mut *s).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    buf.truncate(start + n);
    ready!(polled)?;
    Poll::Ready(Ok(n))
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("tcp connect error: {0}")]
    Io(#[source] io::Error),
    #[error("TLS handshake with the replica failed: {0} (check provider.upstream_ca and the replica's certificate)")]
    Tls(#[source] io::Error),
    #[error("tcp connect timed out after {0:?} (proxy.connect_timeout)")]
    Timeout(Duration),
    #[error("the HTTP/2 handshake with the replica failed: {0} (proxy.upstream_protocol: does the replica speak h2c?)")]
    Http2(#[source] ::h2::Error),
    /// Over TLS the replica did not choose HTTP/2: it speaks HTTP/1.1 on this connection.
    #[error(
        "the replica chose {0} in its TLS handshake, not h2: it does not speak HTTP/2 over TLS"
    )]
    NotHttp2(Alpn),
}

#[derive(Default)]
struct Idle {
    /// Keyed by replica addresses, which come from the provider, never from a client: a fast
    /// hash instead of SipHash (two lookups a request).
    by_replica: FxHashMap<SocketAddr, Vec<Conn>>,
    /// Empty read buffers for the connections taken from the pool.
    spare: Vec<BytesMut>,
}

/// A serving thread's idle connections (one pool per thread, in its worker:
/// [`crate::worker::Worker`]). Behind a lock only its own thread ever takes: request futures
/// must be `Send`: their connection's task is spawned on the runtime.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Idle>,
}

impl Pool {
    /// An idle connection to `addr`, if a usable one made with `tls` is there; once its
    /// response is read whole it comes back here. One made with another client (before an
    /// edit of `[provider] upstream_tls` or `upstream_ca`) is closed when met: the edit applies
    /// to the next request, not only once the connections it would have refused age out, which
    /// a busy replica's never do.
    pub fn take(self: &Arc<Self>, addr: SocketAddr, tls: Option<&UpstreamTls>) -> Option<Conn> {
        let client = client_id(tls);
        let mut idle = crate::sync::lock(&self.idle);
        let idle = &mut *idle;
        let conns = idle.by_replica.get_mut(&addr)?;
        while let Some(mut c) = conns.pop() {
            if c.made_by == client && c.usable() {
                if let Some(buf) = idle.spare.pop() {
                    c.buf = buf;
                }
                c.home = Some(Arc::clone(self));
                return Some(c);
            }
        }
        None
    }

    /// Makes a new connection `conn` come back here once its response is read whole.
    pub fn adopt(self: &Arc<Self>, conn: &mut Conn) {
        conn.home = Some(Arc::clone(self));
    }

    /// Closes the idle connections past [`IDLE_TIMEOUT`] or no longer usable (the replica
    /// closed them, or sent bytes nobody asked for), those of replicas that went away included;
    /// returns how many stay.
    pub fn sweep(&self) -> usize {
        let mut idle = crate::sync::lock(&self.idle);
        idle.by_replica.retain(|_, conns| {
            conns.retain_mut(Conn::usable);
            !conns.is_empty()
        });
        idle.by_replica.values().map(Vec::len).sum()
    }

    fn put_back(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        conn.home = None;
        let mut idle = crate::sync::lock(&self.idle);
        let buf = std::mem::take(&mut conn.buf);
        let keep = buf.is_empty() && (1..=KEEP_BUFFER).contains(&buf.capacity());
        if keep && idle.spare.len() < SPARE_BUFFERS {
            idle.spare.push(buf);
        }
        let conns = idle.by_replica.entry(conn.addr).or_default();
        if conns.len() < MAX_IDLE_PER_REPLICA {
            conns.push(conn);
        }
    }
}

/// Sweeps `pool` every [`SWEEP_EVERY`] for as long as it runs: a task of each serving thread.
pub async fn sweep_every(pool: Arc<Pool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pool.sweep();
    }
}

/// Gives a connection whose last response was read whole back to the pool it came from or was
/// adopted by; one of no pool (a health check's) is closed.
pub fn put_back(mut conn: Conn) {
    if let Some(pool) = conn.home.take() {
        pool.put_back(conn);
    }
}
