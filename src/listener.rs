//! The listener: accepts connections, admits them, places them on the least busy serving thread
//! ([`crate::spread`] decides), runs the TLS handshake on the HTTPS listener, tells HTTP/1.1
//! from HTTP/2, serves them, and drains them on shutdown.
//!
//! Owns: [`serve`], which takes an already bound listener (so tests bind `127.0.0.1:0`), what it
//! speaks ([`Mode`]) and a shutdown future, and everything about client connections: the
//! admission caps, the first-bytes deadline (a connection that has not completed its TLS
//! handshake and sent enough to tell its protocol within `proxy.header_read_timeout` is closed:
//! the protocol sniff is ours, with a deadline, instead of hyper's open-ended one), plain HTTP
//! on the TLS port (answered 400), HTTP/2 served by [`crate::wire::h2::server`] (keep-alive
//! pings; the idle and stall watches of [`crate::http2`]; a connection's streams run in its
//! task), the write side bounded by `proxy.send_timeout` (through [`crate::stall`]), the
//! redirect of plain HTTP to HTTPS (`tls.http = "redirect"`), graceful drain, and which idle connections are held without a task: a
//! cleartext HTTP/1 connection that has waited [`IDLE_HOLD_AFTER`] for its next request goes
//! into the listener's [`Parking`] and comes back to a task of its own when it becomes
//! readable.
//! Must not touch: requests' meaning (the service) or state (the controller); certificates are
//! the TLS module's (a handshake only asks it for an acceptor); HTTP/1 on the wire (heads,
//! bodies, keep-alive and its timeout) is [`crate::wire::server`]'s.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::admission::Admitted;
use crate::config::{Config, PlainHttp};
use crate::http2::{self, Activity, StreamBody};
use crate::metrics::Metrics;
use crate::parking::{Held, Leaving, Parking};
use crate::rescue::{GatewayError, RefusedStream};
use crate::service::Service;
use crate::spread::{Counted, Placed, Slot};
use crate::stall::SendTimeout;
use crate::tls::{redirect, Https, Tls};
use crate::wire::body::{Body, RequestBody};
use crate::wire::h2::server::{self as h2_server, Answer};
use crate::wire::h2::Inbound;
use crate::wire::server::{self, Served, Transport};
use crate::worker::Worker;

/// How long a cleartext HTTP/1 connection waits for its next request in a task of its own
/// before it is held in the listener's [`Parking`] instead: long enough that a connection in
/// use (a browser's, a client pool's) keeps its task between requests, short enough that the
/// many that only stay open cost a socket and a record. Holding one and taking it back costs
/// about five system calls, once per idle period.
pub const IDLE_HOLD_AFTER: Duration = Duration::from_secs(1);

/// What a held connection keeps besides its socket, to be served again.
struct Resumable {
    client: SocketAddr,
    admitted: Place,
    counted: Counted,
    requests: Requests,
}

/// A held connection's place under the caps: its own (no request of it holds a share of it while
/// it idles), so that nothing of it is left on the heap among the pages its task freed.
enum Place {
    Own(Admitted),
    Shared(Arc<Admitted>),
}

impl Place {
    fn held(admitted: Arc<Admitted>) -> Place {
        Arc::try_unwrap(admitted).map_or_else(Place::Shared, Place::Own)
    }

    fn served(self) -> Arc<Admitted> {
        match self {
            Place::Own(admitted) => Arc::new(admitted),
            Place::Shared(admitted) => admitted,
        }
    }
}

/// Where a connection's task sends its socket when it idles, for the listener to hold.
type ToHold = mpsc::UnboundedSender<Held<Resumable>>;

/// What a listener speaks.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Cleartext HTTP/1.1 and HTTP/2 (prior knowledge). With the port of the HTTPS listener
    /// when TLS is on: `tls.http = "redirect"` then sends requests there.
    Plain { https_port: Option<u16> },
    /// TLS, then HTTP/1.1 or HTTP/2 (ALPN offers both; the first bytes decide, as in cleartext).
    Tls(Arc<Tls>),
}

