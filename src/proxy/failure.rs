//! Why an attempt at one replica failed, and whose failure it was.
//!
//! Owns: [`Failure`] (whose it is: the replica's, the client's or the gateway's own; what kind;
//! whether any of the request body was sent, and whether all of that is still held for a
//! resend), the classification of the wire client's
//! [`SendError`] into it ([`Failure::of`]), and what the client is told for it
//! ([`Failure::into_error`]). Only a failure that is the replica's counts against it, and only
//! such a failure may be retried on another one (pingora's `ErrorSource` and `RetryType` are
//! the same idea).
//! Must not touch: counters, the controller, or the retry decision (`retry` reads a failure).

use crate::config::ProxyConfig;
use crate::error::{error_chain, local_resource_cause};
use crate::grpc::TimeLimit;
use crate::proxy::body::{past_limit, RESEND_LIMIT};
use crate::rescue::GatewayError;
use crate::upstream::pool::ConnectError;
use crate::wire::client::SendError;

/// Whose failure it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// The replica's: counted against it, and (for some kinds) retried on the next server.
    Replica,
    /// The client's (its body broke, stopped, or was too large): never the replica's.
    Client,
    /// The gateway's own (out of a local resource): never the replica's.
    Gateway,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nothing listens at the replica's address: the connection was refused.
    Refused,
    /// The connection was not made within `proxy.connect_timeout`.
    ConnectTimeout,
    /// No connection otherwise (unreachable, the TLS handshake failed).
    Connect,
    /// The connection broke before a response head.
    Broken,
    /// The replica answered something that is not a response head the gateway forwards.
    BadHead,
    /// No response head by the deadline (`proxy.request_timeout`).
    Timeout,
    /// The client's body broke (malformed chunks, the client went away).
    ClientBody,
    /// The client sent none of the rest of its body by the deadline.
    ClientBodyTimeout,
    /// The body ran past `proxy.max_body`.
    TooLarge,
    /// The gateway ran out of a local resource (descriptors, memory, local ports).
    LocalResource,
    /// HTTP/2: the replica did not process the request (GOAWAY, `REFUSED_STREAM`): no fault
    /// of its own, and safe to send again whatever the method.
    Unprocessed,
    /// The replica had `proxy.max_requests_per_replica` in flight and no place came free
    /// within `proxy.queue_timeout`: busy, not failing.
    Busy,
    /// Over TLS the replica chose HTTP/1.1 (ALPN) and the request must have HTTP/2 (a gRPC
    /// call): a setting that does not fit the replica, not a failure of it.
    NotHttp2,
}

/// One attempt's failure.
#[derive(Debug)]
pub struct Failure {
    pub whose: Whose,
    pub kind: Kind,
    /// Some of the request body was read for this attempt.
    pub body_sent: bool,
    /// All of the body read so far is still held ([`RESEND_LIMIT`]), so it can be sent again
    /// whole (true when none was read).
    pub body_held: bool,
    /// The cause, on one line (for the client's message and the log).
    pub detail: String,
}

