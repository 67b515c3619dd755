//! `ringgate-server`: the demo backend replica.
//!
//! `GET /home` → 200 `{"message": "Hello from Server: <SERVER_ID>", "status": "successful"}`,
//! `GET /heartbeat` → 200 with an empty body, `GET /ws` → a WebSocket echo that answers every
//! text message with `{"server": "<SERVER_ID>", "echo": "<text>"}` (binary messages echoed as
//! they are, pings answered), anything else → 404 failure JSON.
//! Environment: `SERVER_ID` (its name), `PORT` (default 5000; 0 picks a free one), `BIND`
//! (default 0.0.0.0). Once bound it prints `listening on http://ADDR` on stdout, once.
//! `RESPONSE_DELAY_MS` delays every `/home` answer (simulated work, for drain and timeout tests);
//! `GET /home?work_ms=N` delays that one answer by N ms instead (at most [`MAX_WORK`]: load
//! tests and the autoscaling benchmark vary the work per request).
//! With `RINGGATE_EXIT_ON_STDIN_EOF=1` it exits when its stdin closes: the process provider
//! uses that so a replica never outlives the gateway that started it, even a SIGKILLed one.
//!
//! gRPC over h2c on the same port (a request with `content-type: application/grpc*`; no code
//! generation: messages are encoded by hand, `Msg { string text = 1; }` in and
//! `Reply { string server = 1; string text = 2; }` out, service `ringgate.demo.Demo`):
//! `Who` (unary: its `SERVER_ID`, the text echoed, trailing metadata `x-server-id`; a text
//! `fail:<code>:<message>` answers that status, `sleep:<ms>` answers after that long),
//! `Count` (server streaming: `text` replies numbered 1 to the decimal `text`, `<n>/<ms>` with
//! `ms` between them), `Sum` (client streaming: how many messages came), `Chat` (bidirectional:
//! every message echoed as it comes), and `grpc.health.v1.Health/Check` (`SERVING` for `""` and
//! `ringgate.demo.Demo`, `NOT_FOUND` for other services).
//!
//! `ringgate-server --check` is its container health check (the image has no shell and no
//! curl): it GETs its own `/heartbeat` on `127.0.0.1:$PORT` and exits 0 on a 200, 1 otherwise.

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Every response's body: a whole one, or gRPC messages and trailers as they are made.
type Out = BoxBody<Bytes, Infallible>;

fn json(status: StatusCode, body: String) -> Response<Out> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn respond(server_id: &str, req: &Request<Incoming>) -> Response<Out> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/home") => json(
            StatusCode::OK,
            serde_json::json!({"message": format!("Hello from Server: {server_id}"), "status": "successful"})
                .to_string(),
        ),
        (&Method::GET | &Method::HEAD, "/heartbeat") => Response::new(Full::new(Bytes::new()).boxed()),
        (m, p) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"message": format!("<Error> {m} {p} is not served here: try GET /home or GET /heartbeat"), "status": "failure"})
                .to_string(),
        ),
    }
}

/// `GET /ws`: the handshake's answer (101, or 400 for a request that is no WebSocket
/// handshake); once hyper has switched the connection, the echo runs in a task of its own.
fn websocket(server_id: &Arc<str>, req: &mut Request<Incoming>) -> Response<Out> {
    let key = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY).cloned();
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|u| u.to_str().ok())
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let (Some(key), true) = (key, upgrade) else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"message": "<Error> GET /ws is a WebSocket: send Upgrade: websocket and Sec-WebSocket-Key", "status": "failure"}).to_string(),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    let id = server_id.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            echo(TokioIo::new(upgraded), id).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&accept) {
        h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// The echo: every text message answered with JSON naming this replica.
async fn echo<S>(io: S, server_id: Arc<str>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    while let Some(Ok(msg)) = ws.next().await {
        let answer = match msg {
            Message::Text(text) => {
                Message::Text(serde_json::json!({"server": &*server_id, "echo": text}).to_string())
            }
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            // Pings are answered by the library as the stream is read.
            _ => continue,
        };
        if ws.send(answer).await.is_err() {
            break;
        }
    }
}

/// The longest simulated work one request may ask for.
const MAX_WORK: std::time::Duration = std::time::Duration::from_secs(10);

/// The `work_ms` a `/home` request asks for, bounded; `None` without one (or unreadable).
fn work_of(req: &Request<Incoming>) -> Option<std::time::Duration> {
    let ms = req
        .uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("work_ms="))?
        .parse::<u64>()
        .ok()?;
    Some(std::time::Duration::from_millis(ms).min(MAX_WORK))
}

/// How long `--check` waits for the heartbeat.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /heartbeat` on `addr`: whether it answered 200, or why not.
fn check(addr: SocketAddr) -> Result<(), String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, CHECK_TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(CHECK_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(CHECK_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /heartbeat HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("no answer: {e}"))?;
    match &head {
        b"HTTP/1.1 200" | b"HTTP/1.0 200" => Ok(()),
        other => Err(format!("answered {:?}", String::from_utf8_lossy(other))),
    }
}

