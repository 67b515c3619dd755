//! Several gateways on one real Docker Swarm (single node, initialised here when the engine is
//! in none and left again afterwards): they agree on the owner of every key after changes made
//! through any of them, concurrent `/add`s all land, a restarted gateway routes as before, and a
//! replica task killed is restarted by Swarm with its id and slots while no client request
//! fails.
//!
//! Each test has its own ring (instance label, network, replica names) and removes every
//! service, container and network carrying its label when it ends, also on failure. Gateways
//! run as host processes reaching the replicas on their published ports (loopback), except the
//! service-restart test, which runs one as a Swarm service in the host's network. Without an
//! engine or a swarm each test prints why it is skipped and returns.

// support/python.rs and the Docker or Chromium support each bring `engines.rs` along.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
#[macro_use]
#[path = "support/swarm.rs"]
mod swarm_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use docker_support::docker;
use support::{call, in_ring, json, server_of, GatewayProcess};
use swarm_support::{start_gateway, Ring};

/// Keys routed to compare gateways.
const IDS: u64 = 10_000;

/// What one GET through a gateway got: status, the gateway's `Via`, the replica that answered.
type Answer = (u16, String, Option<String>);

/// One GET through a gateway.
async fn home(client: &support::TestClient, url: &str) -> Answer {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (0, format!("{e}"), None),
        Err(_) => return (0, "timed out".into(), None),
    };
    let status = resp.status().as_u16();
    let via = resp
        .headers()
        .get(http::header::VIA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    let server = (status == 200).then(|| server_of(&body)).flatten();
    (status, via, server)
}

