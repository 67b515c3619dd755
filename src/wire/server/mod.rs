//! Our HTTP/1.1 server: the client's side of an HTTP/1 connection, from the first request head
//! to the close, in the connection's own task.
//!
//! Owns: [`serve`], the loop of one connection: read a request head within
//! `proxy.header_read_timeout` (the first one counted from accept, with the listener's
//! first-bytes deadline; a later one from the previous response, which also bounds the wait for
//! the next request on a kept-alive connection), hand the request to the handler while watching the client (a client that goes
//! away cancels its request), send `100 Continue` when the body is first read, write the
//! response with the framing the request allows, and keep the connection for the next request
//! or close it (on `Connection: close`, HTTP/1.0 without keep-alive, a body not read whole, a
//! drain). Pipelined requests are answered in order. A malformed or oversized head is answered
//! with its status and the connection closed. No dispatcher, no channel for a request without
//! a body, no timer armed per request, no header map built twice. An idle connection holds no
//! read buffer and none of a request's state: a request runs in `exchange`, boxed while it
//! runs. One that idles [`Settings::idle_after`] with nothing of a next head read is handed
//! back whole ([`Served::Idle`]), with its deadline, for the caller to hold without a task.
//! Must not touch: what a request means (the handler) or which connections are admitted or
//! held idle (the listener); the wire formats are [`request`], [`response`], [`crate::wire::framing`] and
//! [`crate::wire::fields`]'.

pub mod body;
pub mod io;
pub mod request;
pub mod response;
pub mod upgrade;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{Method, Request, Response, Version};
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;
use crate::rescue::GatewayError;
use crate::wire::body::{take_head, Body, RequestBody};
use crate::wire::framing::{BodyFraming, ChunkLine, CHUNK_END, LAST_CHUNK};
use body::{Http1Body, Reader, Returned};
pub use io::{Io, Transport};
use request::{parse_request, HeadError, RequestHead, MAX_HEAD};
use response::{framing_for, write_fields_head, Fields, Framing, Persistence};

/// How a connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    /// When the first request head must be whole: the listener's deadline from accept, which
    /// already bounds the TLS handshake and the protocol sniff. The first head gets no fresh
    /// `header_read_timeout` of its own, so the two cannot stack past the one documented
    /// bound.
    pub first_head_by: Instant,
    /// `false`: one request, then the connection closes.
    pub keep_alive: bool,
    /// A kept-alive connection that has waited this long for its next request with nothing of
    /// it come is handed back ([`Served::Idle`]), for the caller to hold without a task. `None`:
    /// it waits here until its deadline.
    pub idle_after: Option<Duration>,
    /// The connection carried requests before (it was handed back idle and came back): a
    /// timeout waiting for its head is a keep-alive timeout, not a first-bytes one.
    pub resumed: bool,
}

/// How [`serve`] left a connection.
pub enum Served {
    /// Closed, or to be closed by dropping it.
    Done,
    /// Idle for [`Settings::idle_after`] with nothing of a next request read: the stream whole
    /// again, and when its keep-alive ends (its next head is due by then).
    Idle { io: Transport, deadline: Instant },
}

