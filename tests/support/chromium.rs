//! Headless Chromium driven over the DevTools protocol (a websocket), for the operator page's
//! browser test. `make test` installs Chromium (`bench/deps.sh chromium`). Without it a test
//! never passes in silence: [`require`] makes it print `<test>: skipped: no Chromium (<the
//! command to run>)` and return, or, with `RINGGATE_REQUIRE_ENGINES=1` (set by `.ci/run`), fail
//! with that reason (see `engines.rs`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

#[path = "engines.rs"]
mod engines;

/// What to do when Chromium is missing.
const INSTALL: &str = "run `bench/deps.sh chromium` (make test does), or point RINGGATE_CHROMIUM \
                       at a Chromium binary";

/// The Chromium binary: `$RINGGATE_CHROMIUM`, else `chromium` or `chromium-browser` on PATH; Err
/// says why there is none and what to do.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("RINGGATE_CHROMIUM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "RINGGATE_CHROMIUM is {}, which is not a file: {INSTALL}",
                p.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "neither chromium nor chromium-browser is on PATH: {INSTALL}"
    ))
}

/// The Chromium binary for the running test, or None after the test was told to skip (it
/// returns then); fails the test under `RINGGATE_REQUIRE_ENGINES=1`.
pub fn require() -> Option<PathBuf> {
    match binary() {
        Ok(path) => Some(path),
        Err(reason) => {
            engines::missing("no Chromium", &reason);
            None
        }
    }
}

/// A headless Chromium with one page, closed (and killed if need be) on drop.
pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium (`binary`, from [`require`]) with a fresh profile and opens one blank
    /// page of `width` x `height`.
    pub fn start(binary: &Path, width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--hide-scrollbars",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.split_whitespace().find(|w| w.starts_with("ws://")) {
                        let _ = tx.send(url.to_owned());
                        sent = true;
                    }
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("Chromium did not open its DevTools endpoint within 30 s");
            }
        };
        let (ws, _) = tungstenite::connect(url.as_str()).expect("connect to DevTools");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
        }
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 1,
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("target id").to_owned();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        b.page("Page.enable", json!({}));
        b.page("Runtime.enable", json!({}));
        b.page(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        loop {
            let reply = match self.ws.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(e) => panic!("DevTools {method}: no answer: {e}"),
            };
            let v: Value = serde_json::from_str(&reply).expect("DevTools JSON");
            if v["id"].as_u64() == Some(id) {
                if let Some(err) = v.get("error") {
                    panic!("DevTools {method} failed: {err}");
                }
                return v["result"].clone();
            }
        }
    }

    /// A browser-level command.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A command to the page.
    pub fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(session))
    }

    /// Navigates to `url` and waits (bounded) for the document to be complete.
    pub fn open(&mut self, url: &str) {
        self.page("Page.navigate", json!({"url": url}));
        self.wait_for(
            "the page to load",
            Duration::from_secs(30),
            "document.readyState === 'complete'",
        );
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.page(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy; panics after `timeout` naming `what`. Returns how
    /// long it took.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, expression: &str) -> Duration {
        let started = Instant::now();
        loop {
            let v = self.eval(&format!("Boolean({expression})"));
            if v == Value::Bool(true) {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                let text = self.eval("document.body ? document.body.innerText.slice(0, 3000) : ''");
                panic!("timed out after {timeout:?} waiting for {what}; the page says:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// A PNG of the whole page, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.page(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let data = shot["data"].as_str().expect("screenshot data");
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let id = self.next_id;
        let _ = self.ws.send(Message::text(
            json!({"id": id, "method": "Browser.close"}).to_string(),
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
