//! The gateway as a library: run it on listeners and a shutdown future you give it.
//!
//! Owns: the start-up order (load the TLS certificates, start the provider and the controller,
//! wait for the replicas, then serve on one thread per CPU, each with its plain and its TLS
//! listener, beside the heap's idle trim of [`crate::memory`]) and the shutdown order (stop
//! accepting, drain in-flight requests, then stop the replicas the gateway started), in the
//! shape of mini-redis's `server::run(listener, shutdown)`: `main.rs` binds, installs signal
//! handlers and prints; tests start a gateway in-process on `127.0.0.1:0`. Shutdown is bounded:
//! a serving thread that has not ended `proxy.drain_timeout` (plus [`JOIN_GRACE`]) after the
//! stop is left behind, so [`Gateway::serve`] returns and the process can exit whatever that
//! thread is doing; the [`crate::watchdog`] reports such a thread while it runs.
//! Must not touch: any decision, process-wide state (signals, tracing, rlimits; the idle trim
//! touches only the allocator's free pages) or stdout; it only connects the parts.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

use crate::access_log::AccessLog;
use crate::admission::{nofile_limit, Admission};
use crate::config::Config;
use crate::control::{Controller, ControllerHandle, Parts, Published};
use crate::health::probe::HttpProber;
use crate::listener::Mode;
use crate::metrics::Metrics;
use crate::policy::{read_policy_files, PolicyFiles, PolicySet};
use crate::service::Service;
use crate::snapshot::Snapshot;
use crate::spread::{Slot, Spread, ThreadLoad};
use crate::tls::upstream::{UpstreamTls, UpstreamTlsError};
use crate::tls::{Tls, TlsError};
use crate::watchdog::Watchdog;
use crate::worker::Worker;

/// How long start-up waits for the replicas it started to answer before serving anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Static replicas are not ours to wait for: start-up waits for one round of checks at most.
const STATIC_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after `proxy.drain_timeout` shutdown still waits for the serving threads to end
/// (their listeners close the last connections at the drain timeout): past it, a thread still
/// running is held by something that will not end (a policy hook or a library call), and the
/// gateway stops without it.
pub const JOIN_GRACE: Duration = Duration::from_millis(250);
/// How long the tunnels closed at the end of a drain get to send their close (a WebSocket's
/// close frame waits for a frame boundary, then the client's answer is read for a moment).
const TUNNEL_CLOSE_GRACE: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source} (change `{key}` in the config{}, or stop whatever uses that port)", if *key == "listen" { " or pass --listen" } else { "" })]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("TLS to the replicas: {0}")]
    UpstreamTls(#[from] UpstreamTlsError),
    #[error("tls.enabled is {enabled} but the listeners {}: bind them with Listeners::for_config", if *enabled { "have no TLS listener" } else { "include a TLS listener" })]
    TlsListener { enabled: bool },
    #[error(transparent)]
    Provider(#[from] crate::provider::ProviderError),
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    #[error("cannot start a serving thread: {0}")]
    Thread(std::io::Error),
}

/// One serving thread per CPU: each runs its own current-thread runtime with its own listener
/// on the same address (`SO_REUSEPORT`: the kernel spreads connections over them), so a
/// request, its upstream connection and their wake-ups stay on one thread.
pub fn serving_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Listening sockets of one address, one per serving thread.
struct Bound {
    sockets: Vec<std::net::TcpListener>,
    local: SocketAddr,
}

impl Bound {
    /// Binds `n` listeners on `addr` with `SO_REUSEPORT` (the first one picks the port when
    /// `addr` has port 0). `key` names the config key of the address in errors.
    fn bind(addr: SocketAddr, n: usize, key: &'static str) -> Result<Bound, StartError> {
        let (sockets, local) =
            bind_reuseport(addr, n).map_err(|source| StartError::Bind { addr, key, source })?;
        Ok(Bound { sockets, local })
    }
}

/// Binds `n` (at least one) listening sockets on `addr` with `SO_REUSEPORT`, so the kernel
/// spreads new connections over them, one per serving thread; the first picks the port when
/// `addr` has port 0. Returns them with the address they listen on. Call it inside a tokio
/// runtime (listening registers the socket with its reactor; the std sockets returned are
/// free of it).
pub fn bind_reuseport(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let mut local = addr;
    let mut sockets = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let socket = if local.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(local)?;
        let listener = socket.listen(1024)?;
        local = listener.local_addr()?;
        sockets.push(listener.into_std()?);
    }
    Ok((sockets, local))
}

