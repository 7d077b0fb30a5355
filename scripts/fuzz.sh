#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/fuzz_targets/ one after another, FUZZ_SECONDS each
# (default 60), and prints per target: seconds run, executions, corpus size and crashes
# found. Exits 1 if any target crashed (a panic, an input slower than FUZZ_TIMEOUT, or
# more memory than FUZZ_RSS_MB); the input that did it is left in fuzz/artifacts/<target>/
# and named in the output.
#
#   FUZZ_SECONDS=60 scripts/fuzz.sh [TARGET...]      # default: every target
#
# Settings (environment): FUZZ_SECONDS (60), FUZZ_TIMEOUT (10 s per input), FUZZ_RSS_MB
# (2048; with AddressSanitizer also the largest single allocation), FUZZ_SANITIZER
# (address; `none` builds without it: faster, but an oversized allocation that is never
# touched then goes unnoticed).
#
# Needs only the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags
# cargo fuzz passes (-Zsanitizer=address); the stable toolchain ships the ASan runtime.
# Installs what is missing: a C++ compiler (libfuzzer-sys compiles libFuzzer; Debian
# packages) and cargo-fuzz (crates.io). The first build instruments every dependency
# (~10 minutes on 2 busy cores, into fuzz/target); later builds only what changed.
#
# Inputs: the committed seeds in fuzz/corpus/<target>/ (read, never written) and what
# earlier runs found in fuzz/work/corpus/<target>/ (ignored by git; new inputs go there).
# A crash becomes a regression input in fuzz/regressions/<target>/ and a test: see
# docs/operations.md, "Fuzzing". CI does not run this script; it runs
# tests/tests/fuzz_corpus_replay.rs, which feeds every corpus and regression input
# through the same functions without instrumentation.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${FUZZ_SECONDS:-60}
timeout=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}
sanitizer=${FUZZ_SANITIZER:-address}
for v in "$secs" "$timeout" "$rss_mb"; do
  case "$v" in '' | *[!0-9]*)
    echo "FUZZ_SECONDS, FUZZ_TIMEOUT and FUZZ_RSS_MB must be whole numbers" >&2; exit 2 ;;
  esac
done

log() { printf '\n==> %s\n' "$*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian packages)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
opts=(--fuzz-dir fuzz --sanitizer "$sanitizer")
known=$(cargo fuzz list --fuzz-dir fuzz)
if [ $# -gt 0 ]; then
  targets=("$@")
  for t in "${targets[@]}"; do
    grep -qx -- "$t" <<<"$known" || { echo "no fuzz target '$t'; there are: $(echo $known)" >&2; exit 2; }
  done
else
  mapfile -t targets <<<"$known"
fi

log "cargo fuzz build (sanitizer: $sanitizer; debug assertions and overflow checks on)"
for t in "${targets[@]}"; do cargo fuzz build "${opts[@]}" "$t"; done
triple=$(rustc -vV | sed -n 's/^host: //p')

summary=()
failed=0
for t in "${targets[@]}"; do
  work=fuzz/work/corpus/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$work" "$artifacts"
  before=$(find "$artifacts" -type f | sort)
  log "fuzzing $t for ${secs}s"
  out=fuzz/work/$t.log
  start=$(date +%s)
  set +e
  # The binary cargo fuzz built, run directly (`cargo fuzz run` would build it again).
  # -rss_limit_mb: no input may make the process hold gigabytes (with ASan, one
  # allocation above it is a crash at once, even if never touched); -timeout: nor spend
  # seconds on one input.
  "fuzz/target/$triple/release/$t" "$work" "fuzz/corpus/$t" \
    -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$out" 2>&1
  rc=$?
  set -e
  ran=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  # libFuzzer's status lines: "#N <EVENT> cov: C ft: F corp: UNITS/SIZE ...".
  corpus=$(grep -o 'corp: [0-9]*' "$out" | tail -1 | cut -d' ' -f2)
  new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | sed '/^$/d')
  crashes=$(printf '%s' "$new" | grep -c . || true)
  if [ "$rc" != 0 ] || [ "$crashes" -gt 0 ]; then
    failed=1
    grep -E -m 6 'panicked at|ERROR: libFuzzer|==ERROR|SUMMARY|Test unit written' "$out" >&2 || true
    echo "  $t: exit status $rc; log: $out; inputs: ${new:-none written}" >&2
    [ "$crashes" -gt 0 ] || crashes="? (rc $rc)"
  fi
  summary+=("$(printf '%-20s %5ss %12s execs %6s corpus  %s crashes' \
    "$t" "$ran" "${execs:-?}" "${corpus:-?}" "$crashes")")
done

log "summary (FUZZ_SECONDS=$secs per target, sanitizer $sanitizer)"
printf '%s\n' "${summary[@]}"
if [ "$failed" != 0 ]; then
  echo "CRASHES FOUND: reproduce with fuzz/target/$triple/release/<target> <input>" >&2
fi
exit "$failed"
