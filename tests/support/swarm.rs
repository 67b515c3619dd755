//! Helpers for tests against a real single-node Docker Swarm.
//!
//! Owns: joining a swarm for the tests (initialising a single-node one with `docker swarm init
//! --advertise-addr 127.0.0.1` when the engine is in none, and leaving it when the last test of
//! the process is done, only if it was initialised here, and removing the `docker_gwbridge`
//! network the init created), a [`Ring`] scope (a unique instance
//! label and network; on drop every service, container and network carrying that label is
//! removed, also when the test failed), gateways with the swarm provider as host processes
//! (reaching replicas on their published ports, so all traffic stays on loopback), and a
//! gateway image built from this build's binary for tests that run the gateway as a service.
//!
//! Without an engine or a swarm a test never passes in silence: [`require_swarm!`] makes it
//! print `<test>: skipped: no Docker Swarm (<reason>)` (or `no Docker engine`) and return, or,
//! with `RINGGATE_REQUIRE_ENGINES=1` (set by `.ci/run`), fail with that reason (see
//! `engines.rs`).
//!
//! Everything goes through the `docker` CLI, as an operator would check it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::docker_support::{docker, unique};

/// The bridge `docker swarm init` creates and `docker swarm leave` keeps.
const GWBRIDGE: &str = "docker_gwbridge";

/// This process's hold on the swarm.
struct Held {
    /// How many tests hold it.
    tests: u32,
    /// Whether this process initialised it (and so leaves it).
    initialised: bool,
    /// Whether the engine had the swarm's gateway bridge before that (then it is not ours).
    gwbridge_was_there: bool,
}

static SWARM: Mutex<Held> = Mutex::new(Held {
    tests: 0,
    initialised: false,
    gwbridge_was_there: true,
});

/// A test's hold on the swarm: the last one dropped leaves it if this process joined it.
pub struct SwarmHold;

/// Joins (or finds) a swarm for a test; `Err` says why there cannot be one here.
pub fn hold() -> Result<SwarmHold, String> {
    let mut s = SWARM.lock().unwrap_or_else(|p| p.into_inner());
    let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
    match state.as_str() {
        "active" => {}
        "inactive" => {
            s.gwbridge_was_there = docker(&["network", "inspect", GWBRIDGE]).is_ok();
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])
                .map_err(|e| format!("docker swarm init failed: {e}"))?;
            eprintln!("initialised a single-node swarm for the tests (left again when they end)");
            s.initialised = true;
        }
        other => return Err(format!("the engine's swarm state is {other:?}")),
    }
    if docker(&["info", "--format", "{{.Swarm.ControlAvailable}}"])?.as_str() != "true" {
        return Err("this engine is a Swarm worker, not a manager".into());
    }
    s.tests += 1;
    Ok(SwarmHold)
}

impl Drop for SwarmHold {
    fn drop(&mut self) {
        let mut s = SWARM.lock().unwrap_or_else(|p| p.into_inner());
        s.tests = s.tests.saturating_sub(1);
        if s.tests == 0 && s.initialised {
            let _ = docker(&["swarm", "leave", "--force"]);
            if !s.gwbridge_was_there {
                let _ = docker(&["network", "rm", GWBRIDGE]);
            }
            s.initialised = false;
        }
    }
}

/// Returns early from a test, saying why, when there is no engine or no swarm; fails it instead
/// under `RINGGATE_REQUIRE_ENGINES=1`.
macro_rules! require_swarm {
    () => {{
        require_docker!();
        match crate::swarm_support::hold() {
            Ok(h) => h,
            Err(reason) => {
                crate::docker_support::engines::missing("no Docker Swarm", &reason);
                return;
            }
        }
    }};
}

/// One ring of the swarm: its instance label and replica network, removed on drop.
pub struct Ring {
    pub instance: String,
    pub network: String,
    extra_services: Vec<String>,
}

impl Ring {
    pub fn new(test: &str) -> Ring {
        let instance = unique(test);
        Ring {
            network: format!("{instance}-net"),
            instance,
            extra_services: Vec::new(),
        }
    }

    /// Removes service `name` too when the ring ends (a gateway service of the test).
    pub fn track_service(&mut self, name: &str) {
        self.extra_services.push(name.to_owned());
    }

    fn label(&self) -> String {
        format!("label=ringgate.instance={}", self.instance)
    }

    /// Our replica services: (name, labels as `docker service inspect` shows them).
    pub fn services(&self) -> Vec<(String, serde_json::Value)> {
        let names = docker(&[
            "service",
            "ls",
            "--filter",
            &self.label(),
            "--filter",
            "label=ringgate.role=replica",
            "--format",
            "{{.Name}}",
        ])
        .unwrap_or_default();
        names
            .lines()
            .filter_map(|n| {
                let out = docker(&["service", "inspect", n]).ok()?;
                let v: serde_json::Value = serde_json::from_str(&out).ok()?;
                Some((n.to_owned(), v[0]["Spec"]["Labels"].clone()))
            })
            .collect()
    }

