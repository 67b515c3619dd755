//! The connector to the replicas: one way to reach a replica, for traffic and for checks.
//!
//! Owns: [`Upstream`] (a connection of a kind: HTTP/1.1 now; the kind decides how a request is
//! written on it), [`connect`] (a new connection, plain TCP or TLS with the client it is given:
//! the snapshot's, passed down by the request or the health check), and [`send`] (a request on
//! this thread's pooled connection to the replica, or a new one: a pooled connection the
//! replica closed while it was idle is replaced by a fresh one, once, when nothing of the body
//! was sent), with [`pool`] (the connections and the per-thread idle pool). Health checks
//! connect here too (never pooled), so a check reaches a replica the way traffic does.
//! Must not touch: HTTP on the wire (each kind's codec, [`crate::wire::client`] for HTTP/1.1),
//! which TLS client is in force (the controller publishes it), or what a failure means for a
//! replica (the proxy and the checks' verdict decide).

pub mod pool;

use std::net::SocketAddr;
use std::time::Duration;

use http::Response;

use crate::snapshot::InFlight;
use crate::tls::upstream::UpstreamTls;
use crate::wire::client::{self as h1, Outgoing, Request, SendError, UpstreamBody};
use pool::{Conn, ConnectError};

/// A connection to a replica, of a kind.
pub enum Upstream {
    /// HTTP/1.1: one request at a time, written by [`crate::wire::client`].
    H1(Conn),
}

/// A new connection to `addr` within `timeout`: TLS with `tls` (`[provider] upstream_tls`),
/// else plain TCP.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<Upstream, ConnectError> {
    Conn::connect(addr, timeout, tls).await.map(Upstream::H1)
}

/// Sends `req` with `body` on this thread's pooled connection to its replica made with
/// `req.tls`, or a new one, and returns the response with its streaming body; `in_flight` counts
/// the request at its replica until the body ends.
pub async fn send(
    req: &Request<'_>,
    body: &mut impl Outgoing,
    in_flight: InFlight,
) -> Result<Response<UpstreamBody>, SendError> {
    let mut pooled = pool::take(req.addr, req.tls).map(Upstream::H1);
    loop {
        let reused = pooled.is_some();
        let upstream = match pooled.take() {
            Some(c) => c,
            // Boxed: connecting (TCP, and TLS when configured) is rare once the pool is warm,
            // and its state would otherwise make every request's future larger.
            None => Box::pin(connect(req.addr, req.connect_timeout, req.tls)).await?,
        };
        match upstream {
            Upstream::H1(mut conn) => {
                match h1::exchange(&mut conn, &req.forwarded, req.deadline, body).await {
                    Ok(head) => return Ok(h1::response(conn, head, req, in_flight)),
                    // A pooled connection the replica had closed: once more on a fresh one, if the
                    // body can still be sent.
                    Err(SendError::Broken(_)) if reused && body.untouched() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
