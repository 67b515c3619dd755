#!/usr/bin/env python3
"""HTTP/2 clients and gRPC unary through ringgate, HAProxy and NGINX, each on a core of its own:
requests/s and CPU per request, in one run (issue 26's measure).

    bench/h2_pinned.py [REQUESTS] [ROUNDS]     (defaults 200000 and 3; `make bench-h2-pinned`)

Two `ringgate-server` replicas on loopback. Each proxy runs with one serving thread/worker on CPU
0 (`taskset`): ringgate twice (`upstream_protocol = "http1"` for the HTTP/2 clients, `"h2c"` for
gRPC), HAProxy `nbthread 1` (a `proto h2` frontend; HTTP/1.1 and `proto h2` backends), NGINX one
worker (`http2` listeners; `proxy_pass` with keep-alive, and `grpc_pass`). The replicas and h2load
share CPU 1, the same for every proxy. Each load is h2load (h2c prior knowledge) `-c8 -m16`,
`?id=1` and `?id=2` in turn, REQUESTS requests after a warm-up of REQUESTS/10; the gRPC load posts
one gRPC message (`content-type: application/grpc`, `te: trailers`) to the replicas' unary
`ringgate.demo.Demo/Who`. Rounds interleave the proxies.

CPU per request is the proxy process's user + system time over the load (`/proc/PID/stat`, all
of its threads; NGINX's worker) divided by the requests answered, printed as user and system
time too. Each figure is the median over the rounds, and the ratios are ringgate's against
HAProxy's and against the faster peer's, then round by round against HAProxy's; the
medians are drawn in docs/img/h2_pinned.svg and h2_pinned_cpu.svg (CHART= elsewhere: the
requests/s chart's path, the CPU one beside it). Ports 18400-18420; loopback
only; everything started is stopped on exit, also on failure.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from proxies_rss import ROOT, GW, children, start_servers, stop_all, run, wait_port
from svgbars import bars

REPLICAS = [18401, 18402]
PORTS = {"ringgate": 18410, "ringgate-h2c": 18411, "HAProxy": 18412, "HAProxy-h2": 18413,
         "NGINX": 18414, "NGINX-grpc": 18415}
TICK = os.sysconf("SC_CLK_TCK")
GRPC_WHO = b"\x00\x00\x00\x00\x04\x0a\x02hi"

# (label, proxy, port key, gRPC)
LOADS = [
    ("HTTP/2 clients, HTTP/1.1 to the replicas", "ringgate", "ringgate", False),
    ("HTTP/2 clients, HTTP/1.1 to the replicas", "HAProxy", "HAProxy", False),
    ("HTTP/2 clients, HTTP/1.1 to the replicas", "NGINX", "NGINX", False),
    ("gRPC unary, HTTP/2 to the replicas", "ringgate", "ringgate-h2c", True),
    ("gRPC unary, HTTP/2 to the replicas", "HAProxy", "HAProxy-h2", True),
    ("gRPC unary, HTTP/2 to the replicas", "NGINX", "NGINX-grpc", True),
]


def ringgate_conf(tmp, port, protocol):
    servers = ", ".join(f'{{ name = "r{p}", address = "127.0.0.1:{p}" }}' for p in REPLICAS)
    return (f'listen = "127.0.0.1:{port}"\n[provider]\nkind = "static"\nservers = [{servers}]\n'
            f'[proxy]\nupstream_protocol = "{protocol}"\n[policy]\ndir = "{tmp}/policies"\n')


def haproxy_conf():
    servers = "\n".join(f"  server r{p} 127.0.0.1:{p}" for p in REPLICAS)
    h2 = "\n".join(f"  server r{p} 127.0.0.1:{p} proto h2" for p in REPLICAS)
    return f"""global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend h1be
  bind 127.0.0.1:{PORTS["HAProxy"]} proto h2
  default_backend h1
frontend h2be
  bind 127.0.0.1:{PORTS["HAProxy-h2"]} proto h2
  default_backend h2
