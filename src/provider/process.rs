//! The `process` provider: replicas as local child processes, the built-in `ringgate-server`
//! or the user's own program (`provider.command`).
//!
//! Owns: starting children (on a free loopback port the gateway picks, or one they announce),
//! keeping the last lines they write, stopping them (a roll has two instances of one hostname
//! for a moment: each is stopped by its pid), and reporting their exit the moment it happens.
//! Must not touch: health or routing.
//!
//! The port: with `port = "pick"` (the default for a `command`) the gateway binds
//! `127.0.0.1:0`, reads the port the kernel gave, closes it and passes it as `PORT` and
//! `{port}`; the app binds it a moment later (another process taking it in between is a start
//! failure, retried like any). With `"announce"` (the built-in server's way) the child binds a
//! port of its own and prints `listening on http://ADDR` on its standard output: no race at
//! all.
//!
//! A child starts with a clean environment: exactly `provider.env` (placeholders filled in),
//! `PORT`, `SERVER_ID` and the gateway's `PATH` (unless `env` sets one; it is no secret, and a
//! program named without a path is found through it); the built-in server also gets `BIND` and
//! `RINGGATE_EXIT_ON_STDIN_EOF`. Nothing else of the gateway's environment (tokens, cloud
//! credentials, `DOCKER_HOST`, `RUST_LOG`) reaches a replica.
//!
//! No orphans, even when the gateway is SIGKILLed: the kernel kills a child whose parent dies
//! (`PR_SET_PDEATHSIG`), and the built-in server also exits when its stdin, a pipe only the
//! gateway writes, reaches EOF. Each child leads its own process group, so stopping it (SIGTERM,
//! then SIGKILL after [`STOP_TIMEOUT`]) also stops what it started itself (a shell's children).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use super::{BoxFuture, Instance, Provider, ProviderError, ProviderEvent, ReplicaSpec};
use crate::config::replica::Vars;
use crate::config::PortMode;
use crate::provider::AppSpec;

/// Longest a child may take to print its `listening on` line; the controller gives up
/// earlier (`provider.start_timeout`) and stops it.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a child has to exit after SIGTERM (and its stdin closing) before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of output kept per child, for the error that says why it is not ready.
const TAIL_LINES: usize = 20;
/// Longest output line kept (the rest is cut): a child that writes one endless line must not
/// grow the gateway.
const TAIL_LINE_BYTES: usize = 512;
/// Lines of output an exit report quotes.
const EXIT_LINES: usize = 5;

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

/// The `PATH` a replica gets: `env`'s own, else the gateway's.
fn replica_path(app: &AppSpec) -> Option<std::ffi::OsString> {
    match app.env.get("PATH") {
        Some(p) => Some(p.into()),
        None => std::env::var_os("PATH"),
    }
}

/// The program a process replica runs, as an absolute path: `command[0]` (a path with a `/` is
/// taken relative to `workdir`; a bare name is looked up in the replica's `PATH`), else the
/// built-in server. The error says what is wrong in the operator's terms.
pub fn program(app: &AppSpec) -> Result<PathBuf, String> {
    let Some(first) = app.command.first() else {
        return server_binary(app.server_binary.as_deref()).map_err(|e| e.detail());
    };
    let found = if first.contains('/') {
        let p = Path::new(first);
        let p = match (&app.workdir, p.is_relative()) {
            (Some(dir), true) => dir.join(p),
            _ => p.to_owned(),
        };
        let p = std::path::absolute(&p).unwrap_or(p);
        if !p.exists() {
            return Err(format!("{} does not exist", p.display()));
        }
        p
    } else {
        let path = replica_path(app).unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(first))
            .find(|c| is_executable_file(c))
            .ok_or_else(|| {
                format!(
                    "{first:?} is not found in the replica's PATH ({})",
                    path.to_string_lossy()
                )
            })?
    };
    if !is_executable_file(&found) {
        return Err(format!(
            "{} is not an executable file (check its permissions, chmod +x)",
            found.display()
        ));
    }
    Ok(found)
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The last lines a child wrote.
#[derive(Default)]
struct Tail(VecDeque<String>);

impl Tail {
    fn push(&mut self, line: &str) {
        let mut line = line.trim_end().to_owned();
        if line.len() > TAIL_LINE_BYTES {
            let mut cut = TAIL_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line);
    }

