//! The `swarm` provider: replicas as Docker Swarm services, membership as a record in the
//! engine that every gateway watching the swarm shares.
//!
//! Owns: the [`SwarmProvider`] type and its [`Provider`] and [`SharedRing`] impls; the
//! submodules own the rest: [`spec`] (what a replica service and the ring record's service
//! are, reading tasks; pure), [`engine`] (the engine calls) and [`watch`] (the engine's events
//! and a short poll turned into [`ProviderEvent`]s). With `provider/docker` the only module
//! that imports bollard.
//! Must not touch: health, routing or membership decisions: the controller plans every change
//! of the record and writes it through [`SharedRing`].
//!
//! One service per replica, named exactly its hostname (so `/add` and `/rm` keep their
//! contract), with one task on `provider.network` (an attachable overlay, created if missing),
//! restarted by Swarm's own restart policy wherever Swarm schedules it, checked by the image's
//! `ringgate-server --check` for the built-in server's image (any other image keeps its own
//! `HEALTHCHECK`, if it has one; the gateway's own checks decide readiness either way), from
//! the replica spec (image, command, args, env, mounts, labels, user, limits). Every service
//! carries `ringgate.managed=true`,
//! `ringgate.instance=<instance>` (so several rings share a swarm without touching each
//! other's services) and `ringgate.role`; a replica also its `ringgate.server-id` and
//! `ringgate.slots`. The ring record is the labels of one service that runs no task,
//! `ringgate-ring-<instance>`; writes to it name the version they were planned on, and Swarm
//! refuses a write on an old version ("update out of sequence"): that is the one atomic
//! operation concurrent `/add`s and `/rm`s on different gateways are serialised by.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{BoxFuture, Instance, Provider, ProviderError, ProviderEvent, ReplicaSpec};
use crate::config::Config;
use crate::provider::record::{Proposals, RecordedMember, RingRecord};
use crate::provider::{RecordWriteError, SharedRing};
use crate::ring::ServerId;

mod engine;
mod spec;
mod watch;

pub use engine::{ring_service_name, LABEL_ROLE};
use engine::{Engine, Settings};
pub use watch::POLL;

/// How long connecting waits for the engine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SwarmProvider {
    engine: Arc<Engine>,
    watch_task: JoinHandle<()>,
    engine_version: String,
}

/// The ring record's home: the ring service's labels.
struct RingStore(Arc<Engine>);

impl SharedRing for RingStore {
    fn read(&self) -> BoxFuture<'_, Result<RingRecord, ProviderError>> {
        Box::pin(self.0.read_record())
    }

    fn write(
        &self,
        version: u64,
        members: BTreeMap<ServerId, RecordedMember>,
        proposals: Proposals,
    ) -> BoxFuture<'_, Result<(), RecordWriteError>> {
        Box::pin(self.0.write_record(version, members, proposals))
    }
}

impl SwarmProvider {
    /// Connects to the local engine, checks that it is a Swarm manager, makes sure the replica
    /// network and the ring record exist, and starts watching.
    pub async fn connect(
        config: &Config,
        events: mpsc::Sender<ProviderEvent>,
    ) -> Result<SwarmProvider, ProviderError> {
        SwarmProvider::connect_as(config, events, crate::provider::docker::instance_label()).await
    }

    /// [`connect`](Self::connect) for the ring labelled `instance`.
    pub async fn connect_as(
        config: &Config,
        events: mpsc::Sender<ProviderEvent>,
        instance: String,
    ) -> Result<SwarmProvider, ProviderError> {
        let (docker, engine_version) =
            crate::provider::docker::engine::connect_engine(CONNECT_TIMEOUT).await?;
        let p = &config.provider;
        let engine = Arc::new(Engine {
            docker,
            settings: Settings {
                image: p.image.clone(),
                network: p.network.clone(),
                port: p.container_port,
                reach: p.reach,
                ring_service: ring_service_name(&instance),
                instance,
            },
        });
        engine.check_manager().await?;
        engine.ensure_network().await?;
        engine.ensure_ring().await?;
        let watch_task = tokio::spawn(watch::watch(engine.clone(), events));
        Ok(SwarmProvider {
            engine,
            watch_task,
            engine_version,
        })
    }

    pub fn engine_version(&self) -> &str {
        &self.engine_version
    }

    /// The instance label: which ring of the swarm this gateway belongs to.
    pub fn instance(&self) -> &str {
        &self.engine.settings.instance
    }
}

impl Drop for SwarmProvider {
    fn drop(&mut self) {
        self.watch_task.abort();
    }
}

impl Provider for SwarmProvider {
    fn kind(&self) -> &'static str {
        "swarm"
    }

    fn mode(&self) -> crate::provider::Mode {
        crate::provider::Mode::Shared(Arc::new(RingStore(self.engine.clone())))
    }

    fn spawn(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>> {
        Box::pin(self.engine.create_replica(spec))
    }

    fn remove(&self, hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let hostname = hostname.to_owned();
        Box::pin(async move { self.engine.delete_replica(&hostname).await })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let running = self.engine.observe().await?;
            Ok(running.into_values().collect())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Services keep running: they belong to the swarm, not to this gateway.
            self.watch_task.abort();
            tracing::info!(instance = %self.engine.settings.instance, "leaving the replica services to the swarm");
        })
    }
}
