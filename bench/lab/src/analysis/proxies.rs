//! `make bench`: the same three `ringgate-server` backends measured directly (the limit), behind
//! ringgate (static provider), behind NGINX (`hash $arg_id consistent`) and behind HAProxy
//! (`balance url_param id` + `hash-type consistent`), all on 127.0.0.1, with one load generator
//! (wrk when installed, else ours), rounds interleaved, medians of several runs; peak RSS of
//! each proxy from `/proc/PID/status` (`VmHWM`). The table goes into `docs/performance.md`.
//!
//! Every process started here is written to `--pidfile` (so `bench/proxies.sh` can clean up
//! after a crash) and stopped with SIGTERM on the way out.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::{report, AnalysisError};
use crate::loadgen::{self, KeyPlan, LoadConfig};
use crate::procs::{
    children_of, cpu_ticks, own_and_waited_children_ticks, peak_rss_kib, product_binary, signal,
    wait_listening, CPU_TICKS_PER_SEC,
};

/// The floor in Rust: `ringgate-lab forward`, a byte relay with no HTTP.
pub const FORWARD: &str = "floor: byte relay (tokio)";
/// The floor in C: HAProxy in `mode tcp`.
pub const HAPROXY_TCP: &str = "floor: haproxy mode tcp";

/// `ringgate-lab analysis proxies`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxiesArgs {
    /// The ringgate binary (default: `ringgate` next to this executable)
    #[arg(long)]
    pub ringgate_bin: Option<PathBuf>,
    /// The backend binary (default: `ringgate-server` next to this executable)
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Measured runs per target (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Length of one run
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Warm-up per target before the first round
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Open connections of the load generator
    #[arg(short = 'c', long, default_value_t = 64)]
    pub connections: usize,
    /// Load generator threads (wrk): one, so the load generator is not the bottleneck's rival
    #[arg(short = 't', long, default_value_t = 1)]
    pub threads: usize,
    /// Load generator: wrk or ours (default: wrk when installed)
    #[arg(long)]
    pub tool: Option<Tool>,
    /// NGINX binary
    #[arg(long, default_value = "nginx")]
    pub nginx: String,
    /// HAProxy binary
    #[arg(long, default_value = "haproxy")]
    pub haproxy: String,
    /// Worker processes / threads given to NGINX and HAProxy (default: ringgate's serving
    /// threads, one per CPU)
    #[arg(long)]
    pub proxy_workers: Option<usize>,
    /// The backends: `light` (`ringgate-lab backend`, the lightest we can make, so the proxies
    /// are the bottleneck) or `ringgate-server`
    #[arg(long, default_value = "light")]
    pub backend: BackendKind,
    /// More ringgate binaries to measure in the same run, as NAME=PATH (e.g. the previous build:
    /// `--extra-ringgate before=/tmp/ringgate-old`)
    #[arg(long = "extra-ringgate")]
    pub extra_ringgate: Vec<String>,
    /// Leave out the two floors (a byte relay in Rust, HAProxy in TCP mode): what the sockets
    /// alone cost here, below which no HTTP proxy on them can go
    #[arg(long)]
    pub no_floor: bool,
    /// The report whose bench section is rewritten
    #[arg(long, default_value = "docs/performance.md")]
    pub doc: PathBuf,
    /// Append the pid of every started process here
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    /// Give each proxy CPU 0 alone (one worker, thread or serving thread) and the backends and
    /// the load generator the other CPUs (`taskset`), so the proxy under test is surely the
    /// bottleneck and its CPU is not shared with what loads it
    #[arg(long)]
    pub pin: bool,
}

/// Where the benchmark's processes run: anywhere, or with `--pin` the proxy on CPU 0 and
/// everything else on the rest.
#[derive(Clone)]
pub(super) struct Placement {
    /// `taskset -c` lists: the proxy's and the others'.
    pinned: Option<(String, String)>,
}

#[derive(Clone, Copy)]
enum Role {
    /// The process under test.
    Proxy,
    /// The backends and the load generator.
    Load,
}

impl Placement {
    /// Every process wherever the scheduler puts it.
    pub(super) fn anywhere() -> Placement {
        Placement { pinned: None }
    }

    /// With `pin`, the first CPU this process may run on for the proxy and the others for the
    /// load (`Cpus_allowed_list` in `/proc/self/status`: a cgroup or `taskset` may leave fewer,
    /// or other, CPUs than the machine has).
    fn new(pin: bool) -> Result<Placement, AnalysisError> {
        if !pin {
            return Ok(Placement::anywhere());
        }
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| AnalysisError::io("reading /proc/self/status", e))?;
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|l| cpu_list(l.trim()))
            .unwrap_or_default();
        let [proxy, load @ ..] = allowed.as_slice() else {
            return Err(AnalysisError::Bench(
                "--pin: cannot tell which CPUs this process may use".into(),
            ));
        };
        if load.is_empty() {
            return Err(AnalysisError::Bench(
                "--pin needs 2 CPUs or more: one for the proxy, the rest for the load".into(),
            ));
        }
        if find_program("taskset").is_none() {
            return Err(AnalysisError::Bench(
                "--pin needs taskset (Debian's util-linux)".into(),
            ));
        }
        let load: Vec<String> = load.iter().map(usize::to_string).collect();
        Ok(Placement {
            pinned: Some((proxy.to_string(), load.join(","))),
        })
    }

    /// A command for `program` placed for `role`.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>, role: Role) -> Command {
        match &self.pinned {
            None => Command::new(program),
            Some((proxy, load)) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c")
                    .arg(match role {
                        Role::Proxy => proxy,
                        Role::Load => load,
                    })
                    .arg(program);
                cmd
            }
        }
    }

    /// CPUs the proxy under test has (`all` unpinned).
    fn proxy_cpus(&self, all: usize) -> usize {
        match self.pinned {
            Some(_) => 1,
            None => all,
        }
    }
}