    fn last(&self, n: usize) -> Vec<String> {
        self.0
            .iter()
            .skip(self.0.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

type SharedTail = Arc<Mutex<Tail>>;

/// One running child.
struct Running {
    hostname: String,
    pid: u32,
    /// Dropping it closes the child's stdin (the built-in server exits on that).
    stdin: Option<ChildStdin>,
    exited: Option<oneshot::Receiver<()>>,
    kill: Option<oneshot::Sender<()>>,
    tail: SharedTail,
    /// Cleared the moment the child is reaped: after that its pid may belong to another
    /// process, which must never get our signals.
    alive: Arc<AtomicBool>,
}

/// Children by pid.
type Children = Arc<Mutex<HashMap<u32, Running>>>;

pub struct ProcessProvider {
    children: Children,
    events: mpsc::Sender<ProviderEvent>,
}

impl ProcessProvider {
    pub fn new(events: mpsc::Sender<ProviderEvent>) -> ProcessProvider {
        ProcessProvider {
            children: Arc::new(Mutex::new(HashMap::new())),
            events,
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Running>> {
        crate::sync::lock(&self.children)
    }

    fn pids_of(&self, hostname: &str) -> Vec<u32> {
        self.children()
            .values()
            .filter(|r| r.hostname == hostname)
            .map(|r| r.pid)
            .collect()
    }

    async fn start(&self, spec: ReplicaSpec) -> Result<Instance, ProviderError> {
        let fail = |reason: String| ProviderError::Spawn {
            hostname: spec.hostname.clone(),
            reason,
        };
        if !spec.beside && !self.pids_of(&spec.hostname).is_empty() {
            return Err(fail("a process with this name is already running".into()));
        }
        let app = &spec.app;
        let program = program(app).map_err(fail)?;
        let mode = app.process_port();
        let port = match mode {
            PortMode::Announce | PortMode::Auto => 0,
            PortMode::Pick => free_loopback_port()
                .map_err(|e| fail(format!("cannot find a free loopback port: {e}")))?,
        };
        let vars = Vars {
            port,
            hostname: &spec.hostname,
            id: spec.id.get(),
        };
        let mut command = Command::new(&program);
        command.args(app.process_args(vars)).env_clear();
        if let Some(path) = replica_path(app) {
            command.env("PATH", path);
        }
        command.envs(app.env(vars));
        command
            .env("SERVER_ID", &spec.hostname)
            .env("PORT", port.to_string());
        if app.is_builtin_server() {
            command
                .env("BIND", "127.0.0.1")
                .env("RINGGATE_EXIT_ON_STDIN_EOF", "1");
        }
        if let Some(dir) = &app.workdir {
            command.current_dir(dir);
        }
        die_with_the_gateway(&mut command);
        let mut child = command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                let dir = app
                    .workdir
                    .as_ref()
                    .map(|d| format!(" in {}", d.display()))
                    .unwrap_or_default();
                fail(format!("cannot run {}{dir}: {e}", program.display()))
            })?;
        let pid = child.id().ok_or_else(|| fail("it exited at once".into()))?;
        let tail = SharedTail::default();
        let (announced_tx, announced_rx) = oneshot::channel();
        let announce = (mode == PortMode::Announce).then_some(announced_tx);
        let readers = [
            child.stdout.take().map(|out| {
                tokio::spawn(read_output(
                    out,
                    spec.hostname.clone(),
                    tail.clone(),
                    announce,
                    false,
                ))
            }),
            child.stderr.take().map(|err| {
                tokio::spawn(read_output(
                    err,
                    spec.hostname.clone(),
                    tail.clone(),
                    None,
                    app.is_builtin_server(),
                ))
            }),
        ];
        let (exited_tx, exited_rx) = oneshot::channel();
        let (kill_tx, kill_rx) = oneshot::channel();
        let alive = Arc::new(AtomicBool::new(true));
        // Known from here on, so that `remove` stops it even while it has not announced yet
        // (the controller gave up on it).
        self.children().insert(
            pid,
            Running {
                hostname: spec.hostname.clone(),
                pid,
                stdin: child.stdin.take(),
                exited: Some(exited_rx),
                kill: Some(kill_tx),
                tail: tail.clone(),
                alive: alive.clone(),
            },
        );
        tokio::spawn(watch_child(
            child,
            readers,
            Watched {
                hostname: spec.hostname.clone(),
                pid,
                alive,
            },
            kill_rx,
            exited_tx,
            self.events.clone(),
            self.children.clone(),
        ));
        let addr = match mode {
            PortMode::Announce | PortMode::Auto => {
                match tokio::time::timeout(ANNOUNCE_TIMEOUT, announced_rx).await {
                    Ok(Ok(addr)) => addr,
                    Ok(Err(_)) => {
                        // Its output ended without the line: it exited (or closed stdout).
                        let lines = crate::sync::lock(&tail).last(EXIT_LINES);
                        self.stop_pid(pid).await;
                        return Err(fail(format!(
                            "it exited before listening (with provider.port = \"announce\" it must print `listening on http://ADDR` on its standard output){}",
                            quote_output(&lines)
                        )));
                    }
                    Err(_) => {
                        self.stop_pid(pid).await;
                        return Err(fail(format!(
                            "it did not print `listening on http://ADDR` within {ANNOUNCE_TIMEOUT:?}"
                        )));
                    }
                }
            }
            PortMode::Pick => SocketAddr::from(([127, 0, 0, 1], port)),
        };
        tracing::info!(replica = %spec.hostname, pid, %addr, program = %program.display(), "replica process started");
        Ok(Instance {
            id: spec.id,
            hostname: spec.hostname,
            addr,
            instance_id: pid.to_string(),
            slots: None,
            spec: None,
        })
    }

    /// Stops one child: its stdin closes, its process group gets SIGTERM, then SIGKILL if it
    /// has not exited after [`STOP_TIMEOUT`].
    async fn stop_pid(&self, pid: u32) {
        let (stdin, exited, kill, alive) = {
            let mut children = self.children();
            let Some(r) = children.get_mut(&pid) else {
                return;
            };
            (
                r.stdin.take(),
                r.exited.take(),
                r.kill.take(),
                r.alive.clone(),
            )
        };
        drop(stdin);
        signal_group(pid, libc::SIGTERM, &alive);
        if let Some(exited) = exited {
            if tokio::time::timeout(STOP_TIMEOUT, exited).await.is_err() {
                tracing::warn!(pid, "replica did not exit on SIGTERM; killing it");
                signal_group(pid, libc::SIGKILL, &alive);
                if let Some(kill) = kill {
                    let _ = kill.send(());
                }
            }
        }
        self.children().remove(&pid);
    }

    async fn stop(&self, hostname: &str) {
        let pids = self.pids_of(hostname);
        futures_util::future::join_all(pids.into_iter().map(|p| self.stop_pid(p))).await;
    }
}

/// A port the kernel considers free on 127.0.0.1 now.
fn free_loopback_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// `; its last output: "…" | "…"` for an error message, or nothing when it wrote nothing.
pub fn quote_output(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = lines.iter().map(|l| format!("{l:?}")).collect();
    format!("; its last output: {}", quoted.join(" | "))
}

/// Sends `signal` to the process group `pgid` leads (every child leads its own), while the
/// leader has not been reaped (`alive`): the group outlives it only through processes it
/// started, and its pid may be another process's once it is reaped.
fn signal_group(pgid: u32, signal: libc::c_int, alive: &AtomicBool) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 || !alive.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative pid names
    // the process group, and the guard above keeps it from ever being -1 (every process).
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Makes the kernel SIGKILL the child when the gateway dies, however it dies, so no replica
/// outlives it (a user's program does not watch its stdin as the built-in server does).
fn die_with_the_gateway(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid) on plain integers: it allocates nothing
    // and takes no lock.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The gateway died between fork and prctl: the signal will never come.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("the gateway exited"));
            }
            Ok(())
        });
    }
}

