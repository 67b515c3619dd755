//! A request that asked to switch protocols, and the tunnel a replica's `101` opens.
//!
//! Owns: [`Asked`] (the client's offer to be handed over, its protocol, and the tunnel's place
//! under `[tunnels] max`, taken before any replica is asked) and [`open`]: the registration of
//! the tunnel with its key and replica, the task that waits for the client's side (after the
//! `101` is written), splices the two and records the end (per-replica failure for a replica
//! that broke, the counters, the access log's line), holding the request's places in the
//! budgets and at the replica until then; and a tunnel's rests ([`RestingTunnel`]): one that
//! went quiet is handed to its serving thread's table without its task, and spliced on by a
//! new task when it wakes.
//! Must not touch: routing (the caller passes the route), how bytes move ([`crate::tunnel`]).

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::access_log::{Termination, TunnelEnd, TunnelLog};
use crate::admission::RequestPlace;
use crate::config::AccessTarget;
use crate::metrics::Metrics;
use crate::parking::Held;
use crate::snapshot::{InFlight, ReplicaStats, Snapshot, Upstream};
use crate::stall::SendTimeout;
use crate::tunnel::resting::{Door, Rest};
use crate::tunnel::splice::{self, End, Splice, Spliced, Splicing};
use crate::tunnel::{self, Close, Placed, Registration, RestingCount, Tunnels};
use crate::upstream::pool::{Conn, SetAside};
use crate::wire::body::Body;
use crate::wire::body::ReplicaBody;
use crate::wire::server::io::Transport;
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

/// What an open tunnel holds until it ends (its places in the budgets and at the replica,
/// its registration), what it needs to go on after a rest, and what it records at its end.
struct Tunnel {
    _place: tunnel::Place,
    request: RequestPlace,
    _in_flight: InFlight,
    /// Its entry in the registry, where it hears its close, and the registry (its counters).
    registration: Registration,
    stats: Arc<ReplicaStats>,
    /// The access log's line waits for this (`None`: the log is off).
    report: Option<oneshot::Sender<TunnelEnd>>,
    metrics: Arc<Metrics>,
    idle: Duration,
    send_timeout: Duration,
    /// How it rests, while it can (plain TCP both ways, and a table on its thread).
    rests: Option<Rests>,
}

/// When a tunnel rests, and where.
struct Rests {
    /// `[tunnels] rest_after`.
    after: Duration,
    /// Its serving thread's table.
    door: Door<RestingTunnel>,
}

/// A tunnel resting in its serving thread's table ([`crate::tunnel::resting`]): its sockets are
/// in the table's record, the rest is here.
pub struct RestingTunnel {
    tunnel: Tunnel,
    splice: splice::Resting,
    replica: SetAside,
    _counted: RestingCount,
}

impl Rest for RestingTunnel {
    fn registration(&mut self) -> &mut Registration {
        &mut self.tunnel.registration
    }

    fn wake(held: Held<Self>) {
        let RestingTunnel {
            tunnel,
            splice,
            replica,
            ..
        } = held.rest;
        let legs = held
            .also
            .ok_or_else(|| io::Error::other("a tunnel rested without its replica's socket"))
            .and_then(|also| {
                Ok((
                    TcpStream::from_std(held.stream)?,
                    TcpStream::from_std(also)?,
                ))
            });
        let (client, also) = match legs {
            Ok(legs) => legs,
            Err(e) => {
                let end = End::GatewayError(format!("could not be served again after a rest: {e}"));
                return tunnel.finish(splice.ended(end));
            }
        };
        let client: Transport = Box::new(tunnel.bounded(client));
        let replica = tunnel.bounded(replica.resume(also));
        tokio::spawn(tunnel.serve(Splice::resumed(splice), client, replica));
    }
}

impl Tunnel {
    fn bounded<S>(&self, stream: S) -> SendTimeout<S> {
        SendTimeout::new(stream, self.send_timeout, Arc::clone(&self.metrics))
    }

    /// Splices the tunnel (again, after a rest) until it ends or rests. What its task keeps
    /// while the tunnel is open is this future, so each thing is in it once: moved in whole,
    /// lent to the splice, and taken apart only after it. (An `async fn` would keep its
    /// arguments twice: as they were passed, and in the bindings its body moves them into.)
    fn serve(
        self,
        state: Splice,
        client: Transport,
        replica: SendTimeout<Conn>,
    ) -> impl Future<Output = ()> + Send {
        let mut parts = (self, state, client, replica);
        async move {
            let (tunnel, state, client, replica) = &mut parts;
            let (idle, rest_after) = (tunnel.idle, tunnel.rests.as_ref().map(|r| r.after));
            let close = &mut tunnel.registration;
            let splicing = splice::splice(state, client, replica, close, idle, rest_after).await;
            let (tunnel, _, client, replica) = parts;
            tunnel.after(splicing, client, replica);
        }
    }

