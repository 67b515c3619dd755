//! The access log (`[log] access`, `[log] format`): one line per request, written off the
//! request path.
//!
//! Owns: what a request's line records ([`Started`] at its arrival, the proxy's [`Outcome`],
//! the response's bytes and end as [`LoggedBody`] sees them, the [`Termination`] reason), the
//! serving threads' buffers the lines are formatted into ([`Lines`]), and handing full buffers
//! to the writer thread ([`writer`]) with a `try_send`: a serving thread never waits for the
//! disk. A buffer is handed over when it holds [`BATCH_BYTES`], or [`FLUSH_AFTER`] after its
//! first line (a task on the serving thread's own runtime), or when the serving thread ends (its
//! worker is dropped). When the writer falls behind by [`QUEUE_BATCHES`] batches, further
//! batches are dropped and counted (`ringgate_access_log_dropped_total`), never queued without
//! bound.
//! Must not touch: routing or responses. It observes; the line format is [`format`]'s.

pub mod format;
mod writer;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, REFERER, USER_AGENT};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::config::{AccessTarget, Config};
use crate::control::error::ControlError;
use crate::error::BoxError;
use crate::metrics::Metrics;
use crate::rescue::GatewayError;
use crate::ring::ServerId;
use crate::snapshot::Snapshot;
use crate::wire::body::Body;
use writer::Msg;

/// A thread's buffer is handed to the writer once it holds this much.
pub const BATCH_BYTES: usize = 32 * 1024;
/// … or this long after its first line.
pub const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// Batches the writer may fall behind by before new ones are dropped (8 MiB of lines).
pub const QUEUE_BATCHES: usize = 256;

/// Why a request ended the way it did (the log's `termination` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// The whole response reached the client.
    Ok,
    /// The client went away before the response was complete.
    ClientAbort,
    /// The replica broke the connection while sending the response body.
    UpstreamBodyError,
    /// No replica was in the ring (503).
    NoReplica,
    /// No connection to the replica (and the next ones tried) could be made (502); a failed
    /// connect also takes the replica out of the ring.
    UpstreamConnectFailed,
    /// The replica closed or reset the connection before answering (502).
    UpstreamReset,
    /// The replica sent no response headers within `proxy.request_timeout` (504).
    UpstreamTimeout,
    /// The gateway ran out of a local resource (503).
    LocalResource,
    /// The client's request body broke (400), or stopped arriving (408).
    ClientBodyError,
    /// The request body was over `proxy.max_body` (413).
    TooLarge,
    /// A malformed request (400), e.g. not exactly one `Host`.
    BadRequest,
    /// The gateway is shutting down (503).
    ShuttingDown,
    /// A request budget was spent: `proxy.max_requests`, `max_requests_per_ip` or
    /// `max_requests_per_replica` (503, or `REFUSED_STREAM` on HTTP/2).
    OverBudget,
    /// Anything else the gateway answered itself; or a tunnel the gateway could not go on
    /// with (a socket it could not set aside to rest, or take back).
    GatewayError,
    /// A tunnel (after `101`) whose two sides both ended their streams.
    TunnelEnded,
    /// A tunnel whose client connection broke (or took nothing for `proxy.send_timeout`).
    TunnelClientError,
    /// A tunnel whose replica connection broke.
    TunnelReplicaError,
    /// A tunnel that carried nothing for `[tunnels] idle_timeout`.
    TunnelIdleTimeout,
    /// A tunnel closed because its key's home moved (`[tunnels] rehome`).
    TunnelRehomed,
    /// A tunnel closed by the gateway's drain.
    TunnelShutdown,
    /// The upgrade was refused: `[tunnels] max` tunnels are open (503).
    TunnelsFull,
}

/// How a tunnel ended, for its access-log line (written then, not at its `101`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEnd {
    /// Bytes from the client to the replica, and back.
    pub up: u64,
    pub down: u64,
    pub termination: Termination,
}

