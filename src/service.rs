//! One request, as the listener hands it over: to the gateway's own endpoints or to a replica.
//!
//! Owns: [`Service`], the handles every request needs (the published snapshot, the controller,
//! the counters, the connection caps), and the split between the admin API and the proxy. A request loads the
//! snapshot once here and uses it to the end. Proxied responses get this gateway's
//! `Via: 1.1 <name>` (RFC 9110 §7.6.3), so an operator sees which gateway answered.
//! Must not touch: connections (the listener) or decisions (admin, proxy, controller).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;

use crate::admission::Admission;
use crate::control::ControllerHandle;
use crate::error::Body;
use crate::metrics::Metrics;
use crate::snapshot::Shared;

pub struct Service {
    pub shared: Shared,
    pub admission: Arc<Admission>,
    pub controller: ControllerHandle,
    pub metrics: Arc<Metrics>,
    /// `1.1 <gateway name>`.
    pub via: http::HeaderValue,
}

/// The `Via` value of a gateway named `name` (names are reduced to token characters by
/// [`crate::config::gateway_name`]).
pub fn via(name: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("1.1 {name}"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("1.1 ringgate"))
}

impl Service {
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> hyper::Response<Body> {
        let snap = self.shared.load_full();
        if crate::admin::is_admin_path(req.uri().path()) {
            crate::admin::handle(&self.controller, &snap, req, client).await
        } else {
            let mut resp =
                crate::proxy::forward(snap, &self.metrics, &self.controller, req, client).await;
            resp.headers_mut()
                .append(http::header::VIA, self.via.clone());
            resp
        }
    }
}
