//! Wiring: turns a config into a running gateway.
//!
//! Owns: the start-up order (bind the port first so a busy port fails fast, start the provider
//! and the controller, wait for the replicas, then serve on one thread per CPU) and the shutdown
//! order (stop accepting, drain in-flight requests, then stop the replicas the gateway started).
//! Must not touch: any decision; it only connects the parts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
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
    #[error("cannot start a serving thread: {0}")]
    Thread(std::io::Error),
}

/// Runs the gateway until SIGTERM or SIGINT. `config_path` is watched for live edits.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), AppError> {
    let (listeners, local) = bind_listeners(config.listen, serving_threads())?;
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
    let _ = crate::listening::announce(local);
    tracing::info!(addr = %local, "serving");

    let gateway = Arc::new(Gateway {
        shared,
        controller: handle.clone(),
        metrics,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::new();
    for (n, listener) in listeners.into_iter().enumerate() {
        let (gateway, mut stop_rx, drain) =
            (gateway.clone(), stop_rx.clone(), config.proxy.drain_timeout);
        let thread = std::thread::Builder::new()
            .name(format!("ringgate-serve-{n}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => return tracing::error!(error = %e, "cannot start a serving thread"),
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!(error = %e, "cannot register a listener"),
                    };
                    let stop = async move {
                        let _ = stop_rx.wait_for(|stop| *stop).await;
                    };
                    serve(listener, gateway, stop, drain).await;
                });
            })
            .map_err(AppError::Thread)?;
        threads.push(thread);
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    watcher.abort();
    tracing::info!("stopping replicas");
    handle.shutdown().await;
    let _ = controller_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// One serving thread per CPU: each runs its own current-thread runtime with its own listener on
/// the same address (`SO_REUSEPORT`: the kernel spreads connections over them), so a request,
/// its upstream connection and their wake-ups stay on one thread.
fn serving_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Binds `n` listeners on `addr` with `SO_REUSEPORT` (the first one picks the port when `addr`
/// has port 0) and returns them as std listeners, for each serving thread to register with its
/// own runtime.
fn bind_listeners(
    addr: std::net::SocketAddr,
    n: usize,
) -> Result<(Vec<std::net::TcpListener>, std::net::SocketAddr), AppError> {
    let bind_error = |source| AppError::Bind { addr, source };
    let mut local = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let socket = if local.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(bind_error)?;
        socket.set_reuseaddr(true).map_err(bind_error)?;
        socket.set_reuseport(true).map_err(bind_error)?;
        socket.bind(local).map_err(bind_error)?;
        let listener = socket.listen(1024).map_err(bind_error)?;
        local = listener.local_addr().map_err(bind_error)?;
        out.push(listener.into_std().map_err(bind_error)?);
    }
    Ok((out, local))
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