/// In the extensions of a `101` that opened a tunnel: where its end will be told. Cloneable,
/// as extensions must be; the first to take it has it.
#[derive(Clone)]
pub struct TunnelLog(Arc<Mutex<Option<oneshot::Receiver<TunnelEnd>>>>);

impl TunnelLog {
    pub fn new(end: oneshot::Receiver<TunnelEnd>) -> TunnelLog {
        TunnelLog(Arc::new(Mutex::new(Some(end))))
    }

    fn take(&self) -> Option<oneshot::Receiver<TunnelEnd>> {
        crate::sync::lock(&self.0).take()
    }
}

impl Termination {
    pub fn name(self) -> &'static str {
        match self {
            Termination::Ok => "ok",
            Termination::ClientAbort => "client_abort",
            Termination::UpstreamBodyError => "upstream_body_error",
            Termination::NoReplica => "no_replica",
            Termination::UpstreamConnectFailed => "upstream_connect_failed",
            Termination::UpstreamReset => "upstream_reset",
            Termination::UpstreamTimeout => "upstream_timeout",
            Termination::LocalResource => "local_resource",
            Termination::ClientBodyError => "client_body_error",
            Termination::TooLarge => "too_large",
            Termination::BadRequest => "bad_request",
            Termination::ShuttingDown => "shutting_down",
            Termination::OverBudget => "over_budget",
            Termination::GatewayError => "gateway_error",
            Termination::TunnelEnded => "tunnel_ended",
            Termination::TunnelClientError => "tunnel_client_error",
            Termination::TunnelReplicaError => "tunnel_replica_error",
            Termination::TunnelIdleTimeout => "tunnel_idle_timeout",
            Termination::TunnelRehomed => "tunnel_rehomed",
            Termination::TunnelShutdown => "tunnel_shutdown",
            Termination::TunnelsFull => "tunnels_full",
        }
    }

    /// The reason for an error the proxy answered with; `connect_failed` tells a failed
    /// connect from a reset when the error is a 502.
    pub fn of(e: &GatewayError, connect_failed: bool) -> Termination {
        match e {
            GatewayError::NoReplica
            | GatewayError::HoldFull { .. }
            | GatewayError::HoldTimeout { .. } => Termination::NoReplica,
            GatewayError::BadGateway { .. } if connect_failed => Termination::UpstreamConnectFailed,
            GatewayError::BadGateway { .. } => Termination::UpstreamReset,
            GatewayError::GatewayTimeout { .. } => Termination::UpstreamTimeout,
            GatewayError::LocalResource { .. } => Termination::LocalResource,
            GatewayError::ClientBody { .. } | GatewayError::ClientBodyTimeout { .. } => {
                Termination::ClientBodyError
            }
            GatewayError::PayloadTooLarge { .. } => Termination::TooLarge,
            GatewayError::BadHost => Termination::BadRequest,
            GatewayError::Control(ControlError::ShuttingDown) => Termination::ShuttingDown,
            GatewayError::OverBudget { .. } | GatewayError::ReplicaBusy { .. } => {
                Termination::OverBudget
            }
            GatewayError::TunnelsFull { .. } => Termination::TunnelsFull,
            _ => Termination::GatewayError,
        }
    }
}

/// What the proxy tells the access log about one request: plain stores into a struct on the
/// serving task's stack, whether or not logging is on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The replica of the last attempt.
    pub replica: Option<ServerId>,
    /// The request's slot on the ring.
    pub slot: Option<u32>,
    /// Attempts after the first.
    pub retries: u32,
    /// Time to the replica's response headers.
    pub upstream: Option<Duration>,
    /// How long it was held for a replica to start (N was 0: scale to zero).
    pub held: Option<Duration>,
    /// The last failed attempt was a failed connect.
    pub connect_failed: bool,
    /// Set when the gateway answered with an error instead of a replica's response.
    pub termination: Option<Termination>,
}