/// The CPUs of a list as the kernel writes it (`0-3,8,10-11`); nothing for what it cannot read.
fn cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (from, to) = part.split_once('-').unwrap_or((part, part));
        match (from.trim().parse::<usize>(), to.trim().parse::<usize>()) {
            (Ok(from), Ok(to)) if from <= to => cpus.extend(from..=to),
            _ => return Vec::new(),
        }
    }
    cpus
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Light,
    RinggateServer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    Wrk,
    Ours,
}

/// A process started by the benchmark; SIGTERM on drop.
pub(super) struct Proc {
    name: String,
    child: Child,
    stopped: bool,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// CPU ticks used so far by the process and its children (NGINX's workers).
    pub(super) fn cpu_ticks(&self) -> u64 {
        let Some(pid) = self.pid() else { return 0 };
        let mut pids = vec![pid];
        pids.extend(children_of(pid));
        pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
    }

    /// Peak RSS (KiB) of the process and its children, and how many processes that was.
    pub(super) fn peak_rss(&self) -> Option<(u64, usize)> {
        let pid = self.pid()?;
        let mut pids = vec![pid];
        pids.extend(children_of(pid));
        let total = pids.iter().filter_map(|p| peak_rss_kib(*p)).sum();
        Some((total, pids.len()))
    }

    pub(super) async fn stop(mut self) {
        self.stopped = true;
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM");
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
            eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.stopped {
            if let Some(pid) = self.child.id() {
                signal(pid, "TERM");
            }
        }
    }
}

/// Starts processes and records their pids.
pub(super) struct Launcher {
    pub(super) pidfile: Option<PathBuf>,
    pub(super) placement: Placement,
}

impl Launcher {
    pub(super) fn spawn(
        &self,
        name: &str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<Proc, AnalysisError> {
        let log = std::fs::File::create(log).map_err(|e| AnalysisError::io("creating a log", e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| AnalysisError::io(format!("starting {name}"), e))?;
        if let (Some(file), Some(pid)) = (&self.pidfile, child.id()) {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
            {
                let _ = writeln!(f, "{pid}");
            }
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            stopped: false,
        })
    }
}

/// The loopback address in the child's `listening on http://ADDR` line.
pub(super) async fn listening_addr(p: &mut Proc) -> Result<SocketAddr, AnalysisError> {
    wait_listening(&mut p.child, &p.name, Duration::from_secs(30)).await
}

/// Waits until `GET url` answers 200.
pub(super) async fn wait_200(url: &str, within: Duration) -> Result<(), AnalysisError> {
    let client = loadgen::client(1);
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let (Some(200), Ok(_)) = loadgen::send_one(
            &client,
            hyper::Method::GET,
            url,
            None,
            Duration::from_secs(2),
        )
        .await
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(AnalysisError::Bench(format!(
        "{url} did not answer 200 within {within:?}"
    )))
}

pub(super) fn free_port() -> Result<u16, AnalysisError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| AnalysisError::io("finding a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| AnalysisError::io("finding a free port", e))
}

/// A program on PATH or in the sbin directories.
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|f| f.is_file())
}

/// Figures of one measured run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunFigures {
    pub rps: f64,
    /// Requests completed in the run.
    pub requests: u64,
    /// CPU time the proxy used in the run, in µs (0 for the direct target).
    pub cpu_us: f64,
    /// CPU time the backends and the load generator used in the run, in µs.
    pub others_cpu_us: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// Parses `1.23ms`, `850.00us`, `1.02s`, `1.5m` into milliseconds.
pub fn parse_wrk_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.trim().parse().ok()?;
    Some(match unit {
        "us" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        "m" => v * 60e3,
        "h" => v * 3600e3,
        _ => return None,
    })
}

