//! `make bench`, TLS section: ringgate, NGINX and HAProxy terminating TLS with the same ECDSA
//! P-256 certificate (generated here, nothing fetched) in front of the same three backends, all
//! on 127.0.0.1. Two measures per target: requests/s over kept-alive TLS connections (wrk over
//! HTTPS), and new handshakes per second ([`super::handshakes`]: each request a new TCP
//! connection and a full handshake, no session resumed, which wrk and h2load cannot do), each
//! with p99 and the CPU time of the proxy's processes per request. Rounds are interleaved and medians
//! reported, as in [`super::proxies`], whose process helpers this reuses. The table goes into
//! its own marked section of `docs/performance.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::proxies::{
    find_program, free_port, listening_addr, median, parse_wrk, wait_200, Launcher, Placement,
    Proc, RunFigures, WRK_SCRIPT,
};
use super::report::Marked;
use super::AnalysisError;
use crate::procs::{product_binary, CPU_TICKS_PER_SEC};

/// The TLS comparison, written by `make bench`.
pub const TLS: Marked = Marked {
    begin: "<!-- bench-tls:begin (written by `make bench`) -->",
    end: "<!-- bench-tls:end -->",
    heading: "## TLS termination against NGINX and HAProxy",
};

/// `ringgate-lab analysis tls`.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// The ringgate binary (default: `ringgate` next to this executable)
    #[arg(long)]
    pub ringgate_bin: Option<PathBuf>,
    /// Measured runs per target and mode (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Length of one run
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Warm-up per target and mode before the first round
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Open connections of wrk for the kept-alive runs
    #[arg(short = 'c', long, default_value_t = 64)]
    pub connections: usize,
    /// Concurrent clients of the handshake runs (each request on a new connection)
    #[arg(long, default_value_t = 32)]
    pub handshake_connections: usize,
    /// wrk threads (the handshake client runs on one thread)
    #[arg(short = 't', long, default_value_t = 1)]
    pub threads: usize,
    /// NGINX binary
    #[arg(long, default_value = "nginx")]
    pub nginx: String,
    /// HAProxy binary
    #[arg(long, default_value = "haproxy")]
    pub haproxy: String,
    /// Worker processes / threads of NGINX and HAProxy (default: one per CPU, as ringgate)
    #[arg(long)]
    pub proxy_workers: Option<usize>,
    /// The report whose TLS section is rewritten
    #[arg(long, default_value = "docs/performance.md")]
    pub doc: PathBuf,
    /// Append the pid of every started process here
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
}

/// Kept-alive requests, or a new connection (and handshake) per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    Handshake,
}

/// The medians of one target in one mode.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    pub rps: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU µs of the proxy's processes per request (so per handshake in handshake mode).
    pub cpu_us: Option<f64>,
}

/// One row of the TLS table.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsRow {
    pub name: String,
    pub keep_alive: Figures,
    pub handshake: Figures,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// The markdown table, with ringgate ÷ each target for both modes.
pub fn table(rows: &[TlsRow]) -> String {
    let rg = rows.iter().find(|r| r.name == "ringgate");
    let mut s = String::from(
        "| target | kept-alive req/s | p99 | CPU µs/req | new handshakes/s | p99 | CPU µs/handshake | ringgate ÷ target (req/s, handshakes/s) | errors |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let cpu = |f: &Figures| f.cpu_us.map_or("–".into(), |c| format!("{c:.1}"));
    for r in rows {
        let ratios = match rg {
            Some(g) => format!(
                "{}, {}",
                ratio(g.keep_alive.rps, r.keep_alive.rps),
                ratio(g.handshake.rps, r.handshake.rps)
            ),
            None => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} ms | {} | {:.0} | {:.2} ms | {} | {ratios} | {} |",
            r.name,
            r.keep_alive.rps,
            r.keep_alive.p99_ms,
            cpu(&r.keep_alive),
            r.handshake.rps,
            r.handshake.p99_ms,
            cpu(&r.handshake),
            r.keep_alive.errors + r.handshake.errors
        );
    }
    s
}

