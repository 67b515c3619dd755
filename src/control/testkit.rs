//! A scripted world for the control plane's unit tests: a provider whose replicas start, fail
//! and exit, and a prober whose checks pass or fail, as a test says — on paused tokio time, so
//! back-off, rise/fall and `/add` rollback are tested without sleeping.
//!
//! Only the controller's surroundings are scripted; the controller, membership, ring, health
//! tracker and policy are the real ones. The integration tests in `tests/` run the same flows
//! against real processes and containers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Controller, ControllerHandle, Parts};
use crate::config::Config;
use crate::health::probe::{Check, Prober};
use crate::health::ProbeOutcome;
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::provider::record::RecordedMember;
use crate::provider::{
    AppSpec, Instance, Provider, ProviderError, ProviderEvent, RecordWriteError, ReplicaSpec,
    RingRecord, SharedRing,
};
use crate::ring::ServerId;
use crate::snapshot::{Shared, Snapshot};
use crate::sync::lock;

#[derive(Default)]
struct State {
    next_port: u16,
    next_instance: u64,
    /// Running instances by instance id (a roll runs two of one hostname for a moment), with
    /// the spec each was started from.
    running: BTreeMap<String, (Instance, Option<Arc<AppSpec>>)>,
    spawns: Vec<(String, Instant)>,
    spawned_slots: Vec<(String, Vec<u32>)>,
    /// Every start's spec, with `beside` (a roll's replacement).
    spawned_specs: Vec<(String, Arc<AppSpec>, bool)>,
    removes: Vec<String>,
    /// Instances stopped one by one (`retire`), by hostname.
    retired: Vec<String>,
    /// Hostname → how many more starts fail.
    fail_starts: HashMap<String, u32>,
    unhealthy: HashSet<String>,
    /// Instances started with this `env` entry never pass a check.
    unhealthy_env: Option<(String, String)>,
    existing: Vec<Instance>,
}

impl State {
    fn insert(&mut self, inst: Instance, app: Option<Arc<AppSpec>>) {
        self.running.insert(inst.instance_id.clone(), (inst, app));
    }

    /// Removes every running instance of `hostname`, returning them.
    fn remove_host(&mut self, hostname: &str) -> Vec<Instance> {
        let ids: Vec<String> = self
            .running
            .iter()
            .filter(|(_, (i, _))| i.hostname == hostname)
            .map(|(k, _)| k.clone())
            .collect();
        ids.iter()
            .filter_map(|k| self.running.remove(k).map(|(i, _)| i))
            .collect()
    }
}

pub struct World {
    state: Mutex<State>,
    events: mpsc::Sender<ProviderEvent>,
    manages: bool,
    /// A swarm-like engine: the ring record lives here, shared by every gateway on this
    /// world, and the engine restarts dead replicas itself.
    record: Option<Arc<MemoryRecord>>,
}

/// The ring record in memory, with the engine's optimistic concurrency: a write on an old
/// version is refused. Every accepted write is broadcast to the subscribed gateways as the
/// engine's watch would.
#[derive(Default)]
pub struct MemoryRecord {
    record: Mutex<RingRecord>,
    subscribers: Mutex<Vec<mpsc::Sender<ProviderEvent>>>,
    pub writes: Mutex<u32>,
    pub conflicts: Mutex<u32>,
    /// While set, the engine does not answer.
    pub down: Mutex<bool>,
}

impl MemoryRecord {
    pub fn get(&self) -> RingRecord {
        lock(&self.record).clone()
    }

    /// What the engine's watch says when the engine stops (or starts again) answering.
    pub fn broadcast_engine(&self, reachable: bool) {
        self.broadcast(ProviderEvent::Engine {
            reachable,
            detail: if reachable {
                String::new()
            } else {
                "scripted: down".into()
            },
        });
    }

    /// A watch delivering `record` (possibly an old one) to every gateway.
    pub fn broadcast_ring(&self, record: RingRecord) {
        self.broadcast(ProviderEvent::Ring(record));
    }

    fn broadcast(&self, event: ProviderEvent) {
        for s in lock(&self.subscribers).iter() {
            let _ = s.try_send(event.clone());
        }
    }
}

