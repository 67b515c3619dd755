//! Hostile and careless clients against the real gateway binary (issue 10): idle connections
//! past the descriptor limit, silent and half-preface connections, idle HTTP/2, connection caps,
//! admin access from browsers, rebinding pages, foreign addresses and replicas, request
//! normalisation, client-side body errors, a request that kills its replica, the passive
//! ejection cap, and clients that stop taking their responses (HTTP/1's full socket, HTTP/2's
//! shut window). Each of these failed on the gateway before the hardening.

mod support;

use std::time::{Duration, Instant};

use support::backends::{Backend, Behaviour};
use support::*;

fn static_servers(backends: &[&Backend]) -> String {
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{{ name = \"b{}\", address = \"{}\" }}", i + 1, b.addr))
        .collect();
    format!("servers = [{}]\n", list.join(", "))
}

/// Waits until the peer closes `s` (a read returns 0 or fails); the time it took.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), s.read(&mut buf)).await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_descriptor_limit_cost_no_replica() {
    let gw = GatewayProcess::start_under(
        &Conf {
            replicas: "count = 2\nmax_replicas = 4\n".into(),
            health: "interval = \"300ms\"\ntimeout = \"200ms\"\nfall = 2\n".into(),
            proxy: "header_read_timeout = \"3s\"\n".into(),
            ..Conf::default()
        },
        &["prlimit", "--nofile=128:128", "--"],
    );
    gw.wait_status(Duration::from_secs(20), "two up", |s| s["up"] == 2)
        .await;
    // An established keep-alive client, before the flood.
    let mut established = OneConnection::open(gw.addr).await;
    assert_eq!(established.get("/home?id=1").await.0, 200);

    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = tokio::net::TcpStream::connect(gw.addr).await {
            idle.push(s);
        }
    }
    let until = Instant::now() + Duration::from_secs(4);
    let mut served = 0;
    while Instant::now() < until {
        let (code, body) = established.get(&format!("/home?id={served}")).await;
        assert_eq!(code, 200, "request {served} during the flood: {body}");
        served += 1;
    }
    let (_, status) = established.get("/lb/status").await;
    let status = json(&status)["message"].clone();
    for r in status["replicas"].as_array().into_iter().flatten() {
        assert_eq!(r["restarts"], 0, "a healthy replica was replaced: {r}");
        assert_eq!(r["state"], "up", "{r}");
        assert!(!r.to_string().contains("Too many open files"), "{r}");
    }
    let (_, metrics) = established.get("/lb/metrics").await;
    assert!(
        metric(
            &metrics,
            "ringgate_connections_refused_total{reason=\"max_connections\"}"
        ) > 0.0,
        "{metrics}"
    );
    drop(idle);
    // Once the flood is gone, new clients are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = raw(
            gw.addr,
            b"GET /home?id=7 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a new client was never served again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{served} requests served during a flood of 300 idle connections under nofile=128");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_preface_connections_are_closed_by_the_first_bytes_deadline() {
    use tokio::io::AsyncWriteExt;
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "header_read_timeout = \"1s\"\n".into(),
        ..Conf::default()
    });
    let mut silent = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut half = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    half.write_all(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..23])
        .await
        .expect("send");
    let mut slow_headers = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    slow_headers
        .write_all(b"GET /home HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    for (what, s) in [
        ("silent", &mut silent),
        ("23 bytes of the h2 preface", &mut half),
        ("headers never finished", &mut slow_headers),
    ] {
        let took = closed_within(s, Duration::from_secs(10)).await;
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(5)),
            "{what}: {took:?}"
        );
    }
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "ringgate_connections_timed_out_total{phase=\"first_bytes\"}"
        ) >= 2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_streams_is_closed_after_the_idle_timeout() {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "idle_timeout = \"1s\"\n".into(),
        ..Conf::default()
    });
    let (mut send, conn) = support::h2c(gw.addr).await;
    let started = Instant::now();
    let req = http::Request::builder()
        .uri(gw.url("/home?id=1"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);
    drop(resp);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was never closed");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "ringgate_connections_timed_out_total{phase=\"idle\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_close_new_connections_and_spare_established_ones() {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "max_connections = 4\nmax_connections_per_ip = 2\n".into(),
        ..Conf::default()
    });
    let home = b"GET /home?id=1 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    async fn keep(addr: std::net::SocketAddr, from: &str) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind((from.parse::<std::net::IpAddr>().expect("ip"), 0).into())
            .expect("bind");
        socket.connect(addr).await.expect("connect")
    }
    async fn ask(s: &mut tokio::net::TcpStream, req: &[u8]) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if s.write_all(req).await.is_err() {
            return false;
        }
        let mut buf = [0u8; 512];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
            Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200")
        )
    }
    let mut a1 = keep(gw.addr, "127.0.0.1").await;
    let mut a2 = keep(gw.addr, "127.0.0.1").await;
    assert!(ask(&mut a1, home).await && ask(&mut a2, home).await);
    // A third from 127.0.0.1 is over the per-address cap.
    let mut a3 = keep(gw.addr, "127.0.0.1").await;
    assert!(
        !ask(&mut a3, home).await,
        "a third connection from one address"
    );
    let mut b1 = keep(gw.addr, "127.0.0.2").await;
    let mut b2 = keep(gw.addr, "127.0.0.3").await;
    assert!(ask(&mut b1, home).await && ask(&mut b2, home).await);
    // Four are open: a fifth from a fresh address is over the global cap.
    let mut c1 = keep(gw.addr, "127.0.0.4").await;
    assert!(!ask(&mut c1, home).await, "a fifth connection");
    // The established ones were never touched.
    for s in [&mut a1, &mut a2, &mut b1, &mut b2] {
        assert!(ask(s, home).await);
    }
    let metrics_req = b"GET /lb/metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    a1.write_all(metrics_req).await.expect("send");
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("ringgate_upstream_latency_seconds_count") {
        let n = tokio::time::timeout(Duration::from_secs(5), a1.read(&mut buf))
            .await
            .expect("metrics in time")
            .expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
    }
    let metrics = String::from_utf8_lossy(&got).into_owned();
    assert!(
        metric(
            &metrics,
            "ringgate_connections_refused_total{reason=\"per_ip\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &metrics,
            "ringgate_connections_refused_total{reason=\"max_connections\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_loopback_only_and_refuses_browsers_rebinding_and_replicas() {
    let echo = Backend::start("127.0.0.3", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: static_servers(&[&echo]),
        admin: "allow = [\"127.0.0.1/32\", \"127.0.0.3/32\"]\n".into(),
        ..Conf::default()
    });
    let addr = gw.addr;
    let get_status = |host: &str| {
        format!("GET /lb/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let local = format!("localhost:{}", addr.port());
    assert_eq!(raw(addr, get_status(&local).as_bytes()).await.0, 200);
    // Outside admin.allow: the guarded endpoints refuse, /rep and /lb/health stay open.
    for path in ["/lb/status", "/lb/metrics"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {local}\r\nConnection: close\r\n\r\n");
        let (code, body) = raw_from("127.0.0.2", addr, req.as_bytes()).await;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("admin.allow"), "{body}");
    }
    for path in ["/rep", "/lb/health"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {local}\r\nConnection: close\r\n\r\n");
        assert_eq!(
            raw_from("127.0.0.2", addr, req.as_bytes()).await.0,
            200,
            "{path}"
        );
    }
    // A replica's own address is never admin, even inside admin.allow.
    let (code, body) = raw_from("127.0.0.3", addr, get_status(&local).as_bytes()).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("replica"), "{body}");
    // DNS rebinding: a Host that is not this gateway.
    let (code, body) = raw(addr, get_status("evil.example:5000").as_bytes()).await;
    assert_eq!(code, 403, "{body}");
    // A cross-site form post (text/plain needs no preflight) and a fetch from another site.
    let rm = |extra: &str| {
        format!(
            "DELETE /rm HTTP/1.1\r\nHost: {local}\r\nContent-Type: text/plain\r\n{extra}Content-Length: 8\r\nConnection: close\r\n\r\n{{\"n\": 1}}"
        )
    };
    let (code, body) = raw(addr, rm("Origin: https://evil.example\r\n").as_bytes()).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = raw(addr, rm("Sec-Fetch-Site: cross-site\r\n").as_bytes()).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        gw.replica_names().await,
        vec!["b1".to_string()],
        "nothing was removed"
    );
    // curl -d as the README shows it: no Origin, curl's form content type.
    let (code, body) = raw(
        addr,
        format!("GET /lb/metrics HTTP/1.1\r\nHost: {local}\r\nUser-Agent: curl/8\r\nContent-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_compared_exactly() {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        admin: "token = \"s3cret\"\n".into(),
        ..Conf::default()
    });
    let status = |auth: &str| {
        format!("GET /lb/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n")
    };
    assert_eq!(
        raw(gw.addr, status("Bearer s3cret").as_bytes()).await.0,
        200
    );
    for wrong in ["Bearer  s3cret", "Bearer s3cre", "Bearer s3cretX", "s3cret"] {
        assert_eq!(
            raw(gw.addr, status(wrong).as_bytes()).await.0,
            401,
            "{wrong:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_normalised_before_they_reach_a_replica() {
    let echo = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: static_servers(&[&echo]),
        ..Conf::default()
    });
    let (code, body) = raw(
        gw.addr,
        b"GET /x?id=1 HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 400, "two Host headers: {body}");
    let (code, body) = raw(
        gw.addr,
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 405, "{body}");
    assert_eq!(echo.hits(), 0, "neither reached the replica");
    let (code, body) = raw(
        gw.addr,
        b"GET /x?id=1 HTTP/1.1\r\nHost: example.test\r\nConnection: host, close\r\nProxy: http://evil.example:8080\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\n\r\n",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("host: example.test"),
        "Connection cannot strip Host: {body}"
    );
    for forbidden in ["proxy:", "forwarded:", "x-real-ip:"] {
        assert!(
            !body.contains(forbidden),
            "{forbidden} reached the replica: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_the_clients_fault_not_the_replicas() {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(20), "one up", |s| s["up"] == 1)
        .await;
    let (code, body) = raw(
        gw.addr,
        b"POST /home?id=1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nzz\r\nnot a chunk\r\n",
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let status = gw.status().await;
    assert_eq!(status["replicas"][0]["failures"], 0, "{status}");
    assert_eq!(status["replicas"][0]["state"], "up");
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "ringgate_client_body_errors_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_resets_its_replica_is_tried_once_unless_resets_are_retried() {
    let killers = [
        Backend::start("127.0.0.1", Behaviour::Reset).await,
        Backend::start("127.0.0.1", Behaviour::Reset).await,
        Backend::start("127.0.0.1", Behaviour::Reset).await,
    ];
    let hits = |k: &[Backend; 3]| k.iter().map(Backend::hits).sum::<usize>();
    let servers = static_servers(&[&killers[0], &killers[1], &killers[2]]);
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: servers.clone(),
        proxy: "retries = 10\n".into(),
        ..Conf::default()
    });
    let (code, _) = get(&gw.url("/boom?id=1")).await;
    assert_eq!(code, 502);
    assert_eq!(hits(&killers), 1, "the query of death reached one replica");
    drop(gw);

    // Asked for: resets of idempotent requests are retried on every distinct server.
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: servers.clone(),
        proxy: "retries = 10\nretry_on = [\"connect-failure\", \"reset\"]\n".into(),
        ..Conf::default()
    });
    let before = hits(&killers);
    let (code, _) = get(&gw.url("/boom?id=1")).await;
    assert_eq!(code, 502);
    assert_eq!(hits(&killers) - before, 3, "tried on each of the three");
    drop(gw);

    // With no retry budget, not even that.
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: servers,
        proxy: "retries = 10\nretry_on = [\"connect-failure\", \"reset\"]\nretry_budget_min = 0\nretry_budget_percent = 0\n".into(),
        ..Conf::default()
    });
    let before = hits(&killers);
    let (code, _) = get(&gw.url("/boom?id=1")).await;
    assert_eq!(code, 502);
    assert_eq!(hits(&killers) - before, 1, "the budget is spent");
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "ringgate_retries_over_budget_total"), 1.0);
}

