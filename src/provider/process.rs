//! The `process` provider: replicas as local `ringgate-server` child processes.
//!
//! Owns: starting children on free loopback ports, stopping them, and reporting their exit the
//! moment it happens.
//! Must not touch: health or routing.
//!
//! No orphans, even when the gateway is SIGKILLed: each child's stdin is a pipe whose only
//! writer is the gateway, and the child exits when it reads EOF. The kernel closes the pipe when
//! the gateway dies, however it dies. The child picks its own port (it binds port 0 and prints
//! the address), so there is no race for a "free" port.
//!
//! A child starts with a clean environment: exactly `SERVER_ID`, `PORT`, `BIND`,
//! `RINGGATE_EXIT_ON_STDIN_EOF` (what ringgate-server reads) and the gateway's `PATH` (so a
//! `provider.server_binary` that is a wrapper script finds its tools; it is not a secret).
//! Nothing else of the gateway's environment (tokens, cloud credentials, `DOCKER_HOST`,
//! `RUST_LOG`: ringgate-server logs nothing but errors) reaches a replica.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use super::{BoxFuture, Instance, Provider, ProviderError, ProviderEvent, ReplicaSpec};

/// How long a child has to bind and print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child has to exit after its stdin closes before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds `ringgate-server`: the configured path, or the binary beside the running executable.
pub fn server_binary(configured: Option<&Path>) -> Result<PathBuf, ProviderError> {
    let path = match configured {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .map_err(|e| ProviderError::Setup(format!("cannot locate the ringgate binary: {e}")))?
            .with_file_name("ringgate-server"),
    };
    if path.is_file() {
        // Absolute, so that running it never depends on a search path.
        Ok(std::path::absolute(&path).unwrap_or(path))
    } else {
        Err(ProviderError::Setup(format!(
            "ringgate-server not found at {}: build it (`cargo build --release`) or set provider.server_binary",
            path.display()
        )))
    }
}

struct Running {
    pid: String,
    /// Dropping it closes the child's stdin, which asks it to exit.
    stdin: Option<ChildStdin>,
    exited: Option<oneshot::Receiver<()>>,
    kill: Option<oneshot::Sender<()>>,
}

pub struct ProcessProvider {
    binary: PathBuf,
    children: Arc<Mutex<HashMap<String, Running>>>,
    events: mpsc::Sender<ProviderEvent>,
}

impl ProcessProvider {
    pub fn new(binary: PathBuf, events: mpsc::Sender<ProviderEvent>) -> ProcessProvider {
        ProcessProvider {
            binary,
            children: Arc::new(Mutex::new(HashMap::new())),
            events,
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        crate::sync::lock(&self.children)
    }

    async fn start(&self, spec: ReplicaSpec) -> Result<Instance, ProviderError> {
        let fail = |reason: String| ProviderError::Spawn {
            hostname: spec.hostname.clone(),
            reason,
        };
        if self.children().contains_key(&spec.hostname) {
            return Err(fail("a process with this name is already running".into()));
        }
        let mut command = Command::new(&self.binary);
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        let mut child = command
            .env("SERVER_ID", &spec.hostname)
            .env("PORT", "0")
            .env("BIND", "127.0.0.1")
            .env("RINGGATE_EXIT_ON_STDIN_EOF", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.binary.display())))?;
        let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail("no stdout pipe".into()))?;
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let addr = match first {
            Ok(Ok(Some(line))) => crate::listening::parse(&line).ok_or_else(|| {
                fail(format!(
                    "unexpected first line from ringgate-server: {line:?}"
                ))
            })?,
            Ok(Ok(None)) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                return Err(fail(format!("it exited before listening ({status})")));
            }
            Ok(Err(e)) => return Err(fail(format!("cannot read its output: {e}"))),
            Err(_) => return Err(fail(format!("it did not listen within {START_TIMEOUT:?}"))),
        };

        let (exited_tx, exited_rx) = oneshot::channel();
        let (kill_tx, kill_rx) = oneshot::channel();
        self.children().insert(
            spec.hostname.clone(),
            Running {
                pid: pid.clone(),
                stdin,
                exited: Some(exited_rx),
                kill: Some(kill_tx),
            },
        );
        tokio::spawn(watch_child(
            child,
            lines,
            spec.hostname.clone(),
            pid.clone(),
            kill_rx,
            exited_tx,
            self.events.clone(),
            self.children.clone(),
        ));
        Ok(Instance {
            id: spec.id,
            hostname: spec.hostname,
            addr,
            instance_id: pid,
            slots: None,
        })
    }

    async fn stop(&self, hostname: &str) {
        let (stdin, exited, kill) = {
            let mut children = self.children();
            let Some(r) = children.get_mut(hostname) else {
                return;
            };
            (r.stdin.take(), r.exited.take(), r.kill.take())
        };
        drop(stdin);
        if let Some(exited) = exited {
            if tokio::time::timeout(STOP_TIMEOUT, exited).await.is_err() {
                tracing::warn!(
                    replica = hostname,
                    "replica did not exit after its stdin closed; killing it"
                );
                if let Some(kill) = kill {
                    let _ = kill.send(());
                }
            }
        }
        self.children().remove(hostname);
    }
}

/// Waits for the child to exit (or to be killed) and reports it at once.
#[allow(clippy::too_many_arguments)]
async fn watch_child(
    mut child: Child,
    mut stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    hostname: String,
    pid: String,
    kill: oneshot::Receiver<()>,
    exited: oneshot::Sender<()>,
    events: mpsc::Sender<ProviderEvent>,
    children: Arc<Mutex<HashMap<String, Running>>>,
) {
    // Keep reading stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let detail = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    {
        let mut map = crate::sync::lock(&children);
        // Died on its own (`stop` has not taken its exit signal): forget it so a replacement
        // can take the name.
        if map
            .get(&hostname)
            .is_some_and(|r| r.pid == pid && r.exited.is_some())
        {
            map.remove(&hostname);
        }
    }
    let _ = exited.send(());
    let _ = events
        .send(ProviderEvent::Exited {
            hostname,
            instance_id: pid,
            detail,
        })
        .await;
}

impl Provider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn manages_replicas(&self) -> bool {
        true
    }

    fn spawn(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Instance, ProviderError>> {
        Box::pin(self.start(spec))
    }

    fn remove(&self, hostname: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let hostname = hostname.to_owned();
        Box::pin(async move {
            self.stop(&hostname).await;
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        // Children never outlive the gateway, so there is nothing to adopt.
        Box::pin(async { Ok(Vec::new()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let names: Vec<String> = self.children().keys().cloned().collect();
            futures_util::future::join_all(names.iter().map(|n| self.stop(n))).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e =
            server_binary(Some(Path::new("/nonexistent/ringgate-server"))).expect_err("missing");
        assert!(e.to_string().contains("provider.server_binary"), "{e}");
    }
}
