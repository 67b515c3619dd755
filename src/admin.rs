//! The replica API (`/rep`, `/add`, `/rm`) and the gateway's own `/lb/*` endpoints.
//!
//! Owns: routing of these paths, applying the admin guard ([`crate::guard`]) to `/add`, `/rm`,
//! `/lb/roll`, `/lb/status`, `/lb/metrics`, the operator page (`/lb/`, [`crate::ui`]) and `/lb/simulate`
//! ([`crate::whatif`], run off the serving thread, one at a time) (`/rep` and `/lb/health`
//! stay open), and parsing and
//! validating request bodies into controller calls, with a 400 naming the problem for every bad
//! input. Validation that needs state (names in use, counts) is the controller's, so a call is
//! checked and applied in one step.
//! Must not touch: replicas or the ring directly; it asks the controller.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::wire::body::RequestBody;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::answer::{full, success};
use crate::control::membership::ScaleRequest;
use crate::control::ControllerHandle;
use crate::guard::{self, Denied};
use crate::rescue::{BodyError, GatewayError};
use crate::snapshot::Snapshot;
use crate::wire::body::Body;

/// Largest `/add` or `/rm` body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Whether `path` belongs to the gateway rather than to the replicas.
pub fn is_admin_path(path: &str) -> bool {
    matches!(path, "/rep" | "/add" | "/rm") || path == "/lb" || path.starts_with("/lb/")
}

pub async fn handle(
    controller: &ControllerHandle,
    snap: &Snapshot,
    req: Request<RequestBody>,
    client: SocketAddr,
) -> Response<Body> {
    match route(controller, snap, req, client).await {
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
    controller: &ControllerHandle,
    snap: &Snapshot,
    req: Request<RequestBody>,
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
            let request = parse_scale_request(&body)?;
            let (scaled, what) = if path == "/add" {
                (controller.add(request).await?, "added")
            } else {
                (controller.remove(request).await?, "removed")
            };
            Ok(scaled_list(&scaled, what))
        }
        "/lb/roll" => {
            if method != Method::POST {
                return Err(wrong_method("POST"));
            }
            authorize(snap, &req, client)?;
            Ok(success(controller.roll().await?))
        }
        "/lb/health" => Ok(success(json!("ok"))),
        "/lb" => {
            authorize(snap, &req, client)?;
            Ok(crate::ui::redirect_to_page())
        }
        p if crate::ui::is_asset(p) => {
            if method != Method::GET && method != Method::HEAD {
                return Err(wrong_method("GET"));
            }
            authorize(snap, &req, client)?;
            crate::ui::asset(p).ok_or(GatewayError::NoSuchEndpoint { path: path.clone() })
        }
        "/lb/simulate" => {
            if method != Method::POST {
                return Err(wrong_method("POST"));
            }
            authorize(snap, &req, client)?;
            let body = read_body(req.into_body()).await?;
            simulate(controller, &body).await
        }
        "/lb/status" => {
            if method != Method::GET {
                return Err(wrong_method("GET"));
            }
            authorize(snap, &req, client)?;
            Ok(success(controller.status().await?))
        }
        "/lb/metrics" => {
            if method != Method::GET {
                return Err(wrong_method("GET"));
            }
            authorize(snap, &req, client)?;
            // Read on the controller, rendered here: the encoding never holds its loop.
            let text = crate::exposition::render(controller.metrics().await?);
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::exposition::CONTENT_TYPE),
            );
            Ok(resp)
        }
        _ => Err(GatewayError::NoSuchEndpoint { path }),
    }
}

/// Set while a what-if simulation runs: one at a time, so repeated calls cannot take every CPU.
static SIMULATING: AtomicBool = AtomicBool::new(false);

/// Clears [`SIMULATING`] when the simulation ends, however it ends.
struct SimulationSlot;

impl SimulationSlot {
    fn take() -> Option<SimulationSlot> {
        (!SIMULATING.swap(true, Ordering::AcqRel)).then_some(SimulationSlot)
    }
}

impl Drop for SimulationSlot {
    fn drop(&mut self) {
        SIMULATING.store(false, Ordering::Release);
    }
}

/// `POST /lb/simulate`: parse, take a copy of the live state, simulate off the serving thread.
async fn simulate(
    controller: &ControllerHandle,
    body: &[u8],
) -> Result<Response<Body>, GatewayError> {
    let what = crate::whatif::parse(body)?;
    let base = controller.whatif_base().await?;
    let slot = SimulationSlot::take().ok_or(crate::whatif::WhatIfError::Busy)?;
    let answer = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        crate::whatif::run(&base, &what)
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("the simulation failed: {e}")))??;
    let answer = serde_json::to_value(answer)
        .map_err(|e| GatewayError::Internal(format!("cannot render the simulation: {e}")))?;
    Ok(success(answer))
}

fn replica_list(members: &[String]) -> Response<Body> {
    success(json!({"N": members.len(), "replicas": members}))
}

/// `/add` and `/rm`: today's `N` and `replicas`, and the seed's `added` or `removed` (`what`)
/// beside them, so clients written for either shape work.
fn scaled_list(scaled: &crate::control::Scaled, what: &str) -> Response<Body> {
    success(json!({
        "N": scaled.members.len(),
        "replicas": scaled.members,
        what: scaled.changed,
    }))
}

