//! gRPC through the gateway (issue 26): a real gRPC client (Python `grpcio`) over h2c to the
//! gateway, which routes every call by its own key to real gRPC servers: `ringgate-server`
//! process replicas, and Python `grpcio` servers as `static` replicas. Health by
//! `grpc.health.v1`. Nothing is mocked; every process a test starts is killed when it ends,
//! also on failure.

mod support;

use support::tls::Pki;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{call_with, client, Conf, GatewayProcess};

/// The client side of every test: one channel, the calls the test asks for, a JSON report.
const CLIENT: &str = r#"
import sys, json, grpc

def varint(n):
    out = b''
    while n >= 0x80:
        out += bytes([(n & 0x7f) | 0x80]); n >>= 7
    return out + bytes([n])

def msg(text):
    b = text.encode()
    return b'\x0a' + varint(len(b)) + b

def fields(b):
    out, i = {}, 0
    while i < len(b):
        key = b[i]; i += 1
        n, shift = 0, 0
        while True:
            c = b[i]; i += 1
            n |= (c & 0x7f) << shift; shift += 7
            if c < 0x80: break
        out[key >> 3] = b[i:i+n].decode(); i += n
    return out

def reply(b):
    f = fields(b)
    return {'server': f.get(1, ''), 'text': f.get(2, '')}

def status(f):
    try:
        return {'ok': f()}
    except grpc.RpcError as e:
        return {'code': e.code().name, 'details': e.details()}

target, what = sys.argv[1], sys.argv[2].split(',')
if len(sys.argv) > 3:
    # TLS to the gateway, trusting the test CA; the certificate names localhost.
    creds = grpc.ssl_channel_credentials(open(sys.argv[3], 'rb').read())
    ch = grpc.secure_channel(target, creds, options=[('grpc.ssl_target_name_override', 'localhost')])
else:
    ch = grpc.insecure_channel(target)
who = ch.unary_unary('/ringgate.demo.Demo/Who')
count = ch.unary_stream('/ringgate.demo.Demo/Count')
total = ch.stream_unary('/ringgate.demo.Demo/Sum')
chat = ch.stream_stream('/ringgate.demo.Demo/Chat')
out = {}
if 'unary' in what:
    def one():
        r, call = who.with_call(msg('hi'), metadata=[('x-user', 'u-1')], timeout=20)
        trailing = dict(call.trailing_metadata())
        return {'reply': reply(r), 'trailing': trailing.get('x-server-id')}
    out['unary'] = status(one)
if 'keys' in what:
    keys = ['user-%d' % i for i in range(400)]
    futures = [who.future(msg(k), metadata=[('x-user', k)], timeout=60) for k in keys]
    out['keys'] = {k: reply(f.result())['server'] for k, f in zip(keys, futures)}
if 'streams' in what:
    out['count'] = status(lambda: [reply(r)['text'] for r in count(msg('5'), metadata=[('x-user', 'u-2')], timeout=20)])
    out['sum'] = status(lambda: reply(total(iter([msg('a'), msg('b'), msg('c')]), metadata=[('x-user', 'u-3')], timeout=20))['text'])
    out['chat'] = status(lambda: [reply(r)['text'] for r in chat(iter([msg('x'), msg('y')]), metadata=[('x-user', 'u-4')], timeout=20)])
if 'errors' in what:
    out['fail'] = status(lambda: who(msg('fail:5:no such thing'), timeout=20))
    out['deadline'] = status(lambda: who(msg('sleep:3000'), timeout=0.5))
if 'steady' in what:
    # One call every 10 ms for 3 s, keys over the ring: which replica answered each, or why not.
    import time
    answers, failures = {}, []
    for i in range(300):
        try:
            r = who(msg('k'), metadata=[('x-user', 'k-%d' % i)], timeout=10)
            s = reply(r)['server']
            answers[s] = answers.get(s, 0) + 1
        except grpc.RpcError as e:
            failures.append('%s: %s' % (e.code().name, e.details()))
        time.sleep(0.01)
    out['steady'] = {'answers': answers, 'failures': failures}
if 'health' in what:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(ch)
    out['health'] = status(lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(
        stub.Check(health_pb2.HealthCheckRequest(service=''), timeout=20).status))
print(json.dumps(out, default=lambda b: b.decode() if isinstance(b, bytes) else str(b)))
"#;

/// A Python `grpcio` server answering `ringgate.demo.Demo` like `ringgate-server` does (with its
/// own name), and `grpc.health.v1` from `grpcio-health-checking`. Prints its port once serving.
const SERVER: &str = r#"
import sys, time, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

name = sys.argv[1]

def varint(n):
    out = b''
    while n >= 0x80:
        out += bytes([(n & 0x7f) | 0x80]); n >>= 7
    return out + bytes([n])

