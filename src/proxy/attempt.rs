//! One attempt of a request at one replica.
//!
//! Owns: [`Attempt::at`]: a place at the replica (`proxy.max_requests_per_replica` and its
//! queue), the request sent through the connector (written by the connection's kind) with its
//! deadline, and the replica's
//! figures that follow from the answer or the failure: its latency, its answers by class and
//! the 5xx-in-a-row outlier report for an answer; for a failure that is the replica's, its
//! failure count and (for a failed connect) the passive-failure report to the controller. A
//! failure comes back typed ([`Failure`]: whose it was), never as a string or a flag.
//! Must not touch: which replica (the route and the retry decision choose), or the client's
//! answer (the caller maps the last failure).

use std::sync::atomic::Ordering;
use std::time::Instant;

use std::net::SocketAddr;

use http::request::Parts;
use http::Response;

use crate::access_log::Outcome;
use crate::admission::{Admitted, Budgets};
use crate::control::ControllerHandle;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::proxy::failure::{Failure, Kind, Whose};
use crate::snapshot::{InFlight, Snapshot, Upstream};
use crate::upstream;
use crate::wire::body::ReplicaBody;
use crate::wire::client::head::RequestFraming;
use crate::wire::client::{Forwarded, Request};

/// What every attempt of one request shares.
pub struct Attempt<'a> {
    pub snap: &'a Snapshot,
    pub metrics: &'a Metrics,
    pub controller: &'a ControllerHandle,
    pub client: &'a Admitted,
    pub budgets: &'a Budgets,
    /// The client's request head (each connection's kind writes it its way).
    pub parts: &'a Parts,
    /// The client's address (`X-Forwarded-For`).
    pub client_addr: SocketAddr,
    pub framing: RequestFraming,
    /// `proxy.request_timeout`, less what the request already waited for its body to start.
    pub request_timeout: std::time::Duration,
    /// The protocols the client asked to switch to, when the request is forwarded as an
    /// upgrade (`crate::proxy::upgrade`).
    pub upgrade: Option<&'a http::HeaderValue>,
    /// The request is a gRPC call ([`crate::grpc::is_grpc`]).
    pub grpc: bool,
    /// The serving thread's connections to the replicas.
    pub pools: &'a upstream::Pools,
}

impl Attempt<'_> {
    /// Sends the request to `replica` (counted there with `reserved`, if the route took a place
    /// already) and returns its response, or the failure.
    pub async fn at(
        &self,
        replica: &Upstream,
        reserved: Option<InFlight>,
        body: &mut ProxyBody,
        outcome: &mut Outcome,
    ) -> Result<Response<ReplicaBody>, Failure> {
        let cfg = &self.snap.config;
        let counted = match reserved {
            Some(counted) => counted,
            None => self.place_at(replica).await?,
        };
        let short_of_descriptors = self
            .client
            .admission()
            .short_of_descriptors(cfg.replicas.max_replicas);
        let started = Instant::now();
        let req = Request {
            addr: replica.addr,
            tls: self.snap.upstream_tls.as_deref(),
            connect_timeout: cfg.proxy.connect_timeout,
            read_timeout: cfg.proxy.read_timeout,
            forwarded: Forwarded {
                parts: self.parts,
                client: self.client_addr,
                proto: match self.parts.extensions.get::<crate::tls::Https>() {
                    Some(_) => "https",
                    None => "http",
                },
                framing: self.framing,
                upgrade: self.upgrade,
            },
            // Idle replica connections are descriptors too: none kept while they are short.
            keep_idle: !short_of_descriptors,
            // An upgrade is HTTP/1.1's: a tunnel's replica is always reached over HTTP/1.1.
            http2: self.upgrade.is_none()
                && cfg.proxy.upstream_protocol.uses_h2(self.parts.version),
            // A gRPC call's status travels in trailers: HTTP/2 or nothing.
            http2_only: self.grpc,
            http2_keepalive: cfg.proxy.http2_keepalive,
            deadline: tokio::time::Instant::now() + self.request_timeout,
        };
        match upstream::send(&req, body, counted, self.pools).await {
            Ok(resp) => {
                self.answered(replica, resp.status().as_u16(), started, outcome);
                Ok(resp)
            }
            Err(e) => {
                let (sent, held) = (!body.untouched(), body.resendable());
                let failure = Failure::of(&e, sent, held, short_of_descriptors);
                self.failed(replica, &failure, outcome);
                Err(failure)
            }
        }
    }

    /// A place at `replica` under `proxy.max_requests_per_replica`, waiting in its queue.
    async fn place_at(&self, replica: &Upstream) -> Result<InFlight, Failure> {
        let cap = self.budgets.max_requests_per_replica;
        let wait = self.snap.config.proxy.queue_timeout;
        InFlight::admit(&replica.stats, cap, wait)
            .await
            .map_err(|cause| {
                self.metrics
                    .requests_refused_replica
                    .fetch_add(1, Ordering::Relaxed);
                Failure::busy(format!(
                    "carries proxy.max_requests_per_replica ({cap}) requests and {cause}"
                ))
            })
    }

    fn answered(&self, replica: &Upstream, status: u16, started: Instant, outcome: &mut Outcome) {
        let took = started.elapsed();
        outcome.upstream = Some(took);
        replica
            .stats
            .latency
            .observe_with(&self.metrics.upstream_latency, took);
        let in_a_row = replica.stats.record_response(status);
        let threshold = u64::from(self.snap.config.health.eject_after_5xx);
        if threshold > 0 && in_a_row == threshold {
            self.controller
                .outlier(replica.id, replica.incarnation, in_a_row);
        }
    }

    fn failed(&self, replica: &Upstream, failure: &Failure, outcome: &mut Outcome) {
        outcome.connect_failed = failure.is_connect() && failure.whose == Whose::Replica;
        match (failure.whose, failure.kind) {
            // A GOAWAY or a refused stream is the replica managing its load, not failing; a
            // replica that chose HTTP/1.1 for a gRPC call serves HTTP/1.1 well.
            (Whose::Replica, Kind::Unprocessed | Kind::NotHttp2) => {}
            (Whose::Replica, _) => {
                replica.stats.failures.fetch_add(1, Ordering::Relaxed);
                if failure.is_connect() {
                    self.controller.passive_failure(
                        replica.id,
                        replica.incarnation,
                        failure.detail.clone(),
                    );
                }
            }
            (Whose::Gateway, Kind::ConnectTimeout) => {
                self.metrics
                    .connect_timeouts_inconclusive
                    .fetch_add(1, Ordering::Relaxed);
            }
            (Whose::Gateway, Kind::LocalResource) => {
                self.client.admission().note_exhausted();
                tracing::debug!(replica = %replica.name, detail = %failure.detail, "local resource error; not the replica's fault");
            }
            _ => {}
        }
    }
}
