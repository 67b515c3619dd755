//! The access log against real gateways: JSON lines with every field, the combined format
//! after a live edit, the termination reasons a client abort and a reset replica give, and
//! reopening on SIGHUP after the file was moved away (logrotate).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::backends::{Backend, Behaviour};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The log's lines once `done` says they are all there, or after 10 s (whatever is there).
fn lines_until(path: &Path, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if done(&lines) || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The file's lines once it has at least `n` (bounded wait: lines are flushed off the request
/// path within a fraction of a second).
fn lines(path: &Path, n: usize) -> Vec<String> {
    lines_until(path, |l| l.len() >= n)
}

/// Waits until a line mentions `needle`: a line count is not enough where the gateway also
/// logs its own admin calls.
fn lines_with(path: &Path, needle: &str) -> Vec<String> {
    lines_until(path, |l| l.iter().any(|line| line.contains(needle)))
}

fn parsed(lines: &[String]) -> Vec<Value> {
    lines.iter().map(|l| json(l)).collect()
}

fn logged_conf(log: &Path, format: &str) -> String {
    Conf {
        replicas: "count = 3\n".into(),
        ..Conf::default()
    }
    .render()
        + &format!(
            "[log]\naccess = \"{}\"\nformat = \"{format}\"\n",
            log.display()
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_every_field_and_the_format_applies_live() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let gw = GatewayProcess::start_toml(&logged_conf(&log, "json"));
    let c = client();
    let (code, body) = call_with(
        &c,
        "GET",
        &gw.url("/home?id=42"),
        "",
        &[("user-agent", "test/1.0")],
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = get(&gw.url("/rep")).await;
    assert_eq!(code, 200);
    let (code, _) = get(&gw.url("/nothing-here")).await;
    assert_eq!(code, 404, "ringgate-server's 404 for an unknown path");

    let got = parsed(&lines(&log, 3));
    assert_eq!(got.len(), 3, "{got:#?}");
    // Lines from different serving threads come in batches: find each by its path.
    let by_path = |p: &str| {
        got.iter()
            .find(|l| l["path"] == p)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let home = &by_path("/home?id=42");
    assert_eq!(home["method"], "GET");
    assert_eq!(home["path"], "/home?id=42");
    assert_eq!(home["protocol"], "HTTP/1.1");
    assert_eq!(home["status"], 200);
    assert_eq!(home["bytes"].as_u64(), Some(body.len() as u64));
    assert_eq!(home["replica"].as_str(), server_of(&body).as_deref());
    assert_eq!(
        home["slot"],
        42 * 42 + 2 * 42 + 17 - 3 * 512,
        "H(42) mod 512"
    );
    assert_eq!(home["retries"], 0);
    assert_eq!(home["termination"], "ok");
    assert_eq!(home["user_agent"], "test/1.0");
    assert!(home["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert!(
        home["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24),
        "{home}"
    );
    let (total, upstream) = (
        home["duration_ms"].as_f64().expect("duration"),
        home["upstream_ms"].as_f64().expect("upstream"),
    );
    assert!(upstream > 0.0 && total >= upstream, "{home}");
    let rep = &by_path("/rep");
    assert_eq!(
        (rep["path"].as_str(), rep["status"].as_u64()),
        (Some("/rep"), Some(200))
    );
    assert!(
        rep["replica"].is_null() && rep["upstream_ms"].is_null(),
        "the gateway's own answer"
    );
    let missing = by_path("/nothing-here");
    assert_eq!(missing["status"], 404);
    assert_eq!(
        missing["termination"], "ok",
        "a replica's 404 is a complete response"
    );

    // A live edit to the combined format: the next lines use it.
    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    std::fs::write(
        &gw.config_path,
        text.replace("format = \"json\"", "format = \"combined\""),
    )
    .expect("edit");
    let deadline = Instant::now() + Duration::from_secs(10);
    let combined = loop {
        let (code, _) = call_with(
            &c,
            "GET",
            &gw.url("/home?id=7"),
            "",
            &[("user-agent", "curl/8")],
        )
        .await;
        assert_eq!(code, 200);
        let all = lines(&log, 0);
        if let Some(l) = all.iter().find(|l| l.starts_with("127.0.0.1 - - [")) {
            break l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no combined line after the edit:\n{}",
            all.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        combined.contains("\"GET /home?id=7 HTTP/1.1\" 200 "),
        "{combined}"
    );
    assert!(combined.contains(" \"-\" \"curl/8\" rt="), "{combined}");
    assert!(
        combined.contains(" slot=80 retries=0 term=ok"),
        "H(7) = 80: {combined}"
    );
    let m = gw.metrics().await;
    assert!(
        metric(&m, "ringgate_access_log_lines_total{outcome=\"written\"}") >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ringgate_access_log_lines_total{outcome=\"dropped\"}"),
        0.0
    );
}

/// A backend that answers `/heartbeat`, and for anything else promises a large body, sends a
/// few bytes of it and keeps the connection open.
async fn stalling_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            connections.spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    if !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    if got.starts_with(b"GET /heartbeat") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                        got.clear();
                        continue;
                    }
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nhello";
                    let _ = s.write_all(head).await;
                    // Hold the connection open, sending nothing more.
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminations_tell_a_client_abort_and_a_reset_replica() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let reset = Backend::start("127.0.0.1", Behaviour::Reset).await;
    let (stall, stall_task) = stalling_backend().await;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[provider]\nkind = \"static\"\n\
         servers = [{{ name = \"reset\", address = \"{}\" }}, {{ name = \"stall\", address = \"{stall}\" }}]\n\
         [hashing]\nkey = \"header:x-to\"\n\
         [policy]\n[log]\naccess = \"{}\"\n",
        reset.addr,
        log.display()
    );
    let gw = GatewayProcess::start_toml(&toml);
    // Which key goes to which replica: from the ring the gateway serves.
    let status = gw.status().await;
    let owners = status["ring"]["owners"].as_array().expect("owners").clone();
    let id_of = |name: &str| replica(&status, name)["id"].clone();
    let key_for = |name: &str| {
        (0u64..10_000)
            .find(|k| {
                let slot = (k * k + 2 * k + 17) % 512;
                owners[slot as usize] == id_of(name)
            })
            .expect("a key for each replica")
    };
    let (to_reset, to_stall) = (key_for("reset"), key_for("stall"));

    let (code, _) = call_with(
        &client(),
        "GET",
        &gw.url("/x"),
        "",
        &[("x-to", &to_reset.to_string())],
    )
    .await;
    assert_eq!(code, 502);

    // The client reads the head of a large response and goes away.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let req = format!("GET /big HTTP/1.1\r\nHost: x\r\nx-to: {to_stall}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("hello") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("response head in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);

    let got = parsed(&lines_with(&log, "\"path\":\"/big\""));
    let by_path = |p: &str| {
        got.iter()
            .find(|l| l["path"] == p)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let x = by_path("/x");
    assert_eq!(
        (x["status"].as_u64(), x["termination"].as_str()),
        (Some(502), Some("upstream_reset")),
        "{got:#?}"
    );
    assert_eq!(x["replica"], "reset");
    let big = by_path("/big");
    assert_eq!(
        (big["status"].as_u64(), big["termination"].as_str()),
        (Some(200), Some("client_abort")),
        "{got:#?}"
    );
    assert_eq!(big["replica"], "stall");
    assert_eq!(big["bytes"], 5, "what reached the client");
    stall_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_file_after_logrotate_moved_it() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let gw = GatewayProcess::start_toml(&logged_conf(&log, "json"));
    for id in 0..5 {
        assert_eq!(get(&gw.url(&format!("/home?id={id}"))).await.0, 200);
    }
    assert_eq!(lines(&log, 5).len(), 5);
    std::fs::rename(&log, &rotated).expect("rotate");
    gw.signal("HUP");
    // The gateway survives SIGHUP (its default action would end it) and reopens the path.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert_eq!(
            get(&gw.url("/home?id=99")).await.0,
            200,
            "still serving after SIGHUP"
        );
        assert!(
            Instant::now() < deadline,
            "no new access.log after SIGHUP:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = lines(&rotated, 5);
    assert!(old.len() >= 5);
    // Lines from different serving threads come in batches, so compare without order.
    let paths: std::collections::HashSet<String> = parsed(&old)
        .iter()
        .filter_map(|l| l["path"].as_str().map(str::to_owned))
        .collect();
    for i in 0..5 {
        assert!(paths.contains(&format!("/home?id={i}")), "{paths:?}");
    }
    let new = lines(&log, 1);
    assert!(
        parsed(&new).iter().all(|l| l["path"] == "/home?id=99"),
        "{new:?}"
    );
}

/// A User-Agent with bytes outside ASCII (Latin-1 `é`, then a UTF-8 `✓`), sent as raw bytes as
/// a client may: HTTP allows such bytes (obs-text) in a field value.
const AGENT: &[u8] = b"caf\xe9 \xe2\x9c\x93/1.0";
/// How both formats show it: each such byte as `\xHH`, as NGINX does.
const AGENT_SHOWN: &str = r"caf\xE9 \xE2\x9C\x93/1.0";

async fn get_with_agent(gw: &GatewayProcess, id: u32) {
    let mut request =
        format!("GET /home?id={id} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ").into_bytes();
    request.extend_from_slice(AGENT);
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let (code, body) = raw(gw.addr, &request).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_agent_with_non_ascii_bytes_is_escaped_in_both_formats_not_dropped() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let gw = GatewayProcess::start_toml(&logged_conf(&log, "json"));
    get_with_agent(&gw, 42).await;
    let got = lines_with(&log, "/home?id=42");
    let line = got
        .iter()
        .find(|l| l.contains("/home?id=42"))
        .unwrap_or_else(|| panic!("no line for the request:\n{}", got.join("\n")));
    assert_eq!(json(line)["user_agent"], AGENT_SHOWN, "{line}");

    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    std::fs::write(
        &gw.config_path,
        text.replace("format = \"json\"", "format = \"combined\""),
    )
    .expect("edit");
    let deadline = Instant::now() + Duration::from_secs(10);
    let combined = loop {
        get_with_agent(&gw, 7).await;
        let all = lines(&log, 0);
        if let Some(l) = all.iter().find(|l| l.starts_with("127.0.0.1 - - [")) {
            break l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no combined line after the edit:\n{}",
            all.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        combined.contains(&format!(" \"-\" \"{AGENT_SHOWN}\" rt=")),
        "{combined}"
    );
}
