//! Your own application as the replicas (issue 27), with real processes: `python3 -m
//! http.server` and the small app of `docs/examples/envapp.py` behind a real gateway, `/add`,
//! `/rm`, a killed replica replaced, exactly the environment the spec gives, live `env` edits
//! rolled in place under load (no failed request, no key on another replica), a roll whose new
//! spec never gets ready stopped after the first replica, and bad specs refused with the
//! replica and the cause named (at `ringgate check`, at start, at `/add`).
//!
//! Every replica is a child of its test's gateway and dies with it (also when a test fails:
//! dropping the gateway kills it, and the kernel kills its children); temp dirs go with the
//! test.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The interpreter: Debian's own when it is there (a version manager's shim would add its own
/// variables to the app's environment), else whatever `python3` the PATH finds.
fn python() -> String {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".into()
    } else {
        "python3".into()
    }
}

/// `docs/examples`, where the walkthrough's app lives (the tests run the documented one).
fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/examples")
}

/// A gateway running `envapp.py` as `count` process replicas, with `extra` in `[provider]`.
fn envapp(count: u32, extra: &str) -> Conf {
    Conf {
        replicas: format!("count = {count}\n"),
        provider: format!(
            "command = [\"{}\", \"envapp.py\"]\nworkdir = \"{}\"\n{extra}",
            python(),
            examples().display()
        ),
        health: "path = \"/healthz\"\ninterval = \"1s\"\nrecovery_delay = \"200ms\"\n".into(),
        ..Conf::default()
    }
}

fn all_up(n: usize) -> impl Fn(&Value) -> bool {
    move |s| in_ring(s).len() == n && s["replicas"].as_array().is_some_and(|a| a.len() == n)
}

