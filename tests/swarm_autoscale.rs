//! Two gateways autoscaling one ring on the real single-node Docker Swarm (initialised here when
//! the engine is in none, and left again afterwards only then): each publishes its own
//! autoscaler's N in the ring record; N follows the largest live proposal and falls only when
//! both propose less, so the two never fight.
//!
//! The load is real: clients through each gateway ask `ringgate-server` for `/home?work_ms=300`
//! (simulated work), so each gateway counts the requests it has in flight at the replicas. The
//! windows are short (stable 6 s, panic 2 s, scale-down delay 8 s) so the test takes about a
//! minute and a half. Then B alone takes N up again (up takes the largest proposal) and is
//! killed: its proposal holds N until it is older than the bound, then N falls on A's alone.
//! The ring (services, network) is removed when the test ends, also when it fails;
//! the gateways are host processes, killed first. Without an engine or a swarm the test says
//! it is skipped, loudly, and fails instead under `RINGGATE_REQUIRE_ENGINES=1` (CI).

// support/docker.rs brings `engines.rs` along as support does.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
#[macro_use]
#[path = "support/swarm.rs"]
mod swarm_support;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use support::{in_ring, GatewayProcess};
use swarm_support::{start_gateway, Ring};

/// Clients per gateway, each with one request of `WORK_MS` in flight at a time: about 6 in
/// flight per gateway, 3 replicas' worth at `target_in_flight = 2`.
const CLIENTS: usize = 6;
const WORK_MS: u64 = 300;

const SECTIONS: &str = "[replicas]\ncount = 1\nmax_replicas = 6\n\
    [autoscale]\nenabled = true\nmin = 1\nmax = 4\ntarget_in_flight = 2.0\n\
    stable_window = \"6s\"\npanic_window = \"2s\"\nscale_down_delay = \"8s\"\nmax_step = 4\n";

