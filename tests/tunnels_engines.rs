//! Tunnels re-homed key by key with replicas in Docker containers, and with two gateways on the
//! single-node Swarm sharing one ring: WebSockets opened with Python's `websockets` library.
//! After an `/add` exactly the tunnels whose key moved are closed with 1012, and on the swarm
//! both gateways close the same set.
//!
//! Each test has its own scope (label, network, names) and removes what it made, also on
//! failure. Without an engine, a swarm or the Python clients each test says why it skips (or
//! fails, under `RINGGATE_REQUIRE_ENGINES=1`).

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
#[macro_use]
#[path = "support/swarm.rs"]
mod swarm_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use support::websocket::Driver;
use support::{call, get, python, server_of, GatewayProcess};

const N: usize = 100;

async fn owners(gw: &GatewayProcess) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for i in 0..N {
        let id = format!("t{i}");
        let (code, body) = get(&gw.url(&format!("/home?id={id}"))).await;
        assert_eq!(code, 200, "{body}");
        out.insert(id, server_of(&body).expect("a /home answer"));
    }
    out
}

/// Tunnels through `gw` for ids t0..t{N}: checks they landed where /home routes them.
fn open(
    python: &std::path::Path,
    gw: &GatewayProcess,
    before: &BTreeMap<String, String>,
) -> Driver {
    let mut d = Driver::start(python, &format!("ws://{}", gw.addr), N, "t");
    let ready = d.next(Duration::from_secs(120));
    for (id, server) in ready["ready"].as_object().expect("ready") {
        assert_eq!(server.as_str(), Some(before[id].as_str()), "tunnel {id}");
    }
    d
}

/// The ids a driver saw closed while watching, each checked to be a 1012 within `by` seconds.
fn closed(seen: &Value, by: f64) -> BTreeSet<String> {
    let closed = seen["closed"].as_object().expect("closed");
    for (id, c) in closed {
        assert_eq!(c[0], 1012, "tunnel {id}: {c}");
        assert!(
            c[1].as_f64().unwrap_or(f64::MAX) <= by,
            "tunnel {id} closed late: {c}"
        );
    }
    closed.keys().cloned().collect()
}

fn moved(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> BTreeSet<String> {
    before
        .iter()
        .filter(|(id, o)| after[*id] != **o)
        .map(|(id, _)| id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_replicas_tunnels_are_rehomed_key_by_key() {
    require_docker!();
    let Some(python) = python::require(&["websockets"]) else {
        return;
    };
    let scope = docker_support::Scope::new("tunnels");
    let gw = docker_support::start_gateway(
        &scope,
        docker_support::SERVER_IMAGE,
        "[replicas]\ncount = 3\n[tunnels]\nrehome_window = \"2s\"\n",
    );
    let before = owners(&gw).await;
    let mut d = open(&python, &gw, &before);
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let after = owners(&gw).await;
    let moved = moved(&before, &after);
    assert!(!moved.is_empty(), "the new container took some keys");
    d.command("watch 4");
    let seen = d.next(Duration::from_secs(60));
    assert_eq!(
        closed(&seen, 3.0),
        moved,
        "exactly the moved tunnels closed"
    );
    for (id, server) in seen["alive"].as_object().expect("alive") {
        assert_eq!(
            server.as_str(),
            Some(before[id].as_str()),
            "tunnel {id} kept its replica"
        );
    }
    d.command("reopen");
    let again = d.next(Duration::from_secs(60));
    for (id, server) in again["reopened"].as_object().expect("reopened") {
        assert_eq!(
            server.as_str(),
            Some(after[id].as_str()),
            "{id} reconnected to its new owner"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_a_swarm_close_the_same_tunnels() {
    let _swarm = require_swarm!();
    let Some(python) = python::require(&["websockets"]) else {
        return;
    };
    swarm_support::ensure_server_image_checks();
    let ring = swarm_support::Ring::new("tunnels");
    let sections = "[replicas]\ncount = 3\n[tunnels]\nrehome_window = \"2s\"\n";
    let a = swarm_support::start_gateway(&ring, "gw-a", sections);
    let b = swarm_support::start_gateway(&ring, "gw-b", sections);
    let want: BTreeSet<String> = (1..=3).map(|i| format!("{}-s{i}", ring.instance)).collect();
    for gw in [&a, &b] {
        gw.wait_status(
            Duration::from_secs(120),
            "three replicas in the ring",
            |s| support::in_ring(s) == want,
        )
        .await;
    }
    let before = owners(&a).await;
    assert_eq!(
        owners(&b).await,
        before,
        "both gateways route every key alike"
    );
    let mut da = open(&python, &a, &before);
    let mut db = open(&python, &b, &before);
    let (code, body) = call("POST", &a.url("/add"), r#"{"n": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let after = owners(&a).await;
    let moved = moved(&before, &after);
    assert!(!moved.is_empty(), "the new replica took some keys");
    da.command("watch 6");
    db.command("watch 6");
    let (sa, sb) = (
        da.next(Duration::from_secs(60)),
        db.next(Duration::from_secs(60)),
    );
    // B learns the ring from the shared record (within a second), then paces over the window.
    let (ca, cb) = (closed(&sa, 3.0), closed(&sb, 4.5));
    assert_eq!(ca, moved, "gw-a closed exactly the moved tunnels");
    assert_eq!(cb, moved, "gw-b closed the same set");
    assert_eq!(owners(&b).await, after, "and routes them where gw-a does");
}
