//! TLS termination against the real gateway binary over real sockets: curl (HTTP/1.1 and
//! HTTP/2 by ALPN), Python's `ssl` and a rustls client get the replica's answer; SNI picks the
//! certificate; a certificate swapped under load fails no request and serves new handshakes;
//! bad certificate files change nothing and say why; plain HTTP and silence on the TLS port are
//! answered or closed, never hung; the plain listener redirects, or is off. Certificates come
//! from a CA generated in the test.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::backends::{Backend, Behaviour};
use support::tls::{self as t, Pki};
use support::{get, json, metric, raw, Conf, GatewayProcess, GATEWAY_BIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs a program and returns its exit status and stdout (stderr appended on failure).
async fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} hung"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

/// Python's `ssl` client: one `GET /home?id=7` with SNI `sni` ("-" for none; a leading "!" skips
/// the host-name check but still verifies the chain), TLS up to `max_version`. Prints
/// `version|common name|status line`.
const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
port, cafile, sni, maxv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
if maxv == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
if sni == "-":
    ctx.check_hostname = False
    sni = None
elif sni.startswith("!"):
    ctx.check_hostname = False
    sni = sni[1:]
with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(b"GET /home?id=7 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ssl.SSLEOFError:
            pass
        cn = dict(x[0] for x in s.getpeercert()["subject"]).get("commonName")
        print(s.version(), cn, data.split(b"\r\n")[0].decode(), sep="|")
"#;

async fn python(port: u16, ca: &str, sni: &str, max_version: &str) -> String {
    let port = port.to_string();
    let (ok, out) = run(
        "python3",
        &["-c", PYTHON_CLIENT, &port, ca, sni, max_version],
    )
    .await;
    assert!(ok, "python ssl client failed: {out}");
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_python_and_rustls_get_the_replica_over_tls_with_the_certificate_sni_names() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let main = pki.install("gw", &pki.issue("gw", &["localhost", "gw.test"]));
    let shop = pki.install("shop", &pki.issue("shop", &["*.shop.test"]));
    let echo = Backend::start("127.0.0.1", Behaviour::Echo).await;
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"echo\", address = \"{}\" }}]\n",
            echo.addr
        ),
        tls: t::section(&[main, shop], ""),
        log: format!(
            "access = \"{}\"\n",
            certs.path().join("access.log").display()
        ),
        ..Conf::default()
    });
    let tls = gw.tls_addr();
    let port = tls.port().to_string();
    let ca = pki.ca_path().display().to_string();
    let url = format!("https://localhost:{port}/home?id=1");

    // curl, HTTP/1.1 and HTTP/2 (chosen by ALPN); the replica sees X-Forwarded-Proto: https.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (ok, out) = run(
            "curl",
            &[
                "-sS",
                flag,
                "--cacert",
                &ca,
                "-w",
                "\n%{http_code} %{http_version}",
                &url,
            ],
        )
        .await;
        assert!(ok, "curl {flag}: {out}");
        assert!(out.ends_with(&format!("\n200 {version}")), "{flag}: {out}");
        assert!(out.contains("x-forwarded-proto: https"), "{out}");
        assert!(out.contains("get /home?id=1 http/1.1"), "{out}");
    }
    // Plain HTTP beside it still says http.
    let (code, body) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("x-forwarded-proto: http\r\n"), "{body}");
    // The access log tells the HTTPS requests from the plain one.
    let log = certs.path().join("access.log");
    // A line is written when its response ends, so the order of the lines need not be the
    // order of the requests: compare the schemes as a multiset.
    let mut schemes = wait_for_lines(&log, 3).await;
    schemes.sort();
    assert_eq!(
        schemes,
        ["http", "https", "https"].map(String::from).to_vec(),
        "the scheme of each logged request"
    );

    // Python's ssl, TLS 1.3 and 1.2.
    assert_eq!(
        python(tls.port(), &ca, "localhost", "1.3").await,
        "TLSv1.3|gw|HTTP/1.1 200 OK"
    );
    assert_eq!(
        python(tls.port(), &ca, "localhost", "1.2").await,
        "TLSv1.2|gw|HTTP/1.1 200 OK"
    );

    // SNI: a wildcard name gets its certificate; no SNI, or a name nobody has, the default.
    assert_eq!(
        python(tls.port(), &ca, "!www.shop.test", "1.3").await,
        "TLSv1.3|shop|HTTP/1.1 200 OK"
    );
    assert_eq!(
        python(tls.port(), &ca, "-", "1.3").await,
        "TLSv1.3|gw|HTTP/1.1 200 OK"
    );
    assert_eq!(
        python(tls.port(), &ca, "!nobody.test", "1.3").await,
        "TLSv1.3|gw|HTTP/1.1 200 OK"
    );
    let resolve = format!("api.shop.test:{port}:127.0.0.1");
    let (ok, out) = run(
        "curl",
        &[
            "-sS",
            "--resolve",
            &resolve,
            "--cacert",
            &ca,
            "-w",
            "\n%{http_code}",
            &format!("https://api.shop.test:{port}/home?id=2"),
        ],
    )
    .await;
    assert!(
        ok && out.ends_with("\n200"),
        "curl verifies the shop certificate: {out}"
    );
    let client = t::client_config(&pki.ca_pem(), &[b"http/1.1"]);
    let a = t::get(tls, "gw.test", "/home?id=3", &client)
        .await
        .expect("rustls client");
    assert_eq!((a.status, a.cn.as_str()), (200, "gw"), "{}", a.body);

    // The certificates in /lb/status and /lb/metrics.
    let status = gw.status().await;
    let certs = status["tls"]["certificates"]
        .as_array()
        .expect("certificates");
    assert_eq!(certs.len(), 2, "{status:#}");
    assert_eq!(certs[0]["subject"], "CN=gw");
    assert_eq!(certs[0]["default"], true);
    assert_eq!(certs[1]["dns_names"][0], "*.shop.test");
    let left = certs[0]["expires_in_seconds"].as_i64().expect("expiry");
    assert!((28 * 86_400..=30 * 86_400).contains(&left), "{left}");
    assert!(status["tls"]["last_error"].is_null(), "{status:#}");
    let m = gw.metrics().await;
    let expiry = m
        .lines()
        .find(|l| {
            l.starts_with("ringgate_tls_certificate_expiry_seconds{") && l.contains("CN=shop")
        })
        .expect("an expiry gauge per certificate");
    assert!(expiry.contains("names=\"*.shop.test\""), "{expiry}");
    assert!(metric(&m, "ringgate_tls_handshakes_total") >= 9.0, "{m}");
}

