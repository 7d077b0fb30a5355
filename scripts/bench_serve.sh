#!/usr/bin/env bash
# Serving benchmark: `moe bench serve` against the standalone cluster (`moe serve`) and
# against `moe router` + 2 `moe worker` processes, on the same checkpoint, at several
# concurrencies. Prints each run's report; the numbers go to docs/benchmarks.md.
#
#   scripts/bench_serve.sh [CHECKPOINT_DIR]     (default: writes the Mixtral-shaped bench
#                                                 checkpoint to /tmp/moe-bench-mixtral)
# Env: CONCURRENCY="1 8 32" PROMPT=128 MAX_TOKENS=32 REQUESTS_PER_CLIENT=4
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build -q -p moe-cli
MOE=target/debug/moe
CKPT="${1:-/tmp/moe-bench-mixtral}"
if [ ! -f "$CKPT/config.json" ]; then
  "$MOE" checkpoint new --arch mixtral --size bench --out "$CKPT"
fi
CONCURRENCY="${CONCURRENCY:-1 8 32}"
PROMPT="${PROMPT:-128}"
MAX_TOKENS="${MAX_TOKENS:-32}"
PER="${REQUESTS_PER_CLIENT:-4}"
LOGS=$(mktemp -d)
# `start` runs in a command substitution (a subshell), so PIDs go through files.
cleanup() {
  for f in "$LOGS"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts a moe process in the background and waits for its "listening" line; prints the
# gRPC address.
start() {
  local name=$1; shift
  "$MOE" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
  local pid=$!
  echo "$pid" >"$LOGS/$name.pid"
  for _ in $(seq 1 1200); do
    if grep -q "listening grpc=" "$LOGS/$name.out" 2>/dev/null; then
      grep -o 'grpc=[^ ]*' "$LOGS/$name.out" | head -1 | cut -d= -f2
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$LOGS/$name.err" >&2; return 1; fi
    sleep 0.5
  done
  echo "$name did not start" >&2; return 1
}

run_bench() {
  local label=$1 target=$2
  for c in $CONCURRENCY; do
    echo "=== $label, concurrency $c"
    "$MOE" bench serve --target "$target" --concurrency "$c" --prompt-tokens "$PROMPT" \
      --max-tokens "$MAX_TOKENS" --requests $((c * PER)) --warmup "$c"
  done
}

target=$(start serve serve --model "$CKPT" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --max-batch-tokens 4096)
run_bench "standalone (moe serve, 2 in-process device actors)" "$target"
cleanup

w1=$(start w1 worker --model "$CKPT" --devices cpu:0 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure)
w2=$(start w2 worker --model "$CKPT" --devices cpu:0 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure)
target=$(start router router --model "$CKPT" --workers "$w1,$w2" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure --max-batch-tokens 4096)
run_bench "cluster (moe router + 2 moe worker processes)" "$target"
