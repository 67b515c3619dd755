#!/usr/bin/env bash
# `make bench`: ringgate against NGINX and HAProxy over the same three backends, all on
# 127.0.0.1, in plain HTTP and then terminating TLS (`ringgate-lab analysis tls`; TLS_BENCH_ARGS
# go to it, TLS_BENCH=0 skips it). Installs nginx, haproxy and wrk when missing, builds the
# release binaries of the gateway and the lab, runs the lab's drivers, which print the tables and
# write them into docs/performance.md. Every process the driver starts is listed in
# a pid file; the trap stops them if the driver dies or the run is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

bench/deps.sh proxies
# The proxy under test on a core of its own (CPU 0), the backends and wrk on the others, when
# there are two or more: each proxy is then the bottleneck and shares its core with nothing.
# BENCH_PIN=0 lets every process run anywhere.
pin=()
if [ "${BENCH_PIN:-1}" != 0 ] && [ "$(nproc)" -ge 2 ]; then
    pin=(--pin)
fi
"$CARGO" build --release -p ringgate -p ringgate-lab --bins

tmp="$(mktemp -d -t ringgate-bench.XXXXXX)"
pidfile="$tmp/pids"
cleanup() {
    status=$?
    if [ -s "$pidfile" ]; then
        while read -r pid; do
            kill -TERM "$pid" 2>/dev/null || true
        done < "$pidfile"
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The drivers' own temp dirs (configs, logs) go inside ours, so the trap removes them too when a
# driver is killed before it can remove them itself.
export TMPDIR="$tmp"

"$TARGET_DIR/release/ringgate-lab" analysis proxies \
    --ringgate-bin "$TARGET_DIR/release/ringgate" \
    --server-bin "$TARGET_DIR/release/ringgate-server" \
    --pidfile "$pidfile" "${pin[@]}" "$@"

if [ "${TLS_BENCH:-1}" != 0 ]; then
    # shellcheck disable=SC2086 # TLS_BENCH_ARGS is a list of arguments
    "$TARGET_DIR/release/ringgate-lab" analysis tls \
        --ringgate-bin "$TARGET_DIR/release/ringgate" \
        --pidfile "$pidfile" ${TLS_BENCH_ARGS:-}
fi

if [ "${H2_BENCH:-1}" != 0 ]; then
    # HTTP/2 clients and gRPC unary, each proxy alone on a core (bench/h2_pinned.py, which
    # stops what it starts; its ports are 18400-18420). H2_BENCH_ARGS: requests, rounds.
    bench/deps.sh h2load
    # shellcheck disable=SC2086 # H2_BENCH_ARGS is a list of arguments
    RINGGATE_BIN="$TARGET_DIR/release/ringgate" RINGGATE_SERVER_BIN="$TARGET_DIR/release/ringgate-server" \
        python3 bench/h2_pinned.py ${H2_BENCH_ARGS:-}
fi
