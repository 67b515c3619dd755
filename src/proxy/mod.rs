//! The request path: one client request to one replica.
//!
//! Owns: key → slot → replica, the forwarded request (normalised by [`headers`], body streamed
//! with `proxy.max_body` enforced by [`body`]), retries on the next distinct server clockwise
//! within the budget of [`retry`], and the streamed response. Failures are told apart here by
//! whose they are: the replica's (counted against it; a failed connect ejects it), the
//! client's (a broken request body: 400), or the gateway's own (out of file descriptors: 503);
//! only the first ever counts against a replica.
//! Must not touch: shared mutable state. It loads one [`Snapshot`] and uses it to the end; it
//! takes no lock (the only mutex is the per-request body slot, which no other request sees); it
//! reports failed connects to the controller with a non-blocking hint.

pub mod body;
pub mod headers;
pub mod retry;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::access_log::{Outcome, Termination};
use crate::control::ControllerHandle;
use crate::error::{error_chain, local_resource_cause, Body, GatewayError};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use body::{InFlight, ProxyBody, Tracked};
use retry::Failure;

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
/// `outcome` is told the slot, the replica, the retries and why the gateway answered itself,
/// for the access log.
pub async fn forward(
    snap: Arc<Snapshot>,
    metrics: &Metrics,
    controller: &ControllerHandle,
    req: Request<Incoming>,
    client_addr: SocketAddr,
    outcome: &mut Outcome,
) -> Response<Body> {
    let _active = retry::Active::enter();
    match try_forward(&snap, metrics, controller, req, client_addr, outcome).await {
        Ok(resp) => resp,
        Err(e) => {
            outcome.termination = Some(Termination::of(&e, outcome.connect_failed));
            metrics.local_errors.fetch_add(1, Ordering::Relaxed);
            let counter = match e {
                GatewayError::LocalResource { .. } => Some(&metrics.local_resource_errors),
                GatewayError::ClientBody { .. } => Some(&metrics.client_body_errors),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
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
    outcome: &mut Outcome,
) -> Result<Response<Body>, GatewayError> {
    let cfg = &snap.config;
    let (parts, body) = req.into_parts();
    headers::check_request(&parts.method, parts.uri.path(), &parts.headers)?;
    let limit = cfg.proxy.max_body;
    if content_length(&parts.headers).is_some_and(|n| n > limit) {
        linger(body);
        return Err(GatewayError::PayloadTooLarge { limit });
    }

    let router = snap.router();
    let key = router.key(&parts, client_addr.ip());
    let slot = router.request_slot(key);
    outcome.slot = Some(slot);
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
    headers::strip_hop_by_hop(&mut headers);
    headers::strip_client_only(&mut headers);
    headers::set_forwarded(&mut headers, client_addr, original_host);

    let mut body = ProxyBody::new(body, limit);
    let client = thread_client(cfg.proxy.connect_timeout);
    let attempts = 1 + cfg.proxy.retries as usize;
    let mut retrying: Option<retry::Retrying> = None;
    let mut target = first;
    let mut attempt = 0;
    loop {
        let upstream = snap.upstream(target).ok_or(GatewayError::NoReplica)?;
        outcome.replica = Some(upstream.id);
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
        let slot_handle = req.body().slot();

        let guard = InFlight::start(&upstream.stats);
        let started = Instant::now();
        let result = tokio::time::timeout(cfg.proxy.request_timeout, client.request(req)).await;
        let e = match result {
            Ok(Ok(resp)) => {
                let took = started.elapsed();
                outcome.upstream = Some(took);
                upstream
                    .stats
                    .latency
                    .observe_with(&metrics.upstream_latency, took);
                upstream.stats.record_response(resp.status().as_u16());
                let (mut parts, incoming) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                let tracked = Tracked {
                    inner: incoming,
                    _guard: guard,
                };
                return Ok(Response::from_parts(parts, tracked.boxed_unsync()));
            }
            Ok(Err(e)) => e,
            Err(_) => {
                upstream.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(GatewayError::GatewayTimeout {
                    replica: upstream.name.clone(),
                    timeout: cfg.proxy.request_timeout,
                });
            }
        };
        drop(guard);
        // Whose failure is it? The client's and the gateway's own never count against the replica.
        if let Some((slot, _)) = &slot_handle {
            if slot.over_limit() {
                return Err(GatewayError::PayloadTooLarge { limit });
            }
            if slot.client_error() {
                return Err(GatewayError::ClientBody {
                    detail: error_chain(&e),
                });
            }
        }
        if let Some(detail) = local_resource_cause(&e) {
            tracing::debug!(replica = %upstream.name, %detail, "local resource error; not the replica's fault");
            return Err(GatewayError::LocalResource { detail });
        }
        upstream.stats.failures.fetch_add(1, Ordering::Relaxed);
        outcome.connect_failed = e.is_connect();
        let failure = if e.is_connect() {
            controller.passive_failure(upstream.id, upstream.incarnation, error_chain(&e));
            Failure::Connect
        } else {
            Failure::Reset
        };
        // A streamed body is available again only if no attempt has read from it.
        let body_unsent = slot_handle
            .as_ref()
            .is_none_or(|(slot, _)| slot.is_untouched());
        let next = retry::may_retry(failure, &method, body_unsent, &cfg.proxy.retry_on)
            .then(|| snap.ring.successors(slot).nth(attempt + 1))
            .flatten()
            .filter(|_| attempt + 1 < attempts);
        let bad_gateway = || GatewayError::BadGateway {
            replica: upstream.name.clone(),
            detail: error_chain(&e),
        };
        let Some(n) = next else {
            return Err(bad_gateway());
        };
        if retrying.is_none() {
            let p = &cfg.proxy;
            retrying = retry::Retrying::try_start(p.retry_budget_percent, p.retry_budget_min);
            if retrying.is_none() {
                metrics.retries_over_budget.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(replica = %upstream.name, "retry budget spent; not retrying");
                return Err(bad_gateway());
            }
        }
        tracing::debug!(replica = %upstream.name, next = %n, error = %error_chain(&e), "retrying on the next server");
        metrics.retries.fetch_add(1, Ordering::Relaxed);
        target = n;
        attempt += 1;
        outcome.retries = attempt as u32;
        body = ProxyBody::again(slot_handle);
    }
}

/// Reads and discards a rejected upload for a while (bounded in bytes and time), like NGINX's
/// lingering close, so a client still sending its body reads our 413 instead of a broken pipe.
fn linger(body: Incoming) {
    const MAX_BYTES: usize = 64 * 1024 * 1024;
    const MAX_TIME: Duration = Duration::from_secs(5);
    tokio::spawn(async move {
        let mut limited = Limited::new(body, MAX_BYTES);
        let _ = tokio::time::timeout(MAX_TIME, async {
            while let Some(Ok(_)) = limited.frame().await {}
        })
        .await;
    });
}
