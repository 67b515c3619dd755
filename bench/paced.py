#!/usr/bin/env python3
"""Latency at one fixed offered rate: ringgate against NGINX and HAProxy, in one run.

    bench/paced.py [SECONDS] [ROUNDS]       (defaults 60 and 3; `make bench-paced`)

The rig of `bench/proxies_rss.py` (three `ringgate-server` backends on loopback, hashing on
`?id=`, one worker/thread each: ringgate on the static provider with `mix64`, NGINX one worker,
HAProxy `nbthread 1`), all three proxies started at once on ports of their own. Pinned as `make
bench` pins: each proxy on CPU 0, the backends and the load on CPU 1 (`PIN=0` runs them
anywhere). The load is h2load in HTTP/1.1 (`--h1`), 64 keep-alive connections, 4,096 URIs with
random 6-digit `?id=`s taken in turn.

1. Each proxy's maximum: h2load unpaced for 10 s (after 2 s of warm-up), rounds interleaved;
   each proxy's median over the rounds.
2. The offered rate R is half the slowest proxy's maximum.
3. Paced: h2load `--rps R/64` on each of the 64 connections for SECONDS, each proxy in turn,
   ROUNDS interleaved rounds; p50/p99/p99.9 from h2load's per-request log (`--log-file`), and
   each proxy's median over the rounds, drawn in docs/img/paced_latency.svg (CHART= elsewhere).

h2load's pacing is per connection and its latency starts when a request is written: a request
whose turn comes while its connection still waits for the previous answer is sent late, and
that wait is not counted (at half the maximum, with 64 connections each sending every
64/R s, this is rare; the achieved rate is printed beside each figure). Loopback only;
everything started is stopped on exit, also on failure.
"""
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from svgbars import bars
from proxies_rss import BACKENDS, GW, PORT, ROOT, haproxy_conf, nginx_conf, raise_nofile, \
    ringgate_conf, start_servers, stop_all, run, wait_port

CLIENTS = 64
PORTS = {"ringgate": 18300, "NGINX": 18310, "HAProxy": 18320}


