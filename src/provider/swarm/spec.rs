//! What the `swarm` provider asks the engine for, and how it reads the answers. Pure: it builds
//! requests and reads models, and calls nothing.
//!
//! Owns: the service spec of one replica (named exactly its hostname, one task, the replica
//! spec's image, entrypoint, command, env, working directory, user and mounts, our labels with
//! its id and slots over the user's on the service and its containers, the `[provider]` limits
//! and hardening, Swarm's restart policy, the built-in server's health check without a shell,
//! DNS round robin so no virtual IP is needed), the spec of the ring record's service (no task at all: only its labels matter), and
//! reading a task into an [`Instance`] (its address by [`Reach`]) and two observations of the
//! running tasks into the events between them.
//! Must not touch: the engine.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, EndpointSpecModeEnum, HealthConfig, Limit, Mount as EngineMount, MountTypeEnum,
    NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, Task,
    TaskSpec, TaskSpecContainerSpec, TaskSpecLogDriver, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};

use crate::config::replica::Vars;
use crate::config::{MountSource, Reach};
use crate::provider::app::AppSpec;
use crate::provider::{Instance, ProviderEvent};
use crate::ring::ServerId;

/// One second in the engine's unit (nanoseconds).
const SECOND: i64 = 1_000_000_000;
/// How soon Swarm restarts a replica whose task died: about what the controller's own
/// `recovery_delay` would be, but the engine does it, on whatever node it chooses.
pub(super) const RESTART_DELAY_NS: i64 = SECOND / 5;

/// What a replica service is built from.
pub(super) struct Replica<'a> {
    pub(super) app: &'a AppSpec,
    pub(super) network: &'a str,
    pub(super) port: u16,
    pub(super) hostname: &'a str,
    pub(super) id: u32,
    /// Ours (`ringgate.*`); the user's from the spec are added under them.
    pub(super) labels: HashMap<String, String>,
    pub(super) reach: Reach,
}

/// Whether the spec runs the built-in server's image, whose binary checks its own heartbeat
/// (any other image has no `/ringgate-server` to run).
fn runs_builtin_server(app: &AppSpec) -> bool {
    app.is_builtin_server()
        && app
            .image
            .rsplit('/')
            .next()
            .is_some_and(|name| name.split(':').next() == Some("ringgate-server"))
}

/// The spec's mounts as Swarm's (bind sources must exist on the node the task runs on).
fn mounts(app: &AppSpec) -> Option<Vec<EngineMount>> {
    let mounts: Vec<EngineMount> = app
        .mounts
        .iter()
        .map(|m| {
            let (typ, source) = match &m.source {
                MountSource::Bind(p) => (MountTypeEnum::BIND, p.to_string_lossy().into_owned()),
                MountSource::Volume(v) => (MountTypeEnum::VOLUME, v.clone()),
            };
            EngineMount {
                target: Some(m.target.clone()),
                source: Some(source),
                typ: Some(typ),
                read_only: Some(!m.writable),
                ..Default::default()
            }
        })
        .collect();
    (!mounts.is_empty()).then_some(mounts)
}

