#!/usr/bin/env python3
"""User-space instructions per request on ringgate's HTTP/2 paths, under callgrind.

    bench/h2_instr.py [REQUESTS] [WARM_UP]      (defaults 20000 and 2000; `make bench-h2-instr`)

The rig of `bench/h2_pinned.py` (two `ringgate-server` replicas on CPU 1, ringgate alone on CPU 0,
so one serving thread), with ringgate run by `valgrind --tool=callgrind`, twice: HTTP/2 clients
with `upstream_protocol = "http1"` (`GET /home`), and gRPC unary with `"h2c"` (one `Who` message).
Each load is `h2load -c8 -m16`, `?id=1` and `?id=2` in turn: WARM_UP requests, the counters zeroed
(`callgrind_control --zero`), REQUESTS requests, the counters dumped; every instruction of the
process since the zero, divided by REQUESTS, is the figure. Instruction counts do not depend on
what else the machine runs. The dumps are kept in target/callgrind-h2/ for `callgrind_annotate`.
ringgate only (the peers' figure for HTTP/2 is `make bench-h2-pinned`'s CPU a request). Loopback
only; everything started is stopped on exit, also on failure.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from h2_pinned import GRPC_WHO, PORTS, REPLICAS, h2load, ringgate_conf
from instr import totals
from proxies_rss import GW, ROOT, run, start_servers, stop, stop_all, wait_port

OUT_DIR = os.path.join(ROOT, "target", "callgrind-h2")
PATHS = [("HTTP/2 clients, HTTP/1.1 to the replicas", "http1", False),
         ("gRPC unary, h2c on both legs", "h2c", True)]


def main():
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    warm_up = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (bench/deps.sh valgrind h2load)")
    tmp = tempfile.mkdtemp(prefix="ringgate-h2-instr-")
    os.makedirs(os.path.join(tmp, "policies"))
    os.makedirs(OUT_DIR, exist_ok=True)
    procs = []

    def start(cmd, env=None):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(p)
        return p

    try:
        start_servers(start, REPLICAS, ["taskset", "-c", "1"], prefix="r")
        body = os.path.join(tmp, "who.bin")
        with open(body, "wb") as f:
            f.write(GRPC_WHO)
        port = PORTS["ringgate"]
        for label, protocol, grpc in PATHS:
            conf = os.path.join(tmp, f"{protocol}.toml")
            with open(conf, "w") as f:
                f.write(ringgate_conf(tmp, port, protocol))
            out = os.path.join(OUT_DIR, f"ringgate-{protocol}.out")
            for old in glob.glob(out + "*"):
                os.remove(old)
            gw = start(["taskset", "-c", "0", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        GW, "serve", "--config", conf])
            wait_port(port, within=120)
            h2load(["taskset", "-c", "1"], port, grpc, warm_up, body)
            subprocess.run(["callgrind_control", "--zero", str(gw.pid)], capture_output=True, check=True)
            _, ok, failed = h2load(["taskset", "-c", "1"], port, grpc, requests, body)
            subprocess.run(["callgrind_control", "--dump", str(gw.pid)], capture_output=True, check=True)
            time.sleep(1)
            dumps = sorted(glob.glob(out + ".*"))
            if not dumps or ok != requests:
                raise RuntimeError(f"{label}: {ok} of {requests} answered ({failed} failed), dumps {dumps}")
            instr = totals(dumps[-1])
            print(f"  {label:<42} {instr / requests:9,.0f} instructions a request  ({dumps[-1]})", flush=True)
            procs.remove(gw)
            stop(gw, 60)
    finally:
        stop_all(procs, tmp, within=60)


if __name__ == "__main__":
    run(main)
