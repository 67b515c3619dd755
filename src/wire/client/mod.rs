//! The replica's side of HTTP/1.1: our own client, one exchange on one connection.
//!
//! Owns: [`exchange`] (the forwarded head serialised from the request's parts by
//! [`head::request_head`], no header map built for it; the body streamed in its framing; the
//! response head read, its fields left as the replica's bytes), [`response`] (the response
//! whose body [`body::UpstreamBody`] reads from the same connection, in the task that writes
//! it to the client: no dispatcher task, no channel; its head's fields as bytes
//! ([`head::RawHead`]) for an HTTP/1 client, in a `HeaderMap` for any other) and [`check::check`] (a health check's `GET` through the same exchange, its body
//! read by the same decoder). A replica that answers before reading the whole body and breaks the connection
//! has that answer forwarded, not a reset; every other failure is told apart for the caller
//! ([`SendError`]), each wait bounded by the request's deadline and saying whose it was.
//! Must not touch: which connection (the connector in [`crate::upstream`] gives one), routing,
//! retries, or what a failure means for a replica (the proxy decides that).

pub mod body;
pub mod check;
pub mod head;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Method, Response};
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout_at, Instant};

use crate::error::BoxError;
use crate::snapshot::InFlight;
use crate::tls::upstream::{Alpn, UpstreamTls};
use crate::upstream::pool::{Conn, ConnectError};
use crate::wire::framing::{ChunkLine, CHUNK_END, LAST_CHUNK};
pub use body::UpstreamBody;
pub use head::Forwarded;
use head::{HeadError, RequestFraming};

