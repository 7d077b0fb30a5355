#!/usr/bin/env bash
# Makes the two base images deploy/Dockerfile starts from, on a machine whose Docker
# Engine cannot pull (no registry reachable), unless they exist already:
#   debian:bookworm-slim        debootstrap --variant=minbase bookworm, imported
#   rust:<ver>-slim-bookworm    that + gcc + the host's Rust toolchain (rustc --print sysroot)
#                               + the host's extra CA certificates (/usr/local/share/ca-certificates)
# Where a registry is reachable, `docker pull` the real images instead; the Dockerfile
# works with either. Images persist in the Docker Engine, so later runs are instant.
# Installs debootstrap (Debian) when missing. Needs root for debootstrap (or sudo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

RUNTIME_IMAGE=${RUNTIME_IMAGE:-debian:bookworm-slim}
rust_version=$(rustc --version | awk '{print $2}')
RUST_IMAGE=${RUST_IMAGE:-rust:${rust_version%.*}-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$RUNTIME_IMAGE"; then
  command -v debootstrap >/dev/null 2>&1 || {
    log "installing debootstrap"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends debootstrap
  }
  root=$(mktemp -d /tmp/moe-rootfs.XXXXXX)
  trap '$SUDO rm -rf "$root"' EXIT
  log "debootstrap --variant=minbase bookworm ($MIRROR) → $RUNTIME_IMAGE"
  $SUDO debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/tmp/moe-debootstrap.log 2>&1 || {
    tail -20 /tmp/moe-debootstrap.log >&2; exit 1; }
  $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  $SUDO tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$RUNTIME_IMAGE" >/dev/null
  $SUDO rm -rf "$root"; trap - EXIT
fi

# MOE_BASE_IMAGES=runtime: only the runtime image (an image of a prebuilt binary needs
# no build stage; scripts/build-image.sh with MOE_IMAGE_BINARY).
if [ "${MOE_BASE_IMAGES:-all}" != runtime ] && ! have "$RUST_IMAGE"; then
  ctx=$(mktemp -d /tmp/moe-rust-ctx.XXXXXX)
  trap 'rm -rf "$ctx"' EXIT
  sysroot=$(rustc --print sysroot)
  log "building $RUST_IMAGE from $RUNTIME_IMAGE and the host toolchain ($sysroot)"
  mkdir -p "$ctx/rust"
  # Binaries and libraries only: the docs (share/) are most of the size.
  cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/rust/"
  [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$ctx/rust/"
  rm -rf "$ctx/rust/lib/rustlib/src" "$ctx/rust/lib/rustlib/rustc-src"
  mkdir -p "$ctx/extra-ca"
  for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -e "$crt" ] && cp "$crt" "$ctx/extra-ca/"
  done
  cp scripts/images/rust-from-host.Dockerfile "$ctx/Dockerfile"
  docker build -q --network host -t "$RUST_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"; trap - EXIT
fi
echo "base images: $RUNTIME_IMAGE $RUST_IMAGE"

# etcd for the container fault test (tests/tests/containers_faults.rs), from the runtime
# base image and Debian's etcd-server.
ETCD_IMAGE=${ETCD_IMAGE:-moe-test-etcd:3.4}
if ! have "$ETCD_IMAGE"; then
  ctx=$(mktemp -d /tmp/moe-etcd-ctx.XXXXXX)
  trap 'rm -rf "$ctx"' EXIT
  log "building $ETCD_IMAGE from $RUNTIME_IMAGE and Debian's etcd-server"
  cp scripts/images/etcd.Dockerfile "$ctx/Dockerfile"
  docker build -q --network host --build-arg BASE_IMAGE="$RUNTIME_IMAGE" \
    -t "$ETCD_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"; trap - EXIT
fi
echo "test images: $ETCD_IMAGE"
