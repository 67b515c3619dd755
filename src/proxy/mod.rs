//! The request path: one client request to one replica, in three steps.
//!
//! Owns: [`forward`]: the request's checks and its place in the budgets ([`admit`], with its
//! body started), then [`route`] (key → slot → owner, or the server bounded loads or slow start
//! choose), then [`attempt`]s (one replica each, returning a typed [`failure::Failure`] that
//! says whose it was: the replica's, the client's or the gateway's), each followed by the
//! [`retry`] decision (pure, on that failure) and the next distinct server clockwise, within
//! the retry budget; the last failure becomes the client's answer. The body is held in
//! [`body`] so an attempt that did not read it leaves it for the next. Before all of it, a
//! request that finds N scaled to zero is held (`hold`) until a snapshot with a replica is
//! published, and goes on with that one.
//! Must not touch: shared mutable state. It loads one [`Snapshot`] and uses it to the end; it
//! takes no lock (the only mutex is the per-request body slot, which no other request sees); it
//! reports failed connects (and a request held at zero) to the controller with a non-blocking
//! hint.

// The request path is read more than it is written: no function in it longer than 100 lines
// (clippy's default threshold), checked by `make lint`.
#![warn(clippy::too_many_lines)]

mod attempt;
pub mod body;
pub mod failure;
mod hold;
pub mod retry;
pub mod route;
pub mod stream;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};

use crate::access_log::{Outcome, Termination};
use crate::admission::{Admitted, Refusal, RequestPlace};
use crate::control::ControllerHandle;
use crate::error::error_chain;
use crate::grpc::TimeLimit;
use crate::metrics::Metrics;
use crate::rescue::GatewayError;
use crate::ring::ServerId;
use crate::snapshot::Snapshot;
use crate::tunnel::Tunnels;
use crate::wire::body::{Body, ReplicaBody, RequestBody};
use attempt::Attempt;
use body::ProxyBody;
use failure::Failure;

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The gateway-wide parts a request uses besides its snapshot.
pub struct Gateway<'a> {
    pub metrics: &'a Arc<Metrics>,
    pub controller: &'a ControllerHandle,
    pub tunnels: &'a Arc<Tunnels>,
    /// The serving thread's own state: its snapshot cache (a request held while N is 0 sees
    /// the next one through it), its connections to the replicas, its retry budget.
    pub worker: &'a crate::worker::Worker,
}

/// Forwards one request and returns the replica's response, or the gateway's failure response.
/// `outcome` is told the slot, the replica, the retries and why the gateway answered itself,
/// for the access log.
pub async fn forward(
    snap: &Snapshot,
    gateway: &Gateway<'_>,
    req: Request<RequestBody>,
    client: &Arc<Admitted>,
    client_addr: SocketAddr,
    outcome: &mut Outcome,
) -> Response<Body> {
    let _active = retry::Active::enter(&gateway.worker.retry);
    let metrics = gateway.metrics;
    let grpc = crate::grpc::is_grpc(req.headers());
    // Scaled to zero: held until a replica serves (or refused past the hold's bounds). A
    // held request is in flight like any other: it takes its place in the request budgets
    // before it is held, and keeps it to its response's end.
    let (woken, place) = match snap.asleep {
        true => {
            let cfg = &snap.config;
            let budgets = client.budgets(&cfg.proxy, cfg.replicas.max_replicas);
            let place = match take_place(client, &budgets) {
                Ok(place) => place,
                Err(e) => return fail(e, grpc, metrics, outcome),
            };
            match hold::wait(snap, gateway, outcome).await {
                Ok(now) => (Some(now), Some(place)),
                Err(e) => return fail(e, grpc, metrics, outcome),
            }
        }
        false => (None, None),
    };
    let snap: &Snapshot = woken.as_ref().map_or(snap, |now| &***now);
    let call = Call { client_addr, grpc };
    match try_forward(snap, gateway, req, (client, place), call, outcome).await {
        Ok(resp) => resp,
        Err(e) => fail(e, grpc, metrics, outcome),
    }
}