/// The CN a new handshake sees, and whether its request was answered.
/// The `scheme` of the first `n` lines for `/home…` of the JSON access log at `path` (the
/// writer thread flushes about every 100 ms; the wait is bounded at 10 s).
async fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(|v: &serde_json::Value| {
                v["path"].as_str().is_some_and(|p| p.starts_with("/home"))
            })
            .collect();
        if parsed.len() >= n || Instant::now() > deadline {
            // Lines of different serving threads come in batches: order by arrival time.
            parsed.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
            return parsed
                .iter()
                .take(n)
                .map(|v| v["scheme"].as_str().unwrap_or("?").to_string())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn handshake_cn(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> String {
    let a = t::get(addr, "localhost", "/home?id=9", config)
        .await
        .expect("a new handshake");
    assert_eq!(a.status, 200, "{}", a.body);
    a.cn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_swapped_under_load_fails_no_request_and_new_handshakes_get_it() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let pair = pki.install("gw", &pki.issue("old", &["localhost"]));
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 2\n".into(),
        tls: t::section(&[pair], ""),
        ..Conf::default()
    });
    let addr = gw.tls_addr();
    let config = t::client_config(&pki.ca_pem(), &[b"http/1.1"]);
    assert_eq!(handshake_cn(addr, &config).await, "old");

    let stop = Arc::new(AtomicBool::new(false));
    // Stops the load also when an assertion fails, so a failing test ends instead of spinning.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = {
        let (ok, failed, failures) = (ok.clone(), failed.clone(), failures.clone());
        move |r: Result<(), String>| match r {
            Ok(()) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = failures.lock() {
                    f.push(e);
                }
            }
        }
    };
    let mut tasks = Vec::new();
    // Kept-alive clients: one connection each for the whole run.
    for k in 0..4 {
        let (stop, config, record) = (stop.clone(), config.clone(), record.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = t::Connection::open(addr, "localhost", &config)
                .await
                .expect("keep-alive connection");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = conn
                    .get(&format!("/home?id={}", k * 100_000 + i))
                    .await
                    .and_then(|(code, body)| {
                        (code == 200).then_some(()).ok_or(format!("{code} {body}"))
                    });
                let broken = r.is_err();
                record(r);
                if broken {
                    break; // counted; a broken connection cannot carry more
                }
            }
            conn.cn
        }));
    }
    // New handshakes: a connection per request; each notes the certificate it got.
    let seen_new = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut handshakes = Vec::new();
    for _ in 0..2 {
        let (stop, config, record, seen_new) = (
            stop.clone(),
            config.clone(),
            record.clone(),
            seen_new.clone(),
        );
        handshakes.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match t::get(addr, "localhost", "/home?id=5", &config).await {
                    Ok(a) if a.status == 200 => {
                        record(Ok(()));
                        if a.cn == "new" {
                            if let Ok(mut s) = seen_new.lock() {
                                s.get_or_insert_with(Instant::now);
                            }
                        }
                    }
                    Ok(a) => record(Err(format!("{} {}", a.status, a.body))),
                    Err(e) => record(Err(e)),
                }
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let swapped = Instant::now();
    pki.install("gw", &pki.issue("new", &["localhost"]));
    let deadline = swapped + Duration::from_secs(10);
    let took = loop {
        if let Some(at) = seen_new.lock().ok().and_then(|s| *s) {
            break at.duration_since(swapped);
        }
        assert!(
            Instant::now() < deadline,
            "no new handshake got the new certificate within 10 s\nlog:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("new handshakes got the new certificate {took:?} after the rename");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let cn = t.await.expect("keep-alive task");
        assert_eq!(cn, "old", "an established connection keeps its certificate");
    }
    let mut new_connections = 0;
    for h in handshakes {
        new_connections += h.await.expect("handshake task");
    }
    let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests: {failures:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "the load ran");
    assert!(new_connections > 4, "new handshakes ran: {new_connections}");
    assert_eq!(handshake_cn(addr, &config).await, "new");
    let status = gw.status().await;
    assert_eq!(status["tls"]["certificates"][0]["subject"], "CN=new");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "ringgate_tls_certificate_reloads_total"), 1.0);
    assert_eq!(
        metric(&m, "ringgate_tls_certificate_reload_errors_total"),
        0.0
    );
}

