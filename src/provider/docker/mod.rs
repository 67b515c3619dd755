//! The `docker` provider: replicas as containers of the local Docker engine (through bollard).
//!
//! Owns: the [`DockerProvider`] type, its settings and labels, and the [`Provider`] impl; the
//! submodules own the rest: [`engine`] (connecting, version negotiation, reading engine errors),
//! [`containers`] (creating, starting, stopping, removing and adopting replica containers and
//! their network) and [`events`] (the engine's event stream turned into
//! [`ProviderEvent::Exited`] the moment a replica dies).
//! Must not touch: health or routing. This is the only module that imports bollard.
//!
//! [`spec`] says what a replica container is: from the replica spec's image, command, env,
//! mounts, labels and user, on `provider.network`, with `SERVER_ID` and `PORT` set, the
//! `[provider]` limits, all capabilities dropped, `no-new-privileges`, a read-only root
//! (unless `read_only_root = false`), and our labels: `ringgate.managed=true`,
//! `ringgate.server-id=<id>`, `ringgate.slots=<its ring slots>` (decided when it is created,
//! restored when it is adopted, so a restart moves no key), `ringgate.hostname=<hostname>`,
//! `ringgate.spec=<the spec's fingerprint>` (an adopted replica whose spec differs is rolled)
//! and `ringgate.instance=<instance>`, where the instance is `$RINGGATE_INSTANCE_LABEL` or
//! `default`. Only containers carrying our instance label are ever adopted, replaced or
//! removed: anything else with a clashing name is left alone and reported. A replica's
//! container is named exactly its hostname; during a roll its replacement runs beside it as
//! `<hostname>.<suffix>` and takes the name once the old one is gone. A replica is stopped and
//! removed by the container id this provider created or adopted it with, never by resolving
//! its name (the engine would fall back to matching id prefixes). There is no Docker restart
//! policy: the controller decides about replacements. On shutdown containers keep running,
//! for the next start to adopt with their ids.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bollard::Docker;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{BoxFuture, Instance, Provider, ProviderError, ProviderEvent, ReplicaSpec};
use crate::config::ProviderConfig;

mod containers;
pub(crate) mod engine;
mod events;
mod spec;

use engine::{connect_engine, status_of};
use events::{watch_events, SharedReported};

/// Label marking a container or network as created by ringgate.
pub const LABEL_MANAGED: &str = "ringgate.managed";
/// Label carrying a replica's server id (its place on the ring).
pub const LABEL_SERVER_ID: &str = "ringgate.server-id";
/// Label carrying a replica's ring slots, in vnode order ("26,29,34"): decided when it was
/// created, restored when it is adopted.
pub const LABEL_SLOTS: &str = "ringgate.slots";
/// Label naming the gateway instance that owns a container.
pub const LABEL_INSTANCE: &str = "ringgate.instance";
/// Label carrying the replica's hostname (its container is named so too, except for the moment
/// a roll runs a replacement beside it).
pub const LABEL_HOSTNAME: &str = "ringgate.hostname";
/// Label carrying the fingerprint of the spec the container was created from.
pub const LABEL_SPEC: &str = "ringgate.spec";
/// Environment variable that sets the instance label (tests use a unique one per run).
pub const INSTANCE_ENV: &str = "RINGGATE_INSTANCE_LABEL";

/// How long `docker` waits for the engine at start before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a provider needs from `[provider]` besides the replica spec (which comes with each
/// start), plus the instance label.
#[derive(Debug, Clone)]
struct Settings {
    /// The image `auto` and the start-up check look for (the spec's at start).
    image: String,
    network: String,
    container_port: u16,
    instance: String,
}

/// One container of ours: which replica it runs and under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    hostname: String,
    name: String,
}

pub struct DockerProvider {
    docker: Docker,
    settings: Settings,
    reported: SharedReported,
    /// Serialises "create the network if missing" between concurrent spawns.
    network_lock: tokio::sync::Mutex<()>,
    events_task: JoinHandle<()>,
    engine_version: String,
    /// container id → the replica it runs, for every container this provider started or
    /// adopted: what `remove` and `retire` stop, so they never act on whatever else a name
    /// resolves to.
    runs: Mutex<HashMap<String, Run>>,
}

