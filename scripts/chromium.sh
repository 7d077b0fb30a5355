#!/usr/bin/env bash
# Prints the path of a headless-capable Chromium on stdout, installing Debian's
# `chromium` first when none is on PATH (apt-get; sudo when not root). The status-page
# test (tests/tests/status_page.rs) opens the router's page in it.
#   MOE_CHROMIUM  a browser to use instead (printed as is, nothing installed)
set -euo pipefail

if [[ -n "${MOE_CHROMIUM:-}" ]]; then
    echo "$MOE_CHROMIUM"
    exit 0
fi

find_browser() {
    local b
    for b in chromium chromium-browser google-chrome-stable google-chrome; do
        if command -v "$b" >/dev/null 2>&1; then
            command -v "$b"
            return 0
        fi
    done
    return 1
}

# Tests run in parallel processes: one installs, the others wait for it.
lock="${TMPDIR:-/tmp}/moe-chromium-install.lock"
exec 9>"$lock"
flock 9

if find_browser; then
    exit 0
fi

echo "chromium.sh: installing chromium (Debian)" >&2
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >&2
find_browser || { echo "chromium.sh: chromium is still not on PATH" >&2; exit 1; }
