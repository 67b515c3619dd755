//! The connector and the HTTP/1.1 client against real sockets: replicas scripted on 127.0.0.1 that answer with a
//! length, chunked, until close, close idle connections, reset, or are not there at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use super::*;
use crate::proxy::body::ProxyBody;

/// The connections the tests' requests keep, as a serving thread's worker keeps them (shared
/// by the tests: each test's replicas have addresses of their own).
static POOLS: std::sync::LazyLock<Pools> = std::sync::LazyLock::new(Pools::default);

/// [`super::send`] with the tests' pools.
async fn send<B: Outgoing + Send + 'static>(
    req: &Request<'_>,
    body: &mut B,
    in_flight: InFlight,
) -> Result<Response<ReplicaBody>, SendError> {
    super::send(req, body, in_flight, &POOLS).await
}
use crate::snapshot::ReplicaStats;
use crate::wire::client::head::{self, HeadError, RequestFraming};
use crate::wire::client::Forwarded;

/// A replica that answers each request head with `reply(n)` (n counts requests on the
/// connection) and then closes when `close_after` requests were served on it.
async fn replica(
    reply: fn(usize) -> Vec<u8>,
    close_after: usize,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut served = 0;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        if s.write_all(&reply(served)).await.is_err() {
                            return;
                        }
                        served += 1;
                        if served >= close_after {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, accepts, task)
}

fn stats() -> Arc<ReplicaStats> {
    Arc::new(ReplicaStats::default())
}

/// The head of `GET /` (made once: the requests borrow it).
fn get_parts() -> &'static http::request::Parts {
    static PARTS: std::sync::OnceLock<http::request::Parts> = std::sync::OnceLock::new();
    PARTS.get_or_init(|| {
        let (parts, ()) = http::Request::builder()
            .method(Method::GET)
            .uri("/")
            .header("host", "t")
            .body(())
            .expect("request")
            .into_parts();
        parts
    })
}

/// `GET /` to `addr`, with `read_timeout` for the body.
fn get_request(addr: SocketAddr, read_timeout: Duration) -> Request<'static> {
    Request {
        addr,
        tls: None,
        connect_timeout: Duration::from_secs(1),
        read_timeout,
        forwarded: Forwarded {
            parts: get_parts(),
            client: "127.0.0.1:1".parse().expect("addr"),
            proto: "http",
            framing: RequestFraming::None,
            upgrade: None,
        },
        keep_idle: true,
        http2: false,
        http2_only: false,
        http2_keepalive: Duration::from_secs(20),
        deadline: Instant::now() + Duration::from_secs(30),
    }
}

async fn get(addr: SocketAddr) -> Result<(u16, String), SendError> {
    let req = get_request(addr, Duration::from_secs(60));
    let s = stats();
    let resp = send(&req, &mut ProxyBody::Empty, InFlight::start(&s)).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        s.in_flight.load(Ordering::SeqCst),
        0,
        "in flight until the body ended"
    );
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn length(_: usize) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec()
}

#[tokio::test]
async fn a_length_body_is_read_and_the_connection_reused() {
    let (addr, accepts, _t) = replica(length, usize::MAX).await;
    for _ in 0..5 {
        assert_eq!(get(addr).await.expect("answer"), (200, "hello".into()));
    }
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "one connection for all five"
    );
}

#[tokio::test]
async fn chunked_and_until_close_bodies_are_decoded() {
    fn chunked(_: usize) -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
            .to_vec()
    }
    let (addr, accepts, _t) = replica(chunked, usize::MAX).await;
    assert_eq!(
        get(addr).await.expect("answer"),
        (200, "hello world".into())
    );
    assert_eq!(
        get(addr).await.expect("answer"),
        (200, "hello world".into())
    );
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "chunked keeps the connection"
    );

    fn until_close(_: usize) -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec()
    }
    let (addr, accepts, _t) = replica(until_close, 1).await;
    assert_eq!(get(addr).await.expect("answer"), (200, "all of it".into()));
    assert_eq!(get(addr).await.expect("answer"), (200, "all of it".into()));
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        2,
        "a close-delimited body ends its connection"
    );
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    fn continued(_: usize) -> Vec<u8> {
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok".to_vec()
    }
    let (addr, _, _t) = replica(continued, usize::MAX).await;
    assert_eq!(get(addr).await.expect("answer"), (201, "ok".into()));
}

