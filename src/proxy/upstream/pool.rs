//! Upstream connections and the serving thread's pool of idle ones.
//!
//! Owns: [`Conn`] (a replica connection with its read buffer), connecting with a deadline, and
//! the per-thread pool of idle keep-alive connections (last in, first out; at most
//! [`MAX_IDLE_PER_REPLICA`] per replica; closed after [`IDLE_TIMEOUT`]; a connection the replica
//! closed, or that has unsolicited bytes, is never handed out). Per thread, because every request
//! stays on its serving thread: no lock, no cross-thread wake-up, no shared cache line.
//! Must not touch: HTTP. It moves bytes and connections.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle keep-alive connections kept per replica and serving thread.
pub const MAX_IDLE_PER_REPLICA: usize = 64;
/// An idle connection older than this is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A buffer kept with an idle connection; a larger one is given back to the allocator (idle
/// connections are many after a burst, and each buffer is RSS).
const KEEP_BUFFER: usize = 0;

/// One connection to a replica.
pub struct Conn {
    stream: TcpStream,
    /// Bytes read from the replica and not handed on yet.
    pub buf: BytesMut,
    addr: SocketAddr,
    idle_since: Instant,
}

impl Conn {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
            addr,
            idle_since: Instant::now(),
        })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Reads what the replica sent (up to `max` more bytes) into `buf`; `Ok(0)` at its end.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(max);
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            let room = self.buf.capacity() - self.buf.len();
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(n) => {
                    if n > 0 && n < room {
                        // A short read drained the socket: forget the readiness now (as tokio's
                        // own poll_read does), so neither the next read nor the pool's check
                        // spends a syscall on EAGAIN.
                        let _ = self.stream.try_io(tokio::io::Interest::READABLE, || {
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
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            // Readiness can be left over from the last response: one read tells.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Poll::Ready(Err(_)) => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("tcp connect error: {0}")]
    Io(#[source] io::Error),
    #[error("tcp connect timed out after {0:?} (proxy.connect_timeout)")]
    Timeout(Duration),
}

#[derive(Default)]
struct Idle {
    by_replica: HashMap<SocketAddr, Vec<Conn>>,
    returns: u32,
}

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle::default());
}

/// An idle connection to `addr` from this thread's pool, if a usable one is there.
pub fn take(addr: SocketAddr) -> Option<Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let conns = idle.by_replica.get_mut(&addr)?;
        while let Some(mut c) = conns.pop() {
            if c.usable() {
                return Some(c);
            }
        }
        None
    })
}

/// Gives a connection whose last response was read whole back to this thread's pool.
pub fn put_back(mut conn: Conn) {
    if conn.buf.capacity() > KEEP_BUFFER {
        conn.buf = BytesMut::new();
    }
    conn.idle_since = Instant::now();
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        idle.returns = idle.returns.wrapping_add(1);
        if idle.returns % 4096 == 0 {
            // Now and then, close what expired (replicas that went away leave theirs here).
            idle.by_replica.retain(|_, conns| {
                conns.retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT);
                !conns.is_empty()
            });
        }
        let conns = idle.by_replica.entry(conn.addr).or_default();
        if conns.len() < MAX_IDLE_PER_REPLICA {
            conns.push(conn);
        }
    });
}