/// Waits until `/lb/status` shows a TLS error containing `what`.
async fn wait_rejected(gw: &GatewayProcess, what: &str) -> String {
    let s = gw
        .wait_status(Duration::from_secs(10), what, |s| {
            s["tls"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(what))
        })
        .await;
    s["tls"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_rejected_with_a_clear_error_and_change_nothing() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let first = pki.issue("first", &["localhost"]);
    let (cert, key) = pki.install("gw", &first);
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        tls: t::section(&[(cert.clone(), key.clone())], ""),
        ..Conf::default()
    });
    let addr = gw.tls_addr();
    let config = t::client_config(&pki.ca_pem(), &[b"http/1.1"]);

    // A key that is not the certificate's (written in place).
    let other = pki.issue("other", &["localhost"]);
    std::fs::write(&key, &other.key).expect("write key");
    let e = wait_rejected(&gw, "does not belong to the certificate").await;
    assert!(e.contains("gw.key") && e.contains("gw.crt"), "{e}");
    assert_eq!(handshake_cn(addr, &config).await, "first");
    t::replace(&key, first.key.as_bytes());
    gw.wait_status(Duration::from_secs(10), "error cleared", |s| {
        s["tls"]["last_error"].is_null()
    })
    .await;

    // A certificate cut off half-way.
    t::replace(&cert, &first.cert.as_bytes()[..first.cert.len() / 2]);
    let e = wait_rejected(&gw, "broken PEM").await;
    assert!(e.contains("has no -----END CERTIFICATE----- line"), "{e}");
    assert_eq!(handshake_cn(addr, &config).await, "first");

    // An expired certificate with its own key.
    let expired = pki.issue_valid("expired", &["localhost"], -30, -1);
    pki.install("gw", &expired);
    let e = wait_rejected(&gw, "expired at").await;
    assert!(e.contains("CN=expired") && e.contains("renew it"), "{e}");
    assert_eq!(handshake_cn(addr, &config).await, "first");
    let m = gw.metrics().await;
    assert!(
        metric(&m, "ringgate_tls_certificate_reload_errors_total") >= 3.0,
        "{m}"
    );
    assert_eq!(metric(&m, "ringgate_tls_certificate_edit_rejected"), 1.0);
    assert_eq!(
        gw.status().await["tls"]["certificates"][0]["subject"],
        "CN=first",
        "nothing changed"
    );
    assert!(gw.log().contains("TLS certificate edit rejected"));

    // `ringgate check` says the same about the files as they are now.
    let (ok, out) = run(
        GATEWAY_BIN,
        &["check", "--config", &gw.config_path.display().to_string()],
    )
    .await;
    assert!(!ok && out.contains("expired at"), "{out}");

    // A valid pair again: applied, error cleared.
    pki.install("gw", &pki.issue("fixed", &["localhost"]));
    gw.wait_status(Duration::from_secs(10), "fixed applied", |s| {
        s["tls"]["certificates"][0]["subject"] == "CN=fixed" && s["tls"]["last_error"].is_null()
    })
    .await;
    assert_eq!(handshake_cn(addr, &config).await, "fixed");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "ringgate_tls_certificate_edit_rejected"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_silence_and_garbage_on_the_tls_port_are_answered_or_closed_never_hung() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let pair = pki.install("gw", &pki.issue("gw", &["localhost"]));
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "header_read_timeout = \"1s\"\n".into(),
        tls: t::section(&[pair], ""),
        ..Conf::default()
    });
    let addr = gw.tls_addr();

    let (code, body) = raw(
        addr,
        b"GET /home HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let message = json(&body)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("this port speaks HTTPS") && message.contains("https://localhost:"),
        "{message}"
    );
    // Without Connection: close as well: answered, then closed.
    let (code, _) = raw(addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(code, 400);

    // Silence, half a ClientHello, and bytes that are neither: each is closed by the gateway.
    for (what, bytes) in [
        ("silence", &b""[..]),
        ("half a ClientHello", &b"\x16\x03\x01\x02\x00\x01"[..]),
        ("garbage", &b"\x00\x01\x02\x03\xff\xfe"[..]),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(bytes).await.expect("send");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "{what}: the gateway kept the connection open"
        );
    }
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "ringgate_tls_handshake_failures_total{reason=\"plain_http\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "ringgate_tls_handshake_failures_total{reason=\"timeout\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "ringgate_tls_handshake_failures_total{reason=\"error\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "ringgate_connections_timed_out_total{phase=\"first_bytes\"}"
        ) >= 2.0
    );
    // Counted, never logged per attempt above debug.
    let log = gw.log();
    assert!(
        !log.lines().any(|l| (l.contains(" INFO ")
            || l.contains(" WARN ")
            || l.contains(" ERROR "))
            && (l.contains("handshake") || l.contains("plain HTTP"))),
        "{log}"
    );

    // The TLS port still serves.
    let config = t::client_config(&pki.ca_pem(), &[b"h2", b"http/1.1"]);
    assert_eq!(handshake_cn(addr, &config).await, "gw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_caps_apply_to_tls_connections() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let pair = pki.install("gw", &pki.issue("gw", &["localhost"]));
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "max_connections_per_ip = 1\n".into(),
        tls: t::section(&[pair], ""),
        ..Conf::default()
    });
    let addr = gw.tls_addr();
    let config = t::client_config(&pki.ca_pem(), &[b"http/1.1"]);
    // From 127.0.0.2, so the test's own admin calls from 127.0.0.1 are not capped.
    let from = "127.0.0.2";
    let mut held = t::Connection::open_from(from, addr, "localhost", &config)
        .await
        .expect("first connection");
    assert_eq!(held.get("/home?id=1").await.expect("served").0, 200);
    let second = t::get_from(from, addr, "localhost", "/home?id=2", &config).await;
    assert!(
        second.is_err(),
        "a second connection from {from} is refused"
    );
    assert_eq!(held.get("/home?id=3").await.expect("still served").0, 200);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if t::get_from(from, addr, "localhost", "/home?id=4", &config)
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics().await;
    assert!(metric(&m, "ringgate_connections_refused_total{reason=\"per_ip\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_or_off_and_a_bad_certificate_stops_the_start() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let pair = pki.install("gw", &pki.issue("gw", &["localhost"]));
    let ca = pki.ca_path().display().to_string();

    // Redirect: everything but /lb/ goes to https:// on the TLS port, method kept (308).
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        tls: t::section(std::slice::from_ref(&pair), "http = \"redirect\"\n"),
        ..Conf::default()
    });
    let tls_port = gw.tls_addr().port();
    let (ok, out) = run(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &format!("http://localhost:{}/home?id=1", gw.addr.port()),
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(out, format!("308 https://localhost:{tls_port}/home?id=1"));
    let (ok, out) = run(
        "curl",
        &[
            "-sS",
            "-L",
            "--cacert",
            &ca,
            &format!("http://localhost:{}/home?id=1", gw.addr.port()),
        ],
    )
    .await;
    assert!(ok && out.contains("Hello from Server"), "followed: {out}");
    let (code, _) = get(&gw.url("/lb/health")).await;
    assert_eq!(code, 200, "the gateway's own endpoints stay on plain HTTP");
    drop(gw);

    // HTTPS only.
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        tls: t::section(std::slice::from_ref(&pair), "http = \"off\"\n"),
        ..Conf::default()
    });
    assert_eq!(gw.tls_addr(), gw.addr, "the only listener is the TLS one");
    let (ok, out) = run(
        "curl",
        &[
            "-sS",
            "--cacert",
            &ca,
            &format!("https://localhost:{}/home?id=1", gw.addr.port()),
        ],
    )
    .await;
    assert!(ok && out.contains("Hello from Server"), "{out}");
    drop(gw);

    // A gateway does not start on a key that is not its certificate's: exit 2, the reason said.
    let other = pki.issue("other", &["localhost"]);
    std::fs::write(&pair.1, &other.key).expect("write key");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lb.toml");
    let conf = Conf {
        tls: t::section(&[pair], ""),
        ..Conf::default()
    };
    std::fs::write(&config, conf.render()).expect("config");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(GATEWAY_BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("serve exits")
    .expect("run ringgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );
}

/// A replica that speaks HTTPS: echoes the request head (lower-cased) like
/// [`Behaviour::Echo`], answers `/heartbeat`, keeps connections alive; counts the TLS
/// connections whose first request is not a health check. It offers no ALPN protocol.
async fn https_replica(issued: &t::Issued) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    https_replica_alpn(issued, &[]).await
}

