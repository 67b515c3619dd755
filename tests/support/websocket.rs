//! WebSocket clients for the tunnel tests: a raw one (frames written and read by hand, for the
//! cases a library hides: a client that stops reading, a half-close, exact close frames), and
//! the driver of `tests/clients/ws_tunnels.py`, which opens many tunnels with the real Python
//! `websockets` library.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a WebSocket to `path` on `addr` by hand; returns the connection and the response head
/// (whatever the status).
pub async fn open(addr: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = open_on(&mut s, path, extra).await;
    (s, head)
}

/// Opens a WebSocket to `path` on the connection `s` (a TLS one, say); returns the response
/// head (whatever the status).
pub async fn open_on<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
    extra: &str,
) -> String {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response head within 10 s")
            .expect("read");
        assert!(
            n == 1,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The status code of a response head.
pub fn status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Writes one masked frame (as a client must).
pub async fn send<S: AsyncWrite + Unpin>(
    s: &mut S,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    s.write_all(&frame(opcode, payload)).await
}

/// A masked client frame.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one (unmasked, server) frame: its opcode and payload; `None` at the end of the stream.
pub async fn read<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.ok()?;
            u64::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.ok()?;
            u64::from_be_bytes(l)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[0] & 0x0f, payload))
}

/// Sends a text message and returns the server that echoed it (`ringgate-server`'s `/ws`).
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, text: &str) -> Option<String> {
    send(s, 0x1, text.as_bytes()).await.ok()?;
    let (op, payload) = tokio::time::timeout(Duration::from_secs(10), read(s))
        .await
        .ok()??;
    if op != 0x1 {
        return None;
    }
    let v: Value = serde_json::from_slice(&payload).ok()?;
    assert_eq!(v["echo"], text, "the echo of what was sent");
    v["server"].as_str().map(str::to_owned)
}

/// The close code of a close frame's payload.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// `tests/clients/ws_tunnels.py` running: tunnels opened with Python's `websockets`.
pub struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Driver {
    /// Opens `n` tunnels to `ws_base` (`ws://host:port`) for ids `<prefix>0..n`.
    pub fn start(python: &Path, ws_base: &str, n: usize, prefix: &str) -> Driver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ws_tunnels.py");
        let mut child = Command::new(python)
            .arg(script)
            .args([ws_base, &n.to_string(), "--prefix", prefix])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the websockets driver");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Driver {
            child,
            stdin,
            lines,
        }
    }

    /// Its next report (one JSON line), within `within`.
    pub fn next(&mut self, within: Duration) -> Value {
        let line = self.lines.recv_timeout(within).unwrap_or_else(|e| {
            panic!("the websockets driver said nothing within {within:?}: {e}")
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("command the driver");
        stdin.flush().expect("flush");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