#[tokio::test]
async fn a_pooled_connection_the_replica_closed_is_replaced_transparently() {
    // Closes every connection after one response, without saying so.
    let (addr, accepts, _t) = replica(length, 1).await;
    assert_eq!(get(addr).await.expect("first"), (200, "hello".into()));
    // Give the close time to arrive, then the pooled connection is known dead …
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(addr).await.expect("second"), (200, "hello".into()));
    // … and without waiting the send sees it broken and retries on a fresh one.
    assert_eq!(get(addr).await.expect("third"), (200, "hello".into()));
    assert_eq!(accepts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn failures_are_told_apart() {
    let free = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    assert!(
        matches!(get(free).await, Err(SendError::Connect(_))),
        "nothing listens"
    );

    fn nothing(_: usize) -> Vec<u8> {
        Vec::new()
    }
    let (addr, _, _t) = replica(nothing, 1).await;
    assert!(
        matches!(get(addr).await, Err(SendError::Broken(_))),
        "closed before a response"
    );

    fn garbage(_: usize) -> Vec<u8> {
        b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()
    }
    let (addr, _, _t) = replica(garbage, 1).await;
    assert!(matches!(get(addr).await, Err(SendError::BadHead(_))));

    // After an interim 100, a 101 nobody asked for: an error, never a final response.
    fn switches(_: usize) -> Vec<u8> {
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\nNOT HTTP".to_vec()
    }
    let (addr, _, _t) = replica(switches, usize::MAX).await;
    assert!(matches!(
        get(addr).await,
        Err(SendError::BadHead(HeadError::UnaskedSwitch))
    ));
    assert!(
        POOLS.h1.take(addr, None).is_none(),
        "the connection is not pooled"
    );

    fn short(_: usize) -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nhalf".to_vec()
    }
    let (addr, _, _t) = replica(short, 1).await;
    let req = get_request(addr, Duration::from_secs(60));
    let resp = send(&req, &mut ProxyBody::Empty, InFlight::start(&stats()))
        .await
        .expect("a head");
    assert!(
        resp.into_body().collect().await.is_err(),
        "a truncated body is an error"
    );
}

#[tokio::test]
async fn a_head_larger_than_one_read_is_read_whole_and_one_past_the_limit_is_refused() {
    // 40 headers of 400 bytes: 16 KiB of head, eight times the head read, then a 20 KiB body.
    fn large(_: usize) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..40 {
            out.extend_from_slice(format!("x-large-{i}: {}\r\n", "v".repeat(400)).as_bytes());
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", 20 * 1024).as_bytes());
        out.extend_from_slice(&[b'b'; 20 * 1024]);
        out
    }
    let (addr, accepts, _t) = replica(large, usize::MAX).await;
    for _ in 0..3 {
        let (status, body) = get(addr).await.expect("answer");
        assert_eq!((status, body.len()), (200, 20 * 1024));
        assert!(body.bytes().all(|b| b == b'b'));
    }
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "one connection for all three"
    );

    fn over_the_limit(_: usize) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
        while out.len() <= head::MAX_HEAD {
            out.extend_from_slice(format!("x-pad: {}\r\n", "v".repeat(1000)).as_bytes());
        }
        out.extend_from_slice(b"content-length: 0\r\n\r\n");
        out
    }
    let (addr, _, _t) = replica(over_the_limit, 1).await;
    assert!(matches!(get(addr).await, Err(SendError::BadHead(_))));
}

