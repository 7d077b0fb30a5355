#!/usr/bin/env bash
# Decode throughput of our engine (`moe bench engine`) next to llama.cpp's on the same
# weights: 128-token prompt, then 32 decode steps, 2 threads, batch 1, 8 and 32 (batch =
# parallel sequences). Runs are interleaved (each pass runs every engine/precision once,
# in turn) and the median per cell over the passes is printed as a markdown table.
#
#   scripts/bench_llama_cpp.sh setup CHECKPOINT_DIR      build llama.cpp, convert to GGUF
#   scripts/bench_llama_cpp.sh run   CHECKPOINT_DIR [--passes N]     (default 3 passes)
#
# CHECKPOINT_DIR: e.g. `target/debug/moe checkpoint new --arch mixtral --size bench
# --out /tmp/mixtral-bench`. Build target/debug/moe yourself first (`cargo build -p moe-cli`).
#
# setup (idempotent, skips what exists; ~15-25 min on 2 cores, most of it the build):
#   apt-get installs cmake/build-essential/python3-venv if missing; `pip download` gets the
#   llama-cpp-python 0.3.36 sdist, whose vendor/llama.cpp is llama.cpp commit 0c1e570 (no
#   GitHub here); cmake builds llama-bench, llama-batched-bench, llama-simple (~7 min);
#   a venv gets that tree's gguf-py + numpy, safetensors, torch (the PyPI wheel, a few GB
#   with its CUDA deps), transformers 4.57, sentencepiece; convert_hf_to_gguf.py writes
#   f32, f16 and q8_0 GGUF files.
# run: each pass is ours f32, llama f32, ours bf16, llama f16, ours int8, llama q8_0, and
#   llama q8_0 at batch 1 with weight repacking on; a few minutes per pass plus the
#   waits for an idle machine (1-min load average below MOE_LLAMA_MAX_LOAD, default 0.5,
#   for at most MOE_LLAMA_LOAD_WAIT seconds, default 300; a warning if it never gets there).
#
# Env: MOE_LLAMA_WORK (default target/llama-cpp), MOE_LLAMA_ONLY=1 (skip our engine; its
# rows print "-"), MOE_LLAMA_MAX_LOAD, MOE_LLAMA_LOAD_WAIT, MOE_BIN (default target/debug/moe).
#
# Pitfalls (all handled below):
# - `pip download --no-binary :all:` also builds the sdist's build deps (cmake, ninja) from
#   source to prepare its metadata: slow. `--no-binary llama-cpp-python` is enough.
# - Our tokenizer is GPT-2 style and its pre-tokenizer hash is unknown to the converter:
#   a wrapper patches TextModel.get_vocab_base_pre to return "gpt-2" at run time (the
#   vendored file is not edited).
# - llama.cpp's Q8_0 AMX repack crashes on prompts longer than one token, so batched runs
#   disable repacking (llama-batched-bench: -nr). Batch-1 decode with repack on is its best
#   mode; only llama-bench can run it there (`--repack 1 -p 0 -n 32`), and without the
#   128-token prompt before it (depth 0), so that row is not quite the same shape.
# - llama-batched-bench logs through an async thread that can drop the last lines at exit
#   (see common/log.cpp): it is passed -npl 1,8,32,1 so the last line is a decoy.
# - llama-batched-bench silently skips a batch whose KV need (B*(pp+tg)) exceeds -c: -c 8192.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
WORK="${MOE_LLAMA_WORK:-target/llama-cpp}"
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
SDIST_VER=0.3.36
SRC="$WORK/llama_cpp_python-$SDIST_VER/vendor/llama.cpp"
BUILD="$WORK/build"
BIN="$BUILD/bin"
VENV="$WORK/venv"
MOE="${MOE_BIN:-$ROOT/target/debug/moe}"
BATCHES=1,8,32 PP=128 TG=32 THREADS=2
NICE=(nice -n 19)

