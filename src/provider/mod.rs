//! Providers: where replicas run.
//!
//! Owns: the [`Provider`] trait (start a replica with a hostname and id, remove one, list the
//! managed ones, report events such as "died") and its implementations: `process` (local
//! `ringgate-server` children), `static` (fixed addresses, never started), `docker` (containers),
//! `swarm` (Swarm services, with the shared ring [`record`] several gateways route by).
//! Must not touch: the ring, health verdicts or snapshots. A provider reports facts to the
//! controller through [`ProviderEvent`]s; the controller decides what they mean.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{Config, ProviderKind};
use crate::ring::ServerId;

pub mod app;
pub mod docker;
pub mod preflight;
pub mod process;
pub mod record;
pub mod static_list;
pub mod swarm;

pub use app::AppSpec;
pub use record::{Proposal, Proposals, RecordWriteError, RingRecord, SharedRing};

pub use futures_util::future::BoxFuture;

/// What the controller asks a provider to start.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSpec {
    pub id: ServerId,
    pub hostname: String,
    /// The ring slots of its virtual nodes, in vnode order, decided when the replica was
    /// planned: providers that keep state in the engine record them with it (labels), so a
    /// gateway that adopts it later puts it back exactly there.
    pub slots: Vec<u32>,
    /// What it runs: the spec the controller holds now.
    pub app: Arc<AppSpec>,
    /// Started beside the replica's running instance, which keeps serving until this one is
    /// ready (a roll): providers keep both under the one hostname until the old one is retired.
    pub beside: bool,
}

/// A running replica as a provider knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: ServerId,
    pub hostname: String,
    /// Where the gateway reaches it.
    pub addr: SocketAddr,
    /// Identifies this run of the replica (a pid, a container id): events name it, so an event
    /// about an instance that was already replaced is recognised as stale.
    pub instance_id: String,
    /// The slots recorded with the replica when it was created, if the provider keeps them
    /// (docker and swarm labels); `None` when they are the gateway's to compute (process,
    /// static).
    pub slots: Option<Vec<u32>>,
    /// The fingerprint of the spec it was started from ([`AppSpec::fingerprint`]), when the
    /// provider keeps it with the replica (container labels): an adopted replica whose spec
    /// differs from the gateway's is rolled.
    pub spec: Option<String>,
}

/// Ring slots as a label value: `26,29,34`.
pub fn format_slots(slots: &[u32]) -> String {
    slots
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A label value written by [`format_slots`]; `None` when it is not one (the gateway then
/// computes the slots, and says so).
pub fn parse_slots(text: &str) -> Option<Vec<u32>> {
    text.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// Facts a provider reports as they happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEvent {
    /// The instance is gone (process exit, container die/kill/oom/stop, a task that stopped).
    Exited {
        hostname: String,
        instance_id: String,
        detail: String,
    },
    /// A replica runs at this address: a task the engine started on its own (a restart after
    /// a death, a reschedule on another node) or one that another gateway created.
    Running { instance: Instance },
    /// The membership as the engine holds it now (shared-ring providers): the whole record,
    /// not a change, so an observation that arrives late is recognised by its version.
    Ring(RingRecord),
    /// Whether the engine answers; while it does not, the gateway routes on the last ring it
    /// saw and says so.
    Engine { reachable: bool, detail: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("replica {hostname} failed to start: {reason}")]
    Spawn { hostname: String, reason: String },
    #[error("the {provider} provider cannot start replicas: {hint}")]
    CannotSpawn {
        provider: &'static str,
        hint: &'static str,
    },
    #[error("replica {hostname} could not be removed: {reason}")]
    Remove { hostname: String, reason: String },
    #[error("the {provider} provider cannot list replicas: {reason}")]
    List {
        provider: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Setup(String),
}

impl ProviderError {
    /// What went wrong without the "replica X failed to start" frame, for messages that name
    /// the replica themselves.
    pub fn detail(&self) -> String {
        match self {
            ProviderError::Spawn { reason, .. } | ProviderError::Remove { reason, .. } => {
                reason.clone()
            }
            other => other.to_string(),
        }
    }
}

/// One small trait per concern: a provider starts, stops and lists replicas and reports events.
pub trait Provider: Send + Sync + 'static {
    /// "process", "docker", "swarm" or "static".
    fn kind(&self) -> &'static str;

    /// What this provider does with replicas: asked once, when the controller is built, which
    /// then keeps the answer (a provider's mode never changes while it runs).
    fn mode(&self) -> Mode;

    /// Starts a replica and returns once it has an address (not necessarily serving yet: the
    /// controller waits for its heartbeat).
    fn spawn(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>>;

    /// Stops and removes a replica: every instance of it (a roll may have two). Removing one
    /// that is already gone is not an error.
    fn remove(&self, hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>>;

    /// Stops exactly this instance of a replica (the old one after a roll replaced it, or a
    /// replacement that never got ready), leaving any other instance of the hostname running.
    fn retire(&self, instance: &Instance) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.remove(&instance.hostname)
    }

    /// The last lines the instance wrote (standard output and error), oldest first, for an
    /// error that says why it is not ready; empty when the provider keeps none.
    fn recent_output(&self, _instance: &Instance) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async { Vec::new() })
    }

    /// Replicas that already exist and should be adopted at start (running containers from a
    /// previous run; the configured static servers).
    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>>;

    /// Called once when the gateway stops: the process provider stops its children; the docker
    /// provider leaves containers for the next start to adopt.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// A provider's capabilities as one value: who starts replicas, who restarts them, and where
/// membership lives. One value rather than three independent answers, because only these three
/// combinations exist.
#[derive(Clone)]
pub enum Mode {
    /// Fixed addresses (`static`): checked and routed to, never started or stopped.
    Fixed,
    /// The gateway starts, replaces and stops its replicas, and its own membership model is
    /// the truth (`process`, `docker`).
    Owned,
    /// Replicas are engine services (`swarm`): the engine restarts a dead one itself (the
    /// controller only takes it out of the ring and waits for [`ProviderEvent::Running`]), and
    /// membership lives in a record shared by several gateways, read and written with
    /// optimistic concurrency.
    Shared(Arc<dyn SharedRing>),
}

impl Mode {
    /// Whether the gateway may start replicas (`/add`, `replicas.count`, replacements).
    pub fn starts_replicas(&self) -> bool {
        !matches!(self, Mode::Fixed)
    }

    /// Whether the engine restarts a dead replica itself.
    pub fn restarts_replicas(&self) -> bool {
        matches!(self, Mode::Shared(_))
    }

    /// The shared ring record, when membership lives in the engine.
    pub fn record(&self) -> Option<&Arc<dyn SharedRing>> {
        match self {
            Mode::Shared(r) => Some(r),
            Mode::Fixed | Mode::Owned => None,
        }
    }
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Fixed => "Fixed",
            Mode::Owned => "Owned",
            Mode::Shared(_) => "Shared",
        })
    }
}

