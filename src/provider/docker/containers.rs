//! Replica containers: create, start, stop, remove, retire and adopt, and the replica network.
//!
//! Owns: the engine calls that change containers and networks, the container id → replica map
//! that `remove` and `retire` act on (a replica is stopped by the id it was created or adopted
//! with), a roll's replacement started beside the old container and renamed to the hostname
//! once the old one is gone, the last lines of a container's log for a start error, and the
//! guard that removes a half-created container when a spawn fails or is abandoned.
//! Must not touch: the event stream (only its "already reported" set, so our own stops are not
//! reported as deaths), health or routing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerInspectResponse, ContainerSummary, ContainerSummaryStateEnum, EndpointSettings,
    NetworkConnectRequest, NetworkCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, RenameContainerOptions, StartContainerOptions,
    StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::engine::{message_of, status_of};
use super::events::{lock, SharedReported};
use super::{
    short, spec, DockerProvider, Run, INSTANCE_ENV, LABEL_HOSTNAME, LABEL_INSTANCE, LABEL_MANAGED,
    LABEL_SERVER_ID, LABEL_SLOTS, LABEL_SPEC,
};
use crate::provider::parse_slots;
use crate::provider::{Instance, ProviderError, ReplicaSpec};
use crate::ring::ServerId;

/// Grace a replica gets after SIGTERM before the engine kills it.
const STOP_GRACE_SECS: i32 = 5;

impl DockerProvider {
    /// Makes sure the replica network exists, creating it (labelled as ours) when missing.
    async fn ensure_network(&self) -> Result<(), String> {
        let _guard = self.network_lock.lock().await;
        let name = &self.settings.network;
        match self
            .docker
            .inspect_network(name, None::<InspectNetworkOptions>)
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
            .create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".to_owned()),
                labels: Some(labels),
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
        match self
            .docker
            .inspect_container(name_or_id, None::<InspectContainerOptions>)
            .await
        {
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
                    link: false,
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

    pub(super) async fn start(&self, spec: ReplicaSpec) -> Result<Instance, ProviderError> {
        let hostname = spec.hostname.clone();
        let fail = |reason: String| ProviderError::Spawn {
            hostname: hostname.clone(),
            reason,
        };
        self.ensure_network().await.map_err(fail)?;

        let port = self.settings.container_port;
        let image = spec.app.image.clone();
        let config = spec::container_config(spec::Replica {
            app: &spec.app,
            network: &self.settings.network,
            port,
            hostname: &spec.hostname,
            id: spec.id.get(),
            labels: self.labels(&spec),
        });
        // A roll's replacement runs beside the old container, which holds the name until it
        // is retired.
        let name = if spec.beside {
            format!("{}.{:06x}", spec.hostname, fastrand::u32(..1 << 24))
        } else {
            spec.hostname.clone()
        };
        let options = Some(CreateContainerOptions {
            name: Some(name.clone()),
            platform: String::new(),
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
                        "image {image} not found: build or load it (nothing is pulled: there is no registry; \
                         `make images` builds ringgate-server), or set provider.image to an image that exists \
                         locally ({})",
                        message_of(&e)
                    )));
                }
                Err(e) if status_of(&e) == Some(409) && !replaced_stale && !spec.beside => {
                    // The name is taken. A leftover of ours (the dead container of the replica
                    // this replaces, or a stopped one of our instance) is replaced; anything
                    // else is left alone.
                    let existing = self.find_named(&spec.hostname).await.map_err(|e| {
                        fail(format!(
                            "cannot look up the container named {}: {e}",
                            spec.hostname
                        ))
                    })?;
                    let Some(existing) = existing else {
                        // Gone meanwhile: try again.
                        replaced_stale = true;
                        continue;
                    };
                    let Some(old) = existing.id.clone().filter(|id| !id.is_empty()) else {
                        return Err(fail(format!(
                            "the engine lists the container named {} without an id",
                            spec.hostname
                        )));
                    };
                    let labels = existing.labels.as_ref();
                    let known = self.runs().contains_key(&old);
                    let running = existing.state == Some(ContainerSummaryStateEnum::RUNNING);
                    let dead_leftover = self.is_ours(labels) && !running;
                    if !known && !dead_leftover {
                        let ours = &self.settings.instance;
                        return Err(fail(name_taken(&spec.hostname, labels, ours)));
                    }
                    tracing::info!(replica = %spec.hostname, container = %short(&old), "replacing a leftover container of ours");
                    self.force_remove(&old).await.map_err(|e| {
                        fail(format!(
                            "cannot remove the old container {}: {e}",
                            short(&old)
                        ))
                    })?;
                    self.forget(&old);
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
            .start_container(&id, None::<StartContainerOptions>)
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
            let output = crate::provider::process::quote_output(&self.last_log_lines(&id).await);
            return Err(fail(format!(
                "it exited right after start (exit code {code}{}){output}",
                if err.is_empty() {
                    String::new()
                } else {
                    format!(", {err}")
                },
            )));
        }
        let ip = self.ip_on_network(&inspected).ok_or_else(|| {
            fail(format!(
                "it has no IP address on network {}",
                self.settings.network
            ))
        })?;
        guard.disarm();
        self.runs().insert(
            id.clone(),
            Run {
                hostname: spec.hostname.clone(),
                name,
            },
        );
        tracing::info!(replica = %spec.hostname, id = %spec.id, container = %short(&id), %ip, image = %image, beside = spec.beside, "replica container started");
        Ok(Instance {
            id: spec.id,
            hostname: spec.hostname,
            addr: SocketAddr::new(ip, port),
            instance_id: id,
            slots: Some(spec.slots),
            spec: Some(spec.app.fingerprint()),
        })
    }

