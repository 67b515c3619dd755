//! Watched files in states an edit does not leave them in (issue 23, items 5 and 10), against the
//! real gateway binary: a FIFO at the config path and at a policy file's path, and the gateway
//! running out of file descriptors while nobody edits anything.
//!
//! Owns: these scenarios. Must not touch: how a gateway is started or spoken to (`support`), or
//! the half-written-file cases (`reload_safety.rs`).
//! Each test leaves nothing behind: the gateway is stopped or killed by `GatewayProcess` (also
//! when the test fails), and the FIFOs live in its temporary directory.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// How long an edit may take to show in `/lb/status`: the watcher's checks are a second apart
/// and a settled edit needs two reads; generous for a loaded machine.
const APPLIES_WITHIN: Duration = Duration::from_secs(10);

/// `mkfifo path`: a real named pipe that no writer ever opens.
fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .map(|s| s.success());
    assert!(matches!(made, Ok(true)), "mkfifo {}", path.display());
}

/// Writes `text` to a hidden temporary file beside `path` and renames it over `path`.
fn replace_atomically(path: &Path, text: &str) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the temporary file");
    std::fs::rename(&tmp, path).expect("rename it over");
}

fn policy_dir(gw: &GatewayProcess) -> PathBuf {
    gw.dir.path().join("policies")
}

fn hook_defined(status: &Value, hook: &str) -> bool {
    status["policy"]["hooks"][hook]["defined"] == true
}