#[tokio::test]
async fn a_body_the_replica_stops_sending_is_cut_after_the_read_timeout() {
    fn stalls(_: usize) -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhel".to_vec()
    }
    let (addr, accepts, _t) = replica(stalls, usize::MAX).await;
    let req = get_request(addr, Duration::from_millis(200));
    for round in 1..=2 {
        let s = stats();
        let resp = send(&req, &mut ProxyBody::Empty, InFlight::start(&s))
            .await
            .expect("the head came");
        let mut body = resp.into_body();
        let first = body
            .frame()
            .await
            .expect("a frame")
            .expect("the first bytes");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"hel")));
        let cut = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("cut within the read timeout, not held")
            .expect("an error, not the end")
            .expect_err("the body was cut");
        assert!(cut.to_string().contains("proxy.read_timeout"), "{cut}");
        assert_eq!(s.body_timeouts.load(Ordering::SeqCst), 1);
        drop(body);
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 0);
        // The cut connection is not reused: each round has its own.
        assert_eq!(accepts.load(Ordering::SeqCst), round);
    }
}

/// A replica that answers an upgrade request with `101` and its first bytes of the new
/// protocol in the same write, then echoes whatever it is sent; the request head it got is
/// sent back on `heads`.
async fn switching_replica() -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, heads) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&got).into_owned()).await;
        let switched = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nhello";
        if s.write_all(switched).await.is_err() {
            return;
        }
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn an_upgrade_answered_101_carries_its_connection_with_the_response() {
    let (addr, mut heads) = switching_replica().await;
    let protocols = http::HeaderValue::from_static("echo");
    let mut req = get_request(addr, Duration::from_secs(60));
    req.forwarded.upgrade = Some(&protocols);
    let s = stats();
    let resp = send(&req, &mut ProxyBody::Empty, InFlight::start(&s))
        .await
        .expect("the 101");
    assert_eq!(resp.status(), 101);
    let head = heads.recv().await.expect("the head the replica got");
    assert!(head.contains("connection: upgrade\r\n"), "{head}");
    assert!(head.contains("upgrade: echo\r\n"), "{head}");
    let (mut conn, in_flight, _) = resp.into_body().into_switched().expect("the connection");
    assert_eq!(
        in_flight.stats().load(),
        1,
        "counted while the switched connection lives"
    );
    // What the replica sent with its 101 is the new protocol's, kept for whoever takes it.
    assert_eq!(&conn.buf[..], b"hello");
    conn.stream().write_all(b"ping").await.expect("write");
    let mut got = 0;
    while got < 4 {
        let n = std::future::poll_fn(|cx| conn.poll_fill(cx, 64))
            .await
            .expect("read");
        assert!(n > 0, "the replica closed");
        got += n;
    }
    assert_eq!(
        &conn.buf[5..],
        b"ping",
        "bytes both ways on the switched connection"
    );
    drop(in_flight);
    assert_eq!(s.load(), 0);
    assert!(
        POOLS.h1.take(addr, None).is_none(),
        "a switched connection never goes to the pool"
    );
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_still_the_replicas_error() {
    let (addr, _heads) = switching_replica().await;
    let req = get_request(addr, Duration::from_secs(60));
    let s = stats();
    let sent = send(&req, &mut ProxyBody::Empty, InFlight::start(&s)).await;
    assert!(
        matches!(sent, Err(SendError::BadHead(HeadError::UnaskedSwitch))),
        "{:?}",
        sent.map(|r| r.status())
    );
}

/// A replica that answers the first request head on each connection with `answer`, then
/// closes the connection.
async fn answering(answer: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(&answer).await;
            });
        }
    });
    (addr, task)
}

/// What a forwarded `GET /` makes of the replica at `addr`: the status of a response read
/// whole, or why there was none.
async fn by_traffic(addr: SocketAddr) -> Result<u16, String> {
    let req = get_request(addr, Duration::from_secs(5));
    let resp = send(&req, &mut ProxyBody::Empty, InFlight::start(&stats()))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// A response head of `fields` fields of `size` bytes each, and no body.
fn head_of(fields: usize, size: usize) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..fields {
        out.extend_from_slice(format!("x-field-{i}: {}\r\n", "v".repeat(size)).as_bytes());
    }
    out.extend_from_slice(b"content-length: 0\r\n\r\n");
    out
}

