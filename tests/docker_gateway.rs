//! The gateway with the docker provider, against the real engine: the replica API and proxying
//! checked against `docker ps`, a `docker kill` under traffic, adoption across a restart.
//!
//! Each test runs its own `ringgate serve` with its own instance label, network and replica
//! names (a [`Scope`]), and removes everything it created when it ends, also on failure. Without
//! an engine each test prints `skipped: no Docker engine (<reason>)` and returns.

// support/python.rs and the Docker or Chromium support each bring `engines.rs` along.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use docker_support::{docker, inspect, start_gateway, Scope, SERVER_IMAGE};
use serde_json::Value;
use support::{call, get, json, server_of};

/// One replica as `/lb/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rep {
    id: u64,
    name: String,
    instance: Option<String>,
    address: Option<String>,
    in_ring: bool,
}

fn reps(status: &Value) -> Vec<Rep> {
    let mut out: Vec<Rep> = status["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| Rep {
                    id: r["id"].as_u64().unwrap_or(0),
                    name: r["name"].as_str().unwrap_or("").to_owned(),
                    instance: r["instance"].as_str().map(str::to_owned),
                    address: r["address"].as_str().map(str::to_owned),
                    in_ring: r["in_ring"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn all_in_ring(n: usize) -> impl Fn(&Value) -> bool {
    move |s| {
        let r = reps(s);
        r.len() == n && r.iter().all(|r| r.in_ring)
    }
}

fn running(scope: &Scope) -> BTreeSet<String> {
    scope
        .containers()
        .into_iter()
        .filter(|(_, _, state)| state == "running")
        .map(|(name, _, _)| name)
        .collect()
}

/// Checks every replica in `/lb/status` against `docker inspect`: the container named after it
/// is the instance, runs, carries our labels with its id, and sits on the network at its address.
fn check_against_docker(scope: &Scope, status: &Value) {
    for r in reps(status) {
        let c = inspect(&r.name).unwrap_or_else(|| panic!("no container named {}", r.name));
        assert_eq!(
            c["Id"].as_str(),
            r.instance.as_deref(),
            "{}: instance is the container id",
            r.name
        );
        assert_eq!(c["State"]["Running"].as_bool(), Some(true), "{}", r.name);
        let labels = &c["Config"]["Labels"];
        assert_eq!(
            labels["ringgate.managed"].as_str(),
            Some("true"),
            "{}",
            r.name
        );
        assert_eq!(
            labels["ringgate.instance"].as_str(),
            Some(scope.instance.as_str()),
            "{}",
            r.name
        );
        assert_eq!(
            labels["ringgate.server-id"].as_str(),
            Some(r.id.to_string().as_str()),
            "{}",
            r.name
        );
        let ip = c["NetworkSettings"]["Networks"][&scope.network]["IPAddress"]
            .as_str()
            .unwrap_or_else(|| panic!("{} is not on {}", r.name, scope.network));
        assert_eq!(r.address, Some(format!("{ip}:5000")), "{}", r.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_rm_and_proxying_match_docker_ps() {
    require_docker!();
    let mut scope = Scope::new("gwapi");
    let gw = start_gateway(&scope, SERVER_IMAGE, "[replicas]\ncount = 2\n");
    let s = gw
        .wait_status(
            Duration::from_secs(30),
            "2 replicas in the ring",
            all_in_ring(2),
        )
        .await;
    let names = gw
        .replica_names()
        .await
        .into_iter()
        .collect::<BTreeSet<_>>();
    assert_eq!(
        running(&scope),
        names,
        "docker ps shows exactly the replicas of /rep"
    );
    check_against_docker(&scope, &s);

    // Proxying: every answer comes from one of those containers, the same key from the same one.
    let mut first = BTreeMap::new();
    for round in 0..2 {
        for id in 0..20 {
            let (code, body) = get(&gw.url(&format!("/home?id={id}"))).await;
            assert_eq!(code, 200, "{body}");
            let server = server_of(&body).expect("a replica's answer");
            assert!(names.contains(&server), "{server} not in {names:?}");
            if round == 0 {
                first.insert(id, server);
            } else {
                assert_eq!(first.get(&id), Some(&server), "key {id} moved");
            }
        }
    }

    // /add: one named, one generated.
    let x = scope.name("x");
    let (code, body) = call(
        "POST",
        &gw.url("/add"),
        &format!(r#"{{"n": 2, "hostnames": ["{x}"]}}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}\n{}", gw.log());
    assert_eq!(json(&body)["message"]["N"], 4);
    let names = gw
        .replica_names()
        .await
        .into_iter()
        .collect::<BTreeSet<_>>();
    assert!(names.contains(&x));
    assert_eq!(running(&scope), names, "after /add");
    let s = gw
        .wait_status(
            Duration::from_secs(10),
            "4 replicas in the ring",
            all_in_ring(4),
        )
        .await;
    check_against_docker(&scope, &s);

    // /add of a name an unmanaged container holds: a clear error, nothing changed, theirs intact.
    let theirs = scope.name("theirs");
    scope.track(&theirs);
    let their_id = docker(&["create", "--name", &theirs, SERVER_IMAGE]).expect("docker create");
    let (code, body) = call(
        "POST",
        &gw.url("/add"),
        &format!(r#"{{"n": 1, "hostnames": ["{theirs}"]}}"#),
    )
    .await;
    println!("/add clash: {code} {body}");
    assert!(code >= 400, "{code} {body}");
    assert!(body.contains("not managed by ringgate"), "{body}");
    assert_eq!(
        inspect(&theirs).expect("theirs is still there")["Id"].as_str(),
        Some(their_id.as_str())
    );
    assert_eq!(
        gw.replica_names()
            .await
            .into_iter()
            .collect::<BTreeSet<_>>(),
        names,
        "nothing added"
    );
    assert_eq!(running(&scope), names, "no container of ours left behind");

    // /rm: one named, then one chosen by the gateway.
    let (code, body) = call(
        "DELETE",
        &gw.url("/rm"),
        &format!(r#"{{"n": 1, "hostnames": ["{x}"]}}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["N"], 3);
    assert!(inspect(&x).is_none(), "{x} is gone from docker ps -a");
    let (code, body) = call("DELETE", &gw.url("/rm"), r#"{"n": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let names = gw
        .replica_names()
        .await
        .into_iter()
        .collect::<BTreeSet<_>>();
    assert_eq!(names.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while scope.containers().len() != 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running(&scope), names, "after /rm");
    assert_eq!(
        scope.containers().len(),
        2,
        "removed containers are deleted, not just stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_with_a_missing_image_fails_clearly_and_leaves_nothing() {
    require_docker!();
    let scope = Scope::new("gwnoimg");
    let image = format!("{}-missing:latest", scope.instance);
    let gw = start_gateway(&scope, &image, "[replicas]\ncount = 0\n");
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1}"#).await;
    println!("/add with a missing image: {code} {body}");
    assert!(code >= 500, "{code} {body}");
    assert!(
        body.contains("make images") && body.contains(&image),
        "{body}"
    );
    assert!(gw
        .replica_names()
        .await
        .into_iter()
        .collect::<BTreeSet<_>>()
        .is_empty());
    assert!(scope.containers().is_empty(), "{:?}", scope.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_under_traffic_ejects_at_once_and_replaces_with_the_same_name_and_id() {
    require_docker!();
    let scope = Scope::new("gwkill");
    // Heartbeats every 30 s: ejection within a second can only come from the event stream
    // (or a failed proxy attempt).
    let gw = start_gateway(
        &scope,
        SERVER_IMAGE,
        "[replicas]\ncount = 3\n[health]\ninterval = \"30s\"\nrecovery_delay = \"500ms\"\n",
    );
    let before = reps(
        &gw.wait_status(
            Duration::from_secs(30),
            "3 replicas in the ring",
            all_in_ring(3),
        )
        .await,
    );
    let victim = before[1].clone();

    // Traffic: sequential requests over every key, counting anything but 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let base = gw.url("/home?id=");
        tokio::spawn(async move {
            let client = support::client();
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (code, body) =
                    support::call_with(&client, "GET", &format!("{base}{i}"), "", &[]).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if code != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!("{code} {body}"));
                }
                i = (i + 1) % 1000;
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    docker(&["kill", &victim.name]).expect("docker kill");
    gw.wait_status(
        Duration::from_secs(1),
        "the killed replica out of the ring within 1 s",
        |s| reps(s).iter().any(|r| r.id == victim.id && !r.in_ring),
    )
    .await;
    let ejected = t0.elapsed();
    let after = gw
        .wait_status(
            Duration::from_secs(20),
            "the replacement in the ring",
            |s| {
                reps(s).iter().any(|r| {
                    r.id == victim.id
                        && r.in_ring
                        && r.instance.is_some()
                        && r.instance != victim.instance
                })
            },
        )
        .await;
    let replaced = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.await.expect("traffic task");
    println!(
        "docker kill → out of the ring {ejected:?}, back in the ring {replaced:?}; {} requests, {} failed",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    let now = reps(&after);
    let new = now.iter().find(|r| r.id == victim.id).expect("same id");
    assert_eq!(new.name, victim.name, "same hostname");
    assert_eq!(now.len(), 3);
    check_against_docker(&scope, &after);
    assert_eq!(
        scope.containers().len(),
        3,
        "the dead container was replaced, not kept: {:?}",
        scope.containers()
    );
    assert!(
        failures.is_empty(),
        "{} client requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_adopts_running_replicas_without_restarting_them() {
    require_docker!();
    let scope = Scope::new("gwadopt");
    let mut gw = start_gateway(&scope, SERVER_IMAGE, "[replicas]\ncount = 3\n");
    let before = reps(
        &gw.wait_status(
            Duration::from_secs(30),
            "3 replicas in the ring",
            all_in_ring(3),
        )
        .await,
    );
    let started_at: BTreeMap<String, Value> = before
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                inspect(&r.name).expect("container")["State"]["StartedAt"].clone(),
            )
        })
        .collect();

    assert!(
        gw.stop(Duration::from_secs(20)),
        "the gateway exits on SIGTERM\n{}",
        gw.log()
    );
    let names: BTreeSet<String> = before.iter().map(|r| r.name.clone()).collect();
    assert_eq!(
        running(&scope),
        names,
        "replicas keep running while the gateway is down"
    );

    gw.launch();
    let after = reps(
        &gw.wait_status(
            Duration::from_secs(30),
            "3 adopted replicas in the ring",
            all_in_ring(3),
        )
        .await,
    );
    assert_eq!(
        after, before,
        "same ids, names, container ids and addresses"
    );
    for r in &after {
        let c = inspect(&r.name).expect("container");
        assert_eq!(
            c["State"]["StartedAt"], started_at[&r.name],
            "{} was not restarted",
            r.name
        );
    }
    assert_eq!(
        scope.containers().len(),
        3,
        "no extra container: {:?}",
        scope.containers()
    );
    assert!(
        gw.log().contains("adopt"),
        "the log says it adopted\n{}",
        gw.log()
    );
}
