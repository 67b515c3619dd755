//! The listener: accepts connections, serves HTTP/1.1 (keep-alive) and HTTP/2, sends each request
//! to the admin API or the proxy, and drains connections on shutdown.
//!
//! Owns: [`Gateway`], the handles a request needs, and [`serve`], which takes an already bound
//! listener (so tests bind `127.0.0.1:0`) and a shutdown future.
//! Must not touch: routing decisions (proxy) or state (controller).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::controller::ControllerHandle;
use crate::metrics::Metrics;
use crate::snapshot::Shared;

/// What every request handler shares: the published snapshot, the controller and the counters.
pub struct Gateway {
    pub shared: Shared,
    pub controller: ControllerHandle,
    pub metrics: Arc<Metrics>,
}

impl Gateway {
    /// Handles one request: loads the snapshot once and uses it to the end.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> hyper::Response<crate::error::Body> {
        let snap = self.shared.load_full();
        if crate::admin::is_admin_path(req.uri().path()) {
            crate::admin::handle(self, snap, req, client).await
        } else {
            crate::proxy::forward(snap, &self.metrics, &self.controller, req, client).await
        }
    }
}

/// Serves connections from `listener` until `shutdown` completes, then stops accepting and gives
/// open connections up to `drain_timeout` to finish their requests.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let header_timeout = gw.shared.load().config.proxy.header_read_timeout;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let gw = gw.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let gw = gw.clone();
            async move { Ok::<_, Infallible>(gw.handle(req, client).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(client = %client, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; draining open connections");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?drain_timeout, "drain timed out; closing the remaining connections");
    }
}