/// The bound listening sockets: plain HTTP on `listen`, TLS on `tls.listen`, or both; each with
/// one socket per serving thread.
pub struct Listeners {
    plain: Option<Bound>,
    tls: Option<Bound>,
}

impl Listeners {
    /// Binds `n` plain-HTTP listeners on `addr` with `SO_REUSEPORT` (the first one picks the
    /// port when `addr` has port 0).
    pub fn bind(addr: SocketAddr, n: usize) -> Result<Listeners, StartError> {
        Ok(Listeners {
            plain: Some(Bound::bind(addr, n, "listen")?),
            tls: None,
        })
    }

    /// Binds what `config` asks for: `listen` unless `tls.http = "off"`, and `tls.listen` when
    /// TLS is on; `n` sockets each.
    pub fn for_config(config: &Config, n: usize) -> Result<Listeners, StartError> {
        let plain = config
            .tls
            .serves_plain()
            .then(|| Bound::bind(config.listen, n, "listen"))
            .transpose()?;
        let tls = config
            .tls
            .enabled
            .then(|| Bound::bind(config.tls.listen, n, "tls.listen"))
            .transpose()?;
        Ok(Listeners { plain, tls })
    }

    /// The plain listener's address, or the TLS listener's when there is no plain one.
    pub fn local_addr(&self) -> SocketAddr {
        match (&self.plain, &self.tls) {
            (Some(b), _) | (None, Some(b)) => b.local,
            (None, None) => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().map(|b| b.local)
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|b| b.local)
    }
}

