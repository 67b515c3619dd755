#!/usr/bin/env python3
"""User-space instructions per proxied request: ringgate against NGINX and HAProxy, in one run.

    bench/instr.py [REQUESTS] [WARM_UP]      (defaults 3000 and 500; `make bench-instr`)

The rig of `bench/proxies_rss.py` (three `ringgate-server` backends on loopback, each proxy in
turn in front of them, hashing on `?id=`): ringgate (static provider, pinned to one CPU, so one
serving thread; `mix64`, which spreads keys as the peers' consistent hashes do), NGINX (one
process: `master_process off`, so its one worker is the process) and HAProxy (`nbthread 1`),
each run under `valgrind --tool=callgrind`. Eight keep-alive client connections send WARM_UP
requests (`GET /home?id=<random 6 digits>`), the counters are zeroed (`callgrind_control
--zero`), then REQUESTS more are sent and answered, and the counters dumped (`callgrind_control
--dump`): every instruction of the proxy's process (all its threads) since the zero, divided by
REQUESTS, is the figure. Instruction counts do not depend on what else the machine runs.

The three figures are drawn in docs/img/instructions.svg (CHART= elsewhere). ringgate's dump is kept (target/callgrind-instr/ringgate.out, for `callgrind_annotate`), and its
top functions by inclusive instructions are printed. Loopback only; everything started is
stopped on exit, also on failure.
"""
import glob
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from svgbars import bars
from proxies_rss import BACKENDS, PORT, ROOT, SERVER, GW, haproxy_conf, nginx_conf, raise_nofile, \
    ringgate_conf, run, stop, stop_all, wait_port

CONNECTIONS = 8
OUT_DIR = os.path.join(ROOT, "target", "callgrind-instr")


def read_response(s, buf):
    """Reads one whole response with a `Content-Length` from `s`; returns what followed it."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed before a whole response head: {buf[:200]!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"not a 200: {head[:300]!r}")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if not m:
        raise RuntimeError(f"no Content-Length: {head[:300]!r}")
    length = int(m.group(1))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed inside a response body")
        rest += chunk
    return rest[length:]


def drive(total, seed):
    """`total` requests over CONNECTIONS keep-alive connections, one at a time each, random ids."""
    errors = []
    per = [total // CONNECTIONS + (1 if i < total % CONNECTIONS else 0) for i in range(CONNECTIONS)]

    def one(count, rng):
        try:
            s = socket.create_connection(("127.0.0.1", PORT), timeout=60)
            buf = b""
            for _ in range(count):
                s.sendall(f"GET /home?id={rng.randint(100000, 999999)} HTTP/1.1\r\n"
                          f"Host: bench\r\n\r\n".encode())
                buf = read_response(s, buf)
            s.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n, random.Random(seed + i))) for i, n in enumerate(per)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} connections failed: {errors[0]}")


def totals(path):
    """The instruction count of a callgrind dump (its `summary:` or `totals:` line)."""
    for line in open(path):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def callgrind(pid, what):
    r = subprocess.run(["callgrind_control", what, str(pid)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control {what} {pid}: {r.stdout} {r.stderr}")


def main():
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    warm_up = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (bench/deps.sh valgrind)")
    hard = raise_nofile()
    tmp = tempfile.mkdtemp(prefix="ringgate-instr-")
    os.makedirs(OUT_DIR, exist_ok=True)
    procs = []

    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []

    def measure(name, cmd, log):
        out = os.path.join(tmp, f"{name}.callgrind")
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        p = subprocess.Popen(taskset + vg + cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        procs.append(p)
        try:
            wait_port(PORT, within=120)
            drive(warm_up, 1)
            callgrind(p.pid, "--zero")
            t0 = time.time()
            drive(requests, 2)
            took = time.time() - t0
            callgrind(p.pid, "--dump")
            dumps = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
            if not dumps:
                raise RuntimeError(f"no dump of {name} in {tmp}")
            instr = totals(dumps[-1])
        except BaseException:
            print(open(log).read()[-3000:])
            raise
        finally:
            stop(p, 30)
        per = instr / requests
        print(f"  {name:<9} {instr:>14,} instructions / {requests} requests = {per:9,.0f} a request "
              f"({requests / took:,.0f} requests/s under callgrind)", flush=True)
        return per, dumps[-1]

    results = {}
    try:
        for port in BACKENDS:
            p = subprocess.Popen([SERVER], env={"PORT": str(port), "SERVER_ID": f"b{port}", "BIND": "127.0.0.1",
                                                "PATH": os.environ.get("PATH", "")},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
        for port in BACKENDS:
            wait_port(port)
        conf = os.path.join(tmp, "lb.toml")
        with open(conf, "w") as f:
            f.write(ringgate_conf(tmp, "keep-alive", 100) + '[ring]\nrequest_hash = "mix64"\n')
        per, dump = measure("ringgate", [os.environ.get("RINGGATE_BIN", GW), "serve", "--config", conf],
                            os.path.join(tmp, "ringgate.log"))
        results["ringgate"] = per
        kept = os.path.join(OUT_DIR, "ringgate.out")
        shutil.copy(dump, kept)

        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        nconf = os.path.join(tmp, "nginx.conf")
        with open(nconf, "w") as f:
            f.write("master_process off;\n" + nginx_conf(tmp, "keep-alive", 100, hard))
        results["nginx"], _ = measure("NGINX", [nginx, "-c", nconf, "-p", tmp],
                                      os.path.join(tmp, "nginx.log"))

        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        hconf = os.path.join(tmp, "haproxy.cfg")
        with open(hconf, "w") as f:
            f.write(haproxy_conf("keep-alive", 100, hard))
        results["haproxy"], _ = measure("HAProxy", [haproxy, "-db", "-f", hconf],
                                        os.path.join(tmp, "haproxy.log"))

        rg = results["ringgate"]
        print(f"ringgate/NGINX {rg / results['nginx']:.2f}x (goal <= 0.7x), "
              f"ringgate/HAProxy {rg / results['haproxy']:.2f}x")
        chart = os.environ.get("CHART", os.path.join(ROOT, "docs", "img", "instructions.svg"))
        bars(chart, "User-space instructions per proxied request (callgrind, one worker/thread each)",
             "instructions a request", ["instructions"], ["ringgate", "NGINX", "HAProxy"],
             [[results["ringgate"], results["nginx"], results["haproxy"]]])
        print(f"chart: {chart}")
        print(f"\nringgate's top functions by inclusive instructions, per request ({kept}):")
        ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", kept],
                             capture_output=True, text=True).stdout
        shown = 0
        for line in ann.splitlines():
            m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)", line)
            if m and shown < 40:
                n = int(m.group(1).replace(",", ""))
                print(f"  {n / requests:9,.0f}  {float(m.group(2)):5.1f} %  {m.group(3)[:150]}")
                shown += 1
    finally:
        stop_all(procs, tmp, within=30)


if __name__ == "__main__":
    run(main)