/// Which replica answers `/home?id=<id>` for every id below [`IDS`], through `gw` (32 at a
/// time); every answer must be a 200 carrying `Via: 1.1 <name>`.
async fn owners(gw: &GatewayProcess, name: &str) -> BTreeMap<u64, String> {
    let client = support::client();
    let via = format!("1.1 {name}");
    let answers: Vec<(u64, Answer)> = futures_util::stream::iter(0..IDS)
        .map(|id| {
            let (client, url) = (client.clone(), gw.url(&format!("/home?id={id}")));
            async move { (id, home(&client, &url).await) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut out = BTreeMap::new();
    for (id, (status, v, server)) in answers {
        assert_eq!(status, 200, "id {id} through {name}");
        assert_eq!(v, via, "id {id}: Via names the gateway that answered");
        out.insert(id, server.expect("a /home answer"));
    }
    out
}

fn fingerprint(status: &Value) -> String {
    status["ring"]["fingerprint"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Waits until `gw` routes to exactly `names` (in its ring) and returns its status.
async fn wait_ring(gw: &GatewayProcess, names: &BTreeSet<String>, within: Duration) -> Value {
    gw.wait_status(within, &format!("ring {names:?}"), |s| &in_ring(s) == names)
        .await
}

/// How long after `since` `gw` shows `fingerprint` (polled every 5 ms), or panics after
/// `within`.
async fn converge(
    gw: &GatewayProcess,
    fingerprint_wanted: &str,
    since: Instant,
    within: Duration,
) -> Duration {
    loop {
        let s = gw.status().await;
        if fingerprint(&s) == fingerprint_wanted {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "not converged within {within:?}: {} vs {fingerprint_wanted}\n{s:#}",
            fingerprint(&s)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn agreement(a: &BTreeMap<u64, String>, b: &BTreeMap<u64, String>) -> usize {
    a.iter().filter(|(id, o)| b.get(id) == Some(o)).count()
}

fn names(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_agree_on_every_key_after_an_add_through_one_and_an_rm_through_the_other() {
    let _swarm = require_swarm!();
    swarm_support::ensure_server_image_checks();
    let ring = Ring::new("agree");
    let a = start_gateway(&ring, "gw-a", "[replicas]\ncount = 2\n");
    let b = start_gateway(&ring, "gw-b", "[replicas]\ncount = 2\n");
    let start: BTreeSet<String> = (1..=2).map(|i| format!("{}-s{i}", ring.instance)).collect();
    let sa = wait_ring(&a, &start, Duration::from_secs(60)).await;
    let sb = wait_ring(&b, &start, Duration::from_secs(30)).await;
    assert_eq!(fingerprint(&sa), fingerprint(&sb));
    assert_eq!(
        ring.services().len(),
        2,
        "two gateways with count 2 made 2 replicas, not 4"
    );

    // /add through A: B converges, and both route every key alike.
    let s5 = format!("{}-S5", ring.instance);
    let body = format!("{{\"n\": 1, \"hostnames\": [\"{s5}\"]}}");
    let (code, text) = call("POST", &a.url("/add"), &body).await;
    assert_eq!(code, 200, "{text}");
    let added = Instant::now();
    let want = fingerprint(&a.status().await);
    let took = converge(&b, &want, added, Duration::from_secs(1)).await;
    println!("after /add through gw-a: gw-b converged in {took:?}");
    let (oa, ob) = tokio::join!(owners(&a, "gw-a"), owners(&b, "gw-b"));
    let same = agreement(&oa, &ob);
    println!("after /add: {same}/{IDS} ids owned by the same replica through both gateways");
    assert_eq!(same as u64, IDS);
    assert!(oa.values().any(|o| o == &s5), "S5 owns some keys");

    // /rm through B: A converges, and only the removed replica's keys moved.
    let victim = format!("{}-s1", ring.instance);
    let body = format!("{{\"n\": 1, \"hostnames\": [\"{victim}\"]}}");
    let (code, text) = call("DELETE", &b.url("/rm"), &body).await;
    assert_eq!(code, 200, "{text}");
    let removed = Instant::now();
    let want = fingerprint(&b.status().await);
    let took = converge(&a, &want, removed, Duration::from_secs(1)).await;
    println!("after /rm through gw-b: gw-a converged in {took:?}");
    let (ra, rb) = tokio::join!(owners(&a, "gw-a"), owners(&b, "gw-b"));
    let same = agreement(&ra, &rb);
    println!("after /rm: {same}/{IDS} ids owned by the same replica through both gateways");
    assert_eq!(same as u64, IDS);
    for (id, before) in &oa {
        if before != &victim {
            assert_eq!(&ra[id], before, "id {id} moved although its owner stayed");
        }
    }
    let reps: Vec<String> = json(&support::get(&a.url("/rep")).await.1)["message"]["replicas"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        names(&reps),
        [format!("{}-s2", ring.instance), s5.clone()]
            .into_iter()
            .collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_adds_over_two_gateways_all_land_with_distinct_ids_and_slots() {
    let _swarm = require_swarm!();
    swarm_support::ensure_server_image_checks();
    let ring = Ring::new("race");
    let a = start_gateway(&ring, "gw-a", "[replicas]\ncount = 1\n");
    let b = start_gateway(&ring, "gw-b", "[replicas]\ncount = 1\n");
    let one: BTreeSet<String> = [format!("{}-s1", ring.instance)].into_iter().collect();
    wait_ring(&a, &one, Duration::from_secs(60)).await;
    wait_ring(&b, &one, Duration::from_secs(30)).await;
    let calls: Vec<_> = (0..4)
        .map(|k| {
            let url = if k % 2 == 0 {
                a.url("/add")
            } else {
                b.url("/add")
            };
            let body = format!("{{\"n\": 1, \"hostnames\": [\"{}-R{k}\"]}}", ring.instance);
            tokio::spawn(async move { call("POST", &url, &body).await })
        })
        .collect();
    for c in calls {
        let (code, text) = c.await.expect("joined");
        assert_eq!(code, 200, "every call lands: {text}");
    }
    let all: BTreeSet<String> = std::iter::once(format!("{}-s1", ring.instance))
        .chain((0..4).map(|k| format!("{}-R{k}", ring.instance)))
        .collect();
    let sa = wait_ring(&a, &all, Duration::from_secs(10)).await;
    let sb = wait_ring(&b, &all, Duration::from_secs(10)).await;
    assert_eq!(fingerprint(&sa), fingerprint(&sb));
    // Ids and slots as the engine holds them (service labels): none twice.
    let services = ring.services();
    assert_eq!(services.len(), 5, "{services:?}");
    let ids: BTreeSet<String> = services
        .iter()
        .map(|(_, l)| l["ringgate.server-id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids.len(), 5, "distinct ids: {ids:?}");
    let mut slots: Vec<u32> = services
        .iter()
        .flat_map(|(_, l)| {
            l["ringgate.slots"]
                .as_str()
                .unwrap_or("")
                .split(',')
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    assert_eq!(slots.len(), 5 * 9);
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), 5 * 9, "no slot twice");
    // What /lb/status shows is what the labels say.
    for (name, labels) in &services {
        let r = support::replica(&sa, name);
        let shown: Vec<String> = r["slots"]
            .as_array()
            .map(|a| a.iter().map(|v| v.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(
            shown.join(","),
            labels["ringgate.slots"].as_str().unwrap_or("")
        );
        assert_eq!(
            r["id"].to_string(),
            labels["ringgate.server-id"].as_str().unwrap_or("")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_task_is_restarted_by_swarm_with_its_id_and_slots_and_no_request_fails() {
    let _swarm = require_swarm!();
    swarm_support::ensure_server_image_checks();
    let ring = Ring::new("kill");
    let a = start_gateway(&ring, "gw-a", "[replicas]\ncount = 3\n");
    let b = start_gateway(&ring, "gw-b", "[replicas]\ncount = 3\n");
    let three: BTreeSet<String> = (1..=3).map(|i| format!("{}-s{i}", ring.instance)).collect();
    let before = wait_ring(&a, &three, Duration::from_secs(60)).await;
    wait_ring(&b, &three, Duration::from_secs(30)).await;
    let victim = format!("{}-s2", ring.instance);
    let old = support::replica(&before, &victim).clone();

    // Traffic through both gateways while the task dies and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for (gw, name) in [(&a, "gw-a"), (&b, "gw-b")] {
        for worker in 0..4u64 {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let base = gw.url("/home?id=");
            let name = name.to_owned();
            load.push(tokio::spawn(async move {
                let client = support::client();
                let mut id = worker;
                while !stop.load(Ordering::Relaxed) {
                    let (code, via, _) = home(&client, &format!("{base}{id}")).await;
                    if code == 200 && via == format!("1.1 {name}") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed through {name}: {code} {via}");
                    }
                    id = (id + 7) % 1000;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let container = ring
        .task_container(&victim)
        .expect("the victim's task container");
    let killed = Instant::now();
    docker(&["kill", &container]).expect("docker kill");
    a.wait_status(
        Duration::from_secs(2),
        "the victim out of gw-a's ring",
        |s| !in_ring(s).contains(&victim),
    )
    .await;
    println!("gw-a ejected the killed task after {:?}", killed.elapsed());
    let after = a
        .wait_status(Duration::from_secs(60), "Swarm restarted the victim", |s| {
            let r = support::replica(s, &victim);
            r["in_ring"] == true && r["instance"] != old["instance"]
        })
        .await;
    println!(
        "the restarted task was back in gw-a's ring after {:?}",
        killed.elapsed()
    );
    let back_b = b
        .wait_status(
            Duration::from_secs(10),
            "the victim back in gw-b's ring",
            |s| support::replica(s, &victim)["in_ring"] == true,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load worker");
    }
    let new = support::replica(&after, &victim);
    assert_eq!(new["id"], old["id"], "same id");
    assert_eq!(new["slots"], old["slots"], "same slots");
    assert_eq!(
        fingerprint(&after),
        fingerprint(&before),
        "every key where it was"
    );
    assert_eq!(fingerprint(&back_b), fingerprint(&before));
    assert_ne!(ring.task_container(&victim), Some(container), "a new task");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("requests through the gateways meanwhile: {ok} ok, {failed} failed");
    assert!(ok > 100, "the load ran: {ok}");
    assert_eq!(failed, 0, "no client request failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_gateway_process_routes_every_id_as_before() {
    let _swarm = require_swarm!();
    swarm_support::ensure_server_image_checks();
    let ring = Ring::new("restart");
    let mut a = start_gateway(&ring, "gw-a", "[replicas]\ncount = 3\n");
    let three: BTreeSet<String> = (1..=3).map(|i| format!("{}-s{i}", ring.instance)).collect();
    wait_ring(&a, &three, Duration::from_secs(60)).await;
    // A history that a recomputed placement would not reproduce: add two, remove the first.
    for (method, path, body) in [
        (
            "POST",
            "/add",
            format!("{{\"n\": 2, \"hostnames\": [\"{}-X\"]}}", ring.instance),
        ),
        (
            "DELETE",
            "/rm",
            format!("{{\"n\": 1, \"hostnames\": [\"{}-s1\"]}}", ring.instance),
        ),
    ] {
        let (code, text) = call(method, &a.url(path), &body).await;
        assert_eq!(code, 200, "{text}");
    }
    let status = a.status().await;
    let before = owners(&a, "gw-a").await;
    assert!(a.stop(Duration::from_secs(20)), "stopped on SIGTERM");
    a.launch();
    let names = in_ring(&status);
    let again = wait_ring(&a, &names, Duration::from_secs(30)).await;
    assert_eq!(fingerprint(&again), fingerprint(&status));
    let after = owners(&a, "gw-a").await;
    assert_eq!(agreement(&before, &after) as u64, IDS, "no key moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_service_restarted_with_service_update_force_routes_every_id_as_before() {
    let _swarm = require_swarm!();
    swarm_support::ensure_server_image_checks();
    let mut ring = Ring::new("svc");
    let image = format!("{}-gw:test", ring.instance);
    if let Err(e) = swarm_support::gateway_image(&image) {
        panic!("cannot build the test gateway image: {e}");
    }
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = docker(&["image", "rm", "-f", &self.0]);
        }
    }
    let _image = Image(image.clone());
    let port = swarm_support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let toml = swarm_support::gateway_toml(
        &ring,
        "gw-svc",
        &listen,
        "[replicas]\ncount = 3\n[policy]\ndir = \"/policies\"\n",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("lb.toml");
    std::fs::write(&conf, toml).expect("write config");
    let service = format!("{}-gateway", ring.instance);
    ring.track_service(&service);
    let mount = format!("type=bind,src={},dst=/lb.toml,readonly", conf.display());
    let instance_env = format!("RINGGATE_INSTANCE_LABEL={}", ring.instance);
    docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        &service,
        "--network",
        "host",
        "--mount",
        &mount,
        "--mount",
        "type=bind,src=/var/run/docker.sock,dst=/var/run/docker.sock",
        "--env",
        &instance_env,
        "--env",
        "RUST_LOG=info",
        "--update-order",
        "start-first",
        "--no-resolve-image",
        &image,
        "serve",
        "--config",
        "/lb.toml",
    ])
    .expect("docker service create the gateway");
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    let url = |p: &str| format!("http://{addr}{p}");
    let three: BTreeSet<String> = (1..=3).map(|i| format!("{}-s{i}", ring.instance)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let (200, body) = try_get(&url("/lb/status")).await {
            let s = json(&body)["message"].clone();
            if in_ring(&s) == three {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the gateway service did not route to three replicas: {}",
            docker(&["service", "logs", "--tail", "30", &service]).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let client = support::client();
    let mut before = BTreeMap::new();
    for id in 0..1000u64 {
        let (code, via, server) = home(&client, &url(&format!("/home?id={id}"))).await;
        assert_eq!((code, via.as_str()), (200, "1.1 gw-svc"));
        before.insert(id, server.expect("answer"));
    }
    let old_task = docker(&[
        "service",
        "ps",
        "-q",
        "--filter",
        "desired-state=running",
        &service,
    ])
    .expect("service ps");
    docker(&["service", "update", "--force", "--detach", &service])
        .expect("service update --force");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = docker(&[
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=running",
            &service,
        ])
        .unwrap_or_default();
        if !now.is_empty() && now != old_task {
            if let (200, body) = try_get(&url("/lb/status")).await {
                let s = json(&body)["message"].clone();
                if in_ring(&s) == three && fingerprint(&s) == fingerprint(&status) {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted gateway service did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in 0..1000u64 {
        let (code, _, server) = home(&client, &url(&format!("/home?id={id}"))).await;
        assert_eq!(code, 200);
        assert_eq!(
            server.as_ref(),
            before.get(&id),
            "id {id} moved across the restart"
        );
    }
}

/// A GET that answers (0, why) instead of panicking while nothing listens yet.
async fn try_get(url: &str) -> (u16, String) {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    match tokio::time::timeout(Duration::from_secs(5), support::client().request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Ok(Err(e)) => (0, e.to_string()),
        Err(_) => (0, "timed out".into()),
    }
}
