#!/usr/bin/env python3
"""What a tunnel's rest costs in system calls (`make bench-tunnels-rest`).

    bench/tunnels_rest.py [N] [ROUNDS]      (default 200 tunnels, 5 rounds)

ringgate (one serving thread, the static provider, three `ringgate-server` backends) holds N
WebSocket tunnels. In each round every tunnel sends one message and reads its echo, then all
sit quiet for 1.5 s. Run twice: with `[tunnels] rest_after = "500ms"` (each tunnel rests in
every quiet spell, and each message wakes it) and with `rest_after = "0s"` (every tunnel keeps
its task). `strace -c -f` counts the gateway's system calls over the rounds; the difference
between the two runs, per message, is what resting and waking again costs. Needs strace.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxies_rss import (BACKENDS, GW, PORT, quiet_starter, raise_nofile, ringgate_conf,  # noqa: E402
                         run, start_servers, stop_all, wait_port)
from tunnels_rss import open_tunnels  # noqa: E402
from conns import echo_again  # noqa: E402

QUIET = 1.5


def echo_all(socks):
    """One message up each tunnel, and its echo read back; every one must come back."""
    echoed, failed = echo_again(socks)
    if failed or echoed != len(socks):
        raise SystemExit(f"{echoed} of {len(socks)} tunnels echoed, {failed} failed")


def syscalls(summary):
    """The total of `strace -c`'s summary table."""
    for line in summary.splitlines():
        parts = line.split()
        if parts and parts[-1] == "total":
            return int(parts[3])
    raise SystemExit(f"no total in strace's summary:\n{summary}")


def measure(rest_after, n, rounds):
    tmp = tempfile.mkdtemp(prefix="ringgate-rest-")
    procs = []
    start = quiet_starter(procs)
    try:
        start_servers(start, BACKENDS)
        conf = os.path.join(tmp, "lb.toml")
        text = ringgate_conf(tmp, "tunnels", n).replace(
            "[tunnels]\n", f'[tunnels]\nrest_after = "{rest_after}"\n')
        with open(conf, "w") as f:
            f.write(text)
        gw = start(["taskset", "-c", "0", GW, "serve", "--config", conf])
        wait_port(PORT)
        socks = open_tunnels(n)
        time.sleep(QUIET)
        out = os.path.join(tmp, "strace.txt")
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(gw.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        for _ in range(rounds):
            echo_all(socks)
            time.sleep(QUIET)
        tracer.terminate()
        tracer.wait(30)
        with open(out) as f:
            total = syscalls(f.read())
        for s in socks:
            s.close()
        return total
    finally:
        stop_all(procs, tmp)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    if not shutil.which("strace"):
        sys.exit("needs strace (apt-get install strace)")
    raise_nofile()
    messages = n * rounds
    resting = measure("500ms", n, rounds)
    kept = measure("0s", n, rounds)
    print(f"{n} tunnels, {rounds} rounds of one message each, {QUIET} s quiet between rounds:")
    print(f"  rest_after = 500ms (each message wakes a resting tunnel): {resting} system calls, "
          f"{resting / messages:.2f} a message")
    print(f"  rest_after = 0s (every tunnel keeps its task):            {kept} system calls, "
          f"{kept / messages:.2f} a message")
    print(f"a rest and a wake cost {(resting - kept) / messages:.2f} system calls a tunnel")


if __name__ == "__main__":
    run(main)
