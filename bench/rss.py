#!/usr/bin/env python3
"""Gateway memory with many open client connections (DESIGN target: RSS < 30 MB at 1,000).

Starts `ringgate serve` (process provider, 3 replicas) on 127.0.0.1, opens N keep-alive client
connections, sends one request on each and keeps them open, then reads the gateway's VmRSS and
VmHWM from /proc. Loopback only; everything it starts is stopped on exit.
"""
import os, re, shutil, signal, socket, subprocess, sys, tempfile, time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
gw_bin = os.environ.get("RINGGATE_BIN", "target/release/ringgate")
tmp = tempfile.mkdtemp(prefix="ringgate-rss-")
conf = os.path.join(tmp, "lb.toml")
with open(conf, "w") as f:
    f.write(f'listen = "127.0.0.1:0"\n[provider]\nkind = "process"\n[policy]\ndir = "{tmp}/policies"\n')
proc = subprocess.Popen([gw_bin, "serve", "--config", conf], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        sys.exit(f"gateway did not start: {line!r}")
    addr = (m.group(1), int(m.group(2)))

    def rss():
        status = open(f"/proc/{proc.pid}/status").read()
        get = lambda k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024
        return get("VmRSS"), get("VmHWM")

    idle = rss()
    socks = []
    # One request at a time: 1,000 clients connected, each served once, all kept open.
    for i in range(n):
        s = socket.create_connection(addr)
        s.sendall(f"GET /home?id={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(4096)
        socks.append(s)
    time.sleep(0.5)
    open_conns = rss()
    # Then a burst: one more request on every connection at once.
    for i, s in enumerate(socks):
        s.sendall(f"GET /home?id={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for s in socks:
        s.recv(4096)
    time.sleep(0.5)
    burst = rss()
    # How long until it is back under 30 MiB with the connections still open (DESIGN: 60 s).
    settle_start = time.time()
    settled = None
    while time.time() - settle_start < 90:
        if rss()[0] < 30.0:
            settled = time.time() - settle_start
            break
        time.sleep(1)
    after = rss()
    settled_text = f"under 30 MiB after {settled:.0f} s" if settled is not None else "still over 30 MiB after 90 s"
    print(f"gateway RSS: idle {idle[0]:.1f} MiB; {n} open keep-alive connections, one request each "
          f"{open_conns[0]:.1f} MiB; after a burst of {n} concurrent requests {burst[0]:.1f} MiB "
          f"(peak {burst[1]:.1f} MiB); {settled_text} ({after[0]:.1f} MiB)")
    for s in socks:
        s.close()
finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    shutil.rmtree(tmp, ignore_errors=True)