/// The first byte of a TLS record carrying a handshake (RFC 8446 §5.1: content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    /// Not enough bytes yet to tell.
    Undecided,
}

/// HTTP/2 with prior knowledge starts with the preface; anything that stops matching it is
/// HTTP/1 (our HTTP/1 server then answers what is not HTTP/1 with a 400 or a close).
pub fn sniff(first: &[u8]) -> Sniffed {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Sniffed::Http1
    } else if n == H2_PREFACE.len() {
        Sniffed::Http2
    } else {
        Sniffed::Undecided
    }
}

/// Serves connections from `listener`, and those other serving threads hand over to `slot`
/// ([`crate::spread`]), until `shutdown` completes; then stops accepting and gives open
/// connections up to `drain_timeout` to finish their requests.
pub async fn serve(
    listener: TcpListener,
    mode: Mode,
    service: Arc<Service>,
    worker: Arc<Worker>,
    mut slot: Slot,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let (drain_tx, drain_rx) = watch::channel(false);
    // Every connection's task, to wait for them on shutdown: our HTTP/1 and HTTP/2 servers
    // both hear the drain on `drain_rx`, so what is left to know is when they are done.
    let connections = tokio_util::task::TaskTracker::new();
    // Idle connections held without a task: their tasks send them here, and the listener
    // gives them a task again when they become readable. Without an epoll set of its own (out
    // of descriptors at start), every connection keeps its task while idle, as before.
    let (to_hold, mut idle) = mpsc::unbounded_channel();
    let mut parking = match mode {
        Mode::Plain { .. } => Parking::new()
            .inspect_err(|e| tracing::warn!(error = %e, "idle connections will keep their tasks: no epoll set for them"))
            .ok(),
        // TLS connections keep their tasks: rustls' state cannot be set aside.
        Mode::Tls(_) => None,
    };
    let starter = Starter {
        mode,
        service: service.clone(),
        worker,
        drain: drain_rx,
        to_hold: parking.as_ref().map(|_| to_hold),
        connections: connections.clone(),
    };
    let mut leaving = Vec::new();
    let held_idle = &service.metrics.connections_held_idle;
    tokio::pin!(shutdown);
    loop {
        for gone in leaving.drain(..) {
            held_idle.fetch_sub(1, Ordering::Relaxed);
            starter.serve_again(gone);
        }
        let (stream, client, admitted, counted, config) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let config = service.shared.load().config.clone();
                    let Some(admitted) = admit(&service, &config, client) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    match slot.place(stream, client, admitted) {
                        Placed::Here(stream, admitted, counted) => (stream, client, admitted, counted, config),
                        Placed::HandedOver => {
                            service.metrics.connections_handed_over.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Placed::Lost => {
                            tracing::debug!(client = %client, "connection lost handing it to another serving thread");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    service.metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        service.admission.note_exhausted();
                    }
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(handed) = slot.inbox.recv() => match TcpStream::from_std(handed.stream) {
                Ok(stream) => {
                    let config = service.shared.load().config.clone();
                    (stream, handed.client, handed.admitted, handed.counted, config)
                }
                Err(e) => {
                    tracing::debug!(client = %handed.client, error = %e, "cannot serve a connection handed over by another serving thread");
                    continue;
                }
            },
            Some(held) = idle.recv() => {
                if let Some(parking) = parking.as_mut() {
                    hold(parking, held, &service.metrics, &mut leaving);
                }
                continue;
            }
            () = leave(&mut parking, &mut leaving) => continue,
            _ = &mut shutdown => break,
        };
        let conn = starter.connection(stream, client, config, Arc::new(admitted), counted);
        connections.spawn(conn.run());
    }
    // Held connections are idle: a drain closes them at once.
    let still_held = parking.as_ref().map_or(0, Parking::len) + leaving.len();
    held_idle.fetch_sub(still_held as u64, Ordering::Relaxed);
    drop((listener, parking, idle, starter));
    tracing::info!("stopped accepting; draining open connections");
    let _ = drain_tx.send(true);
    connections.close();
    if tokio::time::timeout(drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?drain_timeout, open = connections.len(), "drain timed out; closing the remaining connections");
    }
}

