//! Shared test helpers: start a real gateway binary on an ephemeral loopback port with a temp
//! config, talk HTTP to it, and clean everything up (also when a test fails).

#![allow(dead_code)]

pub mod backends;
pub mod python;
pub mod tls;
pub mod websocket;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_ringgate-server");
pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_ringgate");

/// Sections of a test config; each is the body of its `[section]`.
#[derive(Default, Clone)]
pub struct Conf {
    pub ring: String,
    pub hashing: String,
    pub replicas: String,
    pub provider: String,
    pub health: String,
    pub proxy: String,
    pub policy: String,
    pub admin: String,
    /// The body of `[tls]`; the section is left out when empty.
    pub tls: String,
    /// The body of `[log]`; the section is left out when empty.
    pub log: String,
    /// The body of `[tunnels]`; the section is left out when empty.
    pub tunnels: String,
    /// Provider kind; "process" (with this build's ringgate-server) unless set.
    pub kind: Option<String>,
}

impl Conf {
    pub fn render(&self) -> String {
        let kind = self.kind.clone().unwrap_or_else(|| "process".into());
        let mut provider = format!("kind = \"{kind}\"\n");
        if kind == "process" && !self.provider.contains("server_binary") {
            provider.push_str(&format!("server_binary = \"{SERVER_BIN}\"\n"));
        }
        provider.push_str(&self.provider);
        let mut out = String::from("listen = \"127.0.0.1:0\"\n");
        for (name, body) in [
            ("ring", &self.ring),
            ("hashing", &self.hashing),
            ("replicas", &self.replicas),
            ("provider", &provider),
            ("health", &self.health),
            ("proxy", &self.proxy),
            ("policy", &self.policy),
            ("admin", &self.admin),
        ] {
            out.push_str(&format!("[{name}]\n{body}\n"));
        }
        if !self.tls.is_empty() {
            out.push_str(&format!("[tls]\n{}\n", self.tls));
        }
        if !self.log.is_empty() {
            out.push_str(&format!("[log]\n{}\n", self.log));
        }
        if !self.tunnels.is_empty() {
            out.push_str(&format!("[tunnels]\n{}\n", self.tunnels));
        }
        out
    }
}

/// A running `ringgate serve` process (the binary users run). Dropping it kills the gateway (its
/// process replicas exit with it).
pub struct GatewayProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    env: Vec<(String, String)>,
    /// A command the gateway runs under (e.g. `prlimit --nofile=128:128 --`), empty for none.
    wrapper: Vec<String>,
    /// Sent as `Authorization: Bearer …` by [`status`](Self::status) and
    /// [`metrics`](Self::metrics) (harmless when the gateway has no token).
    pub admin_token: Option<String>,
    log: Arc<Mutex<String>>,
    /// The rest of the gateway's stdout lines (the `listening on https://` line).
    lines: Mutex<Option<std::sync::mpsc::Receiver<String>>>,
    https: Mutex<Option<SocketAddr>>,
}

impl GatewayProcess {
    pub fn start(conf: &Conf) -> GatewayProcess {
        GatewayProcess::start_toml(&conf.render())
    }

    pub fn start_toml(toml: &str) -> GatewayProcess {
        GatewayProcess::start_with(toml, &[])
    }

    /// Starts a gateway with `toml` (a `[policy] dir` in a temp dir is added unless the text sets
    /// `[policy]`) and extra environment variables.
    pub fn start_with(toml: &str, env: &[(&str, &str)]) -> GatewayProcess {
        let mut gw = GatewayProcess::start_with_deferred(toml, env);
        gw.launch();
        gw
    }