/// The access log of one gateway: the writer thread and the channel to it.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Starts the writer thread (idle until a line is logged).
    pub fn start(metrics: Arc<Metrics>) -> std::io::Result<Arc<AccessLog>> {
        let (tx, rx) = sync_channel(QUEUE_BATCHES);
        let m = metrics.clone();
        let writer = std::thread::Builder::new()
            .name("ringgate-access-log".into())
            .spawn(move || writer::run(rx, m))?;
        Ok(Arc::new(AccessLog {
            tx,
            writer: Mutex::new(Some(writer)),
            metrics,
        }))
    }

    /// Closes the log file so the next line opens its path anew (after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Writes everything queued, then stops the writer. Call after the serving threads have
    /// ended (their [`Lines`] are handed over as their workers end).
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Close);
        let handle = crate::sync::lock(&self.writer).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn drop_records(&self, n: u64) {
        self.metrics
            .access_log_dropped
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// A serving thread's lines not yet handed to the writer: one per thread, in its worker
/// ([`crate::worker::Worker`]), handed over when full, [`FLUSH_AFTER`] after the first line,
/// and when dropped (the thread ends). Behind a lock only its own thread ever takes: request
/// futures must be `Send`: their connection's task is spawned on the runtime.
pub struct Lines {
    log: Arc<AccessLog>,
    local: Mutex<Local>,
}

#[derive(Default)]
struct Local {
    /// The config the buffered lines' target came from: while a request's config is this one
    /// (the common case), the target is not compared again.
    config: Option<Arc<Config>>,
    target: AccessTarget,
    buf: Vec<u8>,
    /// The dates of the current second, formatted once for all its lines.
    dates: format::Dates,
    records: u64,
    flush_scheduled: bool,
}

impl Local {
    fn flush(&mut self, log: &AccessLog) {
        if self.records == 0 {
            return;
        }
        let msg = Msg::Batch {
            target: self.target.clone(),
            bytes: std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH_BYTES)),
            records: std::mem::take(&mut self.records),
        };
        match log.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Batch { records, .. }))
            | Err(TrySendError::Disconnected(Msg::Batch { records, .. })) => {
                log.drop_records(records)
            }
            Err(_) => {}
        }
    }
}

impl Lines {
    pub fn new(log: &Arc<AccessLog>) -> Arc<Lines> {
        Arc::new(Lines {
            log: Arc::clone(log),
            local: Mutex::new(Local::default()),
        })
    }

    fn flush(&self) {
        let mut l = crate::sync::lock(&self.local);
        l.flush_scheduled = false;
        l.flush(&self.log);
    }

    /// Formats `record` into the buffer, in `config`'s `[log]` format and for its target.
    fn append(self: &Arc<Self>, config: &Arc<Config>, record: &format::Record<'_>) {
        let mut l = crate::sync::lock(&self.local);
        if !l.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config)) {
            if l.target != config.log.access {
                l.flush(&self.log);
                l.target = config.log.access.clone();
            }
            l.config = Some(config.clone());
        }
        let l = &mut *l;
        format::write(&mut l.buf, &mut l.dates, config.log.format, record);
        l.records += 1;
        if l.buf.len() >= BATCH_BYTES {
            l.flush(&self.log);
        } else if !l.flush_scheduled {
            // On a serving thread's current-thread runtime the task runs on this thread, beside
            // the requests that fill the buffer. Anywhere else, hand the line over at once.
            match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
                    l.flush_scheduled = true;
                    let lines = Arc::clone(self);
                    h.spawn(async move {
                        tokio::time::sleep(FLUSH_AFTER).await;
                        lines.flush();
                    });
                }
                _ => l.flush(&self.log),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let local = self.local.get_mut().unwrap_or_else(|p| p.into_inner());
        local.flush(&self.log);
    }
}

/// What is known about a request when it arrives, kept until its response ends.
pub struct Started {
    time: SystemTime,
    at: Instant,
    client: SocketAddr,
    method: Method,
    uri: Uri,
    version: Version,
    https: bool,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

impl Started {
    /// Captures a request's line fields, if `config` logs requests.
    pub fn capture<B>(config: &Config, req: &Request<B>, client: SocketAddr) -> Option<Started> {
        if config.log.access == AccessTarget::Off {
            return None;
        }
        Some(Started {
            time: SystemTime::now(),
            at: Instant::now(),
            client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            https: req.extensions().get::<crate::tls::Https>().is_some(),
            referer: req.headers().get(REFERER).cloned(),
            user_agent: req.headers().get(USER_AGENT).cloned(),
        })
    }

