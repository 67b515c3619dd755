//! `ringgate-lab forward`: the floor of `make bench`. A proxy that does nothing but move bytes:
//! each client connection is paired, when it is accepted, with one connection to a backend
//! (round robin), and from then on every byte read on one side is written to the other. No HTTP
//! parsing, no hashing, no headers, no timers, no counters.
//!
//! It is built like the gateway's serving side (one current-thread tokio runtime per thread,
//! each with its own `SO_REUSEPORT` listener, TCP_NODELAY on both legs), so its CPU per request
//! is what those four socket operations per request (read the request, write it upstream, read
//! the response, write it back) and the runtime's event loop cost on this machine before any
//! proxy logic runs: no HTTP proxy built this way can go below it.
//!
//! Owns: nothing of the product; it only measures. Environment: `FORWARD_TO` (comma-separated
//! backend addresses), `THREADS` (default: one per CPU), `PORT` (0 picks one), `BIND` (default
//! 127.0.0.1); prints the `listening on` line like the product.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;

/// Runs the forwarder until killed.
pub fn run() -> Result<(), String> {
    let to: Vec<SocketAddr> = std::env::var("FORWARD_TO")
        .map_err(|_| "FORWARD_TO: set it to the backends' addresses, comma-separated".to_string())?
        .split(',')
        .filter(|a| !a.trim().is_empty())
        .map(|a| {
            a.trim()
                .parse()
                .map_err(|e| format!("FORWARD_TO {a:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if to.is_empty() {
        return Err("FORWARD_TO names no backend".into());
    }
    let threads = match std::env::var("THREADS") {
        Ok(t) => t.parse().map_err(|e| format!("THREADS {t:?}: {e}"))?,
        Err(_) => ringgate::gateway::serving_threads(),
    };
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|e| format!("PORT {p:?}: {e}"))?,
        Err(_) => 0,
    };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let addr: SocketAddr = format!("{bind}:{port}")
        .parse()
        .map_err(|e| format!("BIND/PORT: {e}"))?;

    // Bound here, so the port is known (and announced) before any thread serves; tokio's
    // `listen` registers the socket with a reactor, so one is entered for the binding.
    let binding = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let entered = binding.enter();
    let (listeners, addr) = ringgate::gateway::bind_reuseport(addr, threads)
        .map_err(|e| format!("bind {addr}: {e}"))?;
    drop(entered);
    ringgate::listening::announce(addr).map_err(|e| e.to_string())?;

    let to = Arc::new(to);
    let next = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let (to, next) = (to.clone(), next.clone());
            std::thread::spawn(move || serve_thread(listener, to, next))
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| "a forwarding thread panicked".to_string())??;
    }
    Ok(())
}

fn serve_thread(
    listener: std::net::TcpListener,
    to: Arc<Vec<SocketAddr>>,
    next: Arc<AtomicUsize>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let backend = to[next.fetch_add(1, Ordering::Relaxed) % to.len()];
            tokio::spawn(pair(client, backend));
        }
    })
}

/// Moves bytes between `client` and a new connection to `backend` until either side closes.
async fn pair(mut client: TcpStream, backend: SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
