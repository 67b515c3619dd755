#!/usr/bin/env python3
"""As many idle connections as the descriptors allow: ringgate against NGINX and HAProxy, in one run.

    bench/conns.py [KEEP_ALIVE] [TUNNELS]      (defaults 19000 and 9000; `make bench-conns`)

The rig of `bench/proxies_rss.py` (three `ringgate-server` backends on loopback, each proxy in
turn in front of them with one worker/thread, ringgate pinned to one CPU and on the static
provider, hashing on `?id=`, every idle timeout an hour), and the hard `nofile` of this machine
(20,000 here; no process can raise it) for every process.

1. Keep-alive: 100 connections first (what a proxy allocates once), then KEEP_ALIVE more, opened
   by two client processes (KEEP_ALIVE/2 each, each under its own descriptor limit), each
   making one request (`GET /home?id=…`) and staying open, idle. The proxy's RSS (all its
   processes) is read; then every one of the connections sends a second request (100 at a time
   in each client) and its answer is counted (answered: a whole 200; failed: anything else).
   HAProxy holds two descriptors for each connection it admits (`maxconn` (nofile - 200) / 2),
   so it is given as many as its `maxconn` allows.
2. Tunnels: TUNNELS WebSockets (`GET /ws`, each a client and a replica connection, two
   descriptors in the proxy), each echoed once; RSS; then each sends a message again and its
   echo is counted.

The RSS growth over the connections is projected to 100,000 connections (base + growth per
connection x 100,000). Loopback only; everything started is stopped on exit, also on failure.
"""
import os
import signal
import socket
import subprocess
import sys
import time

from instr import read_response
from proxies_rss import BACKENDS, PORT, SERVER, SETTLE, GW, children, haproxy_conf, haproxy_maxconn, \
    nginx_conf, raise_nofile, ringgate_conf, rss_kib, stop, wait_port
from tunnels_rss import frame, open_tunnels

WARM_UP = 100
BATCH = 100


