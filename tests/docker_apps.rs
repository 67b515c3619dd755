//! Someone else's image as the replicas (issue 27), against the real engine: Debian's
//! busybox-static `httpd` in a `FROM scratch` image (built by the project's own `make
//! example-httpd`, nothing pulled) run by the docker provider with the spec's `command`, `env`,
//! `user`, a read-only bind mount of a test directory it serves, and a named volume it may
//! write; a live `env` edit rolled over the containers in place under load; a missing image or
//! mount source named at `ringgate check` and at `/add`, changing nothing.
//!
//! Each test has its own instance label, network and replica names (a [`Scope`]) and removes
//! its containers, network and volume when it ends, also on failure; the example image is the
//! documentation's, not the test's, and stays. Without an engine each test says it is skipped
//! (or fails under `RINGGATE_REQUIRE_ENGINES=1`).

// support/python.rs and the Docker or Chromium support each bring `engines.rs` along.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use docker_support::{
    docker, ensure_example_httpd_image, inspect, start_gateway, Scope, EXAMPLE_HTTPD_IMAGE,
};
use serde_json::Value;
use support::{call, client, get, in_ring, json, replica, GatewayProcess, TestClient};

/// A site the replicas serve: a page, a CGI script answering the environment, and one that
/// tries to write to the (read-only) site and to the (writable) volume. Readable by anyone:
/// the app runs as nobody.
fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("site dir");
    let cgi = dir.path().join("cgi-bin");
    std::fs::create_dir(&cgi).expect("cgi-bin");
    std::fs::write(
        dir.path().join("index.html"),
        "hello from the mounted dir\n",
    )
    .expect("page");
    // No shell in the image but busybox's own: the scripts name it.
    std::fs::write(
        cgi.join("env"),
        "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\n/bin/busybox env\n",
    )
    .expect("env script");
    std::fs::write(
        cgi.join("write"),
        "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\n\
         for d in /www /data; do\n\
           if echo x 2>/dev/null > $d/written; then echo \"$d: wrote\"; else echo \"$d: read-only\"; fi\n\
         done\n",
    )
    .expect("write script");
    for (p, mode) in [
        (dir.path().to_owned(), 0o755),
        (cgi.clone(), 0o755),
        (cgi.join("env"), 0o755),
        (cgi.join("write"), 0o755),
        (dir.path().join("index.html"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    dir
}

/// Removes a named volume when the test ends (after the containers using it: declare it
/// before the [`Scope`]).
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = docker(&["volume", "rm", "-f", &self.0]);
    }
}

/// `[provider]` keys (after `start_gateway`'s own) running busybox httpd on the site.
fn httpd(site: &Path, volume: &str, env: &str) -> String {
    format!(
        "container_port = 8080\n\
         command = [\"/bin/busybox\", \"httpd\", \"-f\", \"-v\", \"-p\", \"{{port}}\", \"-h\", \"/www\"]\n\
         env = {{ {env} }}\n\
         mounts = [\"{}:/www\", \"{volume}:/data:rw\"]\n\
         user = \"65534:65534\"\n\
         labels = {{ example = \"busybox-httpd\" }}\n\
         [health]\npath = \"/index.html\"\nrecovery_delay = \"200ms\"\n",
        site.display()
    )
}

fn all_up(n: usize) -> impl Fn(&Value) -> bool {
    move |s| in_ring(s).len() == n && s["replicas"].as_array().is_some_and(|a| a.len() == n)
}

