#!/usr/bin/env bash
# Regenerates the Hugging Face reference files under model/tests/data/hf/ that
# model/tests/parity_hf.rs compares our engine against.
#
#   scripts/hf_reference.sh                 # every architecture
#   scripts/hf_reference.sh olmoe mixtral   # only these
#
# For each architecture it writes the tiny f32 checkpoint with seed 1 using our CLI
# (`moe checkpoint new`, built first if needed) into a temporary directory, then runs
# scripts/hf_reference.py on it with transformers' own model class.
#
# Python: the venv in $MOE_PYREF_VENV (default: .venv-hf at the repo root) is used if it
# exists; otherwise it is created with `python3 -m venv` and torch, transformers,
# safetensors and numpy are installed from PyPI (unpinned; the versions used are written
# into every reference file). Only the CPU is used: to avoid PyPI's CUDA build of torch,
# create the venv yourself first and install torch from
# https://download.pytorch.org/whl/cpu (`pip install torch --index-url ...`).
# Takes about a minute once the venv exists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ARCHS=(mixtral qwen2_moe qwen3_moe deepseek_v2 deepseek_v3 olmoe)
if [ "$#" -gt 0 ]; then
  ARCHS=("$@")
fi

VENV="${MOE_PYREF_VENV:-$ROOT/.venv-hf}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "creating Python venv in $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --upgrade pip
  "$VENV/bin/pip" install torch transformers safetensors numpy
fi
"$PY" -c 'import torch, transformers, safetensors, numpy' || {
  echo "error: $VENV lacks torch/transformers/safetensors/numpy;" \
       "install them there or point MOE_PYREF_VENV at a venv that has them" >&2
  exit 1
}

echo "building moe-cli" >&2
cargo build -q -p moe-cli
MOE="$ROOT/target/debug/moe"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
OUT_DIR="$ROOT/model/tests/data/hf"
mkdir -p "$OUT_DIR"

for A in "${ARCHS[@]}"; do
  "$MOE" checkpoint new --arch "$A" --out "$TMP/$A" --seed 1 >/dev/null
  "$PY" "$ROOT/scripts/hf_reference.py" --model "$TMP/$A" --out "$OUT_DIR/$A.json"
done
