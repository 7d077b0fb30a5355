#!/usr/bin/env bash
# The cluster over an emulated network: router + 2 workers with a delay proxy
# (`moe bench proxy`) in front of each worker, one-way delays of 0, 100 µs, 500 µs and
# 1 ms, with overlap off (`--overlap false`), on (`--overlap true`, whole steps) and
# split (`--micro-batches 2`), against standalone `moe serve` in the same run. Decode-heavy
# workload: 32-token prompts, 128 output tokens. Prints one line per run and a table;
# the numbers go to docs/benchmarks.md.
#
#   scripts/bench_network.sh [CHECKPOINT_DIR]   (default: writes the Mixtral-shaped bench
#                                                checkpoint to /tmp/moe-bench-mixtral)
# Env: CONCURRENCY="1 32" DELAYS_US="0 100 500 1000" MODES="off on split"
#      PROMPT=32 MAX_TOKENS=128 REQUESTS_PER_CLIENT=2 DISPATCH_DTYPE=f32 PROFILE=dev
# (the dev profile of this workspace is optimised; see Cargo.toml)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROFILE="${PROFILE:-dev}"
cargo build -q --profile "$PROFILE" -p moe-cli
case "$PROFILE" in dev) MOE=target/debug/moe ;; *) MOE="target/$PROFILE/moe" ;; esac
CKPT="${1:-/tmp/moe-bench-mixtral}"
if [ ! -f "$CKPT/config.json" ]; then
  "$MOE" checkpoint new --arch mixtral --size bench --out "$CKPT"
