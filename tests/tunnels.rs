//! Tunnels through the real gateway to real `ringgate-server` process replicas: WebSockets
//! opened with Python's `websockets` library (re-homing, key by key) and by hand (refusal, a
//! replica that dies, a client that stops reading, idle timeout, the cap, half-close, drain
//! order, `rehome = false`, the key cookie).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::websocket::{self as ws, Driver};
use support::*;

fn three(tunnels: &str) -> Conf {
    Conf {
        replicas: "count = 3\nmax_replicas = 8\n".into(),
        tunnels: tunnels.into(),
        ..Conf::default()
    }
}

/// The replica `GET /home?id=<id>` lands on now.
async fn owner(gw: &GatewayProcess, id: &str) -> String {
    let (code, body) = get(&gw.url(&format!("/home?id={id}"))).await;
    assert_eq!(code, 200, "{body}");
    server_of(&body).expect("a /home answer")
}

async fn owners(
    gw: &GatewayProcess,
    ids: impl Iterator<Item = String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for id in ids {
        let who = owner(gw, &id).await;
        out.insert(id, who);
    }
    out
}

fn ws_base(gw: &GatewayProcess) -> String {
    format!("ws://{}", gw.addr)
}

/// Waits (bounded) until `/lb/status` says `open` tunnels are open.
async fn wait_open(gw: &GatewayProcess, open: u64, within: Duration) {
    wait_tunnels(gw, "open", open, within).await;
}

