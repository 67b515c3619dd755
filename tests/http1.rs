//! The client leg's HTTP/1.1, on the wire, against the real gateway binary and real replicas:
//! pipelined requests answered in order, HTTP/1.0 clients (closed by default, kept on
//! `Connection: keep-alive`, never sent chunked), `Expect: 100-continue`, request bodies by
//! length and chunked, HEAD, heads past the limits (431) and ambiguous framing (400, and the
//! replica never sees the request), the keep-alive bound on an idle connection, and a
//! replica's response head relayed in its own order and case, less its hop-by-hop fields (to an
//! HTTP/2 client, the same fields).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::backends::{Backend, Behaviour};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn one_replica(addr: SocketAddr, proxy: &str) -> Conf {
    Conf {
        kind: Some("static".into()),
        provider: format!("servers = [{{ name = \"b1\", address = \"{addr}\" }}]\n"),
        proxy: proxy.into(),
        ..Conf::default()
    }
}

/// A replica that answers every request with what its body was: `body: <bytes>`, and answers
/// chunked (no length) when the request asks for `/chunked`.
async fn body_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let chunked = req.uri().path() == "/chunked";
                        let body = req.into_body().collect().await?.to_bytes();
                        let text = format!("body: {}", String::from_utf8_lossy(&body));
                        let resp = if chunked {
                            let stream = futures_util::stream::iter(
                                [Bytes::from(text)]
                                    .into_iter()
                                    .map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b))),
                            );
                            http::Response::new(http_body_util::Either::Right(
                                http_body_util::StreamBody::new(stream),
                            ))
                        } else {
                            http::Response::new(http_body_util::Either::Left(Full::new(
                                Bytes::from(text),
                            )))
                        };
                        Ok::<_, hyper::Error>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Everything the gateway sends on `s` until it closes (bounded by 10 s).
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads from `s` until `text` has arrived (bounded by 10 s); all that was read.
async fn read_until(s: &mut TcpStream, text: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(text) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {text:?} in time: {}", String::from_utf8_lossy(&got)))
            .expect("read");
        assert!(
            n > 0,
            "closed before {text:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_http10_is_spoken() {
    let echo = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&one_replica(echo.addr, ""));

    // Three requests in one write; the last closes the connection.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(
        b"GET /p?id=1 HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /p?id=2 HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /p?id=3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    let text = read_all(&mut s).await;
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
    let at = |id: &str| text.find(&format!("get /p?id={id} ")).unwrap_or(usize::MAX);
    assert!(
        at("1") < at("2") && at("2") < at("3") && at("3") < usize::MAX,
        "in order: {text}"
    );
    assert!(
        text.contains("connection: close\r\n"),
        "the last says it closes: {text}"
    );

    // HTTP/1.0 without keep-alive: one response, then the gateway closes.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /p?id=4 HTTP/1.0\r\nHost: t\r\n\r\n")
        .await
        .expect("send");
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("content-length: ") && !text.contains("chunked"),
        "{text}"
    );

    // HTTP/1.0 with keep-alive: told so, and a second request goes on the same connection.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /p?id=5 HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("send");
    let first = read_until(&mut s, "get /p?id=5").await;
    assert!(first.contains("connection: keep-alive\r\n"), "{first}");
    s.write_all(b"HEAD /p?id=6 HTTP/1.0\r\nHost: t\r\n\r\n")
        .await
        .expect("send on the kept connection");
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "HEAD has no body: {text}");
    assert!(
        text.contains("content-length: "),
        "HEAD tells the length: {text}"
    );
    assert_eq!(echo.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_pass_by_length_chunked_and_after_100_continue() {
    let (addr, replica) = body_echo().await;
    let gw = GatewayProcess::start(&one_replica(addr, ""));

    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    // By length, then chunked (answered chunked by the replica), on one connection.
    s.write_all(b"POST /a?id=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .expect("send");
    let text = read_until(&mut s, "body: hello").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    s.write_all(
        b"POST /chunked?id=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\n\r\n",
    )
    .await
    .expect("send");
    let text = read_until(&mut s, "0\r\n\r\n").await;
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(text.contains("body: abcdefg"), "{text}");

    // Expect: 100-continue: the gateway asks for the body when it is about to send it.
    s.write_all(
        b"PUT /a?id=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("send");
    let interim = read_until(&mut s, "\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"data").await.expect("send the body");
    let text = read_until(&mut s, "body: data").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");

    // A body cut short by the client is the client's fault.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"POST /a?id=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nshort")
        .await
        .expect("send");
    s.shutdown().await.expect("half-close");
    let text = read_all(&mut s).await;
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    let (code, _) = get(&gw.url("/a?id=2")).await;
    assert_eq!(code, 200, "the replica is still taken");
    replica.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_ambiguous_heads_are_refused_before_a_replica_sees_them() {
    let echo = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&one_replica(echo.addr, ""));
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let big = format!(
        "GET /a HTTP/1.1\r\nHost: t\r\nCookie: {}\r\n\r\n",
        "c".repeat(70_000)
    );
    let cases = [
        (format!("GET /a HTTP/1.1\r\nHost: t\r\n{many}\r\n"), 431, "more than 100 header fields"),
        (big, 431, "larger than 65536 bytes"),
        (
            "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            400,
            "both Transfer-Encoding and Content-Length",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into(),
            400,
            "does not end in chunked",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".into(),
            400,
            "conflicting Content-Length",
        ),
        ("GET /a HTTP/1.1\r\nHost: t\r\nFolded: a\r\n b\r\n\r\n".into(), 400, "not valid HTTP/1.1"),
    ];
    for (wire, code, says) in cases {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let _ = s.write_all(wire.as_bytes()).await;
        let text = read_all(&mut s).await;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {code} ")),
            "{code} for {:.60?}: {text}",
            wire
        );
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.contains(says), "{says:?} in {text}");
    }
    assert_eq!(echo.hits(), 0, "no refused request reached the replica");
    // 100 fields (Host, Connection, Cookie and 97 more) and a 60 KiB cookie are fine.
    let fine: String = (0..97).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cookie = "c".repeat(60 * 1024);
    let (code, body) = raw(
        gw.addr,
        format!(
            "GET /a HTTP/1.1\r\nHost: t\r\nConnection: close\r\nCookie: {cookie}\r\n{fine}\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body:.200}");
    assert_eq!(echo.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_idles_at_most_the_header_read_timeout() {
    let echo = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&one_replica(echo.addr, "header_read_timeout = \"1s\"\n"));
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    // Requests keep it open past the timeout as long as each comes within it.
    let started = Instant::now();
    for id in 0..4 {
        s.write_all(format!("GET /k?id={id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .expect("send");
        read_until(&mut s, &format!("get /k?id={id} ")).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(1));
    // Then silence, or half a head, closes it.
    s.write_all(b"GET /k?id=9 HTTP/1.1\r\nHost")
        .await
        .expect("send");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed: {closed:?}"
    );
    assert_eq!(echo.hits(), 4);
}

/// `ringgate_connections_held_idle` once it is `want` (bounded by 10 s); panics with what it
/// was.
async fn wait_held(gw: &GatewayProcess, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = metric(&gw.metrics().await, "ringgate_connections_held_idle");
        if held == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{held} connections held, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_without_a_task_served_again_and_still_time_out() {
    let echo = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&one_replica(echo.addr, "header_read_timeout = \"6s\"\n"));
    let mut idle = Vec::new();
    for id in 0..40 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(format!("GET /first?id={id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .expect("send");
        read_until(&mut s, &format!("get /first?id={id} ")).await;
        idle.push(s);
    }
    // One that sent half a head waits for the rest in its task: it is not held.
    let mut partial = TcpStream::connect(gw.addr).await.expect("connect");
    partial
        .write_all(b"GET /partial?id=99 HTTP/1.1\r\nHost")
        .await
        .expect("send");
    wait_held(&gw, 40.0).await;
    // A held connection's next request is answered on it, each by its own replica's echo.
    for (id, s) in idle.iter_mut().enumerate() {
        s.write_all(format!("GET /again?id={id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .expect("send");
        read_until(s, &format!("get /again?id={id} ")).await;
    }
    partial.write_all(b": t\r\n\r\n").await.expect("send");
    read_until(&mut partial, "get /partial?id=99 ").await;
    idle.push(partial);
    // Idle again, all of them are held again; then their keep-alive ends, held or not.
    wait_held(&gw, 41.0).await;
    let timed_out = "ringgate_connections_timed_out_total{phase=\"header\"}";
    let before = metric(&gw.metrics().await, timed_out);
    for s in &mut idle {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "closed at the end of its keep-alive: {closed:?}"
        );
    }
    wait_held(&gw, 0.0).await;
    let after = metric(&gw.metrics().await, timed_out);
    assert_eq!(
        after - before,
        41.0,
        "each counted once, as a keep-alive timeout"
    );
    assert_eq!(echo.hits(), 81);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_close_when_the_drain_starts_not_when_it_ends() {
    let slow = Backend::start("127.0.0.1", Behaviour::Answer { delay_ms: 3000 }).await;
    let mut gw = GatewayProcess::start(&one_replica(slow.addr, "header_read_timeout = \"60s\"\n"));
    let marker = slow.addr.to_string();
    let opened = (0..10).map(|id| {
        let (addr, marker) = (gw.addr, marker.clone());
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(format!("GET /d?id={id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .await
                .expect("send");
            read_until(&mut s, &marker).await;
            s
        })
    });
    let mut idle = Vec::new();
    for s in futures_util::future::join_all(opened).await {
        idle.push(s.expect("joined"));
    }
    wait_held(&gw, 10.0).await;
    // A request in flight holds the drain open for 3 s.
    let mut busy = TcpStream::connect(gw.addr).await.expect("connect");
    busy.write_all(b"GET /busy?id=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    for s in &mut idle {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "closed: {closed:?}"
        );
    }
    // The request in flight has not been answered yet: the drain still waits for it.
    let mut one = [0u8; 1];
    let unanswered = busy.try_read(&mut one);
    assert!(
        matches!(&unanswered, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the idle connections were closed only once the drain ended: {unanswered:?}"
    );
    let answer = read_until(&mut busy, &marker).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(gw.wait_exit(Duration::from_secs(10)), "the gateway exits");
}

/// What a replica sends in the test below: fields in mixed case, two `Set-Cookie` with another
/// field between them, every hop-by-hop field, one its `Connection` names, and its own `Date`.
const MIXED_HEAD: &[&str] = &["HTTP/1.1 200 OK\r\n\
    X-Mixed-Case: Kept\r\n\
    Set-Cookie: a=1\r\n\
    Connection: close, X-Hop\r\n\
    X-Hop: cut\r\n\
    Keep-Alive: timeout=5\r\n\
    X-Between: 2\r\n\
    Set-Cookie: b=2\r\n\
    Content-Length: 2\r\n\
    Proxy-Connection: keep-alive\r\n\
    Trailer: x-t\r\n\
    Upgrade: h2c\r\n\
    TE: trailers\r\n\
    Date: Mon, 07 Dec 2026 10:00:00 GMT\r\n\
    \r\n\
    ok"];

/// Asks `gw` for [`MIXED_HEAD`] over HTTP/1.1 and checks the head it relays.
async fn relays_the_mixed_head(gw: SocketAddr) {
    let mut s = TcpStream::connect(gw).await.expect("connect");
    s.write_all(b"GET /?case=0 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let text = read_all(&mut s).await;
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    assert_eq!(body, "ok", "{text}");
    let lines: Vec<&str> = head.split("\r\n").collect();
    // The replica's fields in its order and case (the gateway's own after them): no field
    // it sent twice is moved next to its first, no hop-by-hop field is left.
    assert_eq!(
        lines[..7],
        [
            "HTTP/1.1 200 OK",
            "X-Mixed-Case: Kept",
            "Set-Cookie: a=1",
            "X-Between: 2",
            "Set-Cookie: b=2",
            "Date: Mon, 07 Dec 2026 10:00:00 GMT",
            "content-length: 2",
        ],
        "{text}"
    );
    assert!(lines[7].starts_with("via: 1.1 "), "{text}");
    assert_eq!(lines[8..], ["connection: close"], "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_head_reaches_an_http1_client_as_it_was_written_less_its_hop_by_hop_fields() {
    let replica = Backend::start("127.0.0.1", Behaviour::Raw(MIXED_HEAD)).await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    relays_the_mixed_head(gw.addr).await;

    // A client over HTTP/2 gets the same fields, from a `HeaderMap`.
    let (mut send, _conn) = h2c::<http_body_util::Empty<Bytes>>(gw.addr).await;
    let req = http::Request::builder()
        .uri(format!("http://{}/?case=0", gw.addr))
        .body(http_body_util::Empty::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("an answer");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-mixed-case"], "Kept");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(h["date"], "Mon, 07 Dec 2026 10:00:00 GMT");
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
        "te",
    ] {
        assert!(!h.contains_key(gone), "{gone}: {h:?}");
    }
    assert!(h["via"].to_str().expect("ascii").starts_with("1.1 "));

    // With the access log on (it wraps the response body), the same head.
    let log = std::env::temp_dir().join(format!("ringgate-http1-{}.log", std::process::id()));
    let logged = GatewayProcess::start(&Conf {
        log: format!("access = \"{}\"\n", log.display()),
        ..one_replica(replica.addr, "")
    });
    relays_the_mixed_head(logged.addr).await;
    let _ = std::fs::remove_file(&log);
}

/// Sends one `GET` on each of `conns` at once, then reads every answer (a 200 each, whose body,
/// the last of it, is `ends_with`).
async fn one_request_on_each(conns: &mut [TcpStream], ends_with: &str) {
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("GET /w?id={i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .expect("send");
    }
    for s in conns.iter_mut() {
        let text = tokio::time::timeout(Duration::from_secs(30), read_until(s, ends_with))
            .await
            .expect("an answer within 30 s");
        assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_requests_at_once_to_one_replica_reuse_their_connections_to_it() {
    // 300 requests at once to one replica, twice over the same client connections (so each
    // serving thread carries as many both times). The first time opens a connection to the
    // replica for each; the second finds them all kept, where a cap of 64 idle connections a
    // replica and thread closed most of them after every burst and opened them again.
    const AT_ONCE: usize = 300;
    // Each answer takes a second: all 300 are in flight at once even on a loaded machine.
    let slow = Backend::start("127.0.0.1", Behaviour::Answer { delay_ms: 1000 }).await;
    // Connects to the replica get ten seconds instead of the default one: one of 300 at once
    // on CI's loaded machine (the suite's tests run beside each other) once took longer than a
    // second (a 502, "tcp connect timed out after 1s"), and this test is about reuse, not
    // connect speed.
    let caps = "max_connections = 2000\nmax_connections_per_ip = 2000\nmax_requests = 2000\n\
                max_requests_per_ip = 2000\nmax_requests_per_replica = 2000\n\
                connect_timeout = \"10s\"\n";
    let gw = GatewayProcess::start(&one_replica(slow.addr, caps));
    let mut conns = Vec::with_capacity(AT_ONCE);
    for _ in 0..AT_ONCE {
        conns.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    let name = slow.addr.to_string();
    one_request_on_each(&mut conns, &name).await;
    let opened = slow.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        opened >= AT_ONCE,
        "{opened} connections for {AT_ONCE} requests at once"
    );
    one_request_on_each(&mut conns, &name).await;
    let again = slow.accepted.load(std::sync::atomic::Ordering::SeqCst) - opened;
    // Health checks open connections of their own (a few in these seconds).
    assert!(
        again < 30,
        "the second burst opened {again} new connections to the replica; the first left {opened}"
    );
    // Every connection of the burst is kept idle for the next (and a health check's may be
    // open as this is read).
    let open = metric(&gw.metrics().await, "ringgate_upstream_connections_open") as usize;
    assert!(
        (AT_ONCE..AT_ONCE + 3).contains(&open),
        "{open} connections to the replica open after the bursts of {AT_ONCE}"
    );
}