/// Serves the HTTP/1 connection `io`, whose first bytes (read to tell its protocol) are
/// `first`, with `handle` answering each request, until the client closes it, it idles past
/// `proxy.header_read_timeout`, or `drain` turns true (then the response in progress is
/// finished and the connection closed); or, with [`Settings::idle_after`], until it has idled
/// that long between requests, when it is handed back.
///
/// What an idle connection holds is kept small (issue 29): no read buffer (a head is read into
/// the stack and only a head in progress is kept, [`Reader::poll_head`]), no write buffer, and
/// this loop's own state; everything a request needs, its handler's future included, is in
/// `exchange`'s, boxed while the request runs.
pub async fn serve<F, Fut>(
    io: Transport,
    first: &[u8],
    settings: Settings,
    metrics: &Metrics,
    spare: &Spare,
    mut drain: watch::Receiver<bool>,
    mut handle: F,
) -> Served
where
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let (read, mut write) = tokio::io::split(io);
    let mut reader = Reader {
        io: read,
        buf: BytesMut::from(first),
    };
    // One timer for the connection's life, moved on only when it fires (a deadline moved later
    // costs nothing until then): no timer is armed or dropped per request.
    let mut deadline = settings.first_head_by;
    // Only a connection that carried a request is handed back idle: a new one is bounded by
    // its first-bytes deadline.
    let mut hand_back_at = match settings.resumed {
        true => settings.idle_after.map(|after| Instant::now() + after),
        false => None,
    };
    let timer = std::pin::pin!(tokio::time::sleep_until(deadline));
    let mut wakes = Wakes {
        timer,
        armed: deadline,
    };
    let mut served = 0u64;
    loop {
        let waited = read_head(&mut reader, deadline, hand_back_at, &mut wakes, &mut drain);
        let head = match waited.await {
            Ok(Read::Head(head)) => head,
            Ok(Read::Closed) => return Served::Done,
            Ok(Read::TimedOut) => {
                // The first request's deadline is the listener's first-bytes one, counted there.
                let counter = match served == 0 && !settings.resumed {
                    true => &metrics.first_bytes_timeouts,
                    false => &metrics.header_timeouts,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return Served::Done;
            }
            Ok(Read::Idle) => {
                let io = reader.io.unsplit(write);
                return Served::Idle { io, deadline };
            }
            // Boxed, as rare: its response's state is not kept in every idle connection's task.
            Err(e) => {
                Box::pin(refuse_head(&mut write, e, metrics, spare)).await;
                return Served::Done;
            }
        };
        // The box is allocated before the request's future is made, so that the future can be
        // made in it rather than made aside and copied in (7 KiB, every request).
        let slot = Box::new_uninit();
        let exchanged = Box::into_pin(Box::write(
            slot,
            exchange(
                head,
                reader,
                &mut write,
                &settings,
                spare,
                &drain,
                &mut handle,
            ),
        ))
        .await;
        reader = match exchanged {
            Next::Request(next) => next,
            Next::Close => return Served::Done,
            Next::Upgrade(upgrade) => {
                let Upgrade {
                    reader,
                    resp,
                    switch,
                } = *upgrade;
                Box::pin(hand_over(write, reader, resp, switch)).await;
                return Served::Done;
            }
        };
        if reader.buf.is_empty() {
            // Nothing of a next request came: the connection idles without a buffer.
            reader.buf = BytesMut::new();
        }
        served += 1;
        let now = Instant::now();
        deadline = now + settings.header_read_timeout;
        hand_back_at = settings.idle_after.map(|after| now + after);
    }
}

/// The connection's one timer and the instant it is armed for. It is moved on only when it
/// fires, or when something is due earlier than it is armed for (once, when a connection
/// starts to be handed back idle): no timer is armed or dropped per request.
struct Wakes<'t> {
    timer: Pin<&'t mut Sleep>,
    armed: Instant,
}

impl Wakes<'_> {
    fn arm(&mut self, at: Instant) {
        self.timer.as_mut().reset(at);
        self.armed = at;
    }
}

/// What a wait for a request head comes to when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// The head's deadline passed.
    TimedOut,
    /// Idle long enough, with nothing of a head read: hand the connection back.
    Idle,
    /// Nothing is due yet: wake again then.
    WakeAt(Instant),
}

/// Whether anything is due `now` for a connection waiting for a head by `deadline`, which
/// is handed back idle at `hand_back_at` unless part of a head came (`partial`).
fn due(now: Instant, deadline: Instant, hand_back_at: Option<Instant>, partial: bool) -> Due {
    if now >= deadline {
        return Due::TimedOut;
    }
    match hand_back_at.filter(|_| !partial) {
        Some(at) if now >= at => Due::Idle,
        Some(at) => Due::WakeAt(at.min(deadline)),
        None => Due::WakeAt(deadline),
    }
}

