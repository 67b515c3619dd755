//! `ringgate-lab backend`: the lightest HTTP/1.1 backend we can make, for `make bench`, so the
//! proxies in front of it are the bottleneck. One thread; every request head (a GET without a
//! body, as the benchmark sends) gets the same `ringgate-server`-shaped `/home` answer, in order,
//! pipelined requests answered in one write.
//!
//! Owns: nothing of the product; it only serves the benchmark. Environment: `SERVER_ID`, `PORT`
//! (0 picks one), `BIND` (default 127.0.0.1); prints the `listening on` line like the product.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs the backend until killed.
pub fn run() -> Result<(), String> {
    let id = std::env::var("SERVER_ID").unwrap_or_else(|_| "backend".into());
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let addr: SocketAddr = format!("{bind}:{port}")
        .parse()
        .map_err(|e| format!("BIND/PORT: {e}"))?;
    let body = format!("{{\"message\": \"Hello from Server: {id}\", \"status\": \"successful\"}}");
    let response: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        ringgate::listening::announce(local).map_err(|e| e.to_string())?;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut filled = 0;
                let mut out = Vec::with_capacity(4096);
                loop {
                    let n = match s.read(&mut buf[filled..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    filled += n;
                    let mut start = 0;
                    while let Some(end) =
                        buf[start..filled].windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        out.extend_from_slice(response);
                        start += end + 4;
                    }
                    buf.copy_within(start..filled, 0);
                    filled -= start;
                    if filled == buf.len() {
                        return; // a head larger than the buffer: not what the benchmark sends
                    }
                    if !out.is_empty() {
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
            });
        }
    })
}
