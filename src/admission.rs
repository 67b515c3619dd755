//! Admission: which client connections and which requests the gateway takes.
//!
//! Owns: the connection caps (`proxy.max_connections`, by default derived from the
//! file-descriptor limit with a reserve for upstream connections, replicas and files, as HAProxy
//! derives `maxconn` from `ulimit -n`; `proxy.max_connections_per_ip`) and the request budgets
//! (`proxy.max_requests`, requests in flight in all, by default derived the same way, and
//! `proxy.max_requests_per_ip`), with the counts behind them. A connection over a cap is closed
//! at once; a request over a budget is refused before it holds anything (HTTP/2:
//! `REFUSED_STREAM`, HTTP/1: 503 with `Retry-After`); both are counted. Established connections
//! and admitted requests are never touched.
//!
//! Why requests and not only connections: an HTTP/2 connection carries up to
//! `proxy.http2_max_streams` requests at once, each of which may hold a replica connection, so a
//! few client connections could otherwise hold every descriptor the gateway has. The budgets
//! bound what the streams of all connections, and of one address, hold together.
//! Must not touch: what a request means or where it goes. It decides at accept time and when a
//! request enters the proxy, on counts alone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::sync::lock;

/// File descriptors kept back from client connections: listeners, runtimes, the watcher,
/// replica pipes and checks, log and policy files.
pub const FD_RESERVE: u64 = 64;

/// The global cap `proxy.max_connections = 0` means: half of what the descriptor limit leaves
/// after the reserve (the other half is for replica connections, one per request in flight), at
/// least 16.
pub fn auto_max_connections(nofile: u64, max_replicas: u32) -> usize {
    let reserve = FD_RESERVE + 4 * u64::from(max_replicas);
    let usable = nofile.saturating_sub(reserve) / 2;
    usize::try_from(usable.max(16)).unwrap_or(usize::MAX)
}

/// The budget `proxy.max_requests = 0` means: the other half of the descriptors, one replica
/// connection per request in flight (the same figure as [`auto_max_connections`]).
pub fn auto_max_requests(nofile: u64, max_replicas: u32) -> u64 {
    auto_max_connections(nofile, max_replicas) as u64
}

/// What `proxy.max_requests_per_ip = 0` means: a quarter of the global budget (at least 8), so
/// one address cannot hold more than a quarter of what the gateway can carry.
pub fn auto_max_requests_per_ip(max_requests: u64) -> u64 {
    (max_requests / 4).max(8)
}

/// The process's current (soft) limit on open files.
pub fn nofile_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Why a connection or a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `proxy.max_connections` connections are open.
    MaxConnections,
    /// The address has `proxy.max_connections_per_ip` connections open.
    PerIp,
    /// `proxy.max_requests` requests are in flight.
    MaxRequests,
    /// The address has `proxy.max_requests_per_ip` requests in flight.
    RequestsPerIp,
}

/// The budgets in force for one config: what `0` derives to, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub max_connections: u64,
    pub max_requests: u64,
    pub max_requests_per_ip: u64,
    pub max_requests_per_replica: u64,
}

/// The caps' state; the counts live in [`Metrics`] (`connections_open`, `requests_in_flight`,
/// `connections_refused_*`, `requests_refused_*`).
#[derive(Debug)]
pub struct Admission {
    nofile: u64,
    /// When the gateway last ran out of descriptors (ms since `epoch`; 0: never).
    exhausted_at: AtomicU64,
    epoch: std::time::Instant,
    /// One entry per address with a connection open.
    per_ip: Mutex<HashMap<IpAddr, Arc<Address>>>,
    metrics: Arc<Metrics>,
}

/// What one client address holds: its connections (changed under the map's lock) and its
/// requests in flight (changed by the requests, without a lock).
#[derive(Debug, Default)]
struct Address {
    connections: AtomicU32,
    in_flight: AtomicU32,
}

/// A connection counted against the caps until dropped; its requests ask it for a place in the
/// request budgets ([`Admitted::request`]).
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
    address: Arc<Address>,
}

/// A request counted in flight (in all and for its address) until dropped: with the response
/// body, so a request is counted until its last byte went out.
#[derive(Debug)]
pub struct RequestPlace {
    admitted: Holding,
}

/// How a request holds its connection's record: shared with the connection while it serves,
/// alone once nothing else does ([`RequestPlace::alone`]).
#[derive(Debug)]
enum Holding {
    Shared(Arc<Admitted>),
    Alone(Admitted),
    /// Only while [`RequestPlace::alone`] swaps one for the other.
    Moving,
}

