#!/usr/bin/env bash
# `make bench-log`: what the access log costs. The same release gateway (process provider,
# 3 replicas) is driven by wrk with the access log off, then on (JSON lines to a file, and the
# combined format), in alternating rounds so load from elsewhere on the machine hits both
# alike; prints requests/s per round and the median of each, and the cost in percent.
#   bench/access_log_cost.sh [rounds] [seconds] [connections] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-3}"
SECS="${2:-10}"
CONNS="${3:-64}"
THREADS="${4:-2}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release/ringgate"
PORT="${RINGGATE_BENCH_PORT:-5099}"

bench/deps.sh proxies   # wrk
cargo build --release -p ringgate --bins

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
server_binary = "$PWD/$TARGET_DIR/release/ringgate-server"
[policy]
dir = "$work/policies"
$1
TOML
    mkdir -p "$work/policies"
    "$BIN" serve --config "$work/lb.toml" > "$work/stdout" 2> "$work/stderr" &
    gw_pid=$!
    for _ in $(seq 1 100); do
        grep -q "listening on" "$work/stdout" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the gateway did not start:"; cat "$work/stderr"; exit 1
}

stop_gateway() {
    kill -TERM "$gw_pid"; wait "$gw_pid" 2>/dev/null || true; gw_pid=""
}

run() {  # $1: label, $2: [log] section; prints requests/s
    start_gateway "$2"
    wrk -t"$THREADS" -c"$CONNS" -d1s -s "$work/ids.lua" "http://127.0.0.1:$PORT/" >/dev/null  # warm-up
    local rps
    rps=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -s "$work/ids.lua" "http://127.0.0.1:$PORT/" \
        | awk '/Requests\/sec/ {print $2}')
    stop_gateway
    echo "$1 $rps"
}

: > "$work/results"
for r in $(seq 1 "$ROUNDS"); do
    run off "[log]
access = \"off\"" | tee -a "$work/results"
    run json "[log]
access = \"$work/access.log\"
format = \"json\"" | tee -a "$work/results"
    run combined "[log]
access = \"$work/access.log\"
format = \"combined\"" | tee -a "$work/results"
done
lines=$(wc -l < "$work/access.log")
median() { grep "^$1 " "$work/results" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
off=$(median off); json=$(median json); comb=$(median combined)
echo
echo "access log cost, $ROUNDS rounds of ${SECS}s, wrk -t$THREADS -c$CONNS, median requests/s:"
awk -v off="$off" -v json="$json" -v comb="$comb" 'BEGIN {
    printf "  off       %10.0f\n", off
    printf "  json      %10.0f  (%+.1f%%)\n", json, 100 * (json - off) / off
    printf "  combined  %10.0f  (%+.1f%%)\n", comb, 100 * (comb - off) / off
}'
echo "  ($lines lines written)"