/// The service spec of one replica.
pub(super) fn replica_service(r: Replica<'_>) -> ServiceSpec {
    let positive = |n: u64| (n > 0).then(|| i64::try_from(n).unwrap_or(i64::MAX));
    let app = r.app;
    let limits = &app.limits;
    let vars = Vars {
        port: r.port,
        hostname: r.hostname,
        id: r.id,
    };
    let labels: HashMap<String, String> = app
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain(r.labels)
        .collect();
    let env = app
        .env(vars)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain([
            format!("SERVER_ID={}", r.hostname),
            format!("PORT={}", r.port),
        ])
        .collect();
    let ports = (r.reach == Reach::Published).then(|| {
        vec![EndpointPortConfig {
            protocol: Some(EndpointPortConfigProtocolEnum::TCP),
            target_port: Some(i64::from(r.port)),
            // No published port: the engine picks a free one on the task's node.
            published_port: None,
            publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
            name: None,
        }]
    });
    ServiceSpec {
        name: Some(r.hostname.to_owned()),
        labels: Some(labels.clone()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(app.image.clone()),
                command: app.entrypoint(vars),
                args: app.cmd(vars),
                dir: app
                    .workdir
                    .as_ref()
                    .map(|w| w.to_string_lossy().into_owned()),
                user: app.user.clone(),
                mounts: mounts(app),
                labels: Some(labels),
                env: Some(env),
                read_only: Some(app.read_only_root),
                capability_drop: Some(vec!["ALL".to_owned()]),
                stop_grace_period: Some(5 * SECOND),
                // The image has no shell: ringgate-server checks its own /heartbeat. Other
                // images keep their own HEALTHCHECK.
                health_check: runs_builtin_server(app).then_some(HealthConfig {
                    test: Some(vec![
                        "CMD".into(),
                        "/ringgate-server".into(),
                        "--check".into(),
                    ]),
                    interval: Some(2 * SECOND),
                    timeout: Some(SECOND),
                    retries: Some(2),
                    start_period: Some(0),
                    start_interval: None,
                }),
                ..Default::default()
            }),
            resources: Some(TaskSpecResources {
                limits: Some(Limit {
                    nano_cpus: (limits.cpus > 0.0).then(|| (limits.cpus * 1e9).round() as i64),
                    memory_bytes: positive(limits.memory_bytes),
                    pids: positive(u64::from(limits.pids)),
                }),
                reservations: None,
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                delay: Some(RESTART_DELAY_NS),
                max_attempts: Some(0),
                window: None,
            }),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(r.network.to_owned()),
                ..Default::default()
            }]),
            log_driver: (limits.log_max_size > 0).then(|| TaskSpecLogDriver {
                name: Some("json-file".to_owned()),
                options: Some(HashMap::from([
                    ("max-size".to_owned(), limits.log_max_size.to_string()),
                    ("max-file".to_owned(), limits.log_max_files.to_string()),
                ])),
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports,
        }),
        ..Default::default()
    }
}

/// The spec of the service whose labels are the ring record: no task ever runs.
pub(super) fn ring_service(
    name: &str,
    image: &str,
    labels: HashMap<String, String>,
) -> ServiceSpec {
    ServiceSpec {
        name: Some(name.to_owned()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: None,
        }),
        ..Default::default()
    }
}

/// A replica service as observed: its hostname and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ReplicaService {
    pub(super) service_id: String,
    pub(super) hostname: String,
    pub(super) id: ServerId,
    pub(super) slots: Option<Vec<u32>>,
    /// The fingerprint of the spec it was created from.
    pub(super) spec: Option<String>,
}

/// Where a running task can be reached, when it can: by [`Reach`], from the task itself (its
/// published port), its node's address, or its container's address on the network (looked up
/// by the caller and given as `network_ip`).
pub(super) fn task_addr(
    reach: Reach,
    task: &Task,
    port: u16,
    node_addr: Option<IpAddr>,
    network_ip: Option<IpAddr>,
) -> Option<SocketAddr> {
    match reach {
        Reach::Network => network_ip.map(|ip| SocketAddr::new(ip, port)),
        Reach::Published => {
            let published = task
                .status
                .as_ref()?
                .port_status
                .as_ref()?
                .ports
                .as_ref()?
                .iter()
                .find(|p| {
                    p.target_port == Some(i64::from(port))
                        && p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST)
                })?
                .published_port?;
            Some(SocketAddr::new(node_addr?, u16::try_from(published).ok()?))
        }
    }
}

/// The task of a replica service that runs now (Swarm keeps one; during a restart the old one
/// is already shut down), with its container id.
pub(super) fn running_task<'a>(tasks: &'a [Task], service_id: &str) -> Option<(&'a Task, String)> {
    tasks
        .iter()
        .filter(|t| t.service_id.as_deref() == Some(service_id))
        .filter(|t| t.desired_state == Some(TaskState::RUNNING))
        .filter(|t| t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING))
        .find_map(|t| {
            let cid = t
                .status
                .as_ref()?
                .container_status
                .as_ref()?
                .container_id
                .clone()?;
            Some((t, cid))
        })
}

