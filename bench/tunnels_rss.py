#!/usr/bin/env python3
"""Memory per open idle WebSocket tunnel: ringgate against NGINX and HAProxy, in one run.

    bench/tunnels_rss.py [N]        (default 9000; `make bench-tunnels`)

Three `ringgate-server` backends (their `GET /ws` is a WebSocket echo) on loopback ports; each
proxy in turn in front of them with one worker/thread (ringgate pinned to one CPU, so one
serving thread; the static provider, so it starts no replicas of its own), hashing on `?id=`:
N WebSockets are opened through it (each a client and a backend connection, two descriptors in
the proxy), each says one message and gets its echo, then all sit idle. The proxy's RSS (all
its processes) is read from /proc before and after; the difference over N is the cost of one
open idle tunnel. Loopback only; everything started is stopped on exit. The proxies are run by
`bench/proxies_rss.py`.
"""
import base64
import os
import socket
import sys

from proxies_rss import PORT, compare, raise_nofile

def frame(text):
    """A masked client text frame."""
    data = text.encode()
    mask = b"\x11\x22\x33\x44"
    head = bytes([0x81, 0x80 | len(data)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def open_tunnels(n, first_id=0):
    """n WebSockets through the proxy on PORT, each echoed once; returns the sockets."""
    socks = []
    key = base64.b64encode(os.urandom(16)).decode()
    batch = 200
    for start_i in range(0, n, batch):
        group = []
        for i in range(start_i, min(n, start_i + batch)):
            s = socket.create_connection(("127.0.0.1", PORT))
            s.sendall(
                (f"GET /ws?id={first_id + i} HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\n"
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


if __name__ == "__main__":
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    if N + 200 > raise_nofile():
        sys.exit(f"{N} tunnels need {N + 200} descriptors in this process; the hard limit is too low")
    compare("tunnels", N, open_tunnels, "open idle tunnel")
