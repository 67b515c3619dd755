//! Half-written files are never applied: a truncated or emptied config, a config or policy file
//! written slowly in place, and the safe way (write a new file, rename it over the old one).
//!
//! Each test edits the files of a real gateway while it serves and watches `/lb/status` and the
//! admin guard meanwhile: nothing of an unfinished file may show, ever.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const TOKEN: &str = "s3cret-token";

/// Longer than every quiet time and settle window of the watcher: a writer that pauses this long
/// with the file open must still not be applied half-way.
const WRITER_PAUSE: Duration = Duration::from_millis(1500);

fn conf() -> Conf {
    Conf {
        replicas: "count = 2\n".into(),
        // Last in the rendered file: a file cut before it loses the token.
        admin: format!("token = \"{TOKEN}\"\n"),
        ..Conf::default()
    }
}

/// Whether `/rm` asks for the token: 401 without it; 400 (the body asks for 0 replicas) when the
/// guard is gone. Either way nothing changes.
async fn token_required(gw: &GatewayProcess) -> bool {
    let (code, body) = call("DELETE", &gw.url("/rm"), r#"{"n": 0}"#).await;
    match code {
        401 => true,
        400 => false,
        other => panic!("unexpected answer to an unauthenticated /rm: {other} {body}"),
    }
}

fn policy_dir(gw: &GatewayProcess) -> PathBuf {
    gw.dir.path().join("policies")
}

fn slots(status: &Value) -> Vec<Value> {
    status["replicas"]
        .as_array()
        .map(|a| a.iter().map(|r| r["slots"].clone()).collect())
        .unwrap_or_default()
}

/// What a half-applied config would change: the ring, N, the token guard.
async fn assert_unchanged(gw: &GatewayProcess, before: &Value, when: &str) {
    assert!(
        token_required(gw).await,
        "{when}: the admin token stopped being required\nlog:\n{}",
        gw.log()
    );
    let now = gw.status().await;
    assert_eq!(
        now["ring"]["vnodes"], before["ring"]["vnodes"],
        "{when}: {now:#}"
    );
    assert_eq!(now["desired"], before["desired"], "{when}: N changed");
}

/// Writes `first`, holds the file open for [`WRITER_PAUSE`] while `during` is checked every few
/// milliseconds, then writes `rest` and closes it: a slow writer such as `cat > file` from a
/// slow source, or a copy over the network.
async fn write_slowly<F, Fut>(path: &Path, first: &str, rest: &str, during: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)
        .expect("open for writing");
    file.write_all(first.as_bytes())
        .expect("write the first half");
    file.flush().expect("flush");
    let until = Instant::now() + WRITER_PAUSE;
    let mut checks = 0;
    while Instant::now() < until {
        during().await;
        checks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checks > 5, "the pause was not watched: {checks} checks");
    file.write_all(rest.as_bytes()).expect("write the rest");
    drop(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_config_changes_nothing_and_says_why() {
    let mut gw = GatewayProcess::start(&conf());
    gw.admin_token = Some(TOKEN.into());
    let path = gw.config_path.clone();
    let original = std::fs::read_to_string(&path).expect("config");
    let before = gw.status().await;
    assert!(
        token_required(&gw).await,
        "the token guards /rm to begin with"
    );

    for (what, text) in [
        ("truncated to 0 bytes", ""),
        ("only comments left", "# being rewritten\n\n"),
    ] {
        std::fs::write(&path, text).expect("truncate");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert_unchanged(&gw, &before, what).await;
            let s = gw.status().await;
            if let Some(e) = s["config"]["last_error"].as_str() {
                assert!(e.contains("empty") && e.contains("lb.toml"), "{what}: {e}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no error in /lb/status: {s:#}\nlog:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Well past the watcher's settle time: still nothing applied.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_unchanged(&gw, &before, what).await;

        std::fs::write(&path, &original).expect("restore");
        gw.wait_status(Duration::from_secs(10), "the error cleared", |s| {
            s["config"]["last_error"].is_null()
        })
        .await;
        assert!(token_required(&gw).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_written_slowly_in_place_applies_only_once_complete() {
    let mut gw = GatewayProcess::start(&conf());
    gw.admin_token = Some(TOKEN.into());
    let path = gw.config_path.clone();
    let original = std::fs::read_to_string(&path).expect("config");
    let before = gw.status().await;
    assert_eq!(before["ring"]["vnodes"], 9);

    // The new file sets vnodes = 5 and keeps the token, which comes last. Its first half is valid
    // TOML on its own: vnodes = 5 and no token.
    let edited = original.replace("[ring]\n", "[ring]\nvnodes = 5\n");
    let cut = edited.find("[admin]").expect("an [admin] section");
    let (first, rest) = edited.split_at(cut);
    assert!(!first.contains(TOKEN));

    write_slowly(&path, first, rest, || {
        assert_unchanged(&gw, &before, "mid-write")
    })
    .await;

    let s = gw
        .wait_status(Duration::from_secs(10), "vnodes = 5", |s| {
            s["ring"]["vnodes"] == 5
        })
        .await;
    assert!(s["config"]["last_error"].is_null(), "{s:#}");
    assert!(
        token_required(&gw).await,
        "the complete file keeps the token"
    );
    for r in s["replicas"].as_array().expect("replicas") {
        assert_eq!(r["slots"].as_array().map(Vec::len), Some(5), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_written_slowly_in_two_halves_is_loaded_once() {
    let mut gw = GatewayProcess::start(&conf());
    gw.admin_token = Some(TOKEN.into());
    let before = gw.status().await;
    let generation = before["policy"]["generation"].clone();
    let placement = slots(&before);

    // Each half is a valid policy on its own; only the whole defines both hooks.
    let first = "function request_hash(i, slots) return 0 end\n";
    let rest = "function vnode_hash(i, j, slots) return (i * 61 + j * 7) % slots end\n";
    let file = policy_dir(&gw).join("10-slow.lua");
    write_slowly(&file, first, rest, || async {
        let s = gw.status().await;
        assert_eq!(
            s["policy"]["generation"], generation,
            "the half policy was loaded: {s:#}"
        );
        assert_eq!(slots(&s), placement, "virtual nodes moved mid-write");
        assert!(s["policy"]["last_load_error"].is_null(), "{s:#}");
    })
    .await;

    let s = gw
        .wait_status(Duration::from_secs(10), "the whole policy", |s| {
            s["policy"]["hooks"]["vnode_hash"]["defined"] == true
        })
        .await;
    assert_eq!(s["policy"]["hooks"]["request_hash"]["defined"], true);
    let loaded = s["policy"]["generation"].as_u64().expect("generation");
    assert_eq!(
        Some(loaded),
        generation.as_u64().map(|g| g + 1),
        "loaded once"
    );
    assert_ne!(
        slots(&s),
        placement,
        "the new vnode_hash placed the ring anew"
    );
    // And not again later (the watcher's poll sees the same files).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.status().await["policy"]["generation"], loaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_cut_to_nothing_keeps_the_last_good_set() {
    let mut gw = GatewayProcess::start(&conf());
    gw.admin_token = Some(TOKEN.into());
    let dir = policy_dir(&gw);
    let file = dir.join("10-ring.lua");
    std::fs::write(
        &file,
        "function vnode_hash(i, j, slots) return (i * 61 + j * 7) % slots end\n",
    )
    .expect("write policy");
    let loaded = gw
        .wait_status(Duration::from_secs(10), "the policy", |s| {
            s["policy"]["hooks"]["vnode_hash"]["defined"] == true
        })
        .await;

    std::fs::write(&file, "").expect("truncate");
    let s = gw
        .wait_status(Duration::from_secs(10), "the emptied file rejected", |s| {
            s["policy"]["last_load_error"]
                .as_str()
                .is_some_and(|e| e.contains("10-ring.lua") && e.contains("empty"))
        })
        .await;
    assert_eq!(s["policy"]["generation"], loaded["policy"]["generation"]);
    assert_eq!(s["policy"]["hooks"]["vnode_hash"]["defined"], true);
    assert_eq!(slots(&s), slots(&loaded), "no virtual node moved");

    // Deleting the file is how its hooks go away.
    std::fs::remove_file(&file).expect("remove");
    let s = gw
        .wait_status(Duration::from_secs(10), "the policy removed", |s| {
            s["policy"]["files"] == serde_json::json!([])
        })
        .await;
    assert!(s["policy"]["last_load_error"].is_null(), "{s:#}");
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`; returns when.
fn replace_atomically(path: &Path, tmp_name: &str, text: &str) -> Instant {
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, text).expect("write the temporary file");
    std::fs::rename(&tmp, path).expect("rename it over");
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_rename_applies_at_once() {
    let mut gw = GatewayProcess::start(&conf());
    gw.admin_token = Some(TOKEN.into());
    let path = gw.config_path.clone();
    let original = std::fs::read_to_string(&path).expect("config");
    let generation = gw.status().await["policy"]["generation"]
        .as_u64()
        .expect("policy generation");

    let at = replace_atomically(
        &path,
        "lb.toml.tmp",
        &original.replace("[ring]\n", "[ring]\nvnodes = 6\n"),
    );
    gw.wait_status(Duration::from_secs(10), "vnodes = 6", |s| {
        s["ring"]["vnodes"] == 6
    })
    .await;
    let config_took = at.elapsed();
    assert!(token_required(&gw).await);

    let at = replace_atomically(
        &policy_dir(&gw).join("20-renamed.lua"),
        ".20-renamed.lua.tmp",
        "function request_hash(i, slots) return 0 end\n",
    );
    let s = gw
        .wait_status(Duration::from_secs(10), "the renamed policy", |s| {
            s["policy"]["files"] == serde_json::json!(["20-renamed.lua"])
        })
        .await;
    let policy_took = at.elapsed();
    eprintln!("write-then-rename in force after: config {config_took:?}, policy {policy_took:?}");
    assert_eq!(
        s["policy"]["generation"].as_u64(),
        Some(generation + 1),
        "loaded once: {s:#}"
    );
    // A rename is a complete file: no writer is waited for. The bound is generous for a loaded
    // machine; the figure above is what it took.
    for (what, took) in [("config", config_took), ("policy", policy_took)] {
        assert!(
            took < Duration::from_secs(2),
            "{what}: {took:?} to apply a renamed file"
        );
    }
}
