//! The bytes of one tunnel: a client connection and a replica connection after `101`, spliced
//! both ways until both have ended, one of them breaks, nothing moves for
//! `[tunnels] idle_timeout`, or the tunnel is told to close; or, when it may, until it has been
//! quiet for `[tunnels] rest_after` and can rest without its task.
//!
//! Owns: [`splice`], its state across waits and rests ([`Splice`], [`Resting`]) and what it
//! returns ([`Splicing`]; [`Spliced`]: the bytes each way and why it ended). The bytes each side
//! sent past its head go first, through the same path as the rest. Each
//! direction reads into a buffer on the stack and writes on at once; only what the other side
//! did not take yet is kept on the heap, and reading that direction waits until it is taken
//! (backpressure). An idle tunnel holds no buffer. An end of stream is passed on as a half-close
//! (the other side's write is shut) and the other direction goes on. A close for re-homing or a
//! drain ends a WebSocket with a close frame put in at a frame boundary on the replica→client
//! leg ([`super::ws::Frames`]: frame headers only); any other protocol just gets the close.
//! Must not touch: the registry, metrics or the access log (the caller records what this
//! returns); what the bytes mean beyond WebSocket frame headers.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::ws::{self, Frames};
use super::{Close, Registration};

/// How many bytes one read takes: the buffer lives on the stack for the read's duration.
const READ_SIZE: usize = 16 * 1024;
/// Reads a direction makes in one wake-up before the other direction gets its turn.
const READS_PER_TURN: usize = 8;
/// How long a closing WebSocket waits for a frame boundary on the replica→client leg before
/// the connection is closed without a close frame (a replica in the middle of a huge frame).
const BOUNDARY_WAIT: Duration = Duration::from_secs(1);
/// How long the client's answer to a close is read (and dropped) before the connection goes:
/// closing with its bytes unread would reset the connection under the close frame.
const LINGER: Duration = Duration::from_secs(1);

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides ended their streams.
    Ended,
    /// The client's connection broke, or it took no byte for `proxy.send_timeout`.
    ClientError(String),
    /// The replica's connection broke, or it took no byte for `proxy.send_timeout`.
    ReplicaError(String),
    /// Nothing moved either way for `[tunnels] idle_timeout`.
    Idle,
    /// Closed by the gateway: re-homed, or the gateway drained.
    Closed(Close),
    /// The gateway could not go on with it: a socket it could not take out of its runtime to
    /// rest, or put back after.
    GatewayError(String),
}

/// What a tunnel carried, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the client to the replica.
    pub up: u64,
    /// Bytes from the replica to the client.
    pub down: u64,
    pub end: End,
}

/// One direction of the tunnel.
#[derive(Default)]
struct Flow {
    /// Read and not taken by the other side yet (empty, and unallocated, while it keeps up).
    pending: Vec<u8>,
    taken: usize,
    /// The source ended its stream.
    ended: bool,
    /// The end was passed on (the destination's write side shut).
    shut: bool,
    /// Written since the last flush.
    unflushed: bool,
    bytes: u64,
}

/// What one poll of a direction came to.
enum Step {
    /// Its source ended and the end was passed on.
    Done,
    /// Asked to stop at a WebSocket frame boundary: it is there, with nothing pending.
    Boundary,
    /// It waits for a side (the task is woken).
    Waiting,
    /// It read its share of this turn; poll again.
    Yield,
}

/// A failure on one side.
enum Broke {
    Source(io::Error),
    Destination(io::Error),
}

impl Flow {
    /// A flow whose first bytes (sent past a head) wait to be written.
    fn early(first: BytesMut) -> Flow {
        Flow {
            bytes: first.len() as u64,
            // An empty buffer may still hold its room (a response's read buffer): not kept.
            pending: match first.is_empty() {
                true => Vec::new(),
                false => first.into(),
            },
            ..Flow::default()
        }
    }