/// ringgate against the faster peer in each mode.
pub fn verdict(rows: &[TlsRow]) -> Option<String> {
    let rg = rows.iter().find(|r| r.name == "ringgate")?;
    let peers: Vec<&TlsRow> = rows.iter().filter(|r| r.name != "ringgate").collect();
    let best = |f: fn(&TlsRow) -> f64| {
        peers
            .iter()
            .max_by(|a, b| f(a).total_cmp(&f(b)))
            .map(|r| (r.name.clone(), f(r)))
    };
    let (ka_name, ka) = best(|r| r.keep_alive.rps)?;
    let (hs_name, hs) = best(|r| r.handshake.rps)?;
    Some(format!(
        "ringgate ÷ the faster peer over kept-alive TLS ({ka_name}): **{}×** requests/s; \
in new handshakes per second ({hs_name}): **{}×**.",
        ratio(rg.keep_alive.rps, ka),
        ratio(rg.handshake.rps, hs)
    ))
}

/// The bench certificate (ECDSA P-256, for `localhost` and 127.0.0.1), written as
/// `cert.pem`, `key.pem` and `combined.pem` (HAProxy's form).
fn write_certificate(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), AnalysisError> {
    let bench = |e: rcgen::Error| AnalysisError::Bench(format!("generating the certificate: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(bench)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(bench)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ringgate bench");
    let cert = params.self_signed(&key).map_err(bench)?;
    let paths = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("combined.pem"),
    );
    let write = |p: &Path, text: String| {
        std::fs::write(p, text)
            .map_err(|e| AnalysisError::io(format!("writing {}", p.display()), e))
    };
    write(&paths.0, cert.pem())?;
    write(&paths.1, key.serialize_pem())?;
    write(&paths.2, format!("{}{}", cert.pem(), key.serialize_pem()))?;
    Ok(paths)
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_port(port: u16, within: Duration) -> Result<(), AnalysisError> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(AnalysisError::Bench(format!(
        "nothing listens on 127.0.0.1:{port} after {within:?}"
    )))
}

struct Target {
    name: String,
    addr: std::net::SocketAddr,
    proc_: Proc,
    runs: Vec<(Mode, RunFigures)>,
}