/// A started gateway: replicas are up (or given up on), the controller and the watcher run.
/// [`Gateway::serve`] serves until shutdown.
pub struct Gateway {
    listeners: Listeners,
    tls: Option<Arc<Tls>>,
    drain_timeout: Duration,
    service: Arc<Service>,
    /// Open connections per serving thread (both listeners of a thread count on it).
    thread_load: Arc<ThreadLoad>,
    watchdog: Arc<Watchdog>,
    controller_task: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Starts the provider, the controller and the watcher (`config_path` is watched for live
    /// edits when given), and waits, bounded, for the replicas to answer.
    pub async fn start(
        config: Config,
        listeners: Listeners,
        config_path: Option<PathBuf>,
    ) -> Result<Gateway, StartError> {
        let config = Arc::new(config);
        if config.tls.enabled != listeners.tls.is_some() {
            return Err(StartError::TlsListener {
                enabled: config.tls.enabled,
            });
        }
        let metrics = Arc::new(Metrics::default());
        // Before any replica starts: a gateway does not start on a bad certificate.
        let tls = match config.tls.enabled {
            true => Some(Tls::new(&config.tls, metrics.clone())?),
            false => None,
        };
        // Before any replica starts, like the certificates; from here on the controller keeps
        // it (published in the snapshot, given to the prober) and replaces it on a config edit.
        let upstream_tls =
            UpstreamTls::from_config(&config.provider, crate::tls::provider())?.map(Arc::new);
        // Every serving thread should find a Lua state of a new policy set ready (they never
        // build one), and one more is kept for a rebuild after a memory error.
        let serving = listeners
            .plain
            .as_ref()
            .map_or(0, |b| b.sockets.len())
            .max(listeners.tls.as_ref().map_or(0, |b| b.sockets.len()));
        crate::policy::set_ready_states(serving + 1);
        // Made here, before the controller, so `/lb/status` and `/lb/metrics` are handed them
        // once rather than finding them later; the serving threads count on them from `serve`.
        let thread_load = Arc::new(ThreadLoad::new(serving));
        let watchdog = Watchdog::new(serving);
        let (policy, policy_files) = load_policy(&config);
        let (events_tx, events_rx) = mpsc::channel(256);
        let provider = crate::provider::from_config(&config, events_tx).await?;
        let manages = provider.mode().starts_replicas();
        tracing::info!(
            provider = provider.kind(),
            replicas = config.replicas.count,
            "starting replicas"
        );
        let shared = Arc::new(ArcSwap::from_pointee(Snapshot::initial(config.clone())));
        let tunnels = crate::tunnel::Tunnels::new();
        let (controller, handle) = Controller::new(Parts {
            config: config.clone(),
            policy,
            provider,
            provider_events: events_rx,
            prober: Arc::new(HttpProber::default()),
            upstream_tls,
            shared: shared.clone(),
            metrics: metrics.clone(),
            published: Published {
                tls: tls.clone(),
                thread_load: Some(thread_load.clone()),
                watchdog: Some(watchdog.clone()),
                tunnels: Some(tunnels.clone()),
            },
            name: config.gateway_name(),
        })?;
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
            tls.clone(),
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
        let admission = Arc::new(Admission::new(nofile_limit(), metrics.clone()));
        let access_log = AccessLog::start(metrics.clone()).map_err(StartError::Thread)?;
        let budgets = admission.budgets(&config.proxy, config.replicas.max_replicas);
        tracing::info!(
            nofile = admission.nofile(),
            max_connections = budgets.max_connections,
            max_connections_per_ip = config.proxy.max_connections_per_ip,
            max_requests = budgets.max_requests,
            max_requests_per_ip = budgets.max_requests_per_ip,
            max_requests_per_replica = budgets.max_requests_per_replica,
            "client connection and request limits"
        );
        Ok(Gateway {
            listeners,
            tls,
            drain_timeout: config.proxy.drain_timeout,
            service: Arc::new(Service {
                shared,
                admission,
                controller: handle,
                metrics,
                via: crate::service::via(&config.gateway_name()),
                access_log,
                tunnels,
            }),
            thread_load,
            watchdog,
            controller_task,
            watcher,
        })
    }

    /// The plain listener's address, or the TLS listener's when there is no plain one.
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.local_addr()
    }

    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.listeners.plain_addr()
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.listeners.tls_addr()
    }

    pub fn controller(&self) -> &ControllerHandle {
        &self.service.controller
    }

    /// The access log, to reopen its file on SIGHUP.
    pub fn access_log(&self) -> &Arc<AccessLog> {
        &self.service.access_log
    }

    /// Serves on every listener until `shutdown` completes, then stops accepting, drains
    /// in-flight requests (up to `proxy.drain_timeout`) and stops the replicas.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let (plain_addr, tls_addr) = (self.plain_addr(), self.tls_addr());
        tracing::info!(http = ?plain_addr, https = ?tls_addr, "serving");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let trimmer = tokio::spawn(crate::memory::trim_when_quiet(self.service.metrics.clone()));
        let rehoming = tokio::spawn(crate::tunnel::rehome::run(
            self.service.tunnels.clone(),
            self.service.shared.clone(),
        ));
        let mut threads = Vec::new();
        let https_port = tls_addr.map(|a| a.port());
        let mut plain = self
            .listeners
            .plain
            .map(|b| b.sockets)
            .unwrap_or_default()
            .into_iter();
        let mut tls = self
            .listeners
            .tls
            .map(|b| b.sockets)
            .unwrap_or_default()
            .into_iter();
        // One count of open connections per serving thread, over both listeners; one set of
        // hand-over channels per listening address.
        let (load, watchdog) = (self.thread_load, self.watchdog);
        let watching = tokio::spawn(watchdog.clone().watch());
        let mut plain_slots = Spread::slots(plain.len(), &load).into_iter();
        let mut tls_slots = Spread::slots(tls.len(), &load).into_iter();
        for n in 0.. {
            let listeners: Vec<(std::net::TcpListener, Mode, Slot)> = plain
                .next()
                .zip(plain_slots.next())
                .map(|(l, slot)| (l, Mode::Plain { https_port }, slot))
                .into_iter()
                .chain(
                    tls.next()
                        .zip(tls_slots.next())
                        .zip(self.tls.clone())
                        .map(|((l, slot), t)| (l, Mode::Tls(t), slot)),
                )
                .collect();
            if listeners.is_empty() {
                break;
            }
            let (service, stop_rx, drain) =
                (self.service.clone(), stop_rx.clone(), self.drain_timeout);
            let beats = watchdog.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringgate-serve-{n}"))
                .spawn(move || {
                    crate::per_thread::enter_serving_thread(n);
                    crate::policy::enter_serving_thread();
                    serve_thread(listeners, service, stop_rx, drain, beats, n)
                })
                .map_err(StartError::Thread);
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = stop_tx.send(true);
                    trimmer.abort();
                    rehoming.abort();
                    watching.abort();
                    return Err(e);
                }
            }
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        trimmer.abort();
        rehoming.abort();
        // Tunnels still open get their closes sent after the drain timeout.
        let grace = match self.service.tunnels.open() {
            0 => JOIN_GRACE,
            _ => JOIN_GRACE + TUNNEL_CLOSE_GRACE,
        };
        if !joined_within(threads, self.drain_timeout + grace).await {
            tracing::error!(timeout = ?(self.drain_timeout + grace), "a serving thread did not stop within proxy.drain_timeout (see the watchdog's report); stopping without it");
        }
        watching.abort();
        // The serving threads handed their buffered lines over as they ended.
        let log = self.service.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        self.watcher.abort();
        tracing::info!("stopping replicas");
        self.service.controller.shutdown().await;
        let _ = self.controller_task.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Whether every thread ended within `bound`. The joins run on a plain thread of their own,
