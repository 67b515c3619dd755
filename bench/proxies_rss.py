"""What a proxy's resident set grows by per open connection: ringgate against NGINX and HAProxy,
one worker/thread each, in one run, over the same three `ringgate-server` backends.

A library for `bench/tunnels_rss.py` (open idle WebSocket tunnels) and `bench/idle_rss.py` (idle
keep-alive client connections): each says how to open its connections (`open_fn`) and which
kind they are (`kind`: "tunnels" or "keep-alive", which decides the proxies' timeouts and
upstream settings); [`compare`] starts the backends, then each proxy in turn, opens a warm-up
batch, reads the proxy's RSS (all of its processes, from /proc), opens N more, reads it again,
and reports the growth over N. Loopback only; everything started is stopped on exit.
"""
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GW = os.environ.get("RINGGATE_BIN", os.path.join(ROOT, "target/release/ringgate"))
SERVER = os.environ.get("RINGGATE_SERVER_BIN", os.path.join(ROOT, "target/release/ringgate-server"))
BACKENDS = [18301, 18302, 18303]
PORT = 18300
WARM_UP = 200
# Seconds the connections sit idle before the RSS that counts is read. Idle means idle for a
# while: ringgate holds a connection without its task once it has idled a second
# (`listener::IDLE_HOLD_AFTER`), and gives the pages the tasks freed back to the system when it is
# quiet (its trimmer looks every 5 s, `memory::PERIOD`). Every proxy gets the same waits; the
# RSS 2 s after the last connections is printed beside it.
SETTLE = int(os.environ.get("SETTLE", "12"))


def stop(p, within=10):
    """Stops process `p` (SIGTERM; killed if it has not exited within `within` seconds)."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(within)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def quiet_starter(procs):
    """A `start(cmd, **kw)` that runs `cmd` with its output dropped and keeps the process in
    `procs`, for [`stop_all`] to stop."""
    def start(cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        procs.append(p)
        return p
    return start


def start_servers(start, ports, cpu=(), prefix="b"):
    """Starts a `ringgate-server` on each of `ports` (loopback), named `<prefix><port>`, with the
    script's `start(cmd, env=...)` (which keeps the process to stop it), under `cpu` (a `taskset`
    prefix, or none), and waits until each listens."""
    for port in ports:
        start(list(cpu) + [SERVER], env={"PORT": str(port), "SERVER_ID": f"{prefix}{port}", "BIND": "127.0.0.1",
                                         "PATH": os.environ.get("PATH", "")})
    for port in ports:
        wait_port(port)


def stop_all(procs, tmp, within=10):
    """Stops what a run started, the last started first (each as [`stop`] does), and removes its
    temporary directory `tmp`."""
    for p in reversed(procs):
        stop(p, within)
    shutil.rmtree(tmp, ignore_errors=True)


def run(main):
    """Runs a bench script's `main` with SIGTERM unwinding like an error, so that its `finally`
    stops what it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()


def raise_nofile():
    """The hard descriptor limit, made the soft one too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


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


def ringgate_conf(tmp, kind, n):
    servers = ", ".join(f'{{ name = "b{p}", address = "127.0.0.1:{p}" }}' for p in BACKENDS)
    proxy = (f'connect_timeout = "10s"\nmax_requests = {n + 1000}\nmax_requests_per_ip = {n + 1000}\n'
             f'max_requests_per_replica = {n + 1000}\n')
    if kind == "keep-alive":
        # The wait for a kept-alive connection's next request is bounded by this one.
        proxy += 'header_read_timeout = "1h"\n'
        # One descriptor a client (the cap derived from nofile keeps half for replicas).
        proxy += f'max_connections = {n + WARM_UP + 500}\n'
    return (f'listen = "127.0.0.1:{PORT}"\n[provider]\nkind = "static"\nservers = [{servers}]\n'
            f'[proxy]\n{proxy}[tunnels]\nmax = {n + 1000}\n[policy]\ndir = "{tmp}/policies"\n')


def nginx_conf(tmp, kind, n, hard):
    ups = "\n".join(f"server 127.0.0.1:{p};" for p in BACKENDS)
    if kind == "tunnels":
        upstream_extra = ""
        location = """      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;"""
    else:
        upstream_extra = "keepalive 32; keepalive_requests 1000000;"
        location = '      proxy_set_header Connection "";'
    return f"""worker_processes 1;
worker_rlimit_nofile {hard};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections {n * 4}; }}
http {{
  access_log off;
  keepalive_timeout 1h;
  keepalive_requests 1000000;
  upstream backends {{ hash $arg_id consistent; {ups} {upstream_extra} }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{PORT};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
{location}
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}
}}
"""


def haproxy_maxconn(hard):
    return (hard - 200) // 2


def haproxy_conf(kind, n, hard):
    srvs = "\n".join(f"  server b{p} 127.0.0.1:{p}" for p in BACKENDS)
    # HAProxy reserves two descriptors a connection, whatever it carries.
    maxconn = haproxy_maxconn(hard)
    if kind == "tunnels":
        extra = "  timeout tunnel 1h\n"
    else:
        extra = "  timeout http-keep-alive 1h\n  option http-keep-alive\n  http-reuse always\n"
    return f"""global
  nbthread 1
  maxconn {maxconn}
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
{extra}frontend fe
  bind 127.0.0.1:{PORT}
  default_backend be