/// The gateway's own answer for `e`: counted, told to the access log, as JSON or (for a gRPC
/// call) as a gRPC status.
fn fail(e: GatewayError, grpc: bool, metrics: &Metrics, outcome: &mut Outcome) -> Response<Body> {
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
    if grpc {
        // A gRPC client reads a status, not an HTTP error.
        return e.into_grpc_response();
    }
    e.into_response()
}

/// What the request path knows of a request besides its head: who sent it, and whether it is a
/// gRPC call (decided once, from its `content-type`, for every step that answers it its way).
#[derive(Clone, Copy)]
struct Call {
    client_addr: SocketAddr,
    grpc: bool,
}

async fn try_forward(
    snap: &Snapshot,
    gateway: &Gateway<'_>,
    req: Request<RequestBody>,
    (client, place): (&Arc<Admitted>, Option<RequestPlace>),
    Call {
        client_addr,
        grpc: grpc_call,
    }: Call,
    outcome: &mut Outcome,
) -> Result<Response<Body>, GatewayError> {
    let (metrics, controller) = (gateway.metrics, gateway.controller);
    let cfg = &snap.config;
    let (mut parts, body) = req.into_parts();
    let budgets = client.budgets(&cfg.proxy, cfg.replicas.max_replicas);
    if grpc_call && !cfg.proxy.upstream_protocol.uses_h2(parts.version) {
        // Over HTTP/1.1 the call's trailers (its status) would be lost: refused, not broken.
        linger(body);
        return Err(GatewayError::GrpcNeedsHttp2);
    }
    // A gRPC call's own deadline bounds it at the gateway too: its body's start, its response
    // head, and the whole call (ended with DEADLINE_EXCEEDED); what runs out is named.
    let call_timeout = grpc_call
        .then(|| crate::grpc::timeout(&parts.headers))
        .flatten();
    let call_deadline = call_timeout.map(|t| (tokio::time::Instant::now() + t, t));
    let limit = TimeLimit::of(cfg.proxy.request_timeout, call_timeout);
    let (place, mut body, request_timeout) =
        admit(cfg, &parts, body, (client, place), &budgets, limit).await?;
    let tunnels = upgrade::max_tunnels(snap, budgets.max_requests);
    let mut asked = match upgrade::Asked::take(&mut parts, gateway.tunnels, tunnels) {
        Some(Err(full)) => return Err(GatewayError::TunnelsFull { limit: full.0 }),
        Some(Ok(asked)) => Some(asked),
        None => None,
    };
    let protocols = asked.as_ref().map(|a| a.protocols.clone());
    let route = route::route(snap, metrics, &parts, client_addr.ip())?;
    outcome.slot = Some(route.slot);

    let attempt = Attempt {
        snap,
        metrics,
        controller,
        client,
        budgets: &budgets,
        parts: &parts,
        client_addr,
        framing: crate::wire::client::framing_of(&parts.method, &body),
        request_timeout,
        upgrade: protocols.as_ref(),
        grpc: grpc_call,
        pools: &gateway.worker.upstream,
    };
    let (mut server, mut reserved) = (route.first, route.reserved);
    let mut retries = Retries::new(route.first);
    loop {
        let replica = snap.upstream(server).ok_or(GatewayError::NoReplica)?;
        outcome.replica = Some(replica.id);
        let slot = body.slot();
        let failure = match attempt
            .at(replica, reserved.take(), &mut body, outcome)
            .await
        {
            Ok(resp) => {
                // Answered: the body will not be sent again, so none of it is held from now on.
                body.release();
                let at = upgrade::At {
                    snap,
                    replica,
                    key: route.key.value,
                    slot: route.slot,
                };
                let switched = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                let mut resp = match asked.take().filter(|_| switched) {
                    Some(asked) => tunnel(resp, asked, place, at, gateway)?,
                    None => {
                        let mut resp = resp;
                        resp.body_mut().hold(place);
                        if let Some((deadline, timeout)) = call_deadline {
                            resp.body_mut().end_by(deadline, timeout);
                        }
                        let resp = resp.map(Body::replica);
                        match grpc_call && cfg.tunnels.rehome {
                            true => stream::registered(resp, &at, gateway.tunnels),
                            false => resp,
                        }
                    }
                };
                give_key(snap, &parts, route.key, resp.headers_mut());
                return Ok(resp);
            }
            Err(failure) => failure,
        };
        let Some(next) = retries.next(
            &failure,
            snap,
            route.slot,
            &parts.method,
            metrics,
            &gateway.worker.retry,
        ) else {
            return Err(failure.into_error(&replica.name, limit, &cfg.proxy));
        };
        tracing::debug!(replica = %replica.name, next = %next, error = %failure.detail, "retrying on the next server");
        outcome.retries = retries.count();
        server = next;
        body = ProxyBody::again(slot);
    }
}

