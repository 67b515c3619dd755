#!/usr/bin/env bash
# `make analysis`: the experiments A-1 … A-4, ring movement and failover against live gateways;
# charts in docs/img/ (committed beside the report), report in docs/performance.md. Installs a
# TrueType font for the charts when missing. The lab (`ringgate-lab`) drives the release gateway (`ringgate`, whose process
# provider starts `ringgate-server` from the same directory).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

bench/deps.sh fonts
"$CARGO" build --release -p ringgate -p ringgate-lab --bins
"$TARGET_DIR/release/ringgate-lab" analysis --gateway-bin "$TARGET_DIR/release/ringgate" "$@"
# Bounded loads and slow start: their own section of the report, charts in docs/img/.
"$TARGET_DIR/release/ringgate-lab" analysis balancing --gateway-bin "$TARGET_DIR/release/ringgate"
