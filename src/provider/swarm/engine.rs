//! The engine calls of the `swarm` provider: the replica network, the ring record's service,
//! replica services, and observing their tasks.
//!
//! Owns: [`Engine`] (the client and the settings every call needs) and each call, with the
//! engine's errors turned into [`ProviderError`]s and a stale record write into
//! [`RecordWriteError::Conflict`].
//! Must not touch: the event stream (`watch`) or decisions.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{NetworkCreateRequest, Node, Service};
use bollard::query_parameters::{
    InspectContainerOptions, InspectNetworkOptions, InspectServiceOptions, ListNodesOptions,
    ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;

use super::spec::{self, ReplicaService};
use crate::config::Reach;
use crate::provider::docker::engine::{message_of, status_of};
use crate::provider::docker::{
    LABEL_INSTANCE, LABEL_MANAGED, LABEL_SERVER_ID, LABEL_SLOTS, LABEL_SPEC,
};
use crate::provider::record::{Proposals, RecordedMember, RingRecord};
use crate::provider::{parse_slots, Instance, ProviderError, RecordWriteError, ReplicaSpec};
use crate::ring::ServerId;

/// Label saying what a service of ours is: `replica` or `ring`.
pub const LABEL_ROLE: &str = "ringgate.role";

/// How long a spawn waits for the new service's task to run.
const TASK_START_TIMEOUT: Duration = Duration::from_secs(25);
/// How often a spawn looks at the new service's task.
const TASK_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) image: String,
    pub(super) network: String,
    pub(super) port: u16,
    pub(super) instance: String,
    pub(super) reach: Reach,
    /// The service whose labels are the ring record.
    pub(super) ring_service: String,
}

pub(super) struct Engine {
    pub(super) docker: Docker,
    pub(super) settings: Settings,
}

/// The name of the ring record's service for `instance`.
pub fn ring_service_name(instance: &str) -> String {
    let mut name = format!("ringgate-ring-{instance}");
    name.truncate(63);
    name
}

fn engine_error(what: &str, e: &DockerError) -> ProviderError {
    ProviderError::Setup(format!(
        "the Swarm engine refused to {what}: {}",
        message_of(e)
    ))
}

