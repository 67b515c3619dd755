//! One request, as the listener hands it over: to the gateway's own endpoints or to a replica.
//!
//! Owns: [`Service`], the handles every request needs (the published snapshot, the controller,
//! the counters, the connection caps, the access log), and the split between the admin API and
//! the proxy. A request loads the snapshot once here and uses it to the end; when the snapshot's
//! config logs requests, the response goes back through the access log ([`crate::access_log`]),
//! with the [`Outcome`] the proxy filled in.
//! Must not touch: connections (the listener) or decisions (admin, proxy, controller).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;

use crate::access_log::{AccessLog, Outcome, Started};
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
    pub access_log: Arc<AccessLog>,
}

impl Service {
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> hyper::Response<Body> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let snap = self.shared.load_full();
        let logged = Started::capture(&snap.config, &req, client).map(|s| (s, snap.clone()));
        let mut outcome = Outcome::default();
        let resp = if crate::admin::is_admin_path(req.uri().path()) {
            crate::admin::handle(&self.controller, &snap, req, client).await
        } else {
            let (metrics, controller) = (&self.metrics, &self.controller);
            crate::proxy::forward(snap, metrics, controller, req, client, &mut outcome).await
        };
        match logged {
            None => resp,
            Some((started, snap)) => started.finish(resp, outcome, snap, &self.access_log),
        }
    }
}