/// Health checks reach a replica through the same connector and codec as traffic (issue 24):
/// whatever a replica answers, a check passes exactly when a forwarded request gets a whole
/// response with a status the check expects. The last two cases are where the HTTP stack the
/// checks had before (hyper-util's client) and this codec disagree: a head past this codec's
/// 64 KiB but within hyper's limit, and more fields than hyper's 100 but within this codec's 128.
#[tokio::test]
async fn a_check_passes_exactly_when_traffic_gets_a_whole_answer_it_expects() {
    use crate::health::probe::{Check, HttpProber, Prober};
    let check = Arc::new(Check::of(&crate::config::HealthConfig::default()));
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "HTTP/1.0 with a length",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            true,
        ),
        (
            "HTTP/1.0 until the close",
            b"HTTP/1.0 200 OK\r\n\r\nuntil the close".to_vec(),
            true,
        ),
        (
            "chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
            true,
        ),
        (
            "closes right after the head",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
            false,
        ),
        (
            "content-length: +5",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello".to_vec(),
            false,
        ),
        (
            "content-length: 0x5",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\nhello".to_vec(),
            false,
        ),
        (
            "content-length: 5, 6",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello".to_vec(),
            false,
        ),
        (
            "a bare LF ends a chunk line",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n".to_vec(),
            false,
        ),
        (
            "a status the check does not expect",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec(),
            false,
        ),
        ("a head of 70 KiB", head_of(70, 1000), false),
        ("a head of 110 fields", head_of(110, 8), true),
    ];
    for (what, answer, healthy) in cases {
        let (addr, task) = answering(answer).await;
        let traffic = by_traffic(addr).await;
        let checked = HttpProber::default()
            .probe(addr, check.clone(), Duration::from_secs(5))
            .await;
        let traffic_passes = traffic.as_ref().is_ok_and(|&s| check.expect.matches(s));
        assert_eq!(traffic_passes, healthy, "{what}: traffic got {traffic:?}");
        assert_eq!(checked.ok, healthy, "{what}: the check found {checked:?}");
        assert!(!checked.inconclusive, "{what}");
        if let Ok(status) = traffic {
            assert_eq!(checked.status, Some(status), "{what}: the same status");
        }
        task.abort();
    }
}

/// A connection made by one TLS client (or plain TCP) is never handed to a request of another:
/// after an edit of `[provider] upstream_tls` or `upstream_ca`, the next request connects anew.
#[tokio::test]
async fn a_pooled_connection_goes_only_to_a_request_of_the_client_that_made_it() {
    let (addr, accepts, _t) = replica(length, usize::MAX).await;
    assert_eq!(get(addr).await.expect("answer"), (200, "hello".into()));
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca, params.self_signed(&key).expect("CA").pem()).expect("write");
    let provider = crate::config::ProviderConfig {
        upstream_tls: true,
        upstream_ca: Some(ca),
        ..crate::config::ProviderConfig::default()
    };
    let tls = crate::tls::upstream::UpstreamTls::from_config(&provider, crate::tls::provider())
        .expect("a client")
        .expect("TLS on");
    assert!(
        POOLS.h1.take(addr, Some(&tls)).is_none(),
        "the pooled connection is plain TCP"
    );
    assert!(
        POOLS.h1.take(addr, None).is_none(),
        "and it was closed when met, not kept"
    );
    assert_eq!(get(addr).await.expect("answer"), (200, "hello".into()));
    assert_eq!(accepts.load(Ordering::SeqCst), 2, "a new connection");
}