/// The tunnel behind a replica's `101` to an upgrade, and the `101` for the client.
fn tunnel(
    resp: Response<ReplicaBody>,
    asked: upgrade::Asked,
    place: RequestPlace,
    at: upgrade::At<'_>,
    gateway: &Gateway<'_>,
) -> Result<Response<Body>, GatewayError> {
    let replica = at.replica.name.clone();
    let door = gateway.worker.resting_tunnels.as_ref();
    upgrade::open(
        resp,
        asked,
        place,
        at,
        (gateway.tunnels, gateway.metrics),
        door,
    )
    .ok_or_else(|| GatewayError::BadGateway {
        replica,
        detail: "answered 101 without a connection to switch".into(),
    })
}

/// A place in the request budgets (`proxy.max_requests`, `proxy.max_requests_per_ip`) for one
/// request, or the refusal (HTTP/2: `REFUSED_STREAM`).
fn take_place(
    client: &Arc<Admitted>,
    budgets: &crate::admission::Budgets,
) -> Result<RequestPlace, GatewayError> {
    client
        .request(budgets)
        .map_err(|refusal| GatewayError::OverBudget {
            refusal,
            limit: match refusal {
                Refusal::RequestsPerIp => budgets.max_requests_per_ip,
                _ => budgets.max_requests,
            },
        })
}

/// The request's checks, its place in the request budgets (`place`, when it took one before it
/// was held), and its body started (within `limit`): a request that fails any of these never
/// reaches a replica. Returns the place (held until the response ends), the body (holding what
/// an HTTP/2 attempt may have to send again, [`body::RESEND_LIMIT`]), and what is left of
/// `limit`.
async fn admit(
    cfg: &crate::config::Config,
    parts: &http::request::Parts,
    body: RequestBody,
    (client, place): (&Arc<Admitted>, Option<RequestPlace>),
    budgets: &crate::admission::Budgets,
    limit: TimeLimit,
) -> Result<(RequestPlace, ProxyBody, Duration), GatewayError> {
    check_request(&parts.method, parts.uri.path(), &parts.headers)?;
    let max_body = cfg.proxy.max_body;
    if content_length(&parts.headers).is_some_and(|n| n > max_body) {
        linger(body);
        return Err(GatewayError::PayloadTooLarge { limit: max_body });
    }
    let place = match place {
        Some(place) => place,
        None => take_place(client, budgets)?,
    };
    // Only a stream over HTTP/2 can be refused unprocessed after its body started.
    let keep = match cfg.proxy.upstream_protocol.uses_h2(parts.version) {
        true => body::RESEND_LIMIT,
        false => 0,
    };
    let mut body = ProxyBody::new(body, max_body, keep);
    if matches!(body, ProxyBody::Empty) {
        // A body that ended with its head (a GET's) has nothing to wait for: no timer, and
        // none of the three clock reads below.
        return Ok((place, body, limit.duration()));
    }
    // No replica connection (nor a place at a replica) for a body that has not started.
    let started = Instant::now();
    body_started(&mut body, limit, max_body).await?;
    let left = limit.duration().saturating_sub(started.elapsed());
    Ok((place, body, left))
}