fn main() -> std::process::ExitCode {
    let server_id = std::env::var("SERVER_ID").unwrap_or_else(|_| "unknown".into());
    let port: u16 = match std::env::var("PORT").map(|p| p.parse()) {
        Err(_) => 5000,
        Ok(Ok(p)) => p,
        Ok(Err(_)) => {
            eprintln!("ringgate-server: PORT must be a number from 0 to 65535");
            return std::process::ExitCode::from(2);
        }
    };
    if std::env::args().nth(1).as_deref() == Some("--check") {
        return match check(SocketAddr::from(([127, 0, 0, 1], port))) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringgate-server --check: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let bind = std::env::var("BIND").unwrap_or_else(|_| "0.0.0.0".into());
    let addr: SocketAddr = match format!("{bind}:{port}").parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("ringgate-server: BIND must be an IP address, got {bind:?}");
            return std::process::ExitCode::from(2);
        }
    };
    if std::env::var("RINGGATE_EXIT_ON_STDIN_EOF").as_deref() == Ok("1") {
        std::thread::spawn(|| {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringgate-server: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(addr, Arc::from(server_id))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringgate-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr, server_id: Arc<str>) -> std::io::Result<()> {
    // The gateway's own backlog, not the standard library's 128: a gateway's burst
    // of new connections past the accept queue has its SYNs dropped, and each waits a second
    // for the retransmit, past a typical connect timeout.
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let local = listener.local_addr()?;
    ringgate::listening::announce(local)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = sigterm.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let id = server_id.clone();
        tokio::spawn(async move {
            let delay = std::env::var("RESPONSE_DELAY_MS")
                .ok()
                .and_then(|d| d.parse().ok())
                .map(std::time::Duration::from_millis);
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                if ringgate::grpc::is_grpc(req.headers()) {
                    return grpc::serve(id.clone(), req);
                }
                let ws = req.uri().path() == "/ws";
                let resp = if ws {
                    websocket(&id, &mut req)
                } else {
                    respond(&id, &req)
                };
                let slow = (req.uri().path() == "/home")
                    .then(|| work_of(&req).or(delay))
                    .flatten();
                futures_util::FutureExt::boxed(async move {
                    if ws {
                        return Ok::<_, Infallible>(resp);
                    }
                    if let Some(d) = slow {
                        tokio::time::sleep(d).await;
                    }
                    // Read (and discard) the request body before answering, so a client still
                    // uploading is not cut off mid-body.
                    let mut body = req.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                    Ok::<_, Infallible>(resp)
                })
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The demo's gRPC methods, by hand over hyper's HTTP/2 server.
mod grpc {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::{Buf, Bytes, BytesMut};
    use futures_util::future::BoxFuture;
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    use hyper::body::{Frame, Incoming};
    use hyper::{HeaderMap, Request, Response};
    use ringgate::grpc::{frame, Code};
    use tokio::sync::mpsc;

    use super::Out;

    type Answer = Result<Response<Out>, Infallible>;

    /// Answers one gRPC call.
    pub fn serve(id: Arc<str>, req: Request<Incoming>) -> BoxFuture<'static, Answer> {
        async move { Ok(call(id, req).await) }.boxed()
    }

    async fn call(id: Arc<str>, req: Request<Incoming>) -> Response<Out> {
        let path = req.uri().path().to_owned();
        let mut messages = Messages::new(req.into_body());
        match path.as_str() {
            "/ringgate.demo.Demo/Who" => {
                let text = messages
                    .next()
                    .await
                    .map(|m| text_of(&m))
                    .unwrap_or_default();
                who(&id, &text).await
            }
            "/ringgate.demo.Demo/Count" => {
                let text = messages
                    .next()
                    .await
                    .map(|m| text_of(&m))
                    .unwrap_or_default();
                count(id, &text)
            }
            "/ringgate.demo.Demo/Sum" => {
                let mut n = 0u64;
                while messages.next().await.is_some() {
                    n += 1;
                }
                unary(&id, &n.to_string())
            }
            "/ringgate.demo.Demo/Chat" => chat(id, messages),
            "/grpc.health.v1.Health/Check" => {
                let service = messages
                    .next()
                    .await
                    .map(|m| text_of(&m))
                    .unwrap_or_default();
                match service.as_str() {
                    "" | "ringgate.demo.Demo" => {
                        let (tx, body) = channel();
                        let _ = tx.try_send(Frame::data(frame(&[0x08, 1])));
                        let _ = tx.try_send(Frame::trailers(status(0, None)));
                        grpc_response(body)
                    }
                    other => trailers_only(5, &format!("unknown service {other}")),
                }
            }
            other => trailers_only(
                Code::Unimplemented as u8,
                &format!("{other} is not served here"),
            ),
        }
    }

    /// `Who`: the server's name, or the status or delay the text asks for.
    async fn who(id: &str, text: &str) -> Response<Out> {
        if let Some(rest) = text.strip_prefix("fail:") {
            let (code, message) = rest.split_once(':').unwrap_or((rest, ""));
            return trailers_only(code.parse().unwrap_or(2), message);
        }
        if let Some(ms) = text.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        unary(id, text)
    }

    /// One reply, then status 0 with `x-server-id` as trailing metadata.
    fn unary(id: &str, text: &str) -> Response<Out> {
        let (tx, body) = channel();
        let _ = tx.try_send(Frame::data(frame(&reply(id, text))));
        let _ = tx.try_send(Frame::trailers(status(0, Some(id))));
        grpc_response(body)
    }

    /// `Count`: replies numbered 1 to n, `ms` apart.
    fn count(id: Arc<str>, text: &str) -> Response<Out> {
        let (n, ms) = text.split_once('/').unwrap_or((text, "0"));
        let n: u64 = n.trim().parse().unwrap_or(0);
        let ms: u64 = ms.trim().parse().unwrap_or(0);
        let (tx, body) = channel();
        tokio::spawn(async move {
            for i in 1..=n {
                if i > 1 && ms > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if tx
                    .send(Frame::data(frame(&reply(&id, &i.to_string()))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Frame::trailers(status(0, Some(&id)))).await;
        });
        grpc_response(body)
    }

    /// `Chat`: every message echoed as it comes, then status 0 when the client is done.
    fn chat(id: Arc<str>, mut messages: Messages) -> Response<Out> {
        let (tx, body) = channel();
        tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let text = text_of(&m);
                if tx
                    .send(Frame::data(frame(&reply(&id, &text))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Frame::trailers(status(0, Some(&id)))).await;
        });
        grpc_response(body)
    }

    fn status(code: u8, server: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", u16::from(code).into());
        if let Some(v) = server.and_then(|s| s.parse().ok()) {
            h.insert("x-server-id", v);
        }
        h
    }

    fn trailers_only(code: u8, message: &str) -> Response<Out> {
        let mut r = Response::new(http_body_util::Empty::new().boxed());
        let h = r.headers_mut();
        h.insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", u16::from(code).into());
        if let Ok(m) = message.parse() {
            h.insert("grpc-message", m);
        }
        r
    }

    fn grpc_response(body: Out) -> Response<Out> {
        let mut r = Response::new(body);
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/grpc"),
        );
        r
    }

    /// A body fed by a channel: frames as they are sent, the end when the sender is dropped.
    fn channel() -> (mpsc::Sender<Frame<Bytes>>, Out) {
        let (tx, rx) = mpsc::channel(16);
        let body = http_body_util::StreamBody::new(ReceiverStream(rx));
        (tx, body.boxed())
    }

    struct ReceiverStream(mpsc::Receiver<Frame<Bytes>>);

    impl futures_util::Stream for ReceiverStream {
        type Item = Result<Frame<Bytes>, Infallible>;

        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    /// `Reply { server = 1, text = 2 }`.
    fn reply(server: &str, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(server.len() + text.len() + 6);
        for (tag, s) in [(0x0a, server), (0x12, text)] {
            out.push(tag);
            let mut n = s.len();
            while n >= 0x80 {
                out.push((n as u8) | 0x80);
                n >>= 7;
            }
            out.push(n as u8);
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    /// Field 1 of a message, as text (empty when it has none).
    fn text_of(msg: &[u8]) -> String {
        let mut rest = msg;
        while let Some((&key, after)) = rest.split_first() {
            let (len, after) = varint(after).unwrap_or((0, &[]));
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            match (key, after.get(..len)) {
                (0x0a, Some(v)) => return String::from_utf8_lossy(v).into_owned(),
                (k, Some(_)) if k & 7 == 2 => rest = &after[len..],
                _ => return String::new(),
            }
        }
        String::new()
    }

    fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
        let mut v = 0u64;
        for (i, &b) in buf.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some((v, &buf[i + 1..]));
            }
        }
        None
    }

    /// The gRPC messages of a request body, one by one.
    pub struct Messages {
        body: Incoming,
        buf: BytesMut,
        ended: bool,
    }

    impl Messages {
        fn new(body: Incoming) -> Messages {
            Messages {
                body,
                buf: BytesMut::new(),
                ended: false,
            }
        }

        async fn next(&mut self) -> Option<Bytes> {
            loop {
                if self.buf.len() >= 5 {
                    let len =
                        u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                    let len = usize::try_from(len).ok()?;
                    if self.buf.len() >= 5 + len {
                        self.buf.advance(5);
                        return Some(self.buf.split_to(len).freeze());
                    }
                }
                if self.ended {
                    return None;
                }
                match self.body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            self.buf.extend_from_slice(&d);
                        }
                    }
                    _ => self.ended = true,
                }
            }
        }
    }
}