/// Requests/s, p50, p99 and errors from `wrk --latency` output.
pub fn parse_wrk(out: &str) -> Option<RunFigures> {
    let mut f = RunFigures::default();
    let mut have_rps = false;
    for line in out.lines() {
        let t = line.trim();
        if t.contains(" requests in ") {
            f.requests = t.split_whitespace().next()?.parse().ok()?;
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            f.rps = v.trim().parse().ok()?;
            have_rps = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            f.p50_ms = parse_wrk_duration(v)?;
        } else if let Some(v) = t.strip_prefix("99%") {
            f.p99_ms = parse_wrk_duration(v)?;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            f.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            f.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    have_rps.then_some(f)
}

/// Random 6-digit `?id=`s like `ringgate-lab load`'s, 4,096 of them drawn and formatted when a
/// wrk thread starts and sent in turn: formatting one per request cost wrk 0.7 to 0.9 µs of user
/// time a request (measured against one backend, `/usr/bin/time`), taken from the load side's
/// CPU, which the pinned bench's fastest targets fill.
pub(super) const WRK_SCRIPT: &str = r#"-- random 6-digit ?id=s, drawn in advance: one Lua call a request, no formatting
local requests = {}
local n = 0
init = function(args)
  math.randomseed(os.time())
  for i = 1, 4096 do
    requests[i] = wrk.format("GET", "/home?id=" .. math.random(100000, 999999))
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
"#;

struct Measure {
    placement: Placement,
    tool: Tool,
    wrk: Option<PathBuf>,
    script: PathBuf,
    connections: usize,
    threads: usize,
}

impl Measure {
    async fn run(&self, base: &str, d: Duration) -> Result<RunFigures, AnalysisError> {
        match (self.tool, &self.wrk) {
            (Tool::Wrk, Some(wrk)) => {
                let out = self
                    .placement
                    .command(wrk, Role::Load)
                    .arg(format!("-t{}", self.threads))
                    .arg(format!("-c{}", self.connections))
                    .arg(format!("-d{}s", d.as_secs().max(1)))
                    .arg("--latency")
                    .arg("-s")
                    .arg(&self.script)
                    .arg(format!("{base}/home"))
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .map_err(|e| AnalysisError::io("running wrk", e))?;
                let text = String::from_utf8_lossy(&out.stdout);
                parse_wrk(&text).ok_or_else(|| {
                    AnalysisError::Bench(format!(
                        "could not read wrk's output: {text}{}",
                        String::from_utf8_lossy(&out.stderr)
                    ))
                })
            }
            _ => {
                let mut cfg = LoadConfig::new(format!("{base}/home"), 0, self.connections);
                cfg.requests = None;
                cfg.duration = Some(d);
                cfg.keys = KeyPlan::Random6 {
                    seed: fastrand::u64(..),
                };
                cfg.timeout = Duration::from_secs(5);
                let s = loadgen::run(&cfg).await?.summary();
                Ok(RunFigures {
                    rps: s.requests_per_sec,
                    requests: s.total,
                    p50_ms: s.p50.as_secs_f64() * 1e3,
                    p99_ms: s.p99.as_secs_f64() * 1e3,
                    errors: s.failed,
                    ..RunFigures::default()
                })
            }
        }
    }
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// One target of the comparison.
struct Target {
    name: String,
    base: String,
    proc_: Option<Proc>,
    runs: Vec<RunFigures>,
    rss: Option<(u64, usize)>,
}

/// The aggregated row of a target.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU µs per request of the proxy's processes (`None` for the direct target).
    pub cpu_us_per_req: Option<f64>,
    /// CPU µs per request of the backends and the load generator.
    pub others_us_per_req: Option<f64>,
    pub rss_kib: Option<(u64, usize)>,
}

/// The markdown table (ringgate's throughput ratio against each target in the last but one
/// column).
pub fn table(rows: &[Row]) -> String {
    let rg = rows.iter().find(|r| r.name == "ringgate").map(|r| r.rps);
    let mut s = String::from(
        "| target | requests/s (median) | p50 | p99 | errors | CPU µs/request | backends + load generator CPU µs/request | ringgate ÷ target (req/s) | peak RSS |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = match rg {
            Some(g) if r.rps > 0.0 => format!("{:.2}", g / r.rps),
            _ => "–".to_string(),
        };
        let rss = match r.rss_kib {
            Some((k, n)) if n > 1 => format!("{:.1} MiB ({n} processes)", k as f64 / 1024.0),
            Some((k, _)) => format!("{:.1} MiB", k as f64 / 1024.0),
            None => "–".to_string(),
        };
        let micros = |v: Option<f64>| v.map_or("–".to_string(), |c| format!("{c:.1}"));
        let (cpu, others) = (micros(r.cpu_us_per_req), micros(r.others_us_per_req));
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {} | {cpu} | {others} | {ratio} | {rss} |",
            r.name, r.rps, r.p50_ms, r.p99_ms, r.errors
        );
    }
    s
}