impl SharedRing for MemoryRecord {
    fn read(&self) -> BoxFuture<'_, Result<RingRecord, ProviderError>> {
        Box::pin(async move {
            if *lock(&self.down) {
                return Err(ProviderError::Setup("scripted: the engine is down".into()));
            }
            Ok(self.get())
        })
    }

    fn write(
        &self,
        version: u64,
        members: BTreeMap<ServerId, RecordedMember>,
        proposals: crate::provider::Proposals,
    ) -> BoxFuture<'_, Result<(), RecordWriteError>> {
        Box::pin(async move {
            // Let concurrent callers interleave between their read and their write.
            tokio::task::yield_now().await;
            if *lock(&self.down) {
                return Err(RecordWriteError::Engine(ProviderError::Setup(
                    "scripted: the engine is down".into(),
                )));
            }
            let record = {
                let mut r = lock(&self.record);
                if r.version != version {
                    *lock(&self.conflicts) += 1;
                    return Err(RecordWriteError::Conflict);
                }
                *lock(&self.writes) += 1;
                *r = RingRecord {
                    version: version + 1,
                    members,
                    proposals,
                };
                r.clone()
            };
            self.broadcast(ProviderEvent::Ring(record));
            Ok(())
        })
    }
}

impl World {
    /// A world whose provider starts replicas (`manages`) or only lists fixed ones.
    pub fn new(manages: bool) -> (Arc<World>, mpsc::Receiver<ProviderEvent>) {
        let (events, rx) = mpsc::channel(64);
        let world = World {
            state: Mutex::new(State {
                next_port: 20_000,
                ..State::default()
            }),
            events,
            manages,
            record: None,
        };
        (Arc::new(world), rx)
    }

    /// A swarm-like world: a shared ring record, replicas restarted by the engine. Each
    /// gateway on it gets its events from [`World::subscribe`].
    pub fn swarm() -> Arc<World> {
        let (events, _) = mpsc::channel(1);
        Arc::new(World {
            state: Mutex::new(State {
                next_port: 20_000,
                ..State::default()
            }),
            events,
            manages: true,
            record: Some(Arc::new(MemoryRecord::default())),
        })
    }

    /// The events one more gateway on this world receives.
    pub fn subscribe(&self) -> mpsc::Receiver<ProviderEvent> {
        let (tx, rx) = mpsc::channel(256);
        if let Some(r) = &self.record {
            lock(&r.subscribers).push(tx);
        }
        rx
    }

    pub fn record(&self) -> Arc<MemoryRecord> {
        self.record.clone().expect("a swarm world")
    }

    /// The engine restarts `hostname`'s dead task: a new instance, reported as running.
    pub fn restart_task(&self, hostname: &str, id: u32) {
        let inst = {
            let mut s = lock(&self.state);
            let inst = s.instance(ServerId::new(id).expect("non-zero id"), hostname);
            s.insert(inst.clone(), None);
            inst
        };
        self.record()
            .broadcast(ProviderEvent::Running { instance: inst });
    }

    /// A swarm replica's task dies: every gateway hears of it.
    pub fn kill_task(&self, hostname: &str) {
        let gone = lock(&self.state).remove_host(hostname);
        for inst in gone {
            self.record().broadcast(ProviderEvent::Exited {
                hostname: hostname.to_owned(),
                instance_id: inst.instance_id,
                detail: "killed by the test".into(),
            });
        }
    }

    /// Replicas `list()` reports at start (adopted, or the static servers).
    pub fn existing(&self, replicas: &[(u32, &str)]) {
        let mut s = lock(&self.state);
        for &(id, name) in replicas {
            let inst = s.instance(ServerId::new(id).expect("non-zero id"), name);
            s.insert(inst.clone(), None);
            s.existing.push(inst);
        }
    }

    /// A replica `list()` reports at start with the slots recorded for it (a docker container
    /// labelled by an earlier run).
    pub fn existing_recorded(&self, id: u32, name: &str, slots: &[u32]) {
        let mut s = lock(&self.state);
        let mut inst = s.instance(ServerId::new(id).expect("non-zero id"), name);
        inst.slots = Some(slots.to_vec());
        s.insert(inst.clone(), None);
        s.existing.push(inst);
    }

    /// A replica `list()` reports at start, recorded as started from the spec with this
    /// fingerprint (a docker container's `ringgate.spec` label).
    pub fn existing_with_spec(&self, id: u32, name: &str, spec: &str) {
        let mut s = lock(&self.state);
        let mut inst = s.instance(ServerId::new(id).expect("non-zero id"), name);
        inst.spec = Some(spec.to_owned());
        s.insert(inst.clone(), None);
        s.existing.push(inst);
    }