fi
CONCURRENCY="${CONCURRENCY:-1 32}"
DELAYS_US="${DELAYS_US:-0 100 500 1000}"
MODES="${MODES:-off on split}"
PROMPT="${PROMPT:-32}"
MAX_TOKENS="${MAX_TOKENS:-128}"
PER="${REQUESTS_PER_CLIENT:-2}"
DTYPE="${DISPATCH_DTYPE:-f32}"
LOGS=$(mktemp -d)
RESULTS="$LOGS/results.tsv"
cleanup() {
  for f in "$LOGS"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Sum and count of a histogram over all its series, from a /metrics page: "SUM COUNT".
hist() {
  python3 - "$1" "$2" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode()
name = sys.argv[2]
total = {"sum": 0.0, "count": 0.0}
for line in text.splitlines():
    for k in total:
        if line.startswith(f"{name}_{k}"):
            total[k] += float(line.rsplit(" ", 1)[1])
print(total["sum"], total["count"])
EOF
}

# Starts a process in the background and waits for a line matching $2 ("listening
# grpc=" or "listening proxy="); prints the address after the `=`.
start() {
  local name=$1 pattern=$2; shift 2
  "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
  local pid=$!
  echo "$pid" >"$LOGS/$name.pid"
  for _ in $(seq 1 1200); do
    if grep -q "$pattern" "$LOGS/$name.out" 2>/dev/null; then
      grep -o "${pattern}[^ ]*" "$LOGS/$name.out" | head -1 | cut -d= -f2
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$LOGS/$name.err" >&2; return 1; fi
    sleep 0.25
  done
  echo "$name did not start" >&2; return 1
}

# Runs the workload at each concurrency against $2; appends "label conc tok/s itl_p50".
bench() {
  local label=$1 target=$2
  for c in $CONCURRENCY; do
    local json
    json=$("$MOE" bench serve --target "$target" --concurrency "$c" --prompt-tokens "$PROMPT" \
      --max-tokens "$MAX_TOKENS" --requests $((c * PER)) --warmup "$c" --json)
    python3 - "$label" "$c" "$json" >>"$RESULTS" <<'EOF'
import json, sys
label, c, j = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tps = j.get("output_tokens_per_s") or j.get("output_tok_per_s") or 0
itl = (j.get("itl_ms") or {}).get("p50", 0)
print(f"{label}\t{c}\t{tps:.1f}\t{itl:.1f}\t{j.get('failed', 0)}")
EOF
    tail -1 "$RESULTS" | awk -F'\t' '{printf "%-34s conc %-3s %8s out tok/s  ITL p50 %6s ms  failed %s\n", $1, $2, $3, $4, $5}'
  done
}

echo "== proxy check (what the delay proxy really adds)"
for d in $DELAYS_US; do "$MOE" bench proxy --upstream 127.0.0.1:1 --delay-us "$d" --check; done

target=$(start serve "listening grpc=" "$MOE" serve --model "$CKPT" --listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 --max-batch-tokens 4096)
bench "standalone" "$target"
cleanup

w1=$(start w1 "listening grpc=" "$MOE" worker --model "$CKPT" --devices cpu:0 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure)
w2=$(start w2 "listening grpc=" "$MOE" worker --model "$CKPT" --devices cpu:0 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure)
w1http=$(grep -o 'http=[^ ]*' "$LOGS/w1.out" | head -1 | cut -d= -f2)
w2http=$(grep -o 'http=[^ ]*' "$LOGS/w2.out" | head -1 | cut -d= -f2)
for d in $DELAYS_US; do
  p1=$(start p1 "listening proxy=" "$MOE" bench proxy --upstream "$w1" --delay-us "$d")
  p2=$(start p2 "listening proxy=" "$MOE" bench proxy --upstream "$w2" --delay-us "$d")
  for o in $MODES; do
    case $o in
      off) mode=(--overlap false) ;;
      on) mode=(--overlap true --micro-batches 1) ;;
      split) mode=(--overlap true --micro-batches 2) ;;
      *) echo "unknown mode $o" >&2; exit 2 ;;
    esac
    target=$(start router "listening grpc=" "$MOE" router --model "$CKPT" --workers "$p1,$p2" \
      --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure --max-batch-tokens 4096 \
      "${mode[@]}" --dispatch-dtype "$DTYPE")
    rhttp=$(grep -o 'http=[^ ]*' "$LOGS/router.out" | head -1 | cut -d= -f2)
    read -r w1s0 w1c0 < <(hist "$w1http" moe_worker_compute_seconds)
    read -r w2s0 w2c0 < <(hist "$w2http" moe_worker_compute_seconds)
    bench "cluster delay ${d}us overlap $o" "$target"
    # Router-side round trip of one worker's share of a layer, minus the worker's own
    # compute: what transport, serialisation and the proxy cost per dispatch.
    read -r rs rc < <(hist "$rhttp" moe_dispatch_seconds)
    read -r w1s w1c < <(hist "$w1http" moe_worker_compute_seconds)
    read -r w2s w2c < <(hist "$w2http" moe_worker_compute_seconds)
    python3 -c "
rs, rc = $rs, $rc
ws, wc = $w1s - $w1s0 + $w2s - $w2s0, $w1c - $w1c0 + $w2c - $w2c0
print(f'  dispatch: {rc:.0f} round trips, mean {1e6*rs/max(rc,1):.0f} us; worker compute mean {1e6*ws/max(wc,1):.0f} us; overhead {1e6*(rs/max(rc,1)-ws/max(wc,1)):.0f} us per dispatch')
"
    kill "$(cat "$LOGS/router.pid")"; wait "$(cat "$LOGS/router.pid")" 2>/dev/null || true
    rm -f "$LOGS/router.pid"
  done
  for p in p1 p2; do kill "$(cat "$LOGS/$p.pid")"; rm -f "$LOGS/$p.pid"; done
done

echo
echo "== summary (out tok/s; ratio to standalone at the same concurrency)"
python3 - "$RESULTS" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
base = {r[1]: float(r[2]) for r in rows if r[0] == "standalone"}
print("| run | concurrency | out tok/s | / standalone | ITL p50 ms | failed |")
print("|---|---|---|---|---|---|")
for label, c, tps, itl, failed in rows:
    ratio = float(tps) / base[c] if base.get(c) else 0
    print(f"| {label} | {c} | {tps} | {ratio:.2f} | {itl} | {failed} |")
EOF
