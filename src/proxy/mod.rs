//! The request path: one client request to one replica.
//!
//! Owns: key → slot → replica, the forwarded request (hop-by-hop headers dropped,
//! `X-Forwarded-*` set, body streamed with `proxy.max_body` enforced), retries on the next
//! distinct server clockwise, and the streamed response.
//! Must not touch: shared mutable state. It loads one [`Snapshot`] and uses it to the end; it
//! takes no lock (the only mutex is the per-request body slot, which no other request sees); it
//! reports failed connects to the controller with a non-blocking hint.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::control::ControllerHandle;
use crate::error::{error_chain, Body, BoxError, GatewayError};
use crate::metrics::Metrics;
use crate::snapshot::{ReplicaStats, Snapshot};
use crate::sync::lock;

pub type UpstreamClient = Client<HttpConnector, ProxyBody>;

thread_local! {
    /// This serving thread's pool of upstream connections, with the connect timeout it was built
    /// for. Per thread, so a request and its upstream connection stay on one thread (no
    /// cross-thread wake-ups); rebuilt when `proxy.connect_timeout` changes.
    static CLIENT: std::cell::RefCell<Option<(Duration, UpstreamClient)>> = const { std::cell::RefCell::new(None) };
}

/// The calling thread's upstream client for `connect_timeout` (a cheap handle clone).
fn thread_client(connect_timeout: Duration) -> UpstreamClient {
    CLIENT.with(|cell| {
        let mut slot = cell.borrow_mut();
        match &*slot {
            Some((t, client)) if *t == connect_timeout => client.clone(),
            _ => {
                let client = upstream_client(connect_timeout);
                *slot = Some((connect_timeout, client.clone()));
                client
            }
        }
    })
}

/// Idle keep-alive connections kept per replica.
pub const MAX_IDLE_PER_REPLICA: usize = 64;

/// The pooled keep-alive client to replicas.
pub fn upstream_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        // Enough idle keep-alive connections per replica for steady load; a burst beyond it
        // opens more, which are closed when idle instead of held (each costs buffers).
        .pool_max_idle_per_host(MAX_IDLE_PER_REPLICA)
        .build(connector)
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
    headers.remove("proxy-connection");
}

/// A request body that can be handed back if the attempt failed before reading any of it.
pub enum ProxyBody {
    Empty,
    Streaming {
        slot: Arc<BodySlot>,
        taken: Option<Limited<Incoming>>,
        hint: SizeHint,
    },
}

/// Holds the client's body until an attempt first polls it. A failed attempt that never polled
/// it leaves it here, and the next attempt takes it: that is what makes a request with a body
/// retryable. `over_limit` records that the body ran past `proxy.max_body`, because hyper boxes
/// body errors in a way that hides their type from the error chain.
pub struct BodySlot {
    body: Mutex<Option<Limited<Incoming>>>,
    over_limit: std::sync::atomic::AtomicBool,
}