def h2load(prefix, uris, args, log=None):
    """One h2load run over the URIs in the file `uris`: (requests/s, succeeded, failed)."""
    cmd = prefix + ["h2load", "--h1", "-t1", f"-c{CLIENTS}", "-m1", "-i", uris] + args
    if log:
        cmd.append(f"--log-file={log}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not rate or not done or not status:
        raise RuntimeError(f"h2load said:\n{out}")
    failed = int(done.group(5)) + int(done.group(6)) + sum(int(status.group(i)) for i in (2, 3, 4))
    return float(rate.group(1)), int(done.group(4)), failed


def percentiles(log):
    lat = sorted(int(line.split("\t")[2]) for line in open(log) if line.strip())
    if not lat:
        raise RuntimeError(f"no requests in {log}")

    def p(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0
    return len(lat), p(0.50), p(0.99), p(0.999), lat[-1] / 1000.0


def main():
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if not shutil.which("h2load"):
        sys.exit("h2load is missing (bench/deps.sh h2load)")
    hard = raise_nofile()
    tmp = tempfile.mkdtemp(prefix="ringgate-paced-")
    procs = []
    pin = os.environ.get("PIN", "1") != "0" and os.cpu_count() >= 2 and shutil.which("taskset")
    proxy_cpu = ["taskset", "-c", "0"] if pin else []
    rest_cpu = ["taskset", "-c", f"1-{os.cpu_count() - 1}"] if pin else []

    def start(cmd, env=None, log=os.devnull):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
        procs.append(p)
        return p

    def on_port(conf, port):
        return conf.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}")

    try:
        start_servers(start, BACKENDS, rest_cpu)
        conf = os.path.join(tmp, "lb.toml")
        with open(conf, "w") as f:
            f.write(on_port(ringgate_conf(tmp, "keep-alive", 1000), PORTS["ringgate"])
                    + '[ring]\nrequest_hash = "mix64"\n')
        start(proxy_cpu + [os.environ.get("RINGGATE_BIN", GW), "serve", "--config", conf],
              log=os.path.join(tmp, "ringgate.log"))
        nconf = os.path.join(tmp, "nginx.conf")
        with open(nconf, "w") as f:
            # 128 idle replica connections kept, as `make bench` keeps: with `proxies_rss`'s 32
            # (enough for idle clients) 64 busy clients make NGINX open and close replica
            # connections all the time.
            f.write(on_port(nginx_conf(tmp, "keep-alive", 1000, hard), PORTS["NGINX"])
                    .replace("keepalive 32;", "keepalive 128;"))
        start(proxy_cpu + [shutil.which("nginx") or "/usr/sbin/nginx", "-c", nconf, "-p", tmp])
        hconf = os.path.join(tmp, "haproxy.cfg")
        with open(hconf, "w") as f:
            f.write(on_port(haproxy_conf("keep-alive", 1000, hard), PORTS["HAProxy"]))
        start(proxy_cpu + [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", hconf])
        for port in PORTS.values():
            wait_port(port)
        time.sleep(2)

        rng = random.Random(29)
        uris = {}
        for name, port in PORTS.items():
            uris[name] = os.path.join(tmp, f"uris-{port}")
            with open(uris[name], "w") as f:
                for _ in range(4096):
                    f.write(f"http://127.0.0.1:{port}/home?id={rng.randint(100000, 999999)}\n")
            rng = random.Random(29)  # the same ids for every proxy

        print(f"maximum (h2load --h1 -c{CLIENTS}, 10 s after 2 s of warm-up, {rounds} rounds interleaved):",
              flush=True)
        maxima = {name: [] for name in PORTS}
        for r in range(rounds):
            for name in PORTS:
                rate, ok, failed = h2load(rest_cpu, uris[name], ["--warm-up-time=2s", "-D10"])
                maxima[name].append(rate)
                print(f"  round {r + 1} {name:<9} {rate:9,.0f} requests/s ({failed} failed)", flush=True)
        medians = {name: sorted(v)[len(v) // 2] for name, v in maxima.items()}
        slowest = min(medians, key=medians.get)
        offered = int(medians[slowest] / 2)
        per_client = max(1, offered // CLIENTS)
        offered = per_client * CLIENTS
        print(f"medians: " + ", ".join(f"{n} {v:,.0f}" for n, v in medians.items())
              + f"; the slowest is {slowest}; offered rate {offered:,} requests/s "
              f"({per_client} a second on each of {CLIENTS} connections)", flush=True)

        print(f"\npaced at {offered:,} requests/s for {seconds} s, {rounds} rounds interleaved "
              f"(latency in ms):", flush=True)
        paced = {name: [] for name in PORTS}
        for r in range(rounds):
            for name in PORTS:
                log = os.path.join(tmp, f"paced-{name}-{r}.log")
                rate, ok, failed = h2load(rest_cpu, uris[name], [f"--rps={per_client}", f"-D{seconds}"], log)
                n, p50, p99, p999, worst = percentiles(log)
                paced[name].append((p50, p99, p999))
                print(f"  round {r + 1} {name:<9} {ok / seconds:9,.0f} requests/s achieved, {failed} failed: "
                      f"p50 {p50:6.2f}  p99 {p99:6.2f}  p99.9 {p999:6.2f}  max {worst:7.2f}", flush=True)
        print(f"medians over the {rounds} rounds (ms):")
        med = {}
        for name, runs in paced.items():
            med[name] = [sorted(run[i] for run in runs)[len(runs) // 2] for i in range(3)]
            print(f"  {name:<9} p50 {med[name][0]:6.2f}  p99 {med[name][1]:6.2f}  p99.9 {med[name][2]:6.2f}")
        chart = os.environ.get("CHART", os.path.join(ROOT, "docs", "img", "paced_latency.svg"))
        bars(chart, f"Latency at {offered:,} requests/s offered (paced, {seconds} s, median of {rounds} rounds)",
             "milliseconds", ["p50", "p99", "p99.9"], list(PORTS),
             [[med[name][i] for name in PORTS] for i in range(3)], fmt="{:.2f} ms")
        print(f"chart: {chart}")
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    run(main)
