//! The one place the gateway's errors become HTTP responses, at the edge.
//!
//! Owns: [`GatewayError`], every condition a client can be answered with (the control plane's
//! refusals among them, as [`ControlError`]), and [`GatewayError::into_response`], which maps
//! each to its status and the contract's failure JSON (`{"message": "<Error> …", "status":
//! "failure"}`), with `Allow`, `Retry-After` or `WWW-Authenticate` where they belong, and
//! [`RefusedStream`] for what HTTP/2 refuses instead. Errors are matched by type, never by
//! message text. (linkerd's `HttpRescue` is the same shape.)
//! Must not touch: decisions. The modules below decide and return their own typed errors; only
//! this one knows statuses.

use http::{HeaderValue, Response, StatusCode};

use crate::answer::json_response;
use crate::control::error::ControlError;
use crate::grpc;
use crate::wire::body::Body;

/// What is wrong with an `/add` or `/rm` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("Request body is not valid JSON ({0}): send {{\"n\": 1, \"hostnames\": [\"S5\"]}}")]
    NotJson(String),
    #[error("Request body must be a JSON object like {{\"n\": 1, \"hostnames\": [\"S5\"]}}")]
    NotAnObject,
    #[error("Unknown field '{0}': expected 'n' and optionally 'hostnames'")]
    UnknownField(String),
    #[error("Field 'n' is missing: give the number of replicas")]
    MissingN,
    #[error("Field 'n' must be a positive integer, got {0}")]
    BadN(String),
    #[error("Field 'hostnames' must be a list of strings")]
    BadHostnames,
    #[error("Cannot read the request body: {0}")]
    Unreadable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    WhatIf(#[from] crate::whatif::WhatIfError),
    #[error("{client} may not call {path}: {reason}")]
    Forbidden {
        client: std::net::IpAddr,
        path: String,
        reason: crate::guard::Denied,
    },
    #[error("{path} needs a bearer token: send \"Authorization: Bearer <admin.token>\" (a browser: the token as the password)")]
    Unauthorized { path: String },
    #[error("{method} is not allowed on {path}: use {allowed}")]
    MethodNotAllowed {
        method: http::Method,
        path: String,
        allowed: &'static str,
    },
    #[error("{path} is not a gateway endpoint: try /lb/ (the operator page), /lb/health, /lb/status or /lb/metrics")]
    NoSuchEndpoint { path: String },
    #[error("request body is larger than proxy.max_body ({limit} bytes)")]
    PayloadTooLarge { limit: u64 },
    #[error("a request must carry exactly one Host header (RFC 9112 section 3.2)")]
    BadHost,
    #[error("the request body could not be read from the client: {detail}")]
    ClientBody { detail: String },
    #[error("the request body stopped arriving: the client sent none of the rest of it within {limit}{}", body_advice(*limit))]
    ClientBodyTimeout { limit: grpc::TimeLimit },
    #[error("the gateway ran out of a local resource ({detail}); this is the gateway's limit, not a replica's fault: raise its file-descriptor limit or lower proxy.max_connections")]
    LocalResource { detail: String },
    #[error("{}", over_budget(*refusal, *limit))]
    OverBudget {
        refusal: crate::admission::Refusal,
        limit: u64,
    },
    #[error("replica {replica} {detail}; retry shortly")]
    ReplicaBusy { replica: String, detail: String },
    #[error("{limit} tunnels are open ([tunnels] max); retry shortly")]
    TunnelsFull { limit: u64 },
    #[error(
        "no replica is available to serve this request: all are down or starting (see /lb/status)"
    )]
    NoReplica,
    #[error("no replica runs now (scaled to zero) and {limit} requests already wait for one to start (autoscale.hold_max); retry shortly")]
    HoldFull { limit: u32 },
    #[error("no replica runs now (scaled to zero) and none was ready within autoscale.hold_timeout ({timeout:?}); retry shortly")]
    HoldTimeout { timeout: std::time::Duration },
    #[error("replica {replica} could not be reached: {detail}")]
    BadGateway { replica: String, detail: String },
    #[error("replica {replica} did not answer within {limit}")]
    GatewayTimeout {
        replica: String,
        limit: grpc::TimeLimit,
    },
    #[error("this port speaks HTTPS and the request was plain HTTP: use https://{host}")]
    PlainHttpOnTlsPort { host: String },
    #[error("plain HTTP is redirected to HTTPS (tls.http = \"redirect\"), and this request names no usable Host to redirect to")]
    NoHostToRedirect,
    #[error("{0}; the gateway closed the connection (its HTTP/1 limits: docs/security.md)")]
    RequestHead(#[from] crate::wire::server::request::HeadError),
    #[error("{0}")]
    Internal(String),
    #[error("gRPC needs HTTP/2 to the replicas and proxy.upstream_protocol is \"http1\": set it to \"h2c\" or \"match\"")]
    GrpcNeedsHttp2,
    #[error("replica {replica} cannot take a gRPC call: {detail}; gRPC needs HTTP/2 to it (proxy.upstream_protocol = \"{setting}\" with provider.upstream_tls): let the replica offer ALPN h2")]
    GrpcReplicaNotHttp2 {
        replica: String,
        detail: String,
        setting: crate::config::UpstreamProtocol,
    },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::WhatIf(crate::whatif::WhatIfError::Busy) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::RequestHead(e) => e.status(),
            GatewayError::Control(e) => control_status(e),
            GatewayError::Body(_)
            | GatewayError::WhatIf(_)
            | GatewayError::BadHost
            | GatewayError::ClientBody { .. }
            | GatewayError::PlainHttpOnTlsPort { .. }
            | GatewayError::NoHostToRedirect => StatusCode::BAD_REQUEST,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::GrpcNeedsHttp2 => StatusCode::NOT_IMPLEMENTED,
            GatewayError::Forbidden { .. } => StatusCode::FORBIDDEN,
            GatewayError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::NoSuchEndpoint { .. } => StatusCode::NOT_FOUND,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::NoReplica
            | GatewayError::HoldFull { .. }
            | GatewayError::HoldTimeout { .. }
            | GatewayError::OverBudget { .. }
            | GatewayError::ReplicaBusy { .. }
            | GatewayError::TunnelsFull { .. }
            | GatewayError::LocalResource { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BadGateway { .. } | GatewayError::GrpcReplicaNotHttp2 { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Whether the same call may well succeed if sent again (it changed nothing): answered
    /// with `Retry-After`.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::Control(
                ControlError::RingContended { .. }
                    | ControlError::EngineUnavailable { .. }
                    | ControlError::ReservationLost { .. }
            ) | GatewayError::OverBudget { .. }
                | GatewayError::ReplicaBusy { .. }
                | GatewayError::TunnelsFull { .. }
                | GatewayError::HoldFull { .. }
                | GatewayError::HoldTimeout { .. }
        )
    }

    /// Whether the request was refused before anything of it was processed, so an HTTP/2
    /// client gets `REFUSED_STREAM` (which it may retry at once, RFC 9113 section 8.7) instead
    /// of a response.
    pub fn refuses_stream(&self) -> bool {
        matches!(
            self,
            GatewayError::OverBudget { .. }
                | GatewayError::ReplicaBusy { .. }
                | GatewayError::HoldFull { .. }
        )
    }

    /// The gRPC status a gRPC client is answered with instead of the HTTP one (a gRPC client
    /// reads statuses, not HTTP errors): the caps and an unreachable or missing replica are
    /// `UNAVAILABLE` or `RESOURCE_EXHAUSTED` (clients retry the first), a deadline
    /// `DEADLINE_EXCEEDED`.
    pub fn grpc_code(&self) -> grpc::Code {
        use grpc::Code;
        match self {
            GatewayError::GrpcNeedsHttp2
            | GatewayError::GrpcReplicaNotHttp2 { .. }
            | GatewayError::MethodNotAllowed { .. } => Code::Unimplemented,
            GatewayError::GatewayTimeout { .. } | GatewayError::ClientBodyTimeout { .. } => {
                Code::DeadlineExceeded
            }
            GatewayError::OverBudget { .. } | GatewayError::PayloadTooLarge { .. } => {
                Code::ResourceExhausted
            }
            GatewayError::Forbidden { .. } => Code::PermissionDenied,
            GatewayError::Unauthorized { .. } => Code::Unauthenticated,
            GatewayError::BadHost | GatewayError::ClientBody { .. } => Code::InvalidArgument,
            GatewayError::Internal(_) | GatewayError::RequestHead(_) => Code::Internal,
            _ => Code::Unavailable,
        }
    }

    /// This error as a gRPC call's answer: a trailers-only response with [`Self::grpc_code`]
    /// and the message the JSON answer would carry.
    pub fn into_grpc_response(self) -> Response<Body> {
        grpc::trailers_only(self.grpc_code(), &self.to_string())
    }

    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let refused = self.refuses_stream();
        let body = serde_json::json!({"message": format!("<Error> {self}"), "status": "failure"});
        let mut resp = json_response(status, &body);
        if let GatewayError::MethodNotAllowed { allowed, .. } = self {
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(allowed));
        }
        if self.retryable() {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if refused {
            resp.extensions_mut().insert(RefusedStream);
        }
        if status == StatusCode::UNAUTHORIZED {
            // Bearer for scripts; Basic (the token as the password) so a browser asks for it
            // on the operator page.
            let h = resp.headers_mut();
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            h.append(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ringgate admin\", charset=\"UTF-8\""),
            );
        }
        resp
    }
}