impl Engine {
    fn labels(&self, role: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.settings.instance.clone()),
            (LABEL_ROLE.to_owned(), role.to_owned()),
        ])
    }

    fn our_filter(&self, role: &str) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.settings.instance),
                format!("{LABEL_ROLE}={role}"),
            ],
        )])
    }

    fn is_ours(&self, labels: Option<&HashMap<String, String>>, role: &str) -> bool {
        labels.is_some_and(|l| {
            l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                && l.get(LABEL_INSTANCE) == Some(&self.settings.instance)
                && l.get(LABEL_ROLE).map(String::as_str) == Some(role)
        })
    }

    /// Whether this engine is a Swarm manager (the only kind that can run services).
    pub(super) async fn check_manager(&self) -> Result<(), ProviderError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| engine_error("describe itself", &e))?;
        let swarm = info.swarm.unwrap_or_default();
        if swarm.control_available != Some(true) {
            let state = swarm
                .local_node_state
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown".into());
            return Err(ProviderError::Setup(format!(
                "the Docker engine is not a Swarm manager (swarm state: {state}): run \
                 `docker swarm init` (or `make swarm-up`), or point DOCKER_HOST at a manager"
            )));
        }
        Ok(())
    }

    /// The overlay network replicas join: created (attachable, labelled as ours) if missing.
    pub(super) async fn ensure_network(&self) -> Result<(), ProviderError> {
        let name = &self.settings.network;
        match self
            .docker
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(n) if n.scope.as_deref() == Some("swarm") => return Ok(()),
            Ok(n) => {
                return Err(ProviderError::Setup(format!(
                    "network {name} exists with scope {:?}, not a Swarm overlay: set \
                     provider.network to an overlay network (or remove {name})",
                    n.scope.unwrap_or_default()
                )))
            }
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(engine_error(&format!("inspect network {name}"), &e)),
        }
        let mut labels = self.labels("network");
        labels.remove(LABEL_ROLE);
        let created = self
            .docker
            .create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("overlay".to_owned()),
                attachable: Some(true),
                labels: Some(labels),
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {
                tracing::info!(network = %name, "created the replica overlay network");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(engine_error(&format!("create network {name}"), &e)),
        }
    }

    async fn inspect_service(&self, name: &str) -> Result<Option<Service>, DockerError> {
        let options = InspectServiceOptions {
            insert_defaults: false,
        };
        match self.docker.inspect_service(name, Some(options)).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the ring record's service (empty) unless it exists. Many gateways may race to
    /// do it: the name is unique, so one creates it and the others find it.
    pub(super) async fn ensure_ring(&self) -> Result<(), ProviderError> {
        let name = &self.settings.ring_service;
        match self.inspect_service(name).await {
            Ok(Some(s))
                if self.is_ours(s.spec.as_ref().and_then(|s| s.labels.as_ref()), "ring") =>
            {
                return Ok(())
            }
            Ok(Some(_)) => {
                return Err(ProviderError::Setup(format!(
                    "a service named {name} exists but is not this gateway's ring record: \
                     remove it or set another {}",
                    crate::provider::docker::INSTANCE_ENV
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(engine_error(&format!("inspect service {name}"), &e)),
        }
        let spec = spec::ring_service(name, &self.settings.image, self.labels("ring"));
        match self.docker.create_service(spec, None).await {
            Ok(_) => {
                tracing::info!(service = %name, "created the ring record");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(engine_error(&format!("create service {name}"), &e)),
        }
    }

    pub(super) async fn read_record(&self) -> Result<RingRecord, ProviderError> {
        let name = &self.settings.ring_service;
        let service = self
            .inspect_service(name)
            .await
            .map_err(|e| engine_error(&format!("inspect service {name}"), &e))?
            .ok_or_else(|| {
                ProviderError::Setup(format!("the ring record (service {name}) is missing"))
            })?;
        let version = service.version.and_then(|v| v.index).unwrap_or(0);
        let labels = service.spec.and_then(|s| s.labels).unwrap_or_default();
        let (record, bad) = RingRecord::from_labels(version, &labels);
        for b in bad {
            tracing::warn!(problem = %b, "skipping an unreadable ring record entry");
        }
        Ok(record)
    }

    pub(super) async fn write_record(
        &self,
        version: u64,
        members: BTreeMap<ServerId, RecordedMember>,
        proposals: Proposals,
    ) -> Result<(), RecordWriteError> {
        let name = &self.settings.ring_service;
        let mut labels = self.labels("ring");
        labels.extend(RingRecord::member_labels(&members));
        labels.extend(RingRecord::proposal_labels(&proposals));
        let spec = spec::ring_service(name, &self.settings.image, labels);
        let options = UpdateServiceOptions {
            version: i32::try_from(version).unwrap_or(i32::MAX),
            ..Default::default()
        };
        match self.docker.update_service(name, spec, options, None).await {
            Ok(_) => Ok(()),
            // Swarm's answer to a write on an old version (optimistic concurrency).
            Err(e) if matches!(status_of(&e), Some(409 | 500)) && is_out_of_sequence(&e) => {
                Err(RecordWriteError::Conflict)
            }
            Err(e) => Err(RecordWriteError::Engine(engine_error(
                &format!("update the ring record (service {name})"),
                &e,
            ))),
        }
    }

    /// Our replica services.
    pub(super) async fn replica_services(&self) -> Result<Vec<ReplicaService>, ProviderError> {
        let services = self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(self.our_filter("replica")),
                status: None,
            }))
            .await
            .map_err(|e| engine_error("list services", &e))?;
        Ok(services
            .into_iter()
            .filter_map(|s| {
                let spec = s.spec?;
                let labels = spec.labels?;
                Some(ReplicaService {
                    service_id: s.id?,
                    hostname: spec.name?,
                    id: labels
                        .get(LABEL_SERVER_ID)?
                        .parse()
                        .ok()
                        .and_then(ServerId::new)?,
                    slots: labels.get(LABEL_SLOTS).and_then(|v| parse_slots(v)),
                    spec: labels.get(LABEL_SPEC).cloned(),
                })
            })
            .collect())
    }

    /// The replicas whose task runs now, by hostname, with the address to reach each.
    pub(super) async fn observe(&self) -> Result<BTreeMap<String, Instance>, ProviderError> {
        let services = self.replica_services().await?;
        if services.is_empty() {
            return Ok(BTreeMap::new());
        }
        let ids: Vec<String> = services.iter().map(|s| s.service_id.clone()).collect();
        let tasks = self
            .docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([("service".to_owned(), ids)])),
            }))
            .await
            .map_err(|e| engine_error("list tasks", &e))?;
        let nodes = match self.settings.reach {
            Reach::Published => self.node_addresses().await?,
            Reach::Network => HashMap::new(),
        };
        let mut out = BTreeMap::new();
        for s in services {
            let Some((task, container)) = spec::running_task(&tasks, &s.service_id) else {
                continue;
            };
            let node = task.node_id.as_ref().and_then(|n| nodes.get(n)).copied();
            let network_ip = match self.settings.reach {
                Reach::Network => self.network_ip(&container, &s.hostname).await,
                Reach::Published => None,
            };
            let Some(addr) = spec::task_addr(
                self.settings.reach,
                task,
                self.settings.port,
                node,
                network_ip,
            ) else {
                tracing::debug!(replica = %s.hostname, "its task runs but has no address yet");
                continue;
            };
            out.insert(
                s.hostname.clone(),
                Instance {
                    id: s.id,
                    hostname: s.hostname,
                    addr,
                    instance_id: container,
                    slots: s.slots,
                    spec: s.spec,
                },
            );
        }
        Ok(out)
    }

    async fn node_addresses(&self) -> Result<HashMap<String, IpAddr>, ProviderError> {
        let nodes: Vec<Node> = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(|e| engine_error("list nodes", &e))?;
        Ok(nodes
            .into_iter()
            .filter_map(|n| Some((n.id?, n.status?.addr?.parse().ok()?)))
            .collect())
    }

    /// A task's address on the replica network: its container's, when it runs on this
    /// engine's node; else what the network's DNS says for `tasks.<hostname>` (the gateway
    /// then runs on that network).
    async fn network_ip(&self, container: &str, hostname: &str) -> Option<IpAddr> {
        let local = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|c| {
                c.network_settings?
                    .networks?
                    .get(&self.settings.network)?
                    .ip_address
                    .clone()
            })
            .and_then(|ip| ip.parse().ok());
        if local.is_some() {
            return local;
        }
        let name = format!("tasks.{hostname}:{}", self.settings.port);
        let found =
            tokio::time::timeout(Duration::from_millis(500), tokio::net::lookup_host(name)).await;
        found.ok()?.ok()?.map(|a: SocketAddr| a.ip()).next()
    }

    /// Creates the replica's service and waits until its task runs and has an address.
    pub(super) async fn create_replica(
        &self,
        spec: ReplicaSpec,
    ) -> Result<Instance, ProviderError> {
        let fail = |reason: String| ProviderError::Spawn {
            hostname: spec.hostname.clone(),
            reason,
        };
        self.ensure_network()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut labels = self.labels("replica");
        labels.insert(LABEL_SERVER_ID.to_owned(), spec.id.to_string());
        labels.insert(
            LABEL_SLOTS.to_owned(),
            crate::provider::format_slots(&spec.slots),
        );
        labels.insert(LABEL_SPEC.to_owned(), spec.app.fingerprint());
        let service = spec::replica_service(spec::Replica {
            app: &spec.app,
            network: &self.settings.network,
            port: self.settings.port,
            hostname: &spec.hostname,
            id: spec.id.get(),
            labels,
            reach: self.settings.reach,
        });
        let mut replaced = false;
        loop {
            match self.docker.create_service(service.clone(), None).await {
                Ok(_) => break,
                Err(e) if status_of(&e) == Some(409) && !replaced => {
                    // The name is taken: a leftover of ours with the same id (its gateway died
                    // before it was recorded or deleted) is replaced; anything else stays.
                    let existing = self
                        .inspect_service(&spec.hostname)
                        .await
                        .map_err(|e| fail(message_of(&e)))?;
                    let labels = existing
                        .as_ref()
                        .and_then(|s| s.spec.as_ref()?.labels.as_ref());
                    let same_id =
                        labels.and_then(|l| l.get(LABEL_SERVER_ID)) == Some(&spec.id.to_string());
                    if !(self.is_ours(labels, "replica") && same_id) {
                        return Err(fail(format!(
                            "a service named {} exists and is not a leftover of this ring: \
                             choose another hostname",
                            spec.hostname
                        )));
                    }
                    tracing::info!(replica = %spec.hostname, "replacing a leftover service of ours");
                    self.delete_replica(&spec.hostname).await?;
                    replaced = true;
                }
                Err(e) => {
                    return Err(fail(format!(
                        "the Swarm engine refused to create the service: {}",
                        message_of(&e)
                    )))
                }
            }
        }
        let deadline = tokio::time::Instant::now() + TASK_START_TIMEOUT;
        loop {
            let running = self.observe().await?;
            if let Some(inst) = running.get(&spec.hostname) {
                tracing::info!(replica = %spec.hostname, id = %spec.id, addr = %inst.addr, "replica service running");
                return Ok(inst.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(fail(format!(
                    "its task did not run within {TASK_START_TIMEOUT:?}: see `docker service ps {}`",
                    spec.hostname
                )));
            }
            tokio::time::sleep(TASK_POLL).await;
        }
    }

    /// Deletes our replica service named `hostname` (one that is not ours is left alone).
    pub(super) async fn delete_replica(&self, hostname: &str) -> Result<(), ProviderError> {
        let fail = |reason: String| ProviderError::Remove {
            hostname: hostname.to_owned(),
            reason,
        };
        let Some(s) = self
            .inspect_service(hostname)
            .await
            .map_err(|e| fail(message_of(&e)))?
        else {
            return Ok(());
        };
        if !self.is_ours(s.spec.as_ref().and_then(|s| s.labels.as_ref()), "replica") {
            tracing::warn!(
                replica = hostname,
                "the service does not carry our labels; leaving it alone"
            );
            return Ok(());
        }
        let id = s.id.unwrap_or_else(|| hostname.to_owned());
        match self.docker.delete_service(&id).await {
            Ok(()) => {
                tracing::info!(replica = hostname, "replica service removed");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(fail(message_of(&e))),
        }
    }
}

fn is_out_of_sequence(e: &DockerError) -> bool {
    // The engine says it only in words: "update out of sequence".
    message_of(e).contains("out of sequence")
}
