#!/usr/bin/env bash
# Builds the moe-cluster image from deploy/Dockerfile (making local base images first
# where no registry is reachable: scripts/base-images.sh).
#   scripts/build-image.sh [TAG]           default tag moe-cluster:<crate version>
#   CARGO_PROFILE=dev scripts/build-image.sh   faster build, for tests
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${1:-moe-cluster:$version}
PROFILE=${CARGO_PROFILE:-release}
rust_version=$(rustc --version | awk '{print $2}')
RUST_IMAGE=${RUST_IMAGE:-rust:${rust_version%.*}-slim-bookworm}
RUNTIME_IMAGE=${RUNTIME_IMAGE:-debian:bookworm-slim}
export RUST_IMAGE RUNTIME_IMAGE
# The Dockerfile copies the crates one by one (so that edits elsewhere keep the build
# layer cached); a workspace member it forgets fails the build deep inside docker, so
# check up front that it copies every member.
members=$(sed -n 's/^members = \[\(.*\)\]/\1/p' Cargo.toml | tr -d '" ' | tr ',' ' ')
for m in $members; do
  [ "$m" = tests ] && continue
  grep -qx "COPY $m $m" deploy/Dockerfile || {
    echo "error: deploy/Dockerfile does not COPY workspace member '$m' (add 'COPY $m $m')" >&2
    exit 1
  }
done
bash scripts/base-images.sh
echo "==> docker build $TAG (profile $PROFILE)" >&2
start=$(date +%s)
# --network host: the build stage fetches crates from crates.io and the runtime stage
# installs ca-certificates from Debian.
docker build --network host -f deploy/Dockerfile \
  --build-arg RUST_IMAGE="$RUST_IMAGE" --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" \
  --build-arg MOE_GIT_COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
  --build-arg CARGO_PROFILE="$PROFILE" ${CARGO_FEATURES:+--build-arg CARGO_FEATURES="$CARGO_FEATURES"} \
  -t "$TAG" . >&2
echo "==> built $TAG in $(( $(date +%s) - start )) s" >&2
echo "$TAG"