    /// The slots each start of `hostname` was asked to record.
    pub fn spawned_slots(&self, hostname: &str) -> Vec<Vec<u32>> {
        lock(&self.state)
            .spawned_slots
            .iter()
            .filter(|(h, _)| h == hostname)
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub fn fail_starts(&self, hostname: &str, times: u32) {
        lock(&self.state)
            .fail_starts
            .insert(hostname.to_owned(), times);
    }

    pub fn set_healthy(&self, hostname: &str, healthy: bool) {
        let mut s = lock(&self.state);
        if healthy {
            s.unhealthy.remove(hostname);
        } else {
            s.unhealthy.insert(hostname.to_owned());
        }
    }

    /// Instances started with `env[key] = value` never pass a check (a spec that is broken).
    pub fn fail_checks_with_env(&self, key: &str, value: &str) {
        lock(&self.state).unhealthy_env = Some((key.to_owned(), value.to_owned()));
    }

    /// Every start of `hostname`: the spec and whether it was a roll's replacement.
    pub fn spawned_specs(&self, hostname: &str) -> Vec<(Arc<AppSpec>, bool)> {
        lock(&self.state)
            .spawned_specs
            .iter()
            .filter(|(h, _, _)| h == hostname)
            .map(|(_, a, b)| (a.clone(), *b))
            .collect()
    }

    /// Instances stopped one by one (a roll's old instances, failed replacements).
    pub fn retired(&self) -> Vec<String> {
        lock(&self.state).retired.clone()
    }

    /// How many instances of `hostname` run now.
    pub fn instances_of(&self, hostname: &str) -> usize {
        lock(&self.state)
            .running
            .values()
            .filter(|(i, _)| i.hostname == hostname)
            .count()
    }

    /// The replica's process dies: the provider reports it at once.
    pub async fn kill(&self, hostname: &str) {
        let gone = lock(&self.state).remove_host(hostname);
        for inst in gone {
            let _ = self
                .events
                .send(ProviderEvent::Exited {
                    hostname: hostname.to_owned(),
                    instance_id: inst.instance_id,
                    detail: "killed by the test".into(),
                })
                .await;
        }
    }

    /// When each start of `hostname` was asked for.
    pub fn spawns_of(&self, hostname: &str) -> Vec<Instant> {
        lock(&self.state)
            .spawns
            .iter()
            .filter(|(h, _)| h == hostname)
            .map(|(_, t)| *t)
            .collect()
    }

    pub fn removes(&self) -> Vec<String> {
        lock(&self.state).removes.clone()
    }

    /// The hostnames with an instance running, in order.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.state)
            .running
            .values()
            .map(|(i, _)| i.hostname.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

impl State {
    fn instance(&mut self, id: ServerId, hostname: &str) -> Instance {
        self.next_port += 1;
        self.next_instance += 1;
        Instance {
            id,
            hostname: hostname.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], self.next_port)),
            instance_id: format!("fake-{}", self.next_instance),
            slots: None,
            spec: None,
        }
    }
}

