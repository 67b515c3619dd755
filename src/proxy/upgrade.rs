//! A request that asked to switch protocols, and the tunnel a replica's `101` opens.
//!
//! Owns: [`Asked`] (the client's offer to be handed over, its protocol, and the tunnel's place
//! under `[tunnels] max`, taken before any replica is asked) and [`open`]: the registration of
//! the tunnel with its key and replica, the task that waits for the client's side (after the
//! `101` is written), splices the two and records the end (per-replica failure for a replica
//! that broke, the counters, the access log's line), holding the request's places in the
//! budgets and at the replica until then.
//! Must not touch: routing (the caller passes the route), how bytes move ([`crate::tunnel`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use tokio::sync::oneshot;

use crate::access_log::{Termination, TunnelEnd, TunnelLog};
use crate::admission::RequestPlace;
use crate::config::AccessTarget;
use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, Upstream};
use crate::tunnel::splice::{self, End, Ends};
use crate::tunnel::{self, Close, Placed, Tunnels};
use crate::wire::body::Body;
use crate::wire::body::ReplicaBody;
use crate::wire::server::upgrade::OnUpgrade;

/// A request that asked to switch protocols, with its place under `[tunnels] max`.
pub struct Asked {
    on_upgrade: OnUpgrade,
    place: tunnel::Place,
    /// The protocols it asked for (its `Upgrade`), forwarded to the replica.
    pub protocols: HeaderValue,
}

/// The tunnels cap to use: `[tunnels] max`, or half of `proxy.max_requests` when it is 0.
pub fn max_tunnels(snap: &Snapshot, max_requests: u64) -> u64 {
    match snap.config.tunnels.max {
        0 => (max_requests / 2).max(1),
        n => u64::from(n),
    }
}

impl Asked {
    /// The offer in `parts` (taken out of its extensions), with a place for its tunnel; `None`
    /// for a request that did not ask; [`tunnel::Full`] past the cap.
    pub fn take(
        parts: &mut http::request::Parts,
        tunnels: &Arc<Tunnels>,
        max: u64,
    ) -> Option<Result<Asked, tunnel::Full>> {
        let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
        let protocols = parts.headers.get(header::UPGRADE)?.clone();
        Some(tunnels.reserve(max).map(|place| Asked {
            on_upgrade,
            place,
            protocols,
        }))
    }
}

/// Where a connection to be registered (a tunnel, or a gRPC call's stream) stands.
pub struct At<'a> {
    pub snap: &'a Snapshot,
    pub replica: &'a Upstream,
    pub key: u64,
    pub slot: u32,
}

impl At<'_> {
    /// Where a connection opened now stands on the ring, for the registry.
    pub fn placed(&self) -> Placed {
        Placed {
            key: self.key,
            replica: self.replica.id,
            incarnation: self.replica.incarnation,
            home: self
                .snap
                .home(self.slot, self.key, tokio::time::Instant::now()),
        }
    }
}

/// Opens the tunnel behind the replica's `101` `resp` and returns the `101` for the client
/// (the replica's head, no body); `None` if the response carries no switched connection.
pub fn open(
    resp: Response<ReplicaBody>,
    asked: Asked,
    request: RequestPlace,
    at: At<'_>,
    tunnels: &Arc<Tunnels>,
    metrics: &Arc<Metrics>,
) -> Option<Response<Body>> {
    let (mut parts, body) = resp.into_parts();
    let (mut conn, in_flight, _) = body.into_switched()?;
    let websocket = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let (registration, close) = tunnels.register(at.placed(), tunnel::Kind::Tunnel);
    let stats = Arc::clone(&at.replica.stats);
    stats.tunnels.fetch_add(1, Ordering::Relaxed);
    let (idle, send_timeout) = (
        at.snap.config.tunnels.idle_timeout,
        at.snap.config.proxy.send_timeout,
    );
    // The access log's line for the tunnel waits for its end; with the log off nobody waits,
    // and an idle tunnel keeps no channel for it.
    let (report, log) = match at.snap.config.log.access {
        AccessTarget::Off => (None, None),
        _ => {
            let (report, log) = oneshot::channel();
            (Some(report), Some(log))
        }
    };
    let (tunnels, metrics) = (Arc::clone(tunnels), Arc::clone(metrics));
    let Asked {
        on_upgrade, place, ..
    } = asked;
    let replica_read = std::mem::take(&mut conn.buf);
    // A replica that takes no byte for proxy.send_timeout is cut like a client that does not.
    let mut replica = crate::stall::SendTimeout::new(conn, send_timeout, metrics);
    // What the task keeps while the tunnel is open is its future: the replica's connection is
    // made here, moved in once and lent to the splice, and what is built after a wait is built
    // in the arm that starts the splice, so that nothing has two places in it.
    tokio::spawn(async move {
        // Everything the tunnel holds lives until it ends: its places, its count at the
        // replica, its registration (moved into the task by being named here, and kept where
        // they were moved: a tuple of them would be a second place).
        let _held = (&place, &request, &in_flight, &registration);
        let spliced = match on_upgrade.upgraded().await {
            Some(client) => splice::splice(
                Ends {
                    client: client.io,
                    client_read: client.read,
                    replica: &mut replica,
                    replica_read,
                    websocket,
                },
                close,
                idle,
            ),
            None => {
                stats.tunnels.fetch_sub(1, Ordering::Relaxed);
                return; // the client went before its 101 was written
            }
        }
        .await;
        stats.tunnels.fetch_sub(1, Ordering::Relaxed);
        let c = &tunnels.counters;
        c.bytes_up.fetch_add(spliced.up, Ordering::Relaxed);
        c.bytes_down.fetch_add(spliced.down, Ordering::Relaxed);
        let termination = match &spliced.end {
            End::Ended => Termination::TunnelEnded,
            End::ClientError(_) => Termination::TunnelClientError,
            End::ReplicaError(e) => {
                // A failure like any: counted against the replica (as a broken body is).
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "a tunnel's replica connection broke");
                Termination::TunnelReplicaError
            }
            End::Idle => {
                c.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                Termination::TunnelIdleTimeout
            }
            End::Closed(Close::Rehome(_)) => Termination::TunnelRehomed,
            End::Closed(Close::Shutdown) => Termination::TunnelShutdown,
        };
        if let Some(report) = report {
            let _ = report.send(TunnelEnd {
                up: spliced.up,
                down: spliced.down,
                termination,
            });
        }
    });
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    if let Some(log) = log {
        parts.extensions.insert(TunnelLog::new(log));
    }
    Some(Response::from_parts(parts, Body::full(bytes::Bytes::new())))
}
