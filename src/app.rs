//! Wiring: turns a config into a running gateway.
//!
//! Owns: the start-up order (bind the port first so a busy port fails fast, start the provider
//! and the controller, wait for the replicas, then serve) and the shutdown order (stop
//! accepting, drain in-flight requests, then stop the replicas the gateway started).
//! Must not touch: any decision; it only connects the parts.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::controller::Controller;
use crate::metrics::Metrics;
use crate::server::{serve, Gateway};
use crate::snapshot::Snapshot;

/// How long start-up waits for every replica to answer before serving anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source} (change `listen` in the config or pass --listen, or stop whatever uses that port)")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Provider(#[from] crate::provider::ProviderError),
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AppError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AppError::Bind {
        addr: config.listen,
        source,
    })?;
    let shutdown = shutdown_signal()?;

    let config = Arc::new(config);
    let (events_tx, events_rx) = mpsc::channel(256);
    let provider = crate::provider::from_config(&config, events_tx).await?;
    tracing::info!(
        provider = provider.kind(),
        replicas = config.replicas.count,
        "starting replicas"
    );
    let shared = Arc::new(ArcSwap::from_pointee(Snapshot::initial(config.clone())));
    let metrics = Arc::new(Metrics::default());
    let (controller, handle) = Controller::new(
        config.clone(),
        provider,
        events_rx,
        shared.clone(),
        metrics.clone(),
    )?;
    let controller_task = tokio::spawn(controller.run());

    match tokio::time::timeout(READY_TIMEOUT, handle.wait_ready()).await {
        Ok(_) => tracing::info!("all replicas answer"),
        Err(_) => {
            tracing::warn!(timeout = ?READY_TIMEOUT, "some replicas are not up yet; serving with the ones that are (see /lb/status)")
        }
    }

    // The one line on stdout: scripts and tests wait for it.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{local}");
        let _ = out.flush();
    }
    tracing::info!(addr = %local, "serving");

    let gateway = Arc::new(Gateway {
        shared,
        controller: handle.clone(),
        metrics,
    });
    serve(listener, gateway, shutdown, config.proxy.drain_timeout).await;
    tracing::info!("stopping replicas");
    handle.shutdown().await;
    let _ = controller_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, AppError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