fn text_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A gateway with one replica and a policy defining `request_hash`, loaded.
async fn gateway_with_a_policy() -> (GatewayProcess, Value) {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        ..Conf::default()
    });
    replace_atomically(
        &policy_dir(&gw).join("10-hash.lua"),
        "function request_hash(i, slots) return 7 end\n",
    );
    let s = gw
        .wait_status(APPLIES_WITHIN, "the first policy loaded", |s| {
            hook_defined(s, "request_hash")
        })
        .await;
    (gw, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_at_the_config_path_is_an_error_and_stops_neither_policy_reloads_nor_sigterm() {
    let (mut gw, _) = gateway_with_a_policy().await;

    // Before, the watcher's read of the FIFO waited for a writer forever: no reload of any
    // source again, and SIGTERM no longer ended the process.
    std::fs::remove_file(&gw.config_path).expect("remove the config");
    mkfifo(&gw.config_path);
    let s = gw
        .wait_status(APPLIES_WITHIN, "the config FIFO reported", |s| {
            text_of(&s["config"]["last_error"]).contains("FIFO")
        })
        .await;
    let error = text_of(&s["config"]["last_error"]);
    assert!(
        error.contains("lb.toml") && error.contains("not a regular file"),
        "{error}"
    );

    // The policy directory is still watched.
    replace_atomically(
        &policy_dir(&gw).join("10-hash.lua"),
        "function request_hash(i, slots) return 7 end\nfunction health(server, probe) return true end\n",
    );
    gw.wait_status(
        APPLIES_WITHIN,
        "the policy edit with the config a FIFO",
        |s| hook_defined(s, "health"),
    )
    .await;
    let s = gw.status().await;
    assert!(s["policy"]["last_load_error"].is_null(), "{s:#}");

    // SIGTERM ends the gateway with the FIFO still at the config path.
    let stopping = Instant::now();
    assert!(
        gw.stop(Duration::from_secs(10)),
        "SIGTERM did not end the gateway within 10 s\nlog:\n{}",
        gw.log()
    );
    eprintln!("stopped {:?} after SIGTERM", stopping.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_at_a_policy_path_is_an_error_that_changes_nothing_and_stops_no_config_reload() {
    let (mut gw, before) = gateway_with_a_policy().await;
    let policies = policy_dir(&gw);

    // Before, a FIFO named like a policy file was skipped in silence (a policy file turned into
    // one was dropped from the set); and read between the listing and the read, it hung.
    mkfifo(&policies.join("20-pipe.lua"));
    let s = gw
        .wait_status(APPLIES_WITHIN, "the policy FIFO reported", |s| {
            text_of(&s["policy"]["last_load_error"]).contains("20-pipe.lua")
        })
        .await;
    let error = text_of(&s["policy"]["last_load_error"]);
    assert!(
        error.contains("FIFO") && error.contains("not a regular file"),
        "{error}"
    );
    assert_eq!(
        s["policy"]["generation"], before["policy"]["generation"],
        "{s:#}"
    );
    assert!(hook_defined(&s, "request_hash"), "{s:#}");

    // The config is still watched.
    let config = std::fs::read_to_string(&gw.config_path).expect("config");
    replace_atomically(
        &gw.config_path,
        &config.replace("[ring]\n", "[ring]\nvnodes = 6\n"),
    );
    gw.wait_status(APPLIES_WITHIN, "the config edit (vnodes = 6)", |s| {
        s["ring"]["vnodes"] == 6
    })
    .await;

    // The pipe goes: the same files as before load again and the error is gone.
    std::fs::remove_file(policies.join("20-pipe.lua")).expect("remove the policy FIFO");
    let s = gw
        .wait_status(APPLIES_WITHIN, "the policy error cleared", |s| {
            s["policy"]["last_load_error"].is_null()
        })
        .await;
    assert!(hook_defined(&s, "request_hash"), "{s:#}");
    assert!(
        gw.stop(Duration::from_secs(10)),
        "SIGTERM\nlog:\n{}",
        gw.log()
    );
}

/// Open descriptors of process `pid` numbered below `limit`: the slots its `nofile` limit lets
/// it use. A descriptor inherited from whoever started it (a build tool's jobserver pipe, say)
/// may be numbered above the limit; counting it would take the process for full while a slot
/// is still free.
fn open_fds(pid: u32, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
                .filter(|fd| *fd < limit)
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_leaves_no_stale_error_and_rejects_no_edit() {
    const NOFILE: usize = 128;
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let gw = GatewayProcess::start_under(
        &Conf {
            replicas: "count = 1\n".into(),
            // Set high on purpose, above what the descriptors allow (the derived default stays
            // below it): idle clients then take every descriptor the gateway has.
            proxy: "max_connections = 4096\n".into(),
            ..Conf::default()
        },
        &["prlimit", &limit, "--"],
    );
    replace_atomically(
        &policy_dir(&gw).join("10-hash.lua"),
        "function request_hash(i, slots) return 7 end\n",
    );
    gw.wait_status(
        APPLIES_WITHIN,
        "the replica up and the policy loaded",
        |s| s["up"] == 1 && hook_defined(s, "request_hash"),
    )
    .await;
    let pid = gw.pid();

    // Idle connections until the gateway holds every descriptor it may open.
    let mut idle = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_fds(pid, NOFILE) < NOFILE {
        assert!(
            Instant::now() < deadline,
            "the gateway never ran out of descriptors: {} open\nlog:\n{}",
            open_fds(pid, NOFILE),
            gw.log()
        );
        for _ in 0..8 {
            if let Ok(s) = tokio::net::TcpStream::connect(gw.addr).await {
                idle.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Held across several of the watcher's once-a-second checks (well inside the first-bytes
    // deadline, which would free them).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        open_fds(pid, NOFILE) >= NOFILE - 2,
        "{} open",
        open_fds(pid, NOFILE)
    );
    drop(idle);

    let deadline = Instant::now() + Duration::from_secs(15);
    while open_fds(pid, NOFILE) > NOFILE / 2 {
        assert!(
            Instant::now() < deadline,
            "descriptors never came back: {} open",
            open_fds(pid, NOFILE)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few more checks, now with descriptors to read with.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let s = gw.status().await;
    let log = gw.log();
    assert!(
        s["policy"]["last_load_error"].is_null() && s["config"]["last_error"].is_null(),
        "a stale error after the descriptors came back: policy {} config {}\nlog:\n{log}",
        s["policy"]["last_load_error"],
        s["config"]["last_error"]
    );
    assert!(hook_defined(&s, "request_hash"), "{s:#}");
    // The watcher did try while out of descriptors, and said so as its own problem.
    assert!(
        log.contains("short of descriptors"),
        "the watcher never read during the exhaustion\nlog:\n{log}"
    );
    assert!(
        !log.contains("edit rejected"),
        "an edit was reported rejected though nobody edited\nlog:\n{log}"
    );
}