impl Provider for World {
    fn kind(&self) -> &'static str {
        if self.manages {
            "scripted"
        } else {
            "static"
        }
    }

    fn mode(&self) -> crate::provider::Mode {
        match (&self.record, self.manages) {
            (Some(r), _) => crate::provider::Mode::Shared(r.clone()),
            (None, true) => crate::provider::Mode::Owned,
            (None, false) => crate::provider::Mode::Fixed,
        }
    }

    fn spawn(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            s.spawns.push((spec.hostname.clone(), Instant::now()));
            s.spawned_slots
                .push((spec.hostname.clone(), spec.slots.clone()));
            s.spawned_specs
                .push((spec.hostname.clone(), spec.app.clone(), spec.beside));
            if let Some(left) = s.fail_starts.get_mut(&spec.hostname) {
                if *left > 0 {
                    *left = left.saturating_sub(1);
                    return Err(ProviderError::Spawn {
                        hostname: spec.hostname,
                        reason: "scripted start failure".into(),
                    });
                }
            }
            let mut inst = s.instance(spec.id, &spec.hostname);
            inst.slots = Some(spec.slots);
            inst.spec = Some(spec.app.fingerprint());
            if !spec.beside {
                // A fresh start takes the name: whatever ran under it is gone.
                s.remove_host(&spec.hostname);
            }
            s.insert(inst.clone(), Some(spec.app.clone()));
            if let Some(r) = &self.record {
                // Other gateways see the engine's new task.
                r.broadcast(ProviderEvent::Running {
                    instance: inst.clone(),
                });
            }
            Ok(inst)
        })
    }

    fn remove(&self, hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let hostname = hostname.to_owned();
        Box::pin(async move {
            let mut s = lock(&self.state);
            s.remove_host(&hostname);
            s.removes.push(hostname);
            Ok(())
        })
    }

    fn retire(&self, instance: &Instance) -> BoxFuture<'_, Result<(), ProviderError>> {
        let (id, hostname) = (instance.instance_id.clone(), instance.hostname.clone());
        Box::pin(async move {
            let mut s = lock(&self.state);
            s.running.remove(&id);
            s.retired.push(hostname);
            Ok(())
        })
    }

    fn recent_output(&self, instance: &Instance) -> BoxFuture<'_, Vec<String>> {
        let line = format!("scripted output of {}", instance.instance_id);
        Box::pin(async move { vec![line] })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let s = lock(&self.state);
            if self.record.is_some() {
                return Ok(s.running.values().map(|(i, _)| i.clone()).collect());
            }
            Ok(s.existing.clone())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl Prober for World {
    fn probe(
        &self,
        addr: SocketAddr,
        _check: Arc<Check>,
        _timeout: Duration,
    ) -> BoxFuture<'_, ProbeOutcome> {
        Box::pin(async move {
            let s = lock(&self.state);
            let broken_spec = |app: &Option<Arc<AppSpec>>| {
                s.unhealthy_env
                    .as_ref()
                    .is_some_and(|(k, v)| app.as_ref().and_then(|a| a.env.get(k)) == Some(v))
            };
            let answering = s
                .running
                .values()
                .find(|(i, _)| i.addr == addr)
                .filter(|(i, app)| !s.unhealthy.contains(&i.hostname) && !broken_spec(app));
            let ok = answering.is_some();
            ProbeOutcome {
                ok,
                inconclusive: false,
                status: ok.then_some(200),
                latency_ms: 1.0,
                error: (!ok).then(|| "scripted: not answering".into()),
                at: SystemTime::now(),
            }
        })
    }
}

/// A controller running over a [`World`].
pub struct Harness {
    pub world: Arc<World>,
    pub handle: ControllerHandle,
    shared: Shared,
    _task: tokio::task::JoinHandle<()>,
}

/// The test config: quick checks, a short recovery delay and back-off cap.
pub fn config(count: u32) -> Config {
    let mut c = Config::default();
    c.replicas.count = count;
    c.health.interval = Duration::from_secs(1);
    c.health.timeout = Duration::from_millis(500);
    c.health.rise = 2;
    c.health.fall = 2;
    c.health.recovery_delay = Duration::from_secs(1);
    c.health.max_backoff = Duration::from_secs(8);
    c.proxy.drain_timeout = Duration::from_secs(10);
    c
}

impl Harness {
    pub fn start(
        config: Config,
        world: Arc<World>,
        events: mpsc::Receiver<ProviderEvent>,
    ) -> Harness {
        Harness::start_named(config, world, events, "test-gw")
    }

    /// A gateway named `name` (several gateways share one swarm world).
    pub fn start_named(
        config: Config,
        world: Arc<World>,
        events: mpsc::Receiver<ProviderEvent>,
        name: &str,
    ) -> Harness {
        let config = Arc::new(config);
        let shared: Shared = Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::initial(
            config.clone(),
        )));
        let (controller, handle) = Controller::new(Parts {
            config,
            policy: Ok(PolicySet::empty()),
            provider: world.clone(),
            provider_events: events,
            prober: world.clone(),
            upstream_tls: None,
            shared: shared.clone(),
            metrics: Arc::new(Metrics::default()),
            published: Default::default(),
            name: name.into(),
        })
        .expect("valid ring");
        let task = tokio::spawn(controller.run());
        Harness {
            world,
            handle,
            shared,
            _task: task,
        }
    }

    /// The owner table's fingerprint this gateway routes with.
    pub fn fingerprint(&self) -> u64 {
        self.snapshot().ring.fingerprint()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.load_full()
    }

    /// The names the ring routes to.
    pub fn in_ring(&self) -> Vec<String> {
        let snap = self.snapshot();
        snap.upstreams
            .iter()
            .flatten()
            .map(|u| u.name.clone())
            .collect()
    }

    pub async fn replica(&self, name: &str) -> serde_json::Value {
        let status = self.handle.status().await.expect("status");
        status["replicas"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits (in virtual time) until `pred` holds; panics after `within`.
    pub async fn until(&self, within: Duration, what: &str, pred: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + within;
        while !pred(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