/// How a connection goes on after a request.
enum Next {
    /// With its next request, read from this.
    Request(Reader),
    /// Closed (or to be closed: nothing more is read or written on it).
    Close,
    /// Handed over after a `101`, boxed (rare).
    Upgrade(Box<Upgrade>),
}

/// A `101` and what is needed to write it and hand the connection over.
struct Upgrade {
    reader: Option<Reader>,
    resp: Response<Body>,
    switch: Option<oneshot::Sender<upgrade::Upgraded>>,
}

/// One request on the connection, from its parsed head to its response's end: hands it to
/// `handle` while watching the client (a client that goes away cancels its request), sends
/// `100 Continue` when the body is first read, writes the response, and says whether the
/// connection carries another request.
async fn exchange<F, Fut>(
    head: RequestHead,
    reader: Reader,
    write: &mut WriteHalf<Transport>,
    settings: &Settings,
    spare: &Spare,
    drain: &watch::Receiver<bool>,
    handle: &mut F,
) -> Next
where
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let RequestHead {
        mut parts,
        framing,
        keep_alive,
        expect_continue,
    } = head;
    let (method, version) = (parts.method.clone(), parts.version);
    let trailers = accepts_trailers(&parts.headers);
    let switch = offer_upgrade(&mut parts);
    let (body, mut watched, mut back, mut go) = lend(reader, framing, expect_continue);
    let answer = handle(Request::from_parts(parts, body));
    tokio::pin!(answer);
    let resp = loop {
        tokio::select! {
            biased;
            resp = &mut answer => break resp,
            go_on = wait(&mut go) => {
                go = None;
                if go_on && write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                    return Next::Close;
                }
            }
            // A client that goes away takes its request with it; bytes that come meanwhile
            // are its next (pipelined) request, kept up to the head limit.
            filled = watch_client(&mut watched), if watched.as_ref().is_some_and(|r| r.buf.len() < MAX_HEAD) => {
                if !matches!(filled, Ok(1..)) {
                    return Next::Close;
                }
            }
        }
    };
    // The body's read side, if the body is done with it by now.
    let mut incomplete = false;
    if let Some(returned) = back.as_mut().and_then(|rx| rx.try_recv().ok()) {
        back = None;
        incomplete = !returned.complete;
        watched = Some(returned.reader);
    }
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let reader = watched.filter(|_| back.is_none());
        return Next::Upgrade(Box::new(Upgrade {
            reader,
            resp,
            switch,
        }));
    }
    let keep = keep_alive && settings.keep_alive && !incomplete && !*drain.borrow();
    let asked = Asked {
        method: &method,
        version,
        trailers,
    };
    let kept = respond(write, resp, &asked, keep, &mut watched, spare).await;
    if let Some(back) = back {
        // The body is still being read (the proxy reads a refused body out so the client
        // sees the answer): its connection goes on only once it is read whole.
        watched = match tokio::time::timeout(settings.header_read_timeout, back).await {
            Ok(Ok(Returned {
                reader,
                complete: true,
            })) => Some(reader),
            _ => None,
        };
    }
    match watched {
        Some(next) if kept => Next::Request(next),
        _ => {
            let _ = write.shutdown().await;
            Next::Close
        }
    }
}

/// What waiting for a request head came to.
// Not boxed: the head is moved once a request, and a box would be an allocation a request.
#[allow(clippy::large_enum_variant)]
enum Read {
    Head(RequestHead),
    /// The client closed the connection, or the gateway drains.
    Closed,
    /// No whole head within `proxy.header_read_timeout`.
    TimedOut,
    /// Nothing of a head came for [`Settings::idle_after`].
    Idle,
}

