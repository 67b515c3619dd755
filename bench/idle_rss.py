#!/usr/bin/env python3
"""Memory per idle keep-alive client connection: ringgate against NGINX and HAProxy, in one run.

    bench/idle_rss.py [N]        (default 10000; `make bench-idle`)

Three `ringgate-server` backends on loopback ports; each proxy in turn in front of them with one
worker/thread (ringgate pinned to one CPU, so one serving thread; the static provider), hashing
on `?id=`, every idle timeout an hour: N keep-alive client connections are opened through it
in two halves, each makes one request (`GET /home?id=…`), reads its whole response and stays
open, idle. The proxy's RSS (all its processes) is read from /proc after each half has idled
SETTLE seconds (12 by default); the growth over the second half, divided by its connections, is
the cost of one idle keep-alive connection (issue 29's first goal: at most NGINX's, at most
1 KiB), drawn in docs/img/idle_connection_memory.svg (CHART= elsewhere). `PEERS=0` measures
ringgate alone. Loopback only; everything started is stopped on
exit. The proxies are run by `bench/proxies_rss.py`.
"""
import os
import socket
import sys

from instr import read_response
from proxies_rss import PORT, ROOT, compare, raise_nofile
from svgbars import bars

def open_idle(n, first_id=0, batch=200):
    """n keep-alive connections through the proxy on PORT, each served one request (`batch`
    requests sent at a time); returns them."""
    socks = []
    for start_i in range(0, n, batch):
        group = []
        for i in range(start_i, min(n, start_i + batch)):
            s = socket.create_connection(("127.0.0.1", PORT))
            s.sendall(f"GET /home?id={first_id + i} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            group.append(s)
        for s in group:
            s.settimeout(10)
            read_response(s, b"")
        socks.extend(group)
    return socks


if __name__ == "__main__":
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    if N + 300 > raise_nofile():
        sys.exit(f"{N} connections need {N + 300} descriptors in this process; the hard limit is too low")
    results = compare("keep-alive", N, open_idle, "idle keep-alive connection")
    names = [("ringgate", "ringgate"), ("nginx", "NGINX"), ("haproxy", "HAProxy")]
    shown = [(label, results[key]) for key, label in names if key in results]
    if len(shown) == 3:
        chart = os.environ.get("CHART", os.path.join(ROOT, "docs", "img", "idle_connection_memory.svg"))
        bars(chart, "RSS per idle keep-alive client connection (one worker/thread each)",
             "KiB per idle connection", ["KiB"], [label for label, _ in shown],
             [[value for _, value in shown]], fmt="{:.2f}")
        print(f"chart: {chart}")
