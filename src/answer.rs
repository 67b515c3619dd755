//! The contract's JSON answers: a body in memory, a JSON response, and the success shape
//! `{"message": …, "status": "successful"}` (failures are [`crate::rescue`]'s).
//!
//! Owns: [`full`], [`json_response`], [`success`]. Must not touch: what an answer says.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::wire::body::Body;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::full(bytes)
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
