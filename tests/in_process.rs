//! The gateway as a library: started in this test process on listeners bound to 127.0.0.1:0,
//! with real `ringgate-server` replica processes, served until a shutdown future completes.
//! Two gateways run side by side in one process without sharing anything.

mod support;

use std::time::Duration;

use ringgate::config::{Config, ProviderKind};
use ringgate::gateway::{Gateway, Listeners};
use support::{call, get, json, process_alive, server_of, wait_dead, SERVER_BIN};

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
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
            .expect("clean stop");
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
