//! The `docker` provider: replicas as containers of the local Docker engine (through bollard).
//!
//! Owns: creating, starting, stopping and removing replica containers; the replica network;
//! adopting the containers a previous run left running; turning the engine's event stream into
//! [`ProviderEvent::Exited`] the moment a replica dies.
//! Must not touch: health or routing. This is the only module that imports bollard.
//!
//! A replica is a container named exactly its hostname, from `provider.image`, on
//! `provider.network`, with `SERVER_ID` and `PORT` set and three labels:
//! `ringgate.managed=true`, `ringgate.server-id=<id>` and `ringgate.instance=<instance>`, where
//! the instance is `$RINGGATE_INSTANCE_LABEL` or `default`. Only containers carrying our instance
//! label are ever adopted, replaced or removed: anything else with a clashing name is left alone
//! and reported. There is no Docker restart policy: the controller decides about replacements.
//! On shutdown containers keep running, for the next start to adopt with their ids.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, ListContainersOptions, NetworkingConfig,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, EndpointSettings, EventMessage, HostConfig};
use bollard::network::{ConnectNetworkOptions, CreateNetworkOptions, InspectNetworkOptions};
use bollard::system::EventsOptions;
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{BoxFuture, Instance, Provider, ProviderError, ProviderEvent, ReplicaSpec};
use crate::config::ProviderConfig;
use crate::ring::ServerId;

/// Label marking a container or network as created by ringgate.
pub const LABEL_MANAGED: &str = "ringgate.managed";
/// Label carrying a replica's server id (its place on the ring).
pub const LABEL_SERVER_ID: &str = "ringgate.server-id";
/// Label naming the gateway instance that owns a container.
pub const LABEL_INSTANCE: &str = "ringgate.instance";
/// Environment variable that sets the instance label (tests use a unique one per run).
pub const INSTANCE_ENV: &str = "RINGGATE_INSTANCE_LABEL";

/// How long `docker` waits for the engine at start before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Budget of one engine call (create, start, inspect…).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace a replica gets after SIGTERM before the engine kills it.
const STOP_GRACE_SECS: i64 = 5;
/// Event-stream reconnection back-off.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How many container ids we remember as already reported (events come in bursts per
/// container: kill, die, stop).
const REPORTED_MEMORY: usize = 1024;

