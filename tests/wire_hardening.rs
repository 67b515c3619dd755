//! The HTTP/1 wire rules of issue 23, on real sockets against the real gateway binary and real
//! replicas (hyper, or raw ones from `support::backends` that misbehave on purpose): chunk
//! lines with a bare LF, NUL or control byte (the smuggling shape: 400 and the connection
//! closed; from a replica: its failure), a `101` nobody asked for (502, the replica blamed, its
//! connection never reused), `Content-Length` and `Transfer-Encoding` read by one table of
//! cases on both legs, `Host` (missing, or disagreeing with an absolute-form target), the one
//! deadline for the first request head, and a bracketed admin host with a name after it. Each
//! of these failed on the gateway before the fix it checks.
//! Must not touch: other tests' gateways or replicas; every test starts its own on port 0.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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

/// A replica (hyper's HTTP/1.1 server, so bodies are read by a parser other than ours) that
/// answers `body: <the request body>` and records every request it was sent as
/// `<method> <target> host=<Host> body=<body>`.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let line = format!(
                                    "{} {} host={}",
                                    req.method(),
                                    req.uri(),
                                    req.headers()
                                        .get(http::header::HOST)
                                        .and_then(|h| h.to_str().ok())
                                        .unwrap_or("-")
                                );
                                let heartbeat = req.uri().path() == "/heartbeat";
                                let body = req.into_body().collect().await;
                                let body = body.map(|b| b.to_bytes()).unwrap_or_default();
                                let body = String::from_utf8_lossy(&body).into_owned();
                                if !heartbeat {
                                    if let Ok(mut seen) = log.lock() {
                                        seen.push(format!("{line} body={body}"));
                                    }
                                }
                                let text = format!("body: {body}");
                                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(
                                    text,
                                ))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Recorder { addr, seen, task }
    }

    /// What it was sent so far, one line a request.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether any request it was sent contains `text` (case-insensitively).
    fn saw(&self, text: &str) -> bool {
        let text = text.to_lowercase();
        self.seen().iter().any(|l| l.to_lowercase().contains(&text))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `wire` on a new connection and returns everything the gateway sends until it closes
/// (bounded by 10 s), and whether it did close within that.
async fn exchange(addr: SocketAddr, wire: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(wire).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A response's head (lower-cased) and its body, dechunked when it came chunked.
fn split_response(response: &str) -> (String, String) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let head = head.to_lowercase();
    if !head.contains("transfer-encoding: chunked") {
        return (head, body.to_owned());
    }
    let mut rest = body;
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or("");
    }
    (head, out)
}

