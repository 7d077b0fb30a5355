#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script):
#   formatting, clippy with warnings as errors, the deployment checks (Kubernetes
#   manifests rendered, validated and checked against the binary; the container image
#   built), then every unit and end-to-end test, the container fault test included.
#
# Works on a fresh Debian machine that has only the Rust toolchain; it installs what is
# missing:
#   - rustfmt/clippy components (rustup); gcc and libc6-dev (rustc's linker);
#   - Debian packages: etcd-server (control-plane tests start their own etcd on free
#     127.0.0.1 ports), prometheus (promtool checks our /metrics exposition), iproute2
#     and procps (network-namespace fault tests, kill), python3-venv (deployment checks
#     use kubectl and kubernetes-validate from PyPI in a cached venv), debootstrap and
#     docker.io (the image is built from local base images: no registry is needed);
#   - protoc is not needed: the build takes it from crates.io (.cargo/config.toml).
# Services: none beyond the processes and containers the tests start themselves; a
# Docker Engine must be running (a fresh Debian install of docker.io starts one).
# MOE_SKIP_CONTAINERS=1 leaves out the image build and the container tests (say so when
# you use it: they are part of the suite).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
containers=1; [ "${MOE_SKIP_CONTAINERS:-0}" = 1 ] && containers=0

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v kill >/dev/null 2>&1 && command -v pgrep >/dev/null 2>&1 || missing+=(procps)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3 python3-venv)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ $containers = 1 ]; then
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v docker >/dev/null 2>&1 || missing+=(docker.io)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian packages may start system services; our tests never use them.
for svc in etcd prometheus prometheus-node-exporter; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
done
if [ $containers = 1 ] && ! docker info >/dev/null 2>&1; then
  echo "error: no Docker Engine answers (docker info failed). Start one (systemctl start docker)," \
       "or run with MOE_SKIP_CONTAINERS=1 to leave the container tests out." >&2
  exit 1
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

# End-to-end tests drive the real `moe` binary: build it before the tests run.
log "cargo build (binaries)"
cargo build --workspace --bins

log "deployment manifests (render, validate, check against the binary)"
bash scripts/check-manifests.sh target/debug/moe

log "monitoring: Prometheus rules (promtool check + unit tests), Grafana dashboard"
bash scripts/check-monitoring.sh

if [ $containers = 1 ]; then
  # The image the container tests run: deploy/Dockerfile's runtime stage around the
  # binary just built (a cold compile inside Docker cost ~11 minutes of CI's budget).
  # MOE_IMAGE_PROFILE=release (or dev) builds the whole Dockerfile instead, as shipped.
  export MOE_TEST_IMAGE=${MOE_TEST_IMAGE:-moe-cluster:test}
  if [ -n "${MOE_IMAGE_PROFILE:-}" ]; then
    log "container image $MOE_TEST_IMAGE (deploy/Dockerfile, profile $MOE_IMAGE_PROFILE)"
    CARGO_PROFILE=$MOE_IMAGE_PROFILE bash scripts/build-image.sh "$MOE_TEST_IMAGE" >/dev/null
  else
    log "container image $MOE_TEST_IMAGE (runtime stage around target/debug/moe)"
    MOE_IMAGE_BINARY=target/debug/moe bash scripts/build-image.sh "$MOE_TEST_IMAGE" >/dev/null
  fi
else
  log "MOE_SKIP_CONTAINERS=1: the image build and the container tests are left out"
  export MOE_TEST_IMAGE=""
fi

if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run"
  cargo nextest run --workspace --no-fail-fast
else
  log "cargo test (cargo-nextest not installed)"
  cargo test --workspace --no-fail-fast
fi