    /// Moves bytes from `src` to `dst`. With `frames`, they are followed as WebSocket frames;
    /// with `stop` too, reading stops at the first frame boundary (what lies past it is dropped:
    /// the tunnel is closing).
    fn poll_move<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        mut frames: Option<&mut Frames>,
        stop: bool,
        moved: &mut bool,
    ) -> Result<Step, Broke>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        for _ in 0..READS_PER_TURN {
            if !self.drain(cx, dst, moved).map_err(Broke::Destination)? {
                return Ok(Step::Waiting);
            }
            if stop && frames.as_deref().is_some_and(Frames::at_boundary) {
                return Ok(Step::Boundary);
            }
            if self.ended {
                return self.finish(cx, dst);
            }
            let mut stack = [0u8; READ_SIZE];
            let mut buf = ReadBuf::new(&mut stack);
            match Pin::new(&mut *src).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.unflushed {
                        // Nothing more to write for now: whatever a TLS layer holds goes out.
                        match Pin::new(&mut *dst).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Err(Broke::Destination(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Ok(Step::Waiting);
                }
                Poll::Ready(Err(e)) => return Err(Broke::Source(e)),
                Poll::Ready(Ok(())) => {}
            }
            let mut read = buf.filled();
            if read.is_empty() {
                self.ended = true;
                continue;
            }
            *moved = true;
            if let Some(f) = frames.as_deref_mut() {
                let keep = f.advance(read, stop);
                read = &read[..keep];
            }
            self.bytes += read.len() as u64;
            self.write_through(cx, dst, read)
                .map_err(Broke::Destination)?;
        }
        Ok(Step::Yield)
    }

    /// Writes what was just read, keeping what `dst` does not take now.
    fn write_through<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        read: &[u8],
    ) -> io::Result<()> {
        let n = match Pin::new(&mut *dst).poll_write(cx, read) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => 0,
        };
        if n > 0 {
            self.unflushed = true;
        }
        if n < read.len() {
            self.pending.extend_from_slice(&read[n..]);
            self.taken = 0;
        }
        Ok(())
    }

    /// Writes what is pending; `true` once nothing is (the buffer is given back).
    fn drain<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        moved: &mut bool,
    ) -> io::Result<bool> {
        while self.taken < self.pending.len() {
            match Pin::new(&mut *dst).poll_write(cx, &self.pending[self.taken..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.taken += n;
                    self.unflushed = true;
                    *moved = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        if !self.pending.is_empty() {
            self.pending = Vec::new();
            self.taken = 0;
        }
        Ok(true)
    }

    /// Passes the end on: flush, then shut the destination's write side.
    fn finish<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
    ) -> Result<Step, Broke> {
        if self.shut {
            return Ok(Step::Done);
        }
        match Pin::new(&mut *dst).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                self.shut = true;
                self.unflushed = false;
                Ok(Step::Done)
            }
            // A peer that is gone already has its end.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => {
                self.shut = true;
                Ok(Step::Done)
            }
            Poll::Ready(Err(e)) => Err(Broke::Destination(e)),
            Poll::Pending => Ok(Step::Waiting),
        }
    }
}

/// What a splice came to: the tunnel ended, or it rests (see [`Resting`]).
pub enum Splicing {
    Ended(Spliced),
    Resting(Resting),
}

/// A tunnel that went quiet for the `rest_after` it was spliced with: nothing pending either
/// way, both streams open, no close heard. Its connections stay with the caller, which may hold
/// them without a task ([`super::resting`]) and splice it again ([`Splice::resumed`]) when
/// either side has bytes again, its close comes or [`Resting::idle_until`] passes.
#[derive(Debug)]
pub struct Resting {
    up: u64,
    down: u64,
    /// Where the replica's WebSocket frames stand (`None`: not a WebSocket).
    frames: Option<Frames>,
    last_moved: Instant,
}

