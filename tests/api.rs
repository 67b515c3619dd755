//! The replica API and the proxy over real sockets, with real `ringgate-server` processes.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn three() -> Conf {
    Conf {
        replicas: "count = 3\nmax_replicas = 8\n".into(),
        ..Conf::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rep_add_rm_happy_path_and_home() {
    let gw = GatewayProcess::start(&three());
    let (code, body) = get(&gw.url("/rep")).await;
    assert_eq!(code, 200);
    assert_eq!(
        json(&body),
        serde_json::json!({"message": {"N": 3, "replicas": ["server-1", "server-2", "server-3"]}, "status": "successful"})
    );

    let (code, body) = get(&gw.url("/home")).await;
    assert_eq!(code, 200, "{body}");
    let who = server_of(&body).expect("a /home answer");
    assert!(
        ["server-1", "server-2", "server-3"].contains(&who.as_str()),
        "{who}"
    );

    let (code, body) = call(
        "POST",
        &gw.url("/add"),
        r#"{"n": 2, "hostnames": ["S5", "S6"]}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["N"], 5);
    assert_eq!(
        json(&body)["message"]["replicas"],
        serde_json::json!(["server-1", "server-2", "server-3", "S5", "S6"])
    );
    // The seed's shape beside today's: what this call added.
    assert_eq!(
        json(&body)["message"]["added"],
        serde_json::json!(["S5", "S6"])
    );
    // The new replicas serve: some id lands on each of them.
    let mut seen = std::collections::HashSet::new();
    for id in 0..400 {
        let (code, body) = get(&gw.url(&format!("/home?id={id}"))).await;
        assert_eq!(code, 200, "{body}");
        seen.insert(server_of(&body).expect("answer"));
    }
    assert!(
        seen.contains("S5") && seen.contains("S6"),
        "new replicas never answered: {seen:?}"
    );

    // Generated names fill in when hostnames is shorter than n.
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 2, "hostnames": ["S7"]}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["N"], 7);
    let names = gw.replica_names().await;
    assert!(
        names.contains(&"S7".to_string())
            && names.iter().any(|n| n.starts_with("server-")
                && !["server-1", "server-2", "server-3"].contains(&n.as_str())),
        "{names:?}"
    );

    let (code, body) = call("DELETE", &gw.url("/rm"), r#"{"n": 1, "hostnames": ["S5"]}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["N"], 6);
    assert_eq!(json(&body)["message"]["removed"], serde_json::json!(["S5"]));
    assert!(!gw.replica_names().await.contains(&"S5".to_string()));

    // The gateway picks the rest: the most recently added go first.
    let (code, body) = call("DELETE", &gw.url("/rm"), r#"{"n": 3, "hostnames": ["S6"]}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        gw.replica_names().await,
        vec!["server-1", "server-2", "server-3"]
    );
    assert_eq!(
        gw.replica_pids().await.len(),
        3,
        "removed replicas' processes are gone from status"
    );
}

/// Every error rule of the contract: status, message, and nothing changed afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_rule_answers_and_changes_nothing() {
    let gw = GatewayProcess::start(&three());
    let before = gw.replica_names().await;
    let pids_before = gw.replica_pids().await;
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/add", "not json", 400, "not valid JSON"),
        ("POST", "/add", "", 400, "not valid JSON"),
        ("POST", "/add", "[1, 2]", 400, "must be a JSON object"),
        ("POST", "/add", "\"n\"", 400, "must be a JSON object"),
        ("POST", "/add", "{}", 400, "Field 'n' is missing"),
        ("POST", "/add", r#"{"n": "2"}"#, 400, "positive integer"),
        ("POST", "/add", r#"{"n": 0}"#, 400, "positive integer"),
        ("POST", "/add", r#"{"n": -3}"#, 400, "positive integer"),
        ("POST", "/add", r#"{"n": 1.5}"#, 400, "positive integer"),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": "S5"}"#,
            400,
            "list of strings",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["S5", 7]}"#,
            400,
            "list of strings",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["S5", "S6"]}"#,
            400,
            "Length of hostname list is more than newly added instances",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["bad name"]}"#,
            400,
            "not a valid container name",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["-x"]}"#,
            400,
            "not a valid container name",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 2, "hostnames": ["S7", "S7"]}"#,
            400,
            "appears more than once",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["server-2"]}"#,
            400,
            "already in use",
        ),
        ("POST", "/add", r#"{"n": 6}"#, 400, "max_replicas"),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostname": ["S5"]}"#,
            400,
            "Unknown field 'hostname'",
        ),
        ("DELETE", "/rm", "{", 400, "not valid JSON"),
        (
            "DELETE",
            "/rm",
            r#"{"n": 1, "hostnames": ["server-1", "server-2"]}"#,
            400,
            "Length of hostname list is more than removable instances",
        ),
        (
            "DELETE",
            "/rm",
            r#"{"n": 1, "hostnames": ["S9"]}"#,
            400,
            "Hostname 'S9' does not exist",
        ),
        (
            "DELETE",
            "/rm",
            r#"{"n": 2, "hostnames": ["server-1", "server-1"]}"#,
            400,
            "appears more than once",
        ),
        ("DELETE", "/rm", r#"{"n": 4}"#, 400, "only 3 exist"),
        ("DELETE", "/rm", r#"{"n": 0}"#, 400, "positive integer"),
        ("GET", "/add", "", 405, "not allowed"),
        ("DELETE", "/add", "", 405, "not allowed"),
        ("POST", "/rm", r#"{"n": 1}"#, 405, "not allowed"),
        ("POST", "/rep", "", 405, "not allowed"),
        ("GET", "/lb/nothing", "", 404, "not a gateway endpoint"),
    ];
    for (method, path, body, status, needle) in cases {
        let (code, text) = call(method, &gw.url(path), body).await;
        let v = json(&text);
        assert_eq!(code, *status, "{method} {path} {body}: {text}");
        assert_eq!(v["status"], "failure", "{method} {path} {body}: {text}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with("<Error> "), "{method} {path} {body}: {msg}");
        assert!(
            msg.contains(needle),
            "{method} {path} {body}: expected {needle:?} in {msg:?}"
        );
        assert_eq!(
            gw.replica_names().await,
            before,
            "{method} {path} {body} changed the replicas"
        );
    }
    assert_eq!(
        gw.replica_pids().await,
        pids_before,
        "no replica was started or stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_goes_to_the_same_server_and_backend_errors_pass_through() {
    let gw = GatewayProcess::start(&three());
    for id in [0u64, 1, 42, 123_456, 999_999, u64::MAX] {
        let (_, first) = get(&gw.url(&format!("/home?id={id}"))).await;
        let first = server_of(&first).expect("answer");
        for _ in 0..3 {
            let (_, again) = get(&gw.url(&format!("/home?id={id}"))).await;
            assert_eq!(
                server_of(&again).as_deref(),
                Some(first.as_str()),
                "id {id}"
            );
        }
    }
    // A backend 404 comes back as it is.
    let (code, body) = get(&gw.url("/does-not-exist?id=5")).await;
    assert_eq!(code, 404);
    assert!(body.contains("is not served here"), "{body}");
    // HEAD /heartbeat through the gateway.
    let (code, body) = call("HEAD", &gw.url("/heartbeat?id=5"), "").await;
    assert_eq!((code, body.as_str()), (200, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_hop_by_hop() {
    // A replica that echoes what it received, behind the static provider.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_addr = listener.local_addr().expect("addr");
    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).to_lowercase();
                let status = if head.starts_with("get /heartbeat") {
                    ""
                } else {
                    &head
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\nx-hop: 1\r\n\r\n{}",
                    status.len(),
                    status
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!("servers = [{{ name = \"echo\", address = \"{echo_addr}\" }}]\n"),
        ..Conf::default()
    });
    let (code, body) = call_with(
        &client(),
        "GET",
        &gw.url("/x?id=1"),
        "",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("host", "example.test"),
        ],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto: http"), "{body}");
    assert!(body.contains("x-forwarded-host: example.test"), "{body}");
    assert!(
        !body.contains("x-hop"),
        "hop-by-hop header forwarded: {body}"
    );
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_does_not_hurt() {
    let gw = GatewayProcess::start(&three());
    for garbage in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /home?id=1 HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        &[0xffu8; 70_000][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let _ = s.write_all(garbage).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4"),
            "unexpected answer to garbage: {text}"
        );
    }
    // A client that connects and says nothing is cut off by header_read_timeout, and the
    // gateway still serves.
    let (code, body) = get(&gw.url("/home?id=7")).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_through_and_max_body_is_enforced() {
    let gw = GatewayProcess::start(&three());
    // 10 MB (under the default 10 MiB limit) streams to the replica; it answers 404 to POST /home.
    let big = "x".repeat(10_000_000);
    let (code, body) = call("POST", &gw.url("/home?id=3"), &big).await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("POST /home is not served here"), "{body}");
    drop(gw);

    // A replica that reads whole bodies before answering, so the limit is what stops the upload.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let backend = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if !buf[..n].starts_with(b"GET /heartbeat") {
                    while let Ok(Ok(k)) =
                        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                    {
                        if k == 0 {
                            break;
                        }
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!("servers = [{{ name = \"reader\", address = \"{addr}\" }}]\n"),
        proxy: "max_body = \"1MiB\"\n".into(),
        ..Conf::default()
    });
    let (code, body) = call("POST", &gw.url("/home?id=3"), &big).await;
    assert_eq!(code, 413, "{body}");
    assert!(
        json(&body)["message"]
            .as_str()
            .unwrap_or("")
            .contains("proxy.max_body"),
        "{body}"
    );
    // Chunked (no Content-Length) bodies are cut off at the limit too.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let chunk = "y".repeat(64 * 1024);
    let mut req =
        String::from("POST /home?id=3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..40 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut out))
        .await
        .expect("answer")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // A body under the limit gets through.
    let (code, body) = call("POST", &gw.url("/home?id=3"), "small").await;
    assert_eq!(code, 200, "{body}");
    backend.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_guarded() {
    let gw = GatewayProcess::start(&Conf {
        admin: "allow = [\"10.0.0.0/8\"]\n".into(),
        ..three()
    });
    let (code, body) = call("POST", &gw.url("/add"), r#"{"n": 1}"#).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin.allow"), "{body}");
    let (code, _) = get(&gw.url("/rep")).await;
    assert_eq!(code, 200, "reading the list stays open");
    drop(gw);

    let gw = GatewayProcess::start(&Conf {
        admin: "token = \"s3cret\"\n".into(),
        ..three()
    });
    let c = client();
    let (code, body) = call_with(&c, "POST", &gw.url("/add"), r#"{"n": 1}"#, &[]).await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = call_with(
        &c,
        "POST",
        &gw.url("/add"),
        r#"{"n": 1}"#,
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(code, 401);
    assert_eq!(gw.replica_names().await.len(), 3);
    let (code, body) = call_with(
        &c,
        "POST",
        &gw.url("/add"),
        r#"{"n": 1}"#,
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["N"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_is_503_and_lb_endpoints_answer() {
    let gw = GatewayProcess::start(&three());
    let (code, body) = get(&gw.url("/lb/health")).await;
    assert_eq!(
        (code, json(&body)["status"].as_str()),
        (200, Some("successful"))
    );
    let status = gw.status().await;
    assert_eq!(status["ring"]["slots"], 512);
    assert_eq!(status["ring"]["vnodes"], 9);
    assert_eq!(status["provider"], "process");
    let replicas = status["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 3);
    for r in replicas {
        assert_eq!(r["state"], "up");
        assert!(r["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")));
        assert_eq!(r["slots"].as_array().map(Vec::len), Some(9));
    }
    get(&gw.url("/home?id=1")).await;
    let status = gw.status().await;
    let served: u64 = status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(|r| r["requests"].as_u64())
        .sum();
    assert_eq!(served, 1);
    let (code, metrics) = get(&gw.url("/lb/metrics")).await;
    assert_eq!(code, 200);
    assert!(metrics.contains("ringgate_replicas_up 3"), "{metrics}");
    assert!(metrics.contains("class=\"2xx\"} 1"), "{metrics}");

    let (code, body) = call("DELETE", &gw.url("/rm"), r#"{"n": 3}"#).await;
    assert_eq!(code, 200, "{body}");
    // Today's `N` and `replicas`, and the seed's `removed` beside them (issue 27).
    let message = json(&body)["message"].clone();
    assert_eq!(
        (&message["N"], &message["replicas"]),
        (&serde_json::json!(0), &serde_json::json!([]))
    );
    let mut removed: Vec<String> = serde_json::from_value(message["removed"].clone())
        .unwrap_or_else(|e| panic!("`removed` is a list of names: {e}: {message}"));
    removed.sort();
    assert_eq!(removed, ["server-1", "server-2", "server-3"]);
    let (code, body) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(json(&body)["status"], "failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeouts_and_unreachable_replicas() {
    // A replica that accepts and never answers: 504 after proxy.request_timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!("servers = [{{ name = \"silent\", address = \"{silent_addr}\" }}]\n"),
        proxy: "request_timeout = \"300ms\"\n".into(),
        health: "interval = \"1h\"\ntimeout = \"1h\"\n".into(),
        ..Conf::default()
    });
    // The silent replica never passes a check; it is never routable, so clients get 503 quickly.
    let (code, body) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 503, "{body}");
    hold.abort();
    drop(gw);

    // A replica that answers its checks but hangs on /home: 504.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET /heartbeat") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                } else {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!("servers = [{{ name = \"slow\", address = \"{addr}\" }}]\n"),
        proxy: "request_timeout = \"300ms\"\n".into(),
        ..Conf::default()
    });
    let (code, body) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("proxy.request_timeout"), "{body}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_rm_race_with_live_traffic_without_a_failed_request() {
    let gw = GatewayProcess::start(&three());
    let url = gw.url("");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (url, stop) = (url.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 20_000 {
                i += 8;
                let (code, body) =
                    call_with(&c, "GET", &format!("{url}/home?id={}", i % 1000), "", &[]).await;
                if code == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("{code} {body}"));
                }
            }
            (ok, failed)
        }));
    }
    for round in 0..3 {
        let names = format!(r#"{{"n": 2, "hostnames": ["R{round}a", "R{round}b"]}}"#);
        let (code, body) = call("POST", &gw.url("/add"), &names).await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Remove one new replica and one that has been serving (from before this round).
        let old = if round == 0 {
            "server-3".to_string()
        } else {
            format!("R{}b", round - 1)
        };
        let (code, body) = call(
            "DELETE",
            &gw.url("/rm"),
            &format!(r#"{{"n": 2, "hostnames": ["R{round}a", "{old}"]}}"#),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.expect("worker");
        assert!(
            failed.is_empty(),
            "failed requests during /add and /rm: {failed:?}\nlog:\n{}",
            gw.log()
        );
        total += ok;
    }
    assert!(total > 100, "too little traffic to mean anything: {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_replica_process_even_after_sigkill() {
    for sig in ["TERM", "INT", "KILL"] {
        let mut gw = GatewayProcess::start(&three());
        let pids = gw.replica_pids().await;
        assert_eq!(pids.len(), 3);
        assert!(pids.iter().all(|&p| process_alive(p)));
        gw.signal(sig);
        assert!(
            gw.wait_exit(Duration::from_secs(20)),
            "gateway did not exit on SIG{sig}"
        );
        let left = wait_dead(&pids, Duration::from_secs(10));
        assert!(
            left.is_empty(),
            "replica processes left after SIG{sig}: {left:?}"
        );
    }
}
