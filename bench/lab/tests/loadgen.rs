//! The load generator against live backends on 127.0.0.1:0 (a real `ringgate-server` process
//! and a small in-test server): every request is recorded, the answering server is parsed from
//! the `/home` message, and the backends are stopped afterwards.
//!
//! `ringgate-server` is the product's binary from the same build (`make test` builds the
//! workspace's binaries first); the lab finds it with [`procs::product_binary`].

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ringgate_lab::loadgen::{self, KeyPlan, LoadConfig};
use ringgate_lab::procs;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A tiny `/home` backend in the shape of `ringgate-server`; stops when `stop` fires.
async fn backend(id: &'static str) -> std::io::Result<(String, oneshot::Sender<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| async move {
                            let resp = if req.uri().path() == "/home" {
                                Response::new(Full::new(Bytes::from(format!(
                                    r#"{{"message": "Hello from Server: {id}", "status": "successful"}}"#
                                ))))
                            } else {
                                let mut r = Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                                r
                            };
                            Ok::<_, Infallible>(resp)
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }
        }
    });
    Ok((format!("http://{addr}"), stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_every_request_and_the_answering_server() -> Result<(), Box<dyn std::error::Error>>
{
    let (base, stop) = backend("server-7").await?;
    let mut cfg = LoadConfig::new(format!("{base}/home"), 500, 8);
    cfg.keys = KeyPlan::Random6 { seed: 42 };
    cfg.timeout = Duration::from_secs(5);
    let report = loadgen::run(&cfg).await?;
    let summary = report.summary();
    assert_eq!(summary.total, 500);
    assert_eq!(summary.ok, 500);
    assert_eq!(summary.per_server.get("server-7"), Some(&500));
    let seqs: Vec<u64> = report.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..500).collect::<Vec<_>>());

    // A path the backend does not serve is recorded as a failure with its status.
    let cfg404 = LoadConfig::new(format!("{base}/nope"), 10, 2);
    let s = loadgen::run(&cfg404).await?.summary();
    assert_eq!(s.failed, 10);
    assert_eq!(s.errors.get("http 404"), Some(&10));

    let _ = stop.send(());
    Ok(())
}

/// A `ringgate-server` child on 127.0.0.1:0, killed on drop.
struct Backend(tokio::process::Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_ringgate_server_process() -> Result<(), Box<dyn std::error::Error>> {
    let child = tokio::process::Command::new(procs::product_binary("ringgate-server")?)
        .env("SERVER_ID", "server-42")
        .env("PORT", "0")
        .env("BIND", "127.0.0.1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut backend = Backend(child);
    let addr =
        procs::wait_listening(&mut backend.0, "ringgate-server", Duration::from_secs(10)).await?;

    let mut cfg = LoadConfig::new(format!("http://{addr}/home"), 300, 4);
    cfg.timeout = Duration::from_secs(5);
    let summary = loadgen::run(&cfg).await?.summary();
    assert_eq!(summary.ok, 300);
    assert_eq!(summary.per_server.get("server-42"), Some(&300));
    drop(backend);
    Ok(())
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() -> Result<(), Box<dyn std::error::Error>> {
    // Bind then drop to get a loopback port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = LoadConfig::new(format!("http://127.0.0.1:{port}/home"), 5, 1);
    cfg.timeout = Duration::from_secs(2);
    let s = loadgen::run(&cfg).await?.summary();
    assert_eq!(s.failed, 5);
    assert_eq!(s.errors.get("connect"), Some(&5));
    Ok(())
}
