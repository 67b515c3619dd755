//! The connector to the replicas: one way to reach a replica, for traffic and for checks.
//!
//! Owns: [`Upstream`] (a connection of a kind: HTTP/1.1, or HTTP/2 in [`h2`]; the kind decides how a request is
//! written on it), [`connect`] (a new connection, plain TCP or TLS with the client it is given:
//! the snapshot's, passed down by the request or the health check), and [`send`] (a request on
//! a pooled connection of the serving thread's [`Pools`] to the replica, or a new one: a pooled connection the
//! replica closed while it was idle is replaced by a fresh one, once, when nothing of the body
//! was sent), with [`pool`] (the connections and a thread's idle pool). Health checks
//! connect here too (never pooled), so a check reaches a replica the way traffic does.
//! Must not touch: HTTP on the wire (each kind's codec, [`crate::wire::client`] for HTTP/1.1),
//! which TLS client is in force (the controller publishes it), or what a failure means for a
//! replica (the proxy and the checks' verdict decide).

pub mod h2;
pub mod pool;

use std::net::SocketAddr;
use std::time::Duration;

use http::Response;

use crate::snapshot::InFlight;
use crate::tls::upstream::UpstreamTls;
use crate::wire::body::ReplicaBody;
use crate::wire::client::{self as h1, Outgoing, Request, SendError};
use crate::wire::h2::{self as wire_h2, H2Body};
use h2::{H2Conn, SendBody};
use pool::{Conn, ConnectError};

/// A connection to a replica, of a kind.
pub enum Upstream {
    /// HTTP/1.1: one request at a time, written by [`crate::wire::client`].
    H1(Conn),
    /// HTTP/2 with prior knowledge: streams multiplexed, written by [`crate::wire::h2`].
    H2(H2Conn),
}

/// A serving thread's connections to the replicas, kept between its requests: idle HTTP/1.1
/// ones and its HTTP/2 ones (in the thread's worker, [`crate::worker::Worker`]).
#[derive(Default)]
pub struct Pools {
    pub h1: std::sync::Arc<pool::Pool>,
    pub h2: h2::Conns,
}

/// The kind of connection to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    H1,
    /// HTTP/2, pinging the replica this often.
    H2 {
        keepalive: Duration,
    },
}

/// A new connection of `kind` to `addr` within `timeout`: TLS with `tls`
/// (`[provider] upstream_tls`), else plain TCP.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
    kind: Kind,
) -> Result<Upstream, ConnectError> {
    match kind {
        Kind::H1 => Conn::connect(addr, timeout, tls).await.map(Upstream::H1),
        Kind::H2 { keepalive } => H2Conn::connect(addr, timeout, tls, keepalive)
            .await
            .map(Upstream::H2),
    }
}

/// Sends `req` with `body` on a connection of `pools` to its replica made with `req.tls`
/// (HTTP/1.1, or an HTTP/2 connection with room for one more stream when `req.http2`), or a new
/// one, and returns the response with its streaming body; `in_flight` counts the request at its
/// replica until the body ends.
pub async fn send<B: Outgoing + Send + 'static>(
    req: &Request<'_>,
    body: &mut B,
    in_flight: InFlight,
    pools: &Pools,
) -> Result<Response<ReplicaBody>, SendError> {
    if req.http2 {
        // Boxed: the HTTP/2 path's state stays out of the HTTP/1.1 path's future.
        return Box::pin(send_h2(req, body, in_flight, &pools.h2)).await;
    }
    let mut pooled = pools.h1.take(req.addr, req.tls);
    loop {
        let reused = pooled.is_some();
        let mut conn = match pooled.take() {
            Some(c) => c,
            // Boxed: connecting (TCP, and TLS when configured) is rare once the pool is warm,
            // and its state would otherwise make every request's future larger.
            None => {
                let mut c = Box::pin(Conn::connect(req.addr, req.connect_timeout, req.tls)).await?;
                pools.h1.adopt(&mut c);
                c
            }
        };
        match h1::exchange(&mut conn, &req.forwarded, req.deadline, body).await {
            Ok(head) => return Ok(h1::response(conn, head, req, in_flight).map(ReplicaBody::H1)),
            // A pooled connection the replica had closed: once more on a fresh one, if the
            // body can still be sent.
            Err(SendError::Broken(_)) if reused && body.untouched() => continue,
            Err(e) => return Err(e),
        }
    }
}

/// [`send`] over HTTP/2: a stream on a connection of `conns` to the replica with room for it,
/// or on a new one (kept there for the next requests). A stream a pooled connection did not
/// process (its GOAWAY raced the request) is sent once more on a fresh connection, if nothing
/// of the body was read; from a fresh connection that failure goes to the caller, which may
/// retry it elsewhere.
async fn send_h2<B: Outgoing + Send + 'static>(
    req: &Request<'_>,
    body: &mut B,
    in_flight: InFlight,
    conns: &h2::Conns,
) -> Result<Response<ReplicaBody>, SendError> {
    let scheme = if req.tls.is_some() { "https" } else { "http" };
    loop {
        let (conn, reused) = h2_conn(req, conns).await?;
        let (sender, stream) = conn.open_stream();
        let outgoing = SendBody::new(body.share());
        let request = wire_h2::request(&req.forwarded, scheme, req.addr, outgoing)
            .map_err(SendError::Request)?;
        match wire_h2::exchange(sender, request, req.deadline).await {
            Ok(resp) => {
                let read_timeout = req.read_timeout;
                return Ok(
                    resp.map(|b| ReplicaBody::H2(H2Body::new(b, stream, read_timeout, in_flight)))
                );
            }
            Err(SendError::Unprocessed(_)) if reused && body.untouched() => {
                conns.forget(&conn);
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A connection of `conns` to the replica with room for one more stream (and `true`: it was
/// there already), or a new one, kept there for the next requests. While another request of
/// this thread connects to the same replica, its connection is waited for (up to
/// `proxy.connect_timeout`) and used if it has room: a burst on a cold thread makes one
/// connection, not one per request.
async fn h2_conn(req: &Request<'_>, conns: &h2::Conns) -> Result<(H2Conn, bool), ConnectError> {
    if let Some(c) = conns.take(req.addr, req.tls) {
        return Ok((c, true));
    }
    let making = match conns.turn(req.addr) {
        h2::Turn::Make(making) => Some(making),
        h2::Turn::Wait(done) => {
            let _ = tokio::time::timeout(req.connect_timeout, done.notified()).await;
            if let Some(c) = conns.take(req.addr, req.tls) {
                return Ok((c, true));
            }
            None
        }
    };
    let c = H2Conn::connect(req.addr, req.connect_timeout, req.tls, req.http2_keepalive).await?;
    conns.keep(&c);
    drop(making);
    Ok((c, false))
}

#[cfg(test)]
mod tests;