impl Failure {
    /// The failure `e` stands for, `body_sent` and `body_held` as [`Failure`] says.
    /// `short_of_descriptors`: the gateway was short of file descriptors when the attempt
    /// started, so a connect that timed out is not evidence against the replica.
    pub fn of(
        e: &SendError,
        body_sent: bool,
        body_held: bool,
        short_of_descriptors: bool,
    ) -> Failure {
        let (whose, kind) = match e {
            SendError::RequestBody(b) if past_limit(b) => (Whose::Client, Kind::TooLarge),
            SendError::RequestBody(_) => (Whose::Client, Kind::ClientBody),
            SendError::RequestBodyTimeout => (Whose::Client, Kind::ClientBodyTimeout),
            SendError::Request(_) => (Whose::Client, Kind::ClientBody),
            _ if local_resource_cause(e).is_some() => (Whose::Gateway, Kind::LocalResource),
            // The gateway's own shortage may be why the connection was not made in time.
            SendError::Connect(ConnectError::Timeout(_)) if short_of_descriptors => {
                (Whose::Gateway, Kind::ConnectTimeout)
            }
            SendError::Connect(ConnectError::Timeout(_)) => (Whose::Replica, Kind::ConnectTimeout),
            SendError::Connect(ConnectError::Io(io))
                if io.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                (Whose::Replica, Kind::Refused)
            }
            SendError::Connect(_) => (Whose::Replica, Kind::Connect),
            SendError::Broken(_) | SendError::Stream(_) => (Whose::Replica, Kind::Broken),
            SendError::Unprocessed(_) => (Whose::Replica, Kind::Unprocessed),
            SendError::NotHttp2(_) => (Whose::Replica, Kind::NotHttp2),
            SendError::BadHead(_) => (Whose::Replica, Kind::BadHead),
            SendError::Timeout => (Whose::Replica, Kind::Timeout),
        };
        let mut detail = match local_resource_cause(e) {
            Some(cause) => cause,
            None => error_chain(e),
        };
        if whose == Whose::Gateway && matches!(e, SendError::Connect(ConnectError::Timeout(_))) {
            detail.push_str(" while the gateway was short of file descriptors");
        }
        if kind == Kind::Unprocessed && body_sent && !body_held {
            detail.push_str(&format!(
                "; its body had started and more of it was read than the {} KiB the gateway holds to send it again, so it was not resent",
                RESEND_LIMIT / 1024
            ));
        }
        Failure {
            whose,
            kind,
            body_sent,
            body_held,
            detail,
        }
    }

    /// No connection was made: nothing of the request reached the replica.
    pub fn is_connect(&self) -> bool {
        matches!(
            self.kind,
            Kind::Refused | Kind::ConnectTimeout | Kind::Connect
        )
    }

    /// A replica with no place for the request (`proxy.max_requests_per_replica`).
    pub fn busy(detail: String) -> Failure {
        Failure {
            whose: Whose::Gateway,
            kind: Kind::Busy,
            body_sent: false,
            body_held: true,
            detail,
        }
    }

    /// What the client is told when this failure is the request's last: `replica` is the one
    /// tried last, `limit` the time limit the request ran under, `p` the rest in force.
    pub fn into_error(self, replica: &str, limit: TimeLimit, p: &ProxyConfig) -> GatewayError {
        let replica = replica.to_owned();
        match (self.whose, self.kind) {
            (_, Kind::Busy) => GatewayError::ReplicaBusy {
                replica,
                detail: self.detail,
            },
            (_, Kind::NotHttp2) => GatewayError::GrpcReplicaNotHttp2 {
                replica,
                detail: self.detail,
                setting: p.upstream_protocol,
            },
            (_, Kind::TooLarge) => GatewayError::PayloadTooLarge { limit: p.max_body },
            (_, Kind::ClientBodyTimeout) => GatewayError::ClientBodyTimeout { limit },
            (Whose::Client, _) => GatewayError::ClientBody {
                detail: self.detail,
            },
            (Whose::Gateway, _) => GatewayError::LocalResource {
                detail: self.detail,
            },
            (Whose::Replica, Kind::Timeout) => GatewayError::GatewayTimeout { replica, limit },
            (Whose::Replica, _) => GatewayError::BadGateway {
                replica,
                detail: self.detail,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::client::head::HeadError;

    /// The error a body past its limit gives (`http_body_util::Limited`'s, made the same way).
    fn over_limit_error() -> crate::error::BoxError {
        use http_body_util::{BodyExt, Full, Limited};
        let body = Limited::new(Full::new(bytes::Bytes::from_static(b"too long")), 2);
        let mut body = std::pin::pin!(body);
        let polled = futures_util::FutureExt::now_or_never(body.frame());
        match polled {
            Some(Some(Err(e))) => e,
            _ => "the limit did not hold".into(),
        }
    }

    use std::time::Duration;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "x")
    }

    #[test]
    fn each_send_error_is_someones_failure() {
        use std::io::ErrorKind as K;
        let over = over_limit_error();
        let broke: crate::error::BoxError = "malformed chunk".into();
        let timeout = || SendError::Connect(ConnectError::Timeout(Duration::from_secs(1)));
        let table: Vec<(SendError, bool, Whose, Kind)> = vec![
            (
                SendError::RequestBody(over),
                false,
                Whose::Client,
                Kind::TooLarge,
            ),
            (
                SendError::RequestBody(broke),
                false,
                Whose::Client,
                Kind::ClientBody,
            ),
            (
                SendError::RequestBodyTimeout,
                false,
                Whose::Client,
                Kind::ClientBodyTimeout,
            ),
            (
                SendError::Connect(ConnectError::Io(io(K::ConnectionRefused))),
                false,
                Whose::Replica,
                Kind::Refused,
            ),
            (timeout(), false, Whose::Replica, Kind::ConnectTimeout),
            (timeout(), true, Whose::Gateway, Kind::ConnectTimeout),
            (
                SendError::Connect(ConnectError::Io(std::io::Error::from_raw_os_error(
                    libc::EMFILE,
                ))),
                false,
                Whose::Gateway,
                Kind::LocalResource,
            ),
            (
                SendError::Connect(ConnectError::Io(io(K::HostUnreachable))),
                false,
                Whose::Replica,
                Kind::Connect,
            ),
            (
                SendError::Broken(io(K::ConnectionReset)),
                false,
                Whose::Replica,
                Kind::Broken,
            ),
            (
                SendError::BadHead(HeadError::UnaskedSwitch),
                false,
                Whose::Replica,
                Kind::BadHead,
            ),
            (SendError::Timeout, false, Whose::Replica, Kind::Timeout),
        ];
        for (e, short, whose, kind) in table {
            let f = Failure::of(&e, false, true, short);
            assert_eq!((f.whose, f.kind), (whose, kind), "{e}");
            assert!(!f.detail.is_empty());
        }
    }

    #[test]
    fn the_client_is_told_by_kind() {
        let f = |kind| Failure {
            whose: match kind {
                Kind::ClientBody | Kind::ClientBodyTimeout | Kind::TooLarge => Whose::Client,
                Kind::Busy | Kind::LocalResource => Whose::Gateway,
                _ => Whose::Replica,
            },
            kind,
            body_sent: false,
            body_held: true,
            detail: "d".into(),
        };
        let t = TimeLimit::RequestTimeout(Duration::from_secs(30));
        let p = ProxyConfig {
            max_body: 10,
            ..ProxyConfig::default()
        };
        let status = |kind| f(kind).into_error("s1", t, &p).status().as_u16();
        assert_eq!(status(Kind::Refused), 502);
        assert_eq!(status(Kind::BadHead), 502);
        assert_eq!(status(Kind::Timeout), 504);
        assert_eq!(status(Kind::ClientBody), 400);
        assert_eq!(status(Kind::ClientBodyTimeout), 408);
        assert_eq!(status(Kind::TooLarge), 413);
        assert_eq!(status(Kind::Busy), 503);
        let inconclusive = Failure {
            whose: Whose::Gateway,
            ..f(Kind::ConnectTimeout)
        };
        assert_eq!(inconclusive.into_error("s1", t, &p).status().as_u16(), 503);
        let local = Failure {
            whose: Whose::Gateway,
            ..f(Kind::LocalResource)
        };
        assert_eq!(local.into_error("s1", t, &p).status().as_u16(), 503);
    }

    #[test]
    fn a_timeout_names_the_limit_that_ran_out() {
        let timeout = || Failure {
            whose: Whose::Replica,
            kind: Kind::Timeout,
            body_sent: false,
            body_held: true,
            detail: "d".into(),
        };
        let p = ProxyConfig::default();
        let call = TimeLimit::GrpcTimeout(Duration::from_millis(300));
        let e = timeout().into_error("s1", call, &p).to_string();
        assert!(
            e.contains("grpc-timeout (300ms)") && !e.contains("request_timeout"),
            "{e}"
        );
        let request = TimeLimit::RequestTimeout(Duration::from_secs(30));
        let e = timeout().into_error("s1", request, &p).to_string();
        assert!(e.contains("proxy.request_timeout (30s)"), "{e}");
    }
}
