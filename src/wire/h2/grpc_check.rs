//! A gRPC health check on the replica's side of HTTP/2: `grpc.health.v1.Health/Check` sent the
//! way traffic is sent, its answer read the way traffic is read.
//!
//! Owns: [`check`]: the call (a request of the gateway's own, its one message framed by
//! [`crate::grpc`]) on a stream of the connection it is given, the response head, body and
//! trailers read whole by the deadline, and the verdict's inputs: the call's `grpc-status`
//! (trailers, or the head of a trailers-only answer) and whether the message says `SERVING`.
//! Must not touch: connections (the caller brings a new one and drops it: a check never goes to
//! the pool) or what follows from a verdict (the health module's rise and fall).

use std::net::SocketAddr;

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::time::{timeout_at, Instant};

use super::exchange;
use crate::grpc;
use crate::upstream::h2::{H2Conn, SendBody};
use crate::wire::client::SendError;

/// The service and method every check calls.
const PATH: &str = "/grpc.health.v1.Health/Check";
/// A health answer larger than this is not one.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a gRPC check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum GrpcCheckError {
    /// No response head: what a forwarded call would have failed with.
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("the gRPC health check could not be built: {0}")]
    Request(#[from] http::Error),
    #[error("the gRPC health check answered HTTP {0}")]
    Http(StatusCode),
    #[error("the gRPC health check's answer broke: {0}")]
    Body(#[source] ::h2::Error),
    #[error("the gRPC health check's answer is larger than {MAX_ANSWER} bytes")]
    TooLarge,
    #[error("the response body did not end before the deadline")]
    BodyTimeout,
    #[error("grpc.health.v1 answered grpc-status {status}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Status {
        status: String,
        message: Option<String>,
    },
    #[error("grpc.health.v1 answered without a grpc-status")]
    NoStatus,
    #[error("grpc.health.v1 says the service is not SERVING")]
    NotServing,
}

impl GrpcCheckError {
    /// The check's deadline passed (for the head or the body): no fault found, only time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            GrpcCheckError::BodyTimeout | GrpcCheckError::Send(SendError::Timeout)
        )
    }
}

/// `grpc.health.v1.Health/Check` of `service` on `conn` to `addr` (over `scheme`), answered whole by
/// `deadline`: `Ok` when it says `SERVING` with status 0.
pub async fn check(
    conn: &H2Conn,
    scheme: &str,
    addr: SocketAddr,
    service: &str,
    deadline: Instant,
) -> Result<(), GrpcCheckError> {
    let body =
        http_body_util::Full::new(grpc::health_request(service)).map_err(|never| match never {});
    let uri = format!("{scheme}://{addr}{PATH}");
    let mut req = http::Request::builder()
        .method(Method::POST)
        .uri(uri)
        .version(http::Version::HTTP_2)
        .body(SendBody::new(body))?;
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let (sender, _stream) = conn.clone().open_stream();
    let resp = exchange(sender, req, deadline).await?;
    if resp.status() != StatusCode::OK {
        return Err(GrpcCheckError::Http(resp.status()));
    }
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = None;
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(GrpcCheckError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(f)) => f.map_err(GrpcCheckError::Body)?,
        };
        match frame.into_data() {
            Ok(d) if data.len() + d.len() > MAX_ANSWER => return Err(GrpcCheckError::TooLarge),
            Ok(d) => data.extend_from_slice(&d),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    // A trailers-only answer carries its status in the head.
    status_of(trailers.as_ref().unwrap_or(&parts.headers))?;
    match grpc::first_message(&data) {
        Some(msg) if grpc::health_serving(msg) => Ok(()),
        _ => Err(GrpcCheckError::NotServing),
    }
}

/// `Ok` for `grpc-status: 0`, else the status and message as the error.
fn status_of(h: &HeaderMap) -> Result<(), GrpcCheckError> {
    let text = |name| h.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    match text("grpc-status") {
        Some("0") => Ok(()),
        Some(s) => Err(GrpcCheckError::Status {
            status: s.to_owned(),
            message: text("grpc-message").map(str::to_owned),
        }),
        None => Err(GrpcCheckError::NoStatus),
    }
}
