//! The listener: accepts connections, serves HTTP/1.1 (keep-alive) and HTTP/2 on them, hands
//! each request to the [`Service`], and drains connections on shutdown.
//!
//! Owns: [`serve`], which takes an already bound listener (so tests bind `127.0.0.1:0`) and a
//! shutdown future, and everything about connections: protocol, timeouts, graceful drain.
//! Must not touch: requests' meaning (the service) or state (the controller).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::service::Service;

/// Serves connections from `listener` until `shutdown` completes, then stops accepting and gives
/// open connections up to `drain_timeout` to finish their requests.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
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
        let header_timeout = service.shared.load().config.proxy.header_read_timeout;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let service = service.clone();
        let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
            let service = service.clone();
            async move { Ok::<_, Infallible>(service.handle(req, client).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), handler)
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