/// [`https_replica`] choosing among the ALPN protocols `alpn` (none: it selects none).
async fn https_replica_alpn(
    issued: &t::Issued,
    alpn: &[&[u8]],
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_slice_iter(issued.cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("replica chain");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key.as_bytes())
        .expect("replica key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("replica certificate");
    let mut config = config;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxied = Arc::new(AtomicU64::new(0));
    let counter = proxied.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counter) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut first = true;
                loop {
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 8192];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&got).to_lowercase();
                    let heartbeat = head.starts_with("get /heartbeat");
                    if first && !heartbeat {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    first = false;
                    let body = if heartbeat { String::new() } else { head };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, proxied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_speak_https_are_proxied_and_checked_over_verified_tls() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let (addr, proxied) = https_replica(&pki.issue("replica", &["127.0.0.1"])).await;
    let conf = |ca: &std::path::Path| {
        Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"tls-replica\", address = \"{addr}\" }}]\nupstream_tls = true\nupstream_ca = \"{}\"\n",
            ca.display()
        ),
        health: "interval = \"500ms\"\n".into(),
        ..Conf::default()
    }
    };
    let gw = GatewayProcess::start(&conf(&pki.ca_path()));
    gw.wait_status(Duration::from_secs(10), "the replica is up", |s| {
        s["up"] == 1
    })
    .await;
    for i in 0..20 {
        let (code, body) = get(&gw.url(&format!("/home?id={i}"))).await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains(&format!("get /home?id={i} http/1.1")),
            "{body}"
        );
    }
    assert!(
        proxied.load(Ordering::SeqCst) <= 2,
        "kept-alive TLS connections are reused: {} opened for 20 requests",
        proxied.load(Ordering::SeqCst)
    );

    // A CA that did not sign the replica's certificate: never up, and the check says why.
    let other = tempfile::tempdir().expect("temp dir");
    let stranger = Pki::new(other.path());
    let gw = GatewayProcess::start(&conf(&stranger.ca_path()));
    let status = gw
        .wait_status(Duration::from_secs(10), "a failed check", |s| {
            support::replica(s, "tls-replica")["last_probe"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS handshake"))
        })
        .await;
    assert_eq!(status["up"], 0, "{status:#}");
    let (code, body) = get(&gw.url("/home?id=1")).await;
    assert!(code == 503 || code == 502, "{code} {body}");
}