/// Reads one of a child's output streams line by line into its tail; on stdout with
/// `announce`, the first `listening on` line is sent there. Lines go to the gateway's log at
/// debug (an app's access log would flood it), the built-in server's error lines at warn.
async fn read_output(
    stream: impl AsyncRead + Unpin,
    hostname: String,
    tail: SharedTail,
    mut announce: Option<oneshot::Sender<SocketAddr>>,
    builtin_errors: bool,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = announce
            .is_some()
            .then(|| crate::listening::parse(&line))
            .flatten()
        {
            if let Some(tx) = announce.take() {
                let _ = tx.send(addr);
            }
            continue;
        }
        if builtin_errors {
            tracing::warn!(replica = %hostname, output = %line, "replica output");
        } else {
            tracing::debug!(replica = %hostname, output = %line, "replica output");
        }
        crate::sync::lock(&tail).push(&line);
    }
}

/// Which child a watcher watches.
struct Watched {
    hostname: String,
    pid: u32,
    alive: Arc<AtomicBool>,
}

/// Waits for the child to exit (or to be killed) and reports it at once, with its last lines.
async fn watch_child(
    mut child: Child,
    readers: [Option<tokio::task::JoinHandle<()>>; 2],
    watched: Watched,
    kill: oneshot::Receiver<()>,
    exited: oneshot::Sender<()>,
    events: mpsc::Sender<ProviderEvent>,
    children: Children,
) {
    let Watched {
        hostname,
        pid,
        alive,
    } = watched;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    // Reaped: its pid is free for the kernel to reuse.
    alive.store(false, Ordering::Release);
    // Its last words are still in the pipes; a grandchild may hold them open, so not for long.
    for r in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_millis(200), r).await;
    }
    let mut detail = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    let stopped_by_us = {
        let mut map = crate::sync::lock(&children);
        let running = map.get(&pid);
        if let Some(r) = running {
            detail.push_str(&quote_output(&crate::sync::lock(&r.tail).last(EXIT_LINES)));
        }
        // Died on its own (`stop_pid` has not taken its exit signal): forget it.
        let on_its_own = running.is_some_and(|r| r.exited.is_some());
        if on_its_own {
            map.remove(&pid);
        }
        !on_its_own
    };
    let _ = exited.send(());
    if !stopped_by_us {
        tracing::debug!(replica = %hostname, pid, %detail, "replica process exited");
    }
    let _ = events
        .send(ProviderEvent::Exited {
            hostname,
            instance_id: pid.to_string(),
            detail,
        })
        .await;
}

