#!/usr/bin/env bash
# Builds the moe-cluster image from deploy/Dockerfile (making local base images first
# where no registry is reachable: scripts/base-images.sh).
#   scripts/build-image.sh [TAG]           default tag moe-cluster:<crate version>
#   CARGO_PROFILE=dev scripts/build-image.sh   faster build, for tests
#   MOE_IMAGE_BINARY=target/debug/moe scripts/build-image.sh TAG
#       the runtime stage of deploy/Dockerfile, unchanged, around a `moe` built on this
#       host (its debug info stripped) instead of the build stage's: what CI's container
#       tests run, since the in-Docker compile cost ~11 minutes of CI's budget. The host
#       must have the runtime image's glibc or older (both are Debian bookworm here).
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
start=$(date +%s)
if [ -n "${MOE_IMAGE_BINARY:-}" ]; then
  [ -x "$MOE_IMAGE_BINARY" ] || { echo "error: MOE_IMAGE_BINARY=$MOE_IMAGE_BINARY is not an executable" >&2; exit 1; }
  MOE_BASE_IMAGES=runtime bash scripts/base-images.sh
  ctx=$(mktemp -d /tmp/moe-image-ctx.XXXXXX)
  trap 'rm -rf "$ctx"' EXIT
  objcopy --strip-debug "$MOE_IMAGE_BINARY" "$ctx/moe"
  # The global ARGs, then the runtime stage from its FROM on, copying ./moe instead of
  # the build stage's output.
  { grep -E '^ARG RUNTIME_IMAGE=' deploy/Dockerfile
    sed -n '/^FROM \${RUNTIME_IMAGE}/,$p' deploy/Dockerfile |
      sed 's|^COPY --from=build /out/moe |COPY moe |'
  } >"$ctx/Dockerfile"
  grep -q '^COPY moe /usr/local/bin/moe$' "$ctx/Dockerfile" || {
    echo "error: deploy/Dockerfile's runtime stage no longer copies /out/moe to /usr/local/bin/moe" >&2
    exit 1
  }
  echo "==> docker build $TAG (runtime stage around $MOE_IMAGE_BINARY)" >&2
  docker build --network host --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" -t "$TAG" "$ctx" >&2
  echo "==> built $TAG in $(( $(date +%s) - start )) s" >&2
  echo "$TAG"
  exit 0
fi
bash scripts/base-images.sh
echo "==> docker build $TAG (profile $PROFILE)" >&2
# --network host: the build stage fetches crates from crates.io and the runtime stage
# installs ca-certificates from Debian.
docker build --network host -f deploy/Dockerfile \
  --build-arg RUST_IMAGE="$RUST_IMAGE" --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" \
  --build-arg MOE_GIT_COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
  --build-arg CARGO_PROFILE="$PROFILE" ${CARGO_FEATURES:+--build-arg CARGO_FEATURES="$CARGO_FEATURES"} \
  -t "$TAG" . >&2
echo "==> built $TAG in $(( $(date +%s) - start )) s" >&2
echo "$TAG"
