//! The operator page in a real browser: headless Chromium, driven over the DevTools protocol,
//! loads `/lb/` from a live gateway with process replicas. The ring and the replica table must
//! be drawn from the live `/lb/status`, an `/add` must show within 2 s, and the what-if panel
//! must answer what `/lb/simulate` answers. A screenshot lands in `target/operator-page.png`
//! (and in `docs/img/` with `RINGGATE_UPDATE_DOCS_SCREENSHOT=1`).

// support/python.rs and the Docker or Chromium support each bring `engines.rs` along.
#![allow(clippy::duplicate_mod)]

#[path = "support/chromium.rs"]
mod chromium;
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Steady traffic with random keys until `stop` is set, so the page has rates to show.
fn traffic(gw: &GatewayProcess, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let base = gw.url("/home?id=");
    tokio::spawn(async move {
        let c = client();
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let id = 100_000 + (n * 7919) % 900_000;
            let _ = call_with(&c, "GET", &format!("{base}{id}"), "", &[]).await;
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    })
}

fn as_strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the page should show of `status`: slot owners as the cells' `data-owner` strings.
fn owner_strings(status: &Value) -> Vec<String> {
    status["ring"]["owners"]
        .as_array()
        .expect("owners")
        .iter()
        .map(|o| o.as_u64().map(|n| n.to_string()).unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_the_live_ring_and_answers_what_if() {
    let Some(chromium_binary) = chromium::require() else {
        return;
    };
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 3\nmax_replicas = 8\n".into(),
        ..Conf::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&gw, stop.clone());
    let page_url = gw.url("/lb/");

    let mut b = tokio::task::block_in_place(|| {
        let mut b = chromium::Browser::start(&chromium_binary, 1400, 1050);
        b.open(&page_url);
        b.wait_for(
            "the ring and three replica rows",
            Duration::from_secs(20),
            "document.querySelectorAll('#ring .cell').length === 512 && \
             document.querySelectorAll('#replicas tbody tr').length === 3",
        );
        b
    });

    // The ring and the table are the live status: every slot's owner, every replica's
    // virtual nodes, names and states. The owners are stable while nothing changes, so the
    // page's drawing and the status read after it must agree exactly.
    let status = gw.status().await;
    let (cells, marks, rows) = tokio::task::block_in_place(|| {
        b.wait_for(
            "the page to draw the status' generation",
            Duration::from_secs(10),
            &format!(
                "document.querySelector('#ring').dataset.generation === '{}'",
                status["generation"]
            ),
        );
        (
            b.eval("[...document.querySelectorAll('#ring .cell')].map(c => c.dataset.owner)"),
            b.eval("[...document.querySelectorAll('#ring .vnode')].map(v => v.dataset.replica + '@' + v.dataset.slot)"),
            b.eval("[...document.querySelectorAll('#replicas tbody tr')].map(r => r.dataset.replica + ':' + r.dataset.state)"),
        )
    });
    assert_eq!(
        as_strings(&cells),
        owner_strings(&status),
        "ring cells = /lb/status ring.owners"
    );
    let mut expected_marks: Vec<String> = status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .flat_map(|r| {
            let id = r["id"].clone();
            r["slots"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |s| format!("{id}@{s}"))
        })
        .collect();
    let mut got_marks = as_strings(&marks);
    expected_marks.sort();
    got_marks.sort();
    assert_eq!(
        got_marks.len(),
        27,
        "9 virtual nodes for each of 3 replicas"
    );
    assert_eq!(
        got_marks, expected_marks,
        "vnode marks = each replica's slots"
    );
    let expected_rows: Vec<String> = status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["name"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(as_strings(&rows), expected_rows);
    // The facts line names the ring by its fingerprint, as gateways of one ring compare it, and
    // no fact renders as "null" (TLS and the swarm engine are off here).
    let facts =
        tokio::task::block_in_place(|| b.eval("document.querySelector('#facts').innerText"));
    let facts = facts.as_str().unwrap_or_default();
    let fingerprint = status["ring"]["fingerprint"].as_str().unwrap_or("?");
    assert!(
        facts.contains(&format!(
            "ring {}",
            &fingerprint[..8.min(fingerprint.len())]
        )),
        "{facts:?} names the ring fingerprint {fingerprint}"
    );
    assert!(
        !facts.contains("null") && !facts.contains("engine") && !facts.contains("tls"),
        "{facts:?}"
    );

    // An /add shows on the page within 2 s of its answer: a row, and cells that it owns.
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1, "hostnames": ["S4"]}"#).await;
    assert_eq!(code, 200, "{body}");
    let added = Instant::now();
    let took = tokio::task::block_in_place(|| {
        b.wait_for(
            "S4 on the page",
            Duration::from_secs(2).saturating_sub(added.elapsed()),
            "document.querySelector('#replicas tr[data-replica=\"S4\"]') && \
             document.querySelector('#ring .cell[data-owner=\"4\"]')",
        )
    });
    eprintln!(
        "S4 appeared {took:?} after the wait began ({:?} after /add answered)",
        added.elapsed()
    );
    let (status_bytes, render_ms) = {
        let (_, body) = gw.admin_get("/lb/status").await;
        let ms = tokio::task::block_in_place(|| b.eval("document.body.dataset.renderMs"));
        (body.len(), ms)
    };
    eprintln!(
        "/lb/status is {status_bytes} bytes with 4 replicas; the page drew one in {render_ms} ms"
    );
    let status = gw.status().await;
    let s4 = replica(&status, "S4");
    assert_eq!(s4["id"], 4, "{status:#}");

    // The what-if panel: "remove server-2" on the page answers what /lb/simulate answers.
    let direct = {
        let (code, body) = call(
            "POST",
            &gw.url("/lb/simulate"),
            r#"{"action": "remove", "replica": "server-2"}"#,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        json(&body)["message"].clone()
    };
    let (moved, server2_after) = tokio::task::block_in_place(|| {
        b.eval(
            "document.querySelector('input[name=action][value=remove]').click(); \
             document.querySelector('select[name=replica]').value = 'server-2'; \
             document.querySelector('#simulate').click(); true",
        );
        b.wait_for(
            "the what-if answer",
            Duration::from_secs(20),
            "document.querySelector('#whatif-result .result[data-moved]')",
        );
        (
            b.eval("document.querySelector('#whatif-result .result').dataset.moved"),
            b.eval("document.querySelector('#whatif-result tr[data-replica=\"server-2\"]').dataset.change"),
        )
    });
    let moved: f64 = moved
        .as_str()
        .and_then(|m| m.parse().ok())
        .expect("data-moved");
    let expected = direct["moved"].as_f64().expect("moved");
    assert!(
        (moved - expected).abs() < 1e-6,
        "page {moved} vs /lb/simulate {expected}"
    );
    assert!(expected > 0.0);
    assert_eq!(server2_after, "removed");

    // A policy that does not load gets the gateway's 400 shown, and changes nothing.
    let generation = gw.status().await["generation"].clone();
    let error = tokio::task::block_in_place(|| {
        b.eval(
            "document.querySelector('input[name=action][value=policy]').click(); \
             document.querySelector('textarea[name=lua]').value = 'function ('; \
             document.querySelector('#simulate').click(); true",
        );
        b.wait_for(
            "the what-if error",
            Duration::from_secs(20),
            "document.querySelector('#whatif-result .result[data-error]')",
        );
        b.eval("document.querySelector('#whatif-result .result').dataset.error + ' ' + document.querySelector('#whatif-result').innerText")
    });
    let error = error.as_str().unwrap_or_default().to_owned();
    assert!(
        error.starts_with("400 ") && error.contains("does not load"),
        "{error}"
    );
    assert_eq!(
        gw.status().await["generation"],
        generation,
        "a simulation changes nothing"
    );

    // The screenshot: a what-if of the mix64 switch, with traffic flowing.
    tokio::task::block_in_place(|| {
        b.eval(
            "document.querySelector('input[name=action][value=hash]').click(); \
             document.querySelector('#simulate').click(); true",
        );
        b.wait_for(
            "the mix64 what-if",
            Duration::from_secs(20),
            "document.querySelector('#whatif-result .result[data-change*=mix64]')",
        );
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("operator-page.png");
        b.screenshot(&target);
        eprintln!("screenshot: {}", target.display());
        if std::env::var_os("RINGGATE_UPDATE_DOCS_SCREENSHOT").is_some() {
            b.screenshot(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img/operator-page.png"));
        }
    });
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    drop(b);
}