impl Provider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn mode(&self) -> crate::provider::Mode {
        crate::provider::Mode::Owned
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

    fn retire(&self, instance: &Instance) -> BoxFuture<'_, Result<(), ProviderError>> {
        let pid = instance.instance_id.parse::<u32>().ok();
        Box::pin(async move {
            if let Some(pid) = pid {
                self.stop_pid(pid).await;
            }
            Ok(())
        })
    }

    fn recent_output(&self, instance: &Instance) -> BoxFuture<'_, Vec<String>> {
        let lines = instance
            .instance_id
            .parse::<u32>()
            .ok()
            .and_then(|pid| {
                self.children()
                    .get(&pid)
                    .map(|r| crate::sync::lock(&r.tail).last(EXIT_LINES))
            })
            .unwrap_or_default();
        Box::pin(async move { lines })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        // Children never outlive the gateway, so there is nothing to adopt.
        Box::pin(async { Ok(Vec::new()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let pids: Vec<u32> = self.children().keys().copied().collect();
            futures_util::future::join_all(pids.into_iter().map(|p| self.stop_pid(p))).await;
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

    fn app(command: &[&str], workdir: Option<&str>) -> AppSpec {
        AppSpec::from_config(&crate::config::ProviderConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            workdir: workdir.map(PathBuf::from),
            ..crate::config::ProviderConfig::default()
        })
    }

    #[test]
    fn the_program_is_found_in_path_or_workdir_or_said_missing() {
        let sh = program(&app(&["sh", "-c", "true"], None)).expect("sh is in PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        let e = program(&app(&["no-such-program-rg27"], None)).expect_err("missing");
        assert!(e.contains("not found in the replica's PATH"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("app.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        let e = program(&app(&["./app.sh"], dir.path().to_str())).expect_err("not executable");
        assert!(e.contains("chmod +x"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            program(&app(&["./app.sh"], dir.path().to_str())).expect("found in workdir"),
            script
        );
        let e = program(&app(&["./nope.sh"], dir.path().to_str())).expect_err("missing");
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn the_tail_keeps_the_last_lines_cut_short() {
        let mut t = Tail::default();
        for i in 0..30 {
            t.push(&format!("line {i}\n"));
        }
        assert_eq!(t.last(2), ["line 28", "line 29"]);
        assert_eq!(t.0.len(), TAIL_LINES);
        t.push(&"é".repeat(TAIL_LINE_BYTES));
        assert!(t.last(1)[0].len() <= TAIL_LINE_BYTES + '…'.len_utf8());
        assert_eq!(quote_output(&[]), "");
        assert_eq!(
            quote_output(&["a".into(), "b \"c\"".into()]),
            "; its last output: \"a\" | \"b \\\"c\\\"\""
        );
    }
}
