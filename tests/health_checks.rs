//! Health checks and traffic on one HTTP stack (issue 24), against the real gateway binary and
//! raw replicas on real sockets: whatever a replica answers, its checks pass exactly when a
//! client's request through the gateway gets that answer whole. Each case is judged twice on
//! one replica with one answer: by a client request (`/home?case=N`), then by the checks
//! (`[health] path = "/check?case=N"`, edited live).
//! Must not touch: other tests' gateways or replicas; every test starts its own on port 0.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::backends::{Backend, Behaviour};
use support::{Conf, GatewayProcess};

/// What a client gets through the gateway at `addr` for `path`: the status of an answer it read
/// whole, or why it could not (a strict client: hyper's, on its own connection).
async fn through_the_gateway(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, "gw.test")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("{status}, its body cut: {e}"))?;
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(20), ask)
        .await
        .unwrap_or_else(|_| Err("no whole answer within 20 s".into()))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The gateway's config with `[health] path` set to `path`.
fn with_health_path(gw: &GatewayProcess, path: &str) -> String {
    let text = std::fs::read_to_string(&gw.config_path).expect("read the config");
    let line = text
        .lines()
        .find(|l| l.starts_with("path = "))
        .expect("a health path line")
        .to_owned();
    text.replace(&line, &format!("path = \"{path}\""))
}

/// The first check of `path` that started after the edit applied: whether it passed, and what
/// it found.
async fn checked(gw: &GatewayProcess, path: &str) -> (bool, serde_json::Value) {
    std::fs::write(&gw.config_path, with_health_path(gw, path)).expect("edit");
    gw.wait_status(Duration::from_secs(10), "the new health.path", |s| {
        s["health"]["path"] == path
    })
    .await;
    let applied = unix_ms();
    let s = gw
        .wait_status(Duration::from_secs(10), "a check of the new path", |s| {
            support::replica(s, "raw")["last_probe"]["at"]
                .as_u64()
                .is_some_and(|at| at > applied)
        })
        .await;
    let probe = support::replica(&s, "raw")["last_probe"].clone();
    (probe["ok"] == true, probe)
}

/// A response head of 70 fields of 1,000 bytes: past the 64 KiB the codec takes from a replica,
/// within what hyper's client takes (the stack checks used before).
fn large_head() -> &'static str {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..70 {
        head.push_str(&format!("x-field-{i}: {}\r\n", "v".repeat(1000)));
    }
    head.push_str("content-length: 2\r\n\r\nok");
    Box::leak(head.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_judged_the_same_way_by_its_checks_and_by_traffic() {
    let cases: &'static [(&'static str, &'static str, bool)] = Box::leak(Box::new([
        (
            "HTTP/1.0 with a length",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            true,
        ),
        (
            "HTTP/1.0 until the close",
            "HTTP/1.0 200 OK\r\n\r\nuntil the close",
            true,
        ),
        (
            "closes right after the head",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            false,
        ),
        (
            "content-length: +5",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
            false,
        ),
        ("a head of 70 KiB", large_head(), false),
    ]));
    let answers: &'static [&'static str] = Box::leak(
        cases
            .iter()
            .map(|c| c.1)
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let replica = Backend::start("127.0.0.1", Behaviour::Raw(answers)).await;
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"raw\", address = \"{}\" }}]\n",
            replica.addr
        ),
        health: "path = \"/heartbeat\"\ninterval = \"100ms\"\nrise = 1\nfall = 1\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(10), "the replica is up", |s| {
        s["up"] == 1
    })
    .await;
    for (i, (what, _, whole)) in cases.iter().enumerate() {
        let traffic = through_the_gateway(gw.addr, &format!("/home?case={i}&id=1")).await;
        assert_eq!(
            traffic == Ok(200),
            *whole,
            "{what}: a client got {traffic:?}"
        );
        let (passed, probe) = checked(&gw, &format!("/check?case={i}")).await;
        assert_eq!(passed, *whole, "{what}: the check found {probe}");
        // Back to a path it answers well, for the next case's client request.
        std::fs::write(&gw.config_path, with_health_path(&gw, "/heartbeat")).expect("edit");
        gw.wait_status(Duration::from_secs(10), "the replica is up again", |s| {
            s["up"] == 1 && s["health"]["path"] == "/heartbeat"
        })
        .await;
    }
}