impl Resting {
    /// When it is closed for idling (`[tunnels] idle_timeout` after its last byte).
    pub fn idle_until(&self, idle: Duration) -> Instant {
        self.last_moved + idle
    }

    /// What it carried, ending now for `end` (it could not go on after its rest).
    pub fn ended(&self, end: End) -> Spliced {
        Spliced {
            up: self.up,
            down: self.down,
            end,
        }
    }
}

/// What a splice knows of its tunnel across its waits. Its owner keeps it where the tunnel's
/// task keeps it and lends it to [`splice`]: one place in the task's future.
pub struct Splice {
    up: Flow,
    down: Flow,
    frames: Option<Frames>,
    websocket: bool,
    last_moved: Instant,
    /// When the quiet a rest waits for began: the last byte, or the task's start. A tunnel
    /// just woken is not rested again before `rest_after`, even with nothing read yet: the
    /// runtime reports a socket it was just given as readable only after its next turn, and
    /// the bytes that woke it would wake it again at once, for ever.
    quiet_since: Instant,
    /// Whose stream ended first: a WebSocket replica that went first without a close frame
    /// broke; one that followed its client's end did not.
    replica_ended_first: Option<bool>,
}

impl Splice {
    /// A new tunnel's splice. What the replica sent past its `101` (`replica_read`) goes to the
    /// client first, through the same path as the rest; `websocket`: a close puts a close
    /// frame in first.
    pub fn new(replica_read: BytesMut, websocket: bool) -> Splice {
        let mut frames = websocket.then(Frames::default);
        if let Some(f) = frames.as_mut() {
            f.advance(&replica_read, false);
        }
        let now = Instant::now();
        Splice {
            up: Flow::default(),
            down: Flow::early(replica_read),
            frames,
            websocket,
            last_moved: now,
            quiet_since: now,
            replica_ended_first: None,
        }
    }

    /// What the client sent past its request head (the new protocol's first bytes) goes to
    /// the replica first.
    pub fn client_sent(&mut self, client_read: BytesMut) {
        self.up = Flow::early(client_read);
    }

    /// The splice of a tunnel that rested, to go on with.
    pub fn resumed(resting: Resting) -> Splice {
        let flow = |bytes| Flow {
            bytes,
            ..Flow::default()
        };
        Splice {
            up: flow(resting.up),
            down: flow(resting.down),
            websocket: resting.frames.is_some(),
            frames: resting.frames,
            last_moved: resting.last_moved,
            quiet_since: Instant::now(),
            replica_ended_first: None,
        }
    }

    /// Nothing in flight either way and both streams open: the tunnel can wait without its task.
    fn can_rest(&self) -> bool {
        let quiet = |f: &Flow| f.pending.is_empty() && !f.ended && !f.shut && !f.unflushed;
        quiet(&self.up) && quiet(&self.down)
    }

    fn ended(&self, end: End) -> Spliced {
        Spliced {
            up: self.up.bytes,
            down: self.down.bytes,
            end,
        }
    }
}

