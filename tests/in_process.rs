//! The gateway as a library: started in this test process on listeners bound to 127.0.0.1:0,
//! with real `ringgate-server` replica processes, served until a shutdown future completes.
//! Two gateways run side by side in one process without sharing anything.

mod support;

use std::time::Duration;

use ringgate::config::{Config, ProviderKind};
use ringgate::gateway::{Gateway, Listeners};
use support::{
    call, get, json, metric, process_alive, server_of, wait_dead, OneConnection, SERVER_BIN,
};

fn config(count: u32, policy_dir: &std::path::Path) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    c.provider.kind = ProviderKind::Process;
    c.provider.server_binary = Some(SERVER_BIN.into());
    c.replicas.count = count;
    c.policy.dir = policy_dir.to_owned();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_run_in_one_process_and_stop_on_their_shutdown_future() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut running = Vec::new();
    for count in [2, 3] {
        let config = config(count, dir.path());
        let listeners = Listeners::bind(config.listen, 2).expect("bind 127.0.0.1:0");
        let addr = listeners.local_addr();
        assert_ne!(addr.port(), 0, "the kernel picked a port");
        let gateway = Gateway::start(config, listeners, None)
            .await
            .expect("gateway starts");
        assert_eq!(gateway.local_addr(), addr);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(gateway.serve(async move {
            let _ = stopped.await;
        }));
        running.push((addr, stop, serving));
    }

    for (addr, want) in [(running[0].0, 2), (running[1].0, 3)] {
        let (code, body) = get(&format!("http://{addr}/rep")).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(json(&body)["message"]["N"], want, "{body}");
        let (code, body) = get(&format!("http://{addr}/home?id=42")).await;
        assert_eq!(code, 200, "{body}");
        assert!(server_of(&body).is_some(), "{body}");
    }

    // An /add through the first gateway changes only the first one.
    let first = running[0].0;
    let (code, body) = call(
        "POST",
        &format!("http://{first}/add"),
        r#"{"n": 1, "hostnames": ["S5"]}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["N"], 3);
    let (_, body) = get(&format!("http://{}/rep", running[1].0)).await;
    assert_eq!(
        json(&body)["message"]["N"],
        3,
        "the other gateway is untouched"
    );

    let mut pids = Vec::new();
    for (addr, _, _) in &running {
        let (_, body) = get(&format!("http://{addr}/lb/status")).await;
        let status = json(&body);
        for r in status["message"]["replicas"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(pid) = r["instance"].as_str().and_then(|p| p.parse::<u32>().ok()) {
                assert!(process_alive(pid));
                pids.push(pid);
            }
        }
    }
    assert_eq!(pids.len(), 6, "2 + 1 added + 3 replica processes");

    for (addr, stop, serving) in running {
        stop_serving(stop, serving).await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} no longer accepts"
        );
    }
    assert!(
        wait_dead(&pids, Duration::from_secs(10)).is_empty(),
        "the replicas stopped with their gateway"
    );
}

/// The kernel spreads connections over the serving threads' `SO_REUSEPORT` sockets by a hash of
/// their addresses (40 connections over 4 threads come out 14/11/8/7 or so); the gateway hands
/// a connection accepted by a busier thread to the least busy one, so the counts stay even.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_kept_even_over_the_serving_threads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config(1, dir.path());
    let threads = 4;
    let listeners = Listeners::bind(config.listen, threads).expect("bind 127.0.0.1:0");
    let addr = listeners.local_addr();
    let gateway = Gateway::start(config, listeners, None)
        .await
        .expect("gateway starts");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async move {
        let _ = stopped.await;
    }));

    // One after the other, each served once and kept open.
    let mut open = Vec::new();
    for i in 0..40 {
        let mut conn = OneConnection::open(addr).await;
        let (code, body) = conn.get(&format!("/home?id={i}")).await;
        assert_eq!(code, 200, "{body}");
        open.push(conn);
    }
    // The 41st connection asks for the counts.
    let (code, text) = get(&format!("http://{addr}/lb/metrics")).await;
    assert_eq!(code, 200, "{text}");
    let counts = per_thread(&text, threads);
    assert_eq!(counts.iter().sum::<f64>(), 41.0, "{counts:?}");
    let (least, most) = counts
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, m), &n| (l.min(n), m.max(n)));
    assert!(most - least <= 1.0, "uneven: {counts:?}");

    // Closed connections leave the counts.
    drop(open);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(&format!("http://{addr}/lb/metrics")).await;
        let total: f64 = per_thread(&text, threads).iter().sum();
        if total <= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{total} connections still counted after all were closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop_serving(stop, serving).await;
}

type Serving = tokio::task::JoinHandle<Result<(), ringgate::gateway::StartError>>;

/// Fires a gateway's shutdown and waits, bounded, for `serve` to return cleanly.
async fn stop_serving(stop: tokio::sync::oneshot::Sender<()>, serving: Serving) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("serve returns after shutdown")
        .expect("serve task")
        .expect("clean stop");
}

/// `ringgate_serving_thread_connections` of each of `threads` serving threads in `metrics`.
fn per_thread(metrics: &str, threads: usize) -> Vec<f64> {
    (0..threads)
        .map(|t| {
            metric(
                metrics,
                &format!("ringgate_serving_thread_connections{{thread=\"{t}\"}}"),
            )
        })
        .collect()
}
