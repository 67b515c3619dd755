//! Wiring: turns a config into a running gateway.
//!
//! Owns: the start-up order (bind the port first so a busy port fails fast, start the provider
//! and the controller, wait for the replicas, then serve) and the shutdown order (stop
//! accepting, drain in-flight requests, then stop the replicas the gateway started).
//! Must not touch: any decision; it only connects the parts.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::controller::Controller;
use crate::metrics::Metrics;
use crate::policy::{read_policy_files, PolicyFiles, PolicySet};
use crate::server::{serve, Gateway};
use crate::snapshot::Snapshot;

/// How long start-up waits for the replicas it started to answer before serving anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Static replicas are not ours to wait for: start-up waits for one round of checks at most.
const STATIC_READY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Runs the gateway until SIGTERM or SIGINT. `config_path` is watched for live edits.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), AppError> {
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
    let (policy, policy_files) = load_policy(&config);
    let (events_tx, events_rx) = mpsc::channel(256);
    let provider = crate::provider::from_config(&config, events_tx).await?;
    let manages = provider.manages_replicas();
    tracing::info!(
        provider = provider.kind(),
        replicas = config.replicas.count,
        "starting replicas"
    );
    let shared = Arc::new(ArcSwap::from_pointee(Snapshot::initial(config.clone())));
    let metrics = Arc::new(Metrics::default());
    let (controller, handle) = Controller::new(
        config.clone(),
        policy,
        provider,
        events_rx,
        shared.clone(),
        metrics.clone(),
    )?;
    let controller_task = tokio::spawn(controller.run());
    let config_text = config_path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let watcher = crate::watcher::spawn(
        config_path,
        config_text,
        &config,
        policy_files,
        handle.clone(),
    );

    let ready_timeout = if manages {
        READY_TIMEOUT
    } else {
        STATIC_READY_TIMEOUT.min(config.health.timeout + Duration::from_millis(100))
    };
    match tokio::time::timeout(ready_timeout, handle.wait_ready()).await {
        Ok(_) => tracing::info!("all replicas answer"),
        Err(_) => {
            tracing::warn!(timeout = ?ready_timeout, "some replicas are not up yet; serving with the ones that are (see /lb/status)")
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
    watcher.abort();
    tracing::info!("stopping replicas");
    handle.shutdown().await;
    let _ = controller_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The policy set the gateway starts with. A set that fails to load is logged and shown in
/// `/lb/status`, and the gateway starts with the built-in defaults.
fn load_policy(config: &Config) -> (Result<PolicySet, String>, Option<PolicyFiles>) {
    let files = match read_policy_files(&config.policy.dir) {
        Ok(f) => f,
        Err(e) => return (Err(e.to_string()), None),
    };
    let set = PolicySet::from_sources(files.clone(), config.policy.limits(), 1)
        .map_err(|e| e.to_string());
    match &set {
        Ok(p) => {
            tracing::info!(dir = %config.policy.dir.display(), files = ?p.files(), hooks = ?p.hooks(), "policy loaded")
        }
        Err(e) => tracing::error!(error = %e, "policy rejected; using the built-in defaults"),
    }
    (set, Some(files))
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