/// The admin guard (`crate::guard`) for this request.
fn authorize(
    snap: &Snapshot,
    req: &Request<RequestBody>,
    client: SocketAddr,
) -> Result<(), GatewayError> {
    let authority = req.uri().authority().map(|a| a.as_str());
    match guard::check(
        &snap.config.admin,
        &snap.replica_ips,
        client.ip(),
        req.headers(),
        authority,
    ) {
        Ok(()) => Ok(()),
        Err(Denied::Token) => Err(GatewayError::Unauthorized {
            path: req.uri().path().to_owned(),
        }),
        Err(reason) => Err(GatewayError::Forbidden {
            client: client.ip().to_canonical(),
            path: req.uri().path().to_owned(),
            reason,
        }),
    }
}

async fn read_body(body: RequestBody) -> Result<Bytes, GatewayError> {
    match Limited::new(body, MAX_ADMIN_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge {
                limit: MAX_ADMIN_BODY as u64,
            })
        }
        Err(e) => Err(BodyError::Unreadable(e.to_string()).into()),
    }
}

/// An `/add` or `/rm` body as sent. Each field's type accepts any JSON (see [`Field`]), so
/// serde fails only on the object's shape (a field not ours, a field twice), and every problem
/// is reported in our words, naming the field and what was sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    #[serde(default)]
    n: Field<NonZeroU32>,
    #[serde(default)]
    hostnames: Option<Field<Vec<String>>>,
}

/// The names [`ScaleBody`] knows, in the order a message lists them.
const SCALE_FIELDS: [&str; 2] = ["n", "hostnames"];

/// A field as the type it should be, or the JSON that was sent instead (quoted back in the
/// error), or absent.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Field<T> {
    Valid(T),
    Invalid(Value),
    #[default]
    #[serde(skip)]
    Missing,
}

/// `{"n": <positive integer>, "hostnames": [<string>, …]}` (hostnames optional or null).
pub fn parse_scale_request(body: &[u8]) -> Result<ScaleRequest, BodyError> {
    // Syntax first, over the whole body, so a broken body is "not valid JSON" with serde's
    // position whatever else is wrong with it.
    serde_json::from_slice::<IgnoredAny>(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    // serde would take a struct from an array too (`[1]` as `{"n": 1}`): valid JSON that is an
    // object starts with `{`.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(BodyError::NotAnObject);
    }
    let fields: ScaleBody = serde_json::from_slice(body).map_err(|e| shape_error(body, e))?;
    let n = match fields.n {
        Field::Valid(n) => n.get(),
        Field::Invalid(v) => return Err(BodyError::BadN(v.to_string())),
        Field::Missing => return Err(BodyError::MissingN),
    };
    let hostnames = match fields.hostnames {
        None => Vec::new(),
        Some(Field::Valid(names)) => names,
        Some(Field::Invalid(_) | Field::Missing) => return Err(BodyError::BadHostnames),
    };
    Ok(ScaleRequest { n, hostnames })
}

/// Why a JSON object is not a [`ScaleBody`]: a field not ours, or one named twice. serde's
/// error says which in its words only, so the object's names are read again, typed: the first
/// unknown one by name, else the duplicate (serde's message names it).
fn shape_error(body: &[u8], e: serde_json::Error) -> BodyError {
    let names = serde_json::from_slice::<BTreeMap<String, IgnoredAny>>(body).unwrap_or_default();
    match names
        .into_keys()
        .find(|k| !SCALE_FIELDS.contains(&k.as_str()))
    {
        Some(unknown) => BodyError::UnknownField(unknown),
        None => BodyError::NotJson(e.to_string()),
    }
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
            ScaleRequest {
                n: 2,
                hostnames: vec!["S5".into(), "S6".into()]
            }
        );
        assert_eq!(
            parse_scale_request(br#"{"n": 1}"#).expect("ok"),
            ScaleRequest {
                n: 1,
                hostnames: vec![]
            }
        );
        assert_eq!(
            parse_scale_request(br#"{"n": 1, "hostnames": null}"#).expect("ok"),
            ScaleRequest {
                n: 1,
                hostnames: vec![]
            }
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
    fn the_messages_quote_what_was_sent_and_name_the_field() {
        assert_eq!(
            err(""),
            "Request body is not valid JSON (EOF while parsing a value at line 1 column 0): \
             send {\"n\": 1, \"hostnames\": [\"S5\"]}"
        );
        // Syntax is judged first, whatever else is wrong.
        assert!(err(r#"{"n": "2", "zzz": 1"#).contains("not valid JSON (EOF"));
        assert!(err(r#"[{"n": 1}]"#).contains("must be a JSON object"));
        assert_eq!(
            err(r#"{"n": null}"#),
            "Field 'n' must be a positive integer, got null"
        );
        assert_eq!(
            err(r#"{"n": "2"}"#),
            "Field 'n' must be a positive integer, got \"2\""
        );
        assert!(err(r#"{"n": 4294967296}"#).contains("got 4294967296"));
        assert!(err(r#"{"n": 1, "hostnames": ["a", null]}"#).contains("list of strings"));
        // The first unknown field by name, whatever else is wrong.
        assert!(err(r#"{"n": "x", "zz": 1, "b": 2}"#).contains("Unknown field 'b'"));
        // A field named twice is ambiguous (which one would a proxy in front have read?).
        assert!(err(r#"{"n": 1, "n": 2}"#).contains("not valid JSON (duplicate field `n`"));
        assert_eq!(
            parse_scale_request(b" \t{\"n\": 4294967295, \"hostnames\": []}\n").expect("ok"),
            ScaleRequest {
                n: u32::MAX,
                hostnames: vec![]
            }
        );
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
}