/// An HTTP/2 replica (the h2 crate's server) that refuses every stream on the first connection
/// it accepts with `REFUSED_STREAM` and answers 200 with trailers on the later ones; counts
/// its connections.
async fn h2_replica_refusing_on_its_first_connection() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let refuse = counter.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let Ok(mut conn) = ::h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if refuse {
                        respond.send_reset(::h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let resp = http::Response::new(());
                    let Ok(mut body) = respond.send_response(resp, false) else {
                        return;
                    };
                    let _ = body.send_data(Bytes::from_static(b"ok"), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = body.send_trailers(trailers);
                }
            });
        }
    });
    (addr, accepts)
}

fn h2_request(addr: SocketAddr) -> Request<'static> {
    Request {
        http2: true,
        ..get_request(addr, Duration::from_secs(60))
    }
}

#[tokio::test]
async fn a_refused_stream_is_unprocessed_and_a_pooled_connection_that_refuses_is_replaced() {
    let (addr, accepts) = h2_replica_refusing_on_its_first_connection().await;
    let s = stats();
    // A new connection that refuses: told apart as not processed (the proxy may send it
    // anywhere), nothing counted at the replica afterwards.
    let Err(e) = send(
        &h2_request(addr),
        &mut ProxyBody::Empty,
        InFlight::start(&s),
    )
    .await
    else {
        panic!("a refused stream was answered");
    };
    assert!(matches!(e, SendError::Unprocessed(_)), "{e}");
    assert_eq!(s.in_flight.load(Ordering::SeqCst), 0);
    // The same connection, pooled, refuses again: once more on a fresh one, which answers;
    // the replica's trailers come through.
    let resp = send(
        &h2_request(addr),
        &mut ProxyBody::Empty,
        InFlight::start(&s),
    )
    .await
    .expect("answered on a fresh connection");
    assert_eq!(resp.status(), 200);
    let whole = resp.into_body().collect().await.expect("body");
    assert_eq!(
        whole.trailers().map(|t| t["grpc-status"].clone()),
        Some(http::HeaderValue::from_static("0"))
    );
    assert_eq!(whole.to_bytes(), "ok");
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
    assert_eq!(
        s.in_flight.load(Ordering::SeqCst),
        0,
        "in flight until the body ended"
    );
}

#[tokio::test]
async fn streams_share_one_connection_and_a_connection_that_sent_goaway_gets_none() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let (goaway, _) = tokio::sync::broadcast::channel::<()>(1);
    let (counter, trigger) = (accepts.clone(), goaway.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut told = trigger.subscribe();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"hi")),
                    ))
                });
                let builder =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(s), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = told.recv() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    let s = stats();
    for _ in 0..5 {
        let resp = send(
            &h2_request(addr),
            &mut ProxyBody::Empty,
            InFlight::start(&s),
        )
        .await
        .expect("answered");
        assert_eq!(
            resp.into_body().collect().await.expect("body").to_bytes(),
            "hi"
        );
    }
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "one multiplexed connection"
    );
    // The replica says GOAWAY (a graceful shutdown): its connection takes no new stream.
    let _ = goaway.send(());
    let deadline = Instant::now() + Duration::from_secs(5);
    while POOLS.h2.take(addr, None).is_some_and(|c| c.is_open()) {
        assert!(Instant::now() < deadline, "the GOAWAY was never seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = send(
        &h2_request(addr),
        &mut ProxyBody::Empty,
        InFlight::start(&s),
    )
    .await
    .expect("answered on a new connection");
    assert_eq!(resp.status(), 200);
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}

/// An HTTP/2 replica (hyper's server, allowing 200 streams a connection) that answers "hi"
/// after `late`, so a burst's streams are all open at once; and its count of connections.
async fn late_h2_replica(late: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(late).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"hi")),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(200)
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    (addr, accepts)
}

/// `n` HTTP/2 requests to `addr` at once from one thread, each read to its end.
async fn burst_of(addr: SocketAddr, n: usize) {
    let s = stats();
    let burst = (0..n).map(|_| {
        let s = s.clone();
        async move {
            let req = h2_request(addr);
            let resp = send(&req, &mut ProxyBody::Empty, InFlight::start(&s))
                .await
                .expect("answered");
            resp.into_body().collect().await.expect("body").to_bytes()
        }
    });
    for body in futures_util::future::join_all(burst).await {
        assert_eq!(body, "hi");
    }
}