/// `KEY=value` lines of a CGI answer.
fn vars(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// One `GET /cgi-bin/env?id=<id>` through the gateway: the answering replica's variables.
async fn env_of_key(
    client: &TestClient,
    base: &str,
    id: u64,
) -> Result<BTreeMap<String, String>, String> {
    let req = http::Request::builder()
        .uri(format!("{base}/cgi-bin/env?id={id}"))
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
    Ok(vars(&text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_from_scratch_busybox_httpd_serves_a_read_only_mount_with_its_env_command_and_user() {
    require_docker!();
    ensure_example_httpd_image();
    let volume = Volume(docker_support::unique("data"));
    let scope = Scope::new("httpd");
    let site = site();
    let started = Instant::now();
    let gw = start_gateway(
        &scope,
        EXAMPLE_HTTPD_IMAGE,
        &httpd(
            site.path(),
            &volume.0,
            "GREETING = \"hello from {hostname}\", ID = \"{id}\"",
        ),
    );
    let s = gw
        .wait_status(Duration::from_secs(60), "two httpd replicas", all_up(3))
        .await;
    println!(
        "a gateway with 3 busybox httpd containers in its ring {:?} after it was started",
        started.elapsed()
    );
    for id in 0..20 {
        let (code, body) = get(&gw.url(&format!("/index.html?id={id}"))).await;
        assert_eq!((code, body.as_str()), (200, "hello from the mounted dir\n"));
    }
    let c = client();
    let mut seen = BTreeSet::new();
    for id in 0..60 {
        let v = env_of_key(&c, &gw.url(""), id).await.expect("a CGI answer");
        let name = v["SERVER_ID"].clone();
        assert_eq!(v["GREETING"], format!("hello from {name}"));
        assert_eq!(v["PORT"], "8080");
        assert_eq!(
            v["ID"],
            replica(&s, &name)["id"].to_string(),
            "{{id}} is its ring id"
        );
        seen.insert(name);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // The site is mounted read-only (the volume is writable, but a fresh volume belongs to
    // root and the app runs as nobody: `docker inspect` below shows it mounted rw).
    let (code, body) = get(&gw.url("/cgi-bin/write?id=1")).await;
    assert_eq!(code, 200);
    assert!(body.contains("/www: read-only"), "{body}");

    // What the engine runs: the spec, our labels over the user's, the hardening.
    for name in &seen {
        let c = inspect(name).unwrap_or_else(|| panic!("no container named {name}"));
        let cfg = &c["Config"];
        assert_eq!(
            cfg["Entrypoint"],
            serde_json::json!([
                "/bin/busybox",
                "httpd",
                "-f",
                "-v",
                "-p",
                "8080",
                "-h",
                "/www"
            ])
        );
        assert_eq!(cfg["User"], "65534:65534");
        assert_eq!(cfg["Labels"]["example"], "busybox-httpd");
        assert_eq!(cfg["Labels"]["ringgate.hostname"], name.as_str());
        assert_eq!(
            cfg["Labels"]["ringgate.spec"].as_str().map(str::len),
            Some(16)
        );
        let h = &c["HostConfig"];
        assert_eq!(h["ReadonlyRootfs"], true);
        assert_eq!(h["CapDrop"], serde_json::json!(["ALL"]));
        let mounts = c["Mounts"].as_array().expect("mounts");
        let www = mounts
            .iter()
            .find(|m| m["Destination"] == "/www")
            .expect("/www");
        assert_eq!(
            (&www["Type"], &www["RW"]),
            (&serde_json::json!("bind"), &serde_json::json!(false)),
            "read-only by default"
        );
        assert_eq!(www["Source"], site.path().display().to_string());
        let data = mounts
            .iter()
            .find(|m| m["Destination"] == "/data")
            .expect("/data");
        assert_eq!(
            (&data["Type"], &data["RW"], &data["Name"]),
            (
                &serde_json::json!("volume"),
                &serde_json::json!(true),
                &serde_json::json!(volume.0)
            )
        );
    }

    let extra = scope.name("x");
    let t = Instant::now();
    let (code, body) = call(
        "POST",
        &gw.url("/add"),
        &format!(r#"{{"n": 1, "hostnames": ["{extra}"]}}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    println!(
        "/add of one busybox httpd container answered after {:?}",
        t.elapsed()
    );
    assert_eq!(json(&body)["message"]["added"], serde_json::json!([extra]));
    let (code, body) = call(
        "DELETE",
        &gw.url("/rm"),
        &format!(r#"{{"n": 1, "hostnames": ["{extra}"]}}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body)["message"]["removed"],
        serde_json::json!([extra])
    );
    assert!(inspect(&extra).is_none(), "its container is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_env_edit_rolls_the_containers_in_place_under_load() {
    require_docker!();
    ensure_example_httpd_image();
    let volume = Volume(docker_support::unique("data"));
    let scope = Scope::new("hroll");
    let site = site();
    let gw = start_gateway(
        &scope,
        EXAMPLE_HTTPD_IMAGE,
        &httpd(site.path(), &volume.0, "VERSION = \"1\""),
    );
    let s = gw
        .wait_status(Duration::from_secs(60), "three httpd replicas", all_up(3))
        .await;
    let ids_before: BTreeMap<String, String> = in_ring(&s)
        .into_iter()
        .map(|n| {
            let id = replica(&s, &n)["instance"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (n, id)
        })
        .collect();
    let c = client();
    let mut owners = BTreeMap::new();
    for id in 0..150 {
        let v = env_of_key(&c, &gw.url(""), id).await.expect("an answer");
        owners.insert(id, v["SERVER_ID"].clone());
    }
    let owners = Arc::new(owners);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let versions = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (stop, ok, failures, versions, owners) = (
                stop.clone(),
                ok.clone(),
                failures.clone(),
                versions.clone(),
                owners.clone(),
            );
            let base = gw.url("");
            tokio::spawn(async move {
                let c = client();
                let mut id = w;
                while !stop.load(Ordering::Relaxed) {
                    match env_of_key(&c, &base, id).await {
                        Ok(v) if owners.get(&id) == v.get("SERVER_ID") => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let ver = v.get("VERSION").cloned().unwrap_or_default();
                            *versions.lock().expect("lock").entry(ver).or_default() += 1;
                        }
                        Ok(v) => failures.lock().expect("lock").push(format!(
                            "key {id} on {:?}, owned by {:?}",
                            v.get("SERVER_ID"),
                            owners.get(&id)
                        )),
                        Err(e) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("key {id}: {e}")),
                    }
                    id = (id + 7) % 150;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    let edited = Instant::now();
    std::fs::write(
        &gw.config_path,
        text.replace("VERSION = \"1\"", "VERSION = \"2\""),
    )
    .expect("edit");
    let s = gw
        .wait_status(Duration::from_secs(90), "the roll done", |s| {
            s["roll"]["state"] == "done"
        })
        .await;
    let took = edited.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let (ok, failures, versions) = (
        ok.load(Ordering::Relaxed),
        failures.lock().expect("lock").clone(),
        versions.lock().expect("lock").clone(),
    );
    println!(
        "env edit rolled 3 busybox httpd containers in {took:?} (the roll itself: {} ms); {ok} requests ok meanwhile, by VERSION: {versions:?}",
        s["roll"]["elapsed_ms"]
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 50, "{ok}");
    assert!(
        versions.contains_key("1") && versions.contains_key("2"),
        "{versions:?}"
    );
    // The same replicas, each in a new container that took its name; the old ones are gone.
    let t = Instant::now();
    while scope.containers().len() > 3 && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = gw.status().await;
    for (name, old_id) in &ids_before {
        let new_id = replica(&s, name)["instance"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_ne!(&new_id, old_id, "{name}: a new container");
        let c = inspect(name).unwrap_or_else(|| panic!("no container named {name}"));
        assert_eq!(
            c["Id"].as_str(),
            Some(new_id.as_str()),
            "{name}: the new container took the name"
        );
        assert!(
            docker(&["inspect", "--type", "container", old_id]).is_err(),
            "{name}: the old container was removed"
        );
    }
    assert_eq!(
        scope.containers().len(),
        3,
        "no replacement left behind: {:?}",
        scope.containers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_or_mount_source_is_named_at_check_and_at_add_and_changes_nothing() {
    require_docker!();
    ensure_example_httpd_image();
    let scope = Scope::new("hbad");
    let missing_image = format!("{}-missing:1", scope.instance);

    // At `ringgate check`: both are known before anything starts.
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("lb.toml");
    std::fs::write(
        &path,
        format!(
            "[provider]\nkind = \"docker\"\nimage = \"{missing_image}\"\nmounts = [\"/no/such/dir-rg27:/www\"]\n"
        ),
    )
    .expect("write");
    let out = std::process::Command::new(support::GATEWAY_BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("ringgate check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "line 3: provider.image: the image {missing_image} does not exist on the Docker engine"
        )),
        "{err}"
    );
    assert!(
        err.contains("line 4: provider.mounts") && err.contains("/no/such/dir-rg27 does not exist"),
        "{err}"
    );

    // At `/add` (a gateway started anyway, or an image removed meanwhile): the replica and the
    // cause are named, nothing is added, no container is left.
    let gw = start_gateway(&scope, &missing_image, "[replicas]\ncount = 0\n");
    let name = scope.name("m");
    let (code, body) = call(
        "POST",
        &gw.url("/add"),
        &format!(r#"{{"n": 1, "hostnames": ["{name}"]}}"#),
    )
    .await;
    let message = json(&body)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("{code}: {message}");
    assert_eq!(code, 500, "{body}");
    assert!(
        message.contains(&format!(
            "Replica '{name}' failed to start: image {missing_image} not found"
        )) && message.ends_with("nothing was added"),
        "{message}"
    );
    assert!(gw.replica_names().await.is_empty());
    drop(gw);

    let site = tempfile::tempdir().expect("site");
    let gone = site.path().join("not-there");
    let gw: GatewayProcess = start_gateway(
        &scope,
        EXAMPLE_HTTPD_IMAGE,
        &format!(
            "container_port = 8080\nmounts = [\"{}:/www\"]\n[replicas]\ncount = 0\n",
            gone.display()
        ),
    );
    let (code, body) = call(
        "POST",
        &gw.url("/add"),
        &format!(r#"{{"n": 1, "hostnames": ["{name}"]}}"#),
    )
    .await;
    let message = json(&body)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("{code}: {message}");
    assert_eq!(code, 500, "{body}");
    assert!(
        message.contains(&format!("Replica '{name}' failed to start"))
            && message.contains(&gone.display().to_string())
            && message.ends_with("nothing was added"),
        "{message}"
    );
    assert!(gw.replica_names().await.is_empty());
    assert!(scope.containers().is_empty(), "{:?}", scope.containers());
}
