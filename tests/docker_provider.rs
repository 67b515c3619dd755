//! The docker provider against the real engine, driven through the `Provider` trait.
//!
//! Each test has its own instance label and network (a [`Scope`]) and removes everything it
//! created when it ends, also on failure. Without an engine each test prints
//! `skipped: no Docker engine (<reason>)` and returns.

// support/python.rs and the Docker or Chromium support each bring `engines.rs` along.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
mod support;

use std::time::{Duration, Instant};

use docker_support::{docker, inspect, wait_ok, Scope, SERVER_IMAGE};
use ringgate::config::{ProviderConfig, ProviderKind};
use ringgate::provider::docker::DockerProvider;
use ringgate::provider::{AppSpec, Provider, ProviderEvent, ReplicaSpec};
use ringgate::ring::ServerId;
use tokio::sync::mpsc;

async fn provider(scope: &Scope, image: &str) -> (DockerProvider, mpsc::Receiver<ProviderEvent>) {
    provider_with(
        scope,
        ProviderConfig {
            image: image.to_owned(),
            ..ProviderConfig::default()
        },
    )
    .await
}

/// A provider for `scope` with `config` (its kind and network set to the scope's).
async fn provider_with(
    scope: &Scope,
    config: ProviderConfig,
) -> (DockerProvider, mpsc::Receiver<ProviderEvent>) {
    let config = ProviderConfig {
        kind: ProviderKind::Docker,
        network: scope.network.clone(),
        ..config
    };
    let (tx, rx) = mpsc::channel(64);
    let p = DockerProvider::connect_as(&config, tx, Duration::from_secs(5), scope.instance.clone())
        .await
        .expect("an engine answered `docker version`, so connect must succeed");
    (p, rx)
}

fn spec(id: u32, hostname: &str) -> ReplicaSpec {
    spec_of(&ProviderConfig::default(), id, hostname)
}

/// A start of replica `hostname` from the replica spec of `config` (the image, limits…).
fn spec_of(config: &ProviderConfig, id: u32, hostname: &str) -> ReplicaSpec {
    ReplicaSpec {
        id: ServerId::new(id).expect("non-zero id"),
        hostname: hostname.to_owned(),
        slots: vec![id, id + 100, id + 200],
        app: std::sync::Arc::new(AppSpec::from_config(config)),
        beside: false,
    }
}