die() { echo "bench_llama_cpp: error: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }

[ $# -ge 2 ] || usage
CMD=$1 CKPT=${2%/}; shift 2
[ -d "$CKPT" ] && CKPT=$(cd "$CKPT" && pwd)
need_ckpt() { [ -f "$CKPT/config.json" ] || die "$CKPT/config.json not found: not a checkpoint directory"; }
GGUF_DIR="$WORK/gguf/$(basename "$CKPT")"
gguf() { echo "$GGUF_DIR/model-$1.gguf"; }

setup() {
  local t0=$SECONDS missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v c++ >/dev/null && command -v make >/dev/null || missing+=(build-essential)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    "${NICE[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    say "downloading the llama-cpp-python $SDIST_VER sdist (vendor/llama.cpp = commit 0c1e570)"
    "${NICE[@]}" python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$SDIST_VER" -d "$WORK/dl"
    tar -xzf "$WORK/dl/llama_cpp_python-$SDIST_VER.tar.gz" -C "$WORK"
  fi
  if [ ! -x "$BIN/llama-batched-bench" ] || [ ! -x "$BIN/llama-bench" ]; then
    say "building llama.cpp (~7 min on 2 cores), log: $WORK/build.log"
    { "${NICE[@]}" cmake -S "$SRC" -B "$BUILD" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release &&
      "${NICE[@]}" cmake --build "$BUILD" -j2 --target llama-bench llama-batched-bench llama-simple
    } >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; die "llama.cpp build failed"; }
  fi
  if [ ! -f "$VENV/.done" ]; then
    say "creating the converter venv $VENV (torch is a large download), log: $WORK/venv.log"
    python3 -m venv "$VENV"
    { "${NICE[@]}" "$VENV/bin/pip" install -q "$SRC/gguf-py" numpy safetensors torch \
        'transformers==4.57.*' sentencepiece && touch "$VENV/.done"
    } >"$WORK/venv.log" 2>&1 || { tail -30 "$WORK/venv.log" >&2; die "venv install failed"; }
  fi
  cat >"$WORK/convert.py" <<'EOF'
# Runs llama.cpp's convert_hf_to_gguf.py with the pre-tokenizer check bypassed ("gpt-2").
import sys
sys.path.insert(0, sys.argv.pop(1))
import convert_hf_to_gguf as conv
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
conv.main()
EOF
  need_ckpt; mkdir -p "$GGUF_DIR"
  for t in f32 f16 q8_0; do
    [ -s "$(gguf $t)" ] && continue
    say "converting $CKPT to $(gguf $t)"
    "${NICE[@]}" "$VENV/bin/python" "$WORK/convert.py" "$SRC" "$CKPT" --outtype $t \
      --outfile "$(gguf $t).tmp" >"$GGUF_DIR/convert-$t.log" 2>&1 ||
      { tail -30 "$GGUF_DIR/convert-$t.log" >&2; die "conversion to $t failed"; }
    mv "$(gguf $t).tmp" "$(gguf $t)"
  done
  say "setup done in $((SECONDS - t0)) s; GGUF files in $GGUF_DIR"
}

# Waits until the 1-minute load average is below MAX_LOAD, or warns at the deadline.
wait_idle() {
  local max=${MOE_LLAMA_MAX_LOAD:-0.5} deadline=$((SECONDS + ${MOE_LLAMA_LOAD_WAIT:-300})) l
  while :; do
    l=$(cut -d' ' -f1 /proc/loadavg)
    awk -v l="$l" -v m="$max" 'BEGIN { exit !(l < m) }' && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "WARNING: load average still $l (>= $max); running anyway, figures may be low" >&2
      echo "$l" >>"$RES.loadwarn"; return 0
    fi
    sleep 5
  done
}

# One run: appends "pass<TAB>label<TAB>batch<TAB>tok/s" lines to $RES.
one() {
  local pass=$1 label=$2 kind=$3 arg=$4 log="$LOGS/p$1-${2// /_}.log"
  wait_idle
  say "pass $pass: $label (load $(cut -d' ' -f1 /proc/loadavg))"
  case $kind in
    ours) RAYON_NUM_THREADS=$THREADS "$MOE" bench engine --model "$CKPT" --batch $BATCHES \
            --prompt-tokens $PP --decode-tokens $TG --no-candle --dtype "$arg" >"$log" 2>&1 ;;
    batched) "$BIN/llama-batched-bench" -m "$(gguf "$arg")" -c 8192 -npp $PP -ntg $TG \
            -npl $BATCHES,1 -t $THREADS -nr --output-format jsonl >"$log" 2>&1 ;;
    repack) "$BIN/llama-bench" -m "$(gguf "$arg")" -p 0 -n $TG -t $THREADS --repack 1 \
            -o json >"$log" 2>"$log.err" ;;
  esac || { echo "WARNING: $label failed (pass $pass), see $log" >&2; return 0; }
  local n; n=$(wc -l <"$RES")
  python3 - "$kind" "$log" <<'EOF' | sed "s/^/$pass\t$label\t/" >>"$RES"