/// What a listener gives each connection it starts, accepted or served again after being held.
struct Starter {
    mode: Mode,
    service: Arc<Service>,
    worker: Arc<Worker>,
    drain: watch::Receiver<bool>,
    to_hold: Option<ToHold>,
    connections: tokio_util::task::TaskTracker,
}

impl Starter {
    fn connection(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        config: Arc<Config>,
        admitted: Arc<Admitted>,
        counted: Counted,
    ) -> Connection {
        Connection {
            stream,
            client,
            config,
            mode: self.mode.clone(),
            service: self.service.clone(),
            worker: self.worker.clone(),
            drain: self.drain.clone(),
            admitted,
            counted,
            to_hold: self.to_hold.clone(),
        }
    }

    /// A connection that left the table: readable, it gets a task again, served from its next
    /// request with the deadline it was held with (and today's config); past its deadline, it
    /// is closed, counted as its task would have counted it.
    fn serve_again(&self, gone: Leaving<Resumable>) {
        let metrics = &self.service.metrics;
        let held = match gone {
            Leaving::Woken(held) => held,
            Leaving::Expired(held) => {
                metrics.header_timeouts.fetch_add(1, Ordering::Relaxed);
                return tracing::debug!(client = %held.rest.client, "closed: an idle connection sent no request within proxy.header_read_timeout");
            }
        };
        let stream = match TcpStream::from_std(held.stream) {
            Ok(stream) => stream,
            Err(e) => {
                return tracing::debug!(error = %e, "an idle connection could not be served again")
            }
        };
        let Resumable {
            client,
            admitted,
            counted,
            requests,
        } = held.rest;
        let config = self.service.shared.load().config.clone();
        let conn = self.connection(stream, client, config, admitted.served(), counted);
        self.connections.spawn(conn.resume(requests, held.deadline));
    }
}

/// Holds an idle connection in `parking`; one that cannot be held goes to `leaving`, to be served
/// again by a task at once.
fn hold(
    parking: &mut Parking<Resumable>,
    held: Held<Resumable>,
    metrics: &Metrics,
    leaving: &mut Vec<Leaving<Resumable>>,
) {
    metrics
        .connections_held_idle
        .fetch_add(1, Ordering::Relaxed);
    if let Err((held, e)) = parking.hold(held) {
        tracing::debug!(client = %held.rest.client, error = %e, "an idle connection could not be held; it keeps a task");
        leaving.push(Leaving::Woken(held));
    }
}

/// Until a held connection leaves `parking` (into `leaving`); never without a table.
async fn leave(parking: &mut Option<Parking<Resumable>>, leaving: &mut Vec<Leaving<Resumable>>) {
    match parking {
        Some(parking) => parking.leaving(leaving).await,
        None => std::future::pending().await,
    }
}

/// Admits a new connection from `client` under the caps, or says why not (at debug level).
fn admit(service: &Service, config: &Config, client: SocketAddr) -> Option<Admitted> {
    service
        .admission
        .admit(client.ip(), &config.proxy, config.replicas.max_replicas)
        .inspect_err(|refusal| {
            tracing::debug!(client = %client, ?refusal, "connection refused: over a cap");
        })
        .ok()
}

