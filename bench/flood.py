#!/usr/bin/env python3
"""Idle-connection flood against the connection cap (issue 10's measurement; `make bench-flood`).

Starts `ringgate serve` (process provider, 3 replicas, proxy.max_connections = CAP) on 127.0.0.1,
opens ESTABLISHED keep-alive clients that send requests all along, then opens FLOOD idle
connections that send nothing (reopening them as the gateway closes them, for SECONDS), and
reports the established clients' success rate, the replicas restarted, the connections refused,
and the gateway's RSS. Loopback only; everything it starts is stopped on exit.

usage: bench/flood.py [FLOOD=5000] [CAP=1000] [SECONDS=15] [ESTABLISHED=8]
"""
import json, os, re, resource, selectors, shutil, signal, socket, subprocess, sys, tempfile, threading, time

flood = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
cap = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 15
established = int(sys.argv[4]) if len(sys.argv) > 4 else 8
gw_bin = os.environ.get("RINGGATE_BIN", "target/release/ringgate")

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

tmp = tempfile.mkdtemp(prefix="ringgate-flood-")
conf = os.path.join(tmp, "lb.toml")
with open(conf, "w") as f:
    f.write(f'listen = "127.0.0.1:0"\n[provider]\nkind = "process"\n'
            f'[proxy]\nmax_connections = {cap}\nheader_read_timeout = "10s"\n'
            f'[policy]\ndir = "{tmp}/policies"\n')
proc = subprocess.Popen([gw_bin, "serve", "--config", conf], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True)


def rss_mib():
    status = open(f"/proc/{proc.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def request(sock, path):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(head.split()[1]), rest[:length]


try:
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        sys.exit(f"gateway did not start: {line!r}")
    addr = (m.group(1), int(m.group(2)))
    time.sleep(0.5)

    results = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def client(i):
        s = socket.create_connection(addr)
        k = 0
        while not stop.is_set():
            try:
                code, _ = request(s, f"/home?id={i * 100000 + k}")
                results["ok" if code == 200 else "failed"] += 1
            except Exception:
                results["failed"] += 1
                s = socket.create_connection(addr)
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(established)]
    for t in threads:
        t.start()
    time.sleep(1)

    sel = selectors.DefaultSelector()
    opened = 0
    peak_rss = 0.0
    started = time.time()
    while time.time() - started < seconds:
        # Keep FLOOD idle connections open: reopen the ones the gateway closed.
        while len(sel.get_map()) < flood:
            try:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(addr)
                sel.register(s, selectors.EVENT_READ)
                opened += 1
            except OSError:
                break
        for key, _ in sel.select(timeout=0.05):
            try:
                if not key.fileobj.recv(1):
                    raise ConnectionError
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                pass
            sel.unregister(key.fileobj)
            key.fileobj.close()
        peak_rss = max(peak_rss, rss_mib())
    stop.set()
    for t in threads:
        t.join()

    s = socket.create_connection(addr)
    _, body = request(s, "/lb/metrics")
    metrics = body.decode()
    _, body = request(s, "/lb/status")
    status = json.loads(body)["message"]
    refused = sum(float(v) for v in re.findall(r'ringgate_connections_refused_total\{[^}]*\} ([\d.]+)', metrics))
    restarts = sum(r["restarts"] for r in status["replicas"])
    total = results["ok"] + results["failed"]
    print(f"{flood} idle connections held (reopened as closed: {opened} opened) against "
          f"proxy.max_connections = {cap} for {seconds:.0f} s: established clients "
          f"{results['ok']} of {total} requests answered 200 "
          f"({100.0 * results['ok'] / max(total, 1):.2f}%); replicas restarted: {restarts}; "
          f"connections refused: {refused:.0f}; gateway RSS peak {peak_rss:.1f} MiB, now {rss_mib():.1f} MiB")
    for key in list(sel.get_map().values()):
        key.fileobj.close()
finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)
