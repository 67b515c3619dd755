//! Balancing beyond the ring (issue 13) against the real gateway binary: bounded loads with a
//! hot key, outlier ejection on 5xx answers, slow start of a replacement, key fallbacks, check
//! expectations, and bad values of all of them refused live.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::backends::{Backend, Behaviour};
use support::*;

fn servers(backends: &[&Backend]) -> String {
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{{ name = \"b{}\", address = \"{}\" }}", i + 1, b.addr))
        .collect();
    format!("servers = [{}]\n", list.join(", "))
}

async fn hot_key_burst(gw: &GatewayProcess, n: usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = gw.url("/x?id=7");
        tasks.push(tokio::spawn(async move { get(&url).await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("joined"), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_loads_spread_a_hot_key_and_off_it_stays_on_its_owner() {
    let answer = Behaviour::Answer { delay_ms: 300 };
    let b = [
        Backend::start("127.0.0.1", answer).await,
        Backend::start("127.0.0.1", answer).await,
        Backend::start("127.0.0.1", answer).await,
    ];
    let conf = |factor: &str| Conf {
        kind: Some("static".into()),
        provider: servers(&[&b[0], &b[1], &b[2]]),
        ring: format!(
            "request_hash = \"mix64\"\nvnode_hash = \"mix64\"\nbalance_factor = {factor}\n"
        ),
        ..Conf::default()
    };
    let hits = |b: &[Backend; 3]| -> Vec<usize> { b.iter().map(Backend::hits).collect() };

    let gw = GatewayProcess::start(&conf("0.0"));
    gw.wait_status(Duration::from_secs(10), "up", |s| s["up"] == 3)
        .await;
    hot_key_burst(&gw, 30).await;
    let off = hits(&b);
    assert_eq!(
        off.iter().filter(|&&h| h > 0).count(),
        1,
        "one owner takes a hot key: {off:?}"
    );
    drop(gw);
    for x in &b {
        x.reset_peak();
    }

    let gw = GatewayProcess::start(&conf("1.25"));
    gw.wait_status(Duration::from_secs(10), "up", |s| s["up"] == 3)
        .await;
    hot_key_burst(&gw, 30).await;
    let on: Vec<usize> = hits(&b).iter().zip(&off).map(|(a, o)| a - o).collect();
    assert!(
        on.iter().all(|&h| h > 0),
        "30 concurrent requests of one key spread: {on:?}"
    );
    // ⌈1.25 · 30 / 3⌉ = 13: no server carried more at once.
    let peaks: Vec<usize> = b
        .iter()
        .map(|x| x.peak.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert!(
        peaks.iter().all(|&p| p <= 13),
        "peaks {peaks:?}, requests {on:?}, before {off:?}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, "ringgate_diverted_total{reason=\"load\"}") >= 10.0,
        "{metrics}"
    );
    assert_eq!(gw.status().await["ring"]["balance_factor"], 1.25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answering_5xx_is_ejected_not_replaced_and_returns() {
    let answer = Behaviour::Answer { delay_ms: 0 };
    let b = [
        Backend::start("127.0.0.1", answer).await,
        Backend::start("127.0.0.1", answer).await,
        Backend::start("127.0.0.1", answer).await,
    ];
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: servers(&[&b[0], &b[1], &b[2]]),
        ring: "request_hash = \"mix64\"\nvnode_hash = \"mix64\"\n".into(),
        health: "interval = \"500ms\"\neject_after_5xx = 3\neject_time = \"1s\"\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(10), "up", |s| s["up"] == 3)
        .await;
    let (_, owner) = get(&gw.url("/x?id=1")).await;
    let bad = b
        .iter()
        .position(|x| x.addr.to_string() == owner)
        .expect("a backend answered");
    let name = format!("b{}", bad + 1);
    b[bad].set_status(500);
    for _ in 0..3 {
        assert_eq!(
            get(&gw.url("/x?id=1")).await.0,
            500,
            "5xx answers pass through"
        );
    }
    let s = gw
        .wait_status(Duration::from_secs(2), "ejected", |s| {
            replica(s, &name)["state"] == "ejected"
        })
        .await;
    assert_eq!(replica(&s, &name)["in_ring"], false);
    let (code, other) = get(&gw.url("/x?id=1")).await;
    assert_eq!(code, 200, "the next server clockwise answers");
    assert_ne!(other, owner);
    b[bad].set_status(200);
    gw.wait_status(Duration::from_secs(10), "back", |s| {
        replica(s, &name)["in_ring"] == true
    })
    .await;
    assert_eq!(
        get(&gw.url("/x?id=1")).await.1,
        owner,
        "the key is back with its owner"
    );
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "ringgate_outlier_ejections_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_takes_its_keys_over_gradually_and_each_moves_once() {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 2\n".into(),
        ring: "request_hash = \"mix64\"\nvnode_hash = \"mix64\"\n".into(),
        health: "interval = \"500ms\"\nslow_start = \"4s\"\nrecovery_delay = \"500ms\"\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(20), "two up", |s| s["up"] == 2)
        .await;
    let keys = 0..300u64;
    let before = gw.owners(keys.clone()).await;
    let theirs: Vec<u64> = keys.clone().filter(|k| before[k] == "server-2").collect();
    assert!(theirs.len() > 50, "server-2 owns a share: {}", theirs.len());
    let pid = replica(&gw.status().await, "server-2")["instance"]
        .as_str()
        .and_then(|p| p.parse::<u32>().ok())
        .expect("a pid");
    signal(pid, "KILL");
    gw.wait_status(Duration::from_secs(10), "replaced and ramping", |s| {
        replica(s, "server-2")["in_ring"] == true
            && replica(s, "server-2")["ramp_progress"].is_number()
    })
    .await;
    // Sample server-2's keys through the ramp: each moves back to server-2 at most once.
    let mut history: HashMap<u64, Vec<String>> = HashMap::new();
    let mut shares = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let now = gw.owners(0..300).await;
        let on_new = theirs.iter().filter(|k| now[k] == "server-2").count();
        shares.push(on_new);
        for k in keys.clone() {
            let h = history.entry(k).or_default();
            if h.last() != Some(&now[&k]) {
                h.push(now[&k].clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for (k, h) in &history {
        assert!(
            h.len() <= 2,
            "key {k} changed owner more than once during the ramp: {h:?}"
        );
        if h.len() == 2 {
            assert_eq!(
                h[1], "server-2",
                "key {k} moved away from the new replica: {h:?}"
            );
        }
        if before[k] == "server-1" {
            assert_eq!(
                h,
                &vec!["server-1".to_string()],
                "server-1's own key {k} never moved"
            );
        }
    }
    let first = shares.first().copied().unwrap_or(0);
    let last = shares.last().copied().unwrap_or(0);
    assert!(
        first < theirs.len() / 2,
        "early in the ramp most keys stay put: {shares:?}"
    );
    assert_eq!(
        last,
        theirs.len(),
        "after the window server-2 has all its keys: {shares:?}"
    );
    assert!(
        shares.iter().any(|&s| s > first && s < theirs.len()),
        "keys moved gradually: {shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_fallbacks_check_expectations_and_bad_values_refused_live() {
    let b = [
        Backend::start("127.0.0.1", Behaviour::Echo).await,
        Backend::start("127.0.0.1", Behaviour::Echo).await,
        Backend::start("127.0.0.1", Behaviour::Echo).await,
    ];
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: servers(&[&b[0], &b[1], &b[2]]),
        ring: "request_hash = \"mix64\"\nvnode_hash = \"mix64\"\n".into(),
        hashing: "key = [\"header:x-user\", \"cookie:session\", \"client_ip\"]\n".into(),
        health: "interval = \"300ms\"\npath = \"/healthz\"\nexpect_status = [204, \"300-399\"]\n"
            .into(),
        ..Conf::default()
    });
    gw.wait_status(
        Duration::from_secs(10),
        "up by /healthz answering 204",
        |s| s["up"] == 3,
    )
    .await;
    let c = client();
    let hits = |b: &[Backend; 3]| -> Vec<usize> { b.iter().map(Backend::hits).collect() };
    // Which backend one request reached.
    async fn went(c: &TestClient, url: &str, headers: &[(&str, &str)], b: &[Backend; 3]) -> usize {
        let before: Vec<usize> = b.iter().map(Backend::hits).collect();
        let (code, _) = call_with(c, "GET", url, "", headers).await;
        assert_eq!(code, 200);
        (0..3)
            .find(|&i| b[i].hits() > before[i])
            .expect("one backend answered")
    }
    let url = gw.url("/x");
    let mut used = std::collections::BTreeSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let by_header = went(&c, &url, &[("x-user", user)], &b).await;
        let cookie = format!("session={user}");
        let by_cookie = went(&c, &url, &[("cookie", &cookie)], &b).await;
        assert_eq!(
            by_header, by_cookie,
            "{user}: the same key from the header or the cookie"
        );
        // The header comes first in the list.
        let both = went(
            &c,
            &url,
            &[("x-user", user), ("cookie", "session=zzz-other")],
            &b,
        )
        .await;
        assert_eq!(both, by_header, "{user}: the header wins over the cookie");
        used.insert(by_header);
    }
    assert!(
        used.len() >= 2,
        "different keys reach different backends: {used:?}"
    );
    // Neither: the client's address is the key, the same every time.
    let by_ip: Vec<usize> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(went(&c, &url, &[], &b).await);
        }
        v
    };
    assert!(by_ip.windows(2).all(|w| w[0] == w[1]), "{by_ip:?}");
    let _ = hits(&b);

    // Bad values in a live edit change nothing and name their key.
    let base = std::fs::read_to_string(&gw.config_path).expect("config");
    let keys = "key = [\"header:x-user\", \"cookie:session\", \"client_ip\"]";
    for (old, new, key) in [
        (
            "vnode_hash = \"mix64\"",
            "vnode_hash = \"mix64\"\nbalance_factor = 0.5",
            "ring.balance_factor",
        ),
        (
            "expect_status = [204, \"300-399\"]",
            "expect_status = \"299-200\"",
            "expect_status",
        ),
        (keys, "key = []", "hashing.key"),
        (keys, "key = [\"query:id\", \"nope\"]", "nope"),
        (
            "path = \"/healthz\"",
            "path = \"/healthz\"\neject_failure_percent = -5",
            "eject_failure_percent",
        ),
    ] {
        assert!(base.contains(old), "{old} in {base}");
        let text = base.replacen(old, new, 1);
        let edit = new;
        let tmp = gw.config_path.with_extension("tmp");
        std::fs::write(&tmp, &text).expect("write");
        std::fs::rename(&tmp, &gw.config_path).expect("rename");
        let s = gw
            .wait_status(Duration::from_secs(5), "the edit rejected", |s| {
                s["config"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(key))
            })
            .await;
        assert_eq!(s["ring"]["balance_factor"], 0.0, "{edit}");
        assert_eq!(s["up"], 3);
    }
    // A valid edit of the expectation applies live: 204 no longer passes, the checks fail.
    let text = base.replace("expect_status = [204, \"300-399\"]", "expect_status = 200");
    let tmp = gw.config_path.with_extension("tmp");
    std::fs::write(&tmp, &text).expect("write");
    std::fs::rename(&tmp, &gw.config_path).expect("rename");
    gw.wait_status(Duration::from_secs(10), "checks fail on 204", |s| {
        s["up"] == 0
    })
    .await;
}
