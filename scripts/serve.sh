#!/usr/bin/env bash
# The README's first command: the standalone cluster (router + 2 in-process expert
# actors) on the built-in demo model, built from source. Extra arguments go to
# `moe serve` (e.g. --http-listen 127.0.0.1:8081).
#
# On a fresh Debian machine with only the Rust toolchain it first installs the C
# compiler that rustc links with and the tokenizer's Oniguruma is built with (gcc,
# libc6-dev); nothing else is needed (protoc comes from crates.io, .cargo/config.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cc >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "==> installing gcc libc6-dev (Debian): rustc needs a C linker" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends gcc libc6-dev
fi
exec cargo run -p moe-cli -- serve "$@"