backend h1
  balance url_param id
  hash-type consistent
  http-reuse always
{servers}
backend h2
  balance url_param id
  hash-type consistent
  http-reuse always
{h2}
"""


def nginx_conf(tmp):
    ups = " ".join(f"server 127.0.0.1:{p};" for p in REPLICAS)
    return f"""worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  http2_max_requests 10000000;
  client_body_temp_path {tmp};
  upstream h1 {{ hash $arg_id consistent; {ups} keepalive 64; }}
  upstream g {{ hash $arg_id consistent; {ups} keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS["NGINX"]} http2; location / {{ proxy_pass http://h1;
    proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
  server {{ listen 127.0.0.1:{PORTS["NGINX-grpc"]} http2; location / {{ grpc_pass grpc://g; }} }}
}}
"""


def cpu_ticks(pid):
    """The process's user and system CPU time so far, in clock ticks (all of its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def h2load(prefix, port, grpc, n, body):
    path = "/ringgate.demo.Demo/Who" if grpc else "/home"
    cmd = prefix + ["h2load", "-c8", "-m16", f"-n{n}"]
    if grpc:
        cmd += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    cmd += [f"http://127.0.0.1:{port}{path}?id=1", f"http://127.0.0.1:{port}{path}?id=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    if not rate or not done:
        raise RuntimeError(f"h2load said:\n{out}")
    return float(rate.group(1)), int(done.group(1)), int(done.group(2))


def median(values):
    return sorted(values)[len(values) // 2]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if not shutil.which("h2load"):
        sys.exit("h2load is missing (bench/deps.sh h2load)")
    tmp = tempfile.mkdtemp(prefix="ringgate-h2-pinned-")
    os.makedirs(os.path.join(tmp, "policies"))
    procs = []
    pin = os.cpu_count() >= 2 and shutil.which("taskset")
    proxy_cpu = ["taskset", "-c", "0"] if pin else []
    rest_cpu = ["taskset", "-c", f"1-{os.cpu_count() - 1}"] if pin else []
    if not pin:
        print("one CPU or no taskset: the proxies are not pinned; the figures are not comparable",
              file=sys.stderr)

    def start(cmd, env=None):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(p)
        return p

    try:
        start_servers(start, REPLICAS, rest_cpu, prefix="r")
        pids = {}
        for key, protocol in (("ringgate", "http1"), ("ringgate-h2c", "h2c")):
            conf = os.path.join(tmp, f"{key}.toml")
            with open(conf, "w") as f:
                f.write(ringgate_conf(tmp, PORTS[key], protocol))
            pids[key] = start(proxy_cpu + [GW, "serve", "--config", conf]).pid
        hconf = os.path.join(tmp, "haproxy.cfg")
        with open(hconf, "w") as f:
            f.write(haproxy_conf())
        haproxy = start(proxy_cpu + [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", hconf])
        pids["HAProxy"] = pids["HAProxy-h2"] = haproxy.pid
        nconf = os.path.join(tmp, "nginx.conf")
        with open(nconf, "w") as f:
            f.write(nginx_conf(tmp))
        nginx = start(proxy_cpu + [shutil.which("nginx") or "/usr/sbin/nginx", "-c", nconf, "-p", tmp])
        for port in PORTS.values():
            wait_port(port)
        time.sleep(1)
        worker = children(nginx.pid)
        pids["NGINX"] = pids["NGINX-grpc"] = worker[0] if worker else nginx.pid
        body = os.path.join(tmp, "who.bin")
        with open(body, "wb") as f:
            f.write(GRPC_WHO)

        results = {(label, proxy): [] for label, proxy, _, _ in LOADS}
        print(f"h2load -c8 -m16, {n:,} requests after {n // 10:,}, {rounds} rounds interleaved; each "
              f"proxy alone on CPU 0:", flush=True)
        for r in range(rounds):
            for label, proxy, key, grpc in LOADS:
                h2load(rest_cpu, PORTS[key], grpc, n // 10, body)
                user0, sys0 = cpu_ticks(pids[key])
                rate, ok, failed = h2load(rest_cpu, PORTS[key], grpc, n, body)
                user1, sys1 = cpu_ticks(pids[key])
                if ok == 0:
                    raise RuntimeError(f"{proxy}: no request succeeded ({label})")
                user, system = ((user1 - user0) * 1e6 / TICK / ok, (sys1 - sys0) * 1e6 / TICK / ok)
                per = user + system
                results[(label, proxy)].append((rate, per))
                print(f"  round {r + 1} {label:<42} {proxy:<9} {rate:9,.0f} requests/s "
                      f"{per:6.2f} us CPU a request (user {user:5.2f}, system {system:5.2f}; "
                      f"{failed} failed)", flush=True)
        print("\nmedians:")
        proxies = list(dict.fromkeys(proxy for _, proxy, _, _ in LOADS))
        labels = list(dict.fromkeys(label for label, _, _, _ in LOADS))
        chart = {}
        for label in labels:
            med = {p: (median([x[0] for x in v]), median([x[1] for x in v]))
                   for (l, p), v in results.items() if l == label}
            for p, (rate, per) in med.items():
                print(f"  {label:<42} {p:<9} {rate:9,.0f} requests/s {per:6.2f} us CPU a request")
            chart[label] = med
            rg, hp = med["ringgate"], med["HAProxy"]
            faster = max(("HAProxy", "NGINX"), key=lambda p: med[p][0])
            print(f"  ringgate / HAProxy: {rg[0] / hp[0]:.2f}x requests/s, {rg[1] / hp[1]:.2f}x CPU a request; "
                  f"/ the faster peer ({faster}): {rg[0] / med[faster][0]:.2f}x requests/s")
            # Each round's ratio, ringgate against HAProxy measured just after it: the spread
            # between rounds is the machine's, and shows how far the medians can be trusted.
            pairs = zip(results[(label, "ringgate")], results[(label, "HAProxy")])
            print("  round by round, ringgate / HAProxy: " + ", ".join(
                f"{a[0] / b[0]:.2f}x/{a[1] / b[1]:.2f}x" for a, b in pairs) + " (requests/s / CPU a request)")
        path = os.environ.get("CHART", os.path.join(ROOT, "docs", "img", "h2_pinned.svg"))
        cpu_path = path[:-len(".svg")] + "_cpu.svg" if path.endswith(".svg") else path + "_cpu"
        rows = [label.split(",")[0] for label in labels]
        title = f"Each proxy alone on one core, h2load -c8 -m16, medians of {rounds} rounds"
        bars(path, f"{title}: requests/s", "requests/s", rows, proxies,
             [[chart[label][p][0] for p in proxies] for label in labels])
        bars(cpu_path, f"{title}: CPU a request", "microseconds", rows, proxies,
             [[chart[label][p][1] for p in proxies] for label in labels], fmt="{:.2f} us")
        print(f"charts: {path}, {cpu_path}")
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    run(main)
