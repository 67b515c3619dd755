//! `Via` on proxied responses, the ring fingerprint in `/lb/status` and `/lb/metrics`, and
//! `ringgate-server --check` (the replica image's health check), against real processes.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Conf, GatewayProcess, SERVER_BIN};

#[tokio::test]
async fn proxied_responses_name_the_gateway_and_status_shows_the_fingerprint() {
    let gw = GatewayProcess::start_toml(&format!(
        "name = \"edge-7\"\n{}",
        Conf {
            replicas: "count = 2".into(),
            ..Conf::default()
        }
        .render()
    ));
    gw.wait_status(Duration::from_secs(30), "two up", |s| s["up"] == 2)
        .await;
    let client = support::client();
    let req = http::Request::get(gw.url("/home?id=7"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[http::header::VIA], "1.1 edge-7");
    // The gateway's own endpoints are not proxied: no Via.
    let req = http::Request::get(gw.url("/rep"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("answer");
    assert!(resp.headers().get(http::header::VIA).is_none());

    let status = gw.status().await;
    assert_eq!(status["gateway"]["name"], "edge-7");
    let fp = status["ring"]["fingerprint"]
        .as_str()
        .expect("a fingerprint")
        .to_owned();
    assert_eq!(fp.len(), 16, "{fp}");
    assert!(
        status.get("engine").is_none(),
        "no shared ring with the process provider"
    );
    let metrics = gw.metrics().await;
    let line = format!("ringgate_ring_fingerprint{{gateway=\"edge-7\",fingerprint=\"{fp}\"}} 1");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} missing:\n{metrics}"
    );
    // The fingerprint follows the owner table.
    let (code, body) = support::call("POST", &gw.url("/add"), r#"{"n": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let after = gw.status().await;
    assert_ne!(after["ring"]["fingerprint"].as_str(), Some(fp.as_str()));
}

fn check(port: u16) -> (bool, String) {
    let out = Command::new(SERVER_BIN)
        .arg("--check")
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run ringgate-server --check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ringgate_server_check_answers_for_its_own_heartbeat() {
    let mut server = Command::new(SERVER_BIN)
        .env("PORT", "0")
        .env("BIND", "127.0.0.1")
        .env("SERVER_ID", "chk")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ringgate-server");
    let mut line = String::new();
    let stdout = server.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("line");
    let addr = ringgate::listening::parse(&line).expect("listening line");
    let (ok, err) = check(addr.port());
    assert!(ok, "a serving replica passes: {err}");
    let _ = server.kill();
    let _ = server.wait();
    let (ok, err) = check(addr.port());
    assert!(!ok, "nothing listens: the check fails");
    assert!(err.contains("cannot connect"), "{err}");
    // Something that answers but is not a healthy replica fails too.
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = other.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = other.accept() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let (ok, err) = check(port);
    assert!(!ok);
    assert!(err.contains("503"), "{err}");
}