/// What changed between two observations of the running replicas (hostname → instance): a
/// replica whose task is new (first seen, or another container than before) is `Running`; one
/// whose task is gone or was replaced is `Exited` first.
pub(super) fn task_events(
    before: &BTreeMap<String, Instance>,
    now: &BTreeMap<String, Instance>,
) -> Vec<ProviderEvent> {
    let mut events = Vec::new();
    for (hostname, old) in before {
        let same = now
            .get(hostname)
            .is_some_and(|n| n.instance_id == old.instance_id);
        if !same {
            events.push(ProviderEvent::Exited {
                hostname: hostname.clone(),
                instance_id: old.instance_id.clone(),
                detail: "its task is no longer running".to_owned(),
            });
        }
    }
    for (hostname, new) in now {
        let changed = before
            .get(hostname)
            .is_none_or(|o| o.instance_id != new.instance_id || o.addr != new.addr);
        if changed {
            events.push(ProviderEvent::Running {
                instance: new.clone(),
            });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerStatus, PortStatus, TaskStatus};

    fn limits() -> AppSpec {
        AppSpec::from_config(&crate::config::ProviderConfig::default())
    }

    fn replica(reach: Reach, app: &AppSpec) -> Replica<'_> {
        Replica {
            app,
            network: "rg-net",
            port: 5000,
            hostname: "S5",
            id: 4,
            labels: HashMap::from([("ringgate.server-id".to_owned(), "4".to_owned())]),
            reach,
        }
    }

    #[test]
    fn a_replica_is_one_restarted_hardened_task_named_after_its_hostname() {
        let l = limits();
        let s = replica_service(replica(Reach::Network, &l));
        assert_eq!(s.name.as_deref(), Some("S5"));
        assert_eq!(
            s.labels.as_ref().map(|l| l["ringgate.server-id"].as_str()),
            Some("4")
        );
        let t = s.task_template.expect("task");
        let c = t.container_spec.expect("container");
        assert_eq!(
            c.labels, s.labels,
            "containers carry the labels too (their events are ours)"
        );
        assert_eq!(c.env, Some(vec!["SERVER_ID=S5".into(), "PORT=5000".into()]));
        assert_eq!(c.read_only, Some(true));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_owned()]));
        let hc = c.health_check.expect("a health check");
        assert_eq!(hc.test.expect("test")[1..], ["/ringgate-server", "--check"]);
        let rp = t.restart_policy.expect("restart policy");
        assert_eq!(rp.condition, Some(TaskSpecRestartPolicyConditionEnum::ANY));
        assert_eq!(rp.max_attempts, Some(0), "never gives up");
        let lim = t.resources.and_then(|r| r.limits).expect("limits");
        assert_eq!(
            (c.command, c.args, c.mounts),
            (None, None, None),
            "the image's own"
        );
        assert_eq!(lim.memory_bytes, Some(128 << 20));
        assert_eq!(lim.pids, Some(64));
        assert_eq!(
            s.mode.and_then(|m| m.replicated).and_then(|r| r.replicas),
            Some(1)
        );
        let e = s.endpoint_spec.expect("endpoint");
        assert_eq!(
            e.mode,
            Some(EndpointSpecModeEnum::DNSRR),
            "no virtual IP needed"
        );
        assert_eq!(
            e.ports, None,
            "nothing published when reached on the network"
        );
        let p = replica_service(replica(Reach::Published, &l))
            .endpoint_spec
            .and_then(|e| e.ports)
            .expect("ports");
        assert_eq!(
            p[0].publish_mode,
            Some(EndpointPortConfigPublishModeEnum::HOST)
        );
        assert_eq!((p[0].target_port, p[0].published_port), (Some(5000), None));
    }

    #[test]
    fn a_replica_service_runs_the_users_spec_with_its_own_health_check() {
        let c = crate::config::Config::parse(
            "[provider]\nkind = \"swarm\"\nimage = \"registry.local/app:2\"\ncommand = [\"/app\", \"--port={port}\"]\nargs = [\"--id={id}\"]\nenv = { NAME = \"{hostname}\" }\nmounts = [\"/srv/site:/www\", \"cache:/c:rw\"]\nlabels = { team = \"web\", \"ringgate.server-id\" = \"7\" }\nuser = \"1000\"\nread_only_root = false\n",
            std::path::Path::new("lb.toml"),
        );
        assert!(c.is_err(), "ringgate.* labels are ours");
        let c = crate::config::Config::parse(
            "[provider]\nkind = \"swarm\"\nimage = \"registry.local/app:2\"\ncommand = [\"/app\", \"--port={port}\"]\nargs = [\"--id={id}\"]\nenv = { NAME = \"{hostname}\" }\nmounts = [\"/srv/site:/www\", \"cache:/c:rw\"]\nlabels = { team = \"web\" }\nuser = \"1000\"\nread_only_root = false\n",
            std::path::Path::new("lb.toml"),
        )
        .expect("valid");
        let app = AppSpec::from_config(&c.provider);
        let s = replica_service(replica(Reach::Network, &app));
        let labels = s.labels.clone().expect("labels");
        assert_eq!(
            (
                labels["team"].as_str(),
                labels["ringgate.server-id"].as_str()
            ),
            ("web", "4")
        );
        let c = s
            .task_template
            .and_then(|t| t.container_spec)
            .expect("container");
        assert_eq!(c.image.as_deref(), Some("registry.local/app:2"));
        assert_eq!(c.command, Some(vec!["/app".into(), "--port=5000".into()]));
        assert_eq!(c.args, Some(vec!["--id=4".into()]));
        assert_eq!(
            c.env,
            Some(vec![
                "NAME=S5".into(),
                "SERVER_ID=S5".into(),
                "PORT=5000".into()
            ])
        );
        assert_eq!(c.user.as_deref(), Some("1000"));
        assert_eq!(c.read_only, Some(false));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_owned()]));
        assert!(
            c.health_check.is_none(),
            "no /ringgate-server in this image"
        );
        let m = c.mounts.expect("mounts");
        assert_eq!((m[0].read_only, m[1].read_only), (Some(true), Some(false)));
        assert_eq!(m[1].typ, Some(MountTypeEnum::VOLUME));
    }

    #[test]
    fn the_ring_service_never_runs_a_task() {
        let s = ring_service("ringgate-ring-x", "img", HashMap::new());
        assert_eq!(
            s.mode.and_then(|m| m.replicated).and_then(|r| r.replicas),
            Some(0)
        );
    }

    fn task(service: &str, state: TaskState, cid: &str, published: Option<i64>) -> Task {
        Task {
            service_id: Some(service.into()),
            desired_state: Some(TaskState::RUNNING),
            status: Some(TaskStatus {
                state: Some(state),
                container_status: Some(ContainerStatus {
                    container_id: Some(cid.into()),
                    ..Default::default()
                }),
                port_status: Some(PortStatus {
                    ports: published.map(|p| {
                        vec![EndpointPortConfig {
                            target_port: Some(5000),
                            published_port: Some(p),
                            publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                            ..Default::default()
                        }]
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_task_is_reached_by_its_network_address_or_its_published_port() {
        let t = task("svc", TaskState::RUNNING, "c1", Some(32768));
        let node: IpAddr = "127.0.0.1".parse().expect("ip");
        let ip: IpAddr = "10.0.1.5".parse().expect("ip");
        assert_eq!(
            task_addr(Reach::Published, &t, 5000, Some(node), Some(ip)),
            Some("127.0.0.1:32768".parse().expect("addr"))
        );
        assert_eq!(
            task_addr(Reach::Network, &t, 5000, Some(node), Some(ip)),
            Some("10.0.1.5:5000".parse().expect("addr"))
        );
        assert_eq!(task_addr(Reach::Published, &t, 5000, None, None), None);
        assert_eq!(
            task_addr(Reach::Published, &t, 8080, Some(node), None),
            None
        );
    }

    #[test]
    fn only_a_running_task_counts() {
        let tasks = vec![
            task("svc", TaskState::SHUTDOWN, "old", None),
            task("svc", TaskState::STARTING, "starting", None),
            task("other", TaskState::RUNNING, "x", None),
            task("svc", TaskState::RUNNING, "new", None),
        ];
        assert_eq!(
            running_task(&tasks, "svc").map(|(_, c)| c),
            Some("new".into())
        );
        assert!(running_task(&tasks[..2], "svc").is_none());
    }

    fn inst(host: &str, cid: &str, port: u16) -> (String, Instance) {
        (
            host.to_owned(),
            Instance {
                id: ServerId::new(1).expect("id"),
                hostname: host.to_owned(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                instance_id: cid.to_owned(),
                slots: None,
                spec: None,
            },
        )
    }

    #[test]
    fn a_replaced_task_is_an_exit_then_a_start() {
        let before: BTreeMap<_, _> = [inst("a", "c1", 1), inst("b", "c2", 2)].into();
        let now: BTreeMap<_, _> = [inst("a", "c3", 3), inst("c", "c4", 4)].into();
        let ev = task_events(&before, &now);
        let kinds: Vec<String> = ev
            .iter()
            .map(|e| match e {
                ProviderEvent::Exited {
                    hostname,
                    instance_id,
                    ..
                } => format!("exit {hostname} {instance_id}"),
                ProviderEvent::Running { instance } => {
                    format!("run {} {}", instance.hostname, instance.instance_id)
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["exit a c1", "exit b c2", "run a c3", "run c c4"]);
        assert!(task_events(&now, &now).is_empty(), "no change, no event");
    }
}