#[tokio::test]
async fn a_burst_on_a_cold_thread_makes_one_http2_connection_not_one_each() {
    let (addr, accepts) = late_h2_replica(Duration::from_millis(100)).await;
    burst_of(addr, 50).await;
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "one connection for the burst"
    );
}

/// Past the first connection's room the burst still waits for one connection at a time
/// instead of each request making its own: 250 streams at once are three connections of at
/// most [`h2::MAX_STREAMS_PER_CONN`] (the replica allows 200), not 151.
#[tokio::test]
async fn a_burst_past_one_connections_room_makes_the_next_connection_once() {
    let (addr, accepts) = late_h2_replica(Duration::from_millis(1500)).await;
    burst_of(addr, 250).await;
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        250usize.div_ceil(h2::MAX_STREAMS_PER_CONN),
        "one connection per {} streams",
        h2::MAX_STREAMS_PER_CONN
    );
}

/// A burst to a replica that refuses connections fails at once, every request of it: each
/// one that waited for a connection that could not be made tries in turn instead of waiting
/// out its connect timeout (a minute here, where the burst is given ten seconds).
#[tokio::test]
async fn a_burst_to_a_replica_that_refuses_fails_at_once_not_after_the_connect_timeout() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    }; // closed: connecting is refused
    let s = stats();
    let burst = (0..50).map(|_| {
        let s = s.clone();
        async move {
            let req = Request {
                connect_timeout: Duration::from_secs(60),
                ..h2_request(addr)
            };
            send(&req, &mut ProxyBody::Empty, InFlight::start(&s)).await
        }
    });
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(burst),
    )
    .await
    .expect("the burst waited out connect timeouts");
    for result in failed {
        match result {
            Err(SendError::Connect(_)) => {}
            Err(e) => panic!("a refused connection is a connect error, not {e:?}"),
            Ok(_) => panic!("answered by a replica that refuses connections"),
        }
    }
}

/// Past the connections a replica may keep, a request that finds none with room makes its
/// own at once: the connection it makes is not kept, so nobody waits for it.
#[tokio::test]
async fn past_the_connections_a_replica_may_keep_a_request_connects_alone() {
    let addr = silent_h2_replica().await;
    let conns = h2::Conns::default();
    for kept in 0..h2::MAX_CONNS_PER_REPLICA {
        match conns.turn(addr) {
            h2::Turn::Make(_) => {}
            _ => panic!("with {kept} kept, the next connection is one request's to make"),
        }
        let conn = h2::H2Conn::connect(addr, Duration::from_secs(5), None, Duration::from_secs(60))
            .await
            .expect("handshake");
        conns.keep(&conn);
    }
    assert!(
        matches!(conns.turn(addr), h2::Turn::Alone),
        "with {} kept, a request connects alone",
        h2::MAX_CONNS_PER_REPLICA
    );
}

