//! Live policies and live config: files dropped into the policy directory and edits of the
//! config file, applied while the gateway serves.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

fn policy_dir(gw: &GatewayProcess) -> PathBuf {
    gw.dir.path().join("policies")
}

/// Polls until `pred` holds for the owners of `ids`; returns how long it took.
async fn wait_routing(
    gw: &GatewayProcess,
    ids: std::ops::Range<u64>,
    what: &str,
    pred: impl Fn(&HashMap<u64, String>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let o = gw.owners(ids.clone()).await;
        if pred(&o) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "routing never changed: {what}; owners {o:?}\nstatus {:#}",
            gw.status().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn conf() -> Conf {
    Conf {
        policy: "instruction_budget = 100000\nmemory_limit = \"4MiB\"\n".into(),
        ..Conf::default()
    }
}

/// Every request to slot 0, which server-1 owns (its first virtual node sits at Φ(1,0) = 26).
const ALL_TO_SERVER_1: &str = "function request_hash(i, slots) return 0 end\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_policy_takes_over_under_traffic_and_removing_it_restores_defaults() {
    let gw = GatewayProcess::start(&conf());
    let before = gw.owners(0..60).await;
    assert!(
        before.values().any(|s| s != "server-1"),
        "defaults spread the ids"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (url, stop) = (gw.url(""), stop.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut failed = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (code, body) = call_with(
                    &c,
                    "GET",
                    &format!("{url}/home?id={}", (w * 1000 + n) % 500),
                    "",
                    &[],
                )
                .await;
                if code != 200 {
                    failed.push(format!("{code} {body}"));
                }
            }
            (n, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(policy_dir(&gw).join("10-route.lua"), ALL_TO_SERVER_1).expect("write policy");
    let took = wait_routing(&gw, 0..60, "all to server-1", |o| {
        o.values().all(|s| s == "server-1")
    })
    .await;
    eprintln!("policy in force after {took:?}");
    let status = gw.status().await;
    assert_eq!(
        status["policy"]["files"],
        serde_json::json!(["10-route.lua"])
    );
    assert_eq!(status["policy"]["hooks"]["request_hash"]["defined"], true);

    std::fs::remove_file(policy_dir(&gw).join("10-route.lua")).expect("remove policy");
    wait_routing(&gw, 0..60, "defaults back", |o| *o == before).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (n, failed) = w.await.expect("worker");
        assert!(
            failed.is_empty(),
            "requests failed across the switch: {failed:?}"
        );
        total += n;
    }
    assert!(total > 50, "too little traffic: {total}");
    assert_eq!(gw.status().await["policy"]["files"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policies_never_break_serving() {
    let gw = GatewayProcess::start(&conf());
    let defaults = gw.owners(0..30).await;
    let dir = policy_dir(&gw);

    // Hooks that fail when called: each call falls back to the default and is counted.
    let failing_hooks = [
        ("raises", "function request_hash(i, slots) error('boom') end"),
        ("loops", "function request_hash(i, slots) while true do end end"),
        ("allocates", "function request_hash(i, slots) local t = {} while true do t[#t+1] = string.rep('x', 100000) end end"),
        ("escapes", "function request_hash(i, slots) os.execute('touch /tmp/ringgate-pwned') return 1 end"),
        ("reads", "function request_hash(i, slots) return io.open('/etc/passwd'):read('a') end"),
        ("wrong_type", "function request_hash(i, slots) return 'slot seven' end"),
    ];
    for (name, code) in failing_hooks {
        let before_errors = gw.status().await["policy"]["hooks"]["request_hash"]["errors"]
            .as_u64()
            .unwrap_or(0);
        std::fs::write(dir.join("50-hook.lua"), code).expect("write");
        gw.wait_status(Duration::from_secs(10), &format!("{name} loaded"), |s| {
            s["policy"]["hooks"]["request_hash"]["defined"] == true
                && s["policy"]["generation"].as_u64() > Some(1)
        })
        .await;
        // Served, on the default routing.
        let now = gw.owners(0..30).await;
        assert_eq!(
            now, defaults,
            "{name}: a failing hook must fall back to the default"
        );
        let s = gw.status().await;
        let errors = s["policy"]["hooks"]["request_hash"]["errors"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            errors >= before_errors + 30,
            "{name}: failures not counted ({before_errors} -> {errors})"
        );
        assert!(
            s["policy"]["last_hook_error"]["message"].as_str().is_some(),
            "{name}: {s:#}"
        );
        std::fs::remove_file(dir.join("50-hook.lua")).expect("remove");
        gw.wait_status(Duration::from_secs(10), "policy removed", |s| {
            s["policy"]["files"] == serde_json::json!([])
        })
        .await;
    }
    assert!(
        !std::path::Path::new("/tmp/ringgate-pwned").exists(),
        "os.execute escaped the sandbox"
    );

    // Sets that fail to load are rejected whole; the last good one stays.
    std::fs::write(dir.join("10-good.lua"), ALL_TO_SERVER_1).expect("write");
    wait_routing(&gw, 0..30, "good policy", |o| {
        o.values().all(|s| s == "server-1")
    })
    .await;
    let bad_sets = [
        (
            "syntax",
            "function request_key(req) return req.path\n  if then\nend\n",
            "20-bad.lua",
        ),
        ("top-level os", "os.execute('true')\n", "20-bad.lua"),
        ("top-level loop", "while true do end\n", "20-bad.lua"),
        ("require", "local x = require('socket')\n", "20-bad.lua"),
    ];
    for (name, code, file) in bad_sets {
        std::fs::write(dir.join(file), code).expect("write");
        let s = gw
            .wait_status(Duration::from_secs(10), &format!("{name} rejected"), |s| {
                s["policy"]["last_load_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(file))
            })
            .await;
        assert_eq!(
            s["policy"]["files"],
            serde_json::json!(["10-good.lua"]),
            "{name}: the last good set stays"
        );
        let now = gw.owners(0..30).await;
        assert!(
            now.values().all(|s| s == "server-1"),
            "{name}: routing changed"
        );
        std::fs::remove_file(dir.join(file)).expect("remove");
        gw.wait_status(Duration::from_secs(10), "error cleared", |s| {
            s["policy"]["last_load_error"].is_null()
        })
        .await;
    }
    let (_, metrics) = get(&gw.url("/lb/metrics")).await;
    assert!(
        metrics.contains("ringgate_policy_hook_errors_total{hook=\"request_hash\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("ringgate_policy_reload_errors_total 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_edits_apply_live_and_invalid_ones_change_nothing() {
    let base = conf();
    let gw = GatewayProcess::start(&base);
    let path = gw.config_path.clone();
    let original = std::fs::read_to_string(&path).expect("config");

    // vnodes changed: the ring is rebuilt with 4 virtual nodes per server.
    let edited = original.replace("[ring]\n", "[ring]\nvnodes = 4\n");
    std::fs::write(&path, &edited).expect("write");
    let s = gw
        .wait_status(Duration::from_secs(10), "vnodes = 4", |s| {
            s["ring"]["vnodes"] == 4
        })
        .await;
    for r in s["replicas"].as_array().expect("replicas") {
        assert_eq!(r["slots"].as_array().map(Vec::len), Some(4), "{r}");
    }

    // replicas.count changed: N follows, up and down.
    let edited = edited.replace("[replicas]\n", "[replicas]\ncount = 5\n");
    std::fs::write(&path, &edited).expect("write");
    gw.wait_status(Duration::from_secs(20), "N = 5", |s| s["up"] == 5)
        .await;
    assert_eq!(gw.replica_names().await.len(), 5);
    let edited = edited.replace("count = 5", "count = 2");
    std::fs::write(&path, &edited).expect("write");
    gw.wait_status(Duration::from_secs(20), "N = 2", |s| {
        s["desired"] == 2 && s["replicas"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(gw.replica_names().await, vec!["server-1", "server-2"]);

    // A TOML syntax error and an invalid value: nothing changes, the error is visible.
    let generation = gw.status().await["generation"].clone();
    std::fs::write(&path, format!("{edited}\n[ring\n")).expect("write");
    let s = gw
        .wait_status(Duration::from_secs(10), "syntax error reported", |s| {
            s["config"]["last_error"].as_str().is_some()
        })
        .await;
    assert!(
        s["config"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("line"),
        "{s:#}"
    );
    assert_eq!(s["ring"]["vnodes"], 4);
    assert_eq!(s["generation"], generation, "nothing was republished");
    std::fs::write(&path, edited.replace("vnodes = 4", "vnodes = 0")).expect("write");
    let s = gw
        .wait_status(Duration::from_secs(10), "invalid value reported", |s| {
            s["config"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("ring.vnodes"))
        })
        .await;
    assert_eq!(s["ring"]["vnodes"], 4);
    assert_eq!(gw.replica_names().await.len(), 2);

    // listen changes need a restart and say so; the rest of the edit applies.
    std::fs::write(
        &path,
        edited
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
            .replace("vnodes = 4", "vnodes = 5"),
    )
    .expect("write");
    let s = gw
        .wait_status(Duration::from_secs(10), "restart needed", |s| {
            s["config"]["restart_needed"] == serde_json::json!(["listen"])
        })
        .await;
    assert_eq!(s["ring"]["vnodes"], 5);
    assert!(s["config"]["last_error"].is_null());
    let (code, _) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 200);
}