/// Clients sending `/home?work_ms=…` through one gateway until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_failure: Arc<std::sync::Mutex<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &GatewayProcess, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let last_failure = Arc::new(std::sync::Mutex::new(String::new()));
        let tasks = (0..CLIENTS as u64)
            .map(|c| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let last_failure = last_failure.clone();
                let base = gw.url("/home");
                tokio::spawn(async move {
                    let client = support::client();
                    let mut k = seed * 1_000_000 + c * 10_000;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        let url = format!("{base}?id={k}&work_ms={WORK_MS}");
                        match get(&client, &url).await {
                            Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                *last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                                    format!("{url}: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            last_failure,
            tasks,
        }
    }

    /// Stops the clients; returns (answered 200, failed, the last failure).
    async fn stop(self) -> (u64, u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let last = self
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            last,
        )
    }
}

async fn get(client: &support::TestClient, url: &str) -> Result<u16, String> {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(15), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// What a gateway's status says of the agreement: (members, agreed N, its own proposal, the
/// other gateway's proposal).
fn agreement(s: &Value, me: &str, other: &str) -> (usize, Option<u64>, Option<u64>, Option<u64>) {
    let a = &s["autoscale"]["agreement"];
    let proposal = |who: &str| {
        a["proposals"].as_array().and_then(|ps| {
            ps.iter()
                .find(|p| {
                    p["live"] == true
                        && p["gateway"]
                            .as_str()
                            .is_some_and(|g| g.starts_with(&format!("{who}/")))
                })
                .and_then(|p| p["n"].as_u64())
        })
    };
    (
        in_ring(s).len(),
        a["agreed"].as_u64(),
        proposal(me),
        proposal(other),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_agree_on_n_under_the_same_load_and_fall_only_when_both_do() {
    let _swarm = require_swarm!();
    swarm_support::ensure_server_image_checks();
    let ring = Ring::new("autoscale");
    let a = start_gateway(&ring, "gw-a", SECTIONS);
    let b = start_gateway(&ring, "gw-b", SECTIONS);
    for gw in [&a, &b] {
        gw.wait_status(Duration::from_secs(60), "one replica routed", |s| {
            in_ring(s).len() == 1
        })
        .await;
    }
    let t0 = Instant::now();

    // The same load through both: each proposes 3, N goes to 3.
    let load_a = Load::start(&a, 1);
    let load_b = Load::start(&b, 2);
    for (gw, me, other) in [(&a, "gw-a", "gw-b"), (&b, "gw-b", "gw-a")] {
        gw.wait_status(Duration::from_secs(60), "N = 3 agreed and routed", |s| {
            let (members, agreed, mine, theirs) = agreement(s, me, other);
            members == 3 && agreed == Some(3) && mine == Some(3) && theirs == Some(3)
        })
        .await;
    }
    let up = t0.elapsed();
    // Neither fights the other: N holds at 3 on both while the load holds.
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(6) {
        for (gw, me, other) in [(&a, "gw-a", "gw-b"), (&b, "gw-b", "gw-a")] {
            let s = gw.status().await;
            let (members, agreed, _, _) = agreement(&s, me, other);
            assert_eq!((members, agreed), (3, Some(3)), "{me} under steady load");
        }
        assert_eq!(ring.services().len(), 3, "three replica services");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The load through A stops: A proposes less after its windows, B still 3: N holds.
    let (ok_a, failed_a, last_a) = load_a.stop().await;
    let a_less = a
        .wait_status(Duration::from_secs(40), "A proposes less than 3", |s| {
            agreement(s, "gw-a", "gw-b").2.is_some_and(|n| n < 3)
        })
        .await;
    let a_less_at = t0.elapsed();
    let (members, agreed, mine, theirs) = agreement(&a_less, "gw-a", "gw-b");
    assert_eq!(
        (members, agreed, theirs),
        (3, Some(3), Some(3)),
        "B's larger proposal holds N: A proposes {mine:?}"
    );
    let holding = Instant::now();
    while holding.elapsed() < Duration::from_secs(5) {
        for (gw, me, other) in [(&a, "gw-a", "gw-b"), (&b, "gw-b", "gw-a")] {
            let s = gw.status().await;
            let (members, agreed, _, _) = agreement(&s, me, other);
            assert_eq!(
                (members, agreed),
                (3, Some(3)),
                "{me}: N falls only once both agree"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The load through B stops too: both propose 1, N falls to 1 and the others are removed.
    let (ok_b, failed_b, last_b) = load_b.stop().await;
    for (gw, me, other) in [(&a, "gw-a", "gw-b"), (&b, "gw-b", "gw-a")] {
        gw.wait_status(Duration::from_secs(60), "N back to 1", |s| {
            let (members, agreed, mine, theirs) = agreement(s, me, other);
            members == 1 && agreed == Some(1) && mine == Some(1) && theirs == Some(1)
        })
        .await;
    }
    let down_at = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ring.services().len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the removed replicas' services are deleted: {:?}",
            ring.services()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        failed_a + failed_b,
        0,
        "no failed request: {last_a} {last_b}"
    );
    for gw in [&a, &b] {
        assert!(!gw.log().contains("panicked"), "gateway log:\n{}", gw.log());
    }

    // Load through B alone: B proposes 3, A 1; up takes the largest.
    let load_b = Load::start(&b, 3);
    a.wait_status(
        Duration::from_secs(60),
        "N = 3 on B's proposal alone",
        |s| {
            let (members, agreed, mine, theirs) = agreement(s, "gw-a", "gw-b");
            members == 3 && agreed == Some(3) && mine == Some(1) && theirs == Some(3)
        },
    )
    .await;
    // B dies (SIGKILL: nothing is cleaned up) still proposing 3. Its proposal holds N until
    // it is older than the bound (15 s after B last wrote it, at most 5 s before it died);
    // then A's 1 alone counts and N falls.
    let (ok_b2, failed_b2, _) = load_b.stop().await;
    b.signal("KILL");
    let killed = Instant::now();
    let stale_after = loop {
        let s = a.status().await;
        let (members, _, _, theirs) = agreement(&s, "gw-a", "gw-b");
        if theirs.is_none() {
            break killed.elapsed();
        }
        assert_eq!(members, 3, "B's proposal still counts: N holds\n{s:#}");
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "B's proposal never went stale\n{s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stale_after >= Duration::from_secs(9),
        "B's proposal expired {stale_after:?} after B died: sooner than the bound allows"
    );
    a.wait_status(Duration::from_secs(30), "N = 1 on A's proposal", |s| {
        let (members, agreed, mine, _) = agreement(s, "gw-a", "gw-b");
        members == 1 && agreed == Some(1) && mine == Some(1)
    })
    .await;
    let fallen_after = killed.elapsed();
    eprintln!(
        "two gateways on swarm: N 1 -> 3 agreed after {up:?}; A proposed less at {a_less_at:?} \
         with N held at B's 3; N back to 1 at {down_at:?}; requests through A {ok_a} ok / \
         {failed_a} failed, through B {ok_b} ok / {failed_b} failed; then B alone ({ok_b2} ok / \
         {failed_b2} failed) took N to 3, B killed: its proposal stale after {stale_after:?}, \
         N back to 1 after {fallen_after:?}"
    );
    assert_eq!(failed_b2, 0, "no failed request through B alone");
}