    /// Writes the config and prepares the gateway without starting it.
    fn start_with_deferred(toml: &str, env: &[(&str, &str)]) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("lb.toml");
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).expect("policy dir");
        let policy_dir = format!("dir = \"{}\"\n", policies.display());
        let toml = if toml.contains("[policy]\n") {
            toml.replace("[policy]\n", &format!("[policy]\n{policy_dir}"))
        } else {
            format!("{toml}\n[policy]\n{policy_dir}")
        };
        std::fs::write(&config_path, &toml).expect("write config");
        GatewayProcess {
            child: None,
            addr: "127.0.0.1:1".parse().expect("addr"),
            dir,
            config_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: Vec::new(),
            admin_token: None,
            log: Arc::new(Mutex::new(String::new())),
            lines: Mutex::new(None),
            https: Mutex::new(None),
        }
    }

    /// Starts a gateway with `conf` under `wrapper` (a command that runs the gateway binary given
    /// after its own arguments, such as `prlimit --nofile=128:128 --`).
    pub fn start_under(conf: &Conf, wrapper: &[&str]) -> GatewayProcess {
        let toml = conf.render();
        let mut gw = GatewayProcess::start_with_deferred(&toml, &[]);
        gw.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        gw.launch();
        gw
    }

    /// Starts the gateway process (again, after [`stop`](Self::stop)) with the same config.
    pub fn launch(&mut self) {
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(GATEWAY_BIN);
                c
            }
            None => Command::new(GATEWAY_BIN),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info,ringgate=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
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
                sink.lock().map(|mut s| s.push_str(&line)).ok();
                line.clear();
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let _ = tx.send(std::mem::take(&mut line));
            }
            let _ = tx.send(String::new());
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        self.child = Some(child);
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        *self.https.lock().expect("https lock") = None;
        match (
            ringgate::listening::parse(&line),
            ringgate::listening::parse_https(&line),
        ) {
            (Some(addr), _) => self.addr = addr,
            // HTTPS only: that line is the only one.
            (None, Some(addr)) => {
                self.addr = addr;
                *self.https.lock().expect("https lock") = Some(addr);
            }
            (None, None) => panic!(
                "gateway did not start: stdout {line:?}\nlog:\n{}",
                self.log()
            ),
        }
        *self.lines.lock().expect("lines lock") = Some(rx);
    }

    /// The HTTPS listener's address, from the `listening on https://` line (printed with the
    /// plain one, so it is there once the gateway started with TLS on).
    pub fn tls_addr(&self) -> SocketAddr {
        let mut https = self.https.lock().expect("https lock");
        if let Some(a) = *https {
            return a;
        }
        let lines = self.lines.lock().expect("lines lock");
        let rx = lines.as_ref().expect("the gateway was launched");
        let line = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        let addr = ringgate::listening::parse_https(&line).unwrap_or_else(|| {
            panic!(
                "no `listening on https://` line: {line:?}\nlog:\n{}",
                self.log()
            )
        });
        *https = Some(addr);
        addr
    }

    /// SIGTERM, then waits for the gateway to exit; true when it did within `timeout` (else it
    /// is killed).
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(child.id(), "TERM");
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Waits for the gateway to exit (after a signal) and returns whether it exited in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub async fn status(&self) -> Value {
        let (code, body) = self.admin_get("/lb/status").await;
        assert_eq!(code, 200, "{body}");
        json(&body)["message"].clone()
    }

    /// A GET of a guarded endpoint, with the admin token when one is set.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let auth = self.admin_token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        call_with(&client(), "GET", &self.url(path), "", &headers).await
    }

    pub async fn metrics(&self) -> String {
        let (code, body) = self.admin_get("/lb/metrics").await;
        assert_eq!(code, 200, "{body}");
        body
    }

    pub async fn replica_names(&self) -> Vec<String> {
        let (_, body) = get(&self.url("/rep")).await;
        json(&body)["message"]["replicas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Pids of the replica processes, from /lb/status.
    pub async fn replica_pids(&self) -> Vec<u32> {
        self.status().await["replicas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["instance"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Which server answers `/home?id=<id>` for each id in `ids` (every answer must be a 200).
    pub async fn owners(
        &self,
        ids: std::ops::Range<u64>,
    ) -> std::collections::HashMap<u64, String> {
        let c = client();
        let mut out = std::collections::HashMap::new();
        for id in ids {
            let (code, body) =
                call_with(&c, "GET", &self.url(&format!("/home?id={id}")), "", &[]).await;
            assert_eq!(code, 200, "{body}");
            out.insert(id, server_of(&body).expect("a /home answer"));
        }
        out
    }

    /// Polls `/lb/status` until `pred` holds, or panics after `timeout` with the last status.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; last status: {s:#}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

pub fn wait_dead(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// One request; returns status and body text. Panics only if the request cannot be made at all
/// within 30 s (a hung gateway).
pub async fn call_with(
    client: &TestClient,
    method: &str,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} hung"))
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e:?}"));
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

pub async fn call(method: &str, url: &str, body: &str) -> (u16, String) {
    call_with(&client(), method, url, body, &[]).await
}

pub async fn get(url: &str) -> (u16, String) {
    call("GET", url, "").await
}

pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The server name in a `/home` answer.
pub fn server_of(body: &str) -> Option<String> {
    json(body)["message"]
        .as_str()?
        .strip_prefix("Hello from Server: ")
        .map(str::to_owned)
}

/// Sends `request` (raw bytes, ideally with `Connection: close`) to `addr` from the loopback
/// address `from`, and returns the status and everything after the head (bounded by 10 s).
pub async fn raw_from(from: &str, addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let from: std::net::IpAddr = from.parse().expect("source ip");
    socket
        .bind((from, 0).into())
        .expect("bind the source address");
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// [`raw_from`] 127.0.0.1.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    raw_from("127.0.0.1", addr, request).await
}

/// The value of an unlabelled metric, or of one labelled sample (`name{labels}`); panics with
/// the whole text when it is missing.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
}

/// The names of the replicas a `/lb/status` message says are in the ring.
pub fn in_ring(status: &Value) -> std::collections::BTreeSet<String> {
    status["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["in_ring"] == true)
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The replica named `name` in a `/lb/status` message.
pub fn replica<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name))
        .unwrap_or(&Value::Null)
}

/// One HTTP/1.1 keep-alive connection, used for every request, never replaced (a pooled client
/// may open a second connection at any time, which a connection cap then refuses).
pub struct OneConnection {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    authority: String,
}

impl OneConnection {
    pub async fn open(addr: SocketAddr) -> OneConnection {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        OneConnection {
            send,
            authority: addr.to_string(),
        }
    }

    /// GET `path` on this connection; panics if the connection fails.
    pub async fn get(&mut self, path: &str) -> (u16, String) {
        let req = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let send = async {
            self.send.ready().await?;
            self.send.send_request(req).await
        };
        let resp = tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .unwrap_or_else(|_| panic!("GET {path} hung"))
            .unwrap_or_else(|e| panic!("GET {path} on the established connection failed: {e:?}"));
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// An HTTP/2 client connection with prior knowledge (h2c) to `addr`: its sender, and the task
/// driving it (ended when the gateway closes the connection).
pub async fn h2c<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c handshake");
    (send, tokio::spawn(conn))
}
