#!/usr/bin/env bash
# Builds `moe` with `--features cuda` (worker devices `cuda:N`: candle on CUDA GPUs) for
# sm_90 (H100/H200) into its own target dir, with the CUDA 13.0 toolkit from PyPI (no
# system CUDA needed), and prints where the binary is. The default build stays CUDA-free.
#
#   scripts/cuda-build.sh            # ~15 min cold on 2 cores (a target dir of its own)
#
# Settings (environment): CUDA_VENV (.cuda/venv), CUDA_ROOT_DIR (.cuda/root),
# CUDA_TARGET_DIR (target-cuda), CUDA_COMPUTE_CAP (90), JOBS (2).
#
# Pitfalls handled here (shared/STACK.md item 3): only the 13.0 wheels hold nvcc, and
# cudarc refuses newer ones; nvcc must be on PATH; the linker needs unversioned .so
# names; the wheels ship no libcuda, so a stub whose soname is libcuda.so.1 is built for
# linking only. The stub is never put in an rpath (it would hide the real driver): at
# run time the binary needs the NVIDIA driver and the wheels' lib/ on LD_LIBRARY_PATH
# (scripts/gpu-check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CUDA_VENV:-.cuda/venv}
ROOT=${CUDA_ROOT_DIR:-.cuda/root}
TARGET=${CUDA_TARGET_DIR:-target-cuda}
CAP=${CUDA_COMPUTE_CAP:-90}
JOBS=${JOBS:-2}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet \
  "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,cublas,curand,nvrtc]==13.0.2"

CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
for d in bin include lib; do
  [ -d "$CU/$d" ] || { echo "cuda-build: $CU/$d is missing; the wheel layout changed?" >&2; exit 1; }
done

# CUDA_ROOT: bin and include from the wheels, lib64 with unversioned links, and the stub.
mkdir -p "$ROOT/lib64/stubs"
ROOT=$(cd "$ROOT" && pwd)
ln -sfn "$CU/bin" "$ROOT/bin"
ln -sfn "$CU/include" "$ROOT/include"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(ls "$CU/lib/lib$lib.so."* 2>/dev/null | sort | head -n 1)
  [ -n "$real" ] || { echo "cuda-build: no lib$lib.so.* in $CU/lib" >&2; exit 1; }
  ln -sfn "$real" "$ROOT/lib64/lib$lib.so"
done
# The stub must define every driver function the binary calls (lld refuses undefined
# symbols): all the cu* names in cuda.h, versioned and not, plus the PFN_ typedefs'
# names (cudarc still links cuProfilerInitialize, which only cudaProfilerTypedefs.h
# names). Empty functions: the stub is never loaded, the real driver is.
{
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CU/include/cuda.h"
  grep -ohE '\bPFN_cu[A-Z][A-Za-z0-9_]*\b' "$CU"/include/*Typedefs.h | sed -E 's/^PFN_//; s/_v[0-9]{4,5}$//'
} | sort -u | sed 's/.*/void &(void) {}/' >"$ROOT/lib64/stubs/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib64/stubs/libcuda.so" \
  "$ROOT/lib64/stubs/stub.c"

export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_COMPUTE_CAP="$CAP"
export PATH="$ROOT/bin:$PATH"
# The stub and the wheel libs are found at link time only (-L), never through an rpath.
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$ROOT/lib64 -L native=$ROOT/lib64/stubs"
nvcc --version | tail -n 1

cargo build --release -j "$JOBS" -p moe-cli --features cuda --target-dir "$TARGET"
BIN="$TARGET/release/moe"
if readelf -d "$BIN" | grep -E 'RPATH|RUNPATH' | grep -q stubs; then
  echo "cuda-build: $BIN has the stub libcuda in its rpath; refusing it" >&2
  exit 1
fi
echo "cuda-build: built $(pwd)/$BIN ($(du -h "$BIN" | cut -f1))"
# Without debug info and gzipped it is small enough to copy to a GPU machine quickly
# (~22 MB against ~230 MB; stripped alone it is still ~75 MB).
objcopy --strip-debug "$BIN" "$BIN.stripped"
gzip -9 -c "$BIN.stripped" >"$TARGET/moe-cuda.gz"
rm -f "$BIN.stripped"
echo "cuda-build: for the GPU machine: $(pwd)/$TARGET/moe-cuda.gz ($(du -h "$TARGET/moe-cuda.gz" | cut -f1)); gunzip it there"
echo "cuda-build: run it on the GPU machine with scripts/gpu-check.sh"
