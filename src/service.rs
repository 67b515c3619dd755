//! One request, as the listener hands it over: to the gateway's own endpoints or to a replica.
//!
//! Owns: [`Service`], the handles every request needs (the published snapshot, the controller,
//! the counters, the connection caps, the access log), and the split between the admin API and
//! the proxy. A request loads the snapshot once here (through its serving thread's
//! [`Worker`]) and uses it to the end; when the snapshot's
//! config logs requests, the response goes back through the access log ([`crate::access_log`]),
//! with the [`Outcome`] the proxy filled in (a replica's head its body carries as bytes lifted
//! out of it first, [`crate::wire::body::lift_head`]). Proxied responses get this gateway's
//! `Via: 1.1 <name>` (RFC 9110 §7.6.3), so an operator sees which gateway answered.
//! Must not touch: connections (the listener) or decisions (admin, proxy, controller).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::wire::body::RequestBody;
use hyper::Request;

use crate::access_log::{AccessLog, Outcome, Started};
use crate::admission::{Admission, Admitted};
use crate::control::ControllerHandle;
use crate::metrics::Metrics;
use crate::snapshot::Shared;
use crate::wire::body::Body;
use crate::worker::Worker;

pub struct Service {
    pub shared: Shared,
    pub admission: Arc<Admission>,
    pub controller: ControllerHandle,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    /// `1.1 <gateway name>`.
    pub via: http::HeaderValue,
    /// The open tunnels (upgraded connections).
    pub tunnels: Arc<crate::tunnel::Tunnels>,
}

/// The `Via` value of a gateway named `name` (names are reduced to token characters by
/// [`crate::config::gateway_name`]).
pub fn via(name: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("1.1 {name}"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("1.1 ringgate"))
}

impl Service {
    /// Answers `req` from the connection `conn` (its place in the caps, its client's address)
    /// with the state of the serving thread it came to (`worker`).
    pub async fn handle(
        &self,
        req: Request<RequestBody>,
        conn: &Arc<Admitted>,
        client: SocketAddr,
        worker: &Worker,
    ) -> hyper::Response<Body> {
        self.metrics.requests.add(1);
        let snap = worker.snapshot();
        let logged = Started::capture(&snap.config, &req, client).map(|s| (s, Arc::clone(&snap)));
        let mut outcome = Outcome::default();
        let resp = if crate::admin::is_admin_path(req.uri().path()) {
            crate::admin::handle(&self.controller, &snap, req, client).await
        } else {
            let gateway = crate::proxy::Gateway {
                metrics: &self.metrics,
                controller: &self.controller,
                tunnels: &self.tunnels,
                worker,
            };
            let mut resp =
                crate::proxy::forward(&snap, &gateway, req, conn, client, &mut outcome).await;
            resp.headers_mut()
                .append(http::header::VIA, self.via.clone());
            resp
        };
        match logged {
            None => resp,
            Some((started, snap)) => {
                // The access log wraps the body: a replica's head it carries (as bytes, for an
                // HTTP/1 client) is lifted out of it first.
                let resp = crate::wire::body::lift_head(resp);
                // A request held at zero replicas went to a replica of a later snapshot.
                let snap = match outcome.held {
                    Some(_) => Arc::clone(&worker.snapshot()),
                    None => snap,
                };
                started.finish(resp, outcome, snap, &worker.lines)
            }
        }
    }
}
