//! One request, as the listener hands it over: to the gateway's own endpoints or to a replica.
//!
//! Owns: [`Service`], the handles every request needs (the published snapshot, the controller,
//! the counters, the connection caps), and the split between the admin API and the proxy. A request loads the
//! snapshot once here and uses it to the end.
//! Must not touch: connections (the listener) or decisions (admin, proxy, controller).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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
}

impl Service {
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> hyper::Response<Body> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let snap = self.shared.load_full();
        if crate::admin::is_admin_path(req.uri().path()) {
            crate::admin::handle(&self.controller, &snap, req, client).await
        } else {
            crate::proxy::forward(snap, &self.metrics, &self.controller, req, client).await
        }
    }
}
