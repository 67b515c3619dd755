//! `ringgate-lab forward`, the floor of `make bench`, as the bench runs it: real processes on
//! 127.0.0.1 (two `ringgate-lab backend`s and the relay in front of them), every request of the
//! load generator answered through it, connections spread over both backends; and a relay
//! started without backends says what is missing. Every child is killed on drop.

use std::process::Stdio;
use std::time::Duration;

use ringgate_lab::loadgen::{self, LoadConfig};
use ringgate_lab::procs;
use tokio::process::{Child, Command};

const LAB: &str = env!("CARGO_BIN_EXE_ringgate-lab");

/// A child process of the test, killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn start(
    what: &str,
    envs: &[(&str, String)],
) -> Result<(Killed, std::net::SocketAddr), Box<dyn std::error::Error>> {
    let mut cmd = Command::new(LAB);
    cmd.arg(what)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = Killed(cmd.spawn()?);
    let addr = procs::wait_listening(&mut child.0, what, Duration::from_secs(10)).await?;
    Ok((child, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_every_request_to_the_backends() -> Result<(), Box<dyn std::error::Error>>
{
    let mut backends = Vec::new();
    let mut addrs = Vec::new();
    for id in ["server-1", "server-2"] {
        let (child, addr) =
            start("backend", &[("SERVER_ID", id.into()), ("PORT", "0".into())]).await?;
        backends.push(child);
        addrs.push(addr.to_string());
    }
    let (_relay, relay) = start(
        "forward",
        &[
            ("FORWARD_TO", addrs.join(",")),
            ("THREADS", "2".into()),
            ("PORT", "0".into()),
        ],
    )
    .await?;

    let mut cfg = LoadConfig::new(format!("http://{relay}/home"), 400, 8);
    cfg.timeout = Duration::from_secs(5);
    let summary = loadgen::run(&cfg).await?.summary();
    assert_eq!(summary.ok, 400, "every request answered: {summary:?}");
    // Each connection is paired with one backend, round robin: eight connections reach both.
    for id in ["server-1", "server-2"] {
        assert!(
            summary.per_server.get(id).copied().unwrap_or(0) > 0,
            "{id} answered none: {:?}",
            summary.per_server
        );
    }
    Ok(())
}

/// A relay run with `FORWARD_TO` set to `to` (unset for `None`), to its end: its exit status
/// and what it said.
async fn forward_with(to: Option<&str>) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let mut cmd = Command::new(LAB);
    cmd.arg("forward").stdin(Stdio::null());
    match to {
        Some(to) => cmd.env("FORWARD_TO", to),
        None => cmd.env_remove("FORWARD_TO"),
    };
    let out = cmd.output().await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn a_relay_without_backends_says_what_is_missing() -> Result<(), Box<dyn std::error::Error>> {
    for (to, named) in [
        (None, "FORWARD_TO"),
        (Some(""), "FORWARD_TO names no backend"),
        (Some("127.0.0.1:notaport"), "127.0.0.1:notaport"),
    ] {
        let (ok, stderr) = forward_with(to).await?;
        assert!(!ok, "{to:?} started a relay");
        assert!(stderr.contains(named), "{to:?}: {stderr}");
    }
    Ok(())
}
