//! The connector to the replicas: one way to reach a replica, for traffic and for checks.
//!
//! Owns: [`Upstream`] (a connection of a kind: HTTP/1.1, or HTTP/2 in [`h2`]; the kind decides how a request is
//! written on it), [`connect`] (a new connection, plain TCP or TLS with the client it is given:
//! the snapshot's, passed down by the request or the health check), and [`send`] (a request on
//! a pooled connection of the serving thread's [`Pools`] to the replica, or a new one: a pooled connection the
//! replica closed while it was idle is replaced by a fresh one, once, when nothing of the body
//! was sent), with [`pool`] (the connections and a thread's idle pool). A request meant
//! for HTTP/2 to a TLS replica that chose HTTP/1.1 (ALPN) goes over HTTP/1.1 on that
//! connection, unless it cannot (a gRPC call: [`SendError::NotHttp2`]). Health checks
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
use crate::tls::upstream::Alpn;
use crate::tls::upstream::UpstreamTls;
use crate::wire::body::ReplicaBody;
use crate::wire::client::{self as h1, Outgoing, Request, SendError};
use crate::wire::h2::{self as wire_h2, H2Body};
use h2::{H2Conn, Negotiated, SendBody};
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
        return Box::pin(send_h2(req, body, in_flight, pools)).await;
    }
    send_h1(req, body, in_flight, None, &pools.h1).await
}

/// [`send`] over HTTP/1.1: on `fresh` (a connection just made for this request), else on a
/// connection of `pool` or a new one (which goes back to `pool` once its response is read
/// whole).
async fn send_h1<B: Outgoing + Send + 'static>(
    req: &Request<'_>,
    body: &mut B,
    in_flight: InFlight,
    fresh: Option<Conn>,
    pool: &std::sync::Arc<pool::Pool>,
) -> Result<Response<ReplicaBody>, SendError> {
    let mut pooled = match fresh {
        Some(mut c) => {
            pool.adopt(&mut c);
            Some((c, false))
        }
        None => pool.take(req.addr, req.tls).map(|c| (c, true)),
    };
    loop {
        let (mut conn, reused) = match pooled.take() {
            Some(c) => c,
            // Boxed: connecting (TCP, and TLS when configured) is rare once the pool is warm,
            // and its state would otherwise make every request's future larger.
            None => {
                let mut c = Box::pin(Conn::connect(req.addr, req.connect_timeout, req.tls)).await?;
                pool.adopt(&mut c);
                (c, false)
            }
        };
        match h1::exchange(&mut conn, &req.forwarded, req.deadline, body).await {
            Ok(head) => {
                return Ok(
                    h1::response(conn, head, req, in_flight).map(|b| ReplicaBody::H1(Box::new(b)))
                )
            }
            // A pooled connection the replica had closed: once more on a fresh one, if the
            // body can still be sent.
            Err(SendError::Broken(_)) if reused && body.untouched() => continue,
            Err(e) => return Err(e),
        }
    }
}

/// [`send`] over HTTP/2: a stream on a connection of `pools` to the replica with room for it,
/// or on a new one (kept there for the next requests). A stream a pooled connection did not
/// process (its GOAWAY raced the request) is sent once more on a fresh connection, if all of
/// the body read so far is still held ([`Outgoing::resendable`]); from a fresh connection that
/// failure goes to the caller, which may retry it elsewhere. A TLS replica that chose HTTP/1.1
/// gets the request over HTTP/1.1, unless it must have HTTP/2 (`req.http2_only`: a gRPC call).
async fn send_h2<B: Outgoing + Send + 'static>(
    req: &Request<'_>,
    body: &mut B,
    in_flight: InFlight,
    pools: &Pools,
) -> Result<Response<ReplicaBody>, SendError> {
    let scheme = match req.tls {
        Some(_) => http::uri::Scheme::HTTPS,
        None => http::uri::Scheme::HTTP,
    };
    loop {
        let (conn, reused) = match h2_conn(req, &pools.h2).await? {
            Reached::H2(conn, reused) => (conn, reused),
            Reached::Http1(_, chosen) if req.http2_only => return Err(SendError::NotHttp2(chosen)),
            Reached::Http1(fresh, _) => {
                return send_h1(req, body, in_flight, fresh, &pools.h1).await
            }
        };
        let (sender, stream) = conn.open_stream();
        let outgoing = SendBody::new(body.share());
        let request = wire_h2::request(&req.forwarded, scheme.clone(), req.addr, outgoing)
            .map_err(SendError::Request)?;
        match wire_h2::exchange(sender, request, req.deadline).await {
            Ok(resp) => {
                let read_timeout = req.read_timeout;
                return Ok(resp.map(|b| {
                    ReplicaBody::H2(Box::new(H2Body::new(b, stream, read_timeout, in_flight)))
                }));
            }
            Err(SendError::Unprocessed(_)) if reused && body.resendable() => {
                pools.h2.forget(req.addr, &stream);
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What [`h2_conn`] reached the replica with.
enum Reached {
    /// A connection with room for one more stream, and whether it was there already.
    H2(H2Conn, bool),
    /// The replica chose HTTP/1.1 over TLS (ALPN): the connection it chose it on, when this
    /// request just made it (else the thread remembered the choice,
    /// [`h2::Conns::chose_http1`]).
    Http1(Option<Conn>, Alpn),
}

/// A connection of `conns` to the replica with room for one more stream (and `true`: it was
/// there already), or a new one, kept there for the next requests. While another request of
/// this thread connects to the same replica, its connection is waited for and used if it has
/// room; if it has none (or could not be made), the next connection is one request's to make
/// and the others' to wait for again: a burst on a cold thread makes one connection per
/// [`h2::MAX_STREAMS_PER_CONN`] streams, not one per request past the first connection's room.
/// Waiting ends after `proxy.connect_timeout`, and past the connections a replica may keep
/// there is nothing to wait for ([`h2::Turn::Alone`]): the request then makes a connection of
/// its own. A TLS replica that chose HTTP/1.1 is [`Reached::Http1`].
async fn h2_conn(req: &Request<'_>, conns: &h2::Conns) -> Result<Reached, ConnectError> {
    let pooled = || {
        if let Some(chosen) = conns.chose_http1(req.addr, req.tls) {
            return Some(Reached::Http1(None, chosen));
        }
        conns.take(req.addr, req.tls).map(|c| Reached::H2(c, true))
    };
    // Read off the clock only by a request that waits: most find a connection at once.
    let mut waited_out = None;
    let making = loop {
        if let Some(reached) = pooled() {
            return Ok(reached);
        }
        match conns.turn(req.addr) {
            h2::Turn::Make(making) => break Some(making),
            h2::Turn::Alone => break None,
            h2::Turn::Wait(done) => {
                let until = *waited_out
                    .get_or_insert_with(|| tokio::time::Instant::now() + req.connect_timeout);
                if tokio::time::timeout_at(until, done.notified())
                    .await
                    .is_err()
                {
                    break None;
                }
            }
        }
    };
    let (addr, timeout, tls) = (req.addr, req.connect_timeout, req.tls);
    let reached = match H2Conn::negotiate(addr, timeout, tls, req.http2_keepalive).await? {
        Negotiated::H2(c) => {
            conns.keep(&c);
            conns.note_alpn(addr, tls, None);
            Reached::H2(c, false)
        }
        Negotiated::Http1(conn, chosen) => {
            conns.note_alpn(addr, tls, Some(&chosen));
            Reached::Http1(Some(conn), chosen)
        }
    };
    drop(making);
    Ok(reached)
}

#[cfg(test)]
mod tests;