/// Largest read of a response head at a time. Small, because every request in flight holds it:
/// a head and a small body fit, a larger head grows the buffer, and body reads take
/// [`body`]'s larger chunks (the same for every leg). Measured with 1,000 open connections: 8 KiB here cost 4 MiB of
/// resident memory more than 2 KiB (freed buffers interleaved with the connections' memory).
const HEAD_READ: usize = 2 * 1024;

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing reached the replica.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection broke before a response byte (reset, closed).
    #[error("the connection broke before a response: {0}")]
    Broken(#[source] std::io::Error),
    /// The replica answered something that is not an HTTP/1 response head.
    #[error(transparent)]
    BadHead(#[from] HeadError),
    /// Reading the request body from the client failed: the body's own error (its maker
    /// knows its kinds).
    #[error("the request body could not be read: {0}")]
    RequestBody(#[source] BoxError),
    /// The deadline passed while the client's body was awaited: the client's time ran out.
    #[error("the client sent none of the rest of the request body before the deadline")]
    RequestBodyTimeout,
    /// The deadline passed while the replica was awaited (taking the request, or sending the
    /// response head).
    #[error("no response head before the deadline")]
    Timeout,
    /// HTTP/2: the replica did not process the request (its GOAWAY came first, or it refused
    /// the stream): nothing of it was acted on, so it may be sent again, anywhere.
    #[error("the replica did not process the request (HTTP/2 GOAWAY or REFUSED_STREAM): {0}")]
    Unprocessed(#[source] ::h2::Error),
    /// HTTP/2: the client's request cannot be written as an HTTP/2 request.
    #[error("the request cannot be forwarded over HTTP/2: {0}")]
    Request(#[source] http::Error),
    /// HTTP/2: the stream or its connection failed before a response head.
    #[error("the HTTP/2 stream to the replica failed before a response: {0}")]
    Stream(#[source] ::h2::Error),
    /// HTTP/2 over TLS: the replica chose HTTP/1.1 (ALPN), and the request must have HTTP/2
    /// (a gRPC call): nothing of it was sent.
    #[error("the replica chose {0} in its TLS handshake, not h2")]
    NotHttp2(Alpn),
}

/// A request body the client can send: its frames, and whether any of it has been read yet
/// (a stale pooled connection is replaced by a fresh one only for a body nothing was read of).
pub trait Outgoing: HttpBody<Data = Bytes, Error = BoxError> + Unpin {
    fn untouched(&self) -> bool;

    /// All of the body that was read so far is still held, so it can be sent again whole (a
    /// stream the replica did not process). Untouched, it can.
    fn resendable(&self) -> bool {
        self.untouched()
    }

    /// The same body as an owned one, for a protocol that takes the body with the request
    /// (HTTP/2): what it reads is read from this one too, so [`Outgoing::untouched`] still
    /// tells whether any of it was sent.
    fn share(&self) -> Self
    where
        Self: Sized;
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }

    /// The connection was not made within `proxy.connect_timeout`.
    pub fn is_connect_timeout(&self) -> bool {
        matches!(self, SendError::Connect(ConnectError::Timeout(_)))
    }

    /// The replica's address refused the connection (nothing listens there: the replica died or
    /// has not started): it cost the replica nothing and took one round trip.
    pub fn is_refused(&self) -> bool {
        matches!(self, SendError::Connect(ConnectError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

/// One request to send.
pub struct Request<'a> {
    pub addr: SocketAddr,
    /// The TLS client a new connection is made with (`None`: plain TCP): the one the request's
    /// snapshot carries, so an edit of `[provider] upstream_ca` applies from the next request.
    pub tls: Option<&'a UpstreamTls>,
    pub connect_timeout: Duration,
    /// `proxy.read_timeout`, for the response body.
    pub read_timeout: Duration,
    pub forwarded: Forwarded<'a>,
    /// The connection may go back to the idle pool once the response is read.
    pub keep_idle: bool,
    /// Over HTTP/2 (`proxy.upstream_protocol`), multiplexed on this thread's connection to the
    /// replica, instead of HTTP/1.1.
    pub http2: bool,
    /// HTTP/2 or nothing: a gRPC call (its status travels in trailers) is not sent over
    /// HTTP/1.1 to a TLS replica that chose HTTP/1.1 instead of `h2`; other requests are.
    pub http2_only: bool,
    /// `proxy.http2_keepalive`: a new HTTP/2 connection pings the replica this often.
    pub http2_keepalive: Duration,
    /// When the response head must have come (`proxy.request_timeout` from the attempt's
    /// start). Every wait before it is bounded by it, and says whose it was: the client's body,
    /// or the replica.
    pub deadline: Instant,
}

/// The response to `req` whose head `head` was read from `conn`: its body is read from the
/// same connection; `in_flight` counts the request at its replica until the body ends.
///
/// For a client of HTTP/1 (the request's version), the head's fields stay bytes: the body
/// carries them ([`head::RawHead`], [`UpstreamBody::take_head`]), the response's `HeaderMap`
/// is left for what the gateway adds, and the client's connection writes them as they came
/// ([`crate::wire::server::response`]). Any other client (HTTP/2, whose server takes a
/// `HeaderMap`) and a `101` (whose tunnel reads its `Upgrade`) get the fields in the map.
pub fn response(
    conn: Conn,
    head: head::RawResponse,
    req: &Request<'_>,
    in_flight: InFlight,
) -> Response<UpstreamBody> {
    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
        // The connection now speaks the switched protocol: it goes with the response, never
        // back to the pool.
        let parts = head.raw.parts(head.status);
        return Response::from_parts(parts, UpstreamBody::switched(conn, in_flight));
    }
    let mut body = UpstreamBody::new(
        conn,
        head.framing,
        head.keep_alive && req.keep_idle,
        req.read_timeout,
        in_flight,
    );
    let parts = match req.forwarded.parts.version <= http::Version::HTTP_11 {
        true => {
            let mut parts = http::Response::new(()).into_parts().0;
            parts.status = head.status;
            body.keep_head(head.raw);
            parts
        }
        false => head.raw.parts(head.status),
    };
    Response::from_parts(parts, body)
}

/// Writes the request `forwarded` (its head serialised here, as this codec forwards it), then
/// reads the response head, every wait by `deadline`.
pub async fn exchange(
    conn: &mut Conn,
    forwarded: &Forwarded<'_>,
    deadline: Instant,
    body: &mut impl Outgoing,
) -> Result<head::RawResponse, SendError> {
    let head = head::request_head(forwarded);
    timeout_at(deadline, conn.stream().write_all(&head))
        .await
        .map_err(|_| SendError::Timeout)?
        .map_err(SendError::Broken)?;
    if !body.is_end_stream() {
        if let Err(e) = write_body(conn, body, forwarded.framing, deadline).await {
            // A replica may answer before it has read the whole body (a 413, a 401) and close:
            // its answer, already here, is the response, not a broken connection.
            if matches!(e, SendError::Broken(_)) {
                // Boxed: the error path's state stays out of every request's future.
                if let Some(head) = Box::pin(early_response(conn, &forwarded.parts.method)).await {
                    return Ok(head);
                }
            }
            return Err(e);
        }
    }
    loop {
        let upgrade = forwarded.upgrade.is_some();
        if let Some(h) = final_head(&mut conn.buf, &forwarded.parts.method, upgrade)? {
            return Ok(h);
        }
        let read = std::future::poll_fn(|cx| conn.poll_fill(cx, HEAD_READ));
        let n = timeout_at(deadline, read)
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Broken)?;
        if n == 0 {
            return Err(SendError::Broken(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                if conn.buf.is_empty() {
                    "closed before a response"
                } else {
                    "closed in the middle of the response head"
                },
            )));
        }
    }
}

/// A whole final response head the replica sent before the connection broke under the
/// request body; the connection is not reused after it. The kernel keeps bytes received before
/// a reset readable, but the runtime may not have seen them arrive (the writes went on without
/// yielding), so they are waited for, briefly: this is the error path, and a replica that broke
/// the connection without answering costs the request [`EARLY_ANSWER_WAIT`] more.
async fn early_response(conn: &mut Conn, method: &Method) -> Option<head::RawResponse> {
    let deadline = tokio::time::Instant::now() + EARLY_ANSWER_WAIT;
    loop {
        match final_head(&mut conn.buf, method, false) {
            Ok(Some(mut h)) => {
                h.keep_alive = false;
                return Some(h);
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        let read = std::future::poll_fn(|cx| conn.poll_fill(cx, HEAD_READ));
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(1..)) => {}
            _ => return None,
        }
    }
}

/// The final response head in `buf`, once it is whole: interim responses (`100 Continue` and
/// the like) before it are read past. A `101` is the final head of a request forwarded as an
/// upgrade (`asked_upgrade`: a tunnel follows). To any other request it is an error: what
/// follows it on the connection is not HTTP/1 (relayed, it would be a final response to the
/// client, and the connection would go back to the pool with the other protocol's bytes in
/// it). The replica is blamed, the connection dropped with the error.
fn final_head(
    buf: &mut bytes::BytesMut,
    method: &Method,
    asked_upgrade: bool,
) -> Result<Option<head::RawResponse>, HeadError> {
    while !buf.is_empty() {
        match head::parse_raw_response(buf, method)? {
            Some(h) if h.status == http::StatusCode::SWITCHING_PROTOCOLS && asked_upgrade => {
                return Ok(Some(h))
            }
            Some(h) if h.status == http::StatusCode::SWITCHING_PROTOCOLS => {
                return Err(HeadError::UnaskedSwitch)
            }
            Some(h) if h.status.is_informational() => {}
            Some(h) => return Ok(Some(h)),
            None => break,
        }
    }
    Ok(None)
}

/// How long a connection that broke under the request body is given to show the answer the
/// replica sent before it broke.
const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(100);

/// Streams the client's body to the replica in `framing`, by `deadline`: a wait for the client
/// past it is the client's failure, a wait for the replica the replica's.
async fn write_body(
    conn: &mut Conn,
    body: &mut impl Outgoing,
    framing: RequestFraming,
    deadline: Instant,
) -> Result<(), SendError> {
    let chunked = framing == RequestFraming::Chunked;
    let mut trailers = None;
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(SendError::RequestBodyTimeout),
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(SendError::RequestBody)?,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            // Trailers go in the last chunk; a body sent with a length has no room for them.
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        let s = conn.stream();
        let line = chunked.then(|| ChunkLine::of(data.len()));
        let (line, end) = match &line {
            Some(line) => (line.as_bytes(), CHUNK_END),
            None => (&[][..], &[][..]),
        };
        let mut all = line.chain(&data[..]).chain(end);
        timeout_at(deadline, s.write_all_buf(&mut all))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Broken)?;
    }
    if chunked {
        let mut last = Vec::new();
        match &trailers {
            Some(fields) => crate::wire::framing::write_last_chunk_with(&mut last, fields),
            None => last.extend_from_slice(LAST_CHUNK),
        }
        timeout_at(deadline, conn.stream().write_all(&last))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Broken)?;
    }
    Ok(())
}

/// How a request body of this kind is sent upstream.
pub fn framing_of(method: &Method, body: &impl HttpBody) -> RequestFraming {
    if body.is_end_stream() {
        // POST, PUT and PATCH say "no body" explicitly; servers may refuse them otherwise (411).
        return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
    }
    match body.size_hint().exact() {
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}