def client(n, first_id):
    """A client process: opens n keep-alive connections (one request each), says `ready`, waits
    for `go`, sends a request on each again, says `answered A failed F`, waits for stdin to close."""
    raise_nofile()
    socks = []
    for start in range(0, n, BATCH):
        group = []
        for i in range(start, min(n, start + BATCH)):
            s = socket.create_connection(("127.0.0.1", PORT), timeout=30)
            s.sendall(f"GET /home?id={first_id + i} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            group.append(s)
        for s in group:
            read_response(s, b"")
        socks.extend(group)
    print(f"ready {len(socks)}", flush=True)
    sys.stdin.readline()
    answered = failed = 0
    for start in range(0, len(socks), BATCH):
        group = socks[start:start + BATCH]
        sent = []
        for s in group:
            try:
                s.sendall(f"GET /home?id={first_id + start} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                sent.append(s)
            except OSError:
                failed += 1
        for s in sent:
            try:
                read_response(s, b"")
                answered += 1
            except (OSError, RuntimeError):
                failed += 1
    print(f"answered {answered} failed {failed}", flush=True)
    sys.stdin.readline()


def echo_again(socks):
    """Each tunnel sends one more message; returns (echoed, failed)."""
    echoed = failed = 0
    for start in range(0, len(socks), BATCH):
        group = socks[start:start + BATCH]
        for s in group:
            s.sendall(frame("again"))
        for s in group:
            try:
                got = b""
                while len(got) < 2 or len(got) < 2 + (got[1] & 0x7F):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise OSError("closed")
                    got += chunk
                echoed += got.startswith(b"\x81") and b"again" in got
            except OSError:
                failed += 1
    return echoed, failed


def main():
    n_keep = int(sys.argv[1]) if len(sys.argv) > 1 else 19000
    n_tun = int(sys.argv[2]) if len(sys.argv) > 2 else 9000
    hard = raise_nofile()
    here = os.path.dirname(os.path.abspath(__file__))
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ringgate-conns-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    procs = []
    print(f"hard nofile {hard} (every process here)", flush=True)

    def start(cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        procs.append(p)
        return p

    def keep_alive(name, pids_of, n):
        warm = []
        for i in range(WARM_UP):
            s = socket.create_connection(("127.0.0.1", PORT), timeout=30)
            s.sendall(f"GET /home?id={i} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            read_response(s, b"")
            warm.append(s)
        time.sleep(1)
        base = rss_kib(pids_of())
        halves = [n // 2, n - n // 2]
        # One client process after the other, the RSS read after each one's connections idled
        # SETTLE s: the growth over the second is what one more idle connection costs, between
        # two settled states (see proxies_rss.measure).
        clients, each, settled, opened = [], [], [], 0.0
        for i, h in enumerate(halves):
            t0 = time.time()
            c = start([sys.executable, os.path.join(here, "conns.py"), "--client", str(h), str(WARM_UP + i * halves[0])],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = c.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"{name}: a client did not open its connections ({line!r})")
            each.append(int(line.split()[1]))
            clients.append(c)
            opened += time.time() - t0
            time.sleep(2)
            early = rss_kib(pids_of())
            time.sleep(max(0, SETTLE - 2))
            settled.append(rss_kib(pids_of()))
        full, held = settled[-1], sum(each)
        for c in clients:
            c.stdin.write("go\n")
            c.stdin.flush()
        answered = failed = 0
        for c in clients:
            words = c.stdout.readline().split()
            if len(words) < 4:
                raise RuntimeError(f"{name}: a client died during the second requests")
            answered += int(words[1])
            failed += int(words[3])
        after = rss_kib(pids_of())
        for c in clients:
            c.stdin.close()
            c.wait(60)
        for s in warm:
            s.close()
        per = (full - settled[0]) / each[1]
        print(f"  {name:<8} {held:,} idle keep-alive connections (+{WARM_UP} warm-up) opened in {opened:.0f} s; "
              f"RSS {base / 1024:.1f} -> {settled[0] / 1024:.1f} -> {full / 1024:.1f} MiB, each half read after idling {SETTLE} s "
              f"({early / 1024:.1f} 2 s after the second; {per:.2f} KiB each over the second half, {(full - base) / held:.2f} over all; at 100,000: "
              f"{(base + per * 100_000) / 1024:.0f} MiB); second request on each: {answered:,} answered, "
              f"{failed:,} failed; RSS after {after / 1024:.1f} MiB", flush=True)
        time.sleep(2)

    def tunnels(name, pids_of, n):
        warm = open_tunnels(WARM_UP, 0)
        time.sleep(1)
        base = rss_kib(pids_of())
        socks = open_tunnels(n, WARM_UP)
        time.sleep(SETTLE)
        full = rss_kib(pids_of())
        echoed, failed = echo_again(socks)
        for s in socks + warm:
            s.close()
        per = (full - base) / n
        print(f"  {name:<8} {n:,} idle WebSocket tunnels (+{WARM_UP} warm-up): RSS {base / 1024:.1f} -> {full / 1024:.1f} MiB "
              f"({per:.2f} KiB each; at 100,000: {(base + per * 100_000) / 1024:.0f} MiB); a message again "
              f"on each: {echoed:,} echoed, {failed:,} failed", flush=True)
        time.sleep(2)

    try:
        for port in BACKENDS:
            start([SERVER], env={"PORT": str(port), "SERVER_ID": f"b{port}", "BIND": "127.0.0.1",
                                 "PATH": os.environ.get("PATH", "")},
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in BACKENDS:
            wait_port(port)
        taskset = ["taskset", "-c", "0"]

        for kind, run, n in (("keep-alive", keep_alive, n_keep), ("tunnels", tunnels, n_tun)):
            print(f"{kind}:", flush=True)
            conf = os.path.join(tmp, "lb.toml")
            with open(conf, "w") as f:
                f.write(ringgate_conf(tmp, kind, n))
            log = os.path.join(tmp, "ringgate.log")
            gw = start(taskset + [os.environ.get("RINGGATE_BIN", GW), "serve", "--config", conf],
                       stdout=subprocess.DEVNULL, stderr=open(log, "w"))
            wait_port(PORT)
            time.sleep(2)
            try:
                run("ringgate", lambda: [gw.pid], n)
            except BaseException:
                print(open(log).read()[-3000:])
                raise
            stop(gw, 15)

            if os.environ.get("PEERS", "1") == "0":
                continue
            nconf = os.path.join(tmp, "nginx.conf")
            with open(nconf, "w") as f:
                f.write(nginx_conf(tmp, kind, n, hard))
            ng = start(["/usr/sbin/nginx", "-c", nconf, "-p", tmp],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(PORT)
            time.sleep(1)
            try:
                run("NGINX", lambda: [ng.pid] + children(ng.pid), n)
            except BaseException:
                print(open(os.path.join(tmp, "nginx-error.log")).read()[-2000:])
                raise
            stop(ng, 15)

            hconf = os.path.join(tmp, "haproxy.cfg")
            with open(hconf, "w") as f:
                f.write(haproxy_conf(kind, n, hard))
            hp = start(["/usr/sbin/haproxy", "-f", hconf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(PORT)
            time.sleep(1)
            n_hp = min(n, haproxy_maxconn(hard) - WARM_UP - 200)
            if n_hp < n:
                print(f"  (HAProxy: maxconn {haproxy_maxconn(hard)} = (nofile - 200) / 2, so {n_hp:,})")
            run("HAProxy", lambda: [hp.pid] + children(hp.pid), n_hp)
            stop(hp, 15)
    finally:
        for p in reversed(procs):
            if p.stdin:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            stop(p, 15)
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    # A SIGTERM unwinds like an error, so what was started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