/// What a client whose body stopped arriving can do about it.
fn body_advice(limit: grpc::TimeLimit) -> &'static str {
    match limit {
        grpc::TimeLimit::RequestTimeout(_) => {
            "; send the whole body, or raise proxy.request_timeout for slow uploads"
        }
        grpc::TimeLimit::GrpcTimeout(_) => "",
    }
}

/// The status of a control-plane refusal.
fn control_status(e: &ControlError) -> StatusCode {
    match e {
        ControlError::Membership(_) => StatusCode::BAD_REQUEST,
        ControlError::AddFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        ControlError::ShuttingDown
        | ControlError::RingContended { .. }
        | ControlError::EngineUnavailable { .. }
        | ControlError::ReservationLost { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ControlError::RecordMismatch { .. } | ControlError::Roll(_) => StatusCode::CONFLICT,
    }
}

/// Marks a response the HTTP/2 server sends as `REFUSED_STREAM` instead (see
/// [`GatewayError::refuses_stream`]); HTTP/1 clients get the response itself.
#[derive(Debug, Clone, Copy)]
pub struct RefusedStream;

fn over_budget(refusal: crate::admission::Refusal, limit: u64) -> String {
    use crate::admission::Refusal;
    match refusal {
        Refusal::RequestsPerIp => format!(
            "this client address has proxy.max_requests_per_ip ({limit}) requests in flight; \
             wait for some to finish"
        ),
        _ => format!(
            "the gateway has proxy.max_requests ({limit}) requests in flight; retry shortly"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::error::StartFailure;
    use crate::control::membership::MembershipError;
    use http_body_util::BodyExt;

    #[test]
    fn model_errors_are_client_errors_and_start_failures_server_errors() {
        let e: GatewayError =
            ControlError::from(MembershipError::HostnameInUse("S5".into())).into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e: GatewayError = BodyError::MissingN.into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e: GatewayError = ControlError::AddFailed {
            replica: "S5".into(),
            cause: StartFailure::Exited("exit status 1".into()),
        }
        .into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            e.to_string(),
            "Replica 'S5' exited while starting (exit status 1); nothing was added"
        );
    }

    #[test]
    fn a_lost_race_is_a_retryable_503() {
        for e in [
            ControlError::RingContended { attempts: 8 },
            ControlError::EngineUnavailable {
                detail: "connection refused".into(),
            },
            ControlError::ReservationLost {
                replica: "S5".into(),
            },
        ] {
            let e = GatewayError::from(e);
            assert!(e.retryable(), "{e}");
            let resp = e.into_response();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
        }
        let e = GatewayError::from(ControlError::RecordMismatch { detail: "x".into() });
        assert!(!e.retryable());
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert!(!GatewayError::NoReplica.retryable());
        // Held at zero replicas past the bound: 503 with Retry-After; past hold_max nothing of
        // the request was processed, so an HTTP/2 client gets REFUSED_STREAM like any request
        // over a budget; one held past hold_timeout waited, and gets the response.
        for (e, refused) in [
            (GatewayError::HoldFull { limit: 2 }, true),
            (
                GatewayError::HoldTimeout {
                    timeout: std::time::Duration::from_secs(3),
                },
                false,
            ),
        ] {
            assert_eq!(e.refuses_stream(), refused, "{e}");
            let resp = e.into_response();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
            assert_eq!(resp.extensions().get::<RefusedStream>().is_some(), refused);
        }
    }

    #[test]
    fn grpc_calls_get_grpc_statuses() {
        use grpc::Code;
        let t = std::time::Duration::from_secs(1);
        let cases = [
            (GatewayError::NoReplica, Code::Unavailable),
            (GatewayError::HoldFull { limit: 2 }, Code::Unavailable),
            (GatewayError::HoldTimeout { timeout: t }, Code::Unavailable),
            (
                GatewayError::BadGateway {
                    replica: "s1".into(),
                    detail: "refused".into(),
                },
                Code::Unavailable,
            ),
            (
                GatewayError::GatewayTimeout {
                    replica: "s1".into(),
                    limit: grpc::TimeLimit::GrpcTimeout(t),
                },
                Code::DeadlineExceeded,
            ),
            (
                GatewayError::GrpcReplicaNotHttp2 {
                    replica: "s1".into(),
                    detail: "the replica chose ALPN http/1.1".into(),
                    setting: crate::config::UpstreamProtocol::H2c,
                },
                Code::Unimplemented,
            ),
            (
                GatewayError::OverBudget {
                    refusal: crate::admission::Refusal::RequestsPerIp,
                    limit: 3,
                },
                Code::ResourceExhausted,
            ),
            (GatewayError::GrpcNeedsHttp2, Code::Unimplemented),
        ];
        for (e, code) in cases {
            assert_eq!(e.grpc_code(), code, "{e}");
        }
        let resp = GatewayError::GrpcNeedsHttp2.into_grpc_response();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "12");
        let msg = resp.headers()["grpc-message"].to_str().expect("ascii");
        assert!(msg.contains("proxy.upstream_protocol"), "{msg}");
    }

    #[test]
    fn local_resource_errors_are_503() {
        assert_eq!(
            GatewayError::LocalResource { detail: "x".into() }.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn responses_carry_the_contract_json_and_headers() {
        let resp = GatewayError::Unauthorized {
            path: "/add".into(),
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers().get(http::header::WWW_AUTHENTICATE),
            Some(&HeaderValue::from_static("Bearer"))
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["status"], "failure");
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("<Error> /add needs a bearer token")));
    }
}