/// Client request bodies (chunked) that no two readers may end in different places. Each is
/// sent with a pipelined request after it that must never reach the replica.
const BAD_CHUNKED_BODIES: [(&str, &[u8]); 6] = [
    // The audit's shape: a front proxy that ends lines at a bare LF reads `2;` as the size line
    // and 0x45 bytes of data after it, which hold the "next request" below; a reader of CRLF
    // lines read `2;\nxx` as one line and took that request as the next one on the connection.
    (
        "a bare LF in a chunk extension",
        b"2;\nxx\r\n45\r\n0\r\n\r\n",
    ),
    (
        "a bare LF in a trailer field",
        b"5\r\nhello\r\n0\r\nx-t: a\nb\r\n\r\n",
    ),
    (
        "a bare CR in a chunk extension",
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "a NUL in a chunk extension",
        b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "a control byte in a chunk extension",
        b"5;a=\"\x01\"\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "a control byte in a trailer field",
        b"5\r\nhello\r\n0\r\nx-t: \x0b\r\n\r\n",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_lines_with_a_bare_lf_nul_or_control_byte_are_refused_and_the_connection_closed() {
    let replica = Recorder::start().await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    let smuggled = "GET /x/echo-SMUGGLED HTTP/1.1\r\nHost: t\r\nX-Pad: aaaaaaaaaaaaa\r\n\r\n";
    for (i, (what, body)) in BAD_CHUNKED_BODIES.iter().enumerate() {
        let mut wire = format!(
            "POST /x/chunked?id={i} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        wire.extend_from_slice(body);
        wire.extend_from_slice(smuggled.as_bytes());
        wire.extend_from_slice(b"\r\n0\r\n\r\n");
        let (text, closed) = exchange(gw.addr, &wire).await;
        assert_eq!(status_of(&text), 400, "{what}: {text}");
        assert!(text.contains("malformed chunked body"), "{what}: {text}");
        assert!(text.contains("connection: close\r\n"), "{what}: {text}");
        assert!(closed, "{what}: the connection is closed after the 400");
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one answer only: {text}"
        );
    }
    assert!(
        !replica.saw("smuggled"),
        "a request nobody sent reached the replica: {:?}",
        replica.seen()
    );
    // The grammar's extensions (tokens, quoted strings with escapes) and trailers pass.
    let (text, _) = exchange(
        gw.addr,
        b"POST /x/fine?id=9 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          3 ; a = b ;c=\"q \\\" t\"\r\nhel\r\n2\r\nlo\r\n0\r\nx-t: 1\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&text), 200, "{text}");
    assert!(text.ends_with("body: hello"), "{text}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_client_body_errors_total"),
        BAD_CHUNKED_BODIES.len() as f64,
        "the client's fault, every time"
    );
    let status = gw.status().await;
    assert_eq!(status["replicas"][0]["failures"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_body_with_a_bare_lf_in_a_chunk_line_is_cut_and_counted_against_it() {
    const CASES: &[(&str, &str)] = &[
        (
            "transfer-encoding: chunked\r\n",
            "5;a\nb\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "transfer-encoding: chunked\r\n",
            "5\r\nhello\r\n0\r\nx-t: \x00\r\n\r\n",
        ),
        ("transfer-encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
    ];
    let replica = Backend::start("127.0.0.1", Behaviour::Framed(CASES)).await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    for case in 0..2 {
        let (text, closed) = exchange(
            gw.addr,
            format!("GET /r?case={case}&id=1 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(closed, "case {case}: the client's connection is closed");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "case {case}: the body is cut, never relayed whole: {text:?}"
        );
    }
    let status = gw.status().await;
    assert_eq!(status["replicas"][0]["failures"], 2, "{status}");
    // A well-framed answer on a fresh connection is relayed.
    let (text, _) = exchange(
        gw.addr,
        b"GET /r?case=2&id=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&text), 200, "{text}");
    assert_eq!(split_response(&text).1, "hello", "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_101_is_a_502_counted_against_the_replica_and_its_connection_never_reused() {
    let replica = Backend::start("127.0.0.1", Behaviour::Switches).await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    let (code, body) = raw(
        gw.addr,
        b"GET /switch?id=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("switched protocols"), "{body}");
    // Past the moment the replica sends the other protocol's bytes on that connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for id in 2..5 {
        let (code, body) = raw(
            gw.addr,
            format!("GET /next?id={id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(code, 200, "request {id} after the 101: {body}");
        assert!(body.contains(&format!("get /next?id={id} ")), "{body}");
    }
    let status = gw.status().await;
    assert_eq!(status["replicas"][0]["failures"], 1, "{status}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "ringgate_upstream_failures_total{replica=\"b1\"}"),
        1.0
    );
}

/// What the gateway relays of a replica's answer with a case's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relayed {
    /// 200, framed by the length it read, written as the gateway writes it: `content-length: 5`.
    Length,
    /// 200, the body decoded from chunks (and sent on chunked).
    Chunked,
    /// 200, the body read until the replica closed: all of `body`, whatever length it stated.
    UntilClose,
    /// 502, and a failure of the replica's.
    Refused,
}

/// One set of framing field lines, sent by a client (with `body`) and by a replica (with
/// `body`): the client's status, and what the gateway relays of the replica's answer.
struct WireCase {
    lines: &'static str,
    body: &'static str,
    client: u16,
    replica: Relayed,
}

const fn wire(lines: &'static str, body: &'static str, client: u16, replica: Relayed) -> WireCase {
    WireCase {
        lines,
        body,
        client,
        replica,
    }
}

const CHUNKED_HELLO: &str = "5\r\nhello\r\n0\r\n\r\n";

/// One table for both legs: the same lines, read by the same rules.
const WIRE_CASES: [WireCase; 16] = [
    wire("Content-Length: 5\r\n", "hello", 200, Relayed::Length),
    wire("Content-Length: 005\r\n", "hello", 200, Relayed::Length),
    wire("Content-Length: 5, 5\r\n", "hello", 200, Relayed::Length),
    wire(
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "hello",
        200,
        Relayed::Length,
    ),
    wire("Content-Length: +5\r\n", "hello", 400, Relayed::Refused),
    wire("Content-Length: -5\r\n", "hello", 400, Relayed::Refused),
    wire("Content-Length: 0x5\r\n", "hello", 400, Relayed::Refused),
    wire("Content-Length: 5 5\r\n", "hello", 400, Relayed::Refused),
    wire("Content-Length: 5, 6\r\n", "hello", 400, Relayed::Refused),
    wire(
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "hello",
        400,
        Relayed::Refused,
    ),
    wire(
        "Transfer-Encoding: chunked\r\n",
        CHUNKED_HELLO,
        200,
        Relayed::Chunked,
    ),
    wire(
        "Transfer-Encoding: gzip, chunked\r\n",
        CHUNKED_HELLO,
        501,
        Relayed::Chunked,
    ),
    wire(
        "Transfer-Encoding: gzip\r\nContent-Length: 5\r\n",
        "hello world",
        400,
        Relayed::UntilClose,
    ),
    wire(
        "Transfer-Encoding: chunked, chunked\r\n",
        CHUNKED_HELLO,
        400,
        Relayed::Refused,
    ),
    wire(
        "Transfer-Encoding: chunked\r\nContent-Length: +5\r\n",
        CHUNKED_HELLO,
        400,
        Relayed::Refused,
    ),
    wire(
        "Transfer-Encoding: chunked;x=1\r\n",
        CHUNKED_HELLO,
        400,
        Relayed::Refused,
    ),
];

/// The `(lines, body)` pairs of [`WIRE_CASES`], for the replica that answers with them.
const fn replica_answers() -> [(&'static str, &'static str); WIRE_CASES.len()] {
    let mut out = [("", ""); WIRE_CASES.len()];
    let mut i = 0;
    while i < WIRE_CASES.len() {
        out[i] = (WIRE_CASES[i].lines, WIRE_CASES[i].body);
        i += 1;
    }
    out
}

static REPLICA_ANSWERS: [(&str, &str); WIRE_CASES.len()] = replica_answers();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_fields_are_read_by_one_table_on_both_legs() {
    // The client's leg: a request with the case's fields and body.
    let recorder = Recorder::start().await;
    let gw = GatewayProcess::start(&one_replica(recorder.addr, ""));
    for (i, case) in WIRE_CASES.iter().enumerate() {
        let request = format!(
            "POST /c?case={i}&id=1 HTTP/1.1\r\nHost: t\r\n{}Connection: close\r\n\r\n{}",
            case.lines, case.body
        );
        let (text, _) = exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(
            status_of(&text),
            case.client,
            "client sends {:?}: {text}",
            case.lines
        );
        let reached = recorder.saw(&format!("/c?case={i}&"));
        assert_eq!(reached, case.client == 200, "{:?}", case.lines);
        if case.client == 200 {
            assert!(text.ends_with("body: hello"), "{:?}: {text}", case.lines);
            assert!(
                recorder.saw(&format!("/c?case={i}&id=1 host=t body=hello")),
                "{:?}: {:?}",
                case.lines,
                recorder.seen()
            );
        }
    }
    drop(gw);

    // The replica's leg: an answer with the same fields and body.
    let replica = Backend::start("127.0.0.1", Behaviour::Framed(&REPLICA_ANSWERS)).await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    let mut refused = 0;
    for (i, case) in WIRE_CASES.iter().enumerate() {
        let request =
            format!("GET /r?case={i}&id=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let (text, _) = exchange(gw.addr, request.as_bytes()).await;
        let (head, body) = split_response(&text);
        let what = format!("replica sends {:?}: {text:?}", case.lines);
        match case.replica {
            Relayed::Refused => {
                refused += 1;
                assert_eq!(status_of(&text), 502, "{what}");
                assert!(body.contains("replica b1"), "{what}");
            }
            relayed => {
                assert_eq!(status_of(&text), 200, "{what}");
                let lengths: Vec<&str> = head
                    .lines()
                    .filter(|l| l.starts_with("content-length:"))
                    .collect();
                let (want_lengths, want_body): (&[&str], &str) = match relayed {
                    Relayed::Length => (&["content-length: 5"], "hello"),
                    Relayed::UntilClose => (&[], case.body),
                    _ => (&[], "hello"),
                };
                assert_eq!(lengths, want_lengths, "{what}");
                assert_eq!(body, want_body, "{what}");
            }
        }
    }
    let status = gw.status().await;
    assert_eq!(
        status["replicas"][0]["failures"], refused,
        "every refused answer is the replica's failure: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_names_its_host_once_and_the_target_cannot_name_another() {
    let replica = Recorder::start().await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    let port = gw.addr.port();
    let cases: Vec<(String, u16, &str)> = vec![
        // RFC 9112 §3.2: HTTP/1.1 needs Host; HTTP/1.0 may go without.
        (
            "GET /h?id=1 HTTP/1.1\r\nConnection: close\r\n\r\n".into(),
            400,
            "without a Host header",
        ),
        ("GET /h?id=2 HTTP/1.0\r\n\r\n".into(), 200, "body: "),
        // An absolute-form target that names another host than Host: refused, for the proxy
        // and for the admin guard alike (which read Host, and let the target's host by).
        (
            "GET http://a.test/h?id=3 HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n".into(),
            400,
            "does not match the authority",
        ),
        (
            format!("GET http://evil.example/lb/status HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
            400,
            "does not match the authority",
        ),
        // One that agrees is served, with the target's host.
        (
            "GET http://a.test/h?id=4 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".into(),
            200,
            "body: ",
        ),
        (
            format!("GET http://localhost:{port}/lb/status HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
            200,
            "\"status\":\"successful\"",
        ),
        // Without Host (HTTP/1.0), the target's authority is the host, and the guard reads it.
        (
            "GET http://evil.example/lb/status HTTP/1.0\r\n\r\n".into(),
            403,
            "evil.example",
        ),
        // A coding the gateway does not implement: 501, as NGINX and HAProxy answer.
        (
            "POST /h?id=5 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into(),
            501,
            "does not implement",
        ),
    ];
    for (request, code, says) in &cases {
        let (text, _) = exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(status_of(&text), *code, "{request:?}: {text}");
        assert!(text.contains(says), "{says:?} in {text}");
    }
    let seen = replica.seen();
    assert_eq!(
        seen,
        ["GET /h?id=2 host=- body=", "GET /h?id=4 host=a.test body="],
        "only the served requests reached the replica, in origin form"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_tells_its_protocol_late_still_has_one_deadline_for_its_first_head() {
    let replica = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, "header_read_timeout = \"4s\"\n"));
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let accepted = Instant::now();
    // `P` could begin the HTTP/2 preface or a POST: the sniff waits. Late, `OST` decides it,
    // and then the head is left unfinished.
    s.write_all(b"P").await.expect("send");
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.write_all(b"OST /late?id=1 HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("send");
    // Bounded wait: closed by the 4 s from accept (with room for a busy machine), where a
    // fresh header deadline after the sniff held it until 7 s.
    let mut buf = [0u8; 256];
    let bound = accepted + Duration::from_millis(5500);
    let closed = loop {
        match tokio::time::timeout_at(bound.into(), s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => continue,
        }
    };
    assert!(
        closed,
        "still open {:?} after accept, past proxy.header_read_timeout (4 s) from accept",
        accepted.elapsed()
    );
    assert_eq!(replica.hits(), 0);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ringgate_connections_timed_out_total{phase=\"first_bytes\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_host_in_brackets_must_end_at_its_bracket_or_its_port() {
    let replica = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&one_replica(replica.addr, ""));
    let port = gw.addr.port();
    let status = |host: &str| {
        format!("GET /lb/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    for foreign in ["[::1]evil.example", "[::1].evil.example:80", "[::1]:80evil"] {
        let (code, body) = raw(gw.addr, status(foreign).as_bytes()).await;
        assert_eq!(code, 403, "{foreign}: {body}");
        assert!(body.contains("does not name this gateway"), "{body}");
    }
    for ours in [format!("[::1]:{port}"), "[::1]".to_owned()] {
        let (code, body) = raw(gw.addr, status(&ours).as_bytes()).await;
        assert_eq!(code, 200, "{ours}: {body}");
    }
}
