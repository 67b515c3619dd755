//! Scale to zero end to end: the real gateway binary with process replicas. After
//! `idle_to_zero` without a request N goes to 0; the next request is held while a replica
//! starts and answered 200, its wait reported (access log `held_ms`, `/lb/status`, metrics);
//! a burst at zero past `hold_max` gets 503 with `Retry-After` for the requests over the bound
//! and 200 for the held ones; N comes back to at least 1. No assertion on speed: waits are
//! bounded by timeouts only (the wake-up times are printed, for docs/autoscaling.md).

// support/docker.rs brings `engines.rs` along as support does.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
mod support;

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use support::*;

/// Scale to zero after 2 s idle, at most 2 requests held.
const AUTOSCALE: &str = "[autoscale]\nenabled = true\nmin = 0\nmax = 2\n\
    target_in_flight = 100.0\nstable_window = \"4s\"\npanic_window = \"1s\"\n\
    scale_down_delay = \"5s\"\nmax_step = 2\nidle_to_zero = \"2s\"\nhold_max = 2\n\
    hold_timeout = \"30s\"\n";

const HEALTH: &str = "interval = \"250ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 2\n";

fn log_section(log: &std::path::Path) -> String {
    format!("access = \"{}\"\nformat = \"json\"\n", log.display())
}

fn toml(log: &std::path::Path) -> String {
    let conf = Conf {
        replicas: "count = 1\nmax_replicas = 4\n".into(),
        health: HEALTH.into(),
        proxy: "drain_timeout = \"2s\"\n".into(),
        log: log_section(log),
        ..Conf::default()
    };
    format!("{}\n{AUTOSCALE}", conf.render())
}

/// Waits until the autoscaler has taken N to zero and says so.
async fn wait_zero(gw: &GatewayProcess) -> serde_json::Value {
    gw.wait_status(Duration::from_secs(60), "N = 0 (scaled to zero)", |s| {
        s["up"] == 0
            && s["autoscale"]["desired"] == 0
            && s["autoscale"]["scaled_to_zero"] == true
            && s["replicas"].as_array().is_some_and(|a| a.is_empty())
    })
    .await
}

