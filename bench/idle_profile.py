#!/usr/bin/env python3
"""Where an idle keep-alive connection's bytes go: ringgate under valgrind's DHAT, holding N idle
connections, and its heap at its peak summed by allocation site.

    bench/idle_profile.py [N] [DHAT_OUT]      (default 2000; `make bench-idle-profile`)
    bench/idle_profile.py --tunnels [N] [DHAT_OUT]
                                              (idle WebSocket tunnels instead, each echoed once;
                                              default 1000; `make bench-tunnels-profile`)
    bench/idle_profile.py --report DHAT_OUT   (only the table, from an earlier run's file)

The rig of `bench/idle_rss.py` (three `ringgate-server` backends, the static provider, one serving
thread), with ringgate run by `valgrind --tool=dhat` on a dynamically linked release build
(`target/release/ringgate`: DHAT cannot see the allocator of a static binary). 200 connections
are opened, then N more, one at a time in groups of 50 with a pause of 2 s after each group (so
that the groups before it idle, and ringgate holds them without their tasks, before the next one
comes), each making one request and staying open (with `--tunnels`: each a WebSocket through the
gateway, echoed once and left open); once they idle the gateway is stopped. The
table lists the allocation sites by what they held at the heap's peak (DHAT's `t-gmax`: the
connections idle, the last group perhaps still in its tasks), bytes and blocks, each divided by
N + 200, with the frames of the site that are ringgate's own (or tokio's, hyper's, bytes', when
none is). Loopback only.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from idle_rss import open_idle
from tunnels_rss import open_tunnels
from proxies_rss import BACKENDS, GW, PORT, ROOT, SERVER, WARM_UP, raise_nofile, ringgate_conf, wait_port

OURS = ("ringgate::",)
GROUP = 50
LIBS = ("tokio::", "hyper::", "bytes::", "h2::", "tokio_util::", "alloc::", "std::")


def frames_of(ftbl, fs):
    names = [ftbl[i] for i in fs]
    ours = [f for f in names if any(o in f for o in OURS)]
    pick = ours or [f for f in names if any(l in f for l in LIBS)] or names
    out = []
    for f in pick[:4]:
        # "0x...: ringgate::wire::server::serve (mod.rs:123:5)" -> the function and its line
        f = f.split(": ", 1)[-1]
        out.append(f if len(f) < 160 else f[:157] + "...")
    return out


def report(path, n, top=15):
    """The table of `path`, per connection of the `n` the run held (its warm-up included)."""
    d = json.load(open(path))
    ftbl = d["ftbl"]
    pps = [p for p in d["pps"] if p.get("gb", 0) > 0]
    total = sum(p["gb"] for p in pps)
    blocks = sum(p["gbk"] for p in pps)
    print(f"heap at its peak: {total / 1024:.0f} KiB in {blocks} blocks; over {n} connections "
          f"{total / n:.0f} bytes and {blocks / n:.2f} blocks each (with what does not grow with them)")
    print(f"{'bytes/conn':>10} {'blocks/conn':>11}  site")
    for p in sorted(pps, key=lambda p: -p["gb"])[:top]:
        fr = frames_of(ftbl, p["fs"])
        print(f"{p['gb'] / n:10.0f} {p['gbk'] / n:11.2f}  {fr[0] if fr else '?'}")
        for f in fr[1:]:
            print(f"{'':23}  {f}")


def main():
    if sys.argv[1:2] == ["--report"]:
        report(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2000 + WARM_UP)
        return
    args = sys.argv[1:]
    tunnels = args[:1] == ["--tunnels"]
    if tunnels:
        args = args[1:]
        kind, what, default_n = "tunnels", "tunnels", 1000

        def open_some(count, first_id):
            # Ten handshakes at a time: what tunnels in their handshakes hold is not the peak.
            socks = []
            for start in range(0, count, 10):
                socks += open_tunnels(min(10, count - start), first_id + start)
            return socks
    else:
        kind, what, default_n = "keep-alive", "idle", 2000

        def open_some(count, first_id):
            return open_idle(count, first_id, batch=1)
    n = int(args[0]) if args else default_n
    out = args[1] if len(args) > 1 else os.path.join(ROOT, "target", f"dhat-{what}.json")
    raise_nofile()
    tmp = tempfile.mkdtemp(prefix="ringgate-dhat-")
    procs = []
    try:
        for port in BACKENDS:
            procs.append(subprocess.Popen([SERVER], env={"PORT": str(port), "SERVER_ID": f"b{port}",
                                                         "BIND": "127.0.0.1", "PATH": os.environ.get("PATH", "")},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in BACKENDS:
            wait_port(port)
        conf = os.path.join(tmp, "lb.toml")
        text = ringgate_conf(tmp, kind, n)
        if tunnels:
            # Each group rests (without its task) before the next is opened, as tunnels do
            # after [tunnels] rest_after: the heap's peak is then all of them resting but the
            # last group, still in their tasks (GROUP of them: what is counted per tunnel is a
            # little above what a resting one holds).
            text = text.replace("[tunnels]\n", '[tunnels]\nrest_after = "1s"\n')
        with open(conf, "w") as f:
            f.write(text)
        gw = subprocess.Popen(["taskset", "-c", "0", "valgrind", "--tool=dhat", f"--dhat-out-file={out}",
                               GW, "serve", "--config", conf],
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "dhat.log"), "w"))
        procs.append(gw)
        wait_port(PORT, within=120)
        time.sleep(3)
        # One request at a time, so that the heap's peak is the connections idle, not a batch
        # of requests in flight; in groups, each given the time to idle before the next.
        warm = open_some(WARM_UP, 0)
        time.sleep(2)
        socks = []
        for start in range(0, n, GROUP):
            socks += open_some(min(GROUP, n - start), WARM_UP + start)
            time.sleep(2)
        time.sleep(1)
        if tunnels:
            # Closed a group at a time before the drain: a drain (or a burst of closes) wakes
            # every resting tunnel into a task at once, which would be the heap's peak.
            for start in range(0, len(socks), GROUP):
                for s in socks[start:start + GROUP]:
                    s.close()
                time.sleep(0.5)
        gw.send_signal(signal.SIGTERM)
        gw.wait(120)
        for s in socks + warm:
            s.close()
        report(out, n + WARM_UP)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


if __name__ == "__main__":
    main()
