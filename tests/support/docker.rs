//! Helpers for tests against the real Docker engine.
//!
//! Owns: deciding whether an engine answers (and saying so when it does not: a skipped test
//! prints `skipped: no Docker engine (<reason>)`, it never passes silently), making sure the
//! `ringgate-server:latest` image exists (building it with `make -f docker/docker.mk images` on a
//! fresh clone), unique per-run names and labels, and a guard that removes everything a test
//! created, also when the test fails.
//!
//! Everything goes through the `docker` CLI, as an operator would check it.
#![allow(dead_code)]

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

/// Returns early from a test, saying why, when no engine answers. Needs the module declared as
/// `#[macro_use] #[path = "support/docker.rs"] mod docker_support;`.
macro_rules! require_docker {
    () => {
        if let Some(reason) = crate::docker_support::unavailable() {
            // Straight to the stderr handle: libtest's capture only hides print!/eprint!, so
            // the skip shows in a plain `cargo test` run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "{}: skipped: no Docker engine ({reason})",
                std::thread::current().name().unwrap_or(module_path!())
            );
            return;
        }
    };
}

/// Builds `ringgate-server:latest` when it is missing (a fresh clone): the tests need it, and
/// nothing can be pulled.
fn ensure_image() {
    if docker(&["image", "inspect", SERVER_IMAGE]).is_ok() {
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

/// A `ringgate serve` with the docker provider, its replicas labelled with the scope's instance
/// label and attached to the scope's network. Dropping it kills the gateway; the scope then
/// removes the containers.
pub struct DockerGateway {
    child: Option<std::process::Child>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    instance: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl DockerGateway {
    /// Starts a gateway with `[provider] kind = "docker"` on the scope's network, generated
    /// replica names prefixed with the scope's unique name, and `sections` (TOML, e.g.
    /// `"[replicas]\ncount = 2\n"`) appended.
    pub fn start(scope: &Scope, image: &str, sections: &str) -> DockerGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).expect("policy dir");
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\n[provider]\nkind = \"docker\"\nimage = \"{image}\"\nnetwork = \"{}\"\n\
             [policy]\ndir = \"{}\"\n",
            scope.network,
            policies.display()
        );
        toml.push_str(sections);
        if !sections.contains("name_prefix") {
            toml = toml.replace(
                "[replicas]\n",
                &format!("[replicas]\nname_prefix = \"{}-s\"\n", scope.instance),
            );
            if !sections.contains("[replicas]") {
                toml.push_str(&format!(
                    "[replicas]\nname_prefix = \"{}-s\"\n",
                    scope.instance
                ));
            }
        }
        std::fs::write(dir.path().join("lb.toml"), toml).expect("write config");
        let mut gw = DockerGateway {
            child: None,
            addr: "127.0.0.1:1".parse().expect("addr"),
            dir,
            instance: scope.instance.clone(),
            log: Default::default(),
        };
        gw.launch();
        gw
    }

    /// Starts the gateway process (again, after [`stop`](Self::stop)) with the same config.
    pub fn launch(&mut self) {
        use std::io::{BufRead, BufReader, Read};
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringgate"))
            .args(["serve", "--config"])
            .arg(self.dir.path().join("lb.toml"))
            .current_dir(self.dir.path())
            .env("RINGGATE_INSTANCE_LABEL", &self.instance)
            .env("RUST_LOG", "info,ringgate=debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ringgate");
        let stderr = child.stderr.take().expect("stderr");
        let sink = self.log.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if std::env::var_os("RINGGATE_TEST_LOG").is_some() {
                    eprint!("{line}");
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                }
                line.clear();
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        self.child = Some(child);
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        match line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
        {
            Some(addr) => self.addr = addr,
            None => panic!(
                "gateway did not start: stdout {line:?}\nlog:\n{}",
                self.log()
            ),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// SIGTERM, then waits for the gateway to exit; true when it did within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for DockerGateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