/// One GET; its status, its `Retry-After`, and its body.
async fn get_full(c: &TestClient, url: &str) -> (u16, Option<String>, String) {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(60), c.request(req))
        .await
        .unwrap_or_else(|_| panic!("GET {url} hung"))
        .unwrap_or_else(|e| panic!("GET {url} failed: {e:?}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    (status, retry_after, body)
}

/// `GET /home?id=<id>` on an open connection; its status, `Retry-After` and body.
async fn raw_get(mut s: tokio::net::TcpStream, id: usize) -> (u16, Option<String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET /home?id={id} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("an answer within a minute")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let retry_after = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().to_owned())
    });
    (status, retry_after, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_goes_to_zero_a_request_wakes_it_and_a_burst_past_hold_max_gets_503() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let gw = GatewayProcess::start_toml(&toml(&log));
    scenario(&gw, &log, "process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_docker_replicas_the_same() {
    require_docker!();
    let scope = docker_support::Scope::new("zero");
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let sections = format!(
        "[replicas]\ncount = 1\nmax_replicas = 4\n[health]\n{HEALTH}[proxy]\n\
         drain_timeout = \"2s\"\n[log]\n{}{AUTOSCALE}",
        log_section(&log)
    );
    let gw = docker_support::start_gateway(&scope, docker_support::SERVER_IMAGE, &sections);
    scenario(&gw, &log, "docker").await;
}

/// The scenario, whatever runs the replicas (`kind` names it in what is printed).
async fn scenario(gw: &GatewayProcess, log: &std::path::Path, kind: &str) {
    gw.wait_status(Duration::from_secs(30), "one replica up", |s| s["up"] == 1)
        .await;

    // No request for idle_to_zero: N goes to 0.
    let zero = wait_zero(gw).await;
    assert_eq!(
        zero["autoscale"]["last_decision"]["direction"], "down",
        "{:#}",
        zero["autoscale"]
    );
    assert_eq!(zero["autoscale"]["last_decision"]["to"], 0);
    assert!(gw.log().contains("scaling to zero"), "{}", gw.log());

    // The first request is held while a replica starts, and answered.
    let c = client();
    let t = Instant::now();
    let (code, _, body) = get_full(&c, &gw.url("/home?id=7")).await;
    let first_wait = t.elapsed();
    assert_eq!(code, 200, "{body}");
    assert!(server_of(&body).is_some(), "{body}");
    // N is back to at least 1, and the wait is reported.
    let woke = gw
        .wait_status(Duration::from_secs(30), "N >= 1 after the wake-up", |s| {
            s["up"].as_u64().is_some_and(|n| n >= 1) && s["autoscale"]["scaled_to_zero"] == false
        })
        .await;
    let a = &woke["autoscale"];
    assert_eq!(a["held_total"], 1, "{a:#}");
    assert!(
        a["hold_wait_ms_total"].as_f64().is_some_and(|ms| ms > 0.0),
        "{a:#}"
    );
    assert_eq!(a["last_decision"]["direction"], "up", "{a:#}");
    assert!(gw.log().contains("waking up"), "{}", gw.log());
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "ringgate_autoscale_held_total"), 1.0);
    assert_eq!(
        metric(&metrics, "ringgate_autoscale_hold_wait_seconds_count"),
        1.0
    );
    let held_line = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("\"held_ms\"")) {
                return json(line);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the held request's access-log line");
    assert_eq!(held_line["status"], 200, "{held_line}");
    assert!(
        held_line["held_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{held_line}"
    );
    assert!(held_line["replica"].is_string(), "{held_line}");

    // Idle again: back to zero. Then a burst of 10 at once with hold_max = 2.
    // The ten connections are open before any request is sent, so the requests arrive together.
    wait_zero(gw).await;
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(
            tokio::net::TcpStream::connect(gw.addr)
                .await
                .expect("connect"),
        );
    }
    let t = Instant::now();
    let burst = futures_util::future::join_all(
        conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| raw_get(s, 100 + i)),
    )
    .await;
    let burst_wait = t.elapsed();
    let ok = burst.iter().filter(|(code, _, _)| *code == 200).count();
    let refused: Vec<_> = burst.iter().filter(|(code, _, _)| *code == 503).collect();
    assert_eq!(ok + refused.len(), 10, "only 200 and 503: {burst:?}");
    assert!(ok >= 2, "the held requests are answered: {burst:?}");
    assert!(
        !refused.is_empty(),
        "past hold_max some are refused: {burst:?}"
    );
    for (_, retry_after, body) in &refused {
        assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
        assert!(body.contains("autoscale.hold_max"), "{body}");
    }
    let n = gw
        .wait_status(Duration::from_secs(30), "N >= 1 after the burst", |s| {
            s["up"].as_u64().is_some_and(|n| n >= 1)
        })
        .await;
    let a = &n["autoscale"];
    assert_eq!(a["held_now"], 0, "{a:#}");
    assert!(
        a["hold_refused_full"].as_u64().is_some_and(|r| r >= 1),
        "{a:#}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "ringgate_autoscale_hold_refused_total{reason=\"full\"}"
        ) >= 1.0
    );
    eprintln!(
        "wake-up ({kind} replica): first request answered after {first_wait:?}; burst of 10 \
         at hold_max 2: {ok} answered 200, {} refused 503, all within {burst_wait:?}",
        refused.len()
    );
}

/// A gateway that starts at zero (`replicas.count = 0`) and whose replica never gets ready
/// (its check asks a path it answers 404): held requests are refused after `hold_timeout`,
/// HTTP with 503 + `Retry-After`, gRPC with `UNAVAILABLE`, and no replica is blamed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_hold_timeout_a_request_gets_503_and_a_grpc_call_unavailable() {
    let conf = Conf {
        replicas: "count = 0\nmax_replicas = 4\n".into(),
        health: format!("{HEALTH}path = \"/never-ready\"\n"),
        ..Conf::default()
    };
    let toml = format!(
        "{}\n{}",
        conf.render(),
        AUTOSCALE.replace("hold_timeout = \"30s\"", "hold_timeout = \"1s\"")
    );
    let gw = GatewayProcess::start_toml(&toml);
    let status = wait_zero(&gw).await;
    assert_eq!(status["autoscale"]["hold_timeout_ms"], 1000);

    let (code, retry_after, body) = get_full(&client(), &gw.url("/home?id=1")).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
    assert!(body.contains("autoscale.hold_timeout"), "{body}");

    // A gRPC call (its head is enough to be one) held past the bound: UNAVAILABLE (14).
    let call = b"POST /ringgate.demo.Demo/Who HTTP/1.1\r\nHost: gw\r\ncontent-type: application/grpc\r\nTE: trailers\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let answer = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        s.write_all(call).await.expect("send");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_lowercase().contains("grpc-status: 14\r\n"),
        "{answer}"
    );
    assert!(answer.contains("hold_timeout"), "{answer}");

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ringgate_autoscale_hold_refused_total{reason=\"timeout\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(&metrics, "ringgate_autoscale_hold_wait_seconds_count"),
        2.0
    );
    let status = gw.status().await;
    assert_eq!(
        status["autoscale"]["hold_refused_timeout"], 2,
        "{:#}",
        status["autoscale"]
    );
    // No replica was blamed: nothing counts a failure against the one starting.
    for r in status["replicas"].as_array().into_iter().flatten() {
        assert_eq!(r["failures"].as_u64().unwrap_or(0), 0, "{r:#}");
    }
}

