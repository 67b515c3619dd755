//! The idle trim ([`ringgate::memory`]) on the real binary: a burst over connections that stay
//! open leaves freed memory interleaved with theirs; the gateway gives it back to the OS once
//! traffic is quiet, and never while requests keep coming.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{metric, Conf, GatewayProcess, OneConnection};

/// Connections opened for the burst and kept open to the end.
const BURST: usize = 300;

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Opens `n` connections, then sends one request on each at once and reads every response head;
/// the connections are returned open.
async fn burst(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(TcpStream::connect(addr).await.expect("connect"));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let request = format!("GET /home?id={i} HTTP/1.1\r\nHost: x\r\n\r\n");
        c.write_all(request.as_bytes()).await.expect("send");
    }
    for c in conns.iter_mut() {
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf))
                .await
                .expect("a response within 20 s")
                .expect("read");
            assert!(n > 0, "connection closed before the response");
            head.extend_from_slice(&buf[..n]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
    }
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_memory_goes_back_to_the_os_once_quiet_and_never_under_load() {
    let gw = GatewayProcess::start(&Conf {
        // The burst's connections stay open through the quiet phase.
        proxy: "header_read_timeout = \"60s\"\n".into(),
        ..Conf::default()
    });

    // Busy: a steady stream of requests (thousands per trim period), a burst in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, served, addr) = (stop.clone(), served.clone(), gw.addr);
        tokio::spawn(async move {
            let mut conn = OneConnection::open(addr).await;
            while !stop.load(Ordering::Relaxed) {
                let (code, _) = conn.get("/home?id=7").await;
                assert_eq!(code, 200);
                served.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let busy_until = Instant::now() + Duration::from_secs(12);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open = burst(gw.addr, BURST).await;
    tokio::time::sleep(busy_until.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    let busy = gw.metrics().await;
    let before = resident_kib(gw.pid());
    assert!(
        served.load(Ordering::Relaxed) > 1_000,
        "the load was too light to call busy: {} requests",
        served.load(Ordering::Relaxed)
    );
    assert_eq!(
        metric(&busy, "ringgate_memory_trims_total"),
        0.0,
        "the heap was trimmed while requests kept coming"
    );

    // Quiet: within a few trim periods the freed pages are released.
    let deadline = Instant::now() + Duration::from_secs(30);
    let quiet = loop {
        let m = gw.metrics().await;
        if metric(&m, "ringgate_memory_trims_total") >= 1.0 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let now = resident_kib(gw.pid());
    assert!(
        metric(&quiet, "ringgate_memory_trims_total") >= 1.0,
        "no trim within 30 s of quiet (resident {now} KiB, {before} KiB when the load stopped)\n{}",
        gw.log()
    );
    let trimmed = metric(&quiet, "ringgate_memory_trimmed_bytes_total");
    assert!(trimmed > 0.0, "the trim released nothing");
    assert!(
        now < before,
        "resident {now} KiB, not below the {before} KiB when the load stopped ({trimmed} bytes trimmed)"
    );
    // The connections the burst opened still work after the trim.
    for (i, mut c) in open.into_iter().enumerate().step_by(50) {
        let request = format!("GET /home?id={i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(request.as_bytes())
            .await
            .expect("send after the trim");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("HTTP/1.1 200"), "{text}");
    }
}
