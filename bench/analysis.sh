#!/usr/bin/env bash
# `make analysis`: the experiments A-1 … A-4 and ring movement against live gateways; charts in
# bench/out/, report in docs/performance.md. Installs a TrueType font for the charts when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

bench/deps.sh fonts
"$CARGO" build --release --bins
exec "$TARGET_DIR/release/ringgate" analysis --gateway-bin "$TARGET_DIR/release/ringgate" "$@"