/// Waits (bounded) until `/lb/status`'s `tunnels.<what>` is `n`.
async fn wait_tunnels(gw: &GatewayProcess, what: &str, n: u64, within: Duration) {
    let started = Instant::now();
    loop {
        let status = gw.status().await;
        if status["tunnels"][what] == n {
            return;
        }
        assert!(
            started.elapsed() < within,
            "tunnels {what}: {} (waiting for {n})",
            status["tunnels"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens 120 WebSockets with `websockets`, checks each landed on its key's home, adds a replica,
/// and returns what the driver saw while the tunnels kept talking for `watch` seconds: the
/// tunnels closed (id → [code, seconds]), the ones alive (id → server), the owners before and
/// after.
struct Round {
    /// What `/lb/simulate` said of the `/add` before it was made.
    predicted: serde_json::Value,
    before: BTreeMap<String, String>,
    after: BTreeMap<String, String>,
    closed: serde_json::Map<String, serde_json::Value>,
    alive: serde_json::Map<String, serde_json::Value>,
    driver: Driver,
}

async fn add_and_watch(gw: &GatewayProcess, python: &std::path::Path, watch: f64) -> Round {
    const N: usize = 120;
    let mut driver = Driver::start(python, &ws_base(gw), N, "t");
    let ready = driver.next(Duration::from_secs(60));
    let ready = ready["ready"].as_object().expect("ready").clone();
    assert_eq!(ready.len(), N);
    let ids = || (0..N).map(|i| format!("t{i}"));
    let before = owners(gw, ids()).await;
    for (id, server) in &ready {
        assert_eq!(
            server.as_str(),
            Some(before[id].as_str()),
            "tunnel {id} landed where its requests do"
        );
    }
    let status = gw.status().await;
    let per_replica: i64 = status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["tunnels"].as_i64().expect("tunnels"))
        .sum();
    assert_eq!(
        per_replica, N as i64,
        "/lb/status counts every tunnel at its replica"
    );
    let (code, body) = call("POST", &gw.url("/lb/simulate"), r#"{"action": "add"}"#).await;
    assert_eq!(code, 200, "{body}");
    let predicted = json(&body)["message"].clone();
    assert_eq!(predicted["tunnels_open"], N, "{predicted}");
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let after = owners(gw, ids()).await;
    driver.command(&format!("watch {watch}"));
    let seen = driver.next(Duration::from_secs(60));
    Round {
        predicted,
        before,
        after,
        closed: seen["closed"].as_object().expect("closed").clone(),
        alive: seen["alive"].as_object().expect("alive").clone(),
        driver,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_add_exactly_the_tunnels_whose_key_moved_are_closed_with_1012() {
    let Some(python) = python::require(&["websockets"]) else {
        return;
    };
    let gw = GatewayProcess::start(&three("rehome_window = \"2s\"\n"));
    let mut round = add_and_watch(&gw, &python, 4.0).await;
    let moved: BTreeSet<&String> = round
        .before
        .iter()
        .filter(|(id, was)| round.after[*id] != **was)
        .map(|(id, _)| id)
        .collect();
    assert!(!moved.is_empty(), "the new replica took some of 120 keys");
    let closed: BTreeSet<&String> = round.closed.keys().collect();
    assert_eq!(closed, moved, "closed exactly the tunnels whose key moved");
    assert_eq!(
        round.predicted["tunnels_closed"],
        moved.len(),
        "the what-if said how many tunnels the /add would close"
    );
    for (id, seen) in &round.closed {
        assert_eq!(seen[0], 1012, "tunnel {id}: {seen}");
        let at = seen[1].as_f64().expect("seconds");
        assert!(
            at <= 3.0,
            "tunnel {id} closed {at} s into the watch (window 2 s + 1 s)"
        );
    }
    for (id, server) in &round.alive {
        assert_eq!(
            server.as_str(),
            Some(round.before[id].as_str()),
            "tunnel {id} kept echoing"
        );
    }
    assert_eq!(round.alive.len() + round.closed.len(), 120);
    round.driver.command("reopen");
    let reopened = round.driver.next(Duration::from_secs(60));
    for (id, server) in reopened["reopened"].as_object().expect("reopened") {
        assert_eq!(
            server.as_str(),
            Some(round.after[id].as_str()),
            "{id} reconnected to its new owner"
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ringgate_tunnels_rehomed_total{reason=\"key_moved\"}"
        ),
        moved.len() as f64
    );
    assert!(metric(&metrics, "ringgate_tunnels_opened_total") >= 120.0 + moved.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rehome_off_every_tunnel_stays_where_it_is() {
    let Some(python) = python::require(&["websockets"]) else {
        return;
    };
    let gw = GatewayProcess::start(&three("rehome = false\nrehome_window = \"1s\"\n"));
    let round = add_and_watch(&gw, &python, 2.5).await;
    assert!(
        round.before.iter().any(|(id, was)| round.after[id] != *was),
        "some key moved"
    );
    assert!(round.closed.is_empty(), "closed: {:?}", round.closed);
    for (id, server) in &round.alive {
        assert_eq!(
            server.as_str(),
            Some(round.before[id].as_str()),
            "tunnel {id}"
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ringgate_tunnels_rehomed_total{reason=\"key_moved\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_the_upgrade_answers_as_usual() {
    let gw = GatewayProcess::start(&three(""));
    // /home is no WebSocket: the replica answers 200 and the connection stays HTTP/1.
    let (mut s, head) = ws::open(gw.addr, "/home?id=7", "").await;
    assert_eq!(ws::status(&head), 200, "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("length"))
        })
        .expect("a length");
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.expect("body");
    s.write_all(b"GET /home?id=7 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .expect("again");
    let mut next = [0u8; 12];
    s.read_exact(&mut next)
        .await
        .expect("a second answer on the same connection");
    assert_eq!(&next, b"HTTP/1.1 200");
    assert_eq!(gw.status().await["tunnels"]["open"], 0);
    // A 101 for a tunnel opens, and CONNECT stays refused.
    let (mut t, head) = ws::open(gw.addr, "/ws?id=7", "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert!(ws::echo(&mut t, "hi").await.is_some());
    let (code, _) = raw(
        gw.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(code, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_closes_its_tunnels_and_is_counted() {
    let gw = GatewayProcess::start(&three(""));
    let (mut t, head) = ws::open(gw.addr, "/ws?id=42", "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    let server = ws::echo(&mut t, "who").await.expect("an echo");
    let status = gw.status().await;
    let pid = replica(&status, &server)["instance"]
        .as_str()
        .and_then(|i| i.strip_prefix("pid:").or(Some(i)))
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("the pid of {server}: {}", replica(&status, &server)));
    let failures = |m: &str| {
        metric(
            m,
            &format!("ringgate_upstream_failures_total{{replica=\"{server}\"}}"),
        )
    };
    let before = failures(&gw.metrics().await);
    signal(pid, "KILL");
    let end = tokio::time::timeout(Duration::from_secs(10), ws::read(&mut t)).await;
    assert!(matches!(end, Ok(None)), "the client's side ends: {end:?}");
    drop(t);
    wait_open(&gw, 0, Duration::from_secs(10)).await;
    assert_eq!(
        failures(&gw.metrics().await),
        before + 1.0,
        "the broken tunnel counts against {server}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let mut conf = three("");
    conf.proxy = "send_timeout = \"1s\"\n".into();
    let gw = GatewayProcess::start(&conf);
    let (t, head) = ws::open(gw.addr, "/ws?id=5", "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    let mut t = t.into_std().expect("std");
    t.set_nonblocking(false).expect("blocking");
    t.set_write_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // Echoes pile up toward a client that reads none of them, until everything on the way is
    // full and the gateway's writes to the client wait; then send_timeout cuts the tunnel.
    let message = ws::frame(0x1, &vec![b'a'; 16 * 1024]);
    let started = Instant::now();
    let mut sent = 0usize;
    use std::io::Write;
    while started.elapsed() < Duration::from_secs(30) {
        match t.write(&message) {
            Ok(n) => sent += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break, // cut
        }
        if gw.status().await["tunnels"]["open"] == 0 {
            break;
        }
    }
    assert!(sent > 0);
    wait_open(&gw, 0, Duration::from_secs(20)).await;
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "ringgate_connections_timed_out_total{phase=\"send\"}"
        ) >= 1.0,
        "counted as a send timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let gw = GatewayProcess::start(&three("idle_timeout = \"1s\"\n"));
    let (mut t, head) = ws::open(gw.addr, "/ws?id=9", "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    // Talking keeps it open past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(ws::echo(&mut t, "still here").await.is_some());
    }
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), ws::read(&mut t)).await;
    assert!(matches!(end, Ok(None)), "closed: {end:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    wait_open(&gw, 0, Duration::from_secs(5)).await;
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_tunnels_idle_timeouts_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_tunnel_cap_an_upgrade_gets_503_and_requests_still_pass() {
    let gw = GatewayProcess::start(&three("max = 2\n"));
    let (mut a, head) = ws::open(gw.addr, "/ws?id=1", "").await;
    assert_eq!(ws::status(&head), 101);
    let (_b, head) = ws::open(gw.addr, "/ws?id=2", "").await;
    assert_eq!(ws::status(&head), 101);
    let (_c, head) = ws::open(gw.addr, "/ws?id=3", "").await;
    assert_eq!(ws::status(&head), 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let (code, _) = get(&gw.url("/home?id=3")).await;
    assert_eq!(code, 200, "plain requests are not tunnels");
    ws::send(&mut a, 0x8, &1000u16.to_be_bytes())
        .await
        .expect("close");
    let _ = tokio::time::timeout(Duration::from_secs(5), ws::read(&mut a)).await;
    drop(a);
    wait_open(&gw, 1, Duration::from_secs(10)).await;
    let (_d, head) = ws::open(gw.addr, "/ws?id=4", "").await;
    assert_eq!(ws::status(&head), 101, "a place came free");
    assert_eq!(
        metric(&gw.metrics().await, "ringgate_tunnels_refused_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_still_gets_its_answer() {
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log = log_dir.path().join("access.log");
    let mut conf = three("");
    conf.log = format!("access = \"{}\"\nformat = \"json\"\n", log.display());
    let gw = GatewayProcess::start(&conf);
    let (mut t, head) = ws::open(gw.addr, "/ws?id=11", "").await;
    assert_eq!(ws::status(&head), 101);
    ws::send(&mut t, 0x1, b"last words").await.expect("send");
    use tokio::io::AsyncWriteExt;
    t.shutdown().await.expect("half-close");
    let (op, payload) = tokio::time::timeout(Duration::from_secs(10), ws::read(&mut t))
        .await
        .expect("in time")
        .expect("the echo after the half-close");
    assert_eq!(op, 0x1);
    let v = json(&String::from_utf8_lossy(&payload));
    assert_eq!(v["echo"], "last words");
    // The replica answers the end with its own; then the tunnel's line is written, at its end.
    let _ = tokio::time::timeout(Duration::from_secs(5), ws::read(&mut t)).await;
    drop(t);
    wait_open(&gw, 0, Duration::from_secs(10)).await;
    let started = Instant::now();
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("\"/ws?id=11\"")) {
            break json(l);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no line for the tunnel:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["status"], 101, "{line}");
    assert!(
        line["termination"]
            .as_str()
            .is_some_and(|t| t.starts_with("tunnel_")),
        "{line}"
    );
    // 10 bytes of text in a 16-byte masked frame went up; the echo frame came down.
    assert!(line["bytes_up"].as_u64().is_some_and(|b| b >= 16), "{line}");
    assert!(line["bytes"].as_u64().is_some_and(|b| b > 20), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_serves_tunnels_until_the_drain_timeout_then_closes_them_with_1001() {
    let mut conf = three("");
    conf.proxy = "drain_timeout = \"2s\"\n".into();
    let gw = GatewayProcess::start(&conf);
    let (mut t, head) = ws::open(gw.addr, "/ws?id=3", "").await;
    assert_eq!(ws::status(&head), 101);
    let stopped = Instant::now();
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        ws::echo(&mut t, "during the drain").await.is_some(),
        "a tunnel lives through the drain"
    );
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws::read(&mut t)).await {
            Ok(Some((0x8, payload))) => break ws::close_code(&payload),
            Ok(Some(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(closed, Some(1001), "going away");
    let at = stopped.elapsed();
    assert!(
        at >= Duration::from_millis(1900),
        "closed only after the drain timeout: {at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_client_gets_a_cookie_and_its_websocket_follows_it() {
    let mut conf = three("");
    conf.hashing = "key = \"query:id\"\nset_cookie = \"rg_key\"\n".into();
    let gw = GatewayProcess::start(&conf);
    let (status, head) = ws::open(gw.addr, "/home", "").await;
    assert_eq!(ws::status(&head), 200);
    drop(status);
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .unwrap_or_else(|| panic!("a Set-Cookie: {head}"))
        .to_owned();
    assert!(cookie.starts_with("rg_key="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Lax", "Max-Age=2592000", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    let pair = cookie.split(';').next().expect("name=value").to_owned();
    let client = client();
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let (code, body) =
            call_with(&client, "GET", &gw.url("/home"), "", &[("cookie", &pair)]).await;
        assert_eq!(code, 200);
        seen.insert(server_of(&body).expect("answer"));
    }
    assert_eq!(seen.len(), 1, "one replica for one cookie: {seen:?}");
    let (mut t, head) = ws::open(gw.addr, "/ws", &format!("Cookie: {pair}\r\n")).await;
    assert_eq!(ws::status(&head), 101);
    assert!(
        !head.to_ascii_lowercase().contains("set-cookie"),
        "a client with the cookie keeps it"
    );
    let server = ws::echo(&mut t, "me").await.expect("echo");
    assert!(
        seen.contains(&server),
        "the WebSocket follows the cookie: {server} vs {seen:?}"
    );
}

/// Waits (bounded) until `/lb/status` says `resting` tunnels rest without a task.
async fn wait_resting(gw: &GatewayProcess, resting: u64, within: Duration) {
    wait_tunnels(gw, "resting", resting, within).await;
}

/// Opens a WebSocket for key `id` and returns it with the replica that echoed on it.
async fn tunnel_for(gw: &GatewayProcess, id: usize) -> (tokio::net::TcpStream, String) {
    let (mut t, head) = ws::open(gw.addr, &format!("/ws?id={id}"), "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    let server = ws::echo(&mut t, "hello").await.expect("an echo");
    (t, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_tunnels_rest_without_a_task_and_talk_again_as_before() {
    let gw = GatewayProcess::start(&three("rest_after = \"300ms\"\n"));
    let mut tunnels = Vec::new();
    for id in 0..40 {
        tunnels.push(tunnel_for(&gw, id).await);
    }
    wait_resting(&gw, 40, Duration::from_secs(10)).await;
    assert_eq!(
        metric(&gw.metrics().await, "ringgate_tunnels_resting"),
        40.0
    );
    // Each one woken by its client: the message goes up, the echo comes down, from the same
    // replica, and the others rest on.
    for (n, (t, server)) in tunnels.iter_mut().enumerate() {
        let echoed = ws::echo(t, &format!("again {n}")).await;
        assert_eq!(echoed.as_deref(), Some(server.as_str()), "tunnel {n}");
    }
    wait_resting(&gw, 40, Duration::from_secs(10)).await;
    // A bigger message than one read takes, after a rest, both ways.
    let (t, _) = &mut tunnels[7];
    let big = "x".repeat(200 * 1024);
    ws::send(t, 0x1, big.as_bytes()).await.expect("send");
    let (op, payload) = tokio::time::timeout(Duration::from_secs(10), ws::read(t))
        .await
        .expect("in time")
        .expect("an echo");
    assert_eq!(op, 0x1);
    assert_eq!(
        json(&String::from_utf8_lossy(&payload))["echo"],
        big.as_str()
    );
    // Closed by its client while resting: it ends, and is no longer counted.
    let (mut t, _) = tunnels.remove(0);
    ws::send(&mut t, 0x8, &1000u16.to_be_bytes())
        .await
        .expect("close");
    let _ = tokio::time::timeout(Duration::from_secs(5), ws::read(&mut t)).await;
    drop(t);
    wait_open(&gw, 39, Duration::from_secs(10)).await;
    wait_resting(&gw, 39, Duration::from_secs(10)).await;
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_tunnels_idle_timeouts_total"),
        0.0
    );
    assert!(
        metric(&metrics, "ringgate_tunnel_bytes_total{direction=\"up\"}") > 0.0,
        "the ended tunnel's bytes are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resting_tunnels_whose_key_moved_are_closed_with_1012_and_the_others_rest_on() {
    let gw = GatewayProcess::start(&three("rest_after = \"200ms\"\nrehome_window = \"1s\"\n"));
    const N: usize = 60;
    let mut tunnels = Vec::new();
    for id in 0..N {
        tunnels.push(tunnel_for(&gw, id).await);
    }
    wait_resting(&gw, N as u64, Duration::from_secs(10)).await;
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let mut moved = 0;
    for (id, (t, was)) in tunnels.iter_mut().enumerate() {
        let now = owner(&gw, &id.to_string()).await;
        if now == *was {
            continue;
        }
        moved += 1;
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws::read(t)).await {
                Ok(Some((0x8, payload))) => break ws::close_code(&payload),
                Ok(Some(_)) => continue,
                other => panic!("tunnel {id}: no close frame: {other:?}"),
            }
        };
        assert_eq!(closed, Some(1012), "tunnel {id}");
    }
    assert!(moved > 0, "the new replica took some of {N} keys");
    wait_open(&gw, (N - moved) as u64, Duration::from_secs(10)).await;
    for (id, (t, was)) in tunnels.iter_mut().enumerate() {
        if owner(&gw, &id.to_string()).await == *was {
            let echoed = ws::echo(t, "still here").await;
            assert_eq!(echoed.as_deref(), Some(was.as_str()), "tunnel {id}");
        }
    }
    assert_eq!(
        metric(
            &gw.metrics().await,
            "ringgate_tunnels_rehomed_total{reason=\"key_moved\"}"
        ),
        moved as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_tunnel_is_closed_at_its_idle_timeout() {
    let gw = GatewayProcess::start(&three("rest_after = \"200ms\"\nidle_timeout = \"2s\"\n"));
    let (mut t, _) = tunnel_for(&gw, 9).await;
    let started = Instant::now();
    wait_resting(&gw, 1, Duration::from_secs(10)).await;
    let end = tokio::time::timeout(Duration::from_secs(10), ws::read(&mut t)).await;
    assert!(matches!(end, Ok(None)), "closed: {end:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "at the idle timeout, not at the rest: {:?}",
        started.elapsed()
    );
    wait_open(&gw, 0, Duration::from_secs(5)).await;
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_tunnels_idle_timeouts_total"),
        1.0
    );
    assert_eq!(metric(&metrics, "ringgate_tunnels_resting"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_resting_tunnels_with_1001() {
    let mut conf = three("rest_after = \"200ms\"\n");
    conf.proxy = "drain_timeout = \"1s\"\n".into();
    let gw = GatewayProcess::start(&conf);
    let (mut t, _) = tunnel_for(&gw, 3).await;
    wait_resting(&gw, 1, Duration::from_secs(10)).await;
    gw.signal("TERM");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws::read(&mut t)).await {
            Ok(Some((0x8, payload))) => break ws::close_code(&payload),
            Ok(Some(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(closed, Some(1001), "going away");
}