/// not a blocking task of the runtime: a runtime waits for its blocking tasks when it is
/// dropped, so a join stuck on a thread that never ends would keep `main` from exiting.
async fn joined_within(threads: Vec<std::thread::JoinHandle<()>>, bound: Duration) -> bool {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let joiner = std::thread::Builder::new()
        .name("ringgate-join".into())
        .spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            let _ = done_tx.send(());
        });
    if joiner.is_err() {
        // Without a joiner, wait the bound: the threads had that long to drain.
        tokio::time::sleep(bound).await;
        return false;
    }
    tokio::time::timeout(bound, done_rx).await.is_ok()
}

/// Tunnels end last in a drain: from the stop they have `proxy.drain_timeout` to end on their
/// own (while the requests drain), then every one still open is closed (a WebSocket with
/// `1001`), and this thread's runtime, which runs their tasks, waits [`TUNNEL_CLOSE_GRACE`]
/// for the closes to go out.
async fn drain_tunnels(
    tunnels: &crate::tunnel::Tunnels,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let _ = stop_rx.wait_for(|stop| *stop).await;
    if tokio::time::timeout(drain, tunnels.all_ended())
        .await
        .is_ok()
    {
        return;
    }
    let closed = tunnels.close_all(crate::tunnel::Close::Shutdown);
    if closed > 0 {
        tracing::info!(tunnels = closed, "drain: closing the tunnels still open");
    }
    let _ = tokio::time::timeout(TUNNEL_CLOSE_GRACE, tunnels.all_ended()).await;
}

/// One serving thread: its own current-thread runtime serving its listeners (plain, TLS or
/// both) until stopped, with the watchdog's heartbeat of thread `n` beside them.
fn serve_thread(
    listeners: Vec<(std::net::TcpListener, Mode, Slot)>,
    service: Arc<Service>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    watchdog: Arc<Watchdog>,
    n: usize,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return tracing::error!(error = %e, "cannot start a serving thread"),
    };
    // Its idle tunnels rest in a table of its own, watched on its runtime (without one, out of
    // descriptors at start, they keep their tasks).
    let resting = {
        let _entered = runtime.enter();
        crate::tunnel::resting::Table::new()
            .inspect_err(|e| tracing::warn!(error = %e, "idle tunnels will keep their tasks: no epoll set for them"))
            .ok()
    };
    let (door, resting) = resting.unzip();
    // This thread's own state, dropped when it ends (its access-log lines then go to the
    // writer, before the gateway closes the log).
    let worker = Arc::new(Worker::new(&service.shared, &service.access_log, door));
    runtime.block_on(async move {
        let anchor = tokio::spawn(crate::listener::timer_anchor());
        let resting = resting.map(|table| tokio::spawn(table.run()));
        let beating = tokio::spawn(watchdog.heartbeat(n));
        let sweeping = tokio::spawn(crate::upstream::pool::sweep_every(Arc::clone(
            &worker.upstream.h1,
        )));
        let tunnels = drain_tunnels(&service.tunnels, stop_rx.clone(), drain);
        let serving = listeners.into_iter().map(|(listener, mode, slot)| {
            let (service, mut stop_rx) = (service.clone(), stop_rx.clone());
            let worker = worker.clone();
            async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "cannot register a listener"),
                };
                let stop = async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                };
                crate::listener::serve(listener, mode, service, worker, slot, stop, drain).await;
            }
        });
        futures_util::future::join(futures_util::future::join_all(serving), tunnels).await;
        // The access-log lines of the tunnels that just ended are written by tasks of their
        // own: give them their turn before the runtime goes.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        anchor.abort();
        beating.abort();
        sweeping.abort();
        if let Some(resting) = resting {
            resting.abort();
        }
    });
}

/// Starts a gateway on `listeners` and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    Gateway::start(config, listeners, config_path)
        .await?
        .serve(shutdown)
        .await
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
