//! The replica API (`/rep`, `/add`, `/rm`) and the gateway's own `/lb/*` endpoints.
//!
//! Owns: routing of these paths, the admin guard (`admin.allow`, `admin.token`), and parsing and
//! validating request bodies into controller calls, with a 400 naming the problem for every bad
//! input. Validation that needs state (names in use, counts) is the controller's, so a call is
//! checked and applied in one step.
//! Must not touch: replicas or the ring directly; it asks the controller.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::error::{full, success, Body, GatewayError};
use crate::server::Gateway;
use crate::snapshot::Snapshot;

/// Largest `/add` or `/rm` body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Whether `path` belongs to the gateway rather than to the replicas.
pub fn is_admin_path(path: &str) -> bool {
    matches!(path, "/rep" | "/add" | "/rm") || path == "/lb" || path.starts_with("/lb/")
}

pub async fn handle(
    gw: &Gateway,
    snap: Arc<Snapshot>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    match route(gw, &snap, req, client).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(error = %e, "admin call failed");
            }
            e.into_response()
        }
    }
}

async fn route(
    gw: &Gateway,
    snap: &Snapshot,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Result<Response<Body>, GatewayError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let wrong_method = |allowed: &'static str| GatewayError::MethodNotAllowed {
        method: method.clone(),
        path: path.clone(),
        allowed,
    };
    match path.as_str() {
        "/rep" => {
            if method != Method::GET && method != Method::HEAD {
                return Err(wrong_method("GET"));
            }
            Ok(replica_list(&snap.members))
        }
        "/add" | "/rm" => {
            let expected = if path == "/add" {
                Method::POST
            } else {
                Method::DELETE
            };
            if method != expected {
                return Err(wrong_method(if path == "/add" { "POST" } else { "DELETE" }));
            }
            authorize(snap, &req, client)?;
            let body = read_body(req.into_body()).await?;
            let (n, hostnames) = parse_scale_request(&body)?;
            let members = if path == "/add" {
                gw.controller.add(n, hostnames).await?
            } else {
                gw.controller.remove(n, hostnames).await?
            };
            Ok(replica_list(&members))
        }
        "/lb/health" => Ok(success(json!("ok"))),
        "/lb/status" => {
            if method != Method::GET {
                return Err(wrong_method("GET"));
            }
            Ok(success(gw.controller.status().await?))
        }
        "/lb/metrics" => {
            if method != Method::GET {
                return Err(wrong_method("GET"));
            }
            let text = gw.controller.metrics().await?;
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(resp)
        }
        _ => Ok(crate::error::json_response(
            StatusCode::NOT_FOUND,
            &json!({"message": format!("<Error> {path} is not a gateway endpoint: try /lb/health, /lb/status or /lb/metrics"), "status": "failure"}),
        )),
    }
}

fn replica_list(members: &[String]) -> Response<Body> {
    success(json!({"N": members.len(), "replicas": members}))
}

fn authorize(
    snap: &Snapshot,
    req: &Request<Incoming>,
    client: SocketAddr,
) -> Result<(), GatewayError> {
    let admin = &snap.config.admin;
    if !admin.allows(client.ip()) {
        return Err(GatewayError::Forbidden {
            client: client.ip().to_canonical(),
            path: req.uri().path().to_owned(),
        });
    }
    if let Some(token) = admin.token() {
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Err(GatewayError::Unauthorized {
                path: req.uri().path().to_owned(),
            });
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(body: Incoming) -> Result<Bytes, GatewayError> {
    match Limited::new(body, MAX_ADMIN_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge {
                limit: MAX_ADMIN_BODY as u64,
            })
        }
        Err(e) => Err(GatewayError::BadRequest(format!(
            "Cannot read the request body: {e}"
        ))),
    }
}

/// `{"n": <positive integer>, "hostnames": [<string>, …]}` (hostnames optional).
pub fn parse_scale_request(body: &[u8]) -> Result<(u32, Vec<String>), GatewayError> {
    let bad = |m: String| GatewayError::BadRequest(m);
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "Request body is not valid JSON ({e}): send {{\"n\": 1, \"hostnames\": [\"S5\"]}}"
        ))
    })?;
    let Value::Object(obj) = value else {
        return Err(bad(
            "Request body must be a JSON object like {\"n\": 1, \"hostnames\": [\"S5\"]}".into(),
        ));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| k.as_str() != "n" && k.as_str() != "hostnames")
    {
        return Err(bad(format!(
            "Unknown field '{k}': expected 'n' and optionally 'hostnames'"
        )));
    }
    let n = match obj.get("n") {
        None => {
            return Err(bad(
                "Field 'n' is missing: give the number of replicas".into()
            ))
        }
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("Field 'n' must be a positive integer, got {v}")))?,
    };
    let hostnames = match obj.get("hostnames") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|h| h.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("Field 'hostnames' must be a list of strings".into()))?,
        Some(_) => return Err(bad("Field 'hostnames' must be a list of strings".into())),
    };
    Ok((n, hostnames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        parse_scale_request(body.as_bytes())
            .expect_err("rejected")
            .to_string()
    }

    #[test]
    fn parses_valid_bodies() {
        assert_eq!(
            parse_scale_request(br#"{"n": 2, "hostnames": ["S5", "S6"]}"#).expect("ok"),
            (2, vec!["S5".into(), "S6".into()])
        );
        assert_eq!(
            parse_scale_request(br#"{"n": 1}"#).expect("ok"),
            (1, vec![])
        );
        assert_eq!(
            parse_scale_request(br#"{"n": 1, "hostnames": null}"#).expect("ok"),
            (1, vec![])
        );
    }

    #[test]
    fn rejects_bad_bodies_with_a_named_problem() {
        assert!(err("").contains("not valid JSON"));
        assert!(err("{n: 1}").contains("not valid JSON"));
        assert!(err("[1]").contains("JSON object"));
        assert!(err("3").contains("JSON object"));
        assert!(err("{}").contains("'n' is missing"));
        assert!(err(r#"{"n": 0}"#).contains("positive integer"));
        assert!(err(r#"{"n": -1}"#).contains("positive integer"));
        assert!(err(r#"{"n": 1.5}"#).contains("positive integer"));
        assert!(err(r#"{"n": "2"}"#).contains("positive integer"));
        assert!(err(r#"{"n": 99999999999}"#).contains("positive integer"));
        assert!(err(r#"{"n": 1, "hostnames": "S5"}"#).contains("list of strings"));
        assert!(err(r#"{"n": 1, "hostnames": [5]}"#).contains("list of strings"));
        assert!(err(r#"{"n": 1, "hostname": ["S5"]}"#).contains("Unknown field 'hostname'"));
    }

    #[test]
    fn admin_paths() {
        for p in ["/rep", "/add", "/rm", "/lb/status", "/lb/x", "/lb"] {
            assert!(is_admin_path(p), "{p}");
        }
        for p in ["/home", "/reps", "/lbx", "/", "/rep/1"] {
            assert!(!is_admin_path(p), "{p}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
