//! The `static` provider: fixed replica addresses from `provider.servers`.
//!
//! Owns: turning the configured list into instances. It never starts or stops anything; the
//! controller health-checks these replicas like any other and routes around the down ones.

use super::{BoxFuture, Instance, Provider, ProviderError, ReplicaSpec};
use crate::config::StaticServer;
use crate::ring::ServerId;

pub struct StaticProvider {
    servers: Vec<Instance>,
}

/// The static servers with their ids: the k-th server in `provider.servers` has id k, so the
/// list's order is the ring's identity (reordering it moves keys).
pub fn members(servers: &[StaticServer]) -> impl Iterator<Item = (ServerId, &StaticServer)> {
    servers
        .iter()
        .zip(1u32..)
        .filter_map(|(s, n)| Some((ServerId::new(n)?, s)))
}

impl StaticProvider {
    pub fn new(servers: &[StaticServer]) -> StaticProvider {
        let servers = members(servers)
            .map(|(id, s)| Instance {
                id,
                hostname: s.name.clone(),
                addr: s.address,
                instance_id: format!("static:{}", s.address),
                slots: None,
                spec: None,
            })
            .collect();
        StaticProvider { servers }
    }
}

impl Provider for StaticProvider {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn mode(&self) -> crate::provider::Mode {
        crate::provider::Mode::Fixed
    }

    fn spawn(&self, _spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>> {
        Box::pin(async {
            Err(ProviderError::CannotSpawn {
                provider: "static",
                hint: "list the replica in provider.servers in the config instead",
            })
        })
    }

    fn remove(&self, _hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        // Static replicas are not ours to stop: /rm only takes them out of the ring.
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        let servers = self.servers.clone();
        Box::pin(async move { Ok(servers) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