/// Runs an HTTP/2 connection to its end; on drain or idle it is asked to finish gracefully
/// (the response in progress completes, then it closes; after idle within `close_within`);
/// once `stalled` completes it is dropped, closed at once.
async fn drive_h2<T, F, Fut, B>(
    mut conn: h2_server::Connection<T, F, Fut, B>,
    mut drain: watch::Receiver<bool>,
    (idle, stalled): (impl Future<Output = ()>, impl Future<Output = ()>),
    close_within: Duration,
    metrics: &Metrics,
    client: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<Inbound>) -> Fut + Unpin,
    Fut: Future<Output = Answer<B>> + Unpin,
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<crate::error::BoxError>,
{
    tokio::pin!(idle, stalled);
    let (mut closing, mut idled) = (false, false);
    loop {
        tokio::select! {
            ended = &mut conn => {
                if let Err(e) = ended {
                    tracing::debug!(client = %client, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = drain.wait_for(|d| *d), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            _ = &mut idle, if !closing => {
                idled = true;
                break;
            }
            // A client that holds its responses back would hold a graceful close too.
            _ = &mut stalled => break,
        }
    }
    if idled {
        // No stream of ours is open, but h2 may still hold the end of a response the client's
        // window keeps back: a close that does not finish in time is cut.
        conn.graceful_shutdown();
        if tokio::time::timeout(close_within, &mut conn).await.is_err() {
            metrics.send_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %client, "closed: an idle HTTP/2 connection did not finish its close within proxy.send_timeout");
        }
    }
}

/// Keeps a timer due within [`ANCHOR_PERIOD`] on this thread's runtime at all times. Every
/// request arms timers (the header deadline, `proxy.request_timeout`) that are due much later;
/// tokio wakes its driver through an eventfd write whenever a timer is armed that is due earlier
/// than anything pending, which, with no earlier timer around, is nearly every request. Measured:
/// 0.14 eventfd writes per request without the anchor. One per serving thread (the thread
/// spawns it beside its listeners).
pub async fn timer_anchor() {
    let mut tick = tokio::time::interval(ANCHOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

const ANCHOR_PERIOD: Duration = Duration::from_millis(250);

/// One accepted client connection.
struct Connection {
    stream: TcpStream,
    client: SocketAddr,
    config: Arc<Config>,
    mode: Mode,
    service: Arc<Service>,
    /// The serving thread's own state, which its requests use.
    worker: Arc<Worker>,
    drain: watch::Receiver<bool>,
    /// Its place under the connection caps; its requests ask it for theirs in the budgets.
    admitted: Arc<Admitted>,
    /// On the count of the serving thread that serves it ([`crate::spread`]).
    counted: Counted,
    /// Where it goes to be held once idle (cleartext HTTP/1 only); `None`: it keeps its task.
    to_hold: Option<ToHold>,
}

/// What the requests of a connection get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requests {
    /// Served (plain HTTP).
    Served,
    /// Served, marked as having come over TLS.
    ServedOverTls,
    /// Redirected to HTTPS on this port (the gateway's own `/lb/` endpoints excepted).
    Redirected { https_port: u16 },
    /// Answered 400: plain HTTP on the TLS port, one request, then closed.
    RefusedPlainOnTls { tls_port: u16 },
}

impl Connection {
    async fn run(self) {
        // One deadline from accept: the TLS handshake and the first bytes together.
        let deadline = Instant::now() + self.config.proxy.header_read_timeout;
        let (conn, stream, mode, counted, to_hold) = self.split();
        // Each arm boxed, so that the task holds the one it runs: inline, every connection kept
        // room for the largest (the TLS handshake and both HTTP versions), 8 KiB a connection.
        match mode {
            Mode::Plain { https_port } => {
                let requests = match https_port {
                    Some(https_port) if conn.config.tls.http == PlainHttp::Redirect => {
                        Requests::Redirected { https_port }
                    }
                    _ => Requests::Served,
                };
                let holding = Holding::of(&conn, requests, to_hold);
                let idle_after = holding.as_ref().map(|_| IDLE_HOLD_AFTER);
                let served = Box::pin(conn.serve(stream, requests, deadline, idle_after)).await;
                Holding::hold(holding, served, counted);
            }
            Mode::Tls(tls) => Box::pin(conn.serve_tls(stream, tls, deadline)).await,
        }
    }

    /// A held connection that became readable: HTTP/1 again, from its next request, with the
    /// deadline it was held with.
    async fn resume(self, requests: Requests, deadline: Instant) {
        let (conn, stream, _, counted, to_hold) = self.split();
        let holding = Holding::of(&conn, requests, to_hold);
        let stream = conn.bounded(stream);
        let settings = server::Settings {
            header_read_timeout: conn.config.proxy.header_read_timeout,
            first_head_by: deadline,
            keep_alive: true,
            idle_after: holding.as_ref().map(|_| IDLE_HOLD_AFTER),
            resumed: true,
        };
        let served = Box::pin(conn.serve_http1(Box::new(stream), &[], requests, settings)).await;
        Holding::hold(holding, served, counted);
    }

    fn split(self) -> (Serving, TcpStream, Mode, Counted, Option<ToHold>) {
        let Connection {
            stream,
            client,
            config,
            mode,
            service,
            worker,
            drain,
            admitted,
            counted,
            to_hold,
        } = self;
        let conn = Serving {
            client,
            admitted,
            config,
            service,
            worker,
            drain,
        };
        (conn, stream, mode, counted, to_hold)
    }
}

/// What a cleartext connection's task keeps to send its socket to the listener to be held, if
/// our HTTP/1 server hands it back idle.
struct Holding {
    client: SocketAddr,
    admitted: Arc<Admitted>,
    requests: Requests,
    to_hold: ToHold,
}

impl Holding {
    fn of(conn: &Serving, requests: Requests, to_hold: Option<ToHold>) -> Option<Holding> {
        Some(Holding {
            client: conn.client,
            admitted: conn.admitted.clone(),
            requests,
            to_hold: to_hold?,
        })
    }

    /// Sends the socket of a connection handed back idle to be held (with its count on the
    /// serving thread); what is not a plain TCP stream (never: only those are handed back) or is
    /// closed on the way is dropped, closed, as is every connection that ended.
    fn hold(holding: Option<Holding>, served: Served, counted: Counted) {
        let (Some(holding), Served::Idle { io, deadline }) = (holding, served) else {
            return;
        };
        let stream = match io.into_any().downcast::<SendTimeout<TcpStream>>() {
            Ok(bounded) => bounded.into_inner(),
            Err(_) => return tracing::debug!("an idle connection that is not plain TCP; closed"),
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                return tracing::debug!(error = %e, "an idle connection could not be held; closed")
            }
        };
        let rest = Resumable {
            client: holding.client,
            // The connection's task is done with its share of the place: this is the only one.
            admitted: Place::held(holding.admitted),
            counted,
            requests: holding.requests,
        };
        let held = Held {
            stream,
            also: None,
            deadline,
            rest,
        };
        // The listener is gone (drained): the connection closes, as an idle one does.
        let _ = holding.to_hold.send(held);
    }
}

/// A TLS connection closed at the first-bytes deadline, before or during its handshake.
fn handshake_timed_out(metrics: &Metrics, client: SocketAddr, what: &str) {
    metrics.first_bytes_timeouts.fetch_add(1, Ordering::Relaxed);
    metrics
        .tls_handshake_timeouts
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(client = %client, "closed: {what} within proxy.header_read_timeout");
}

/// A connection past its handshake: HTTP on a plain or a TLS stream.
struct Serving {
    client: SocketAddr,
    admitted: Arc<Admitted>,
    config: Arc<Config>,
    service: Arc<Service>,
    worker: Arc<Worker>,
    drain: watch::Receiver<bool>,
}

/// The answer to one request, as `requests` says.
async fn answer(
    service: &Service,
    worker: &Worker,
    mut req: Request<RequestBody>,
    conn: &Arc<Admitted>,
    client: SocketAddr,
    requests: Requests,
) -> hyper::Response<Body> {
    match requests {
        Requests::Served => service.handle(req, conn, client, worker).await,
        Requests::ServedOverTls => {
            req.extensions_mut().insert(Https);
            service.handle(req, conn, client, worker).await
        }
        Requests::Redirected { https_port } if redirect::redirects(req.uri().path()) => {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()));
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            redirect::response(host.and_then(|h| redirect::location(h, target, https_port)))
        }
        Requests::Redirected { .. } => service.handle(req, conn, client, worker).await,
        Requests::RefusedPlainOnTls { tls_port } => {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| redirect::location(h, "/", tls_port))
                .map(|l| l.trim_start_matches("https://").to_owned())
                .unwrap_or_else(|| format!("HOST:{tls_port}/"));
            GatewayError::PlainHttpOnTlsPort { host }.into_response()
        }
    }
}