/// The next request head, or why the connection is to close or be handed back without one.
async fn read_head(
    reader: &mut Reader,
    deadline: Instant,
    hand_back_at: Option<Instant>,
    wakes: &mut Wakes<'_>,
    drain: &mut watch::Receiver<bool>,
) -> Result<Read, HeadError> {
    if let Some(at) = hand_back_at.filter(|at| *at < wakes.armed) {
        wakes.arm(at);
    }
    loop {
        if !reader.buf.is_empty() {
            if let Some(head) = parse_request(&mut reader.buf)? {
                return Ok(Read::Head(head));
            }
        }
        let draining = *drain.borrow();
        if draining && reader.buf.is_empty() {
            return Ok(Read::Closed);
        }
        tokio::select! {
            biased;
            filled = poll_fn(|cx| reader.poll_head(cx)) => {
                if !matches!(filled, Ok(1..)) {
                    return Ok(Read::Closed);
                }
            }
            () = wakes.timer.as_mut() => {
                let partial = !reader.buf.is_empty();
                match due(Instant::now(), deadline, hand_back_at, partial) {
                    Due::TimedOut => {
                        tracing::debug!(buffered = reader.buf.len(), "closed: no whole request head within proxy.header_read_timeout");
                        return Ok(Read::TimedOut);
                    }
                    Due::Idle => return Ok(Read::Idle),
                    Due::WakeAt(at) => wakes.arm(at),
                }
            }
            changed = drain.changed(), if !draining => {
                if changed.is_err() {
                    return Ok(Read::Closed);
                }
            }
        }
    }
}

/// Completes with whether the body asked for `100 Continue`; never while there is no body that
/// could.
async fn wait(go: &mut Option<oneshot::Receiver<()>>) -> bool {
    match go {
        Some(rx) => rx.await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Watches a connection whose read side is the connection's (no body is reading it).
async fn watch_client(reader: &mut Option<Reader>) -> std::io::Result<usize> {
    match reader {
        Some(reader) => poll_fn(|cx| reader.poll_watch(cx)).await,
        None => std::future::pending().await,
    }
}

/// Writes `resp` to a `method` request of `version`; `true` if the connection can carry another
/// request after it (`keep` and the response agree, and the body was sent whole). While the
/// body waits for its replica, the client is `watched`: one that goes away ends the response.
async fn respond(
    write: &mut WriteHalf<Transport>,
    resp: Response<Body>,
    asked: &Asked<'_>,
    keep: bool,
    watched: &mut Option<Reader>,
    spare: &Spare,
) -> bool {
    let (method, version) = (asked.method, asked.version);
    let (mut parts, mut body) = resp.into_parts();
    let exact = body.size_hint().exact();
    // A replica's head forwarded as bytes (`crate::wire::client`): its fields go first.
    let raw = take_head(&mut parts, &mut body);
    let fields = Fields {
        raw: raw.as_deref(),
        map: &parts.headers,
    };
    let framing = framing_for(method, version, parts.status, fields, exact);
    let closes = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let keep = keep && !closes && framing != Framing::UntilClose;
    let persistence = match (keep, version) {
        (false, _) => Persistence::Close,
        (true, Version::HTTP_10) => Persistence::KeepAlive10,
        (true, _) => Persistence::KeepAlive,
    };
    let mut out = spare.take();
    let head_request = *method == Method::HEAD;
    let framed = (framing, persistence);
    write_fields_head(&mut out, parts.status, fields, framed, head_request, exact);
    drop((parts, raw));
    let trailers = asked.trailers && framing == Framing::Chunked;
    let sent = send(write, &mut out, &mut body, (framing, trailers), watched).await;
    spare.give(out);
    let flushed = write.flush().await.is_ok();
    keep && sent && flushed
}

/// Sends the head in `out` and the body after it, the head together with the body's first
/// piece when that is ready at once (one write for a small response); `true` if all of it went.
async fn send(
    write: &mut WriteHalf<Transport>,
    out: &mut Vec<u8>,
    body: &mut Body,
    (framing, with_trailers): (Framing, bool),
    watched: &mut Option<Reader>,
) -> bool {
    let mut trailers = None;
    let mut left = match framing {
        Framing::None => return write.write_all(out).await.is_ok(),
        Framing::Length { n, .. } => Some(n),
        Framing::Chunked | Framing::UntilClose => None,
    };
    let mut first = true;
    loop {
        if left == Some(0) {
            return out.is_empty() || write.write_all(out).await.is_ok();
        }
        let frame = match first {
            // The first piece is usually ready (in memory, or read with the replica's head).
            true => match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if write.write_all(out).await.is_err() || write.flush().await.is_err() {
                        return false;
                    }
                    out.clear();
                    match next_frame(body, watched).await {
                        Some(frame) => frame,
                        None => return false,
                    }
                }
            },
            false => match next_frame(body, watched).await {
                Some(frame) => frame,
                None => return false,
            },
        };
        first = false;
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                return false;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => data,
                // Kept for the last chunk when the client accepts them (`TE: trailers`),
                // else dropped: a client that did not ask may not understand them.
                Err(frame) => {
                    if with_trailers {
                        trailers = frame.into_trailers().ok();
                    }
                    continue;
                }
            },
        };
        let data = match &mut left {
            Some(left) => {
                if data.len() as u64 > *left {
                    tracing::debug!(
                        "response body longer than its Content-Length; closing the connection"
                    );
                    return false;
                }
                *left -= data.len() as u64;
                data
            }
            None => data,
        };
        let wrote = if framing == Framing::Chunked {
            let line = ChunkLine::of(data.len());
            let mut all = (&out[..])
                .chain(line.as_bytes())
                .chain(data)
                .chain(CHUNK_END);
            write.write_all_buf(&mut all).await
        } else {
            let mut all = (&out[..]).chain(data);
            write.write_all_buf(&mut all).await
        };
        if wrote.is_err() {
            return false;
        }
        out.clear();
    }
    match framing {
        Framing::Chunked => {
            match trailers {
                Some(fields) => crate::wire::framing::write_last_chunk_with(out, &fields),
                None => out.extend_from_slice(LAST_CHUNK),
            }
            write.write_all(out).await.is_ok()
        }
        // A body that ended before its length: the client must not wait for the rest.
        Framing::Length { .. } => {
            if !out.is_empty() {
                let _ = write.write_all(out).await;
            }
            false
        }
        _ => out.is_empty() || write.write_all(out).await.is_ok(),
    }
}