/// ringgate against the better of NGINX and HAProxy: throughput over the faster one, CPU per
/// request over the leaner one, p99 against both.
pub fn verdict(rows: &[Row], cpus: usize, pinned: bool) -> Option<String> {
    let rg = rows.iter().find(|r| r.name == "ringgate")?;
    let peers: Vec<&Row> = rows
        .iter()
        .filter(|r| r.name == "nginx" || r.name == "haproxy")
        .collect();
    let fastest = peers.iter().max_by(|a, b| a.rps.total_cmp(&b.rps))?;
    let leanest = peers
        .iter()
        .filter(|r| r.cpu_us_per_req.is_some())
        .min_by(|a, b| {
            a.cpu_us_per_req
                .unwrap_or(f64::MAX)
                .total_cmp(&b.cpu_us_per_req.unwrap_or(f64::MAX))
        })?;
    let worst_p99 = peers.iter().map(|r| r.p99_ms).fold(f64::MAX, f64::min);
    let mut out = format!(
        "ringgate ÷ the faster peer ({}) in requests/s: **{:.2}×**; ",
        fastest.name,
        rg.rps / fastest.rps
    );
    if let (Some(a), Some(b)) = (rg.cpu_us_per_req, leanest.cpu_us_per_req) {
        let _ = write!(
            out,
            "CPU per request ÷ the leaner peer ({}): **{:.2}×**; ",
            leanest.name,
            a / b
        );
    }
    let _ = write!(
        out,
        "p99 {:.2} ms against the peers' best {:.2} ms.",
        rg.p99_ms, worst_p99
    );
    if let Some(lua) = rows.iter().find(|r| r.name == "ringgate (Lua hash)") {
        let _ = write!(
            out,
            " With a Lua `request_hash` hook: **{:.2}×** ringgate without.",
            lua.rps / rg.rps
        );
    }
    // What the sockets alone allow: a proxy that parses nothing, measured in the same run.
    for floor in rows
        .iter()
        .filter(|r| r.name == FORWARD || r.name == HAPROXY_TCP)
    {
        let _ = write!(
            out,
            " The {} moves the same requests at {:.2}× the faster peer's requests/s",
            floor.name.trim_start_matches("floor: "),
            floor.rps / fastest.rps
        );
        if let (Some(a), Some(b)) = (floor.cpu_us_per_req, leanest.cpu_us_per_req) {
            let _ = write!(out, " and {:.2}× the leaner peer's CPU per request", a / b);
        }
        out.push('.');
    }
    // The budget of the goal: the load generator, the backends and the proxy share the CPUs,
    // which every target keeps busy, so 1.2× the faster peer's rate is a CPU budget per request,
    // and what the others take of it is not the proxy's.
    let others = rows
        .iter()
        .filter(|r| r.name != "direct (one backend)")
        .filter_map(|r| r.others_us_per_req)
        .fold(f64::MAX, f64::min);
    let relay = rows.iter().find(|r| r.name == FORWARD);
    if let (true, Some(relay_cpu)) = (pinned, relay.and_then(|r| r.cpu_us_per_req)) {
        // The proxy has one CPU of its own: the goal's rate is a budget for it alone.
        let target = GOAL_RPS_RATIO * fastest.rps;
        let _ = write!(
            out,
            " At {GOAL_RPS_RATIO}× the faster peer's rate ({target:.0} requests/s) the proxy's one \
CPU gives a request {:.1} µs; the byte relay needed {relay_cpu:.1}.",
            budget_us(1, target),
        );
    } else if let (true, Some(relay_cpu)) =
        (others < f64::MAX, relay.and_then(|r| r.cpu_us_per_req))
    {
        let target = GOAL_RPS_RATIO * fastest.rps;
        let _ = write!(
            out,
            " At {GOAL_RPS_RATIO}× the faster peer's rate ({target:.0} requests/s) {cpus} CPUs give a \
request {:.1} µs in all; the backends and the load generator took at least {others:.1} µs of it \
in this run, which leaves a proxy {:.1} µs; the byte relay needed {relay_cpu:.1}.",
            budget_us(cpus, target),
            proxy_allowance_us(cpus, target, others),
        );
    }
    Some(out)
}

/// The throughput goal of issue 11: ringgate at this multiple of the faster peer's requests/s.
pub const GOAL_RPS_RATIO: f64 = 1.2;

/// CPU µs a request may use, all processes together, when `cpus` busy CPUs serve `rps`.
pub fn budget_us(cpus: usize, rps: f64) -> f64 {
    cpus as f64 * 1e6 / rps
}

/// What is left of [`budget_us`] for the proxy once the backends and the load generator have
/// taken `others_us` a request.
pub fn proxy_allowance_us(cpus: usize, rps: f64, others_us: f64) -> f64 {
    budget_us(cpus, rps) - others_us
}

/// Starts a ringgate with the static provider over `addrs` and `hash` for both hash functions.
async fn start_ringgate(
    launcher: &Launcher,
    bin: &Path,
    tmp: &Path,
    policy_dir: &Path,
    addrs: &[String],
    hash: &str,
    tag: &str,
) -> Result<(Proc, String), AnalysisError> {
    let servers: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!(r#"{{ name = "server-{}", address = "{a}" }}"#, i + 1))
        .collect();
    let conf = tmp.join(format!("lb-{tag}.toml"));
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\n\n[ring]\nrequest_hash = \"{hash}\"\nvnode_hash = \"{hash}\"\n\n\
[hashing]\nkey = \"query:id\"\n\n[replicas]\ncount = 3\n\n\
[provider]\nkind = \"static\"\nservers = [{}]\n\n[policy]\ndir = \"{}\"\n",
            servers.join(", "),
            policy_dir.display()
        ),
    )
    .map_err(|e| AnalysisError::io("writing lb.toml", e))?;
    let mut cmd = launcher.placement.command(bin, Role::Proxy);
    cmd.arg("serve")
        .arg("--config")
        .arg(&conf)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--provider")
        .arg("static")
        .env("RUST_LOG", "warn");
    let mut rg = launcher.spawn("ringgate", cmd, &tmp.join(format!("ringgate-{tag}.log")))?;
    let url = format!("http://{}", listening_addr(&mut rg).await?);
    wait_200(&format!("{url}/home?id=1"), Duration::from_secs(20)).await?;
    Ok((rg, url))
}