backend be
  balance url_param id
  hash-type consistent
{srvs}
"""


def compare(kind, n, open_fn, unit):
    """Runs the three proxies in turn with `n` connections opened by `open_fn(count, first_id)`
    (a list of sockets); prints each one's RSS growth per `unit` and returns {name: KiB}."""
    hard = raise_nofile()
    tmp = tempfile.mkdtemp(prefix="ringgate-rss-")
    procs = []
    start = quiet_starter(procs)

    def measure(name, pids_of, n=n):
        # A few connections first, so what the first ones allocate once (buffers, pools, the
        # runtime's structures) is not counted as per connection.
        warm = open_fn(WARM_UP, 0)
        time.sleep(1)
        before = rss_kib(pids_of())
        # Then the connections in two halves, the RSS read after each has idled SETTLE s: the
        # growth over the second half is what one more idle connection costs, between two
        # settled states (a proxy that gives memory back when quiet, as ringgate does, may also
        # give back what it held before the first half, which the growth from `before` would
        # count against the connections).
        half = n // 2
        socks = open_fn(half, WARM_UP)
        time.sleep(SETTLE)
        middle = rss_kib(pids_of())
        socks += open_fn(n - half, WARM_UP + half)
        time.sleep(2)
        early = rss_kib(pids_of())
        time.sleep(max(0, SETTLE - 2))
        after = rss_kib(pids_of())
        per = (after - middle) / (n - half)
        for s in socks + warm:
            s.close()
        print(f"  {name:<17} RSS {before / 1024:7.1f} MiB -> {middle / 1024:7.1f} MiB with {half} more "
              f"{unit}s -> {after / 1024:7.1f} MiB with {n - half} more ({early / 1024:.1f} MiB 2 s "
              f"after them; each half read after idling {SETTLE} s): {per:5.2f} KiB per {unit} "
              f"({(after - before) / n:.2f} over all {n})", flush=True)
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

        # ringgate: static provider, one serving thread; RINGGATE_BEFORE_BIN adds a second
        # build (e.g. main's) to the same run, as "ringgate (before)".
        builds = [("ringgate", GW)]
        if os.environ.get("RINGGATE_BEFORE_BIN"):
            builds.insert(0, ("ringgate (before)", os.environ["RINGGATE_BEFORE_BIN"]))
        for name, gw_bin in builds:
            conf = os.path.join(tmp, "lb.toml")
            with open(conf, "w") as f:
                f.write(ringgate_conf(tmp, kind, n))
            log = os.path.join(tmp, "ringgate.log")
            gw = subprocess.Popen(taskset + [gw_bin, "serve", "--config", conf],
                                  stdout=subprocess.DEVNULL, stderr=open(log, "w"))
            procs.append(gw)
            wait_port(PORT)
            time.sleep(2)
            try:
                results[name] = measure(name, lambda: [gw.pid])
            except BaseException:
                print(open(log).read()[-3000:])
                raise
            stop(gw)

        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if nginx and os.environ.get("PEERS", "1") != "0":
            nconf = os.path.join(tmp, "nginx.conf")
            with open(nconf, "w") as f:
                f.write(nginx_conf(tmp, kind, n, hard))
            ng = start([nginx, "-c", nconf, "-p", tmp])
            wait_port(PORT)
            time.sleep(1)
            try:
                results["nginx"] = measure("NGINX", lambda: [ng.pid] + children(ng.pid))
            except BaseException:
                print(open(os.path.join(tmp, "nginx-error.log")).read()[-2000:])
                raise
            stop(ng)
        elif not nginx:
            print("  NGINX      not installed (bench/deps.sh proxies)")

        haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
        if haproxy and os.environ.get("PEERS", "1") != "0":
            hconf = os.path.join(tmp, "haproxy.cfg")
            with open(hconf, "w") as f:
                f.write(haproxy_conf(kind, n, hard))
            hp = start([haproxy, "-f", hconf])
            wait_port(PORT)
            time.sleep(1)
            # With the hard nofile at 20,000, HAProxy's maxconn stops short of 10,000 clients.
            n_hp = min(n, haproxy_maxconn(hard) - WARM_UP - 100)
            results["haproxy"] = measure("HAProxy", lambda: [hp.pid] + children(hp.pid), n_hp)
            stop(hp)
        elif not haproxy:
            print("  HAProxy    not installed (bench/deps.sh proxies)")

        rg = results["ringgate"]
        ratios = ", ".join(f"{rg / v:.2f}x {k}'s" for k, v in results.items() if k != "ringgate" and v > 0)
        print(f"ringgate: {rg:.2f} KiB per {unit} ({ratios or 'no peer measured'})")
        return results
    finally:
        stop_all(procs, tmp)
