//! Helpers for tests against the real Docker engine.
//!
//! Owns: deciding whether an engine answers, making sure the `ringgate-server:latest` image
//! exists (building it with `make -f docker/docker.mk images` on a fresh clone), unique per-run
//! names and labels, and a guard that removes everything a test created, also when the test
//! fails.
//!
//! Without an engine a test never passes in silence: [`require_docker!`] makes it print
//! `<test>: skipped: no Docker engine (<reason>)` and return, or, with
//! `RINGGATE_REQUIRE_ENGINES=1` (set by `.ci/run`), fail with that reason (see `engines.rs`).
//!
//! Everything goes through the `docker` CLI (which honours `DOCKER_HOST`), as an operator would
//! check it.
#![allow(dead_code)]

#[path = "engines.rs"]
pub mod engines;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SERVER_IMAGE: &str = "ringgate-server:latest";

/// Runs `docker args…`; Ok(stdout) on success, Err(stderr) otherwise.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Why the Docker tests cannot run here, or None when an engine answers and the replica image
/// exists (it is built if missing).
pub fn unavailable() -> Option<String> {
    static STATE: OnceLock<Option<String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if let Err(e) = docker(&["version", "--format", "{{.Server.APIVersion}}"]) {
                return Some(
                    e.lines()
                        .next()
                        .unwrap_or("docker version failed")
                        .to_owned(),
                );
            }
            ensure_image();
            None
        })
        .clone()
}

/// Returns early from a test, saying why, when no engine answers; fails it instead under
/// `RINGGATE_REQUIRE_ENGINES=1`. Needs the module declared as
/// `#[macro_use] #[path = "support/docker.rs"] mod docker_support;`.
macro_rules! require_docker {
    () => {
        if let Some(reason) = crate::docker_support::unavailable() {
            crate::docker_support::engines::missing("no Docker engine", &reason);
            return;
        }
    };
}

/// Builds `ringgate-server:latest` when it is missing (a fresh clone) or older than the
/// features the tests use (its `ringgate.server-features` label: `/ws` came with tunnels): the
/// tests need it, and nothing can be pulled.
fn ensure_image() {
    let features = docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"ringgate.server-features\"}}",
        SERVER_IMAGE,
    ]);
    if features.is_ok_and(|f| f.split_whitespace().any(|f| f == "ws")) {
        return;
    }
    eprintln!("{SERVER_IMAGE} is missing: building it with `make -f docker/docker.mk images` (a few minutes)");
    let status = Command::new("make")
        .args(["-f", "docker/docker.mk", "images"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`make images` failed ({s}): the Docker tests need {SERVER_IMAGE}"),
        Err(e) => panic!("cannot run make to build {SERVER_IMAGE}: {e}"),
    }
}

/// The walkthrough's third-party server (docs/deployment.md): busybox httpd, FROM scratch.
pub const EXAMPLE_HTTPD_IMAGE: &str = "ringgate-example-httpd:latest";

/// Builds [`EXAMPLE_HTTPD_IMAGE`] with the project's own target (`make -f docker/docker.mk
/// example-httpd`, which installs Debian's busybox-static when it is missing) unless it
/// exists. It is the documented example's image, not a test's own, so it is kept (`make
/// clean` removes it).
pub fn ensure_example_httpd_image() {
    // Tests of one binary run in parallel: one builds, the others wait for it.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    if docker(&["image", "inspect", EXAMPLE_HTTPD_IMAGE]).is_ok() {
        return;
    }
    eprintln!("{EXAMPLE_HTTPD_IMAGE} is missing: building it with `make -f docker/docker.mk example-httpd`");
    let status = Command::new("make")
        .args(["-f", "docker/docker.mk", "example-httpd"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`make example-httpd` failed ({s}): the test needs {EXAMPLE_HTTPD_IMAGE}"),
        Err(e) => panic!("cannot run make to build {EXAMPLE_HTTPD_IMAGE}: {e}"),
    }
}

/// A short name unique to this test run: process id, time and a counter.
pub fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or(0);
    format!(
        "rgt{}-{t}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Everything one test creates: its instance label, its network, and any extra containers. On
/// drop (success or panic) it removes all of it.
pub struct Scope {
    pub instance: String,
    pub network: String,
    extra: Vec<String>,
}

impl Scope {
    pub fn new(test: &str) -> Scope {
        let instance = unique(test);
        Scope {
            network: format!("{instance}-net"),
            instance,
            extra: Vec::new(),
        }
    }

    /// A scope with its own label on another scope's network.
    pub fn with_network(test: &str, network: &str) -> Scope {
        let mut scope = Scope::new(test);
        scope.network = network.to_owned();
        scope
    }

    /// A container name unique to this scope.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.instance)
    }

    /// Removes `name` too when the scope ends (for containers not labelled with the instance).
    pub fn track(&mut self, name: &str) {
        self.extra.push(name.to_owned());
    }

    /// Containers carrying this scope's instance label: (name, id, state).
    pub fn containers(&self) -> Vec<(String, String, String)> {
        let filter = format!("label=ringgate.instance={}", self.instance);
        docker(&[
            "ps",
            "-a",
            "--filter",
            &filter,
            "--format",
            "{{.Names}} {{.ID}} {{.State}}",
        ])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_owned(),
                it.next()?.to_owned(),
                it.next()?.to_owned(),
            ))
        })
        .collect()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let filter = format!("label=ringgate.instance={}", self.instance);
        let mut ids: Vec<String> = docker(&["ps", "-aq", "--filter", &filter])
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        ids.extend(self.extra.iter().cloned());
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let nets: Vec<String> = docker(&["network", "ls", "-q", "--filter", &filter])
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        for n in nets.iter().chain(std::iter::once(&self.network)) {
            // Only ours: the scope's network name is unique to this run.
            let _ = docker(&["network", "rm", n]);
        }
    }
}

/// `docker inspect` of one container, or None when it does not exist.
pub fn inspect(name: &str) -> Option<Value> {
    let out = docker(&["inspect", "--type", "container", name]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v.get(0).cloned()
}

/// One plain HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not HTTP: {text:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Retries `GET path` until it answers 200 or `within` passes.
pub async fn wait_ok(
    addr: std::net::SocketAddr,
    path: &str,
    within: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    loop {
        match http_get(addr, path).await {
            Ok((200, body)) => return Ok(body),
            Ok((s, body)) if start.elapsed() > within => return Err(format!("status {s}: {body}")),
            Err(e) if start.elapsed() > within => return Err(e.to_string()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Starts a `ringgate serve` with the docker provider, its replicas labelled with the scope's
/// instance label and attached to the scope's network, generated replica names prefixed with the
/// scope's unique name, and `sections` (TOML, e.g. `"[replicas]\ncount = 2\n"`) appended.
/// Dropping it kills the gateway; the scope then removes the containers.
pub fn start_gateway(scope: &Scope, image: &str, sections: &str) -> crate::support::GatewayProcess {
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\n[provider]\nkind = \"docker\"\nimage = \"{image}\"\nnetwork = \"{}\"\n",
        scope.network
    );
    toml.push_str(sections);
    if !sections.contains("name_prefix") {
        let prefix = format!("[replicas]\nname_prefix = \"{}-s\"\n", scope.instance);
        if sections.contains("[replicas]") {
            toml = toml.replace("[replicas]\n", &prefix);
        } else {
            toml.push_str(&prefix);
        }
    }
    crate::support::GatewayProcess::start_with(
        &toml,
        &[("RINGGATE_INSTANCE_LABEL", &scope.instance)],
    )
}