/// The config `gw` runs with, its `upstream_ca` set to `ca`.
fn with_upstream_ca(gw: &GatewayProcess, ca: &std::path::Path) -> String {
    let text = std::fs::read_to_string(&gw.config_path).expect("read the config");
    let line = text
        .lines()
        .find(|l| l.starts_with("upstream_ca = "))
        .expect("an upstream_ca line")
        .to_owned();
    text.replace(&line, &format!("upstream_ca = \"{}\"", ca.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_ca_edit_applies_live_to_new_connections_and_checks_and_a_bad_one_changes_nothing(
) {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let (addr, proxied) = https_replica(&pki.issue("replica", &["127.0.0.1"])).await;
    let other = tempfile::tempdir().expect("temp dir");
    let stranger = Pki::new(other.path());
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"tls-replica\", address = \"{addr}\" }}]\nupstream_tls = true\nupstream_ca = \"{}\"\n",
            pki.ca_path().display()
        ),
        health: "interval = \"300ms\"\nrise = 1\nfall = 2\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(10), "the replica is up", |s| {
        s["up"] == 1
    })
    .await;
    for i in 0..5 {
        let (code, body) = get(&gw.url(&format!("/home?id={i}"))).await;
        assert_eq!(code, 200, "{body}");
    }
    let kept = proxied.load(Ordering::SeqCst);

    // A CA file with no certificate in it: the edit is rejected whole and says why; the client
    // in force stays (requests and checks pass).
    let garbage = certs.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    std::fs::write(&gw.config_path, with_upstream_ca(&gw, &garbage)).expect("edit");
    let s = gw
        .wait_status(Duration::from_secs(10), "the bad CA rejected", |s| {
            s["config"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("provider.upstream_ca"))
        })
        .await;
    let error = s["config"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("garbage.pem") && error.contains("no PEM certificate"),
        "{error}"
    );
    assert_eq!(
        s["config"]["restart_needed"],
        serde_json::json!([]),
        "{s:#}"
    );
    let (code, body) = get(&gw.url("/home?id=7")).await;
    assert_eq!(code, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(gw.status().await["up"], 1, "checks still pass");

    // A CA that did not sign the replica's certificate: applied without a restart. The next
    // request needs a new connection (the pooled ones were made by the old client) and its
    // handshake fails; the checks fail the same way and say so.
    std::fs::write(&gw.config_path, with_upstream_ca(&gw, &stranger.ca_path())).expect("edit");
    gw.wait_status(Duration::from_secs(10), "the edit applied", |s| {
        s["config"]["last_error"].is_null()
    })
    .await;
    let (code, body) = get(&gw.url("/home?id=8")).await;
    assert!(code == 502 || code == 503, "{code} {body}");
    let s = gw
        .wait_status(Duration::from_secs(10), "failed checks", |s| {
            s["up"] == 0
                && support::replica(s, "tls-replica")["last_probe"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("TLS handshake"))
        })
        .await;
    assert_eq!(
        s["config"]["restart_needed"],
        serde_json::json!([]),
        "{s:#}"
    );
    assert_eq!(
        proxied.load(Ordering::SeqCst),
        kept,
        "no request reached the replica under the stranger's CA"
    );

    // The right CA again: checks pass, the replica is back, requests reach it.
    std::fs::write(&gw.config_path, with_upstream_ca(&gw, &pki.ca_path())).expect("edit");
    gw.wait_status(Duration::from_secs(10), "the replica is back", |s| {
        s["up"] == 1 && s["config"]["last_error"].is_null()
    })
    .await;
    let (code, body) = get(&gw.url("/home?id=9")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("get /home?id=9 http/1.1"), "{body}");
}

/// A gRPC call (`Who`, no message) to the gateway over h2c: its status fields.
async fn h2c_grpc_call(gw: &GatewayProcess) -> http::HeaderMap {
    let (mut send, _conn) = support::h2c(gw.addr).await;
    let req = http::Request::post(format!("http://{}/ringgate.demo.Demo/Who", gw.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\x00\x00\x00\x00\x00",
        )))
        .expect("request");
    let resp = send.send_request(req).await.expect("a response");
    assert_eq!(resp.status(), 200);
    resp.headers().clone()
}