    /// The id of the container running replica `name`'s task now.
    pub fn task_container(&self, name: &str) -> Option<String> {
        let filter = format!("label=com.docker.swarm.service.name={name}");
        let ids = docker(&["ps", "-q", "--no-trunc", "--filter", &filter]).ok()?;
        ids.lines().next().map(str::to_owned)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let mut services: Vec<String> = docker(&["service", "ls", "-q", "--filter", &self.label()])
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        services.extend(self.extra_services.iter().cloned());
        if !services.is_empty() {
            let mut args = vec!["service", "rm"];
            args.extend(services.iter().map(String::as_str));
            let _ = docker(&args);
        }
        // Tasks stop asynchronously; the network can go once they have.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let left = docker(&["ps", "-aq", "--filter", &self.label()]).unwrap_or_default();
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let nets: Vec<String> = docker(&["network", "ls", "-q", "--filter", &self.label()])
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        for n in nets.iter().chain(std::iter::once(&self.network)) {
            for _ in 0..20 {
                match docker(&["network", "rm", n]) {
                    Ok(_) => break,
                    Err(e) if e.contains("No such network") || e.contains("not found") => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(250)),
                }
            }
        }
    }
}

/// The gateway config of a swarm test: the ring's label and network, replicas reached on their
/// published ports (loopback), quick checks, retries on connect failures and resets, and
/// `sections` (TOML) appended.
pub fn gateway_toml(ring: &Ring, name: &str, listen: &str, sections: &str) -> String {
    let mut toml = format!(
        "listen = \"{listen}\"\nname = \"{name}\"\n\
         [provider]\nkind = \"swarm\"\nimage = \"{}\"\nnetwork = \"{}\"\nreach = \"published\"\n\
         [health]\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         [proxy]\nretry_on = [\"connect-failure\", \"reset\"]\nretries = 3\n",
        crate::docker_support::SERVER_IMAGE,
        ring.network
    );
    toml.push_str(sections);
    if !sections.contains("name_prefix") {
        let prefix = format!("name_prefix = \"{}-s\"\n", ring.instance);
        if sections.contains("[replicas]\n") {
            toml = toml.replace("[replicas]\n", &format!("[replicas]\n{prefix}"));
        } else {
            toml.push_str(&format!("[replicas]\n{prefix}"));
        }
    }
    toml
}

/// A gateway process with the swarm provider on `ring`.
pub fn start_gateway(ring: &Ring, name: &str, sections: &str) -> crate::support::GatewayProcess {
    crate::support::GatewayProcess::start_with(
        &gateway_toml(ring, name, "127.0.0.1:0", sections),
        &[("RINGGATE_INSTANCE_LABEL", &ring.instance)],
    )
}

/// Makes sure the replica image has its health check (`ringgate-server --check`, added with
/// the swarm provider): an older image would never turn healthy. Rebuilds it when it lacks one.
pub fn ensure_server_image_checks() {
    let hc = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Healthcheck}}",
        crate::docker_support::SERVER_IMAGE,
    ])
    .unwrap_or_default();
    if hc.contains("--check") {
        return;
    }
    eprintln!("{} has no health check (built before the swarm provider): rebuilding it with `make -f docker/docker.mk images`", crate::docker_support::SERVER_IMAGE);
    let ok = Command::new("make")
        .args(["-f", "docker/docker.mk", "images"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`make images` failed: the swarm tests need a current ringgate-server image"
    );
}

/// An image of this build's `ringgate` binary (FROM scratch, with the shared libraries it
/// links), so a test runs the gateway as a Swarm service without a static release build.
/// Returns its tag; the caller removes it.
pub fn gateway_image(tag: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bin = Path::new(crate::support::GATEWAY_BIN);
    let ldd = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let mut copies = Vec::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            copies.push(path.to_owned());
        }
    }
    let mut dockerfile = String::from("FROM scratch\n");
    for (k, lib) in copies.iter().enumerate() {
        let name = format!("lib{k}");
        std::fs::copy(lib, dir.path().join(&name)).map_err(|e| format!("copy {lib}: {e}"))?;
        dockerfile.push_str(&format!("COPY {name} {lib}\n"));
    }
    std::fs::copy(bin, dir.path().join("ringgate")).map_err(|e| e.to_string())?;
    std::fs::create_dir(dir.path().join("policies")).map_err(|e| e.to_string())?;
    dockerfile.push_str(
        "COPY ringgate /ringgate\nCOPY policies /policies\nLABEL ringgate.test-image=true\n\
         ENTRYPOINT [\"/ringgate\"]\n",
    );
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).map_err(|e| e.to_string())?;
    let dir_str = dir.path().to_string_lossy().into_owned();
    docker(&["build", "-q", "-t", tag, &dir_str])?;
    Ok(())
}

/// A free loopback port (bound and released: a test-only race window, as other tests accept).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