/// Process replicas whose program cannot be run would all fail to start: the gateway refuses
/// to start with them, naming the key (`ringgate check` says the same beforehand).
fn check_program(config: &Config) -> Result<(), ProviderError> {
    let app = AppSpec::from_config(&config.provider);
    process::program(&app).map(|_| ()).map_err(|e| {
        let key = if app.is_builtin_server() {
            "provider.server_binary"
        } else {
            "provider.command"
        };
        ProviderError::Setup(format!("{key}: cannot run the replicas' program: {e}"))
    })
}

/// How long `auto` waits for a Docker engine before choosing the process provider.
const AUTO_DOCKER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Builds the provider the config asks for. `auto` picks docker when the engine answers and
/// process otherwise, and logs which it picked and why.
pub async fn from_config(
    config: &Config,
    events: mpsc::Sender<ProviderEvent>,
) -> Result<Arc<dyn Provider>, ProviderError> {
    match config.provider.kind {
        ProviderKind::Static => Ok(Arc::new(static_list::StaticProvider::new(
            &config.provider.servers,
        ))),
        ProviderKind::Process => {
            check_program(config)?;
            Ok(Arc::new(process::ProcessProvider::new(events)))
        }
        ProviderKind::Auto => {
            let why = match docker::DockerProvider::connect_within(
                &config.provider,
                events.clone(),
                AUTO_DOCKER_TIMEOUT,
            )
            .await
            {
                Ok(d) => match d.image_present().await {
                    Ok(true) => {
                        tracing::info!(
                            provider = "docker",
                            engine = d.engine_version(),
                            image = %config.provider.image,
                            "provider auto: a Docker engine answers and the replica image exists; replicas run as containers"
                        );
                        return Ok(Arc::new(d));
                    }
                    Ok(false) => format!(
                        "a Docker engine answers but the image {} is missing (`make images` builds it)",
                        config.provider.image
                    ),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            tracing::info!(
                provider = "process",
                reason = %why,
                "provider auto: replicas run as local processes"
            );
            check_program(config)?;
            Ok(Arc::new(process::ProcessProvider::new(events)))
        }
        ProviderKind::Swarm => {
            let s = swarm::SwarmProvider::connect(config, events).await?;
            tracing::info!(
                provider = "swarm",
                engine = s.engine_version(),
                instance = s.instance(),
                "replicas run as Swarm services; membership is the ring record in the engine"
            );
            Ok(Arc::new(s))
        }
        ProviderKind::Docker => {
            let d = docker::DockerProvider::connect(&config.provider, events).await?;
            if !d.image_present().await? {
                tracing::warn!(
                    image = %config.provider.image,
                    "the replica image does not exist: spawning replicas fails until `make images` builds it"
                );
            }
            tracing::info!(
                provider = "docker",
                engine = d.engine_version(),
                instance = d.instance(),
                "replicas run as Docker containers"
            );
            Ok(Arc::new(d))
        }
    }
}