/// Containers we already reported dead, or are removing ourselves: their further events are
/// not news.
#[derive(Default)]
struct Reported {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Reported {
    /// Remembers `id`; returns false when it was already known.
    fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > REPORTED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

type SharedReported = Arc<Mutex<Reported>>;

fn lock(r: &SharedReported) -> std::sync::MutexGuard<'_, Reported> {
    // Only touched briefly; a poisoned set is still a usable set.
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a provider needs from `[provider]`, plus the instance label.
#[derive(Debug, Clone)]
struct Settings {
    image: String,
    network: String,
    container_port: u16,
    instance: String,
}

pub struct DockerProvider {
    docker: Docker,
    settings: Settings,
    reported: SharedReported,
    /// Serialises "create the network if missing" between concurrent spawns.
    network_lock: tokio::sync::Mutex<()>,
    events_task: JoinHandle<()>,
    engine_version: String,
}

/// The instance label this process uses: `$RINGGATE_INSTANCE_LABEL` or `default`.
pub fn instance_label() -> String {
    std::env::var(INSTANCE_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// Where bollard will look for the engine, for error messages.
fn engine_address() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn message_of(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
        })
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

    fn labels(&self, id: ServerId) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SERVER_ID.to_owned(), id.to_string()),
            (LABEL_INSTANCE.to_owned(), self.settings.instance.clone()),
        ])
    }

    fn is_ours(&self, labels: Option<&HashMap<String, String>>) -> bool {
        labels.is_some_and(|l| {
            l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                && l.get(LABEL_INSTANCE) == Some(&self.settings.instance)
        })
    }

    /// Makes sure the replica network exists, creating it (labelled as ours) when missing.
    async fn ensure_network(&self) -> Result<(), String> {
        let _guard = self.network_lock.lock().await;
        let name = &self.settings.network;
        match self
            .docker
            .inspect_network(name, None::<InspectNetworkOptions<String>>)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(format!("cannot inspect network {name}: {e}")),
        }
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.settings.instance.clone()),
        ]);
        let created = self
            .docker
            .create_network(CreateNetworkOptions {
                name: name.clone(),
                check_duplicate: true,
                driver: "bridge".to_owned(),
                labels,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {
                tracing::info!(network = %name, "created the replica network");
                Ok(())
            }
            // Someone else created it meanwhile: it exists, which is all we need.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(format!("cannot create network {name}: {}", message_of(&e))),
        }
    }

    async fn inspect(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        match self.docker.inspect_container(name_or_id, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The container's IP on the replica network, if it has one.
    fn ip_on_network(&self, c: &ContainerInspectResponse) -> Option<IpAddr> {
        c.network_settings
            .as_ref()?
            .networks
            .as_ref()?
            .get(&self.settings.network)?
            .ip_address
            .as_deref()?
            .parse()
            .ok()
    }

    /// Force-removes one of our containers, remembering it so its death is not reported.
    async fn force_remove(&self, id: &str) -> Result<(), DockerError> {
        lock(&self.reported).insert(id);
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // 409: removal already in progress.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn start(&self, spec: ReplicaSpec) -> Result<Instance, ProviderError> {
        let hostname = spec.hostname.clone();
        let fail = |reason: String| ProviderError::Spawn {
            hostname: hostname.clone(),
            reason,
        };
        self.ensure_network().await.map_err(fail)?;

        let port = self.settings.container_port;
        let config = ContainerConfig {
            image: Some(self.settings.image.clone()),
            env: Some(vec![
                format!("SERVER_ID={}", spec.hostname),
                format!("PORT={port}"),
            ]),
            labels: Some(self.labels(spec.id)),
            exposed_ports: Some(HashMap::from([(format!("{port}/tcp"), HashMap::new())])),
            host_config: Some(HostConfig {
                network_mode: Some(self.settings.network.clone()),
                // No restart policy: the controller replaces dead replicas itself.
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: HashMap::from([(
                    self.settings.network.clone(),
                    EndpointSettings::default(),
                )]),
            }),
            ..Default::default()
        };
        let options = Some(CreateContainerOptions {
            name: spec.hostname.clone(),
            platform: None,
        });

        let mut replaced_stale = false;
        let id = loop {
            match self
                .docker
                .create_container(options.clone(), config.clone())
                .await
            {
                Ok(r) => break r.id,
                Err(e) if status_of(&e) == Some(404) => {
                    return Err(fail(format!(
                        "image {} not found: run `make images` (nothing is pulled: there is no registry), \
                         or set provider.image to an image that exists locally ({})",
                        self.settings.image,
                        message_of(&e)
                    )));
                }
                Err(e) if status_of(&e) == Some(409) && !replaced_stale => {
                    // The name is taken. A leftover of ours (a dead replica, or one the
                    // controller no longer tracks) is replaced; anything else is left alone.
                    let existing = self.inspect(&spec.hostname).await.map_err(|e| {
                        fail(format!(
                            "cannot inspect the container named {}: {e}",
                            spec.hostname
                        ))
                    })?;
                    let Some(existing) = existing else {
                        // Gone meanwhile: try again.
                        replaced_stale = true;
                        continue;
                    };
                    let labels = existing.config.as_ref().and_then(|c| c.labels.as_ref());
                    if !self.is_ours(labels) {
                        let owner = labels
                            .filter(|l| l.get(LABEL_MANAGED).map(String::as_str) == Some("true"))
                            .and_then(|l| l.get(LABEL_INSTANCE));
                        return Err(fail(match owner {
                            Some(other) => format!(
                                "a container named {} exists and belongs to another ringgate instance \
                                 ({LABEL_INSTANCE}={other}): choose another hostname",
                                spec.hostname
                            ),
                            None => format!(
                                "a container named {} exists and is not managed by ringgate: remove it \
                                 (`docker rm -f {}`) or choose another hostname",
                                spec.hostname, spec.hostname
                            ),
                        }));
                    }
                    let old = existing.id.unwrap_or_else(|| spec.hostname.clone());
                    tracing::info!(replica = %spec.hostname, container = %short(&old), "replacing a leftover container of ours");
                    self.force_remove(&old).await.map_err(|e| {
                        fail(format!(
                            "cannot remove the old container {}: {e}",
                            short(&old)
                        ))
                    })?;
                    replaced_stale = true;
                }
                Err(e) => {
                    return Err(fail(format!(
                        "the Docker engine refused to create it: {}",
                        message_of(&e)
                    )));
                }
            }
        };

        // From here on a failure (or the caller giving up on this future) must not leave a
        // half-started container behind.
        let mut guard = Cleanup {
            docker: self.docker.clone(),
            reported: self.reported.clone(),
            id: Some(id.clone()),
        };
        if let Err(e) = self
            .docker
            .start_container(&id, None::<StartContainerOptions<String>>)
            .await
        {
            return Err(fail(format!(
                "the Docker engine could not start it: {}",
                message_of(&e)
            )));
        }
        let inspected = self
            .inspect(&id)
            .await
            .map_err(|e| fail(format!("cannot inspect it after start: {e}")))?
            .ok_or_else(|| fail("it vanished right after start".into()))?;
        let state = inspected.state.as_ref();
        if state.and_then(|s| s.running) != Some(true) {
            let code = state.and_then(|s| s.exit_code).unwrap_or(-1);
            let err = state.and_then(|s| s.error.clone()).unwrap_or_default();
            return Err(fail(format!(
                "it exited right after start (exit code {code}{}): see `docker logs {}`",
                if err.is_empty() {
                    String::new()
                } else {
                    format!(", {err}")
                },
                spec.hostname
            )));
        }
        let ip = self.ip_on_network(&inspected).ok_or_else(|| {
            fail(format!(
                "it has no IP address on network {}",
                self.settings.network
            ))
        })?;
        guard.disarm();
        tracing::info!(replica = %spec.hostname, id = %spec.id, container = %short(&id), %ip, "replica container started");
        Ok(Instance {
            id: spec.id,
            hostname: spec.hostname,
            addr: SocketAddr::new(ip, port),
            instance_id: id,
        })
    }

    async fn stop(&self, hostname: &str) -> Result<(), ProviderError> {
        let fail = |reason: String| ProviderError::Remove {
            hostname: hostname.to_owned(),
            reason,
        };
        let Some(c) = self
            .inspect(hostname)
            .await
            .map_err(|e| fail(format!("cannot inspect it: {e}")))?
        else {
            return Ok(());
        };
        if !self.is_ours(c.config.as_ref().and_then(|c| c.labels.as_ref())) {
            tracing::warn!(
                replica = hostname,
                "a container with this name exists but is not ours; leaving it alone"
            );
            return Ok(());
        }
        let id = c.id.unwrap_or_else(|| hostname.to_owned());
        // Our own stop is not a death to report.
        lock(&self.reported).insert(&id);
        match self
            .docker
            .stop_container(&id, Some(StopContainerOptions { t: STOP_GRACE_SECS }))
            .await
        {
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(404 | 304)) => {}
            Err(e) => {
                tracing::warn!(replica = hostname, error = %e, "stop failed; removing it by force")
            }
        }
        self.force_remove(&id).await.map_err(|e| {
            fail(format!(
                "the Docker engine could not remove it: {}",
                message_of(&e)
            ))
        })?;
        tracing::info!(replica = hostname, container = %short(&id), "replica container removed");
        Ok(())
    }

    async fn adopt(&self) -> Result<Vec<Instance>, ProviderError> {
        let fail = |reason: String| ProviderError::List {
            provider: "docker",
            reason,
        };
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.settings.instance),
            ],
        )]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters,
                ..Default::default()
            }))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut out = Vec::new();
        for c in containers {
            let Some(cid) = c.id.clone() else { continue };
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            let server_id = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVER_ID))
                .and_then(|v| v.parse().ok())
                .and_then(ServerId::new);
            let running = c.state.as_deref() == Some("running");
            let (Some(id), true, false) = (server_id, running, name.is_empty()) else {
                tracing::info!(replica = %name, container = %short(&cid), state = ?c.state, "removing a managed container that cannot be adopted (not running or no server id)");
                if let Err(e) = self.force_remove(&cid).await {
                    tracing::warn!(replica = %name, error = %e, "cannot remove it");
                }
                continue;
            };
            match self.adopt_one(&cid).await {
                Ok(ip) => {
                    tracing::debug!(replica = %name, %id, container = %short(&cid), %ip, "adopted a running replica container");
                    out.push(Instance {
                        id,
                        hostname: name,
                        addr: SocketAddr::new(ip, self.settings.container_port),
                        instance_id: cid,
                    });
                }
                Err(reason) => {
                    tracing::warn!(replica = %name, container = %short(&cid), %reason, "cannot adopt it; removing it so it is started afresh");
                    if let Err(e) = self.force_remove(&cid).await {
                        tracing::warn!(replica = %name, error = %e, "cannot remove it");
                    }
                }
            }
        }
        out.sort_by_key(|i| i.id);
        Ok(out)
    }

    /// The adopted container's IP on the replica network, connecting it first if it is not on
    /// it (the network was changed in the config between two runs).
    async fn adopt_one(&self, id: &str) -> Result<IpAddr, String> {
        let c = self
            .inspect(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("it vanished")?;
        if let Some(ip) = self.ip_on_network(&c) {
            return Ok(ip);
        }
        self.ensure_network().await?;
        self.docker
            .connect_network(
                &self.settings.network,
                ConnectNetworkOptions {
                    container: id.to_owned(),
                    endpoint_config: EndpointSettings::default(),
                },
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot connect it to network {}: {}",
                    self.settings.network,
                    message_of(&e)
                )
            })?;
        let c = self
            .inspect(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("it vanished")?;
        self.ip_on_network(&c)
            .ok_or_else(|| format!("no IP address on network {}", self.settings.network))
    }
}