/// Splices the two connections until the tunnel ends (see the module's header), or, with
/// `rest_after`, until nothing moved for that long and it can rest ([`Splicing::Resting`]);
/// `close` tells it to close (re-homing, a drain), `idle` is `[tunnels] idle_timeout`.
///
/// An idle tunnel is this future (unless it rests), so what it keeps across its waits is kept
/// small: everything is borrowed from the caller, which keeps each thing once, and reads borrow
/// a buffer on the stack of a poll, not of the future.
pub async fn splice<C, R>(
    state: &mut Splice,
    client: &mut C,
    replica: &mut R,
    close: &mut Registration,
    idle: Duration,
    rest_after: Option<Duration>,
) -> Splicing
where
    C: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    // The timer is set once and moved only when it fires early: no timer work per read. It
    // fires at the idle timeout, or earlier when the tunnel may rest.
    let idle_at = |state: &Splice| state.last_moved + idle;
    let first = rest_after.map_or(idle_at(state), |after| {
        idle_at(state).min(state.quiet_since + after)
    });
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(first));
    let mut closing: Option<Closing> = None;
    // `None`: it rests.
    let end: Option<End> = poll_fn(|cx| {
        if closing.is_none() {
            if let Poll::Ready(why) = close.poll_closed(cx) {
                let Some(f) = state.frames.take() else {
                    return Poll::Ready(Some(End::Closed(why)));
                };
                closing = Some(Closing {
                    why,
                    frames: f,
                    queued: false,
                    waited: Box::pin(tokio::time::sleep(BOUNDARY_WAIT)),
                });
            }
        }
        if let Some(c) = closing.as_mut() {
            return c.poll(cx, &mut state.down, replica, client).map(Some);
        }
        let mut moved = false;
        let (up, down) = (&mut state.up, &mut state.down);
        let up_step = up.poll_move(cx, client, replica, None, false, &mut moved);
        let frames = state.frames.as_mut();
        let down_step = down.poll_move(cx, replica, client, frames, false, &mut moved);
        let steps = match (up_step, down_step) {
            (Err(Broke::Source(e)), _) | (_, Err(Broke::Destination(e))) => {
                return Poll::Ready(Some(End::ClientError(e.to_string())))
            }
            (Err(Broke::Destination(e)), _) | (_, Err(Broke::Source(e))) => {
                return Poll::Ready(Some(End::ReplicaError(e.to_string())))
            }
            (Ok(a), Ok(b)) => (a, b),
        };
        if state.replica_ended_first.is_none() && (up.ended || down.ended) {
            state.replica_ended_first = Some(down.ended && !up.ended);
        }
        if let (Step::Done, Step::Done) = steps {
            return Poll::Ready(Some(End::Ended));
        }
        if matches!(steps.0, Step::Yield) || matches!(steps.1, Step::Yield) {
            cx.waker().wake_by_ref();
        }
        let now = Instant::now();
        if moved {
            state.last_moved = now;
            state.quiet_since = now;
        }
        while timer.as_mut().poll(cx).is_ready() {
            let idle_at = idle_at(state);
            if now >= idle_at {
                return Poll::Ready(Some(End::Idle));
            }
            let next = match rest_after {
                Some(after) if now >= state.quiet_since + after => {
                    if state.can_rest() {
                        return Poll::Ready(None);
                    }
                    // Quiet, but bytes wait for a side to take them: looked at again later.
                    now + after
                }
                Some(after) => state.quiet_since + after,
                None => idle_at,
            };
            timer.as_mut().reset(next.min(idle_at));
        }
        Poll::Pending
    })
    .await;
    let Some(end) = end else {
        return Splicing::Resting(Resting {
            up: state.up.bytes,
            down: state.down.bytes,
            frames: state.frames.take(),
            last_moved: state.last_moved,
        });
    };
    if let (End::Closed(_), true) = (&end, state.websocket) {
        timer.as_mut().reset(Instant::now() + LINGER);
        linger(client, timer.as_mut()).await;
    }
    // A WebSocket's server ends with a close frame; one that just went is a replica that
    // broke (a crash, a kill), whatever the socket said.
    let end = match (end, &state.frames) {
        (End::Ended, Some(f)) if !f.saw_close() && state.replica_ended_first == Some(true) => {
            End::ReplicaError("the replica ended the WebSocket without a close frame".into())
        }
        (end, _) => end,
    };
    Splicing::Ended(state.ended(end))
}

/// A WebSocket being closed by the gateway: the replica's bytes go on to the next frame
/// boundary, then the close frame and the end of the client's stream.
struct Closing {
    why: Close,
    frames: Frames,
    /// The close frame is pending on the replica→client flow.
    queued: bool,
    /// Bounds the wait for a boundary ([`BOUNDARY_WAIT`]).
    waited: Pin<Box<Sleep>>,
}