    /// After a splice: the tunnel ended, or it rests.
    fn after(self, splicing: Splicing, client: Transport, replica: SendTimeout<Conn>) {
        match splicing {
            Splicing::Ended(spliced) => self.finish(spliced),
            Splicing::Resting(resting) => self.rest(resting, client, replica),
        }
    }

    /// Hands the tunnel to its thread's table, its sockets out of the runtime.
    fn rest(mut self, resting: splice::Resting, client: Transport, replica: SendTimeout<Conn>) {
        let Some(door) = self.rests.as_ref().map(|r| r.door.clone()) else {
            return; // never: a tunnel that cannot rest is spliced without rest_after
        };
        let set_aside = client
            .into_any()
            .downcast::<SendTimeout<TcpStream>>()
            .map_err(|_| io::Error::other("the client's connection is not plain TCP"))
            .and_then(|client| client.into_inner().into_std())
            .and_then(|client| Ok((client, replica.into_inner().set_aside()?)));
        let (client, (also, replica)) = match set_aside {
            Ok(legs) => legs,
            Err(e) => {
                let end = End::GatewayError(format!("could not rest: {e}"));
                return self.finish(resting.ended(end));
            }
        };
        // Its connection handed it over: the record of the connection's admission is the
        // tunnel's alone now, kept in the table's record rather than on the heap.
        self.request = self.request.alone();
        let held = Held {
            stream: client,
            also: Some(also),
            deadline: resting.idle_until(self.idle),
            rest: RestingTunnel {
                _counted: RestingCount::new(self.registration.tunnels()),
                tunnel: self,
                splice: resting,
                replica,
            },
        };
        // The thread's table is gone (it is ending): the tunnel closes with it.
        let _ = door.send(held);
    }

    /// Records how the tunnel ended: the counters, a replica that broke, the access log's line.
    fn finish(self, spliced: Spliced) {
        let stats = &self.stats;
        stats.tunnels.fetch_sub(1, Ordering::Relaxed);
        let c = &self.registration.tunnels().counters;
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
            End::GatewayError(e) => {
                tracing::warn!(error = %e, "a tunnel could not go on");
                Termination::GatewayError
            }
        };
        if let Some(report) = self.report {
            let _ = report.send(TunnelEnd {
                up: spliced.up,
                down: spliced.down,
                termination,
            });
        }
    }
}

/// Opens the tunnel behind the replica's `101` `resp` and returns the `101` for the client
/// (the replica's head, no body); `None` if the response carries no switched connection. An
/// idle tunnel rests in `door`'s table (its serving thread's) when it can.
pub fn open(
    resp: Response<ReplicaBody>,
    asked: Asked,
    request: RequestPlace,
    at: At<'_>,
    (tunnels, metrics): (&Arc<Tunnels>, &Arc<Metrics>),
    door: Option<&Door<RestingTunnel>>,
) -> Option<Response<Body>> {
    let (mut parts, body) = resp.into_parts();
    let (mut conn, in_flight, _) = body.into_switched()?;
    let websocket = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let registration = tunnels.register(at.placed(), tunnel::Kind::Tunnel);
    let stats = Arc::clone(&at.replica.stats);
    stats.tunnels.fetch_add(1, Ordering::Relaxed);
    let config = &at.snap.config;
    // The access log's line for the tunnel waits for its end; with the log off nobody waits,
    // and an idle tunnel keeps no channel for it.
    let (report, log) = match config.log.access {
        AccessTarget::Off => (None, None),
        _ => {
            let (report, log) = oneshot::channel();
            (Some(report), Some(log))
        }
    };
    let Asked {
        on_upgrade, place, ..
    } = asked;
    let after = config.tunnels.rest_after;
    let rests = door
        .filter(|_| !after.is_zero() && conn.is_plain())
        .map(|door| Rests {
            after,
            door: door.clone(),
        });
    let mut tunnel = Tunnel {
        _place: place,
        request,
        _in_flight: in_flight,
        registration,
        stats,
        report,
        metrics: Arc::clone(metrics),
        idle: config.tunnels.idle_timeout,
        send_timeout: config.proxy.send_timeout,
        rests,
    };
    let mut state = Splice::new(std::mem::take(&mut conn.buf), websocket);
    // A replica that takes no byte for proxy.send_timeout is cut like a client that does not.
    let replica = tunnel.bounded(conn);
    tokio::spawn(async move {
        let Some(upgraded) = on_upgrade.upgraded().await else {
            tunnel.stats.tunnels.fetch_sub(1, Ordering::Relaxed);
            return; // the client went before its 101 was written
        };
        state.client_sent(upgraded.read);
        // Asked of the connection inside the box (the box is an `Io` itself).
        if !(*upgraded.io).as_any().is::<SendTimeout<TcpStream>>() {
            tunnel.rests = None;
        }
        // A task of its own, so that what this one kept to wait for the client is not kept
        // beside it for the tunnel's life.
        tokio::spawn(tunnel.serve(state, upgraded.io, replica));
    });
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    if let Some(log) = log {
        parts.extensions.insert(TunnelLog::new(log));
    }
    Some(Response::from_parts(parts, Body::full(bytes::Bytes::new())))
}