/// With `hashing.set_cookie`, gives a client the key the gateway made up for it, so its next
/// requests (and its WebSocket) land where this one did.
fn give_key(
    snap: &Snapshot,
    parts: &http::request::Parts,
    key: crate::routing::RequestKey,
    headers: &mut HeaderMap,
) {
    let h = &snap.config.hashing;
    if !key.give || h.set_cookie.is_empty() {
        return;
    }
    let secure = if parts.extensions.get::<crate::tls::Https>().is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        h.set_cookie,
        key.value,
        h.cookie_max_age.as_secs()
    );
    if let Ok(v) = http::HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, v);
    }
}

/// The retries of one request: where the next attempt goes, if anywhere.
struct Retries {
    /// The servers tried, in order (kept from the first retry on: no allocation without one).
    tried: Vec<ServerId>,
    first: ServerId,
    /// This request's place in the retry budget, once it retried after a budgeted failure.
    budgeted: Option<retry::Retrying>,
}

impl Retries {
    fn new(first: ServerId) -> Retries {
        Retries {
            tried: Vec::new(),
            first,
            budgeted: None,
        }
    }

    /// Retries made so far.
    fn count(&self) -> u32 {
        u32::try_from(self.tried.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// The next server after `failure`: [`retry::may_retry`] says whether the failure may be
    /// retried, `proxy.retries` how often, the ring which server is next clockwise (one not
    /// tried yet), and the retry budget whether one more fits.
    fn next(
        &mut self,
        failure: &Failure,
        snap: &Snapshot,
        slot: u32,
        method: &http::Method,
        metrics: &Metrics,
        budget: &Arc<retry::Budget>,
    ) -> Option<ServerId> {
        let p = &snap.config.proxy;
        if !retry::may_retry(failure, method, &p.retry_on) || self.count() >= p.retries {
            return None;
        }
        if self.tried.is_empty() {
            self.tried.push(self.first);
        }
        let next = retry::next_server(snap.ring.successors(slot), &self.tried)?;
        if self.budgeted.is_none() && retry::needs_budget(failure) {
            self.budgeted =
                retry::Retrying::try_start(budget, p.retry_budget_percent, p.retry_budget_min);
            if self.budgeted.is_none() {
                metrics.retries_over_budget.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("retry budget spent; not retrying");
                return None;
            }
        }
        metrics.retries.fetch_add(1, Ordering::Relaxed);
        self.tried.push(next);
        Some(next)
    }
}

/// Refuses what a gateway must not forward: `CONNECT` tunnels, and more than one `Host`
/// (RFC 9112 §3.2).
fn check_request(
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), GatewayError> {
    if method == http::Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_owned(),
            allowed: crate::wire::headers::ALLOWED_METHODS,
        });
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err(GatewayError::BadHost);
    }
    Ok(())
}

/// Waits (up to `limit`) until the client's body has started ([`ProxyBody::started`]); a
/// body that does not is the client's failure.
async fn body_started(
    body: &mut ProxyBody,
    limit: TimeLimit,
    max_body: u64,
) -> Result<(), GatewayError> {
    match tokio::time::timeout(limit.duration(), body.started()).await {
        Ok(Ok(())) => Ok(()),
        Err(_) => Err(GatewayError::ClientBodyTimeout { limit }),
        Ok(Err(e)) if body::past_limit(&e) => {
            Err(GatewayError::PayloadTooLarge { limit: max_body })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_two_hosts_are_refused() {
        let mut h = http::HeaderMap::new();
        assert!(check_request(&http::Method::GET, "/", &h).is_ok());
        let e = check_request(&http::Method::CONNECT, "/", &h).expect_err("no tunnels");
        assert_eq!(e.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        h.append(header::HOST, http::HeaderValue::from_static("a"));
        assert!(check_request(&http::Method::GET, "/", &h).is_ok());
        h.append(header::HOST, http::HeaderValue::from_static("b"));
        let e = check_request(&http::Method::GET, "/", &h).expect_err("two hosts");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }
}