/// The thread's sweep closes the idle connections whose replica closed them and keeps the
/// others; past the idle timeout it keeps none (an idle gateway does not hold what its last
/// burst opened).
#[tokio::test]
async fn the_sweep_closes_what_the_replica_closed_and_what_idled_too_long() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let pool = Arc::new(pool::Pool::default());
    let mut accepted = Vec::new();
    for _ in 0..3 {
        let mut conn = pool::Conn::connect(addr, Duration::from_secs(5), None)
            .await
            .expect("connect");
        accepted.push(listener.accept().await.expect("accept").0);
        pool.adopt(&mut conn);
        pool::put_back(conn);
    }
    assert_eq!(pool.sweep(), 3, "all three open and fresh");
    // The replica closes one of them; its end reaches the runtime's reactor.
    drop(accepted.remove(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.sweep() != 2 {
        assert!(Instant::now() < deadline, "the closed one is never swept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::pause();
    tokio::time::advance(pool::IDLE_TIMEOUT + Duration::from_secs(1)).await;
    assert_eq!(pool.sweep(), 0, "past the idle timeout none stays");
}

/// A replica that does the HTTP/2 handshake's part of a server (its SETTINGS) and then reads
/// and answers nothing more, as one that hung or sits behind a dead path would.
async fn silent_h2_replica() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
                let _ = s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_replica_that_answers_no_ping_has_its_connection_closed_after_one_interval_unanswered() {
    let addr = silent_h2_replica().await;
    let every = Duration::from_millis(200);
    let conn = h2::H2Conn::connect(addr, Duration::from_secs(5), None, every)
        .await
        .expect("handshake");
    assert!(conn.is_open());
    // A ping at the first interval, found unanswered at the second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.is_open() {
        assert!(
            Instant::now() < deadline,
            "a dead replica's connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_connection_every_handle_dropped_is_closed_at_once_not_at_its_next_ping() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (ended, mut told) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = ::h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let _ = respond.send_response(http::Response::new(()), true);
                }
                let _ = ended.send(());
            });
        }
    });
    // Pings an hour apart: only the last handle's going can close it soon.
    let hour = Duration::from_secs(3600);
    let conn = h2::H2Conn::connect(addr, Duration::from_secs(5), None, hour)
        .await
        .expect("handshake");
    let (opener, guard) = conn.clone().open_stream();
    let req = http::Request::get(format!("http://{addr}/"))
        .body(h2::SendBody::empty())
        .expect("request");
    let deadline = Instant::now() + Duration::from_secs(5);
    let resp = crate::wire::h2::exchange(opener, req, deadline)
        .await
        .expect("answered");
    assert_eq!(resp.status(), 200);
    drop((resp, guard));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), told.recv())
            .await
            .is_err(),
        "closed while a handle was left"
    );
    drop(conn);
    tokio::time::timeout(Duration::from_secs(5), told.recv())
        .await
        .expect("the connection stays open with no handle left");
}

#[tokio::test]
async fn a_request_body_still_coming_is_piped_on_and_reset_once_its_response_is_dropped() {
    use futures_util::StreamExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen, mut told) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut conn) = ::h2::server::handshake(s).await else {
            return;
        };
        let Some(Ok((req, mut respond))) = conn.accept().await else {
            return;
        };
        // Answers at once, before the request body ended, then reads the body.
        let _ = respond.send_response(http::Response::new(()), true);
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = req.into_body();
        while let Some(chunk) = body.data().await {
            let Ok(data) = chunk.map_err(|e| seen.send(format!("reset {:?}", e.reason()))) else {
                // A reset body says so again at every read.
                return;
            };
            let _ = seen.send(String::from_utf8_lossy(&data).into_owned());
        }
    });
    let conn = h2::H2Conn::connect(addr, Duration::from_secs(5), None, Duration::from_secs(60))
        .await
        .expect("handshake");
    // One part the client sent already, then nothing more for now.
    let first = futures_util::stream::once(async {
        Ok::<_, crate::error::BoxError>(hyper::body::Frame::data(Bytes::from_static(b"part")))
    });
    let body = http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()));
    let req = http::Request::post(format!("http://{addr}/upload"))
        .body(h2::SendBody::new(body))
        .expect("request");
    let (opener, guard) = conn.open_stream();
    let deadline = Instant::now() + Duration::from_secs(5);
    let resp = crate::wire::h2::exchange(opener, req, deadline)
        .await
        .expect("answered");
    assert_eq!(resp.status(), 200);
    let heard = tokio::time::timeout(Duration::from_secs(5), told.recv()).await;
    assert_eq!(heard.expect("the first part").as_deref(), Some("part"));
    // The gateway is done with the response: the body still coming is not sent on.
    drop((resp, guard));
    let heard = tokio::time::timeout(Duration::from_secs(5), told.recv()).await;
    assert_eq!(
        heard.expect("the stream's end").as_deref(),
        Some("reset Some(CANCEL)")
    );
}
