#!/usr/bin/env python3
"""Autoscaling under a load ramp: the real gateway with process replicas, driven by
`ringgate-lab load` through phases of concurrent clients (8 -> 64 -> 8 by default), each request
carrying simulated work (`/home?work_ms=`). Samples /lb/status once a second and writes:

  <out>.csv  one row a second: t, N in the ring, N asked for, in flight, decisions
  <out>.svg  a chart of N and in flight over time, with the phases' latency quantiles

and prints each phase's loadgen summary (requests, failures, p50/p99) and the replicas the
autoscaler removed with the load figures it chose them by (from the gateway's log).

Usage: bench/autoscale_run.py [--gateway target/release/ringgate] [--lab target/release/ringgate-lab]
       [--phases 8:40,64:90,8:150] [--work-ms 50] [--hash mix64] [--out docs/img/autoscale]
Stdlib only; loopback only; stops the gateway (and so its replicas) at the end.
"""

import argparse
import csv
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

CONFIG = """listen = "127.0.0.1:{port}"
[ring]
request_hash = "{hash}"
vnode_hash = "{hash}"
[replicas]
count = 1
max_replicas = 16
[provider]
kind = "process"
server_binary = "{server}"
[health]
interval = "250ms"
timeout = "500ms"
rise = 1
fall = 2
slow_start = "{slow_start}"
[autoscale]
enabled = true
min = 1
max = 10
target_in_flight = {target}
stable_window = "{stable}"
panic_window = "{panic}"
scale_down_delay = "{delay}"
max_step = 4
[policy]
dir = "{policies}"
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(base):
    with urllib.request.urlopen(base + "/lb/status", timeout=5) as r:
        return json.load(r)["message"]


def run_phase(lab, url, clients, secs, results, name):
    out = subprocess.run(
        [lab, "load", url, "-c", str(clients), "-d", f"{secs}s"],
        capture_output=True, text=True, check=False)
    results.append((name, clients, secs, out.stdout.strip() + out.stderr.strip()))


def svg_chart(rows, phases, path, target):
    W, H, L, B = 760, 300, 50, 40
    t_max = max(r["t"] for r in rows) or 1
    n_max = max(max(r["up"] for r in rows), max(r["in_flight"] / target for r in rows), 1) * 1.15
    x = lambda t: L + (t / t_max) * (W - L - 10)
    y = lambda v: H - B - (v / n_max) * (H - B - 20)
    n_line = " ".join(f"{x(r['t']):.1f},{y(r['up']):.1f}" for r in rows)
    d_line = " ".join(f"{x(r['t']):.1f},{y(r['desired']):.1f}" for r in rows)
    f_line = " ".join(f"{x(r['t']):.1f},{y(r['in_flight'] / target):.1f}" for r in rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>']
    for k in range(0, int(n_max) + 1, 2):
        parts.append(f'<line x1="{L}" x2="{W - 10}" y1="{y(k):.1f}" y2="{y(k):.1f}" stroke="#eee"/>'
                     f'<text x="{L - 6}" y="{y(k) + 4:.1f}" text-anchor="end" fill="#666">{k}</text>')
    start = 0
    for name, clients, secs, summary in phases:
        m = re.search(r"p50[^0-9]*([0-9.]+ ?[mµu]?s).*?p99[^0-9]*([0-9.]+ ?[mµu]?s)", summary, re.S)
        lat = f"p50 {m.group(1)}, p99 {m.group(2)}" if m else ""
        parts.append(f'<line x1="{x(start):.1f}" x2="{x(start):.1f}" y1="20" y2="{H - B}" stroke="#ccc" stroke-dasharray="3 3"/>'
                     f'<text x="{x(start) + 4:.1f}" y="32" fill="#444">{clients} clients</text>'
                     f'<text x="{x(start) + 4:.1f}" y="46" fill="#888">{lat}</text>')
        start += secs
    parts += [f'<polyline points="{f_line}" fill="none" stroke="#999" stroke-width="1.5" stroke-dasharray="4 3"/>',
              f'<polyline points="{d_line}" fill="none" stroke="#f59e0b" stroke-width="1.5"/>',
              f'<polyline points="{n_line}" fill="none" stroke="#3b6ef5" stroke-width="2.5"/>',
              f'<text x="{L}" y="{H - 12}" fill="#3b6ef5">N in the ring</text>',
              f'<text x="{L + 110}" y="{H - 12}" fill="#f59e0b">N asked for</text>',
              f'<text x="{L + 210}" y="{H - 12}" fill="#777">requests in flight / target ({target:g})</text>',
              f'<text x="{W - 10}" y="{H - 12}" text-anchor="end" fill="#666">{t_max:.0f} s</text>',
              "</svg>"]
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", default="target/release/ringgate")
    p.add_argument("--server", default=None, help="ringgate-server (default: beside --gateway)")
    p.add_argument("--lab", default="target/release/ringgate-lab")
    p.add_argument("--phases", default="8:40,64:90,8:150")
    p.add_argument("--work-ms", type=int, default=50)
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--stable", default="20s")
    p.add_argument("--panic", default="4s")
    p.add_argument("--delay", default="60s")
    p.add_argument("--slow-start", default="0s", help="health.slow_start: ramps, and slow stops")
    p.add_argument("--hash", default="mix64", help="ring hashes (quadratic is the spec's default)")
    p.add_argument("--out", default="docs/img/autoscale")
    a = p.parse_args()
    server = a.server or os.path.join(os.path.dirname(a.gateway), "ringgate-server")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="ringgate-autoscale-")
    os.makedirs(os.path.join(tmp, "policies"))
    conf = os.path.join(tmp, "lb.toml")
    with open(conf, "w") as f:
        f.write(CONFIG.format(port=port, server=os.path.abspath(server), target=a.target, hash=a.hash, slow_start=a.slow_start,
                              stable=a.stable, panic=a.panic, delay=a.delay,
                              policies=os.path.join(tmp, "policies")))
    log_path = os.path.join(tmp, "gateway.log")
    log = open(log_path, "w")
    gw = subprocess.Popen([a.gateway, "serve", "--config", conf], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if status(base)["up"] >= 1:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit("the gateway did not come up; see " + log_path)
            time.sleep(0.2)
        phases = [tuple(int(v) for v in ph.split(":")) for ph in a.phases.split(",")]
        results = []
        url = f"{base}/home?work_ms={a.work_ms}"

        def driver():
            for i, (clients, secs) in enumerate(phases):
                run_phase(a.lab, url, clients, secs, results, f"phase {i + 1}")

        th = threading.Thread(target=driver)
        t0 = time.time()
        th.start()
        rows = []
        while th.is_alive():
            s = status(base)
            auto = s["autoscale"]
            in_flight = sum(max(r["in_flight"], 0) for r in s["replicas"])
            d = auto.get("last_decision") or {}
            rows.append({"t": round(time.time() - t0, 1), "up": s["up"], "desired": auto["desired"],
                         "in_flight": in_flight, "last": f'{d.get("direction", "")} {d.get("from", "")}->{d.get("to", "")}'})
            time.sleep(1)
        th.join()
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        log.close()
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    svg_chart(rows, results, a.out + ".svg", a.target)
    for name, clients, secs, summary in results:
        print(f"== {name}: {clients} clients for {secs} s\n{summary}\n")
    text = open(log_path).read()
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    for line in text.splitlines():
        line = ansi.sub("", line)
        if "autoscale decision" in line or "least loaded replica" in line:
            print(line)
    first_up = next((r["t"] for r in rows if r["up"] > rows[0]["up"]), None)
    print(f"\nN max {max(r['up'] for r in rows)}, first rise at {first_up} s; samples in {a.out}.csv, chart {a.out}.svg")


if __name__ == "__main__":
    main()