/// One run against `addr` in `mode`: wrk over kept-alive HTTPS, or the handshake client.
async fn measure(
    wrk: &Path,
    script: &Path,
    addr: std::net::SocketAddr,
    mode: Mode,
    args: &TlsArgs,
    d: Duration,
) -> Result<RunFigures, AnalysisError> {
    if mode == Mode::Handshake {
        let n = args.handshake_connections;
        return tokio::task::spawn_blocking(move || super::handshakes::run(addr, n, d))
            .await
            .map_err(|e| AnalysisError::Bench(format!("the handshake client failed: {e}")))?;
    }
    let out = Command::new(wrk)
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", d.as_secs().max(1)))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("https://{addr}/home"))
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

/// Starts the backends and the three proxies, measures, writes the section.
pub async fn run(args: TlsArgs) -> Result<(), AnalysisError> {
    let Some(wrk_bin) = find_program("wrk") else {
        return Err(AnalysisError::Bench(
            "the TLS bench needs wrk (bench/deps.sh proxies installs it)".into(),
        ));
    };
    let ringgate = match &args.ringgate_bin {
        Some(b) => b.clone(),
        None => product_binary("ringgate")?,
    };
    let workers = args.proxy_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let dir = tempfile::Builder::new()
        .prefix("ringgate-bench-tls-")
        .tempdir()
        .map_err(|e| AnalysisError::io("creating a temp dir", e))?;
    let tmp = dir.path();
    let launcher = Launcher {
        pidfile: args.pidfile.clone(),
        placement: Placement::anywhere(),
    };
    let (cert, key, combined) = write_certificate(tmp)?;
    let mut notes = Vec::new();

    // The backends: the lab's lightest ones, as in the plain-HTTP comparison.
    let me = std::env::current_exe().map_err(|e| AnalysisError::io("locating ringgate-lab", e))?;
    let mut backends = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=3 {
        let mut cmd = Command::new(&me);
        cmd.arg("backend")
            .env("SERVER_ID", format!("server-{i}"))
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
    let mut targets = Vec::new();

    // ringgate: static provider over the three, mix64 (the plain bench's "ringgate"), TLS on a
    // port of its own; its plain port answers the readiness check.
    let tls_port = free_port()?;
    let servers: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!(r#"{{ name = "server-{}", address = "{a}" }}"#, i + 1))
        .collect();
    let policy_dir = tmp.join("policies");
    std::fs::create_dir_all(&policy_dir).map_err(|e| AnalysisError::io("policy dir", e))?;
    let conf = tmp.join("lb.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\n\n[ring]\nrequest_hash = \"mix64\"\nvnode_hash = \"mix64\"\n\n\
[replicas]\ncount = 3\n\n[provider]\nkind = \"static\"\nservers = [{}]\n\n[policy]\ndir = \"{}\"\n\n\
[tls]\nenabled = true\nlisten = \"127.0.0.1:{tls_port}\"\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            servers.join(", "),
            policy_dir.display(),
            cert.display(),
            key.display()
        ),
    )
    .map_err(|e| AnalysisError::io("writing lb.toml", e))?;
    let mut cmd = Command::new(&ringgate);
    cmd.arg("serve")
        .arg("--config")
        .arg(&conf)
        .env("RUST_LOG", "warn");
    let mut rg = launcher.spawn("ringgate", cmd, &tmp.join("ringgate.log"))?;
    let plain = listening_addr(&mut rg).await?;
    wait_200(
        &format!("http://{plain}/home?id=1"),
        Duration::from_secs(20),
    )
    .await?;
    wait_port(tls_port, Duration::from_secs(5)).await?;
    targets.push(Target {
        name: "ringgate".into(),
        addr: ([127, 0, 0, 1], tls_port).into(),
        proc_: rg,
        runs: Vec::new(),
    });

    // NGINX: the plain bench's configuration, with the server block on TLS (and HTTP/2 by ALPN).
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
  server {{\n    listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};\n\
    ssl_protocols TLSv1.2 TLSv1.3;\n    location / {{\n      proxy_pass http://ring;\n\
      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                cert.display(),
                key.display()
            );
            let path = tmp.join("nginx.conf");
            std::fs::write(&path, conf).map_err(|e| AnalysisError::io("writing nginx.conf", e))?;
            let mut cmd = Command::new(nginx);
            cmd.arg("-e")
                .arg(tmp.join("nginx-early.log"))
                .arg("-p")
                .arg(tmp)
                .arg("-c")
                .arg(&path);
            let p = launcher.spawn("nginx", cmd, &tmp.join("nginx.log"))?;
            match wait_port(port, Duration::from_secs(20)).await {
                Ok(()) => targets.push(Target {
                    name: "nginx".into(),
                    addr: ([127, 0, 0, 1], port).into(),
                    proc_: p,
                    runs: Vec::new(),
                }),
                Err(e) => {
                    let log = std::fs::read_to_string(tmp.join("nginx.log")).unwrap_or_default();
                    notes.push(format!("NGINX did not come up: {e} {log}"));
                    p.stop().await;
                }
            }
        }
        None => notes.push(format!("{} not installed: NGINX skipped", args.nginx)),
    }

    // HAProxy: the plain bench's configuration, with the frontend on TLS (h2 and http/1.1).
    match find_program(&args.haproxy) {
        Some(haproxy) => {
            let port = free_port()?;
            let servers: String = addrs
                .iter()
                .enumerate()
                .map(|(i, a)| format!("  server s{} {a}\n", i + 1))
                .collect();
            let conf = format!(
                "global\n  maxconn 4096\n  nbthread {workers}\n\ndefaults\n  mode http\n  timeout connect 5s\n\
  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\n\
frontend fe\n  bind 127.0.0.1:{port} ssl crt {} alpn h2,http/1.1\n  default_backend be\n\n\
backend be\n  balance url_param id\n  hash-type consistent\n{servers}",
                combined.display()
            );
            let path = tmp.join("haproxy.cfg");
            std::fs::write(&path, conf).map_err(|e| AnalysisError::io("writing haproxy.cfg", e))?;
            let mut cmd = Command::new(haproxy);
            cmd.arg("-db").arg("-f").arg(&path);
            let p = launcher.spawn("haproxy", cmd, &tmp.join("haproxy.log"))?;
            match wait_port(port, Duration::from_secs(20)).await {
                Ok(()) => targets.push(Target {
                    name: "haproxy".into(),
                    addr: ([127, 0, 0, 1], port).into(),
                    proc_: p,
                    runs: Vec::new(),
                }),
                Err(e) => {
                    let log = std::fs::read_to_string(tmp.join("haproxy.log")).unwrap_or_default();
                    notes.push(format!("HAProxy did not come up: {e} {log}"));
                    p.stop().await;
                }
            }
        }
        None => notes.push(format!("{} not installed: HAProxy skipped", args.haproxy)),
    }

    let script = tmp.join("random_id.lua");
    std::fs::write(&script, WRK_SCRIPT)
        .map_err(|e| AnalysisError::io("writing the wrk script", e))?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let started = Instant::now();
    for mode in [Mode::KeepAlive, Mode::Handshake] {
        for t in &targets {
            eprintln!("warm-up {} ({mode:?})", t.name);
            let f = measure(&wrk_bin, &script, t.addr, mode, &args, args.warmup).await?;
            if f.requests == 0 || f.errors == f.requests {
                return Err(AnalysisError::Bench(format!(
                    "{} answered no request over TLS in the warm-up",
                    t.name
                )));
            }
        }
    }
    for round in 0..args.runs {
        for mode in [Mode::KeepAlive, Mode::Handshake] {
            let k = targets.len();
            for step in 0..k {
                let t = &mut targets[(round + step) % k];
                let before = t.proc_.cpu_ticks();
                let mut f = measure(&wrk_bin, &script, t.addr, mode, &args, args.duration).await?;
                f.cpu_us =
                    t.proc_.cpu_ticks().saturating_sub(before) as f64 * 1e6 / CPU_TICKS_PER_SEC;
                eprintln!(
                    "round {}/{} {:<9} {:<10} {:>9.0} req/s  p99 {:.2} ms  CPU {:.1} µs/req  errors {}",
                    round + 1,
                    args.runs,
                    t.name,
                    format!("{mode:?}"),
                    f.rps,
                    f.p99_ms,
                    if f.requests > 0 { f.cpu_us / f.requests as f64 } else { 0.0 },
                    f.errors
                );
                t.runs.push((mode, f));
            }
        }
    }
    let elapsed = started.elapsed();
    let figures = |t: &Target, mode: Mode| {
        let runs: Vec<&RunFigures> = t
            .runs
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, f)| f)
            .collect();
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        let cpu: f64 = runs.iter().map(|r| r.cpu_us).sum();
        Figures {
            rps: median(runs.iter().map(|r| r.rps).collect()),
            p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
            errors: runs.iter().map(|r| r.errors).sum(),
            cpu_us: (requests > 0).then(|| cpu / requests as f64),
        }
    };
    let rows: Vec<TlsRow> = targets
        .iter()
        .map(|t| TlsRow {
            name: t.name.clone(),
            keep_alive: figures(t, Mode::KeepAlive),
            handshake: figures(t, Mode::Handshake),
        })
        .collect();
    for t in targets {
        t.proc_.stop().await;
    }
    for b in backends {
        b.stop().await;
    }
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }

    let tbl = table(&rows);
    let verdict = verdict(&rows).unwrap_or_default();
    let now = ringgate::rfc3339::seconds(std::time::SystemTime::now());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut section = format!(
        "_Measured by `make bench` at {now} on {cpus} CPUs, all on 127.0.0.1: the plain bench's three \
`ringgate-lab backend`s behind ringgate (static provider, `mix64`, `[tls]` on its own port), NGINX \
(`listen … ssl http2`, upstream keep-alive, no access log) and HAProxy (`bind … ssl crt … alpn \
h2,http/1.1`, `http-reuse always`), each terminating TLS with the same self-signed ECDSA P-256 \
certificate and its default TLS settings (TLS 1.3 negotiated); NGINX and HAProxy with {workers} \
workers/threads, ringgate with one serving thread per CPU. Kept-alive: wrk -t{t} -c{c} --latency \
over HTTPS with random 6-digit `?id=`. New handshakes: the lab's handshake client \
(`bench/lab/src/analysis/handshakes.rs`, rustls, one thread, {h} concurrent clients), where every \
request is a new TCP connection, a full TLS 1.3 handshake with no session resumed (wrk and h2load \
resume the previous session, which skips the key exchange and the signature) and `Connection: \
close`. {runs} runs \
of {d:?} per target and mode, rounds interleaved, medians reported (measuring took {el:.0?}). CPU \
is user + system time of the proxy's processes over the requests served. Load generator, proxy \
and backends share the same CPUs: relative figures._\n\n{tbl}\n{verdict}\n",
        t = args.threads,
        c = args.connections,
        h = args.handshake_connections,
        runs = args.runs,
        d = args.duration,
        el = elapsed,
    );
    for n in &notes {
        let _ = writeln!(section, "\n> {n}");
    }
    let old = std::fs::read_to_string(&args.doc)
        .unwrap_or_else(|_| "# ringgate performance\n".to_string());
    std::fs::write(&args.doc, TLS.replace(&old, &section))
        .map_err(|e| AnalysisError::io(format!("writing {}", args.doc.display()), e))?;
    println!("{tbl}\n{verdict}");
    eprintln!("TLS table written to {}", args.doc.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, ka: f64, hs: f64) -> TlsRow {
        let f = |rps| Figures {
            rps,
            p99_ms: 1.5,
            errors: 0,
            cpu_us: Some(20.0),
        };
        TlsRow {
            name: name.into(),
            keep_alive: f(ka),
            handshake: f(hs),
        }
    }

    #[test]
    fn the_table_has_both_modes_and_the_ratios() {
        let rows = [
            row("ringgate", 100.0, 30.0),
            row("nginx", 50.0, 40.0),
            row("haproxy", 80.0, 60.0),
        ];
        let t = table(&rows);
        assert!(
            t.contains("| nginx | 50 | 1.50 ms | 20.0 | 40 | 1.50 ms | 20.0 | 2.00, 0.75 | 0 |"),
            "{t}"
        );
        let v = verdict(&rows).expect("a verdict");
        assert!(v.contains("(haproxy): **1.25×**"), "{v}");
        assert!(v.contains("(haproxy): **0.50×**"), "{v}");
    }

    #[test]
    fn the_section_is_replaced_appended_and_kept() {
        let doc = "# perf\n\ntext\n";
        let once = TLS.replace(doc, "first");
        assert!(once.contains(TLS.heading) && once.contains("first\n<!-- bench-tls:end -->"));
        let twice = TLS.replace(&once, "second\n");
        assert!(
            twice.contains("second") && !twice.contains("first"),
            "{twice}"
        );
        assert_eq!(twice.matches(TLS.heading).count(), 1);
        let regenerated = TLS.keep(&twice, "# perf, new\n");
        assert!(regenerated.starts_with("# perf, new\n") && regenerated.contains("second"));
        assert_eq!(TLS.keep("# no section\n", "# new\n"), "# new\n");
    }
}
