//! Autoscaling end to end: the real gateway binary with process replicas, driven by real
//! concurrent clients whose requests carry simulated work (`/home?work_ms=`), so the replicas'
//! requests in flight are what the autoscaler sees. N goes up under load and back down after
//! `scale_down_delay`, no request fails, and only the keys of added or removed replicas move.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// Simulated work per request: each busy client keeps about one request in flight.
const WORK_MS: u64 = 100;

fn toml() -> String {
    let conf = Conf {
        replicas: "count = 2\nmax_replicas = 8\n".into(),
        health: "interval = \"250ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 2\n".into(),
        proxy: "drain_timeout = \"5s\"\n".into(),
        ..Conf::default()
    };
    // Short windows so the test takes seconds: 2 in flight per replica is the target.
    format!(
        "{}\n[autoscale]\nenabled = true\nmin = 2\nmax = 4\ntarget_in_flight = 2.0\n\
         stable_window = \"4s\"\npanic_window = \"1s\"\nscale_down_delay = \"5s\"\nmax_step = 2\n",
        conf.render()
    )
}

/// Closed-loop clients: client `i` sends requests while `i < busy`; every answer that is not a
/// 200 is a failure.
struct Load {
    busy: Arc<AtomicUsize>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &GatewayProcess, clients: usize) -> Load {
        let busy = Arc::new(AtomicUsize::new(0));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = (0..clients)
            .map(|i| {
                let (busy, ok, failed) = (busy.clone(), ok.clone(), failed.clone());
                let base = gw.url("/home");
                tokio::spawn(async move {
                    let c = client();
                    let mut n = 0u64;
                    loop {
                        if i >= busy.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        n += 1;
                        let url = format!("{base}?id={}&work_ms={WORK_MS}", i as u64 * 100_000 + n);
                        let (code, _) = call_with(&c, "GET", &url, "", &[]).await;
                        let counter = if code == 200 { &ok } else { &failed };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            busy,
            ok,
            failed,
            tasks,
        }
    }

    fn set(&self, clients: usize) {
        self.busy.store(clients, Ordering::Relaxed);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn members(status: &serde_json::Value) -> HashSet<String> {
    support::in_ring(status).into_iter().collect()
}

/// N in the ring and as the autoscaler asks, both equal to `n`.
async fn wait_n(gw: &GatewayProcess, n: u64, within: Duration) -> serde_json::Value {
    gw.wait_status(within, &format!("N = {n}"), |s| {
        s["autoscale"]["desired"] == n
            && s["up"] == n
            && s["replicas"].as_array().map(|a| a.len() as u64) == Some(n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_follows_real_load_up_and_down_without_a_failed_request() {
    let gw = GatewayProcess::start_toml(&toml());
    wait_n(&gw, 2, Duration::from_secs(30)).await;
    let load = Load::start(&gw, 8);

    // Two busy clients: within the target for two replicas, N holds at min.
    load.set(2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let low = gw.status().await;
    assert_eq!(low["up"], 2, "{:#}", low["autoscale"]);
    let before = members(&low);
    let owners_low = gw.owners(0..200).await;

    // Eight: four replicas' worth.
    load.set(8);
    let high = wait_n(&gw, 4, Duration::from_secs(60)).await;
    let decision = &high["autoscale"]["last_decision"];
    assert_eq!(decision["direction"], "up", "{decision}");
    let added: HashSet<String> = members(&high).difference(&before).cloned().collect();
    assert_eq!(added.len(), 2, "{:#}", high["replicas"]);
    let owners_high = gw.owners(0..200).await;
    for (id, owner) in &owners_high {
        assert!(
            owner == &owners_low[id] || added.contains(owner),
            "key {id} moved from {} to {owner}, not an added replica",
            owners_low[id]
        );
    }

    // Back to two: N falls once the lower load has held for scale_down_delay.
    load.set(2);
    let down = wait_n(&gw, 2, Duration::from_secs(90)).await;
    assert_eq!(down["autoscale"]["last_decision"]["direction"], "down");
    let after = members(&down);
    let removed: HashSet<String> = members(&high).difference(&after).cloned().collect();
    let owners_after = gw.owners(0..200).await;
    for (id, owner) in &owners_after {
        let was = &owners_high[id];
        assert!(
            owner == was || removed.contains(was),
            "key {id} moved from {was} to {owner} though {was} stays"
        );
    }
    load.set(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = (
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    assert!(ok > 100, "the load ran: {ok} answers");
    assert_eq!(failed, 0, "{failed} failed requests of {}", ok + failed);

    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "ringgate_autoscale_decisions_total{direction=\"up\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &metrics,
            "ringgate_autoscale_decisions_total{direction=\"down\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&metrics, "ringgate_autoscale_desired"), 2.0);
    let log = gw.log();
    let decisions: HashMap<&str, usize> = ["direction=Up", "direction=Down"]
        .into_iter()
        .map(|d| (d, log.matches(d).count()))
        .collect();
    assert!(
        log.contains("autoscale removes the least loaded replica"),
        "{decisions:?}\n{log}"
    );
    eprintln!(
        "added {added:?}, removed {removed:?}, {ok} answers, 0 failed, decisions {decisions:?}"
    );
}