impl Closing {
    fn poll<R, C>(
        &mut self,
        cx: &mut Context<'_>,
        down: &mut Flow,
        replica: &mut R,
        client: &mut C,
    ) -> Poll<End>
    where
        R: AsyncRead + Unpin,
        C: AsyncWrite + Unpin,
    {
        let closed = Poll::Ready(End::Closed(self.why));
        if self.waited.as_mut().poll(cx).is_ready() {
            return closed;
        }
        loop {
            let mut moved = false;
            let frames = (!self.queued).then_some(&mut self.frames);
            let step = down.poll_move(cx, replica, client, frames, !self.queued, &mut moved);
            match step {
                Ok(Step::Waiting) => return Poll::Pending,
                Ok(Step::Yield) => continue,
                Ok(Step::Done) => return closed,
                // The replica's side broke between frames: the close frame still goes out.
                Err(Broke::Source(_)) if !self.queued && self.frames.at_boundary() => {}
                Err(_) => return closed,
                Ok(Step::Boundary) => {}
            }
            if down.shut {
                return closed;
            }
            let (code, reason) = self.why.websocket_close();
            down.pending = ws::close_frame(code, reason);
            down.taken = 0;
            down.ended = true;
            self.queued = true;
        }
    }
}

/// Reads (and drops) what the client still sends after a close, until it ends its side or
/// `until` fires. The bytes go to a buffer on the poll's stack, so that this wait adds nothing
/// to the tunnel's future.
async fn linger<C: AsyncRead + Unpin>(client: &mut C, mut until: Pin<&mut Sleep>) {
    poll_fn(|cx| loop {
        if until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut sink = [0u8; 512];
        let mut buf = ReadBuf::new(&mut sink);
        match Pin::new(&mut *client).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
            Poll::Ready(_) => return Poll::Ready(()),
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::rehome::Reason;
    use crate::tunnel::testing::{registered, Teller};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A tunnel between two in-memory pipes of `capacity` bytes; returns the far ends (the
    /// client's and the replica's) and the running splice.
    fn tunnel(
        capacity: usize,
        websocket: bool,
        idle: Duration,
    ) -> (
        DuplexStream,
        DuplexStream,
        Teller,
        tokio::task::JoinHandle<Spliced>,
    ) {
        let (client, client_far) = duplex(capacity);
        let (replica, replica_far) = duplex(capacity);
        let (mut close, tx) = registered();
        let task = tokio::spawn(async move {
            let (mut client, mut replica) = (client, replica);
            let mut state = Splice::new(BytesMut::new(), websocket);
            state.client_sent(BytesMut::from(&b"early"[..]));
            let spliced = splice(
                &mut state,
                &mut client,
                &mut replica,
                &mut close,
                idle,
                None,
            );
            match spliced.await {
                Splicing::Ended(spliced) => spliced,
                Splicing::Resting(_) => unreachable!("spliced without rest_after"),
            }
        });
        (client_far, replica_far, tx, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_rests_and_goes_on_where_it_was_when_resumed() {
        let (client, mut client_far) = duplex(1024);
        let (replica, mut replica_far) = duplex(1024);
        let (mut close, tx) = registered();
        let (mut client, mut replica) = (client, replica);
        let mut state = Splice::new(BytesMut::new(), false);
        state.client_sent(BytesMut::from(&b"early"[..]));
        let idle = Duration::from_secs(60);
        let rest_after = Some(Duration::from_secs(5));
        let started = Instant::now();
        let c = &mut close;
        let splicing = splice(&mut state, &mut client, &mut replica, c, idle, rest_after);
        let feed = async {
            let mut early = [0u8; 5];
            replica_far
                .read_exact(&mut early)
                .await
                .expect("early bytes");
            tokio::time::sleep(Duration::from_secs(3)).await;
            replica_far.write_all(b"news").await.expect("write");
            let mut news = [0u8; 4];
            client_far.read_exact(&mut news).await.expect("through");
        };
        let (splicing, ()) = tokio::join!(splicing, feed);
        let Splicing::Resting(resting) = splicing else {
            panic!("a quiet tunnel rests")
        };
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(8),
            "5 s after its last byte, not after its first"
        );
        assert_eq!(resting.idle_until(idle), started + Duration::from_secs(63));
        // Resumed: the bytes go on, counted on from where it rested, and the close still works.
        client_far.write_all(b"up").await.expect("write");
        let mut state = Splice::resumed(resting);
        let resumed = splice(
            &mut state,
            &mut client,
            &mut replica,
            &mut close,
            idle,
            None,
        );
        let feed = async {
            let mut up = [0u8; 2];
            replica_far.read_exact(&mut up).await.expect("through");
            assert!(tx.tell(Close::Shutdown), "open");
        };
        let (resumed, ()) = tokio::join!(resumed, feed);
        let Splicing::Ended(spliced) = resumed else {
            panic!("spliced without rest_after")
        };
        assert_eq!(
            spliced,
            Spliced {
                up: 7,
                down: 4,
                end: End::Closed(Close::Shutdown)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_woken_with_nothing_read_yet_rests_again_only_after_rest_after() {
        let (mut client, _client_far) = duplex(64);
        let (mut replica, _replica_far) = duplex(64);
        let (mut close, _tx) = registered();
        // Quiet for a minute already: the socket that woke it has not been read yet.
        let resting = Resting {
            up: 0,
            down: 0,
            frames: None,
            last_moved: Instant::now() - Duration::from_secs(60),
        };
        let started = Instant::now();
        let idle = Duration::from_secs(600);
        let after = Some(Duration::from_secs(5));
        let mut state = Splice::resumed(resting);
        let resumed = splice(
            &mut state,
            &mut client,
            &mut replica,
            &mut close,
            idle,
            after,
        )
        .await;
        assert!(matches!(resumed, Splicing::Resting(_)));
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "not at once: a rest counts from the wake"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_with_bytes_waiting_for_a_side_does_not_rest() {
        let (mut client, _client_far) = duplex(64);
        let (mut replica, mut replica_far) = duplex(64 * 1024);
        let (mut close, _tx) = registered();
        let mut state = Splice::new(BytesMut::new(), false);
        replica_far.write_all(&[1u8; 4096]).await.expect("write");
        let (idle, after) = (Duration::from_secs(30), Some(Duration::from_secs(1)));
        let splicing = splice(
            &mut state,
            &mut client,
            &mut replica,
            &mut close,
            idle,
            after,
        );
        let Splicing::Ended(spliced) = splicing.await else {
            panic!("a tunnel with a backlog does not rest")
        };
        assert_eq!(
            spliced.end,
            End::Idle,
            "the client never read: it idles out"
        );
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_each_end_is_passed_on_alone() {
        let (mut client, mut replica, _close, task) = tunnel(1024, false, Duration::from_secs(60));
        client.write_all(b" and more").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        replica.read_to_end(&mut got).await.expect("read");
        assert_eq!(
            got, b"early and more",
            "the early bytes first, then the end"
        );
        // The client's end does not end the tunnel: the replica still answers.
        replica.write_all(b"answer").await.expect("write");
        replica.shutdown().await.expect("close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"answer");
        let spliced = task.await.expect("joined");
        assert_eq!(
            spliced,
            Spliced {
                up: 14,
                down: 6,
                end: End::Ended
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_with_nothing_moving_is_closed_after_the_idle_timeout() {
        let (mut client, mut replica, _close, task) = tunnel(1024, false, Duration::from_secs(30));
        let mut early = [0u8; 5];
        replica.read_exact(&mut early).await.expect("early bytes");
        tokio::time::sleep(Duration::from_secs(20)).await;
        client.write_all(b"x").await.expect("a byte at 20 s");
        replica.read_exact(&mut early[..1]).await.expect("through");
        let started = Instant::now();
        let spliced = task.await.expect("joined");
        assert_eq!(spliced.end, End::Idle);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "30 s after the last byte, not after the first: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_holds_the_replica_back() {
        let (_client, mut replica, _close, task) =
            tunnel(64 * 1024, false, Duration::from_secs(600));
        let big = vec![7u8; 4 * 1024 * 1024];
        let wrote = tokio::time::timeout(Duration::from_secs(5), replica.write_all(&big)).await;
        assert!(
            wrote.is_err(),
            "4 MiB cannot go into a client that reads nothing"
        );
        task.abort();
    }

    /// A server frame (unmasked) with `payload`.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x82, 126];
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn a_websocket_is_closed_with_1012_at_the_next_frame_boundary() {
        let (mut client, mut replica, close, task) =
            tunnel(64 * 1024, true, Duration::from_secs(60));
        let first = frame(&[1u8; 1000]);
        // Half of a frame, then the close, then the rest and a frame that must not reach the client.
        replica.write_all(&first[..500]).await.expect("write");
        let mut seen = vec![0u8; 500];
        client.read_exact(&mut seen).await.expect("half a frame");
        assert!(close.tell(Close::Rehome(Reason::KeyMoved)), "open");
        tokio::time::sleep(Duration::from_millis(50)).await;
        replica.write_all(&first[500..]).await.expect("write");
        replica.write_all(&frame(&[2u8; 10])).await.expect("write");
        client
            .write_all(&[0x88, 0x80, 0, 0, 0, 0])
            .await
            .expect("the client's close");
        client.shutdown().await.expect("end");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read");
        let (frame_rest, close_frame) = rest.split_at(first.len() - 500);
        assert_eq!(
            frame_rest,
            &first[500..],
            "the frame in progress is finished"
        );
        assert_eq!(close_frame[0], 0x88, "then a close frame");
        assert_eq!(u16::from_be_bytes([close_frame[2], close_frame[3]]), 1012);
        assert_eq!(
            close_frame.len(),
            2 + usize::from(close_frame[1]),
            "and nothing after it"
        );
        let spliced = task.await.expect("joined");
        assert_eq!(spliced.end, End::Closed(Close::Rehome(Reason::KeyMoved)));
    }

    #[tokio::test]
    async fn a_websocket_replica_that_ends_without_a_close_frame_is_the_one_that_broke() {
        // The replica goes first, without a close frame: it broke.
        let (mut client, mut replica, _close, task) = tunnel(1024, true, Duration::from_secs(60));
        let mut early = [0u8; 5];
        replica.read_exact(&mut early).await.expect("early bytes");
        replica.shutdown().await.expect("end");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("the end passed on");
        client.shutdown().await.expect("the client follows");
        let end = task.await.expect("joined").end;
        assert!(matches!(end, End::ReplicaError(_)), "{end:?}");
        // The client goes first (no close frame either): the replica only followed.
        let (mut client, mut replica, _close, task) = tunnel(1024, true, Duration::from_secs(60));
        client.shutdown().await.expect("the client ends");
        let mut got = Vec::new();
        replica
            .read_to_end(&mut got)
            .await
            .expect("the end passed on");
        replica.shutdown().await.expect("the replica follows");
        assert_eq!(task.await.expect("joined").end, End::Ended);
    }

    #[tokio::test]
    async fn another_protocol_just_gets_the_close() {
        let (mut client, _replica, close, task) = tunnel(1024, false, Duration::from_secs(60));
        assert!(close.tell(Close::Shutdown), "open");
        let spliced = task.await.expect("joined");
        assert_eq!(spliced.end, End::Closed(Close::Shutdown));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("the end");
        assert!(rest.is_empty(), "no bytes put in: {rest:?}");
    }
}