/// The instance label this process uses: `$RINGGATE_INSTANCE_LABEL` or `default`.
pub fn instance_label() -> String {
    std::env::var(INSTANCE_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The short form of a container id, as `docker ps` shows it.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

impl DockerProvider {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket), negotiates the API
    /// version and subscribes to its events. Fails within [`CONNECT_TIMEOUT`] when no engine
    /// answers.
    pub async fn connect(
        config: &ProviderConfig,
        events: mpsc::Sender<ProviderEvent>,
    ) -> Result<DockerProvider, ProviderError> {
        DockerProvider::connect_within(config, events, CONNECT_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with a chosen deadline (`auto` uses a short one).
    pub async fn connect_within(
        config: &ProviderConfig,
        events: mpsc::Sender<ProviderEvent>,
        timeout: Duration,
    ) -> Result<DockerProvider, ProviderError> {
        DockerProvider::connect_as(config, events, timeout, instance_label()).await
    }

    /// [`connect_within`](Self::connect_within) managing the containers labelled `instance`
    /// rather than `$RINGGATE_INSTANCE_LABEL` (tests run several providers in one process).
    pub async fn connect_as(
        config: &ProviderConfig,
        events: mpsc::Sender<ProviderEvent>,
        timeout: Duration,
        instance: String,
    ) -> Result<DockerProvider, ProviderError> {
        let (docker, engine_version) = connect_engine(timeout).await?;
        let settings = Settings {
            image: config.image.clone(),
            network: config.network.clone(),
            container_port: config.container_port,
            instance,
        };
        let reported = SharedReported::default();
        let events_task = tokio::spawn(watch_events(
            docker.clone(),
            settings.instance.clone(),
            reported.clone(),
            events,
        ));
        Ok(DockerProvider {
            docker,
            settings,
            reported,
            network_lock: tokio::sync::Mutex::new(()),
            events_task,
            engine_version,
            runs: Mutex::new(HashMap::new()),
        })
    }

    fn runs(&self) -> MutexGuard<'_, HashMap<String, Run>> {
        crate::sync::lock(&self.runs)
    }

    /// The ids of our containers running `hostname`.
    fn ids_of(&self, hostname: &str) -> Vec<String> {
        self.runs()
            .iter()
            .filter(|(_, r)| r.hostname == hostname)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The engine's version, as it reported it (for logs).
    pub fn engine_version(&self) -> &str {
        &self.engine_version
    }

    /// The instance label this provider manages.
    pub fn instance(&self) -> &str {
        &self.settings.instance
    }

    /// Whether the configured replica image exists locally (nothing is ever pulled).
    pub async fn image_present(&self) -> Result<bool, ProviderError> {
        match self.docker.inspect_image(&self.settings.image).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(ProviderError::Setup(format!(
                "cannot inspect image {}: {e}",
                self.settings.image
            ))),
        }
    }

    fn labels(&self, spec: &ReplicaSpec) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SERVER_ID.to_owned(), spec.id.to_string()),
            (
                LABEL_SLOTS.to_owned(),
                crate::provider::format_slots(&spec.slots),
            ),
            (LABEL_HOSTNAME.to_owned(), spec.hostname.clone()),
            (LABEL_SPEC.to_owned(), spec.app.fingerprint()),
            (LABEL_INSTANCE.to_owned(), self.settings.instance.clone()),
        ])
    }

    fn is_ours(&self, labels: Option<&HashMap<String, String>>) -> bool {
        labels.is_some_and(|l| {
            l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                && l.get(LABEL_INSTANCE) == Some(&self.settings.instance)
        })
    }
}

impl Drop for DockerProvider {
    fn drop(&mut self) {
        self.events_task.abort();
    }
}

impl Provider for DockerProvider {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn mode(&self) -> crate::provider::Mode {
        crate::provider::Mode::Owned
    }

    fn spawn(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>> {
        Box::pin(self.start(spec))
    }

    fn remove(&self, hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let hostname = hostname.to_owned();
        Box::pin(async move { self.stop(&hostname).await })
    }

    fn retire(&self, instance: &Instance) -> BoxFuture<'_, Result<(), ProviderError>> {
        let (hostname, id) = (instance.hostname.clone(), instance.instance_id.clone());
        Box::pin(async move { self.retire_container(&hostname, &id).await })
    }

    fn recent_output(&self, instance: &Instance) -> BoxFuture<'_, Vec<String>> {
        let id = instance.instance_id.clone();
        Box::pin(async move { self.last_log_lines(&id).await })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.adopt())
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Containers keep running: the next start adopts them with their ids.
            self.events_task.abort();
            tracing::info!(instance = %self.settings.instance, "leaving replica containers running for the next start to adopt");
        })
    }
}