/// What the client asked that shapes the response: its method and version, and whether it
/// accepts trailers (`TE: trailers`, RFC 9110 section 10.1.4).
struct Asked<'a> {
    method: &'a Method,
    version: Version,
    trailers: bool,
}

/// Whether a request's `TE` lists `trailers`.
fn accepts_trailers(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// A request body's hold on the connection: the request body itself, the read side while the
/// connection keeps it (watched for a client that goes away), where the read side comes back
/// once the body is done with it, and the signal to send `100 Continue`.
type Lent = (
    RequestBody,
    Option<Reader>,
    Option<oneshot::Receiver<Returned>>,
    Option<oneshot::Receiver<()>>,
);

/// The body of a request framed by `framing`: a request with a body lends the read side to
/// it, and it comes back through the receiver when the body is done.
fn lend(reader: Reader, framing: BodyFraming, expect_continue: bool) -> Lent {
    if framing == BodyFraming::Empty {
        return (RequestBody::empty(), Some(reader), None, None);
    }
    let (back_tx, back_rx) = oneshot::channel();
    let (go_tx, go_rx) = if expect_continue {
        let (tx, rx) = oneshot::channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let body = Http1Body::new(reader, framing, back_tx, go_tx);
    (RequestBody::http1(body), None, Some(back_rx), go_rx)
}

/// For a request that asks to switch protocols, the [`upgrade::OnUpgrade`] its handler may wait
/// on, and the sender the server hands the connection to after a `101`.
fn offer_upgrade(parts: &mut http::request::Parts) -> Option<oneshot::Sender<upgrade::Upgraded>> {
    if !upgrade::asks_upgrade(parts.version, &parts.headers) {
        return None;
    }
    let (tx, rx) = oneshot::channel();
    parts.extensions.insert(upgrade::OnUpgrade::new(rx));
    Some(tx)
}

/// Writes the handler's `101` and hands the connection (with what the client sent past its
/// head) to the request's [`upgrade::OnUpgrade`]. A `101` to a request that asked for no
/// upgrade, or while its body still holds the read side, is not written: the connection
/// closes, since the client could read nothing after it as HTTP/1.
async fn hand_over(
    mut write: WriteHalf<Transport>,
    reader: Option<Reader>,
    resp: Response<Body>,
    switch: Option<oneshot::Sender<upgrade::Upgraded>>,
) {
    let (Some(reader), Some(switch)) = (reader, switch) else {
        tracing::debug!("a 101 to a request that cannot switch protocols; closing");
        let _ = write.shutdown().await;
        return;
    };
    let mut head = Vec::with_capacity(256);
    let (mut parts, mut body) = resp.into_parts();
    let raw = take_head(&mut parts, &mut body);
    let fields = Fields {
        raw: raw.as_deref(),
        map: &parts.headers,
    };
    let framed = (Framing::None, Persistence::Upgrade);
    write_fields_head(&mut head, parts.status, fields, framed, false, None);
    if write.write_all(&head).await.is_err() || write.flush().await.is_err() {
        return;
    }
    let Reader { io, buf } = reader;
    let upgraded = upgrade::Upgraded {
        io: io.unsplit(write),
        read: buf,
    };
    if switch.send(upgraded).is_err() {
        tracing::debug!("nobody took the upgraded connection; closing it");
    }
}

/// Answers a refused request head with its status (counted by reason) and closes.
async fn refuse_head(
    write: &mut WriteHalf<Transport>,
    e: HeadError,
    metrics: &Metrics,
    spare: &Spare,
) {
    let counter = match e {
        HeadError::TooLarge | HeadError::TooManyHeaders => &metrics.heads_refused_too_large,
        HeadError::Malformed(_) | HeadError::Host(_) => &metrics.heads_refused_malformed,
        HeadError::Framing(_) | HeadError::NotImplemented(_) => &metrics.heads_refused_framing,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(error = %e, "refused a request head");
    let resp = GatewayError::RequestHead(e).into_response();
    let asked = Asked {
        method: &Method::GET,
        version: Version::HTTP_11,
        trailers: false,
    };
    let _ = respond(write, resp, &asked, false, &mut None, spare).await;
    let _ = write.shutdown().await;
}

/// The body's next frame, or `None` if the client went away while the body waited.
async fn next_frame(
    body: &mut Body,
    watched: &mut Option<Reader>,
) -> Option<Option<Result<hyper::body::Frame<bytes::Bytes>, crate::error::BoxError>>> {
    let frame = http_body_util::BodyExt::frame(body);
    tokio::pin!(frame);
    loop {
        tokio::select! {
            biased;
            frame = &mut frame => return Some(frame),
            filled = watch_client(watched), if watched.as_ref().is_some_and(|r| r.buf.len() < MAX_HEAD) => {
                if !matches!(filled, Ok(1..)) {
                    tracing::debug!("the client went away during the response");
                    return None;
                }
            }
        }
    }
}

/// Buffers for response heads, kept per serving thread (in its worker,
/// [`crate::worker::Worker`]): a response head is written without allocating, and an idle
/// connection holds none. Behind a lock only its own thread ever takes: the connection's
/// future must be `Send`.
#[derive(Default)]
pub struct Spare {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Spare {
    const KEEP: usize = 16;
    const KEEP_CAPACITY: usize = 4 * 1024;

    fn take(&self) -> Vec<u8> {
        crate::sync::lock(&self.bufs)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(512))
    }

    fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() > Self::KEEP_CAPACITY {
            return;
        }
        buf.clear();
        let mut bufs = crate::sync::lock(&self.bufs);
        if bufs.len() < Self::KEEP {
            bufs.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Serves one connection from a real loopback socket with `handle`; returns the client.
    async fn served<F, Fut>(handle: F) -> tokio::net::TcpStream
    where
        F: FnMut(Request<RequestBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<Body>> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let settings = Settings {
                header_read_timeout: Duration::from_secs(5),
                first_head_by: Instant::now() + Duration::from_secs(5),
                keep_alive: true,
                idle_after: None,
                resumed: false,
            };
            let metrics = Metrics::default();
            let (_drain_tx, drain) = watch::channel(false);
            let spare = Spare::default();
            serve(
                Box::new(stream),
                &[],
                settings,
                &metrics,
                &spare,
                drain,
                handle,
            )
            .await;
        });
        tokio::net::TcpStream::connect(addr).await.expect("connect")
    }

    #[test]
    fn a_connection_is_handed_back_once_idle_long_enough_and_never_with_part_of_a_head() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let (deadline, back_at) = (t0 + 10 * s, Some(t0 + s));
        assert_eq!(due(t0, deadline, back_at, false), Due::WakeAt(t0 + s));
        assert_eq!(due(t0 + s, deadline, back_at, false), Due::Idle);
        assert_eq!(
            due(t0 + s, deadline, back_at, true),
            Due::WakeAt(deadline),
            "part of a head came: it waits for the rest until its deadline"
        );
        assert_eq!(due(t0 + 10 * s, deadline, back_at, false), Due::TimedOut);
        assert_eq!(due(t0 + 10 * s, deadline, back_at, true), Due::TimedOut);
        assert_eq!(due(t0, deadline, None, false), Due::WakeAt(deadline));
        assert_eq!(
            due(t0, t0 + s, Some(t0 + 2 * s), false),
            Due::WakeAt(t0 + s),
            "a deadline before the hand-back wakes at the deadline"
        );
    }

    /// Serves `stream` with a hand-back after `idle_after`; what [`serve`] came to.
    async fn serve_handing_back(io: Transport, resumed: bool) -> Served {
        let settings = Settings {
            header_read_timeout: Duration::from_secs(5),
            first_head_by: Instant::now() + Duration::from_secs(5),
            keep_alive: true,
            idle_after: Some(Duration::from_millis(100)),
            resumed,
        };
        let metrics = Metrics::default();
        let (_drain_tx, drain) = watch::channel(false);
        let spare = Spare::default();
        let answer = |_req: Request<RequestBody>| async { Response::new(Body::full("hi")) };
        serve(io, &[], settings, &metrics, &spare, drain, answer).await
    }

    /// A client connected to a server-side stream, on loopback.
    async fn loopback_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        (client, stream)
    }

    #[tokio::test]
    async fn an_idle_connection_comes_back_whole_and_serves_again_when_resumed() {
        let (mut client, stream) = loopback_pair().await;
        let server = tokio::spawn(serve_handing_back(Box::new(stream), false));
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let first = String::from_utf8(read_n(&mut client, 40).await).expect("utf-8");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let served = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("handed back within its idle time")
            .expect("joined");
        let Served::Idle { io, deadline } = served else {
            panic!("an idle kept-alive connection is handed back");
        };
        assert!(deadline > Instant::now(), "its keep-alive has not ended");
        // The same connection, served again from where it was left.
        let server = tokio::spawn(serve_handing_back(io, true));
        client
            .write_all(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let second = String::from_utf8(read_n(&mut client, 1 << 20).await).expect("utf-8");
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        assert!(second.ends_with("hi"), "{second}");
        let served = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("ends with the close")
            .expect("joined");
        assert!(matches!(served, Served::Done), "closed as it asked");
    }

    #[tokio::test]
    async fn a_connection_in_the_middle_of_a_head_is_not_handed_back() {
        let (mut client, stream) = loopback_pair().await;
        let server = tokio::spawn(serve_handing_back(Box::new(stream), true));
        client
            .write_all(b"GET /a HTTP/1.1\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !server.is_finished(),
            "still waiting for the rest of its head"
        );
        client.write_all(b"Host: x\r\n\r\n").await.expect("write");
        let answer = String::from_utf8(read_n(&mut client, 40).await).expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let served = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("handed back once idle")
            .expect("joined");
        assert!(matches!(served, Served::Idle { .. }));
    }

    /// Reads from `s` until `want` bytes came (or the peer closed).
    async fn read_n(s: &mut tokio::net::TcpStream, want: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while out.len() < want {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        out
    }

    #[tokio::test]
    async fn after_a_101_the_connection_is_handed_over_with_the_bytes_past_the_head() {
        let mut client = served(|mut req: Request<RequestBody>| async move {
            let Some(on_upgrade) = req.extensions_mut().remove::<upgrade::OnUpgrade>() else {
                return Response::new(Body::full("no upgrade asked"));
            };
            // An echo of the switched connection, as a tunnel's taker would run it.
            tokio::spawn(async move {
                let Some(upgraded) = on_upgrade.upgraded().await else {
                    return;
                };
                let mut io = upgraded.io;
                let _ = io.write_all(&upgraded.read).await;
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    if io.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            let mut resp = Response::new(Body::full(""));
            *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("echo"),
            );
            resp
        })
        .await;
        client
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly",
            )
            .await
            .expect("send");
        let head = read_n(&mut client, 1).await;
        let text = String::from_utf8_lossy(&head).to_lowercase();
        assert!(
            text.starts_with("http/1.1 101 switching protocols\r\n"),
            "{text}"
        );
        assert!(
            text.contains("connection: upgrade\r\n") && text.contains("upgrade: echo\r\n"),
            "{text}"
        );
        let head_len = text.find("\r\n\r\n").expect("a whole head") + 4;
        let mut echoed = head[head_len..].to_vec();
        echoed.extend(read_n(&mut client, 5 - echoed.len()).await);
        assert_eq!(
            echoed, b"early",
            "the bytes sent past the head go to the taker"
        );
        client.write_all(b"ping").await.expect("send");
        assert_eq!(read_n(&mut client, 4).await, b"ping");
    }

    #[tokio::test]
    async fn a_101_to_a_request_that_asked_for_no_upgrade_closes_the_connection() {
        let mut client = served(|_req: Request<RequestBody>| async move {
            let mut resp = Response::new(Body::full(""));
            *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
            resp
        })
        .await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        assert!(
            read_n(&mut client, 1).await.is_empty(),
            "nothing written, closed"
        );
    }

    /// A response of one data frame and trailers, its length unknown (chunked).
    fn with_trailers() -> Response<Body> {
        let mut fields = http::HeaderMap::new();
        fields.insert("grpc-status", http::HeaderValue::from_static("0"));
        fields.insert("x-server-id", http::HeaderValue::from_static("s1"));
        fields.insert("connection", http::HeaderValue::from_static("close"));
        let frames = futures_util::stream::iter([
            Ok::<_, crate::error::BoxError>(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"hello",
            ))),
            Ok(hyper::body::Frame::trailers(fields)),
        ]);
        Response::new(Body::boxed(http_body_util::StreamBody::new(frames)))
    }

    #[tokio::test]
    async fn trailers_go_in_the_last_chunk_to_a_client_that_accepts_them_only() {
        for (te, want) in [("TE: trailers\r\n", true), ("", false)] {
            let mut client = served(|_req: Request<RequestBody>| async { with_trailers() }).await;
            let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{te}Connection: close\r\n\r\n");
            client.write_all(req.as_bytes()).await.expect("send");
            let text = String::from_utf8_lossy(&read_n(&mut client, 1 << 16).await).to_lowercase();
            assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
            let end = match want {
                true => "5\r\nhello\r\n0\r\ngrpc-status: 0\r\nx-server-id: s1\r\n\r\n",
                false => "5\r\nhello\r\n0\r\n\r\n",
            };
            assert!(text.ends_with(end), "TE {te:?}: {text}");
        }
    }
}
