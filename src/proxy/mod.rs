//! The request path: one client request to one replica.
//!
//! Owns: key → slot → replica, the forwarded request (normalised by [`headers`], body streamed
//! with `proxy.max_body` enforced by [`body`], sent by our own HTTP/1.1 client in
//! [`crate::wire::client`]), retries on the next distinct server clockwise within the budget of [`retry`],
//! and the streamed response. Failures are told apart here by
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

use crate::wire::body::RequestBody;
use crate::wire::client as upstream;
use http::header::{self, HeaderMap};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};

use crate::access_log::{Outcome, Termination};
use crate::admission::{Admitted, Refusal};
use crate::balance;
use crate::control::ControllerHandle;
use crate::error::{error_chain, local_resource_cause, GatewayError};
use crate::metrics::Metrics;
use crate::ring::ServerId;
use crate::snapshot::Snapshot;
use crate::wire::body::Body;
use body::{InFlight, ProxyBody};
use retry::Failure;

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
    snap: &Snapshot,
    metrics: &Metrics,
    controller: &ControllerHandle,
    req: Request<RequestBody>,
    client: &Arc<Admitted>,
    client_addr: SocketAddr,
    outcome: &mut Outcome,
) -> Response<Body> {
    let _active = retry::Active::enter();
    match try_forward(snap, metrics, controller, req, client, client_addr, outcome).await {
        Ok(resp) => resp,
        Err(e) => {
            outcome.termination = Some(Termination::of(&e, outcome.connect_failed));
            metrics.local_errors.fetch_add(1, Ordering::Relaxed);
            let counter = match e {
                GatewayError::LocalResource { .. } => Some(&metrics.local_resource_errors),
                GatewayError::ClientBody { .. } | GatewayError::ClientBodyTimeout { .. } => {
                    Some(&metrics.client_body_errors)
                }
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn try_forward(
    snap: &Snapshot,
    metrics: &Metrics,
    controller: &ControllerHandle,
    req: Request<RequestBody>,
    client: &Arc<Admitted>,
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
    let budgets = client.budgets(&cfg.proxy, cfg.replicas.max_replicas);
    let mut place = Some(
        client
            .request(&budgets)
            .map_err(|refusal| GatewayError::OverBudget {
                refusal,
                limit: match refusal {
                    Refusal::RequestsPerIp => budgets.max_requests_per_ip,
                    _ => budgets.max_requests,
                },
            })?,
    );

    // No replica connection (nor a place at a replica) for a body that has not started.
    let started = Instant::now();
    let mut body = ProxyBody::new(body, limit);
    body_started(&mut body, cfg.proxy.request_timeout, limit).await?;
    let request_timeout = cfg.proxy.request_timeout.saturating_sub(started.elapsed());

    let router = snap.router();
    let key = router.key(&parts, client_addr.ip());
    let slot = router.request_slot(key);
    outcome.slot = Some(slot);
    let owner = snap.ring.owner(slot).ok_or(GatewayError::NoReplica)?;
    let (first, mut reserved) = balanced(snap, metrics, slot, key, owner);

    let framing = upstream::framing_of(&parts.method, &body);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = parts.uri.authority().map(|a| a.as_str());
    let proto = match parts.extensions.get::<crate::tls::Https>() {
        Some(_) => "https",
        None => "http",
    };
    // Serialised once; a retry sends the same bytes to the next server.
    let head = upstream::head::request_head(
        &parts.method,
        target,
        &parts.headers,
        client_addr,
        authority,
        proto,
        framing,
    );
    let method = &parts.method;
    let attempts = 1 + cfg.proxy.retries as usize;
    let mut retrying: Option<retry::Retrying> = None;
    let mut server = first;
    let mut tried = Tried::default();
    let mut attempt = 0;
    loop {
        tried.push(server);
        let replica = snap.upstream(server).ok_or(GatewayError::NoReplica)?;
        outcome.replica = Some(replica.id);
        let short_of_descriptors = client
            .admission()
            .short_of_descriptors(cfg.replicas.max_replicas);
        let req = upstream::Request {
            addr: replica.addr,
            connect_timeout: cfg.proxy.connect_timeout,
            read_timeout: cfg.proxy.read_timeout,
            method,
            head: &head,
            framing,
            // Idle replica connections are descriptors too: none kept while they are short.
            keep_idle: !short_of_descriptors,
        };
        let slot_handle = body.slot();
        let counted = match reserved.take() {
            Some(counted) => counted,
            None => {
                let cap = budgets.max_requests_per_replica;
                match InFlight::admit(&replica.stats, cap, cfg.proxy.queue_timeout).await {
                    Ok(counted) => counted,
                    Err(cause) => {
                        metrics
                            .requests_refused_replica
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(GatewayError::ReplicaBusy {
                            replica: replica.name.clone(),
                            cap,
                            cause,
                        });
                    }
                }
            }
        };
        let started = Instant::now();
        // Built in place: a future bound to a variable first and then moved into the timeout
        // is stored twice in this function's future (measured: 4,880 bytes, 2,752 with this and
        // the connect boxed), and all of it is copied as the request's future is built.
        let sent = tokio::time::timeout(request_timeout, upstream::send(&req, &mut body, counted));
        let e = match sent.await {
            Ok(Ok(mut resp)) => {
                if let Some(place) = place.take() {
                    resp.body_mut().hold(place);
                }
                let took = started.elapsed();
                outcome.upstream = Some(took);
                replica
                    .stats
                    .latency
                    .observe_with(&metrics.upstream_latency, took);
                let in_a_row = replica.stats.record_response(resp.status().as_u16());
                let threshold = u64::from(cfg.health.eject_after_5xx);
                if threshold > 0 && in_a_row == threshold {
                    controller.outlier(replica.id, replica.incarnation, in_a_row);
                }
                return Ok(resp.map(Body::upstream));
            }
            Ok(Err(e)) => e,
            // Still waiting for the client's body: the client's time ran out, not the replica's.
            Err(_)
                if slot_handle
                    .as_ref()
                    .is_some_and(|(s, _)| s.waiting_on_client()) =>
            {
                return Err(GatewayError::ClientBodyTimeout {
                    timeout: cfg.proxy.request_timeout,
                });
            }
            Err(_) => {
                replica.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(GatewayError::GatewayTimeout {
                    replica: replica.name.clone(),
                    timeout: cfg.proxy.request_timeout,
                });
            }
        };
        // Whose failure is it? The client's and the gateway's own never count against the replica.
        if let Some((slot, _)) = &slot_handle {
            if slot.over_limit() {
                return Err(GatewayError::PayloadTooLarge { limit });
            }
            if slot.client_error() || matches!(e, upstream::SendError::RequestBody(_)) {
                return Err(GatewayError::ClientBody {
                    detail: error_chain(&e),
                });
            }
        }
        if let Some(detail) = local_resource_cause(&e) {
            client.admission().note_exhausted();
            tracing::debug!(replica = %replica.name, %detail, "local resource error; not the replica's fault");
            return Err(GatewayError::LocalResource { detail });
        }
        if e.is_connect_timeout() && short_of_descriptors {
            // The gateway's own shortage may be why the connection was not made in time.
            metrics
                .connect_timeouts_inconclusive
                .fetch_add(1, Ordering::Relaxed);
            return Err(GatewayError::LocalResource {
                detail: format!(
                    "{} while the gateway was short of file descriptors",
                    error_chain(&e)
                ),
            });
        }
        replica.stats.failures.fetch_add(1, Ordering::Relaxed);
        outcome.connect_failed = e.is_connect();
        let failure = if e.is_connect() {
            controller.passive_failure(replica.id, replica.incarnation, error_chain(&e));
            if e.is_refused() {
                Failure::Refused
            } else {
                Failure::Connect
            }
        } else {
            Failure::Reset
        };
        // A streamed body is available again only if no attempt has read from it.
        let body_unsent = slot_handle
            .as_ref()
            .is_none_or(|(slot, _)| slot.is_untouched());
        let next = retry::may_retry(failure, method, body_unsent, &cfg.proxy.retry_on)
            .then(|| snap.ring.successors(slot).find(|s| !tried.contains(*s)))
            .flatten()
            .filter(|_| attempt + 1 < attempts);
        let bad_gateway = || GatewayError::BadGateway {
            replica: replica.name.clone(),
            detail: error_chain(&e),
        };
        let Some(n) = next else {
            return Err(bad_gateway());
        };
        if retrying.is_none() && retry::needs_budget(failure) {
            let p = &cfg.proxy;
            retrying = retry::Retrying::try_start(p.retry_budget_percent, p.retry_budget_min);
            if retrying.is_none() {
                metrics.retries_over_budget.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(replica = %replica.name, "retry budget spent; not retrying");
                return Err(bad_gateway());
            }
        }
        tracing::debug!(replica = %replica.name, next = %n, error = %error_chain(&e), "retrying on the next server");
        metrics.retries.fetch_add(1, Ordering::Relaxed);
        server = n;
        attempt += 1;
        outcome.retries = attempt as u32;
        body = ProxyBody::again(slot_handle);
    }
}

/// The servers a request was sent to, in order (at most 1 + `proxy.retries` ≤ 11).
#[derive(Default)]
struct Tried {
    ids: [Option<ServerId>; 11],
    len: usize,
}

impl Tried {
    fn push(&mut self, id: ServerId) {
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = Some(id);
            self.len += 1;
        }
    }

    fn contains(&self, id: ServerId) -> bool {
        self.ids[..self.len].contains(&Some(id))
    }
}

/// The first server for key `key` at `slot`: its owner, unless bounded loads or a replica's
/// slow start say otherwise (`crate::balance`). Off by default, and then only the owner.
/// Under bounded loads the place under the bound is taken in the same step as the choice
/// ([`InFlight::reserve`]), so concurrent requests cannot push a server past it; the count
/// comes back with the server.
fn balanced(
    snap: &Snapshot,
    metrics: &Metrics,
    slot: u32,
    key: u64,
    owner: ServerId,
) -> (ServerId, Option<InFlight>) {
    // A choice lost to a concurrent request is made again on the new loads, a few times.
    const ROUNDS: usize = 4;
    let factor = snap.config.ring.balance_factor;
    if factor == 0.0 && snap.ramps_until.is_none() {
        return (owner, None); // the usual case: not even the clock is read
    }
    let now = tokio::time::Instant::now();
    let ramping = snap.ramps_until.is_some_and(|until| now < until);
    if factor == 0.0 && !ramping {
        return (owner, None);
    }
    let mut round = 0;
    loop {
        round += 1;
        let bound = (factor > 0.0).then(|| {
            let in_flight: u64 = snap
                .upstreams
                .iter()
                .flatten()
                .map(|u| u.stats.load())
                .sum();
            balance::load_bound(factor, in_flight, snap.ring.servers())
        });
        let candidates = snap.ring.successors(slot).filter_map(|id| {
            let u = snap.upstream(id)?;
            Some(balance::Candidate {
                id,
                load: u.stats.load(),
                admits: u
                    .ramp
                    .is_none_or(|r| balance::ramp_admits(key, r.progress(now))),
            })
        });
        let Some((id, why)) = balance::choose(candidates, bound) else {
            return (owner, None);
        };
        let reserved = match (bound, snap.upstream(id)) {
            (Some(b), Some(u)) => match InFlight::reserve(&u.stats, b) {
                Some(counted) => Some(counted),
                None if round < ROUNDS => continue,
                // Every server is at the bound: the choice stands, over it.
                None => None,
            },
            _ => None,
        };
        if id != owner {
            let counter = match why {
                balance::Choice::Ramping => &metrics.diverted_slow_start,
                _ => &metrics.diverted_load,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        return (id, reserved);
    }
}

/// Waits (up to `timeout`) until the client's body has started ([`ProxyBody::started`]); a
/// body that does not is the client's failure.
async fn body_started(
    body: &mut ProxyBody,
    timeout: Duration,
    limit: u64,
) -> Result<(), GatewayError> {
    let slot = body.slot();
    match tokio::time::timeout(timeout, body.started()).await {
        Ok(Ok(())) => Ok(()),
        Err(_) => Err(GatewayError::ClientBodyTimeout { timeout }),
        Ok(Err(_)) if slot.is_some_and(|(s, _)| s.over_limit()) => {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Ok(Err(e)) => Err(GatewayError::ClientBody {
            detail: error_chain(&*e),
        }),
    }
}

/// Reads and discards a rejected upload for a while (bounded in bytes and time), like NGINX's
/// lingering close, so a client still sending its body reads our 413 instead of a broken pipe.
fn linger(body: RequestBody) {
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