    /// Wraps `resp`'s body so the line is written when the body ends or is dropped. `snap` is
    /// the snapshot the request was served with (its config and replica names name the line).
    pub fn finish(
        self,
        resp: Response<Body>,
        outcome: Outcome,
        snap: Arc<Snapshot>,
        lines: &Arc<Lines>,
    ) -> Response<Body> {
        let status = resp.status().as_u16();
        let pending = Pending {
            started: self,
            snap,
            outcome,
            status,
            lines: Arc::clone(lines),
        };
        let mut resp = resp;
        let tunnel = resp.extensions_mut().remove::<TunnelLog>();
        if let Some(end) = tunnel.as_ref().and_then(TunnelLog::take) {
            // A tunnel's line is written when it ends, by this serving thread (its log).
            tokio::spawn(async move {
                match end.await {
                    Ok(end) => pending.emit_tunnel(end),
                    Err(_) => pending.emit(0, Termination::ClientAbort),
                }
            });
            return resp;
        }
        resp.map(|inner| {
            Body::boxed(LoggedBody {
                inner,
                bytes: 0,
                pending: Some(pending),
            })
        })
    }
}

/// A request whose line is not written yet. It holds no shared reference count besides the
/// snapshot's (every `Arc` clone shared by all serving threads is a contended atomic): the
/// lines it goes into are its serving thread's.
struct Pending {
    started: Started,
    snap: Arc<Snapshot>,
    outcome: Outcome,
    status: u16,
    lines: Arc<Lines>,
}

impl Pending {
    fn emit_tunnel(self, end: TunnelEnd) {
        self.write(end.down, Some(end.up), end.termination);
    }

    fn emit(self, bytes: u64, end: Termination) {
        self.write(bytes, None, end);
    }

    fn write(self, bytes: u64, bytes_up: Option<u64>, end: Termination) {
        let s = &self.started;
        let path = s.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let protocol = match s.version {
            Version::HTTP_09 => "HTTP/0.9",
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2.0",
            Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        };
        // The bytes as sent: `to_str` refuses anything outside visible ASCII, which made a
        // non-ASCII value disappear from the line instead of being escaped.
        fn text(v: &Option<HeaderValue>) -> Option<&[u8]> {
            v.as_ref().map(HeaderValue::as_bytes)
        }
        let record = format::Record {
            time: s.time,
            client: s.client,
            method: s.method.as_str(),
            path,
            protocol,
            scheme: if s.https { "https" } else { "http" },
            status: self.status,
            bytes,
            bytes_up,
            duration: s.at.elapsed(),
            upstream: self.outcome.upstream,
            held: self.outcome.held,
            replica: self
                .outcome
                .replica
                .and_then(|id| self.snap.upstream(id))
                .map(|u| u.name.as_str()),
            slot: self.outcome.slot,
            retries: self.outcome.retries,
            termination: self.outcome.termination.unwrap_or(end).name(),
            referer: text(&s.referer),
            user_agent: text(&s.user_agent),
        };
        self.lines.append(&self.snap.config, &record);
    }
}

/// A response body that counts its bytes and writes the request's line when it ends, breaks
/// or is dropped unfinished (the client went away).
pub struct LoggedBody {
    inner: Body,
    bytes: u64,
    pending: Option<Pending>,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    p.emit(this.bytes, Termination::UpstreamBodyError);
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.emit(this.bytes, Termination::Ok);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            // A body never polled to its end is complete only if nothing was left to send
            // (HEAD, 204, 304, an empty body).
            let end = if self.inner.is_end_stream() {
                Termination::Ok
            } else {
                Termination::ClientAbort
            };
            p.emit(self.bytes, end);
        }
    }
}
