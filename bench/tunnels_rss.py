#!/usr/bin/env python3
"""Memory per open idle WebSocket tunnel: ringgate against NGINX and HAProxy, in one run.

    bench/tunnels_rss.py [N]        (default 9000; `make bench-tunnels`)

Three `ringgate-server` backends (their `GET /ws` is a WebSocket echo) on loopback ports; each
proxy in turn in front of them with one worker/thread (ringgate pinned to one CPU, so one
serving thread; the static provider, so it starts no replicas of its own), hashing on `?id=`:
N WebSockets are opened through it (each a client and a backend connection, two descriptors in
the proxy), each says one message and gets its echo, then all sit idle. The proxy's RSS (all
its processes) is read from /proc before and after; the difference over N is the cost of one
open idle tunnel. Loopback only; everything started is stopped on exit.
"""
import base64
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GW = os.environ.get("RINGGATE_BIN", os.path.join(ROOT, "target/release/ringgate"))
SERVER = os.environ.get("RINGGATE_SERVER_BIN", os.path.join(ROOT, "target/release/ringgate-server"))
BACKENDS = [18301, 18302, 18303]
PORT = 18300

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if N * 1 + 200 > hard:
    sys.exit(f"{N} tunnels need {N + 200} descriptors in this process; the hard limit is {hard}")

tmp = tempfile.mkdtemp(prefix="ringgate-tunnels-")
procs = []


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_port(port, within=20):
    end = time.time() + within
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def frame(text):
    """A masked client text frame."""
    data = text.encode()
    mask = b"\x11\x22\x33\x44"
    head = bytes([0x81, 0x80 | len(data)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def open_tunnels(n):
    """n WebSockets through the proxy on PORT, each echoed once; returns the sockets."""
    socks = []
    key = base64.b64encode(os.urandom(16)).decode()
    batch = 200
    for start_i in range(0, n, batch):
        group = []
        for i in range(start_i, min(n, start_i + batch)):
            s = socket.create_connection(("127.0.0.1", PORT))
            s.sendall(
                (f"GET /ws?id={i} HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\n"
                 f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
            group.append(s)
        for s in group:
            s.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                try:
                    chunk = s.recv(4096)
                except OSError as e:
                    raise SystemExit(f"tunnel {len(socks) + len(group)}: {e}")
                if not chunk:
                    raise SystemExit(f"a tunnel closed during its handshake: {head!r}")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise SystemExit(f"no 101 (tunnel {len(socks) + len(group)}): {head[:400]!r}")
            s.sendall(frame("hello"))
            got = head.split(b"\r\n\r\n", 1)[1]
            while len(got) < 2 or len(got) < 2 + (got[1] & 0x7F):
                got += s.recv(4096)
        socks.extend(group)
    return socks


def measure(name, pids_of, warm_up=200):
    # A few tunnels first, so what the first ones allocate once (buffers, pools, the runtime's
    # structures) is not counted as per tunnel.
    warm = open_tunnels(warm_up)
    time.sleep(1)
    before = rss_kib(pids_of())
    socks = open_tunnels(N)
    time.sleep(2)
    after = rss_kib(pids_of())
    per = (after - before) / N
    for s in socks + warm:
        s.close()
    print(f"  {name:<10} RSS {before / 1024:7.1f} MiB -> {after / 1024:7.1f} MiB with {N} more "
          f"tunnels: {per:5.2f} KiB per open idle tunnel", flush=True)
    time.sleep(1)
    return per


results = {}
try:
    for port in BACKENDS:
        start([SERVER], env={"PORT": str(port), "SERVER_ID": f"b{port}", "BIND": "127.0.0.1",
                             "PATH": os.environ.get("PATH", "")})
    for port in BACKENDS:
        wait_port(port)
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []

    # ringgate: static provider, one serving thread.
    conf = os.path.join(tmp, "lb.toml")
    with open(conf, "w") as f:
        servers = ", ".join(f'{{ name = "b{p}", address = "127.0.0.1:{p}" }}' for p in BACKENDS)
        f.write(f'listen = "127.0.0.1:{PORT}"\n[provider]\nkind = "static"\nservers = [{servers}]\n'
                f'[proxy]\nconnect_timeout = "10s"\nmax_requests = {N + 1000}\nmax_requests_per_ip = {N + 1000}\n'
                f'max_requests_per_replica = {N + 1000}\n[tunnels]\nmax = {N + 1000}\n'
                f'[policy]\ndir = "{tmp}/policies"\n')
    gw = subprocess.Popen(taskset + [GW, "serve", "--config", conf], stdout=subprocess.DEVNULL,
                          stderr=open(os.path.join(tmp, "ringgate.log"), "w"))
    procs.append(gw)
    wait_port(PORT)
    time.sleep(2)
    try:
        results["ringgate"] = measure("ringgate", lambda: [gw.pid])
    except BaseException:
        print(open(os.path.join(tmp, "ringgate.log")).read()[-3000:])
        raise
    stop(gw)

    if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        nconf = os.path.join(tmp, "nginx.conf")
        ups = "\n".join(f"server 127.0.0.1:{p};" for p in BACKENDS)
        with open(nconf, "w") as f:
            f.write(f"""worker_processes 1;
worker_rlimit_nofile {hard};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections {N * 4}; }}
http {{
  access_log off;
  upstream backends {{ hash $arg_id consistent; {ups} }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{PORT};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}
}}
""")
        ng = start([nginx, "-c", nconf, "-p", tmp])
        wait_port(PORT)
        time.sleep(1)
        try:
            results["nginx"] = measure("NGINX", lambda: [ng.pid] + children(ng.pid))
        except BaseException:
            print(open(os.path.join(tmp, "nginx-error.log")).read()[-2000:])
            raise
        stop(ng)
    else:
        print("  NGINX      not installed (bench/deps.sh proxies)")

    if shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy"):
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        hconf = os.path.join(tmp, "haproxy.cfg")
        srvs = "\n".join(f"  server b{p} 127.0.0.1:{p}" for p in BACKENDS)
        with open(hconf, "w") as f:
            f.write(f"""global
  nbthread 1
  maxconn {(hard - 200) // 2}
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:{PORT}
  default_backend be
backend be
  balance url_param id
  hash-type consistent
{srvs}
""")
        hp = start([haproxy, "-f", hconf])
        wait_port(PORT)
        time.sleep(1)
        results["haproxy"] = measure("HAProxy", lambda: [hp.pid] + children(hp.pid))
        stop(hp)
    else:
        print("  HAProxy    not installed (bench/deps.sh proxies)")

    rg = results["ringgate"]
    ratios = ", ".join(f"{rg / v:.2f}x {k}'s" for k, v in results.items() if k != "ringgate" and v > 0)
    print(f"ringgate: {rg:.2f} KiB per open idle WebSocket tunnel ({ratios})")
finally:
    for p in reversed(procs):
        stop(p)
    shutil.rmtree(tmp, ignore_errors=True)