impl Drop for DockerProvider {
    fn drop(&mut self) {
        self.events_task.abort();
    }
}

/// Removes a half-created container unless disarmed, also when the spawn future is dropped.
struct Cleanup {
    docker: Docker,
    reported: SharedReported,
    id: Option<String>,
}

impl Cleanup {
    fn disarm(&mut self) {
        self.id = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        lock(&self.reported).insert(&id);
        let docker = self.docker.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(container = %short(&id), "cannot remove a half-created container (no runtime)");
            return;
        };
        rt.spawn(async move {
            let options = Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            });
            match docker.remove_container(&id, options).await {
                Ok(()) => tracing::info!(container = %short(&id), "removed a half-created container"),
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => tracing::warn!(container = %short(&id), error = %e, "cannot remove a half-created container"),
            }
        });
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Connects and checks that the engine answers within `timeout`.
async fn connect_engine(timeout: Duration) -> Result<(Docker, String), ProviderError> {
    let addr = engine_address();
    let no_engine = |why: String| {
        ProviderError::Setup(format!(
            "no Docker engine answers at {addr}: {why}; start Docker (or set DOCKER_HOST), \
             or use provider.kind = \"process\""
        ))
    };
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| no_engine(e.to_string()))?
        .with_timeout(REQUEST_TIMEOUT);
    let negotiated = tokio::time::timeout(timeout, async {
        let docker = docker.negotiate_version().await?;
        let version = docker.version().await?;
        Ok::<_, DockerError>((docker, version))
    })
    .await;
    match negotiated {
        Err(_) => Err(no_engine(format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("ermission denied") {
                Err(no_engine(format!(
                    "{text} (add your user to the `docker` group, or run with access to the socket)"
                )))
            } else {
                Err(no_engine(text))
            }
        }
        Ok(Ok((docker, v))) => {
            let version = format!(
                "{} (API {})",
                v.version.as_deref().unwrap_or("?"),
                v.api_version.as_deref().unwrap_or("?")
            );
            Ok((docker, version))
        }
    }
}

