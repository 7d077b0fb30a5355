#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script):
#   formatting, clippy with warnings as errors, every unit and end-to-end test.
# Installs what is missing on a fresh Debian machine with the Rust toolchain:
#   rustfmt/clippy components (rustup); Debian packages `protobuf-compiler` (etcd-client's
#   build needs protoc), `etcd-server` (control-plane tests start their own etcd on free
#   127.0.0.1 ports; no system service is used) and `prometheus` (for `promtool`, which
#   checks our /metrics exposition); cargo-nextest (optional: falls back to cargo test).
# Services: none beyond the processes the tests start themselves on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian packages may start system services; our tests never use them.
for svc in etcd prometheus; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
done

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

# End-to-end tests drive the real `moe` binary: build it before the tests run.
log "cargo build (binaries)"
cargo build --workspace --bins

if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run"
  cargo nextest run --workspace --no-fail-fast
else
  log "cargo test (cargo-nextest not installed)"
  cargo test --workspace --no-fail-fast
fi
