//! The docker provider against the real engine, driven through the `Provider` trait.
//!
//! Each test has its own instance label and network (a [`Scope`]) and removes everything it
//! created when it ends, also on failure. Without an engine each test prints
//! `skipped: no Docker engine (<reason>)` and returns.

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
mod support;

use std::time::{Duration, Instant};

use docker_support::{docker, inspect, wait_ok, Scope, SERVER_IMAGE};
use ringgate::config::{ProviderConfig, ProviderKind};
use ringgate::provider::docker::DockerProvider;
use ringgate::provider::{Provider, ProviderEvent, ReplicaSpec};
use ringgate::ring::ServerId;
use tokio::sync::mpsc;

async fn provider(scope: &Scope, image: &str) -> (DockerProvider, mpsc::Receiver<ProviderEvent>) {
    let config = ProviderConfig {
        kind: ProviderKind::Docker,
        image: image.to_owned(),
        network: scope.network.clone(),
        ..ProviderConfig::default()
    };
    let (tx, rx) = mpsc::channel(64);
    let p = DockerProvider::connect_as(&config, tx, Duration::from_secs(5), scope.instance.clone())
        .await
        .expect("an engine answered `docker version`, so connect must succeed");
    (p, rx)
}

fn spec(id: u32, hostname: &str) -> ReplicaSpec {
    ReplicaSpec {
        id: ServerId::new(id).expect("non-zero id"),
        hostname: hostname.to_owned(),
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
    assert!(p.manages_replicas());
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
    } = event;
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
    let err = p.spawn(spec(1, &name)).await.expect_err("no such image");
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