/// Runs the comparison, prints the table and writes it into the report.
pub async fn run(args: ProxiesArgs) -> Result<(), AnalysisError> {
    let ringgate = match &args.ringgate_bin {
        Some(b) => b.clone(),
        None => product_binary("ringgate")?,
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let placement = Placement::new(args.pin)?;
    let workers = args
        .proxy_workers
        .unwrap_or_else(|| placement.proxy_cpus(cpus));
    let dir = tempfile::Builder::new()
        .prefix("ringgate-bench-")
        .tempdir()
        .map_err(|e| AnalysisError::io("creating a temp dir", e))?;
    let tmp = dir.path();
    let launcher = Launcher {
        pidfile: args.pidfile.clone(),
        placement: placement.clone(),
    };
    let mut notes = Vec::new();

    // The three backends.
    let mut backends = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=3 {
        let mut cmd = match args.backend {
            BackendKind::Light => {
                let me = std::env::current_exe()
                    .map_err(|e| AnalysisError::io("locating ringgate-lab", e))?;
                let mut c = placement.command(me, Role::Load);
                c.arg("backend");
                c
            }
            BackendKind::RinggateServer => placement.command(
                match &args.server_bin {
                    Some(s) => s.clone(),
                    None => product_binary("ringgate-server")?,
                },
                Role::Load,
            ),
        };
        cmd.env("SERVER_ID", format!("server-{i}"))
            .env("PORT", "0")
            .env("BIND", "127.0.0.1");
        let mut p = launcher.spawn(
            &format!("backend {i}"),
            cmd,
            &tmp.join(format!("backend{i}.log")),
        )?;
        addrs.push(listening_addr(&mut p).await?.to_string());
        backends.push(p);
    }
    let target = |name: &str, base: String, proc_: Option<Proc>| Target {
        name: name.to_string(),
        base,
        proc_,
        runs: Vec::new(),
        rss: None,
    };
    let mut targets = vec![target(
        "direct (one backend)",
        format!("http://{}", addrs[0]),
        None,
    )];

    // ringgate over the same three, static provider: with mix64, which spreads keys like the
    // peers do (the name "ringgate" is this one), and with the specified quadratic hash.
    let policy_dir = tmp.join("policies");
    std::fs::create_dir_all(&policy_dir).map_err(|e| AnalysisError::io("policy dir", e))?;
    for (name, hash) in [("ringgate", "mix64"), ("ringgate (quadratic)", "quadratic")] {
        let (p, base) =
            start_ringgate(&launcher, &ringgate, tmp, &policy_dir, &addrs, hash, hash).await?;
        targets.push(target(name, base, Some(p)));
    }
    for extra in &args.extra_ringgate {
        let Some((name, path)) = extra.split_once('=') else {
            return Err(AnalysisError::Bench(format!(
                "--extra-ringgate wants NAME=PATH, got {extra:?}"
            )));
        };
        let tag = format!("extra-{}", targets.len());
        let (p, base) = start_ringgate(
            &launcher,
            Path::new(path),
            tmp,
            &policy_dir,
            &addrs,
            "mix64",
            &tag,
        )
        .await?;
        targets.push(target(&format!("ringgate ({name})"), base, Some(p)));
    }
    // And with a Lua `request_hash` hook (spread_hash + spread_vnodes: the same spread as
    // mix64, so the difference to "ringgate" is the cost of calling Lua on every request).
    let lua_dir = tmp.join("policies-lua");
    std::fs::create_dir_all(&lua_dir).map_err(|e| AnalysisError::io("policy dir", e))?;
    let examples = ["spread_hash.lua", "spread_vnodes.lua"];
    let copied = examples
        .iter()
        .all(|f| std::fs::copy(Path::new("policies/examples").join(f), lua_dir.join(f)).is_ok());
    if copied {
        let (p, base) = start_ringgate(
            &launcher,
            &ringgate,
            tmp,
            &lua_dir,
            &addrs,
            "quadratic",
            "lua",
        )
        .await?;
        targets.push(target("ringgate (Lua hash)", base, Some(p)));
    } else {
        notes.push(
            "policies/examples/spread_*.lua not found: the Lua target was skipped".to_string(),
        );
    }

    // NGINX, tuned as its docs recommend for a reverse proxy: upstream keep-alive (HTTP/1.1,
    // no Connection header), no access log, enough keep-alive requests per connection.
    match find_program(&args.nginx) {
        Some(nginx) => {
            let port = free_port()?;
            let upstreams: String = addrs.iter().map(|a| format!("    server {a};\n")).collect();
            let t = tmp.display();
            let conf = format!(
                "worker_processes {workers};\ndaemon off;\nmaster_process on;\npid {t}/nginx.pid;\n\
error_log {t}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n\
  keepalive_requests 1000000;\n\
  client_body_temp_path {t}/nginx-body;\n  proxy_temp_path {t}/nginx-proxy;\n  fastcgi_temp_path {t}/nginx-fcgi;\n\
  uwsgi_temp_path {t}/nginx-uwsgi;\n  scgi_temp_path {t}/nginx-scgi;\n\
  upstream ring {{\n    hash $arg_id consistent;\n{upstreams}    keepalive 128;\n    keepalive_requests 1000000;\n  }}\n\
  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://ring;\n\
      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
            );
            let path = tmp.join("nginx.conf");
            std::fs::write(&path, conf).map_err(|e| AnalysisError::io("writing nginx.conf", e))?;
            let mut cmd = placement.command(nginx, Role::Proxy);
            cmd.arg("-e")
                .arg(tmp.join("nginx-early.log"))
                .arg("-p")
                .arg(tmp)
                .arg("-c")
                .arg(&path);
            let p = launcher.spawn("nginx", cmd, &tmp.join("nginx.log"))?;
            let base = format!("http://127.0.0.1:{port}");
            match wait_200(&format!("{base}/home?id=1"), Duration::from_secs(20)).await {
                Ok(()) => targets.push(target("nginx", base, Some(p))),
                Err(e) => {
                    let log = std::fs::read_to_string(tmp.join("nginx.log")).unwrap_or_default();
                    notes.push(format!("NGINX did not come up: {e} {log}"));
                    p.stop().await;
                }
            }
        }
        None => notes.push(format!("{} not installed: NGINX skipped", args.nginx)),
    }

    // HAProxy, tuned as its docs recommend: keep-alive on both sides and `http-reuse always`.
    match find_program(&args.haproxy) {
        Some(haproxy) => {
            let servers: String = addrs
                .iter()
                .enumerate()
                .map(|(i, a)| format!("  server s{} {a}\n", i + 1))
                .collect();
            let http = format!(
                "defaults\n  mode http\n  timeout connect 5s\n\
  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\n\
frontend fe\n  bind 127.0.0.1:PORT\n  default_backend be\n\n\
backend be\n  balance url_param id\n  hash-type consistent\n{servers}"
            );
            // The floor in C: HAProxy as a TCP relay, each client connection paired with one
            // backend connection, no HTTP at all.
            let tcp = format!(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n\
frontend fe\n  bind 127.0.0.1:PORT\n  default_backend be\n\n\
backend be\n  balance roundrobin\n{servers}"
            );
            let floor = !args.no_floor;
            for (name, body) in [("haproxy", Some(http)), (HAPROXY_TCP, floor.then_some(tcp))] {
                let Some(body) = body else { continue };
                let port = free_port()?;
                let conf = format!("global\n  maxconn 4096\n  nbthread {workers}\n\n{body}")
                    .replace("PORT", &port.to_string());
                let tag = name.replace([' ', ':', '(', ')'], "_");
                let path = tmp.join(format!("{tag}.cfg"));
                std::fs::write(&path, conf)
                    .map_err(|e| AnalysisError::io("writing haproxy.cfg", e))?;
                let mut cmd = placement.command(&haproxy, Role::Proxy);
                cmd.arg("-db").arg("-f").arg(&path);
                let log = tmp.join(format!("{tag}.log"));
                let p = launcher.spawn(name, cmd, &log)?;
                let base = format!("http://127.0.0.1:{port}");
                match wait_200(&format!("{base}/home?id=1"), Duration::from_secs(20)).await {
                    Ok(()) => targets.push(target(name, base, Some(p))),
                    Err(e) => {
                        let log = std::fs::read_to_string(&log).unwrap_or_default();
                        notes.push(format!("{name} did not come up: {e} {log}"));
                        p.stop().await;
                    }
                }
            }
        }
        None => notes.push(format!("{} not installed: HAProxy skipped", args.haproxy)),
    }

    // The floor in Rust: `ringgate-lab forward`, built like ringgate's serving side (a
    // current-thread runtime per thread, SO_REUSEPORT, TCP_NODELAY), moving bytes only.
    if !args.no_floor {
        let me =
            std::env::current_exe().map_err(|e| AnalysisError::io("locating ringgate-lab", e))?;
        let mut cmd = placement.command(me, Role::Proxy);
        cmd.arg("forward")
            .env("FORWARD_TO", addrs.join(","))
            .env("THREADS", workers.to_string())
            .env("PORT", "0");
        let mut p = launcher.spawn(FORWARD, cmd, &tmp.join("forward.log"))?;
        let base = format!("http://{}", listening_addr(&mut p).await?);
        wait_200(&format!("{base}/home?id=1"), Duration::from_secs(20)).await?;
        targets.push(target(FORWARD, base, Some(p)));
    }

    // The load generator.
    let wrk = find_program("wrk");
    let tool = match (args.tool, &wrk) {
        (Some(Tool::Wrk), None) => {
            return Err(AnalysisError::Bench(
                "wrk requested but not installed".into(),
            ));
        }
        (Some(t), _) => t,
        (None, Some(_)) => Tool::Wrk,
        (None, None) => Tool::Ours,
    };
    let script = tmp.join("random_id.lua");
    std::fs::write(&script, WRK_SCRIPT)
        .map_err(|e| AnalysisError::io("writing the wrk script", e))?;
    if placement.pinned.is_some() && tool == Tool::Ours {
        return Err(AnalysisError::Bench(
            "--pin needs wrk: our load generator runs inside this process, which is not pinned"
                .into(),
        ));
    }
    let measure = Measure {
        placement,
        tool,
        wrk,
        script,
        connections: args.connections,
        threads: args.threads,
    };
    for n in &notes {
        eprintln!("note: {n}");
    }

    let started = Instant::now();
    for t in &targets {
        eprintln!("warm-up {}", t.name);
        measure.run(&t.base, args.warmup).await?;
    }
    for round in 0..args.runs {
        // Interleave, and rotate who goes first.
        let k = targets.len();
        for step in 0..k {
            let idx = (round + step) % k;
            let t = &mut targets[idx];
            let others = || {
                backends.iter().map(Proc::cpu_ticks).sum::<u64>()
                    + own_and_waited_children_ticks().unwrap_or(0)
            };
            let before = t.proc_.as_ref().map(Proc::cpu_ticks);
            let others_before = others();
            let mut f = measure.run(&t.base, args.duration).await?;
            let ticks_us = |ticks: u64| ticks as f64 * 1e6 / CPU_TICKS_PER_SEC;
            if let (Some(b), Some(p)) = (before, t.proc_.as_ref()) {
                f.cpu_us = ticks_us(p.cpu_ticks().saturating_sub(b));
            }
            f.others_cpu_us = ticks_us(others().saturating_sub(others_before));
            eprintln!(
                "round {}/{} {:<22} {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  CPU {:.1} µs/req  errors {}",
                round + 1,
                args.runs,
                t.name,
                f.rps,
                f.p50_ms,
                f.p99_ms,
                if f.requests > 0 { f.cpu_us / f.requests as f64 } else { 0.0 },
                f.errors
            );
            t.runs.push(f);
        }
    }
    for t in &mut targets {
        t.rss = t.proc_.as_ref().and_then(Proc::peak_rss);
    }
    let rows: Vec<Row> = targets
        .iter()
        .map(|t| {
            let requests: u64 = t.runs.iter().map(|r| r.requests).sum();
            let cpu: f64 = t.runs.iter().map(|r| r.cpu_us).sum();
            let others: f64 = t.runs.iter().map(|r| r.others_cpu_us).sum();
            Row {
                name: t.name.clone(),
                rps: median(t.runs.iter().map(|r| r.rps).collect()),
                p50_ms: median(t.runs.iter().map(|r| r.p50_ms).collect()),
                p99_ms: median(t.runs.iter().map(|r| r.p99_ms).collect()),
                errors: t.runs.iter().map(|r| r.errors).sum(),
                cpu_us_per_req: (t.proc_.is_some() && requests > 0).then(|| cpu / requests as f64),
                others_us_per_req: (requests > 0).then(|| others / requests as f64),
                rss_kib: t.rss,
            }
        })
        .collect();
    let elapsed = started.elapsed();

    for t in targets {
        if let Some(p) = t.proc_ {
            p.stop().await;
        }
    }
    for b in backends {
        b.stop().await;
    }
    // Everything is stopped: nothing left for the script's trap.
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }

    let tbl = table(&rows);
    let pinned = measure.placement.pinned.is_some();
    let verdict = verdict(&rows, cpus, pinned).unwrap_or_default();
    let now = ringgate::rfc3339::seconds(std::time::SystemTime::now());
    let tool_desc = match tool {
        Tool::Wrk => format!(
            "wrk -t{} -c{} --latency with a Lua script sending random 6-digit `?id=`s (4,096 drawn in advance, in turn)",
            args.threads, args.connections
        ),
        Tool::Ours => format!(
            "`ringgate-lab load` at concurrency {} with random 6-digit `?id=`",
            args.connections
        ),
    };
    let backend_desc = match args.backend {
        BackendKind::Light => "three `ringgate-lab backend`s (one thread each, a fixed answer: the lightest backends we can make, so the proxies are the bottleneck)",
        BackendKind::RinggateServer => "three `ringgate-server` backends",
    };
    let mut section = format!(
        "_Measured by `make bench` at {now} on {cpus} CPUs, all on 127.0.0.1: {backend_desc}; \
ringgate with the static provider over them (\"ringgate\" with `mix64`, which spreads keys like the \
peers do; \"ringgate (quadratic)\" with the specified hash, which sends most keys to one backend); \
NGINX with `hash $arg_id consistent`, upstream keep-alive and no access log; HAProxy with \
`balance url_param id` + `hash-type consistent`, keep-alive and `http-reuse always`; NGINX and HAProxy \
with {workers} {worker_word}, ringgate with one serving thread per CPU it may use{floors}. Load: {tool_desc}. {runs} runs \
of {d:?} per target, rounds interleaved, medians reported (measuring took {el:.0?}). CPU µs/request \
is user + system time of the proxy's processes (`/proc/PID/stat`) over the requests served; the \
next column is the same for the backends and the load generator together. {placed} Peak RSS is \
`VmHWM` summed over the proxy's processes._\n\n{tbl}\n{verdict}\n",
        worker_word = if workers == 1 { "worker/thread" } else { "workers/threads" },
        placed = match &measure.placement.pinned {
            None => "Load generator, proxy and backends share the same CPUs, so these are relative figures.".to_string(),
            Some((proxy, load)) => format!("Pinned (`--pin`, `taskset`): each proxy on CPU {proxy} alone, the backends and the load generator on CPU{plural} {load}, so the proxy's one core is the bottleneck and nothing else runs on it.", plural = if load.contains(',') { "s" } else { "" }),
        },
        floors = if args.no_floor {
            ""
        } else {
            "; and two floors, proxies that parse no HTTP at all and only move bytes, each client \
connection paired with one backend connection: HAProxy in `mode tcp` and `ringgate-lab forward`, a \
byte relay built like ringgate's serving threads (a current-thread tokio runtime per thread, \
`SO_REUSEPORT`, `TCP_NODELAY`), which show what the sockets alone cost here: no HTTP proxy does \
less per request than they do"
        },
        runs = args.runs,
        d = args.duration,
        el = elapsed,
    );
    for n in &notes {
        let _ = writeln!(section, "\n> {n}");
    }
    let old = std::fs::read_to_string(&args.doc)
        .unwrap_or_else(|_| "# ringgate performance\n".to_string());
    let new = report::BENCH.replace(&old, &section);
    if let Some(d) = args.doc.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| AnalysisError::io("creating the docs dir", e))?;
    }
    std::fs::write(&args.doc, new)
        .map_err(|e| AnalysisError::io(format!("writing {}", args.doc.display()), e))?;
    println!("{tbl}\n{verdict}");
    for n in &notes {
        println!("note: {n}");
    }
    eprintln!("table written to {}", args.doc.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUT: &str = "Running 6s test @ http://127.0.0.1:8080/home
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms    1.10ms  30.12ms   90.00%
    Req/Sec    21.50k     1.20k   24.00k    70.00%
  Latency Distribution
     50%    1.25ms
     75%    1.80ms
     90%    2.60ms
     99%  850.00us
  256000 requests in 6.00s, 40.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  42666.67
Transfer/sec:      6.67MB
";

    #[test]
    fn reads_wrk_output() {
        let f = parse_wrk(WRK_OUT);
        assert!(f.is_some());
        let f = f.unwrap_or_default();
        assert!((f.rps - 42666.67).abs() < 1e-6);
        assert!((f.p50_ms - 1.25).abs() < 1e-9);
        assert!((f.p99_ms - 0.85).abs() < 1e-9);
        assert_eq!(f.errors, 7);
        assert!(parse_wrk("garbage").is_none());
        assert_eq!(parse_wrk_duration("1.02s"), Some(1020.0));
    }

    #[test]
    fn cpu_lists_are_read_as_the_kernel_writes_them() {
        assert_eq!(cpu_list("0-3"), vec![0, 1, 2, 3]);
        assert_eq!(cpu_list("0,2,4-5"), vec![0, 2, 4, 5]);
        assert_eq!(cpu_list("7"), vec![7]);
        assert_eq!(cpu_list(""), Vec::<usize>::new());
        assert_eq!(cpu_list("3-1"), Vec::<usize>::new());
        assert_eq!(cpu_list("a-b"), Vec::<usize>::new());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn ratio_column_is_ringgate_over_target() {
        let row = |name: &str, rps: f64| Row {
            name: name.into(),
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
            errors: 0,
            cpu_us_per_req: Some(10.0),
            others_us_per_req: Some(7.5),
            rss_kib: Some((2048, 1)),
        };
        let t = table(&[row("ringgate", 100.0), row("nginx", 50.0)]);
        assert!(
            t.contains("| nginx | 50 | 1.00 ms | 2.00 ms | 0 | 10.0 | 7.5 | 2.00 | 2.0 MiB |"),
            "{t}"
        );
        let v = verdict(
            &[
                row("ringgate", 100.0),
                row("nginx", 50.0),
                row("haproxy", 80.0),
            ],
            2,
            false,
        )
        .expect("a verdict");
        assert!(
            v.contains("faster peer (haproxy) in requests/s: **1.25×**"),
            "{v}"
        );
        assert!(
            !v.contains("floor"),
            "no floor measured, none reported: {v}"
        );
    }

    #[test]
    fn the_floors_are_reported_against_the_peers() {
        let row = |name: &str, rps: f64, cpu: f64| Row {
            name: name.into(),
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
            errors: 0,
            cpu_us_per_req: Some(cpu),
            others_us_per_req: Some(if name == "ringgate" { 6_000.0 } else { 5_000.0 }),
            rss_kib: None,
        };
        let v = verdict(
            &[
                row("ringgate", 90.0, 30.0),
                row("nginx", 100.0, 20.0),
                row("haproxy", 80.0, 25.0),
                row(FORWARD, 110.0, 18.0),
            ],
            2,
            false,
        )
        .expect("a verdict");
        assert!(
            v.contains(
                "byte relay (tokio) moves the same requests at 1.10× the faster peer's \
requests/s and 0.90× the leaner peer's CPU per request."
            ),
            "{v}"
        );
        // 2 CPUs at 120 requests/s: 16,666.7 µs a request, less the others' 5,000 (the least).
        assert!(
            v.contains(
                "At 1.2× the faster peer's rate (120 requests/s) 2 CPUs give a request 16666.7 µs \
in all; the backends and the load generator took at least 5000.0 µs of it in this run, which \
leaves a proxy 11666.7 µs; the byte relay needed 18.0."
            ),
            "{v}"
        );
        // Pinned, the proxy has one CPU: 120 requests/s give it 8,333.3 µs a request.
        let rows = [
            row("ringgate", 90.0, 30.0),
            row("nginx", 100.0, 20.0),
            row(FORWARD, 110.0, 18.0),
        ];
        let v = verdict(&rows, 2, true).expect("a verdict");
        assert!(
            v.contains(
                "At 1.2× the faster peer's rate (120 requests/s) the proxy's one CPU gives a request 8333.3 µs; the byte relay needed 18.0."
            ),
            "{v}"
        );
    }
}
