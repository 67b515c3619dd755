//! Admission: which new client connections the gateway takes.
//!
//! Owns: the global cap (`proxy.max_connections`, by default derived from the file-descriptor
//! limit with a reserve for upstream connections, replicas and files, as HAProxy derives
//! `maxconn` from `ulimit -n`), the per-client-IP cap (`proxy.max_connections_per_ip`), and the
//! counts behind them. A connection over a cap is closed at once and counted; established
//! connections are never touched.
//! Must not touch: requests. It decides at accept time only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::sync::lock;

/// File descriptors kept back from client connections: listeners, runtimes, the watcher,
/// replica pipes and checks, log and policy files.
pub const FD_RESERVE: u64 = 64;

/// The global cap `proxy.max_connections = 0` means: half of what the descriptor limit leaves
/// after the reserve (each client connection may hold an upstream connection), at least 16.
pub fn auto_max_connections(nofile: u64, max_replicas: u32) -> usize {
    let reserve = FD_RESERVE + 4 * u64::from(max_replicas);
    let usable = nofile.saturating_sub(reserve) / 2;
    usize::try_from(usable.max(16)).unwrap_or(usize::MAX)
}

/// The process's current (soft) limit on open files.
pub fn nofile_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    PerIp,
}

/// The caps' state; the counts live in [`Metrics`] (`connections_open`, `connections_refused_*`).
#[derive(Debug)]
pub struct Admission {
    nofile: u64,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    metrics: Arc<Metrics>,
}

/// A connection counted against the caps until dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    pub fn new(nofile: u64, metrics: Arc<Metrics>) -> Admission {
        Admission {
            nofile,
            per_ip: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn nofile(&self) -> u64 {
        self.nofile
    }

    /// The global cap in force for `config`.
    pub fn max_connections(&self, config: &ProxyConfig, max_replicas: u32) -> usize {
        match config.max_connections {
            0 => auto_max_connections(self.nofile, max_replicas),
            n => n as usize,
        }
    }

    pub fn open(&self) -> u64 {
        self.metrics.connections_open.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `ip` in, or says which cap it is over.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        config: &ProxyConfig,
        max_replicas: u32,
    ) -> Result<Admitted, Refusal> {
        let max = self.max_connections(config, max_replicas) as u64;
        let open = &self.metrics.connections_open;
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .connections_refused_max
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::MaxConnections);
        }
        let per_ip = config.max_connections_per_ip;
        if per_ip == 0 {
            return Ok(Admitted {
                admission: self.clone(),
                ip: None,
            });
        }
        let ip = ip.to_canonical();
        let mut counts = lock(&self.per_ip);
        let n = counts.entry(ip).or_insert(0);
        if *n >= per_ip {
            drop(counts);
            open.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .connections_refused_per_ip
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        *n += 1;
        Ok(Admitted {
            admission: self.clone(),
            ip: Some(ip),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut counts = lock(&self.admission.per_ip);
            if let Some(n) = counts.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_auto_cap_leaves_room_for_upstream_connections_and_files() {
        assert_eq!(auto_max_connections(1024, 50), (1024 - 64 - 200) / 2);
        assert_eq!(auto_max_connections(96, 3), 16, "never below 16");
        assert_eq!(auto_max_connections(1 << 20, 50), ((1 << 20) - 264) / 2);
    }

    #[test]
    fn caps_refuse_new_connections_and_free_slots_on_drop() {
        let metrics = Arc::new(Metrics::default());
        let a = Arc::new(Admission::new(1 << 20, metrics.clone()));
        let config = ProxyConfig {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..ProxyConfig::default()
        };
        let one = a.admit(ip("10.0.0.1"), &config, 50).expect("first");
        let two = a.admit(ip("10.0.0.1"), &config, 50).expect("second");
        assert_eq!(
            a.admit(ip("10.0.0.1"), &config, 50).err(),
            Some(Refusal::PerIp)
        );
        let three = a
            .admit(ip("::ffff:10.0.0.2"), &config, 50)
            .expect("other ip");
        assert_eq!(
            a.admit(ip("10.0.0.3"), &config, 50).err(),
            Some(Refusal::MaxConnections)
        );
        assert_eq!(a.open(), 3);
        drop(one);
        assert!(a.admit(ip("10.0.0.1"), &config, 50).is_ok(), "a slot freed");
        drop((two, three));
        assert_eq!(a.open(), 0);
        assert!(lock(&a.per_ip).is_empty(), "no entry left behind");
        assert_eq!(metrics.connections_refused_max.load(Ordering::Relaxed), 1);
        assert_eq!(
            metrics.connections_refused_per_ip.load(Ordering::Relaxed),
            1
        );
    }
}