/// Turns one engine event into an `Exited` report, if it means the replica is gone.
///
/// `die` and `oom` always do. `kill` does only for SIGKILL, which cannot be caught (other
/// signals may be handled; their `die` follows if they are fatal). `stop` comes after `die`
/// and is caught by the de-duplication unless the `die` was missed.
fn exit_of(msg: &EventMessage) -> Option<(String, String, String)> {
    let action = msg.action.as_deref()?;
    let actor = msg.actor.as_ref()?;
    let id = actor.id.clone()?;
    let attrs = actor.attributes.as_ref();
    let attr = |k: &str| attrs.and_then(|a| a.get(k)).cloned();
    let name = attr("name")?;
    let detail = match action {
        "die" => format!(
            "container died (exit code {})",
            attr("exitCode").unwrap_or_else(|| "?".into())
        ),
        "oom" => "container ran out of memory".to_owned(),
        "stop" => "container stopped".to_owned(),
        "kill" => {
            let signal = attr("signal").unwrap_or_default();
            if !matches!(signal.as_str(), "9" | "KILL" | "SIGKILL") {
                return None;
            }
            "container killed (SIGKILL)".to_owned()
        }
        _ => return None,
    };
    Some((name, id, detail))
}

/// Follows the engine's event stream for our containers and reports deaths; reconnects with
/// back-off when the stream breaks, replaying what was missed (`since`).
async fn watch_events(
    docker: Docker,
    instance: String,
    reported: SharedReported,
    events: mpsc::Sender<ProviderEvent>,
) {
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        (
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={instance}"),
            ],
        ),
        (
            "event".to_owned(),
            ["die", "kill", "oom", "stop"].map(String::from).to_vec(),
        ),
    ]);
    // Start a little in the past so that nothing between `connect` and the subscription being
    // in place is missed; replays are de-duplicated.
    let mut since = unix_now_secs() - 1.0;
    let mut backoff = BACKOFF_MIN;
    loop {
        let options = EventsOptions::<String> {
            since: Some(format!("{since:.9}")),
            until: None,
            filters: filters.clone(),
        };
        let mut stream = docker.events(Some(options));
        let reason = loop {
            match stream.next().await {
                None => break "the engine closed the event stream".to_owned(),
                Some(Err(e)) => break e.to_string(),
                Some(Ok(msg)) => {
                    backoff = BACKOFF_MIN;
                    if let Some(t) = msg.time_nano {
                        since = since.max(t as f64 / 1e9);
                    }
                    let Some((hostname, instance_id, detail)) = exit_of(&msg) else {
                        continue;
                    };
                    if !lock(&reported).insert(&instance_id) {
                        continue;
                    }
                    tracing::info!(replica = %hostname, container = %short(&instance_id), %detail, "replica container exited");
                    let event = ProviderEvent::Exited {
                        hostname,
                        instance_id,
                        detail,
                    };
                    if events.send(event).await.is_err() {
                        // Nobody listens any more: the gateway is stopping.
                        return;
                    }
                }
            }
        };
        if events.is_closed() {
            return;
        }
        tracing::warn!(%reason, retry_in = ?backoff, "Docker event stream broke; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Provider for DockerProvider {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn manages_replicas(&self) -> bool {
        true
    }

    fn spawn(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>> {
        Box::pin(self.start(spec))
    }

    fn remove(&self, hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let hostname = hostname.to_owned();
        Box::pin(async move { self.stop(&hostname).await })
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

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn event(action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("abc".into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn deaths_are_recognised() {
        let die = exit_of(&event("die", &[("name", "s1"), ("exitCode", "137")])).expect("die");
        assert_eq!((die.0.as_str(), die.1.as_str()), ("s1", "abc"));
        assert!(die.2.contains("137"), "{}", die.2);
        assert!(exit_of(&event("kill", &[("name", "s1"), ("signal", "9")])).is_some());
        assert!(exit_of(&event("kill", &[("name", "s1"), ("signal", "15")])).is_none());
        assert!(exit_of(&event("oom", &[("name", "s1")])).is_some());
        assert!(exit_of(&event("start", &[("name", "s1")])).is_none());
        assert!(exit_of(&event("die", &[])).is_none(), "no name, no report");
    }

    #[test]
    fn reported_ids_are_remembered_and_bounded() {
        let mut r = Reported::default();
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        for i in 0..REPORTED_MEMORY {
            r.insert(&i.to_string());
        }
        assert!(r.insert("a"), "the oldest id was forgotten");
        assert!(r.ids.len() <= REPORTED_MEMORY);
    }
}