/// Replica name → its pid, from `/lb/status`.
fn pids(status: &Value) -> BTreeMap<String, u32> {
    status["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    Some((
                        r["name"].as_str()?.to_owned(),
                        r["instance"].as_str()?.parse().ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The variables a process was started with (`/proc/<pid>/environ`).
fn environment_of(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("cannot read the environment of pid {pid}: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// One `GET /env?id=<id>` through the gateway: the answering replica and its env, or why not.
async fn env_of_key(client: &TestClient, gw: &str, id: u64) -> Result<Value, String> {
    let req = http::Request::builder()
        .uri(format!("{gw}/env?id={id}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(format!("{status} {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))
}

/// Which replica answers each key.
async fn owners(gw: &GatewayProcess, keys: std::ops::Range<u64>) -> BTreeMap<u64, String> {
    let c = client();
    let mut out = BTreeMap::new();
    for id in keys {
        let v = env_of_key(&c, &gw.url(""), id)
            .await
            .unwrap_or_else(|e| panic!("key {id}: {e}"));
        out.insert(id, v["server"].as_str().unwrap_or_default().to_owned());
    }
    out
}

/// Traffic over keys 0..`keys` until stopped: every answer must be a 200 from the replica that
/// owned the key before (`owners`), and each answer's `env[var]` is tallied.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &GatewayProcess, owners: &BTreeMap<u64, String>, var: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let owners = Arc::new(owners.clone());
        let keys = owners.len() as u64;
        let workers = (0..4u64)
            .map(|w| {
                let (stop, ok, failures, seen, owners) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    seen.clone(),
                    owners.clone(),
                );
                let base = gw.url("");
                tokio::spawn(async move {
                    let c = client();
                    let mut id = w;
                    while !stop.load(Ordering::Relaxed) {
                        match env_of_key(&c, &base, id).await {
                            Ok(v) => {
                                let server = v["server"].as_str().unwrap_or_default();
                                if owners.get(&id).map(String::as_str) == Some(server) {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    failures.lock().expect("lock").push(format!(
                                        "key {id} answered by {server}, owned by {:?}",
                                        owners.get(&id)
                                    ));
                                }
                                let value = v["env"][var].as_str().unwrap_or("-").to_owned();
                                *seen.lock().expect("lock").entry(value).or_default() += 1;
                            }
                            Err(e) => failures
                                .lock()
                                .expect("lock")
                                .push(format!("key {id}: {e}")),
                        }
                        id = (id + 7) % keys;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            seen,
            workers,
        }
    }

    async fn finish(self) -> (u64, Vec<String>, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("load worker");
        }
        let failures = self.failures.lock().expect("lock").clone();
        let seen = self.seen.lock().expect("lock").clone();
        (self.ok.load(Ordering::Relaxed), failures, seen)
    }
}

/// The config file with `from` replaced by `to` (a live edit, picked up by the watcher).
fn edit(gw: &GatewayProcess, from: &str, to: &str) {
    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(&gw.config_path, text.replace(from, to)).expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_server_replicas_serve_add_rm_and_a_killed_one_is_replaced() {
    let site = tempfile::tempdir().expect("site dir");
    std::fs::write(site.path().join("index.html"), "hello from the site\n").expect("index");
    let started = Instant::now();
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 2\n".into(),
        provider: format!(
            "command = [\"{}\", \"-m\", \"http.server\", \"{{port}}\", \"--bind\", \"127.0.0.1\", \"--directory\", \"{}\"]\n",
            python(),
            site.path().display()
        ),
        health: "path = \"/index.html\"\nrecovery_delay = \"200ms\"\n".into(),
        ..Conf::default()
    });
    let s = gw
        .wait_status(
            Duration::from_secs(30),
            "two http.server replicas",
            all_up(2),
        )
        .await;
    println!(
        "a gateway with 2 python http.server replicas in its ring {:?} after it was started",
        started.elapsed()
    );
    for id in 0..20 {
        let (code, body) = get(&gw.url(&format!("/index.html?id={id}"))).await;
        assert_eq!((code, body.as_str()), (200, "hello from the site\n"));
    }
    // Each replica listens on the port the gateway picked for it.
    for r in s["replicas"].as_array().expect("replicas") {
        let pid: u32 = r["instance"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .expect("pid");
        let env = environment_of(pid);
        let addr = r["address"].as_str().expect("address");
        assert_eq!(
            Some(format!("127.0.0.1:{}", env["PORT"])).as_deref(),
            Some(addr)
        );
    }

    let t = Instant::now();
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1, "hostnames": ["S5"]}"#).await;
    assert_eq!(code, 200, "{body}");
    println!(
        "/add of one http.server replica answered after {:?}",
        t.elapsed()
    );
    let m = &json(&body)["message"];
    assert_eq!(m["N"], 3);
    assert_eq!(m["added"], serde_json::json!(["S5"]));
    let s = gw.status().await;
    assert!(in_ring(&s).contains("S5"), "in the ring when /add answers");
    let s5 = pids(&s)["S5"];

    let (code, body) = call("DELETE", &gw.url("/rm"), r#"{"n": 1, "hostnames": ["S5"]}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["removed"], serde_json::json!(["S5"]));
    assert_eq!(json(&body)["message"]["N"], 2);
    assert!(
        wait_dead(&[s5], Duration::from_secs(10)).is_empty(),
        "S5 stopped"
    );

    let before = gw.status().await;
    let victim = pids(&before)["server-1"];
    signal(victim, "KILL");
    let after = gw
        .wait_status(Duration::from_secs(30), "server-1 replaced", |s| {
            replica(s, "server-1")["in_ring"] == true && pids(s).get("server-1") != Some(&victim)
        })
        .await;
    let (old, new) = (replica(&before, "server-1"), replica(&after, "server-1"));
    assert_eq!(
        (&old["id"], &old["slots"]),
        (&new["id"], &new["slots"]),
        "same id and slots"
    );
    assert_eq!(new["restarts"], 1);
    let (code, _) = get(&gw.url("/index.html?id=1")).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_gets_exactly_its_env_and_port_and_answers_with_them() {
    let gw = GatewayProcess::start_with(
        &envapp(
            2,
            "env = { GREETING = \"hello from {hostname}\", SELF_URL = \"http://127.0.0.1:{port}/env\", REPLICA_ID = \"{id}\" }\n",
        )
        .render(),
        &[("RINGGATE_TEST_SECRET", "hunter2")],
    );
    let s = gw
        .wait_status(Duration::from_secs(30), "two app replicas", all_up(2))
        .await;
    for (i, (name, pid)) in pids(&s).into_iter().enumerate() {
        let env = environment_of(pid);
        let keys: BTreeSet<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "GREETING",
                "PATH",
                "PORT",
                "REPLICA_ID",
                "SELF_URL",
                "SERVER_ID"
            ]),
            "{name}: exactly the spec's env plus PORT, SERVER_ID and PATH"
        );
        assert_eq!(env["SERVER_ID"], name);
        assert_eq!(env["GREETING"], format!("hello from {name}"));
        assert_eq!(
            env["SELF_URL"],
            format!("http://127.0.0.1:{}/env", env["PORT"])
        );
        assert_eq!(env["REPLICA_ID"], (i + 1).to_string());
        assert_eq!(
            replica(&s, &name)["address"].as_str(),
            Some(format!("127.0.0.1:{}", env["PORT"]).as_str())
        );
    }
    // And through the gateway, the app says so itself.
    let c = client();
    let mut answered = BTreeSet::new();
    for id in 0..50 {
        let v = env_of_key(&c, &gw.url(""), id).await.expect("an answer");
        let server = v["server"].as_str().expect("server").to_owned();
        assert_eq!(v["greeting"], format!("hello from {server}"));
        assert_eq!(
            v["env"]["SELF_URL"],
            format!("http://127.0.0.1:{}/env", v["port"])
        );
        assert!(v["env"]["RINGGATE_TEST_SECRET"].is_null());
        answered.insert(server);
    }
    assert_eq!(answered.len(), 2, "{answered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_env_edit_rolls_every_replica_in_place_under_load() {
    let gw = GatewayProcess::start(&envapp(3, "env = { VERSION = \"1\" }\n"));
    let s = gw
        .wait_status(Duration::from_secs(30), "three app replicas", all_up(3))
        .await;
    let old_pids = pids(&s);
    let before = owners(&gw, 0..200).await;
    assert_eq!(
        before.values().collect::<BTreeSet<_>>().len(),
        3,
        "every replica owns keys"
    );
    let load = Load::start(&gw, &before, "VERSION");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let edited = Instant::now();
    edit(&gw, "VERSION = \"1\"", "VERSION = \"2\"");
    let s = gw
        .wait_status(Duration::from_secs(60), "the roll done", |s| {
            s["roll"]["state"] == "done"
        })
        .await;
    let took = edited.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failures, seen) = load.finish().await;
    println!(
        "env edit rolled 3 process replicas in {took:?} (the roll itself: {} ms); {ok} requests ok during it, by VERSION: {seen:?}",
        s["roll"]["elapsed_ms"]
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 100, "the load ran: {ok}");
    assert!(seen.contains_key("1") && seen.contains_key("2"), "{seen:?}");
    assert_eq!(
        s["roll"]["rolled"],
        serde_json::json!(["server-1", "server-2", "server-3"])
    );
    assert!(s["roll"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("provider.env")));
    // Same replicas, same keys, new processes with the new env; the old ones are gone.
    let new_pids = pids(&s);
    assert_eq!(
        new_pids.keys().collect::<Vec<_>>(),
        old_pids.keys().collect::<Vec<_>>()
    );
    for (name, pid) in &new_pids {
        assert_ne!(Some(pid), old_pids.get(name), "{name} runs a new process");
        assert_eq!(environment_of(*pid)["VERSION"], "2");
    }
    assert!(
        wait_dead(
            &old_pids.values().copied().collect::<Vec<_>>(),
            Duration::from_secs(10)
        )
        .is_empty(),
        "the old processes were stopped"
    );
    assert_eq!(owners(&gw, 0..200).await, before, "every key where it was");
    assert!(gw.log().contains("roll done"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_whose_new_spec_never_gets_ready_stops_after_the_first_with_the_old_ones_serving() {
    let gw = GatewayProcess::start(&envapp(
        3,
        "start_timeout = \"3s\"\nenv = { MODE = \"ok\" }\n",
    ));
    let s = gw
        .wait_status(Duration::from_secs(30), "three app replicas", all_up(3))
        .await;
    let old_pids = pids(&s);
    let before = owners(&gw, 0..100).await;
    let load = Load::start(&gw, &before, "MODE");
    edit(&gw, "MODE = \"ok\"", "MODE = \"broken\"");
    let s = gw
        .wait_status(Duration::from_secs(30), "the roll stopped", |s| {
            s["roll"]["state"] == "stopped"
                && s["roll"]["stopped"]["output"]
                    .as_array()
                    .is_some_and(|o| !o.is_empty())
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failures, seen) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 50, "{ok}");
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["ok"],
        "only the old spec served"
    );
    let stop = &s["roll"]["stopped"];
    println!("roll stopped: {stop:#}");
    assert_eq!(stop["replica"], "server-1");
    let cause = stop["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("did not become ready")
            && cause.contains("GET /healthz")
            && cause.contains("last check: answered 503"),
        "{cause}"
    );
    assert!(
        stop["output"].to_string().contains("/healthz"),
        "the app's own last lines: {stop}"
    );
    assert_eq!(s["roll"]["rolled"], serde_json::json!([]));
    assert_eq!(pids(&s), old_pids, "the old replicas still serve");
    assert!(in_ring(&s).len() == 3);
    assert!(replica(&s, "server-1")["successor"].is_null());
    assert_eq!(owners(&gw, 0..100).await, before);
    let log = gw.log();
    assert!(log.contains("roll stopped"), "{log}");
    // The failed replacement was stopped: only the three old app processes run.
    let apps = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.contains(&format!("PPid:\t{}\n", gw.pid())))
        })
        .count();
    assert_eq!(apps, 3, "the gateway's children");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_app_never_gets_ready_or_crashes_names_it_and_changes_nothing() {
    let gw = GatewayProcess::start(&envapp(
        1,
        "start_timeout = \"2s\"\nenv = { FAIL_FOR = \"S9\", CRASH_FOR = \"S8\" }\n",
    ));
    gw.wait_status(Duration::from_secs(30), "one app replica", all_up(1))
        .await;
    let t = Instant::now();
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1, "hostnames": ["S9"]}"#).await;
    let message = json(&body)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("{code} after {:?}: {message}", t.elapsed());
    assert_eq!(code, 500, "{body}");
    assert!(
        message.starts_with("<Error> Replica 'S9' did not become ready")
            && message.contains("provider.start_timeout (2s)")
            && message.contains("last check: answered 503")
            && message.contains("its last output:")
            && message.ends_with("nothing was added"),
        "{message}"
    );
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1, "hostnames": ["S8"]}"#).await;
    let message = json(&body)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("{code}: {message}");
    assert_eq!(code, 500, "{body}");
    assert!(
        message.starts_with("<Error> Replica 'S8' exited while starting")
            && message.contains("exit status: 3")
            && message.contains("refusing to start as S8"),
        "{message}"
    );
    assert_eq!(gw.replica_names().await, ["server-1"], "nothing was added");
    assert_eq!(
        gw.status().await["replicas"].as_array().map(Vec::len),
        Some(1)
    );
    let (code, _) = get(&gw.url("/env?id=3")).await;
    assert_eq!(code, 200);
}

/// `ringgate check` on `toml`: (exit success, stdout, stderr).
fn check(toml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, toml).expect("write");
    let out = std::process::Command::new(GATEWAY_BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run ringgate check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_names_a_missing_program_workdir_or_mount_with_its_line() {
    let (ok, _, err) = check(
        "[provider]\nkind = \"process\"\ncommand = [\"no-such-program-rg27\", \"--port\", \"{port}\"]\n",
    );
    assert!(!ok);
    assert!(
        err.contains("line 3: provider.command: cannot run the replicas' program: \"no-such-program-rg27\" is not found"),
        "{err}"
    );
    let (ok, _, err) =
        check("[provider]\nkind = \"process\"\ncommand = [\"sh\"]\nenv = { A = \"{prot}\" }\n");
    assert!(!ok);
    assert!(
        err.contains("line 4: provider.env.A") && err.contains("{prot}"),
        "{err}"
    );
    let (ok, _, err) = check(
        "[provider]\nkind = \"process\"\ncommand = [\"./envapp.py\"]\nworkdir = \"/no/such/dir-rg27\"\n",
    );
    assert!(!ok);
    assert!(
        err.contains("line 4: provider.workdir: /no/such/dir-rg27 is not a directory"),
        "{err}"
    );
    let (ok, _, err) =
        check("[provider]\nkind = \"docker\"\nmounts = [\"/no/such/dir-rg27:/www\"]\n");
    assert!(!ok);
    assert!(
        err.contains("line 3: provider.mounts") && err.contains("/no/such/dir-rg27 does not exist"),
        "{err}"
    );
    let (ok, out, err) = check(&format!(
        "[provider]\nkind = \"process\"\ncommand = [\"{}\", \"envapp.py\"]\nworkdir = \"{}\"\n",
        python(),
        examples().display()
    ));
    assert!(ok, "{err}");
    assert!(out.contains("replicas (process): command"), "{out}");
}

#[test]
fn serve_refuses_process_replicas_whose_program_does_not_exist() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("lb.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[provider]\nkind = \"process\"\ncommand = [\"no-such-program-rg27\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(GATEWAY_BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ringgate serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("provider.command: cannot run the replicas' program")
            && err.contains("no-such-program-rg27"),
        "{err}"
    );
}
