#!/usr/bin/env bash
# `make bench-log`: what the access log costs. The same release gateway (process provider,
# 3 replicas) is driven by wrk with the access log off, then on (JSON lines to a file, and the
# combined format), in alternating rounds so load from elsewhere on the machine hits both
# alike; prints requests/s and the gateway's CPU time per request (from /proc, which other load
# on the machine disturbs far less than throughput) per round, the medians, and the cost.
#   bench/access_log_cost.sh [rounds] [seconds] [connections] [threads]
# RINGGATE_BIN and RINGGATE_SERVER_BIN measure other builds (a copy of the binaries before a
# change, say) instead of building this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-3}"
SECS="${2:-10}"
CONNS="${3:-64}"
THREADS="${4:-2}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="${RINGGATE_BIN:-$TARGET_DIR/release/ringgate}"
SERVER_BIN="${RINGGATE_SERVER_BIN:-$PWD/$TARGET_DIR/release/ringgate-server}"
PORT="${RINGGATE_BENCH_PORT:-5099}"

bench/deps.sh proxies   # wrk
if [ -z "${RINGGATE_BIN:-}" ]; then
    cargo build --release -p ringgate --bins
fi

work=$(mktemp -d)
gw_pid=""
cleanup() {
    if [ -n "$gw_pid" ]; then kill -TERM "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# Random 6-digit ids, as the specified analysis sends them.
cat > "$work/ids.lua" <<'LUA'
math.randomseed(42)
request = function() return wrk.format("GET", "/home?id=" .. math.random(100000, 999999)) end
LUA

start_gateway() {  # $1: the [log] section
    cat > "$work/lb.toml" <<TOML
listen = "127.0.0.1:$PORT"
[provider]
kind = "process"
server_binary = "$SERVER_BIN"
[policy]
dir = "$work/policies"
$1
TOML
    mkdir -p "$work/policies"
    "$BIN" serve --config "$work/lb.toml" > "$work/stdout" 2> "$work/stderr" &
    gw_pid=$!
    # Serving once it answers on its port, not only once it says so: a run must never start
    # against a gateway that is not there yet.
    for _ in $(seq 1 100); do
        if grep -q "listening on" "$work/stdout" 2>/dev/null \
            && curl -fsS -o /dev/null "http://127.0.0.1:$PORT/lb/health" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "the gateway did not start:"; cat "$work/stderr"; exit 1
}

stop_gateway() {
    kill -TERM "$gw_pid"; wait "$gw_pid" 2>/dev/null || true; gw_pid=""
}

cpu_ticks() {  # user + system clock ticks of the gateway process
    awk '{print $14 + $15}' "/proc/$gw_pid/stat"
}

run() {  # $1: label, $2: [log] section; prints label, requests/s, CPU µs per request
    start_gateway "$2"
    wrk -t"$THREADS" -c"$CONNS" -d1s -s "$work/ids.lua" "http://127.0.0.1:$PORT/" >/dev/null \
        || { echo "wrk failed against the gateway ($1); its log:"; tail -20 "$work/stderr"; exit 1; }  # warm-up
    local out rps reqs t0 t1 hz
    hz=$(getconf CLK_TCK)
    t0=$(cpu_ticks)
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -s "$work/ids.lua" "http://127.0.0.1:$PORT/")
    t1=$(cpu_ticks)
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.2f", (b - a) / hz * 1e6 / n}')
    curl -fsS "http://127.0.0.1:$PORT/lb/metrics" \
        | awk '/^ringgate_access_log_lines_total\{outcome="dropped"\}/ {print $2}' >> "$work/dropped"
    stop_gateway
    echo "$1 $rps $cpu" | tee -a "$work/results"
}

: > "$work/results"
for r in $(seq 1 "$ROUNDS"); do
    # Not in a pipeline: `run` must run in this shell, so the exit trap knows its gateway.
    run off "[log]
access = \"off\""
    run json "[log]
access = \"$work/access.log\"
format = \"json\""
    run combined "[log]
access = \"$work/access.log\"
format = \"combined\""
done
lines=$(wc -l < "$work/access.log")
median() {  # $1: label, $2: column
    grep "^$1 " "$work/results" | awk -v c="$2" '{print $c}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
echo
echo "access log cost, $ROUNDS rounds of ${SECS}s, wrk -t$THREADS -c$CONNS, medians:"
printf "  %-9s %12s %10s %18s %8s\n" log "requests/s" "vs off" "gateway CPU/req" "vs off"
for label in off json combined; do
    awk -v l="$label" -v r="$(median "$label" 2)" -v c="$(median "$label" 3)" \
        -v r0="$(median off 2)" -v c0="$(median off 3)" 'BEGIN {
        printf "  %-9s %12.0f %+9.1f%% %15.2f µs %+7.1f%%\n", l, r, 100 * (r - r0) / r0, c, 100 * (c - c0) / c0
    }'
done
dropped=$(awk '{s += $1} END {print s + 0}' "$work/dropped")
echo "  ($lines lines written, $dropped dropped)"