/// `GET <path>` to the gateway over h2c (an HTTP/2 client): the status and the body.
async fn h2c_get(gw: &GatewayProcess, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let (mut send, _conn) = support::h2c(gw.addr).await;
    let req = http::Request::get(gw.url(path))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("a response");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("a body").to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_replica_that_does_not_choose_h2_gets_http1_requests_and_grpc_calls_a_clear_status() {
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    // A replica that selects no ALPN protocol (HTTP/1.1 by RFC 7301's default), and one that
    // selects http/1.1; under "h2c" (every request) and "match" (an HTTP/2 client's).
    for (alpn, named) in [
        (&[][..], "no ALPN protocol"),
        (&[&b"http/1.1"[..]][..], "http/1.1"),
    ] {
        for protocol in ["h2c", "match"] {
            let (addr, _) = https_replica_alpn(&pki.issue("replica", &["127.0.0.1"]), alpn).await;
            let gw = GatewayProcess::start(&Conf {
                kind: Some("static".into()),
                provider: format!(
                    "servers = [{{ name = \"tls-replica\", address = \"{addr}\" }}]\nupstream_tls = true\nupstream_ca = \"{}\"\n",
                    pki.ca_path().display()
                ),
                proxy: format!("upstream_protocol = \"{protocol}\"\n"),
                health: "interval = \"300ms\"\nrise = 1\n".into(),
                ..Conf::default()
            });
            gw.wait_status(Duration::from_secs(10), "the replica is up", |s| {
                s["up"] == 1
            })
            .await;
            // Requests that are not gRPC calls fall back to HTTP/1.1 on that replica.
            for i in 0..5 {
                let (code, body) = match protocol {
                    "h2c" => get(&gw.url(&format!("/home?id={i}"))).await,
                    _ => h2c_get(&gw, &format!("/home?id={i}")).await,
                };
                assert_eq!(code, 200, "{protocol}, {named}: {body}\n{}", gw.log());
                assert!(
                    body.contains(&format!("get /home?id={i} http/1.1")),
                    "{body}"
                );
            }
            // A gRPC call cannot: a status that says why, never a broken call.
            let status = h2c_grpc_call(&gw).await;
            assert_eq!(
                status["grpc-status"], "12",
                "{protocol}, {named}: {status:?}"
            );
            let message = status["grpc-message"].to_str().expect("ascii");
            assert!(
                message.contains(named)
                    && message.contains("proxy.upstream_protocol")
                    && message.contains(protocol),
                "{message}"
            );
            // The replica serves HTTP/1.1 well: none of this counts against it.
            let s = gw.status().await;
            assert_eq!(s["up"], 1, "{s:#}");
            let (code, body) = get(&gw.url("/home?id=99")).await;
            assert_eq!(code, 200, "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_tls_keeps_its_task_past_rest_after_and_talks_on_while_plain_ones_rest() {
    use support::websocket as ws;
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let main = pki.install("gw", &pki.issue("gw", &["localhost"]));
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        tls: t::section(&[main], ""),
        tunnels: "rest_after = \"200ms\"\n".into(),
        ..Conf::default()
    });
    let config = t::client_config(&pki.ca_pem(), &[b"http/1.1"]);
    let mut over_tls = t::connect(gw.tls_addr(), "localhost", &config)
        .await
        .expect("a TLS connection");
    let head = ws::open_on(&mut over_tls, "/ws?id=1", "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    let server = ws::echo(&mut over_tls, "hello")
        .await
        .expect("an echo over TLS");
    let (mut plain, head) = ws::open(gw.addr, "/ws?id=2", "").await;
    assert_eq!(ws::status(&head), 101, "{head}");
    assert!(ws::echo(&mut plain, "hello").await.is_some());
    // Well past rest_after: the plain tunnel rests, the TLS one cannot (its TLS state lives in
    // its task) and keeps its task.
    let started = Instant::now();
    loop {
        let tunnels = gw.status().await["tunnels"].clone();
        if tunnels["resting"] == 1 {
            assert_eq!(tunnels["open"], 2, "{tunnels}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the plain tunnel rests: {tunnels}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gw.status().await["tunnels"]["resting"],
        1,
        "never the TLS one"
    );
    assert_eq!(
        ws::echo(&mut over_tls, "still here").await.as_deref(),
        Some(server.as_str()),
        "the TLS tunnel talks on"
    );
    assert!(ws::echo(&mut plain, "and here").await.is_some());
}