def s(tag, text):
    b = text.encode()
    return bytes([tag]) + varint(len(b)) + b

def text_of(req):
    return req[2:2 + req[1]].decode() if len(req) > 2 and req[0] == 0x0a else ''

def reply(text):
    return s(0x0a, name) + s(0x12, text)

def who(req, ctx):
    text = text_of(req)
    if text.startswith('fail:'):
        code, _, message = text[5:].partition(':')
        ctx.abort(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == int(code))), message)
    if text.startswith('sleep:'):
        time.sleep(int(text[6:]) / 1000)
    ctx.set_trailing_metadata((('x-server-id', name),))
    return reply(text)

def count(req, ctx):
    for i in range(1, int(text_of(req) or '0') + 1):
        yield reply(str(i))

def total(reqs, ctx):
    return reply(str(sum(1 for _ in reqs)))

def chat(reqs, ctx):
    for r in reqs:
        yield reply(text_of(r))

handler = grpc.method_handlers_generic_handler('ringgate.demo.Demo', {
    'Who': grpc.unary_unary_rpc_method_handler(who),
    'Count': grpc.unary_stream_rpc_method_handler(count),
    'Sum': grpc.stream_unary_rpc_method_handler(total),
    'Chat': grpc.stream_stream_rpc_method_handler(chat),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
server.add_generic_rpc_handlers((handler,))
hs = health.HealthServicer()
hs.set('', health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(hs, server)
if len(sys.argv) > 3:
    # TLS: the certificate and key files given; ALPN h2 is grpcio's own.
    creds = grpc.ssl_server_credentials([(open(sys.argv[2], 'rb').read(), open(sys.argv[3], 'rb').read())])
    port = server.add_secure_port('127.0.0.1:0', creds)
else:
    port = server.add_insecure_port('127.0.0.1:0')
server.start()
# SIGTERM: a graceful stop the way a gRPC server behind a load balancer does it: NOT_SERVING
# first (the health checks take it out of the ring), then a stop (GOAWAY to every client; calls
# in flight may finish for 2 s). Stopping at once instead races grpcio itself: a call that
# reaches the server just as its shutdown begins is cancelled (CANCELLED), neither refused nor
# answered, and no proxy may send it again.
import signal, threading, time
def drain():
    hs.enter_graceful_shutdown()
    time.sleep(1)
    server.stop(grace=2)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=drain, daemon=True).start())
print(port, flush=True)
server.wait_for_termination()
"#;

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the client against `gw` for `what` (comma-separated parts of [`CLIENT`]).
fn run_client(python: &Path, gw: &GatewayProcess, what: &str) -> Value {
    run_client_on(python, gw, &gw.addr.to_string(), what, &[])
}

/// [`run_client`] to `target`, with `extra` arguments (the CA file: TLS).
fn run_client_on(
    python: &Path,
    gw: &GatewayProcess,
    target: &str,
    what: &str,
    extra: &[&str],
) -> Value {
    let out = Command::new(python)
        .args(["-c", CLIENT, target, what])
        .args(extra)
        .output()
        .expect("run the Python gRPC client");
    assert!(
        out.status.success(),
        "the client failed: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A Python gRPC server named `name`, and its address once it serves.
fn python_server(python: &Path, name: &str) -> (Killed, String) {
    python_server_with(python, name, &[])
}

/// [`python_server`] with `extra` arguments (key and certificate files: TLS).
fn python_server_with(python: &Path, name: &str, extra: &[&str]) -> (Killed, String) {
    let mut child = Command::new(python)
        .args(["-c", SERVER, name])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a Python gRPC server");
    let stdout = child.stdout.take().expect("its stdout");
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the server's port");
    let port: u16 = line.trim().parse().expect("a port number");
    (child, format!("127.0.0.1:{port}"))
}

/// Which replica answers `GET /home` with `x-user: <key>` over HTTP/1 (the same key source),
/// for every key.
async fn http_owners(gw: &GatewayProcess, keys: &[&str]) -> HashMap<String, String> {
    let c = client();
    let mut out = HashMap::new();
    for k in keys {
        let (code, body) = call_with(&c, "GET", &gw.url("/home"), "", &[("x-user", k)]).await;
        assert_eq!(code, 200, "{body}");
        out.insert(
            k.to_string(),
            support::server_of(&body).expect("a /home answer"),
        );
    }
    out
}

fn h2c_conf(protocol: &str) -> Conf {
    Conf {
        replicas: "count = 3\n".into(),
        hashing: "key = \"header:x-user\"\n".into(),
        proxy: format!("upstream_protocol = \"{protocol}\"\n"),
        health: "protocol = \"grpc\"\ninterval = \"200ms\"\n".into(),
        ..Conf::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_reach_process_replicas_over_h2c_each_routed_by_its_own_key() {
    let Some(python) = support::python::require(&["grpc", "grpc_health.v1.health"]) else {
        return;
    };
    let gw = GatewayProcess::start(&h2c_conf("h2c"));
    let out = run_client(&python, &gw, "unary,keys,streams,errors,health");

    let unary = &out["unary"]["ok"];
    let server = unary["reply"]["server"].as_str().expect("a server");
    assert!(server.starts_with("server-"), "{out}");
    assert_eq!(unary["trailing"], server, "trailing metadata: {out}");
    assert_eq!(
        out["count"]["ok"],
        serde_json::json!(["1", "2", "3", "4", "5"])
    );
    assert_eq!(out["sum"]["ok"], "3");
    assert_eq!(out["chat"]["ok"], serde_json::json!(["x", "y"]));
    assert_eq!(out["fail"]["code"], "NOT_FOUND", "{out}");
    assert_eq!(out["fail"]["details"], "no such thing");
    assert_eq!(out["deadline"]["code"], "DEADLINE_EXCEEDED", "{out}");
    assert_eq!(out["health"]["ok"], "SERVING", "{out}");

    // 400 calls on one channel: each answered by its key's owner, the keys over every replica.
    let keys = out["keys"].as_object().expect("the keys' answers");
    assert_eq!(keys.len(), 400);
    let all: Vec<&str> = keys.keys().map(String::as_str).collect();
    let owners = http_owners(&gw, &all).await;
    assert_eq!(owners.len(), 400);
    for (k, owner) in &owners {
        assert_eq!(keys[k], owner.as_str(), "key {k}: gRPC and HTTP disagree");
    }
    let servers: HashSet<&str> = keys.values().filter_map(Value::as_str).collect();
    assert_eq!(
        servers.len(),
        3,
        "keys spread over all replicas: {servers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reaches_python_grpcio_static_replicas_checked_by_grpc_health() {
    let Some(python) = support::python::require(&["grpc", "grpc_health.v1.health"]) else {
        return;
    };
    let (_a, addr_a) = python_server(&python, "py-a");
    let (_b, addr_b) = python_server(&python, "py-b");
    let x_user = "key = \"header:x-user\"\n";
    let gw = grpc_pair([("py-a", &addr_a), ("py-b", &addr_b)], "match", x_user).await;
    let out = run_client(&python, &gw, "unary,keys,streams,errors");
    let unary = &out["unary"]["ok"];
    let server = unary["reply"]["server"].as_str().expect("a server");
    assert!(server == "py-a" || server == "py-b", "{out}");
    assert_eq!(unary["trailing"], server, "trailing metadata: {out}");
    assert_eq!(
        out["count"]["ok"],
        serde_json::json!(["1", "2", "3", "4", "5"])
    );
    assert_eq!(out["sum"]["ok"], "3");
    assert_eq!(out["chat"]["ok"], serde_json::json!(["x", "y"]));
    assert_eq!(out["fail"]["code"], "NOT_FOUND", "{out}");
    assert_eq!(out["fail"]["details"], "no such thing");
    assert_eq!(out["deadline"]["code"], "DEADLINE_EXCEEDED", "{out}");
    let servers: HashSet<&str> = out["keys"]
        .as_object()
        .expect("the keys' answers")
        .values()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(servers, HashSet::from(["py-a", "py-b"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_under_http1_upstreams_is_unimplemented_naming_the_setting() {
    let Some(python) = support::python::require(&["grpc"]) else {
        return;
    };
    let mut conf = h2c_conf("http1");
    conf.health = String::new();
    conf.replicas = "count = 1\n".into();
    let gw = GatewayProcess::start(&conf);
    let out = run_client(&python, &gw, "unary");
    assert_eq!(out["unary"]["code"], "UNIMPLEMENTED", "{out}");
    let details = out["unary"]["details"].as_str().expect("a message");
    assert!(details.contains("proxy.upstream_protocol"), "{details}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_with_no_replica_left_is_unavailable() {
    let Some(python) = support::python::require(&["grpc"]) else {
        return;
    };
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        // Nothing listens there: the check takes it out, and no replica is left.
        provider: "servers = [{ name = \"gone\", address = \"127.0.0.1:9\" }]\n".into(),
        proxy: "upstream_protocol = \"h2c\"\n".into(),
        health: "protocol = \"grpc\"\ninterval = \"100ms\"\nfall = 1\n".into(),
        ..Conf::default()
    });
    let out = run_client(&python, &gw, "unary");
    assert_eq!(out["unary"]["code"], "UNAVAILABLE", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_alpn_h2_on_both_legs() {
    let Some(python) = support::python::require(&["grpc", "grpc_health.v1.health"]) else {
        return;
    };
    let certs = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(certs.path());
    let (gw_cert, gw_key) = pki.install("gateway", &pki.issue("gateway", &["localhost"]));
    let (rep_cert, rep_key) = pki.install("replica", &pki.issue("replica", &["127.0.0.1"]));
    let (rep_cert, rep_key) = (
        rep_cert.display().to_string(),
        rep_key.display().to_string(),
    );
    let (_a, addr_a) = python_server_with(&python, "tls-a", &[&rep_key, &rep_cert]);
    let (_b, addr_b) = python_server_with(&python, "tls-b", &[&rep_key, &rep_cert]);
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"tls-a\", address = \"{addr_a}\" }}, {{ name = \"tls-b\", address = \"{addr_b}\" }}]\nupstream_tls = true\nupstream_ca = \"{}\"\n",
            pki.ca_path().display()
        ),
        hashing: "key = \"header:x-user\"\n".into(),
        proxy: "upstream_protocol = \"h2c\"\n".into(),
        health: "protocol = \"grpc\"\ninterval = \"200ms\"\nrise = 1\n".into(),
        tls: support::tls::section(&[(gw_cert, gw_key)], ""),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(20), "both TLS replicas up", |s| {
        s["replicas"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["state"] == "up"))
    })
    .await;
    let ca = pki.ca_path().display().to_string();
    let target = gw.tls_addr().to_string();
    let out = run_client_on(&python, &gw, &target, "unary,keys,streams", &[&ca]);
    let unary = &out["unary"]["ok"];
    let server = unary["reply"]["server"].as_str().expect("a server");
    assert!(server == "tls-a" || server == "tls-b", "{out}");
    assert_eq!(unary["trailing"], server, "trailing metadata: {out}");
    assert_eq!(
        out["count"]["ok"],
        serde_json::json!(["1", "2", "3", "4", "5"])
    );
    assert_eq!(out["chat"]["ok"], serde_json::json!(["x", "y"]));
    let servers: HashSet<&str> = out["keys"]
        .as_object()
        .expect("the keys' answers")
        .values()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(servers, HashSet::from(["tls-a", "tls-b"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_accepts_trailers_gets_the_replicas_in_the_last_chunk() {
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "upstream_protocol = \"h2c\"\n".into(),
        ..Conf::default()
    });
    // `Who` with the text "hi", framed: flag 0, length 4, field 1 = "hi".
    let body = b"\x00\x00\x00\x00\x04\x0a\x02hi";
    let call = |te: &str| {
        let mut req = format!(
            "POST /ringgate.demo.Demo/Who HTTP/1.1\r\nHost: gw\r\ncontent-type: application/grpc\r\n{te}content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req
    };
    let (code, answer) = support::raw(gw.addr, &call("TE: trailers\r\n")).await;
    assert_eq!(code, 200, "{answer}");
    let answer = answer.to_lowercase();
    assert!(answer.contains("\r\n0\r\n"), "chunked: {answer}");
    let last = &answer[answer.rfind("\r\n0\r\n").expect("the last chunk")..];
    assert!(last.contains("grpc-status: 0\r\n"), "{last:?}");
    assert!(last.contains("x-server-id: server-1\r\n"), "{last:?}");
    // Without `TE: trailers` the client gets the body, and no trailer fields it did not ask for.
    let (code, answer) = support::raw(gw.addr, &call("")).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer.ends_with("\r\n0\r\n\r\n"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_ends_a_streaming_call_past_its_grpc_timeout_with_deadline_exceeded() {
    use http_body_util::BodyExt;
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "upstream_protocol = \"h2c\"\n".into(),
        ..Conf::default()
    });
    // A client that does not enforce its own deadline (hyper's, h2c with prior knowledge): the
    // gateway must. `Count` is asked for 50 replies 100 ms apart; the call allows 500 ms.
    let (mut send, _conn) = support::h2c(gw.addr).await;
    let body = bytes::Bytes::from_static(b"\x00\x00\x00\x00\x08\x0a\x0650/100");
    let req = http::Request::post(format!("http://{}/ringgate.demo.Demo/Count", gw.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "500m")
        .body(http_body_util::Full::new(body))
        .expect("request");
    let resp = send.send_request(req).await.expect("a response");
    assert_eq!(resp.status(), 200);
    let whole = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .expect("the call ended")
        .expect("a whole body");
    let trailers = whole.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "4", "{trailers:?}");
    let replies = whole.to_bytes();
    assert!(
        !replies.is_empty() && replies.len() < 50 * 5,
        "some replies, not all: {} bytes",
        replies.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_protocol_applies_live_and_match_keeps_http1_clients_on_http1() {
    let Some(python) = support::python::require(&["grpc"]) else {
        return;
    };
    let mut conf = h2c_conf("http1");
    conf.health = String::new();
    conf.replicas = "count = 2\n".into();
    let gw = GatewayProcess::start(&conf);
    let out = run_client(&python, &gw, "unary");
    assert_eq!(out["unary"]["code"], "UNIMPLEMENTED", "{out}");

    // The edit applies to new requests: gRPC calls go over HTTP/2 from then on.
    let path = gw.config_path.clone();
    let original = std::fs::read_to_string(&path).expect("config");
    let edited = original.replace(
        "upstream_protocol = \"http1\"",
        "upstream_protocol = \"match\"",
    );
    assert_ne!(original, edited);
    std::fs::write(&path, &edited).expect("write");
    let mut answered = None;
    for _ in 0..50 {
        let out = run_client(&python, &gw, "unary");
        if out["unary"]["ok"].is_object() {
            answered = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = answered.unwrap_or_else(|| panic!("the edit never applied:\n{}", gw.log()));
    assert!(out["unary"]["ok"]["reply"]["server"]
        .as_str()
        .is_some_and(|s| s.starts_with("server-")));
    // HTTP/1 clients are still served under "match" (their requests take the HTTP/1.1 path).
    let owners = http_owners(&gw, &["a", "b", "c"]).await;
    assert_eq!(owners.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_h2c_a_chunked_body_past_max_body_is_413_and_a_small_one_passes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 1\n".into(),
        proxy: "upstream_protocol = \"h2c\"\nmax_body = \"1MiB\"\n".into(),
        ..Conf::default()
    });
    // No Content-Length: the limit is found while the body streams to the replica over HTTP/2
    // (ringgate-server reads a body whole before it answers).
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let chunk = "y".repeat(64 * 1024);
    let mut req =
        String::from("POST /home?id=3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..40 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut out))
        .await
        .expect("answer")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // A small one reaches the replica (whose answer to a POST is its 404).
    let (code, body) = support::call("POST", &gw.url("/home?id=3"), "small").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("POST /home is not served here"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_gracefully_costs_no_call() {
    let Some(python) = support::python::require(&["grpc", "grpc_health.v1.health"]) else {
        return;
    };
    let (a, addr_a) = python_server(&python, "py-a");
    let (_b, addr_b) = python_server(&python, "py-b");
    let x_user = "key = \"header:x-user\"\n";
    let gw = grpc_pair([("py-a", &addr_a), ("py-b", &addr_b)], "h2c", x_user).await;
    // Calls flow over both replicas' HTTP/2 connections; a third of the way in, py-a stops
    // gracefully: NOT_SERVING, then GOAWAY on its connections, then nothing listens. The
    // gateway's checks take it out of the ring, the calls that reach it meanwhile are answered,
    // and a call its GOAWAY did not take is sent again (its connection refused: the next
    // server clockwise).
    let client = {
        let (python, target) = (python.clone(), gw.addr.to_string());
        std::thread::spawn(move || {
            Command::new(python)
                .args(["-c", CLIENT, &target, "steady"])
                .output()
                .expect("run the Python gRPC client")
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    support::signal(a.0.id(), "TERM");
    let out = tokio::task::spawn_blocking(move || client.join().expect("the client thread"))
        .await
        .expect("joined");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let steady = &out["steady"];
    assert_eq!(
        steady["failures"],
        serde_json::json!([]),
        "{out}\n{}",
        gw.log()
    );
    assert!(steady["answers"]["py-a"].as_u64().unwrap_or(0) > 0, "{out}");
    assert!(steady["answers"]["py-b"].as_u64().unwrap_or(0) > 0, "{out}");
    // py-a did stop: its process exited and the gateway no longer counts it up.
    let mut a = a;
    let exited = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = a.0.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
    .await
    .expect("joined");
    assert!(exited, "py-a did not stop on SIGTERM");
    let status = gw.status().await;
    assert_ne!(
        support::replica(&status, "py-a")["state"],
        "up",
        "{status:#}"
    );
}

/// 40 server-streaming calls on one channel (keys `s-0`..`s-39`, each `Count` of 100 replies
/// 50 ms apart). Prints `started` once every call got its first reply, then waits for them all
/// and prints, per key, the servers its replies came from, how it ended and when (seconds
/// after `go` arrived on stdin), and, for a call that ended UNAVAILABLE, the server a retry
/// reached.
const STREAMS: &str = r#"
import sys, json, grpc, threading, time

def varint(n):
    out = b''
    while n >= 0x80:
        out += bytes([(n & 0x7f) | 0x80]); n >>= 7
    return out + bytes([n])

def msg(text):
    b = text.encode()
    return b'\x0a' + varint(len(b)) + b

def server_of(b):
    i, out = 0, {}
    while i < len(b):
        key = b[i]; i += 1
        n, shift = 0, 0
        while True:
            c = b[i]; i += 1
            n |= (c & 0x7f) << shift; shift += 7
            if c < 0x80: break
        out[key >> 3] = b[i:i+n].decode(); i += n
    return out.get(1, '')

ch = grpc.insecure_channel(sys.argv[1])
count = ch.unary_stream('/ringgate.demo.Demo/Count')
keys = ['s-%d' % i for i in range(40)]
first = threading.Barrier(len(keys) + 1)
go = [0.0]
out = {}

def one(k):
    servers, started, code, details = set(), False, 'OK', ''
    try:
        for r in count(msg('100/50'), metadata=[('x-user', k)], timeout=60):
            servers.add(server_of(r))
            if not started:
                started = True
                first.wait()
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
        if not started:
            first.wait()
    rec = {'servers': sorted(servers), 'code': code, 'details': details,
           'at': round(time.monotonic() - go[0], 3) if go[0] else -1}
    if code == 'UNAVAILABLE':
        again = [server_of(r) for r in count(msg('1'), metadata=[('x-user', k)], timeout=20)]
        rec['retry'] = again[0] if again else None
    out[k] = rec

threads = [threading.Thread(target=one, args=(k,)) for k in keys]
for t in threads: t.start()
first.wait()
print('started', flush=True)
sys.stdin.readline()
go[0] = time.monotonic()
for t in threads: t.join()
print(json.dumps(out), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_whose_key_moves_ends_unavailable_and_the_others_keep_streaming() {
    let Some(python) = support::python::require(&["grpc"]) else {
        return;
    };
    let mut conf = h2c_conf("h2c");
    conf.replicas = "count = 3\nmax_replicas = 8\n".into();
    conf.tunnels = "rehome_window = \"2s\"\n".into();
    // mix64 spreads 40 keys over the ring (the quadratic defaults may give a new replica none).
    conf.ring = "request_hash = \"mix64\"\nvnode_hash = \"mix64\"\n".into();
    let gw = GatewayProcess::start(&conf);
    let keys: Vec<String> = (0..40).map(|i| format!("s-{i}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let before = http_owners(&gw, &key_refs).await;
    let mut child = Command::new(&python)
        .args(["-c", STREAMS, &gw.addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the streaming client");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let child = Killed(child);
    let started = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(started, "started", "the calls did not all start");
    let (code, body) = call_with(&client(), "POST", &gw.url("/add"), r#"{"n": 1}"#, &[]).await;
    assert_eq!(code, 200, "{body}");
    use std::io::Write;
    writeln!(stdin, "go").expect("go");
    let after = http_owners(&gw, &key_refs).await;
    let report: Value =
        serde_json::from_str(&lines.next().and_then(Result::ok).unwrap_or_default())
            .expect("the client's report");
    drop(child);
    let mut moved = 0;
    for k in &keys {
        let r = &report[k];
        if before[k] != after[k] {
            moved += 1;
            assert_eq!(
                r["code"], "UNAVAILABLE",
                "{k} moved {} -> {}: {r}",
                before[k], after[k]
            );
            assert!(
                r["details"]
                    .as_str()
                    .is_some_and(|d| d.contains("key moved")),
                "{r}"
            );
            assert!(
                r["at"].as_f64().is_some_and(|t| t <= 3.0),
                "{k} ended late: {r}"
            );
            assert_eq!(
                r["retry"],
                after[k].as_str(),
                "{k}'s retry reached its new owner"
            );
        } else {
            assert_eq!(r["code"], "OK", "{k} stayed on {}: {r}", before[k]);
            assert_eq!(r["servers"], serde_json::json!([before[k]]), "{r}");
        }
    }
    assert!(moved > 0, "the new replica took some of 40 keys");
    let metrics = gw.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "ringgate_streams_rehomed_total{reason=\"key_moved\"}"
        ),
        moved as f64
    );
}

/// One gRPC message framed: flag 0, its length, then field 1 (a string) = `text`.
fn grpc_text(text: &str) -> bytes::Bytes {
    let mut msg = vec![0x0a, u8::try_from(text.len()).expect("a short text")];
    msg.extend_from_slice(text.as_bytes());
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(msg.len()).expect("short").to_be_bytes());
    out.extend_from_slice(&msg);
    bytes::Bytes::from(out)
}

/// A unary `Who` call with `text`, over h2c with prior knowledge from hyper's client (which,
/// unlike grpcio, does not enforce a deadline itself), with `grpc-timeout: <timeout>` when
/// given: the call's status fields (the head of a trailers-only answer, else the trailers).
async fn h2c_who(gw: &GatewayProcess, text: &str, timeout: Option<&str>) -> http::HeaderMap {
    use http_body_util::BodyExt;
    let (mut send, _conn) = support::h2c(gw.addr).await;
    let mut req = http::Request::post(format!("http://{}/ringgate.demo.Demo/Who", gw.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        req = req.header("grpc-timeout", t);
    }
    let req = req
        .body(http_body_util::Full::new(grpc_text(text)))
        .expect("request");
    let resp = send.send_request(req).await.expect("a response");
    assert_eq!(resp.status(), 200);
    let (parts, body) = resp.into_parts();
    if parts.headers.contains_key("grpc-status") {
        return parts.headers;
    }
    let whole = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("the call ended")
        .expect("a whole body");
    whole.trailers().cloned().expect("trailers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_exceeded_names_what_ran_out_the_calls_grpc_timeout_or_proxy_request_timeout() {
    let start = |proxy: &str| {
        GatewayProcess::start(&Conf {
            replicas: "count = 1\n".into(),
            proxy: format!("upstream_protocol = \"h2c\"\n{proxy}"),
            ..Conf::default()
        })
    };
    let message = |h: &http::HeaderMap| {
        h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    // The client's grpc-timeout (300 ms) is shorter than proxy.request_timeout (30 s).
    let gw = start("");
    let status = h2c_who(&gw, "sleep:3000", Some("300m")).await;
    assert_eq!(status["grpc-status"], "4", "{status:?}");
    let m = message(&status);
    assert!(
        m.contains("grpc-timeout") && m.contains("300ms") && !m.contains("request_timeout"),
        "the message names the call's grpc-timeout: {m}"
    );
    // proxy.request_timeout (300 ms) is shorter than the client's grpc-timeout (20 s).
    let gw = start("request_timeout = \"300ms\"\n");
    let status = h2c_who(&gw, "sleep:3000", Some("20S")).await;
    assert_eq!(status["grpc-status"], "4", "{status:?}");
    let m = message(&status);
    assert!(
        m.contains("proxy.request_timeout") && m.contains("300ms") && !m.contains("grpc-timeout"),
        "the message names proxy.request_timeout: {m}"
    );
    // Without a grpc-timeout, proxy.request_timeout is the one.
    let status = h2c_who(&gw, "sleep:3000", None).await;
    assert_eq!(status["grpc-status"], "4", "{status:?}");
    assert!(
        message(&status).contains("proxy.request_timeout"),
        "{status:?}"
    );
}

/// A gateway over two static replicas `(name, address)`, reached with `upstream_protocol`,
/// checked by `grpc.health.v1` every 200 ms, with `[hashing]` set to `hashing`; returned once
/// both are up by those checks.
async fn grpc_pair(
    replicas: [(&str, &str); 2],
    upstream_protocol: &str,
    hashing: &str,
) -> GatewayProcess {
    let [(name_a, a), (name_b, b)] = replicas;
    let gw = GatewayProcess::start(&Conf {
        kind: Some("static".into()),
        provider: format!(
            "servers = [{{ name = \"{name_a}\", address = \"{a}\" }}, {{ name = \"{name_b}\", address = \"{b}\" }}]\n"
        ),
        hashing: hashing.into(),
        proxy: format!("upstream_protocol = \"{upstream_protocol}\"\n"),
        health: "protocol = \"grpc\"\ninterval = \"200ms\"\nrise = 1\n".into(),
        ..Conf::default()
    });
    gw.wait_status(Duration::from_secs(20), "both replicas up", |s| {
        s["health"]["protocol"] == "grpc"
            && s["replicas"]
                .as_array()
                .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["state"] == "up"))
    })
    .await;
    gw
}

/// A gateway (h2c to the replicas, gRPC health checks) over two [`refusing_h2_replica`]s that
/// share `refuse` and `seen`, each refusing once `after` bytes of a body arrived; returned once
/// both are up.
async fn refusing_pair(
    refuse: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    after: usize,
    seen: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> GatewayProcess {
    let a = refusing_h2_replica(refuse.clone(), after, seen.clone()).await;
    let b = refusing_h2_replica(refuse.clone(), after, seen.clone()).await;
    let (a, b) = (a.to_string(), b.to_string());
    grpc_pair([("h2-a", &a), ("h2-b", &b)], "h2c", "").await
}

/// A replica that speaks HTTP/2 with prior knowledge (the h2 crate's server, so it can refuse a
/// stream the way a real server shedding load does): `grpc.health.v1.Health/Check` answers
/// SERVING; any other request has its body read and echoed back with status 200, except that
/// while `refuse` is set, the first such request is refused (`REFUSED_STREAM`) once `after`
/// bytes of its body arrived, and `refuse` is cleared. Every request body's bytes are counted in
/// `seen` (by replica).
async fn refusing_h2_replica(
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
    after: usize,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (refuse, seen) = (refuse.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let (refuse, seen) = (refuse.clone(), seen.clone());
                    tokio::spawn(async move {
                        let health = req.uri().path() == "/grpc.health.v1.Health/Check";
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                            if !health {
                                seen.fetch_add(chunk.len(), Ordering::SeqCst);
                            }
                            if !health && got.len() >= after && refuse.swap(false, Ordering::SeqCst)
                            {
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                return;
                            }
                        }
                        if health {
                            let head = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .expect("head");
                            let Ok(mut stream) = respond.send_response(head, false) else {
                                return;
                            };
                            let serving =
                                bytes::Bytes::from_static(b"\x00\x00\x00\x00\x02\x08\x01");
                            let _ = stream.send_data(serving, false);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let _ = stream.send_trailers(trailers);
                            return;
                        }
                        let head = http::Response::builder().body(()).expect("head");
                        let Ok(mut stream) = respond.send_response(head, false) else {
                            return;
                        };
                        let _ = stream.send_data(bytes::Bytes::from(got), true);
                    });
                }
            });
        }
    });
    addr
}

/// Sends `POST /upload` over HTTP/1.1 with a chunked body: `first`, then after 300 ms
/// `second`, then the last chunk; returns the status and the response body.
async fn upload_in_two(addr: std::net::SocketAddr, first: &[u8], second: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let chunk = |b: &[u8]| {
        let mut c = format!("{:x}\r\n", b.len()).into_bytes();
        c.extend_from_slice(b);
        c.extend_from_slice(b"\r\n");
        c
    };
    let mut head = b"POST /upload?id=7 HTTP/1.1\r\nHost: gw\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    head.extend_from_slice(&chunk(first));
    s.write_all(&head).await.expect("head and the first chunk");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rest = chunk(second);
    rest.extend_from_slice(b"0\r\n\r\n");
    // The gateway may have answered (and closed) already: the answer is what counts.
    let _ = s.write_all(&rest).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = match answer.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => answer[at + 4..].to_vec(),
        None => Vec::new(),
    };
    (code, body)
}

/// De-chunks an HTTP/1.1 chunked body (or returns it as it is when it is not chunked).
fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(2).position(|w| w == b"\r\n") {
        let Ok(len) = usize::from_str_radix(std::str::from_utf8(&rest[..at]).unwrap_or("x"), 16)
        else {
            return body.to_vec();
        };
        if len == 0 {
            return out;
        }
        let Some(data) = rest.get(at + 2..at + 2 + len) else {
            return body.to_vec();
        };
        out.extend_from_slice(data);
        rest = rest.get(at + 4 + len..).unwrap_or_default();
    }
    body.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_whose_body_had_started_is_resent_whole_within_the_bound_and_fails_clearly_past_it(
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let refuse = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    // Two replicas sharing one refusal: whichever gets the upload first refuses it once some
    // of its body arrived; the gateway must send it whole again (to the same replica or the
    // next one).
    let gw = refusing_pair(&refuse, 1000, &seen).await;

    // Within the bound: 1000 bytes, refused once they arrived, then 1000 more from the client.
    refuse.store(true, Ordering::SeqCst);
    let (first, second) = (vec![b'a'; 1000], vec![b'b'; 1000]);
    let (code, body) = upload_in_two(gw.addr, &first, &second).await;
    let body = dechunk(&body);
    assert_eq!(
        code,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        gw.log()
    );
    assert!(!refuse.load(Ordering::SeqCst), "the refusal happened");
    assert_eq!(
        body.len(),
        2000,
        "the whole body reached the replica that answered"
    );
    assert_eq!(&body[..1000], &first[..]);
    assert_eq!(&body[1000..], &second[..]);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1000 + 2000,
        "the refused stream had 1000 bytes of the body, the one sent again all of it"
    );

    // Past the bound (64 KiB kept): 1 KiB, then 100 KiB; refused once 80 KiB arrived.
    let gw = refusing_pair(&refuse, 80 * 1024, &seen).await;
    refuse.store(true, Ordering::SeqCst);
    seen.store(0, Ordering::SeqCst);
    let (code, body) = upload_in_two(gw.addr, &vec![b'c'; 1024], &vec![b'd'; 100 * 1024]).await;
    let text = String::from_utf8_lossy(&body);
    assert!(!refuse.load(Ordering::SeqCst), "the refusal happened");
    assert_eq!(code, 502, "{text}");
    assert!(
        seen.load(Ordering::SeqCst) >= 80 * 1024,
        "the refused stream had 80 KiB of the body"
    );
    assert!(
        text.contains("did not process") && text.contains("64 KiB"),
        "the answer says why it was not sent again: {text}"
    );
}
