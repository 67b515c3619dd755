//! Failure and recovery with real replica processes: SIGKILL under load, SIGSTOP (a hung
//! replica), a replica that crashes on start, and `/rm` while requests are in flight.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// A wrapper around ringgate-server, as `provider.server_binary`.
fn wrapper(dir: &std::path::Path, body: &str) -> String {
    let path = dir.join("replica.sh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\n{body}\nexec \"{SERVER_BIN}\" \"$@\"\n"),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_costs_no_request_and_moves_no_other_key() {
    let gw = GatewayProcess::start(&Conf {
        health: "recovery_delay = \"300ms\"\n".into(),
        ..Conf::default()
    });
    let before = gw.owners(0..300).await;
    let status = gw.status().await;
    let victim = replica(&status, "server-2");
    let victim_pid: u32 = victim["instance"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    assert!(
        before.values().any(|s| s == "server-2"),
        "server-2 owns some of the ids"
    );

    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..16u64 {
        let (url, done) = (gw.url(""), done.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            for k in 0..150u64 {
                let id = (w * 150 + k) % 300;
                let (code, body) =
                    call_with(&c, "GET", &format!("{url}/home?id={id}"), "", &[]).await;
                seen.push((
                    id,
                    code,
                    if code == 200 {
                        server_of(&body)
                    } else {
                        Some(body)
                    },
                ));
                done.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    while done.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal(victim_pid, "KILL");
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await.expect("worker"));
    }
    assert_eq!(results.len(), 2400);
    let failed: Vec<_> = results.iter().filter(|(_, code, _)| *code != 200).collect();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}\nlog:\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        gw.log()
    );
    for (id, _, server) in &results {
        let owner = &before[id];
        if owner != "server-2" {
            assert_eq!(
                server.as_ref(),
                Some(owner),
                "id {id} moved away from {owner} while server-2 died"
            );
        }
    }

    // N restored: server-2 again, same id, a new process.
    let status = gw
        .wait_status(Duration::from_secs(20), "server-2 replaced", |s| {
            let r = replica(s, "server-2");
            r["state"] == "up"
                && r["instance"]
                    .as_str()
                    .is_some_and(|p| p != victim_pid.to_string())
        })
        .await;
    let r = replica(&status, "server-2");
    assert_eq!(r["id"], 2);
    assert!(r["restarts"].as_u64() >= Some(1));
    assert_eq!(status["up"], 3);
    assert_eq!(
        gw.owners(0..300).await,
        before,
        "after recovery every id is back on its owner"
    );

    let (_, text) = get(&gw.url("/lb/metrics")).await;
    assert!(metric(&text, "ringgate_ejections_total") >= 1.0, "{text}");
    assert!(metric(&text, "ringgate_respawns_total") >= 1.0, "{text}");
    assert_eq!(metric(&text, "ringgate_replicas_up"), 3.0);
    assert_eq!(metric(&text, "ringgate_replicas_desired"), 3.0);
    assert!(
        metric(&text, "ringgate_upstream_latency_seconds_count") >= 2400.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_detected_by_heartbeat_and_replaced() {
    let gw = GatewayProcess::start(&Conf {
        health: "interval = \"300ms\"\ntimeout = \"200ms\"\nfall = 2\nrecovery_delay = \"200ms\"\n"
            .into(),
        proxy: "request_timeout = \"1s\"\n".into(),
        ..Conf::default()
    });
    let before = gw.owners(0..100).await;
    let status = gw.status().await;
    let pid: u32 = replica(&status, "server-1")["instance"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    signal(pid, "STOP");
    // Requests during the hang: answered by the others, or 504, never hanging.
    let c = client();
    for id in 0..100u64 {
        let (code, body) = call_with(&c, "GET", &gw.url(&format!("/home?id={id}")), "", &[]).await;
        assert!(code == 200 || code == 504, "id {id}: {code} {body}");
        if code == 200 && before[&id] != "server-1" {
            assert_eq!(server_of(&body).as_ref(), Some(&before[&id]));
        }
    }
    gw.wait_status(Duration::from_secs(5), "server-1 taken out", |s| {
        replica(s, "server-1")["in_ring"] == false
    })
    .await;
    let status = gw
        .wait_status(Duration::from_secs(30), "server-1 replaced", |s| {
            let r = replica(s, "server-1");
            r["state"] == "up" && r["instance"].as_str().is_some_and(|p| p != pid.to_string())
        })
        .await;
    assert_eq!(replica(&status, "server-1")["id"], 1);
    assert!(
        wait_dead(&[pid], Duration::from_secs(10)).is_empty(),
        "the hung process was not stopped"
    );
    assert_eq!(gw.owners(0..100).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_crashes_on_start_backs_off_and_the_rest_serve() {
    let dir = tempfile::tempdir().expect("dir");
    let script = wrapper(dir.path(), "[ \"$SERVER_ID\" = \"server-2\" ] && exit 3");
    let gw = GatewayProcess::start(&Conf {
        provider: format!("server_binary = \"{script}\"\n"),
        health: "recovery_delay = \"100ms\"\nmax_backoff = \"1s\"\n".into(),
        ..Conf::default()
    });
    // Everything is served by the two healthy replicas meanwhile.
    let c = client();
    for id in 0..200u64 {
        let (code, body) = call_with(&c, "GET", &gw.url(&format!("/home?id={id}")), "", &[]).await;
        assert_eq!(code, 200, "{body}");
        assert_ne!(server_of(&body).as_deref(), Some("server-2"));
    }
    let status = gw
        .wait_status(Duration::from_secs(20), "back-off to grow", |s| {
            replica(s, "server-2")["crash_streak"].as_u64() >= Some(4)
        })
        .await;
    let r = replica(&status, "server-2");
    assert_ne!(r["state"], "up");
    assert!(
        r["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("exited before listening")),
        "{r}"
    );
    // Not a busy loop: with 100 ms doubling to a 1 s cap, 3 s more allow only a handful of tries.
    let restarts = r["restarts"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = replica(&gw.status().await, "server-2")["restarts"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        later - restarts <= 5,
        "restarted {} times in 3 s",
        later - restarts
    );
    assert!(later > restarts, "it keeps trying");
    assert_eq!(gw.status().await["up"], 2);
    assert_eq!(
        gw.replica_names().await.len(),
        3,
        "N stays 3: it is being recovered, not dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_drains_in_flight_requests() {
    let dir = tempfile::tempdir().expect("dir");
    let script = wrapper(dir.path(), "export RESPONSE_DELAY_MS=800");
    let gw = GatewayProcess::start(&Conf {
        provider: format!("server_binary = \"{script}\"\n"),
        ..Conf::default()
    });
    let map = gw.owners(0..30).await;
    let id = map
        .iter()
        .find(|(_, s)| *s == "server-3")
        .map(|(id, _)| *id)
        .expect("an id of server-3");
    let pid: u32 = replica(&gw.status().await, "server-3")["instance"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    let mut inflight = Vec::new();
    for _ in 0..5 {
        let url = gw.url(&format!("/home?id={id}"));
        inflight.push(tokio::spawn(async move { get(&url).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, body) = call(
        "DELETE",
        &gw.url("/rm"),
        r#"{"n": 1, "hostnames": ["server-3"]}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    for r in inflight {
        let (code, body) = r.await.expect("request");
        assert_eq!(code, 200, "an in-flight request was cut off: {body}");
        assert_eq!(server_of(&body).as_deref(), Some("server-3"));
    }
    assert!(
        wait_dead(&[pid], Duration::from_secs(10)).is_empty(),
        "server-3 still runs after /rm"
    );
    let (code, body) = get(&gw.url(&format!("/home?id={id}"))).await;
    assert_eq!(code, 200);
    assert_ne!(server_of(&body).as_deref(), Some("server-3"));
}

/// A ringgate-server the test owns; killed when dropped, also when the test fails.
struct OwnBackend(std::process::Child);

impl Drop for OwnBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a ringgate-server owned by the test on `port` (0: any) and returns it with its address.
fn own_backend(name: &str, port: u16) -> (OwnBackend, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(SERVER_BIN)
        .env("SERVER_ID", name)
        .env("PORT", port.to_string())
        .env("BIND", "127.0.0.1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ringgate-server");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    let addr = ringgate::listening::parse(&line).expect("address");
    (OwnBackend(child), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_replica_that_comes_back_rejoins_after_rise_checks() {
    let (a, a_addr) = own_backend("web-a", 0);
    let (_b, b_addr) = own_backend("web-b", 0);
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"web-a\", address = \"{a_addr}\" }}, {{ name = \"web-b\", address = \"{b_addr}\" }}]\n"
        ),
        health: "interval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(10), "both up", |s| s["up"] == 2)
        .await;
    drop(a);
    gw.wait_status(Duration::from_secs(10), "web-a down", |s| {
        replica(s, "web-a")["in_ring"] == false
    })
    .await;
    // Every request is served by web-b meanwhile.
    let c = client();
    for id in 0..50u64 {
        let (code, body) = call_with(&c, "GET", &gw.url(&format!("/home?id={id}")), "", &[]).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(server_of(&body).as_deref(), Some("web-b"));
    }
    // The static provider never restarts it; when it comes back, rise good checks bring it in.
    let (_a2, _) = own_backend("web-a", a_addr.port());
    let s = gw
        .wait_status(Duration::from_secs(10), "web-a back", |s| {
            replica(s, "web-a")["state"] == "up"
        })
        .await;
    assert_eq!(s["up"], 2);
    assert_eq!(replica(&s, "web-a")["restarts"], 0);
}