impl Serving {
    /// The TLS port: plain HTTP answered 400, else the handshake within `deadline`, then HTTP.
    async fn serve_tls(self, stream: TcpStream, tls: Arc<Tls>, deadline: Instant) {
        let (metrics, client) = (self.service.metrics.clone(), self.client);
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
        match peeked {
            Ok(Ok(1..)) => {}
            Ok(_) => return,
            Err(_) => return handshake_timed_out(&metrics, client, "no TLS handshake"),
        }
        if first[0] != TLS_HANDSHAKE_RECORD && first[0].is_ascii_alphabetic() {
            metrics.tls_plain_http.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %client, "plain HTTP on the TLS port: answered 400");
            let tls_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
            let refused = Requests::RefusedPlainOnTls { tls_port };
            Box::pin(self.serve(stream, refused, deadline, None)).await;
            return;
        }
        // Boxed: the handshake's state is freed once it is done, not kept beside the connection.
        let handshake = Box::pin(tokio::time::timeout_at(
            deadline,
            tls.acceptor().accept(stream),
        ));
        match handshake.await {
            Ok(Ok(stream)) => {
                metrics.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                let requests = Requests::ServedOverTls;
                Box::pin(self.serve(stream, requests, deadline, None)).await;
            }
            Ok(Err(e)) => {
                metrics.tls_handshake_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %client, error = %e, "TLS handshake failed");
            }
            Err(_) => handshake_timed_out(&metrics, client, "TLS handshake not done"),
        }
    }

    /// HTTP/1 or HTTP/2 on `stream`, as its first bytes say, which are due by `deadline`. An
    /// HTTP/1 connection idle for `idle_after` between requests is handed back.
    async fn serve<S>(
        self,
        mut stream: S,
        requests: Requests,
        deadline: Instant,
        idle_after: Option<Duration>,
    ) -> Served
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut first = Prefix::default();
        let protocol = tokio::time::timeout_at(deadline, async {
            loop {
                let n = stream.read(first.unfilled()).await?;
                if n == 0 {
                    return Ok(None);
                }
                first.len += n;
                match sniff(first.filled()) {
                    Sniffed::Undecided => continue,
                    decided => return Ok::<_, io::Error>(Some(decided)),
                }
            }
        })
        .await;
        let protocol = match protocol {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) | Ok(Err(_)) => return Served::Done,
            Err(_) => {
                self.service
                    .metrics
                    .first_bytes_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %self.client, "closed: no request within proxy.header_read_timeout");
                return Served::Done;
            }
        };
        let stream = self.bounded(stream);
        match protocol {
            Sniffed::Http2 if !matches!(requests, Requests::RefusedPlainOnTls { .. }) => {
                // Boxed: an HTTP/1 connection's task keeps no room for HTTP/2's state.
                Box::pin(self.serve_h2(stream, first, requests)).await;
                Served::Done
            }
            Sniffed::Http2 => Served::Done, // an HTTP/2 preface in cleartext on the TLS port: closed
            Sniffed::Http1 | Sniffed::Undecided => {
                let settings = server::Settings {
                    header_read_timeout: self.config.proxy.header_read_timeout,
                    first_head_by: deadline,
                    keep_alive: !matches!(requests, Requests::RefusedPlainOnTls { .. }),
                    idle_after,
                    resumed: false,
                };
                self.serve_http1(Box::new(stream), first.filled(), requests, settings)
                    .await
            }
        }
    }

    /// The client stream with its writes bounded by `proxy.send_timeout`.
    fn bounded<S>(&self, stream: S) -> SendTimeout<S> {
        let metrics = self.service.metrics.clone();
        SendTimeout::new(stream, self.config.proxy.send_timeout, metrics)
    }

    /// HTTP/1 on `io`, whose first bytes were `first`, through our server.
    async fn serve_http1(
        self,
        io: Transport,
        first: &[u8],
        requests: Requests,
        settings: server::Settings,
    ) -> Served {
        let (service, client) = (&self.service, self.client);
        let (admitted, worker) = (&self.admitted, &self.worker);
        let handler =
            |req: Request<RequestBody>| answer(service, worker, req, admitted, client, requests);
        let metrics = &service.metrics;
        let spare = &worker.spare;
        server::serve(io, first, settings, metrics, spare, self.drain, handler).await
    }

    /// HTTP/2 on `stream`, whose first bytes were read into `first`: served on the `h2`
    /// crate directly ([`crate::wire::h2::server`]), each stream answered in this connection's
    /// task.
    async fn serve_h2<S>(self, stream: SendTimeout<S>, first: Prefix, requests: Requests)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (service, client) = (self.service.clone(), self.client);
        let proxy = &self.config.proxy;
        let activity = Arc::new(Activity::default());
        let mut stream = stream;
        stream.count_written(activity.written());
        let io = Prefixed {
            prefix: first,
            stream,
        };
        let handler = {
            let (activity, admitted) = (activity.clone(), self.admitted.clone());
            let worker = self.worker.clone();
            move |req: Request<Inbound>| {
                let (service, stream) = (service.clone(), activity.open_stream());
                let (admitted, worker) = (admitted.clone(), worker.clone());
                // Made in its box (the request's future is about 7 KiB): the connection keeps
                // a pointer to it while it runs.
                let slot = Box::new_uninit();
                Box::into_pin(Box::write(slot, async move {
                    let req = req.map(RequestBody::http2);
                    let resp = answer(&service, &worker, req, &admitted, client, requests).await;
                    if resp.extensions().get::<RefusedStream>().is_some() {
                        // Not processed at all: the client may retry it at once.
                        return Answer::Refuse;
                    }
                    Answer::Respond(resp.map(|inner| StreamBody::new(inner, stream)))
                }))
            }
        };
        let settings = h2_server::Settings {
            max_streams: proxy.http2_max_streams,
            keepalive: proxy.http2_keepalive,
        };
        let conn = h2_server::Connection::new(io, settings, handler);
        let metrics = &self.service.metrics;
        let idle = http2::idle_for(activity.clone(), proxy.idle_timeout, metrics.clone());
        let stalled = http2::stalled(activity, proxy.send_timeout, metrics.clone());
        drive_h2(
            conn,
            self.drain,
            (idle, stalled),
            proxy.send_timeout,
            metrics,
            client,
        )
        .await;
    }
}

/// The bytes read to tell the protocol, handed to the HTTP/2 server before the rest of the
/// stream.
#[derive(Default)]
struct Prefix {
    buf: [u8; 24],
    len: usize,
    pos: usize,
}

impl Prefix {
    fn unfilled(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    fn filled(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The client stream with its sniffed first bytes put back in front.
struct Prefixed<S> {
    prefix: Prefix,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = &mut this.prefix;
        if p.pos < p.len {
            let n = (p.len - p.pos).min(buf.remaining());
            buf.put_slice(&p.buf[p.pos..p.pos + n]);
            p.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_the_protocols_apart_as_early_as_it_can() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST"), Sniffed::Http1, "P then O: not the preface");
        assert_eq!(sniff(b"P"), Sniffed::Undecided);
        assert_eq!(sniff(&H2_PREFACE[..23]), Sniffed::Undecided);
        assert_eq!(sniff(H2_PREFACE), Sniffed::Http2);
        assert_eq!(sniff(b""), Sniffed::Undecided);
        assert_eq!(
            sniff(b"\x16\x03\x01"),
            Sniffed::Http1,
            "TLS: the HTTP/1 server answers or closes"
        );
    }
}
