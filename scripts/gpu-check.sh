#!/usr/bin/env bash
# Checks a `cuda` build of moe on a GPU machine that has no Rust: greedy tokens with the
# experts on cuda:0 equal those of the CPU kernel on a tiny checkpoint, then prints
# expert throughput and `moe bench engine` figures on cuda:0. Prints numbers; the token
# check is the only pass/fail.
#
#   scripts/gpu-check.sh MOE_BINARY CHECKPOINT_DIR
#
# MOE_BINARY: built by scripts/cuda-build.sh. CHECKPOINT_DIR: a tiny checkpoint carried
# along (`moe checkpoint new --arch mixtral --out DIR`, written where moe was built).
# Needs the NVIDIA driver (>= 580 for CUDA 13.0) and python3 whose `nvidia` packages hold
# the CUDA 13 runtime libraries (cudart, cublas, curand, nvrtc).
set -euo pipefail

MOE=${1:?usage: gpu-check.sh MOE_BINARY CHECKPOINT_DIR}
CKPT=${2:?usage: gpu-check.sh MOE_BINARY CHECKPOINT_DIR}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
if [ "${driver%%.*}" -lt 580 ]; then
  echo "gpu-check: driver $driver is older than 580: CUDA 13.0 kernels will not load" >&2
  exit 1
fi

echo "== CUDA 13 runtime libraries from python's nvidia packages"
libs=$(python3 - <<'PY'
import glob, os, nvidia
dirs = set()
for root in nvidia.__path__:
    for pat in ("libcudart.so.13*", "libcublas.so.13*", "libcublasLt.so.13*",
                "libcurand.so.10*", "libnvrtc.so.13*"):
        for f in glob.glob(os.path.join(root, "**", pat), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
[ -n "$libs" ] || { echo "gpu-check: no CUDA 13 runtime libraries under python's nvidia packages" >&2; exit 1; }
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$MOE" | grep -q "not found"; then
  ldd "$MOE" | grep "not found" >&2
  exit 1
fi

echo "== greedy tokens: cuda:0 against the CPU kernel"
: > "$WORK/in.jsonl"
for len in 3 11 29; do
  ids=$(seq 1 "$len" | awk '{printf "%s%d", (NR>1?",":""), ($1*37+11)%500+2}')
  echo "{\"prompt_token_ids\": [$ids], \"max_tokens\": 16, \"temperature\": 0}" >> "$WORK/in.jsonl"
done
"$MOE" generate --model "$CKPT" --input "$WORK/in.jsonl" --output "$WORK/cpu.jsonl" --device cpu:0
"$MOE" generate --model "$CKPT" --input "$WORK/in.jsonl" --output "$WORK/cuda.jsonl" --device cuda:0
tokens() { python3 -c 'import json,sys; [print(json.loads(l).get("token_ids")) for l in open(sys.argv[1])]' "$1"; }
if [ "$(tokens "$WORK/cpu.jsonl")" != "$(tokens "$WORK/cuda.jsonl")" ]; then
  echo "gpu-check: FAIL: cuda:0 greedy tokens differ from the CPU kernel's" >&2
  diff <(tokens "$WORK/cpu.jsonl") <(tokens "$WORK/cuda.jsonl") >&2 || true
  exit 1
fi
echo "same greedy tokens on cuda:0 and cpu:0 ($(wc -l < "$WORK/in.jsonl") requests)"

echo "== expert throughput and engine figures on cuda:0 (f32, then bf16)"
for dtype in f32 bf16; do
  "$MOE" bench engine --model "$CKPT" --device cuda:0 --dtype "$dtype" --no-candle \
    --batch 1,8,32 --prompt-tokens 64 --decode-tokens 16
done
"$MOE" bench engine --model "$CKPT" --device cpu:0 --no-candle \
  --batch 1,8,32 --prompt-tokens 64 --decode-tokens 16
echo "gpu-check: ok"