/// Three echo replicas behind a gateway (static provider) whose active checks are slow to
/// confirm anything, so what follows a death is the request path's doing; `proxy` is the
/// gateway's `[proxy]` section. Returns once all three are up.
async fn three_replicas_checked_slowly(proxy: &str) -> ([Backend; 3], GatewayProcess) {
    let backends = [
        Backend::start("127.0.0.1", Behaviour::Echo).await,
        Backend::start("127.0.0.1", Behaviour::Echo).await,
        Backend::start("127.0.0.1", Behaviour::Echo).await,
    ];
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: static_servers(&[&backends[0], &backends[1], &backends[2]]),
        health: "interval = \"60s\"\nfall = 10\n".into(),
        proxy: proxy.into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(20), "three up", |s| s["up"] == 3)
        .await;
    (backends, gw)
}

/// GETs `/x?id=0` to `/x?id={n-1}` one after the other; each must be answered 200.
async fn every_id_answers(gw: &GatewayProcess, n: usize) {
    let c = client();
    for id in 0..n {
        let (code, body) = call_with(&c, "GET", &gw.url(&format!("/x?id={id}")), "", &[]).await;
        assert_eq!(code, 200, "id {id}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_never_takes_more_than_its_share_of_the_ring() {
    let ([b1, b2, _b3], gw) = three_replicas_checked_slowly("").await;
    // Two of three die; the static provider does not notice, failed connects do.
    drop((b1, b2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    every_id_answers(&gw, 300).await;
    let status = gw.status().await;
    let in_ring = |name: &str| replica(&status, name)["in_ring"] == true;
    assert!(in_ring("b3"));
    assert!(
        in_ring("b1") != in_ring("b2"),
        "exactly one of the two dead replicas was ejected (50% of 3 rounds down to 1): {status:#}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, "ringgate_ejections_capped_total") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_refused_connections_are_retried_even_with_the_budget_spent() {
    // No budget at all: only a retry that needs none is made.
    let ([b1, _b2, _b3], gw) =
        three_replicas_checked_slowly("retry_budget_min = 0\nretry_budget_percent = 0\n").await;
    // Its address now refuses connections; the gateway learns it from the first one.
    drop(b1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    every_id_answers(&gw, 300).await;
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, "ringgate_retries_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "ringgate_retries_over_budget_total"),
        0.0,
        "{metrics}"
    );
}

/// A gateway over `backend` alone (static provider, server `b1`) with `proxy` in `[proxy]`.
fn gateway_over(backend: &Backend, proxy: &str) -> GatewayProcess {
    GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: static_servers(&[backend]),
        proxy: proxy.into(),
        ..Conf::default()
    })
}

fn send_timeouts(metrics: &str) -> f64 {
    metric(
        metrics,
        "ringgate_connections_timed_out_total{phase=\"send\"}",
    )
}

/// Waits until the gateway has closed `want` connections for `proxy.send_timeout`.
async fn wait_send_timeouts(gw: &GatewayProcess, want: f64, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        let seen = send_timeouts(&gw.metrics().await);
        if seen >= want {
            return;
        }
        assert!(
            Instant::now() < until,
            "{seen} send timeouts after {limit:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads `s` to its end (the peer closed it); the bytes read. Panics if it stays open.
async fn read_to_close(s: &mut tokio::net::TcpStream, limit: Duration) -> usize {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Err(_) => panic!("the connection stayed open after {got} bytes"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got += n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_after_the_send_timeout_and_a_slow_one_is_served() {
    let sized = Backend::start("127.0.0.1", Behaviour::Sized).await;
    slow_and_stopped_readers(gateway_over(&sized, "send_timeout = \"2s\"\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_h2c_a_client_that_stops_reading_is_closed_and_a_slow_one_is_served() {
    let sized = Backend::start_h2("127.0.0.1", Behaviour::Sized).await;
    let proxy = "send_timeout = \"2s\"\nupstream_protocol = \"h2c\"\n";
    slow_and_stopped_readers(gateway_over(&sized, proxy)).await;
}

/// A client that reads the first bytes of a large response and stops is closed after
/// `proxy.send_timeout` (2 s), one that reads slowly but keeps reading gets all of its answer.
/// The limit is well above the slow reader's pauses (300 ms): a loaded machine (the other
/// tests of this binary run beside it) may stall the reader for longer than the pause itself.
async fn slow_and_stopped_readers(gw: GatewayProcess) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BIG: usize = 64 << 20;
    // 64 MiB is more than every socket buffer between the replica and the client holds, so
    // the gateway's writes have to wait for a client that reads the first bytes and stops.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stopped = socket.connect(gw.addr).await.expect("connect");
    let get = format!("GET /big?id=1&bytes={BIG} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stopped.write_all(get.as_bytes()).await.expect("send");
    let mut first = [0u8; 512];
    let n = stopped.read(&mut first).await.expect("first bytes");
    let head = String::from_utf8_lossy(&first[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    wait_send_timeouts(&gw, 1.0, Duration::from_secs(20)).await;
    let rest = read_to_close(&mut stopped, Duration::from_secs(10)).await;
    assert!(
        n + rest < BIG,
        "the stopped client was sent the whole body ({} bytes)",
        n + rest
    );

    // A client that reads slowly but keeps reading (pauses of 300 ms, under the 2 s limit,
    // every 256 KiB) gets all of a 4 MiB response.
    const SLOW: usize = 4 << 20;
    let mut slow = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let get = format!(
        "GET /big?id=1&bytes={SLOW} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    slow.write_all(get.as_bytes()).await.expect("send");
    let mut buf = vec![0u8; 64 * 1024];
    let (mut got, mut paused_at) = (0usize, 0usize);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .expect("the slow reader got no bytes for 10 s")
            .expect("read");
        if n == 0 {
            break;
        }
        got += n;
        if got - paused_at >= 256 * 1024 {
            paused_at = got;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert!(
        got > SLOW,
        "the slow reader got {got} bytes of a {SLOW}-byte body and its head"
    );
    let metrics = gw.metrics().await;
    assert_eq!(send_timeouts(&metrics), 1.0, "the slow reader was cut off");
    assert_eq!(get_ok(&gw, "/after?id=2&bytes=10").await, 10);
}

async fn get_ok(gw: &GatewayProcess, path: &str) -> usize {
    let (code, body) = get(&gw.url(path)).await;
    assert_eq!(code, 200, "{path}: {body}");
    body.len()
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_keeps_its_window_shut_is_closed_after_the_send_timeout() {
    use tokio::io::AsyncWriteExt;
    let sized = Backend::start("127.0.0.1", Behaviour::Sized).await;
    let gw = gateway_over(&sized, "send_timeout = \"1s\"\n");
    // A client that speaks HTTP/2 and reads what it is sent, but whose window for a stream's
    // data is 0 and never opened: the response's head goes out, its body never can.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0
    out.extend(h2_frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]));
    let path = b"/h2?id=1&bytes=1000";
    let authority = b"localhost";
    // :method GET, :scheme http (static table 2, 6), then :path (4) and :authority (1) as
    // literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority);
    // HEADERS, END_STREAM | END_HEADERS, stream 1
    out.extend(h2_frame(0x1, 0x5, 1, &block));
    s.write_all(&out).await.expect("send");
    let started = Instant::now();
    let got = read_to_close(&mut s, Duration::from_secs(15)).await;
    assert!(
        got > 0,
        "the gateway sent nothing (no SETTINGS, no response head)"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the send timeout: {:?}",
        started.elapsed()
    );
    wait_send_timeouts(&gw, 1.0, Duration::from_secs(5)).await;
    assert_eq!(sized.hits(), 1);
    assert_eq!(get_ok(&gw, "/after?id=2&bytes=10").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_the_replica_stops_sending_is_cut_after_the_read_timeout() {
    let stalls = Backend::start("127.0.0.1", Behaviour::Stalls).await;
    stalled_body_is_cut(gateway_over(&stalls, "read_timeout = \"1s\"\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_h2c_a_response_body_the_replica_stops_sending_is_cut_after_the_read_timeout() {
    let stalls = Backend::start_h2("127.0.0.1", Behaviour::Stalls).await;
    let proxy = "read_timeout = \"1s\"\nupstream_protocol = \"h2c\"\n";
    stalled_body_is_cut(gateway_over(&stalls, proxy)).await;
}

/// A response body its replica stops sending is cut after `proxy.read_timeout` (1 s), counted
/// as the replica's body timeout.
async fn stalled_body_is_cut(gw: GatewayProcess) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /stuck?id=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("send");
    let started = Instant::now();
    let got = read_to_close(&mut s, Duration::from_secs(15)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut before the read timeout: {:?}",
        started.elapsed()
    );
    // The head and the 3 bytes the replica sent, then the close: the client can tell the body
    // is short of its Content-Length.
    assert!(got > 3, "{got} bytes");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ringgate_upstream_body_timeouts_total{replica=\"b1\"}"
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_gets_408_and_its_replica_is_not_blamed() {
    // A replica slower than the request timeout: only a request that reached it whole can time
    // out on it.
    let slow = Backend::start("127.0.0.1", Behaviour::Answer { delay_ms: 3000 }).await;
    stalled_client_body(gateway_over(&slow, "request_timeout = \"1s\"\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_h2c_a_client_that_stops_sending_its_body_gets_408_and_its_replica_is_not_blamed() {
    let slow = Backend::start_h2("127.0.0.1", Behaviour::Answer { delay_ms: 3000 }).await;
    let proxy = "request_timeout = \"1s\"\nupstream_protocol = \"h2c\"\n";
    stalled_client_body(gateway_over(&slow, proxy)).await;
}

/// A client that sends part of its body and stops gets 408 after `proxy.request_timeout` (1 s)
/// and the replica is not blamed; a whole body whose answer is late is the replica's 504.
async fn stalled_client_body(gw: GatewayProcess) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    // 10 of the 100 bytes it announces, then nothing.
    s.write_all(
        b"POST /upload?id=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .expect("send");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(15), async {
        use tokio::io::AsyncReadExt;
        s.read(&mut answer).await
    })
    .await
    .expect("answered within the request timeout")
    .expect("read");
    let head = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("proxy.request_timeout"), "{head}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_upstream_failures_total{replica=\"b1\"}"),
        0.0,
        "the replica was blamed for the client's body: {metrics}"
    );
    assert_eq!(metric(&metrics, "ringgate_client_body_errors_total"), 1.0);
    // The control: the whole body sent, the replica's answer late: that is the replica's, 504.
    let (code, body) = call("POST", &gw.url("/upload?id=2"), "all of it").await;
    assert_eq!(code, 504, "{body}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_upstream_failures_total{replica=\"b1\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_a_body_unread_is_answered_through_not_taken_for_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let refuses = Backend::start("127.0.0.1", Behaviour::RefusesBody).await;
    let gw = gateway_over(&refuses, "max_body = \"64MiB\"\n");
    // 32 MiB: more than the sockets between the gateway and the replica hold, so the gateway
    // is still sending it when the replica's kernel resets the connection.
    const BODY: usize = 32 << 20;
    let s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let head =
        format!("POST /upload?id=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: {BODY}\r\n\r\n");
    wr.write_all(head.as_bytes()).await.expect("send");
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..BODY / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"too large") {
        let n = tokio::time::timeout(Duration::from_secs(15), rd.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(
            n > 0,
            "closed without an answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    writer.abort();
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.contains("content-length: 9\r\n"),
        "the replica's own answer: {head}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_upstream_failures_total{replica=\"b1\"}"),
        0.0,
        "{metrics}"
    );
}
