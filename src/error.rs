//! The one place internal errors become HTTP responses.
//!
//! Owns: [`GatewayError`], every condition a client can be answered with, and
//! [`GatewayError::into_response`], which maps each to its status and the contract's failure
//! JSON (`{"message": "<Error> …", "status": "failure"}`). Errors are matched by type, never
//! by message text.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// The response body type of every handler.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("Length of hostname list is more than newly added instances")]
    TooManyHostnamesToAdd,
    #[error("Length of hostname list is more than removable instances")]
    TooManyHostnamesToRemove,
    #[error("{0}")]
    Conflict(String),
    #[error("{client} may not call {path}: admin.allow does not include it")]
    Forbidden {
        client: std::net::IpAddr,
        path: String,
    },
    #[error("{path} needs a bearer token: send \"Authorization: Bearer <admin.token>\"")]
    Unauthorized { path: String },
    #[error("{method} is not allowed on {path}: use {allowed}")]
    MethodNotAllowed {
        method: http::Method,
        path: String,
        allowed: &'static str,
    },
    #[error("request body is larger than proxy.max_body ({limit} bytes)")]
    PayloadTooLarge { limit: u64 },
    #[error(
        "no replica is available to serve this request: all are down or starting (see /lb/status)"
    )]
    NoReplica,
    #[error("replica {replica} could not be reached: {detail}")]
    BadGateway { replica: String, detail: String },
    #[error("replica {replica} did not answer within proxy.request_timeout ({timeout:?})")]
    GatewayTimeout {
        replica: String,
        timeout: std::time::Duration,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_)
            | GatewayError::TooManyHostnamesToAdd
            | GatewayError::TooManyHostnamesToRemove => StatusCode::BAD_REQUEST,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::Forbidden { .. } => StatusCode::FORBIDDEN,
            GatewayError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::NoReplica | GatewayError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = serde_json::json!({"message": format!("<Error> {self}"), "status": "failure"});
        let mut resp = json_response(status, &body);
        if let GatewayError::MethodNotAllowed { allowed, .. } = self {
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(allowed));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `{"message": <message>, "status": "successful"}` with 200.
pub fn success(message: serde_json::Value) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &serde_json::json!({"message": message, "status": "successful"}),
    )
}
