//! The processes the lab starts and watches: finding the product's binaries, waiting for a
//! child's `listening on http://ADDR` line (read with [`ringgate::listening::parse`], so the
//! format lives in the product only), signals, and what `/proc` says about a process (parent,
//! children, `SERVER_ID`, peak RSS).
//!
//! Owns: those OS-level chores, for the experiments, the proxy benchmark and the lab's tests.
//! Must not touch: what a process is started for (that is the caller's), or the line's format.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::analysis::AnalysisError;

/// A product binary (`ringgate`, `ringgate-server`) from the same build as the running program:
/// next to it (`target/<profile>/ringgate-lab`), or one level up for test and bench executables
/// (`target/<profile>/deps/…`). The workspace shares one target directory, so
/// `cargo build --workspace --bins` puts them there.
pub fn product_binary(name: &str) -> Result<PathBuf, AnalysisError> {
    let exe = std::env::current_exe()
        .map_err(|e| AnalysisError::io("locating the running executable", e))?;
    let beside = exe.with_file_name(name);
    let above = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name));
    [Some(beside.clone()), above]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            AnalysisError::Process(format!(
                "`{name}` not found next to {} (looked at {}): build the product first \
                 (`cargo build --workspace --bins`, or `--release` for the release lab), \
                 or pass its path",
                exe.display(),
                beside.display()
            ))
        })
}

/// Reads `child`'s stdout until its `listening on http://ADDR` line, within `within`; the address
/// must be loopback (the lab only ever talks to loopback). Afterwards stdout keeps being drained
/// so the child never blocks on a full pipe. `what` names the child in errors.
pub async fn wait_listening(
    child: &mut Child,
    what: &str,
    within: Duration,
) -> Result<SocketAddr, AnalysisError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| AnalysisError::Process(format!("{what}: started without a stdout pipe")))?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(within, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = ringgate::listening::parse(&line) {
                return Some(addr);
            }
        }
        None
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match found {
        Ok(Some(addr)) if addr.ip().is_loopback() => Ok(addr),
        Ok(Some(addr)) => Err(AnalysisError::Process(format!(
            "{what} listens on {addr}, not on a loopback address: the lab talks to loopback only"
        ))),
        Ok(None) => Err(AnalysisError::Process(format!(
            "{what} exited before printing `listening on http://ADDR`"
        ))),
        Err(_) => Err(AnalysisError::Process(format!(
            "{what} printed no `listening on http://ADDR` line within {within:?}"
        ))),
    }
}

/// Sends a signal by name (`TERM`, `KILL`) with the `kill` utility.
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `(pid, SERVER_ID)` of every `ringgate-server` whose parent is `parent`, from `/proc`.
pub fn child_replicas(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_of(pid) != Some(parent) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let id = environ
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("SERVER_ID="))
            .map(str::to_string);
        if let Some(id) = id {
            out.push((pid, id));
        }
    }
    out.sort();
    out
}

/// The parent pid from `/proc/PID/stat` (the field after the `(comm)`).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Children of `parent` (any program), from `/proc`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

/// CPU time (user + system, in clock ticks of `CPU_TICKS_PER_SEC`) a process has used, all its
/// threads together.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the ')'.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks of this process and of its children that ended and were waited for (utime, stime,
/// cutime, cstime): around a run of wrk, what wrk used (or, for the in-process load generator,
/// what it used).
pub fn own_and_waited_children_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (11..=14).map(|i| fields.get(i)?.parse::<u64>().ok()).sum()
}

/// The kernel's clock tick for `/proc/PID/stat` times (USER_HZ, 100 on Linux).
pub const CPU_TICKS_PER_SEC: f64 = 100.0;

/// Peak resident set (`VmHWM`, KiB) of a process.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_read_and_grows() {
        let me = std::process::id();
        let before = cpu_ticks(me).expect("our own stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(
            cpu_ticks(me).expect("stat") > before,
            "200 ms of spinning shows"
        );
    }

    #[test]
    fn own_process_is_visible_in_proc() {
        let me = std::process::id();
        assert!(parent_of(me).is_some());
        assert!(peak_rss_kib(me).is_some_and(|k| k > 0));
    }

    #[test]
    fn a_missing_binary_is_named_with_the_fix() {
        let e = product_binary("no-such-ringgate-binary").expect_err("does not exist");
        let text = e.to_string();
        assert!(text.contains("no-such-ringgate-binary"), "{text}");
        assert!(text.contains("cargo build"), "{text}");
    }

    #[tokio::test]
    async fn reads_the_listening_line_and_refuses_other_hosts() {
        let spawn = |line: &str| {
            tokio::process::Command::new("sh")
                .arg("-c")
                .arg(format!("echo starting; echo '{line}'"))
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("sh runs")
        };
        let within = Duration::from_secs(10);
        let mut ok = spawn("listening on http://127.0.0.1:4321");
        let addr = wait_listening(&mut ok, "sh", within).await.expect("a line");
        assert_eq!(addr, "127.0.0.1:4321".parse().expect("addr"));
        let mut far = spawn("listening on http://10.1.2.3:80");
        assert!(wait_listening(&mut far, "sh", within).await.is_err());
        let mut none = spawn("hello");
        let e = wait_listening(&mut none, "sh", within)
            .await
            .expect_err("no line");
        assert!(e.to_string().contains("exited before"), "{e}");
    }
}
