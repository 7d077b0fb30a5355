#!/usr/bin/env bash
# Proves the README's two commands on a fresh machine: makes a bare Debian root
# (debootstrap --variant=minbase bookworm), copies in only the Rust toolchain, clones
# this repository there, and from the clone runs
#   1. the run command (scripts/serve.sh) until the request it prints answers, then stops it;
#   2. the test command (scripts/test.sh) to the end.
# The root shares this machine's network, as a new machine on the same network would:
# /etc/resolv.conf and this machine's CA bundle (a TLS-inspecting egress proxy, if any)
# are copied in, and the host's Docker Engine socket is bound in for the container
# tests (the root installs its own docker CLI through scripts/test.sh).
#
#   sudo scripts/fresh-machine-check.sh [COMMIT]     (default HEAD; needs root)
# Env: FRESH_ROOT (default /var/tmp/moe-fresh-<pid>), KEEP_ROOT=1 keeps it afterwards,
# SKIP_TESTS=1 runs only the first command. Takes ~40 min on 2 cores (two cold builds).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
commit=$(git -C "$repo" rev-parse "${1:-HEAD}")
root=${FRESH_ROOT:-/var/tmp/moe-fresh-$$}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mounts)" >&2; exit 1; }
log() { printf '\n[fresh %s] %s\n' "$(date +%T)" "$*" >&2; }

mounts=()
cleanup() {
  local rc=$?
  [ -n "${serve_pid:-}" ] && kill -- -"$serve_pid" 2>/dev/null || true
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  if [ "${KEEP_ROOT:-0}" != 1 ]; then rm -rf --one-file-system "$root"; fi
  exit $rc
}
trap cleanup EXIT

command -v debootstrap >/dev/null || { apt-get update -q; apt-get install -y -q debootstrap; }
log "debootstrap --variant=minbase bookworm → $root"
mkdir -p "$root"
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 \
  || { tail -20 "$root.debootstrap.log"; exit 1; }
rm -f "$root.debootstrap.log"

log "copying in the Rust toolchain only ($(rustc --version))"
sysroot=$(rustc --print sysroot)
mkdir -p "$root/opt/rust"
cp -a "$sysroot/bin" "$sysroot/lib" "$root/opt/rust/"
[ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$root/opt/rust/"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# Kept if a package later installs ca-certificates and regenerates the bundle.
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true

# The root is a mount point of its own, as / is on a real machine (`ip netns` runs
# `mount --make-rslave /`, which fails on a plain directory).
mount --bind "$root" "$root"; mounts+=("$root")
for m in proc sys dev dev/pts; do
  mkdir -p "$root/$m"; mount --bind "/$m" "$root/$m"; mounts+=("$root/$m")
done
mkdir -p "$root/run"; mount -t tmpfs tmpfs "$root/run"; mounts+=("$root/run")
if [ -S /var/run/docker.sock ]; then
  touch "$root/run/docker.sock"; mount --bind /var/run/docker.sock "$root/run/docker.sock"
  mounts+=("$root/run/docker.sock")
fi

log "cloning $commit"
git clone -q "$repo" "$root/root/moe-cluster"
git -C "$root/root/moe-cluster" checkout -q "$commit"

in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    CI="${CI:-}" \
    bash -c "cd /root/moe-cluster && $1"
}
log "what the root has: $(in_root 'command -v cc protoc etcd promtool python3 docker chromium || true' | tr '\n' ' ')"

# The README's first command, in the background, until its printed request answers.
readme_run=$(grep -m1 -E '^scripts/serve.sh' "$root/root/moe-cluster/README.md" | sed 's/ *#.*//')
readme_test=$(grep -m1 -E '^scripts/test.sh' "$root/root/moe-cluster/README.md" | sed 's/ *#.*//')
[ -n "$readme_run" ] && [ -n "$readme_test" ] || { echo "README's commands not found" >&2; exit 1; }
out=$root/root/serve.out
log "command 1: $readme_run"
start=$(date +%s)
setsid bash -c "$(declare -f in_root); root=$root; in_root '$readme_run'" >"$out" 2>&1 &
serve_pid=$!
try=""
for _ in $(seq 1 2400); do
  try=$(sed -n 's/^try: //p' "$out" | head -1)
  [ -n "$try" ] && break
  kill -0 "$serve_pid" 2>/dev/null || { tail -40 "$out"; echo "command 1 exited early" >&2; exit 1; }
  sleep 1
done
[ -n "$try" ] || { tail -40 "$out"; echo "command 1 printed no request in 40 min" >&2; exit 1; }
log "command 1 ready after $(( $(date +%s) - start )) s; running its printed request: $try"
answer=$(bash -c "$try")
echo "$answer"
echo "$answer" | grep -q '"choices"' || { tail -40 "$out"; echo "the request did not answer with choices" >&2; exit 1; }
kill -TERM -- -"$serve_pid" 2>/dev/null || true
wait "$serve_pid" 2>/dev/null || true
serve_pid=""
log "command 1 passed"

if [ "${SKIP_TESTS:-0}" = 1 ]; then log "SKIP_TESTS=1: command 2 not run"; exit 0; fi
log "command 2: $readme_test"
start=$(date +%s)
set +e
in_root "$readme_test" >"$root.test.log" 2>&1
rc=$?
set -e
grep -E '^(==>|\s+Summary|\s+FAIL|test result: FAILED|error: )' "$root.test.log" || true
log "command 2 exited $rc after $(( $(date +%s) - start )) s (full log: $root.test.log)"
exit "$rc"