import json, re, sys
kind, text, done = sys.argv[1], open(sys.argv[2]).read(), set()
if kind == "ours":  # rows: batch, moe decode tok/s, candle, prefill, experts rows/s
    for m in re.finditer(r"^\s*(\d+)\s+([\d.]+)\s", text, re.M): print(f"{m[1]}\t{m[2]}")
elif kind == "batched":
    for l in text.splitlines():
        if l.startswith("{"):  # first per batch: the trailing 1 is only a decoy
            d = json.loads(l); seen = d["pl"] in done; done.add(d["pl"])
            if not seen: print(f"{d['pl']}\t{d['speed_tg']:.1f}")
else:
    for d in json.loads(text[text.index("["):]):
        if d["n_gen"] > 0: print(f"1\t{d['avg_ts']:.1f}")
EOF
  local want=3; [ "$kind" = repack ] && want=1
  [ $(($(wc -l <"$RES") - n)) -eq $want ] || echo "WARNING: $label (pass $pass): missing figures, see $log" >&2
}

run() {
  local passes=3
  while [ $# -gt 0 ]; do
    case $1 in --passes) passes=${2:?--passes N}; shift 2 ;; *) die "unknown option $1" ;; esac
  done
  need_ckpt
  for f in "$BIN/llama-batched-bench" "$BIN/llama-bench" "$(gguf f32)" "$(gguf f16)" "$(gguf q8_0)"; do
    [ -e "$f" ] || die "$f missing: run \`$0 setup $CKPT\` first"
  done
  local ours=1
  [ "${MOE_LLAMA_ONLY:-0}" = 1 ] && ours=0 && say "MOE_LLAMA_ONLY=1: skipping our engine"
  [ $ours = 0 ] || [ -x "$MOE" ] || die "$MOE missing: build it first (cargo build -p moe-cli)"
  LOGS="$WORK/runs/$(date +%Y%m%d-%H%M%S)"; mkdir -p "$LOGS"; RES="$LOGS/results.tsv"; : >"$RES"
  local p
  for p in $(seq 1 "$passes"); do
    [ $ours = 0 ] || one "$p" "ours f32" ours f32;  one "$p" "llama.cpp f32" batched f32
    [ $ours = 0 ] || one "$p" "ours bf16" ours bf16; one "$p" "llama.cpp f16" batched f16
    [ $ours = 0 ] || one "$p" "ours int8" ours int8; one "$p" "llama.cpp q8_0" batched q8_0
    one "$p" "llama.cpp q8_0 repack, llama-bench tg32 at depth 0" repack q8_0
  done
  echo
  echo "Decode tok/s, median of $passes pass(es); prompt $PP, $TG decode steps, $THREADS threads;"
  echo "llama.cpp rows: llama-batched-bench -nr (repack off) unless marked. Logs: $LOGS"
  [ ! -e "$RES.loadwarn" ] || echo "WARNING: $(wc -l <"$RES.loadwarn") run(s) started with load >= ${MOE_LLAMA_MAX_LOAD:-0.5}"
  echo
  python3 - "$RES" <<'EOF'
import statistics, sys
rows = ["ours f32", "llama.cpp f32", "ours bf16", "llama.cpp f16", "ours int8",
        "llama.cpp q8_0", "llama.cpp q8_0 repack, llama-bench tg32 at depth 0"]
cells = {}
for line in open(sys.argv[1]):
    _, label, b, v = line.rstrip("\n").split("\t")
    cells.setdefault((label, b), []).append(float(v))
def cell(label, b):
    v = cells.get((label, b))
    return f"{statistics.median(v):.1f}" if v else "-"
print("| engine, precision | batch 1 | batch 8 | batch 32 |")
print("|---|---:|---:|---:|")
for r in rows:
    print(f"| {r} | " + " | ".join(cell(r, b) for b in ("1", "8", "32")) + " |")
EOF
}

case $CMD in
  setup) [ $# -eq 0 ] || die "setup takes no options"; setup ;;
  run) run "$@" ;;
  *) usage ;;
esac
