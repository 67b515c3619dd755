#!/usr/bin/env python3
"""HTTP/2 stream fan-out against the request budgets (issue 23, HIGH 1; `make bench-streams`).

Starts `ringgate serve` (process provider, 2 replicas) under `prlimit --nofile=NOFILE` on
127.0.0.1, opens CONNECTIONS h2c connections from 127.0.0.1, each with 100 POST streams that
share one 4 KB header (HPACK-indexed after the first) and whose bodies never start, holds them
for SECONDS while other clients on 127.0.0.2 keep asking for /home, and reports: the other
clients' answers, the streams refused, the gateway's descriptors and its RSS before and during
the attack, and the replicas' failures. Loopback only; everything it starts is stopped on exit.

usage: bench/stream_flood.py [CONNECTIONS=220] [NOFILE=20000] [SECONDS=10]
"""
import json, os, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time

import h2.config
import h2.connection
import h2.events

connections = int(sys.argv[1]) if len(sys.argv) > 1 else 220
nofile = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10
gw_bin = os.environ.get("RINGGATE_BIN", "target/release/ringgate")
server_bin = os.environ.get("RINGGATE_SERVER_BIN", "target/release/ringgate-server")

tmp = tempfile.mkdtemp(prefix="ringgate-streams-")
conf = os.path.join(tmp, "lb.toml")
with open(conf, "w") as f:
    f.write(f'listen = "127.0.0.1:0"\n[replicas]\ncount = 2\n'
            f'[provider]\nkind = "process"\nserver_binary = "{os.path.abspath(server_bin)}"\n'
            f'[policy]\ndir = "{tmp}/policies"\n')
proc = subprocess.Popen(["prlimit", f"--nofile={nofile}:{nofile}", "--", gw_bin, "serve",
                         "--config", conf], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        text=True)


def stop():
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def rss_mib():
    status = open(f"/proc/{proc.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def fds():
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def get(addr, path, source="127.0.0.2"):
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(addr)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0


def status(addr):
    s = socket.create_connection(addr, timeout=10)
    s.sendall(b"GET /lb/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["message"]


class Attacker:
    """One h2c connection holding 100 streams whose bodies never start."""

    def __init__(self, addr):
        self.sock = socket.create_connection(addr)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.refused = 0
        self.sock.sendall(self.conn.data_to_send())

    def open_streams(self, n, pad):
        for i in range(n):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                         (":authority", "x"), (":path", f"/home?id={sid}"),
                                         ("x-pad", pad)], end_stream=False)
        self.sock.sendall(self.conn.data_to_send())

    def pump(self):
        self.sock.setblocking(False)
        try:
            while data := self.sock.recv(65536):
                for e in self.conn.receive_data(data):
                    if isinstance(e, h2.events.StreamReset):
                        self.refused += 1
        except (BlockingIOError, ConnectionResetError):
            pass
        out = self.conn.data_to_send()
        if out:
            self.sock.setblocking(True)
            self.sock.sendall(out)


try:
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        sys.exit(f"gateway did not start: {line!r}")
    addr = (m.group(1), int(m.group(2)))
    deadline = time.time() + 30
    while time.time() < deadline and status(addr)["up"] < 2:
        time.sleep(0.2)
    get(addr, "/home?id=1")
    time.sleep(1)
    rss_before, fds_before = rss_mib(), fds()

    pad = "p" * 4096
    attackers = []
    for _ in range(connections):
        a = Attacker(addr)
        a.open_streams(100, pad)
        attackers.append(a)
    ok = failed = 0
    peak_rss, peak_fds = rss_before, fds_before
    until = time.time() + seconds
    while time.time() < until:
        for a in attackers:
            a.pump()
        code = get(addr, f"/home?id={ok + failed}")
        ok, failed = (ok + 1, failed) if code == 200 else (ok, failed + 1)
        peak_rss, peak_fds = max(peak_rss, rss_mib()), max(peak_fds, fds())
    refused = sum(a.refused for a in attackers)
    replicas = status(addr)["replicas"]
    print(f"{connections} h2c connections x 100 bodyless POST streams, nofile {nofile}, "
          f"{seconds:.0f} s")
    print(f"  other clients (127.0.0.2): {ok} answered 200, {failed} not")
    print(f"  streams refused (REFUSED_STREAM): {refused} of {connections * 100}")
    print(f"  gateway descriptors: {fds_before} before, {peak_fds} at most during")
    print(f"  gateway RSS: {rss_before:.1f} MiB before, {peak_rss:.1f} MiB at most during "
          f"(+{peak_rss - rss_before:.1f} MiB)")
    for r in replicas:
        print(f"  replica {r['name']}: state {r['state']}, failures {r['failures']}, "
              f"restarts {r['restarts']}")
finally:
    stop()