fn label<'a>(c: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    c["Config"]["Labels"][key].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_creates_a_labelled_container_on_the_network_and_remove_deletes_it() {
    require_docker!();
    let scope = Scope::new("spawn");
    let (p, _events) = provider(&scope, SERVER_IMAGE).await;
    assert_eq!(p.kind(), "docker");
    assert!(matches!(p.mode(), ringgate::provider::Mode::Owned));
    let name = scope.name("a");

    let started = Instant::now();
    let inst = p.spawn(spec(7, &name)).await.expect("spawn");
    let spawned = started.elapsed();
    let body = wait_ok(inst.addr, "/heartbeat", Duration::from_secs(10))
        .await
        .expect("the replica answers /heartbeat on its container IP");
    assert_eq!(body, "");
    println!(
        "spawn: {spawned:?} to an address, {:?} to a 200 /heartbeat",
        started.elapsed()
    );
    let home = wait_ok(inst.addr, "/home", Duration::from_secs(2))
        .await
        .expect("/home");
    assert!(
        home.contains(&format!("Hello from Server: {name}")),
        "{home}"
    );

    let c = inspect(&name).expect("a container named exactly the hostname");
    assert_eq!(c["Name"].as_str(), Some(format!("/{name}").as_str()));
    assert_eq!(
        c["Id"].as_str(),
        Some(inst.instance_id.as_str()),
        "instance_id is the container id"
    );
    assert_eq!(c["State"]["Running"].as_bool(), Some(true));
    assert_eq!(label(&c, "ringgate.managed"), Some("true"));
    assert_eq!(label(&c, "ringgate.server-id"), Some("7"));
    assert_eq!(label(&c, "ringgate.slots"), Some("7,107,207"));
    assert_eq!(
        label(&c, "ringgate.instance"),
        Some(scope.instance.as_str())
    );
    let restart = c["HostConfig"]["RestartPolicy"]["Name"]
        .as_str()
        .unwrap_or("");
    assert!(
        restart.is_empty() || restart == "no",
        "no restart policy, got {restart:?}"
    );
    let env: Vec<&str> = c["Config"]["Env"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(
        env.contains(&format!("SERVER_ID={name}").as_str()),
        "{env:?}"
    );
    assert!(env.contains(&"PORT=5000"), "{env:?}");
    let ip = c["NetworkSettings"]["Networks"][&scope.network]["IPAddress"]
        .as_str()
        .expect("attached to the test network");
    assert_eq!(ip, inst.addr.ip().to_string());
    assert_eq!(inst.addr.port(), 5000);

    let net: serde_json::Value = serde_json::from_str(
        &docker(&["network", "inspect", &scope.network]).expect("the network was created"),
    )
    .expect("json");
    assert_eq!(net[0]["Labels"]["ringgate.managed"].as_str(), Some("true"));

    p.remove(&name).await.expect("remove");
    assert!(
        inspect(&name).is_none(),
        "the container is gone after remove"
    );
    p.remove(&name)
        .await
        .expect("removing what is already gone is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_adopts_running_replicas_with_their_ids_and_removes_exited_ones() {
    require_docker!();
    let scope = Scope::new("adopt");
    let (names, ids) = {
        let (p, _events) = provider(&scope, SERVER_IMAGE).await;
        let (a, b, c) = (scope.name("a"), scope.name("b"), scope.name("c"));
        let ia = p.spawn(spec(1, &a)).await.expect("spawn a");
        let ib = p.spawn(spec(2, &b)).await.expect("spawn b");
        let ic = p.spawn(spec(3, &c)).await.expect("spawn c");
        docker(&["stop", "-t", "1", &b]).expect("docker stop b");
        p.shutdown().await;
        ((a, b, c), (ia, ib, ic))
    };
    for n in [&names.0, &names.2] {
        assert_eq!(
            inspect(n).expect("still there")["State"]["Running"].as_bool(),
            Some(true),
            "{n} left running on shutdown"
        );
    }

    // A new provider, as a restarted gateway builds it.
    let (p, _events) = provider(&scope, SERVER_IMAGE).await;
    let adopted = p.list().await.expect("list");
    assert_eq!(
        adopted,
        vec![ids.0.clone(), ids.2.clone()],
        "the running ones, same ids, addresses and container ids"
    );
    assert!(inspect(&names.1).is_none(), "the exited one was removed");
    for i in &adopted {
        wait_ok(i.addr, "/heartbeat", Duration::from_secs(5))
            .await
            .expect("adopted replica answers");
    }
    // Nothing was restarted: same container ids, still running.
    let now: Vec<String> = scope
        .containers()
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(now.len(), 2, "{now:?}");
    for i in &adopted {
        assert!(i.instance_id.starts_with(&now[0]) || i.instance_id.starts_with(&now[1]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_is_reported_within_a_second_and_only_once() {
    require_docker!();
    let scope = Scope::new("kill");
    let (p, mut events) = provider(&scope, SERVER_IMAGE).await;
    let name = scope.name("k");
    let inst = p.spawn(spec(4, &name)).await.expect("spawn");

    let t0 = Instant::now();
    docker(&["kill", &name]).expect("docker kill");
    let cli = t0.elapsed();
    let event = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .expect("an Exited event within 1 s of `docker kill`")
        .expect("channel open");
    let elapsed = t0.elapsed();
    println!("docker kill → Exited: {elapsed:?} (the docker CLI call itself took {cli:?})");
    let ProviderEvent::Exited {
        hostname,
        instance_id,
        detail,
    } = event
    else {
        panic!("expected Exited, got {event:?}");
    };
    assert_eq!(hostname, name);
    assert_eq!(instance_id, inst.instance_id);
    assert!(!detail.is_empty());
    // kill, die: one report.
    let again = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
    assert!(
        again.is_err(),
        "a second report for the same death: {again:?}"
    );

    // The controller's replacement: same hostname and id; the dead container is replaced.
    let replacement = p
        .spawn(spec(4, &name))
        .await
        .expect("respawn with the same name");
    assert_ne!(replacement.instance_id, inst.instance_id);
    wait_ok(replacement.addr, "/heartbeat", Duration::from_secs(10))
        .await
        .expect("replacement answers");

    // Our own remove is not reported as a death.
    p.remove(&name).await.expect("remove");
    let after = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
    assert!(
        after.is_err(),
        "remove() must not report an exit: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_clear_error_and_leaves_no_container() {
    require_docker!();
    let scope = Scope::new("noimage");
    let image = format!("{}-missing:latest", scope.instance);
    let (p, _events) = provider(&scope, &image).await;
    let name = scope.name("m");
    let config = ProviderConfig {
        image: image.clone(),
        ..ProviderConfig::default()
    };
    let err = p
        .spawn(spec_of(&config, 1, &name))
        .await
        .expect_err("no such image");
    let text = err.to_string();
    println!("{text}");
    assert!(
        text.contains(&image) && text.contains("make images"),
        "{text}"
    );
    assert!(inspect(&name).is_none(), "no half-created container");
    assert!(scope.containers().is_empty(), "{:?}", scope.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_clash_with_an_unmanaged_container_is_a_clear_error_and_leaves_it_alone() {
    require_docker!();
    let mut scope = Scope::new("clash");
    let name = scope.name("taken");
    scope.track(&name);
    let theirs = docker(&["create", "--name", &name, SERVER_IMAGE]).expect("docker create");
    let (p, _events) = provider(&scope, SERVER_IMAGE).await;

    let err = p
        .spawn(spec(1, &name))
        .await
        .expect_err("the name is taken");
    let text = err.to_string();
    println!("{text}");
    assert!(
        text.contains("not managed by ringgate") && text.contains(&name),
        "{text}"
    );
    let c = inspect(&name).expect("the unmanaged container is still there");
    assert_eq!(
        c["Id"].as_str(),
        Some(theirs.as_str()),
        "and it is the same container"
    );
    assert!(
        scope.containers().is_empty(),
        "nothing of ours was left: {:?}",
        scope.containers()
    );

    // remove() of that name does not touch it either.
    p.remove(&name).await.expect("nothing of ours to remove");
    assert!(
        inspect(&name).is_some(),
        "remove left the unmanaged container alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instances_container_is_neither_adopted_nor_replaced() {
    require_docker!();
    let scope_a = Scope::new("insta");
    let scope_b = Scope::with_network("instb", &scope_a.network);
    let (pa, _ea) = provider(&scope_a, SERVER_IMAGE).await;
    let (pb, _eb) = provider(&scope_b, SERVER_IMAGE).await;
    let name = scope_a.name("shared");
    let ia = pa.spawn(spec(1, &name)).await.expect("spawn in a");
    assert!(
        pb.list().await.expect("list b").is_empty(),
        "b adopts nothing of a's"
    );
    let err = pb
        .spawn(spec(1, &name))
        .await
        .expect_err("b must not replace a's container");
    assert!(
        err.to_string().contains("another ringgate instance"),
        "{err}"
    );
    assert_eq!(
        inspect(&name).expect("a's container")["Id"].as_str(),
        Some(ia.instance_id.as_str())
    );
}

/// What the kernel says about a container's main process, when the engine shares our pid
/// namespace (it does for a local engine): its effective capabilities, no_new_privs, whether
/// `/` is mounted read-only, and its cgroup limits.
struct KernelView {
    cap_eff: String,
    no_new_privs: String,
    root_read_only: bool,
    memory_max: Option<u64>,
    pids_max: Option<u64>,
    cpu_quota: Option<(i64, i64)>,
}

fn kernel_view(pid: u64) -> Option<KernelView> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    if field("Name:").as_deref() != Some("ringgate-server") {
        return None;
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    // Fields: id parent major:minor root mount-point options …
    let root_read_only = mountinfo.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(4) == Some(&"/") && f.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))
    });
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // cgroup v1: "4:memory:/docker/<id>"; v2: "0::/docker/<id>" (or "/system.slice/…").
    let cgroup_dir = |controller: &str| -> Option<String> {
        cgroups.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            if ctrls.split(',').any(|c| c == controller) {
                Some(format!("/sys/fs/cgroup/{controller}{path}"))
            } else if ctrls.is_empty() && controller.is_empty() {
                Some(format!("/sys/fs/cgroup{path}"))
            } else {
                None
            }
        })
    };
    let read = |path: String| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let v1 = cgroup_dir("memory").is_some();
    let (memory_max, pids_max, cpu_quota) = if v1 {
        (
            cgroup_dir("memory")
                .and_then(|d| read(format!("{d}/memory.limit_in_bytes")))
                .and_then(|s| s.parse().ok()),
            cgroup_dir("pids")
                .and_then(|d| read(format!("{d}/pids.max")))
                .and_then(|s| s.parse().ok()),
            cgroup_dir("cpu").and_then(|d| {
                let quota = read(format!("{d}/cpu.cfs_quota_us"))?.parse().ok()?;
                let period = read(format!("{d}/cpu.cfs_period_us"))?.parse().ok()?;
                Some((quota, period))
            }),
        )
    } else {
        let d = cgroup_dir("")?;
        (
            read(format!("{d}/memory.max")).and_then(|s| s.parse().ok()),
            read(format!("{d}/pids.max")).and_then(|s| s.parse().ok()),
            read(format!("{d}/cpu.max")).and_then(|s| {
                let (q, p) = s.split_once(' ')?;
                Some((q.parse().ok()?, p.parse().ok()?))
            }),
        )
    };
    Some(KernelView {
        cap_eff: field("CapEff:")?,
        no_new_privs: field("NoNewPrivs:")?,
        root_read_only,
        memory_max,
        pids_max,
        cpu_quota,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_runs_with_limits_no_capabilities_and_a_read_only_root_and_still_serves() {
    require_docker!();
    let scope = Scope::new("limits");
    // Not the defaults, so that the values seen below come from this config.
    let config = ProviderConfig {
        memory_limit: 48 << 20,
        pids_limit: 24,
        cpus: 0.5,
        log_max_size: 1 << 20,
        log_max_files: 2,
        ..ProviderConfig::default()
    };
    let (p, _events) = provider_with(&scope, config.clone()).await;
    let name = scope.name("l");
    let inst = p.spawn(spec_of(&config, 1, &name)).await.expect("spawn");
    wait_ok(inst.addr, "/heartbeat", Duration::from_secs(10))
        .await
        .expect("a hardened replica answers /heartbeat");
    let home = wait_ok(inst.addr, "/home", Duration::from_secs(2))
        .await
        .expect("/home");
    assert!(home.contains(&name), "{home}");

    let c = inspect(&name).expect("the container");
    let h = &c["HostConfig"];
    assert_eq!(h["Memory"].as_u64(), Some(48 << 20), "{h:#}");
    assert_eq!(h["MemorySwap"].as_u64(), Some(48 << 20), "no swap on top");
    assert_eq!(h["PidsLimit"].as_u64(), Some(24));
    assert_eq!(h["NanoCpus"].as_u64(), Some(500_000_000));
    assert_eq!(h["CapDrop"], serde_json::json!(["ALL"]));
    assert!(
        h["SecurityOpt"]
            .as_array()
            .is_some_and(|o| o.iter().any(|v| v == "no-new-privileges")),
        "{:#}",
        h["SecurityOpt"]
    );
    assert_eq!(h["ReadonlyRootfs"].as_bool(), Some(true));
    assert_eq!(h["LogConfig"]["Type"].as_str(), Some("json-file"));
    assert_eq!(
        h["LogConfig"]["Config"]["max-size"].as_str(),
        Some("1048576")
    );
    assert_eq!(h["LogConfig"]["Config"]["max-file"].as_str(), Some("2"));

    // What the kernel enforces on the running process.
    let pid = c["State"]["Pid"].as_u64().expect("a running pid");
    match kernel_view(pid) {
        Some(k) => {
            assert_eq!(k.cap_eff, "0000000000000000", "no capabilities");
            assert_eq!(k.no_new_privs, "1");
            assert!(k.root_read_only, "/ is mounted read-only");
            assert_eq!(k.memory_max, Some(48 << 20));
            assert_eq!(k.pids_max, Some(24));
            let (quota, period) = k.cpu_quota.expect("a CPU quota");
            assert_eq!(quota * 2, period, "half a CPU: {quota}/{period}");
        }
        None => println!(
            "the engine runs in another pid namespace: checked through `docker inspect` only"
        ),
    }
    // The log driver works for the operator: `docker logs` shows the replica's line.
    let logs = docker(&["logs", &name]).expect("docker logs");
    assert!(logs.contains("listening on"), "{logs}");
    p.remove(&name).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_acts_on_the_container_it_started_never_on_a_name_or_an_id_prefix() {
    require_docker!();
    let scope = Scope::new("byid");
    let (p, _events) = provider(&scope, SERVER_IMAGE).await;
    let (a, b) = (scope.name("a"), scope.name("b"));
    let ia = p.spawn(spec(1, &a)).await.expect("spawn a");
    let ib = p.spawn(spec(2, &b)).await.expect("spawn b");

    // A hostname that no container has, but that the engine would resolve to a's container as
    // an id prefix (hex digits are valid hostnames).
    let prefix = &ia.instance_id[..12];
    p.remove(prefix)
        .await
        .expect("nothing of that name to remove");
    let still = inspect(&a).expect("a is still there");
    assert_eq!(still["Id"].as_str(), Some(ia.instance_id.as_str()));
    assert_eq!(still["State"]["Running"].as_bool(), Some(true));

    // b's container is replaced behind the provider's back by another one of the same name,
    // even with our labels: not the container this provider started, so remove leaves it.
    docker(&["rm", "-f", &b]).expect("docker rm b");
    let instance_label = format!("ringgate.instance={}", scope.instance);
    let theirs = docker(&[
        "create",
        "--name",
        &b,
        "--label",
        "ringgate.managed=true",
        "--label",
        &instance_label,
        "--label",
        "ringgate.server-id=2",
        SERVER_IMAGE,
    ])
    .expect("docker create a same-named container");
    assert_ne!(theirs, ib.instance_id);
    p.remove(&b).await.expect("remove b");
    assert_eq!(
        inspect(&b).expect("the other container is left alone")["Id"].as_str(),
        Some(theirs.as_str())
    );

    // What it did start, it removes.
    p.remove(&a).await.expect("remove a");
    assert!(inspect(&a).is_none(), "a is gone");
}