impl Admission {
    pub fn new(nofile: u64, metrics: Arc<Metrics>) -> Admission {
        Admission {
            nofile,
            exhausted_at: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn nofile(&self) -> u64 {
        self.nofile
    }

    /// The global connection cap in force for `config`.
    pub fn max_connections(&self, config: &ProxyConfig, max_replicas: u32) -> usize {
        match config.max_connections {
            0 => auto_max_connections(self.nofile, max_replicas),
            n => n as usize,
        }
    }

    /// Every cap and budget in force for `config`, with the derived ones resolved.
    pub fn budgets(&self, config: &ProxyConfig, max_replicas: u32) -> Budgets {
        let max_requests = match config.max_requests {
            0 => auto_max_requests(self.nofile, max_replicas),
            n => u64::from(n),
        };
        let max_requests_per_ip = match config.max_requests_per_ip {
            0 => auto_max_requests_per_ip(max_requests),
            n => u64::from(n),
        };
        let max_requests_per_replica = match config.max_requests_per_replica {
            0 => (max_requests / 2).max(1),
            n => u64::from(n),
        };
        Budgets {
            max_connections: self.max_connections(config, max_replicas) as u64,
            max_requests,
            max_requests_per_ip,
            max_requests_per_replica,
        }
    }

    pub fn open(&self) -> u64 {
        self.metrics.connections_open.load(Ordering::Relaxed)
    }

    /// Records that the gateway just ran out of descriptors (an accept or a connect failed
    /// with EMFILE or ENFILE).
    pub fn note_exhausted(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.exhausted_at.store(now.max(1), Ordering::Relaxed);
    }

    /// Whether the gateway itself is short of file descriptors now: it ran out within the last
    /// second, or its client and replica connections with the reserve take nine tenths of its
    /// limit. A replica connect that times out then says nothing about the replica.
    pub fn short_of_descriptors(&self, max_replicas: u32) -> bool {
        let at = self.exhausted_at.load(Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if at != 0 && now.saturating_sub(at) < 1000 {
            return true;
        }
        let in_use = self.open()
            + crate::descriptors::replica_connections()
            + FD_RESERVE
            + 4 * u64::from(max_replicas);
        crate::descriptors::short(in_use, self.nofile)
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
        let ip = ip.to_canonical();
        let mut addresses = lock(&self.per_ip);
        let address = addresses.entry(ip).or_default();
        let connections = address.connections.load(Ordering::Relaxed);
        if per_ip != 0 && connections >= per_ip {
            drop(addresses);
            open.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .connections_refused_per_ip
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        address
            .connections
            .store(connections + 1, Ordering::Relaxed);
        let address = address.clone();
        Ok(Admitted {
            admission: self.clone(),
            ip,
            address,
        })
    }
}

impl Admitted {
    /// A place for one request of this connection in the request budgets, or which budget is
    /// spent (counted in the metrics).
    pub fn request(self: &Arc<Self>, budgets: &Budgets) -> Result<RequestPlace, Refusal> {
        let metrics = &self.admission.metrics;
        let in_flight = &metrics.requests_in_flight;
        if in_flight.fetch_add(1, Ordering::AcqRel) >= budgets.max_requests {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics.requests_refused_max.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::MaxRequests);
        }
        let mine = self.address.in_flight.fetch_add(1, Ordering::AcqRel);
        if u64::from(mine) >= budgets.max_requests_per_ip {
            self.address.in_flight.fetch_sub(1, Ordering::AcqRel);
            in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics
                .requests_refused_per_ip
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::RequestsPerIp);
        }
        Ok(RequestPlace {
            admitted: Holding::Shared(self.clone()),
        })
    }

    /// The budgets in force for `config` ([`Admission::budgets`]).
    pub fn budgets(&self, config: &ProxyConfig, max_replicas: u32) -> Budgets {
        self.admission.budgets(config, max_replicas)
    }

    /// The caps this connection was admitted under.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }
}

impl RequestPlace {
    /// The same place, holding its connection's record alone when nothing else holds it any
    /// more (an open tunnel's, after its connection handed it over): a record of its own on
    /// the heap would stay there among the pages the connection's task freed, and keep them
    /// resident for as long as the tunnel is open.
    pub fn alone(mut self) -> RequestPlace {
        self.admitted = match std::mem::replace(&mut self.admitted, Holding::Moving) {
            Holding::Shared(shared) => match Arc::try_unwrap(shared) {
                Ok(admitted) => Holding::Alone(admitted),
                Err(shared) => Holding::Shared(shared),
            },
            holding => holding,
        };
        self
    }
}

impl Drop for RequestPlace {
    fn drop(&mut self) {
        let admitted = match &self.admitted {
            Holding::Shared(admitted) => &**admitted,
            Holding::Alone(admitted) => admitted,
            Holding::Moving => return,
        };
        admitted.address.in_flight.fetch_sub(1, Ordering::AcqRel);
        admitted
            .admission
            .metrics
            .requests_in_flight
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::AcqRel);
        let mut addresses = lock(&self.admission.per_ip);
        if let Some(address) = addresses.get(&self.ip) {
            let left = address
                .connections
                .load(Ordering::Relaxed)
                .saturating_sub(1);
            address.connections.store(left, Ordering::Relaxed);
            // Requests of closed connections may still finish on their own `Address`; a new
            // connection from the address starts a new entry.
            if left == 0 {
                addresses.remove(&self.ip);
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
        assert_eq!(lock(&a.per_ip).len(), 2, "one entry per address");
        drop((two, three));
        assert_eq!(a.open(), 0);
        assert!(lock(&a.per_ip).is_empty(), "no entry left behind");
        assert_eq!(metrics.connections_refused_max.load(Ordering::Relaxed), 1);
        assert_eq!(
            metrics.connections_refused_per_ip.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn the_request_budgets_derive_from_the_descriptors_and_refuse_past_them() {
        let metrics = Arc::new(Metrics::default());
        let a = Arc::new(Admission::new(1024, metrics.clone()));
        let auto = a.budgets(&ProxyConfig::default(), 50);
        assert_eq!(auto.max_requests, (1024 - 64 - 200) / 2);
        assert_eq!(auto.max_requests_per_ip, auto.max_requests / 4);
        assert_eq!(auto_max_requests_per_ip(10), 8, "never below 8");

        let budgets = Budgets {
            max_connections: 10,
            max_requests: 5,
            max_requests_per_ip: 3,
            max_requests_per_replica: 2,
        };
        let config = ProxyConfig::default();
        let first = Arc::new(a.admit(ip("10.0.0.1"), &config, 50).expect("first"));
        let second = Arc::new(a.admit(ip("10.0.0.1"), &config, 50).expect("same address"));
        let other = Arc::new(a.admit(ip("10.0.0.2"), &config, 50).expect("other address"));
        // Three from one address, over two of its connections: the address is at its budget.
        let held: Vec<RequestPlace> = [&first, &first, &second]
            .iter()
            .map(|c| c.request(&budgets).expect("under the budgets"))
            .collect();
        assert_eq!(
            second.request(&budgets).err(),
            Some(Refusal::RequestsPerIp),
            "the address's budget counts the requests of all its connections"
        );
        let o1 = other
            .request(&budgets)
            .expect("another address is not held back");
        let o2 = other
            .request(&budgets)
            .expect("the global budget has one more");
        assert_eq!(other.request(&budgets).err(), Some(Refusal::MaxRequests));
        assert_eq!(metrics.requests_in_flight.load(Ordering::Relaxed), 5);
        drop(held);
        assert!(first.request(&budgets).is_ok(), "places came back");
        drop((o1, o2));
        assert_eq!(metrics.requests_in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.requests_refused_per_ip.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.requests_refused_max.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn short_of_descriptors_after_running_out() {
        let a = Admission::new(1 << 20, Arc::new(Metrics::default()));
        assert!(!a.short_of_descriptors(4));
        a.note_exhausted();
        assert!(a.short_of_descriptors(4), "for a second after running out");
    }

    #[test]
    fn a_request_outliving_its_connection_gives_its_place_back() {
        let metrics = Arc::new(Metrics::default());
        let a = Arc::new(Admission::new(1 << 20, metrics.clone()));
        let budgets = a.budgets(&ProxyConfig::default(), 50);
        let conn = Arc::new(
            a.admit(ip("10.0.0.1"), &ProxyConfig::default(), 50)
                .expect("admitted"),
        );
        let place = conn.request(&budgets).expect("a place");
        drop(conn);
        assert_eq!(
            a.open(),
            1,
            "the connection is counted while its request runs"
        );
        drop(place);
        assert_eq!(a.open(), 0);
        assert_eq!(metrics.requests_in_flight.load(Ordering::Relaxed), 0);
        assert!(lock(&a.per_ip).is_empty());
    }

    #[test]
    fn a_request_holding_its_connection_alone_still_counts_both_until_it_ends() {
        let metrics = Arc::new(Metrics::default());
        let a = Arc::new(Admission::new(1 << 20, metrics.clone()));
        let budgets = a.budgets(&ProxyConfig::default(), 50);
        let conn = Arc::new(
            a.admit(ip("10.0.0.1"), &ProxyConfig::default(), 50)
                .expect("admitted"),
        );
        let place = conn.request(&budgets).expect("a place").alone();
        assert!(
            matches!(place.admitted, Holding::Shared(_)),
            "shared while its connection holds it too"
        );
        drop(conn);
        let place = place.alone();
        assert!(matches!(place.admitted, Holding::Alone(_)));
        let place = place.alone();
        assert!(matches!(place.admitted, Holding::Alone(_)), "and stays so");
        assert_eq!(a.open(), 1);
        assert_eq!(metrics.requests_in_flight.load(Ordering::Relaxed), 1);
        drop(place);
        assert_eq!(a.open(), 0);
        assert_eq!(metrics.requests_in_flight.load(Ordering::Relaxed), 0);
        assert!(lock(&a.per_ip).is_empty());
    }
}
