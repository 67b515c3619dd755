//! The process's file descriptors as the gateway accounts for them.
//!
//! Owns: the process-wide count of connections to replicas ([`ReplicaConnection`], one
//! descriptor each, carrying a request or idle in a pool) and the rule for being short of
//! descriptors ([`short`]). A process-wide count because it counts a process-wide resource:
//! every gateway in the process shares the one descriptor table.
//! Must not touch: connections themselves (the upstream pool opens and closes them) or the
//! decisions taken on the count (admission).

use std::sync::atomic::{AtomicU64, Ordering};

static REPLICA_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Connections to replicas open now.
pub fn replica_connections() -> u64 {
    REPLICA_CONNECTIONS.load(Ordering::Relaxed)
}

/// One open replica connection, counted until dropped.
#[derive(Debug)]
pub struct ReplicaConnection(());

impl ReplicaConnection {
    pub fn opened() -> ReplicaConnection {
        REPLICA_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        ReplicaConnection(())
    }
}

impl Drop for ReplicaConnection {
    fn drop(&mut self) {
        REPLICA_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `in_use` descriptors of `nofile` leave the process short: nine tenths or more taken.
pub fn short(in_use: u64, nofile: u64) -> bool {
    in_use.saturating_mul(10) >= nofile.saturating_mul(9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_at_nine_tenths() {
        assert!(!short(900, 1001));
        assert!(short(900, 1000));
        assert!(short(u64::MAX, u64::MAX));
    }

    #[test]
    fn a_replica_connection_is_counted_while_it_lives() {
        let before = replica_connections();
        let c = ReplicaConnection::opened();
        assert!(replica_connections() > before);
        drop(c);
    }
}