    /// The last lines of a container's log (stdout and stderr), for a start error.
    pub(super) async fn last_log_lines(&self, id: &str) -> Vec<String> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: "5".to_owned(),
            ..Default::default()
        };
        let collect = async {
            let mut out = Vec::new();
            let mut stream = self.docker.logs(id, Some(options));
            while let Some(Ok(chunk)) = stream.next().await {
                out.extend(
                    chunk
                        .to_string()
                        .lines()
                        .map(|l| l.trim_end().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
            out
        };
        let mut lines = tokio::time::timeout(std::time::Duration::from_secs(2), collect)
            .await
            .unwrap_or_default();
        let keep = lines.len().saturating_sub(5);
        lines.drain(..keep);
        lines
    }

    /// Stops and removes every container this provider runs `hostname` in (a roll may have
    /// two), each by its id.
    pub(super) async fn stop(&self, hostname: &str) -> Result<(), ProviderError> {
        let ids = self.ids_of(hostname);
        if ids.is_empty() {
            tracing::debug!(
                replica = hostname,
                "no container of ours runs this replica; nothing to remove"
            );
        }
        for id in ids {
            self.stop_container(hostname, &id).await?;
        }
        Ok(())
    }

    /// Stops and removes exactly container `id` of `hostname` (a roll's old instance, or a
    /// replacement that did not get ready); if another container of ours runs the replica
    /// beside it, that one takes the hostname as its name.
    pub(super) async fn retire_container(
        &self,
        hostname: &str,
        id: &str,
    ) -> Result<(), ProviderError> {
        self.stop_container(hostname, id).await?;
        let remaining: Vec<(String, Run)> = self
            .runs()
            .iter()
            .filter(|(_, r)| r.hostname == hostname)
            .map(|(i, r)| (i.clone(), r.clone()))
            .collect();
        if let [(other, run)] = remaining.as_slice() {
            if run.name != hostname {
                match self
                    .docker
                    .rename_container(
                        other,
                        RenameContainerOptions {
                            name: hostname.to_owned(),
                        },
                    )
                    .await
                {
                    Ok(()) => {
                        if let Some(r) = self.runs().get_mut(other) {
                            r.name = hostname.to_owned();
                        }
                        tracing::debug!(replica = hostname, container = %short(other), "the replacement took the replica's name");
                    }
                    // It still runs and is found by its label; only the name differs.
                    Err(e) => {
                        tracing::warn!(replica = hostname, container = %short(other), error = %message_of(&e), "cannot rename the replacement container to the replica's name")
                    }
                }
            }
        }
        Ok(())
    }

    async fn stop_container(&self, hostname: &str, id: &str) -> Result<(), ProviderError> {
        let fail = |reason: String| ProviderError::Remove {
            hostname: hostname.to_owned(),
            reason,
        };
        // A full id names exactly one container: no name or prefix resolution.
        let Some(c) = self
            .inspect(id)
            .await
            .map_err(|e| fail(format!("cannot inspect container {}: {e}", short(id))))?
        else {
            self.forget(id);
            return Ok(());
        };
        if !self.is_ours(c.config.as_ref().and_then(|c| c.labels.as_ref())) {
            tracing::warn!(
                replica = hostname,
                container = %short(id),
                "the container no longer carries our labels; leaving it alone"
            );
            self.forget(id);
            return Ok(());
        }
        // Our own stop is not a death to report.
        lock(&self.reported).insert(id);
        match self
            .docker
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(STOP_GRACE_SECS),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(404 | 304)) => {}
            Err(e) => {
                tracing::warn!(replica = hostname, error = %e, "stop failed; removing it by force")
            }
        }
        self.force_remove(id).await.map_err(|e| {
            fail(format!(
                "the Docker engine could not remove it: {}",
                message_of(&e)
            ))
        })?;
        self.forget(id);
        tracing::info!(replica = hostname, container = %short(id), "replica container removed");
        Ok(())
    }

    /// Drops container `id` from the known ones.
    fn forget(&self, id: &str) {
        self.runs().remove(id);
    }

    /// The container named exactly `name`, if any. The engine's name filter is a regular
    /// expression and inspecting by name falls back to id prefixes, so the match is checked here.
    async fn find_named(&self, name: &str) -> Result<Option<ContainerSummary>, DockerError> {
        let pattern = format!("^/{}$", name.replace('.', "\\."));
        let filters = HashMap::from([("name".to_owned(), vec![pattern])]);
        let found = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        let exact = format!("/{name}");
        Ok(found
            .into_iter()
            .find(|c| c.names.as_ref().is_some_and(|n| n.contains(&exact))))
    }

    pub(super) async fn adopt(&self) -> Result<Vec<Instance>, ProviderError> {
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
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let name_of = |c: &ContainerSummary| {
            c.names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default()
        };
        let hostname_of = |c: &ContainerSummary| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(LABEL_HOSTNAME))
                .cloned()
                .unwrap_or_else(|| name_of(c))
        };
        // A gateway that stopped during a roll leaves two containers for a replica: the one
        // named after it was serving and is kept; the replacement beside it goes.
        let mut containers = containers;
        containers.sort_by_key(|c| name_of(c) != hostname_of(c));
        let mut taken = std::collections::HashSet::new();
        let mut out = Vec::new();
        for c in containers {
            let Some(cid) = c.id.clone() else { continue };
            let name = hostname_of(&c);
            if !taken.insert(name.clone()) {
                tracing::info!(replica = %name, container = %short(&cid), "removing a roll's unfinished replacement container");
                if let Err(e) = self.force_remove(&cid).await {
                    tracing::warn!(replica = %name, error = %e, "cannot remove it");
                }
                continue;
            }
            let spec = c.labels.as_ref().and_then(|l| l.get(LABEL_SPEC)).cloned();
            let container_name = name_of(&c);
            let server_id = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVER_ID))
                .and_then(|v| v.parse().ok())
                .and_then(ServerId::new);
            let slots = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SLOTS))
                .and_then(|v| parse_slots(v));
            let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
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
                    self.runs().insert(
                        cid.clone(),
                        Run {
                            hostname: name.clone(),
                            name: container_name,
                        },
                    );
                    out.push(Instance {
                        id,
                        hostname: name,
                        addr: SocketAddr::new(ip, self.settings.container_port),
                        instance_id: cid,
                        slots,
                        spec,
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
                NetworkConnectRequest {
                    container: Some(id.to_owned()),
                    endpoint_config: Some(EndpointSettings::default()),
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

/// Why a spawn cannot take `hostname`: the container of that name is not one this provider may
/// replace (`labels` are its labels, `ours` our instance label).
fn name_taken(hostname: &str, labels: Option<&HashMap<String, String>>, ours: &str) -> String {
    let managed = labels.filter(|l| l.get(LABEL_MANAGED).map(String::as_str) == Some("true"));
    match managed.and_then(|l| l.get(LABEL_INSTANCE)) {
        Some(instance) if instance == ours => format!(
            "a running container named {hostname} carries this gateway's label \
             ({LABEL_INSTANCE}={ours}) but was not started or adopted by it (another gateway \
             with the same {INSTANCE_ENV}?): stop that gateway or remove the container, or \
             choose another hostname"
        ),
        Some(other) => format!(
            "a container named {hostname} exists and belongs to another ringgate instance \
             ({LABEL_INSTANCE}={other}): choose another hostname"
        ),
        None => format!(
            "a container named {hostname} exists and is not managed by ringgate: remove it \
             (`docker rm -f {hostname}`) or choose another hostname"
        ),
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
                link: false,
            });
            match docker.remove_container(&id, options).await {
                Ok(()) => tracing::info!(container = %short(&id), "removed a half-created container"),
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => tracing::warn!(container = %short(&id), error = %e, "cannot remove a half-created container"),
            }
        });
    }
}