impl BodySlot {
    fn new(body: Limited<Incoming>) -> BodySlot {
        BodySlot {
            body: Mutex::new(Some(body)),
            over_limit: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<Limited<Incoming>> {
        lock(&self.body).take()
    }

    fn is_untouched(&self) -> bool {
        lock(&self.body).is_some()
    }
}

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Streaming { slot, taken, .. } => {
                if taken.is_none() {
                    *taken = slot.take();
                }
                let Some(body) = taken else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(Err(e))) = &polled {
                    if e.is::<LengthLimitError>() {
                        slot.over_limit.store(true, Ordering::Relaxed);
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ProxyBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Streaming { hint, .. } => *hint,
        }
    }
}

/// The response body of a replica, counted in flight until it is finished or dropped.
struct Tracked {
    inner: Incoming,
    _guard: InFlight,
}

struct InFlight(Arc<ReplicaStats>);

impl InFlight {
    fn start(stats: &Arc<ReplicaStats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Forwards one request and returns the replica's response, or the gateway's failure response.
pub async fn forward(
    snap: Arc<Snapshot>,
    metrics: &Metrics,
    controller: &ControllerHandle,
    req: Request<Incoming>,
    client_addr: SocketAddr,
) -> Response<Body> {
    match try_forward(&snap, metrics, controller, req, client_addr).await {
        Ok(resp) => resp,
        Err(e) => {
            metrics.local_errors.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

async fn try_forward(
    snap: &Snapshot,
    metrics: &Metrics,
    controller: &ControllerHandle,
    req: Request<Incoming>,
    client_addr: SocketAddr,
) -> Result<Response<Body>, GatewayError> {
    let cfg = &snap.config;
    let (parts, body) = req.into_parts();
    let limit = cfg.proxy.max_body;
    if content_length(&parts.headers).is_some_and(|n| n > limit) {
        linger(body);
        return Err(GatewayError::PayloadTooLarge { limit });
    }

    let router = snap.router();
    let key = router.key(&parts, client_addr.ip());
    let slot = router.request_slot(key);
    let first = snap.ring.owner(slot).ok_or(GatewayError::NoReplica)?;

    let method = parts.method.clone();
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut headers = parts.headers;
    let original_host = headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut headers);
    set_forwarded(&mut headers, client_addr, original_host);

    let mut body = if body.is_end_stream() {
        ProxyBody::Empty
    } else {
        ProxyBody::Streaming {
            hint: body.size_hint(),
            slot: Arc::new(BodySlot::new(Limited::new(body, limit as usize))),
            taken: None,
        }
    };
    let idempotent = is_idempotent(&method);
    let client = thread_client(cfg.proxy.connect_timeout);
    let attempts = 1 + cfg.proxy.retries as usize;
    let mut target = first;
    let mut attempt = 0;
    loop {
        let upstream = snap.upstream(target).ok_or(GatewayError::NoReplica)?;
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(upstream.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|e| GatewayError::Internal(format!("cannot build the upstream URI: {e}")))?;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers.clone();
        let slot_handle = match req.body() {
            ProxyBody::Streaming { slot, hint, .. } => Some((slot.clone(), *hint)),
            ProxyBody::Empty => None,
        };

        let guard = InFlight::start(&upstream.stats);
        let started = Instant::now();
        let result = tokio::time::timeout(cfg.proxy.request_timeout, client.request(req)).await;
        match result {
            Ok(Ok(resp)) => {
                metrics.upstream_latency.observe(started.elapsed());
                upstream.stats.record_response(resp.status().as_u16());
                let (mut parts, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let tracked = Tracked {
                    inner: incoming,
                    _guard: guard,
                };
                return Ok(Response::from_parts(parts, tracked.boxed_unsync()));
            }
            Ok(Err(e)) => {
                drop(guard);
                upstream.stats.failures.fetch_add(1, Ordering::Relaxed);
                if slot_handle
                    .as_ref()
                    .is_some_and(|(slot, _)| slot.over_limit.load(Ordering::Relaxed))
                {
                    return Err(GatewayError::PayloadTooLarge { limit });
                }
                let connect_failed = e.is_connect();
                if connect_failed {
                    controller.passive_failure(upstream.id, upstream.incarnation, error_chain(&e));
                }
                // A streamed body is available again only if no attempt has read from it.
                let streamed = slot_handle.is_some();
                let (body_unsent, next_body) = match slot_handle {
                    None => (true, ProxyBody::Empty),
                    Some((slot, hint)) => (
                        slot.is_untouched(),
                        ProxyBody::Streaming {
                            slot,
                            taken: None,
                            hint,
                        },
                    ),
                };
                let retryable = body_unsent && (connect_failed || idempotent || streamed);
                let next = retryable
                    .then(|| snap.ring.successors(slot).nth(attempt + 1))
                    .flatten()
                    .filter(|_| attempt + 1 < attempts);
                match next {
                    Some(n) => {
                        tracing::debug!(replica = %upstream.name, next = %n, error = %error_chain(&e), "retrying on the next server");
                        metrics.retries.fetch_add(1, Ordering::Relaxed);
                        target = n;
                        attempt += 1;
                        body = next_body;
                    }
                    None => {
                        return Err(GatewayError::BadGateway {
                            replica: upstream.name.clone(),
                            detail: error_chain(&e),
                        })
                    }
                }
            }
            Err(_) => {
                drop(guard);
                upstream.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(GatewayError::GatewayTimeout {
                    replica: upstream.name.clone(),
                    timeout: cfg.proxy.request_timeout,
                });
            }
        }
    }
}

/// Reads and discards a rejected upload for a while (bounded in bytes and time), like NGINX's
/// lingering close, so a client still sending its body reads our 413 instead of a broken pipe.
fn linger(body: Incoming) {
    const MAX_BYTES: u64 = 64 * 1024 * 1024;
    const MAX_TIME: Duration = Duration::from_secs(5);
    tokio::spawn(async move {
        let mut limited = Limited::new(body, MAX_BYTES as usize);
        let _ = tokio::time::timeout(MAX_TIME, async {
            while let Some(Ok(_)) = limited.frame().await {}
        })
        .await;
    });
}

fn set_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: Option<HeaderValue>) {
    let ip = client.ip().to_canonical().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = host {
        headers.insert("x-forwarded-host", h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_including_connection_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarded_headers_append_to_an_existing_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        set_forwarded(
            &mut h,
            "[::ffff:10.0.0.7]:999".parse().expect("addr"),
            Some(HeaderValue::from_static("example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