/// A gateway at zero whose replica never gets ready (its check asks a path it answers 404), so
/// requests stay held until `hold_timeout`; `proxy` and `hold` tune the caps under test.
fn never_ready(proxy: &str, hold_max: u32, hold_timeout: &str) -> String {
    let conf = Conf {
        replicas: "count = 0\nmax_replicas = 4\n".into(),
        health: format!("{HEALTH}path = \"/never-ready\"\n"),
        proxy: proxy.into(),
        ..Conf::default()
    };
    let autoscale = AUTOSCALE
        .replace("hold_max = 2", &format!("hold_max = {hold_max}"))
        .replace(
            "hold_timeout = \"30s\"",
            &format!("hold_timeout = \"{hold_timeout}\""),
        );
    format!("{}\n{autoscale}", conf.render())
}

/// Held requests are requests in flight: they take their places in `proxy.max_requests`
/// before they are held (a held request holds a client connection and will hold a replica
/// connection), so with `max_requests = 2` and two held, a third request is refused at once
/// over the budget, not held, and the gauge shows the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_count_in_max_requests() {
    let gw = GatewayProcess::start_toml(&never_ready("max_requests = 2\n", 10, "4s"));
    wait_zero(&gw).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        held.push(tokio::spawn(raw_get(s, i)));
    }
    gw.wait_status(Duration::from_secs(10), "two requests held", |s| {
        s["autoscale"]["held_now"] == 2
    })
    .await;
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_requests_in_flight"),
        2.0,
        "the held requests are in flight"
    );
    let s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let t = Instant::now();
    let (code, retry_after, body) = raw_get(s, 7).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
    assert!(body.contains("proxy.max_requests"), "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "refused at once, not held: {:?}",
        t.elapsed()
    );
    let status = gw.status().await;
    assert_eq!(status["autoscale"]["held_now"], 2, "not held: {status:#}");
    for h in held {
        let (code, _, body) = h.await.expect("held request");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("autoscale.hold_timeout"), "{body}");
    }
    // Their places came back with their answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.metrics().await;
        if metric(&metrics, "ringgate_requests_in_flight") == 0.0 {
            assert_eq!(
                metric(
                    &metrics,
                    "ringgate_requests_refused_total{reason=\"max_requests\"}"
                ),
                1.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "places not returned: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Over HTTP/2 a request past `hold_max` is refused the way any request over a budget is:
/// `REFUSED_STREAM`, which a client may retry at once (nothing of it was processed); the held
/// ones get their answer (here 503 after `hold_timeout`). HTTP/1 keeps 503 + `Retry-After`
/// (the burst above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_hold_max_an_http2_stream_is_refused() {
    let gw = GatewayProcess::start_toml(&never_ready("", 2, "2s"));
    wait_zero(&gw).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.expect("ready");
    let mut streams = Vec::new();
    for i in 0..6 {
        let req = http::Request::get(format!("http://{}/home?id={i}", gw.addr))
            .body(())
            .expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        streams.push(resp);
        send = send.ready().await.expect("ready");
    }
    let outcomes = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(streams),
    )
    .await
    .expect("every stream ends within 30 s");
    let mut answered = 0;
    let mut refused = 0;
    for outcome in &outcomes {
        match outcome {
            Ok(resp) => {
                assert_eq!(resp.status(), 503, "{resp:?}");
                answered += 1;
            }
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
            Err(e) => panic!("neither an answer nor REFUSED_STREAM: {e:?}"),
        }
    }
    assert_eq!(
        (answered, refused),
        (2, 4),
        "two held (answered after hold_timeout), four refused: {outcomes:?}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ringgate_autoscale_hold_refused_total{reason=\"full\"}"
        ),
        4.0
    );
}
